//! Loading: chunks streamed over Arrow Flight to `haul loader` processes (or the
//! in-process loader of `haul run --load-target`) and committed into a real target
//! Postgres exactly once per chunk; and Flight DoGet of a finished job.

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_schema::{DataType, Field, Schema};
use haul_shared::jobs::JobStore;
use haul_shared::load::{LoadClient, schema_to_ipc};
use haul_shared::proto::LOAD_VERSION;
use haul_shared::proto::wire::PrepareLoad;
use tokio_postgres::Client;

use crate::harness::*;

/// Count and an order-independent checksum of a table's rows, as Postgres renders them.
async fn digest(c: &Client, table: &str) -> (i64, String) {
    let r = c
        .query_one(
            &format!(
                "SELECT count(*)::int8, coalesce(sum(('x' || substr(md5(t::text), 1, 16))::bit(64)::int8::numeric), 0)::text FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// The column names and types of a table, in order.
async fn column_types(c: &Client, table: &str) -> Vec<(String, String)> {
    c.query(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Every type haul maps, with edge values, on a skewed key.
fn every_type_sql(rows: u64) -> String {
    format!(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
         CREATE TABLE t (id bigint PRIMARY KEY, i2 smallint, i4 integer, f4 real, f8 double precision,
            amount numeric(12,2), big numeric(50,10), nu numeric, flag boolean, note text,
            vc varchar(20), ch char(4), j json, jb jsonb, raw bytea, d date, tm time, ts timestamp,
            tz timestamptz, iv interval, u uuid, ints integer[], tags text[], ip inet, net cidr,
            mac macaddr, m mood, pos posint, ttz timetz, ips inet[], mo money, bits varbit);
         INSERT INTO t SELECT CASE WHEN g <= {dense} THEN g ELSE g::bigint * 1000003 END,
            (g % 30000 - 15000)::smallint, g, g / 7.0,
            CASE WHEN g % 1000 = 0 THEN 'NaN' WHEN g % 1001 = 0 THEN '-Infinity' WHEN g % 1002 = 0 THEN '-0' ELSE g / 3.0 END,
            (g % 100000 - 50000) / 100.0, g::numeric * 1234567.0123456789 - 1e20,
            CASE WHEN g % 997 = 0 THEN 'NaN'::numeric ELSE g::numeric / 7 END,
            CASE WHEN g % 17 = 0 THEN NULL ELSE g % 2 = 0 END,
            CASE WHEN g % 13 = 0 THEN NULL ELSE 'ré ' || md5(g::text) END, 'v' || g, 'ab',
            json_build_object('a', g), jsonb_build_object('b', g, 'c', 'x\"y'),
            decode(md5(g::text), 'hex'),
            CASE WHEN g = 5 THEN 'infinity'::date WHEN g = 6 THEN '-infinity'::date ELSE date '1999-12-01' + g % 20000 END,
            time '00:00' + g * interval '1 ms',
            CASE WHEN g = 7 THEN 'infinity'::timestamp ELSE timestamp '1960-01-01' + g * interval '1 s' END,
            timestamptz '2020-01-01 00:00+00' + g * interval '1 min',
            make_interval(0, g % 13, 0, -(g % 5), 0, 0, g % 1000 + 0.000001),
            md5(g::text)::uuid,
            CASE WHEN g % 11 = 0 THEN NULL WHEN g % 7 = 0 THEN '{{}}'::int[] ELSE ARRAY[g, NULL, -g] END,
            ARRAY['a', 'b' || g, NULL],
            ('10.' || (g % 256) || '.' || (g / 256 % 256) || '.1')::inet, '10.0.0.0/8'::cidr,
            '08:00:2b:01:02:03'::macaddr, (ARRAY['sad', 'ok', 'happy'])[g % 3 + 1]::mood, g % 1000 + 1,
            '10:00:00.5+02'::timetz, ARRAY['1.2.3.4'::inet, NULL, '::1'::inet], (g % 1000) * 1.25,
            (g % 256)::bit(8)::varbit
         FROM generate_series(1, {rows}) g;
         INSERT INTO t (id) VALUES (0);
         ANALYZE t;",
        dense = rows * 9 / 10
    )
}

/// A `haul loader` process, killed at the end.
struct LoaderProc {
    port: u16,
    metrics_port: u16,
    child: Child,
}

impl LoaderProc {
    fn start(cl: &Cluster, name: &str, target: &str) -> Self {
        Self::start_with(cl, name, target, &[])
    }

    fn start_with(cl: &Cluster, name: &str, target: &str, extra: &[&str]) -> Self {
        Self::start_on(cl, name, target, free_port(), extra)
    }

    /// A loader listening on `port` (a restarted loader comes back where it was).
    fn start_on(cl: &Cluster, name: &str, target: &str, port: u16, extra: &[&str]) -> Self {
        let metrics_port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{metrics_port}");
        let mut args = vec![
            "loader",
            "--listen",
            &listen,
            "--target",
            target,
            "--metrics-listen",
            &metrics,
        ];
        args.extend_from_slice(extra);
        let child = cl
            .command(&args)
            .stdout(cl.log_file(name))
            .stderr(cl.log_file(name))
            .spawn()
            .unwrap();
        cl.wait_listening(port, name);
        Self {
            port,
            metrics_port,
            child,
        }
    }

    fn url(&self) -> String {
        format!("flight://127.0.0.1:{}", self.port)
    }

    fn metric(&self, series: &str) -> f64 {
        sample(&scrape(self.metrics_port), series).unwrap_or(0.0)
    }

    fn signal(&self, sig: &str) {
        crate::harness::signal(self.child.id(), sig);
    }
}

impl Drop for LoaderProc {
    fn drop(&mut self) {
        crate::harness::reap(&mut self.child);
    }
}

/// `haul submit` of table `t` with `--load <loaders> --create-table`, plus `extra`.
fn submit_load(
    src: &TestDb,
    dest: &TempDest,
    job: &str,
    chunk_rows: &str,
    loaders: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = [
        "submit",
        "--source",
        &src.dsn,
        "--table",
        "public.t",
        "--dest",
        dest.0.to_str().unwrap(),
        "--job-id",
        job,
        "--chunk-rows",
        chunk_rows,
        "--load",
        loaders,
        "--create-table",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A cluster with loaders `loader-a` and `loader-b` on `tgt` and workers `w1` and `w2`,
/// registered.
fn two_loaders_two_workers(tgt: &TestDb) -> (Cluster, LoaderProc, LoaderProc) {
    let mut cl = Cluster::new(None);
    let la = LoaderProc::start(&cl, "loader-a", &tgt.dsn);
    let lb = LoaderProc::start(&cl, "loader-b", &tgt.dsn);
    cl.start_worker("w1", &[]);
    cl.start_worker("w2", &[]);
    cl.wait_workers(2);
    (cl, la, lb)
}

async fn ledger_rows(target: &Client, job: &str) -> i64 {
    target
        .query_one(
            "SELECT count(*) FROM haul.load_chunks WHERE job_id = $1",
            &[&job],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// The issue's main proof: PG → PG through two loader processes, from two worker
/// processes, with the Parquet output written too; then pyarrow.flight reads the job back
/// from the coordinator.
#[tokio::test]
async fn two_loaders_move_a_skewed_million_rows_of_every_type() {
    let _broker = BROKER.write().await;
    let src = TestDb::new().await;
    src.exec(&every_type_sql(1_000_000)).await;
    let tgt = TestDb::new().await;
    // the target knows the source's own types, so --create-table uses them
    tgt.exec(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN posint AS integer CHECK (VALUE > 0);",
    )
    .await;
    let dest = TempDest::new();
    let (cl, la, lb) = two_loaders_two_workers(&tgt);
    let job = unique("j");
    let loaders = format!("{},{}", la.url(), lb.url());
    let out = cl.haul_ok(&strs(&submit_load(
        &src,
        &dest,
        &job,
        "100000",
        &loaders,
        &["--wait"],
    )));
    assert!(out.contains("state:     succeeded"), "{out}");
    assert!(
        out.contains("load:      1000001 rows committed into public.t"),
        "{out}"
    );

    // the target equals the source, with the source's column types
    let want = digest(&src.client, "t").await;
    assert_eq!(want.0, 1_000_001);
    assert_eq!(digest(&tgt.client, "t").await, want);
    assert_eq!(
        column_types(&tgt.client, "t").await,
        column_types(&src.client, "t").await
    );
    // one ledger row per chunk; both loaders took chunks
    let chunks: i64 = tgt
        .client
        .query_one(
            "SELECT count(*) FROM haul.load_chunks WHERE job_id = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    let loaded_a = la.metric("haul_loader_chunks_total{outcome=\"loaded\"}");
    let loaded_b = lb.metric("haul_loader_chunks_total{outcome=\"loaded\"}");
    assert_eq!(loaded_a + loaded_b, chunks as f64, "{}", cl.logs());
    assert!(loaded_a > 0.0 && loaded_b > 0.0, "{loaded_a} / {loaded_b}");
    assert_eq!(
        la.metric("haul_loader_rows_total") + lb.metric("haul_loader_rows_total"),
        1_000_001.0
    );

    // pyarrow.flight reads the finished job from the coordinator
    let python = crate::harness::test_python();
    let sums = src
        .client
        .query_one(
            "SELECT sum(id)::text, sum(i4)::int8, count(note)::int8 FROM t",
            &[],
        )
        .await
        .unwrap();
    let (sum_id, sum_i4, notes): (String, i64, i64) = (sums.get(0), sums.get(1), sums.get(2));
    let script = format!(
        r#"
import pyarrow.compute as pc, pyarrow.flight as fl
c = fl.connect("grpc://127.0.0.1:{port}")
jobs = [f.descriptor.path[0].decode() for f in c.list_flights()]
assert "{job}" in jobs, jobs
info = c.get_flight_info(fl.FlightDescriptor.for_path("{job}"))
assert info.total_records == 1000001, info.total_records
t = c.do_get(info.endpoints[0].ticket).read_all()
assert t.num_rows == 1000001, t.num_rows
assert str(pc.sum(t["id"]).as_py()) == "{sum_id}", pc.sum(t["id"])
assert pc.sum(t["i4"]).as_py() == {sum_i4}
assert t["note"].length() - t["note"].null_count == {notes}
assert getattr(t.schema.field("u").type, "extension_name", None) == "arrow.uuid", t.schema.field("u")
print("flight ok", t.num_rows)
"#,
        port = cl.url.rsplit(':').next().unwrap(),
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow.flight: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("flight ok 1000001"));
}

/// kill -9 a loader while it loads a chunk: the worker's attempt fails, the chunk is
/// redelivered and loaded (by the other loader or again), and the target has each row
/// once (the killed loader's transaction rolled back).
#[tokio::test]
async fn a_loader_killed_mid_chunk_loses_and_duplicates_nothing() {
    let _broker = BROKER.write().await;
    let src = TestDb::new().await;
    skewed(&src, 300_000).await;
    let tgt = TestDb::new().await;
    let dest = TempDest::new();
    let (cl, mut la, lb) = two_loaders_two_workers(&tgt);
    let job = unique("j");
    let loaders = format!("{},{}", la.url(), lb.url());
    let out = cl.haul_ok(&strs(&submit_load(
        &src,
        &dest,
        &job,
        "20000",
        &loaders,
        &[],
    )));
    assert!(out.trim() == job, "{out}");
    // catch loader A with a chunk open, then kill it
    let t0 = Instant::now();
    while la.metric("haul_loader_chunks_in_flight") < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "loader A never had a chunk:\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    la.child.kill().unwrap();
    la.child.wait().unwrap();
    let out = cl.haul_ok(&["watch", &job]);
    assert!(out.contains("state:     succeeded"), "{out}");
    let want = digest(&src.client, "t").await;
    assert_eq!(digest(&tgt.client, "t").await, want, "{}", cl.logs());
    assert!(lb.metric("haul_loader_chunks_total{outcome=\"loaded\"}") > 0.0);
    assert_eq!(
        ledger_rows(&tgt.client, &job).await,
        cl.store()
            .await
            .chunk_states(&haul_shared::JobId::parse(&job).unwrap())
            .await
            .unwrap()
            .len() as i64
    );
}

/// A 100k-row skewed source, a target, a loader and one worker `w1` that pauses `pause_ms`
/// after each load commit (before the chunk's manifest), running a `--load` job in
/// 25k-row chunks; returns once a chunk is in the target's ledger, i.e. once `w1` is
/// paused. The caller holds the broker lock.
async fn paused_after_a_load_commit(
    pause_ms: u64,
) -> (TestDb, TestDb, TempDest, Cluster, LoaderProc, String) {
    let src = TestDb::new().await;
    skewed(&src, 100_000).await;
    let tgt = TestDb::new().await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    let l = LoaderProc::start(&cl, "loader", &tgt.dsn);
    let pause = pause_ms.to_string();
    cl.start_worker_env("w1", &[], &[("HAUL_FAULT_PAUSE_AFTER_LOAD_MS", &pause)]);
    cl.wait_workers(1);
    let job = unique("j");
    let load = l.url();
    cl.haul_ok(&strs(&submit_load(&src, &dest, &job, "25000", &load, &[])));
    let t0 = Instant::now();
    while ledger_rows(&tgt.client, &job).await < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no chunk was loaded:\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (src, tgt, dest, cl, l, job)
}

/// kill -9 a worker after the loader committed its chunk but before the chunk's manifest
/// and the queue ack: the redelivered chunk is recognised in the ledger and not loaded
/// twice.
#[tokio::test]
async fn a_worker_killed_after_the_load_commit_does_not_duplicate_rows() {
    let _broker = BROKER.write().await;
    // w1 stops for a minute right after each load commit
    let (src, tgt, _dest, mut cl, l, job) = paused_after_a_load_commit(60_000).await;
    cl.signal("w1", "KILL");
    cl.start_worker("w2", &[]);
    let out = cl.haul_ok(&["watch", &job]);
    assert!(out.contains("state:     succeeded"), "{out}");
    assert_eq!(
        digest(&tgt.client, "t").await,
        digest(&src.client, "t").await,
        "{}",
        cl.logs()
    );
    assert!(
        l.metric("haul_loader_chunks_total{outcome=\"replayed\"}") >= 1.0,
        "{}",
        cl.logs()
    );
}

/// A loader slowed to a crawl (SIGSTOP/SIGCONT, stopped 90% of the time): the worker's
/// reads wait for it, and the worker's peak memory stays bounded by its batches.
#[tokio::test]
async fn a_slow_loader_keeps_the_worker_memory_flat() {
    let _broker = BROKER.write().await;
    let src = TestDb::new().await;
    skewed(&src, 300_000).await;
    let tgt = TestDb::new().await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    let l = LoaderProc::start(&cl, "loader", &tgt.dsn);
    cl.start_worker("w1", &[]);
    cl.wait_workers(1);
    let job = unique("j");
    let load = l.url();
    let out = cl.haul_ok(&strs(&submit_load(
        &src,
        &dest,
        &job,
        "300000",
        &load,
        &["--batch-rows", "4096"],
    )));
    assert_eq!(out.trim(), job);
    let pid = cl.worker("w1").id();
    let status = || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |s: &str, key: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    let store = cl.store().await;
    let id = haul_shared::JobId::parse(&job).unwrap();
    loop {
        let state = store.job_state(&id).await.unwrap();
        if state.is_some_and(|s| s.is_terminal()) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(240), "{}", cl.logs());
        l.signal("STOP");
        tokio::time::sleep(Duration::from_millis(450)).await;
        l.signal("CONT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak_mib = kib(&status(), "VmHWM:") / 1024;
    eprintln!(
        "slow loader: 300k rows in {:.1}s, worker peak RSS {peak_mib} MiB",
        t0.elapsed().as_secs_f64()
    );
    let out = cl.haul_ok(&["status", &job]);
    assert!(out.contains("state:     succeeded"), "{out}");
    assert_eq!(
        digest(&tgt.client, "t").await,
        digest(&src.client, "t").await
    );
    // the source table is ~30 MiB: a worker that buffered the chunk would show it
    assert!(peak_mib < 200, "worker peak RSS {peak_mib} MiB");
}

/// `haul run --load-target` into an existing table: its rows are replaced
/// (--truncate-first), its index and constraints stay, every mapped type arrives equal;
/// running the job again changes nothing.
#[tokio::test]
async fn run_loads_an_existing_table_and_keeps_its_index_and_constraints() {
    let src = TestDb::new().await;
    src.exec(&every_type_sql(20_000)).await;
    let tgt = TestDb::new().await;
    // the target's own shape: text for the enum and the domain, its own index and checks
    tgt.exec(
        "CREATE SCHEMA analytics;
         CREATE TABLE analytics.t (id bigint PRIMARY KEY, i2 smallint, i4 bigint CHECK (i4 >= 0), f4 real,
            f8 double precision, amount numeric(12,2), big numeric(50,10), nu numeric, flag boolean,
            note text, vc varchar(20), ch char(4), j json, jb jsonb, raw bytea, d date, tm time,
            ts timestamp, tz timestamptz, iv interval, u uuid, ints integer[], tags text[], ip inet,
            net cidr, mac macaddr, m text, pos integer, ttz timetz, ips inet[], mo money, bits varbit,
            extra text DEFAULT 'kept');
         CREATE INDEX t_note ON analytics.t (note);
         INSERT INTO analytics.t (id, note) VALUES (-1, 'junk from before');",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&src.dsn, "public.t", &dest);
    o.spec.chunk_rows = 4000;
    load_into(&mut o, &tgt.dsn, "analytics.t", false, true);
    o.job_id = Some(haul_shared::JobId::parse(&unique("j")).unwrap());
    let summary = run(o.clone()).await.unwrap();
    assert_eq!(summary.rows, 20_001);
    assert_eq!(summary.loaded_into.as_deref(), Some("analytics.t"));
    let cols: Vec<String> = column_types(&src.client, "t")
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let list = cols.join(", ");
    let want = digest(&src.client, &format!("(SELECT {list} FROM t)")).await;
    let got = digest(&tgt.client, &format!("(SELECT {list} FROM analytics.t)")).await;
    assert_eq!(got, want);
    let (idx, checks, kept): (i64, i64, i64) = {
        let r = tgt
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM pg_indexes WHERE schemaname = 'analytics' AND tablename = 't'),
                        (SELECT count(*) FROM pg_constraint WHERE conrelid = 'analytics.t'::regclass AND contype = 'c'),
                        (SELECT count(*) FROM analytics.t WHERE extra = 'kept')",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((idx, checks, kept), (2, 1, 20_001));
    // the same job again: already done, nothing loaded twice
    let again = run(o).await.unwrap();
    assert!(again.already_done);
    assert_eq!(
        digest(&tgt.client, &format!("(SELECT {list} FROM analytics.t)")).await,
        want
    );
}

/// `haul run --load-target --no-parquet --create-table`: only the target is written (no
/// Parquet part anywhere under the destination, which keeps only the job's manifests).
#[tokio::test]
async fn run_can_load_without_writing_parquet() {
    let src = TestDb::new().await;
    skewed(&src, 20_000).await;
    let tgt = TestDb::new().await;
    let dest = TempDest::new();
    let mut o = options(&src.dsn, "public.t", &dest);
    o.spec.chunk_rows = 5000;
    o.spec.output.parquet = false;
    load_into(&mut o, &tgt.dsn, "", true, false);
    let summary = run(o).await.unwrap();
    assert_eq!((summary.rows, summary.files), (20_000, 0));
    assert_eq!(summary.loaded_into.as_deref(), Some("public.t"));
    assert_eq!(
        digest(&tgt.client, "t").await,
        digest(&src.client, "t").await
    );
    assert!(crate::harness::parquet_files(&dest.0).is_empty());
    assert!(!dest.0.join("t").exists());
}

/// Loaders behind TLS and the cluster's token: workers and the coordinator (which
/// prepares the load) trust the CA they are given, and the token is required.
#[tokio::test]
async fn loaders_serve_tls_and_require_the_token() {
    let _broker = BROKER.write().await;
    let (certs, ca, cert, key) = test_certs();
    let ca = ca.to_str().unwrap().to_owned();
    let src = TestDb::new().await;
    skewed(&src, 20_000).await;
    let tgt = TestDb::new().await;
    let mut cl = Cluster::with(Some("l0ad-t0ken"), None, &[("HAUL_LOADER_TLS_CA", &ca)]);
    let l = LoaderProc::start_with(
        &cl,
        "loader",
        &tgt.dsn,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    cl.start_worker("w1", &["--tls-ca", &ca]);
    cl.wait_workers(1);
    let dest = TempDest::new();
    let load = format!("flight+tls://127.0.0.1:{}", l.port);
    let job = unique("j");
    let out = cl.haul_ok(&strs(&submit_load(
        &src,
        &dest,
        &job,
        "5000",
        &load,
        &["--wait"],
    )));
    assert!(out.contains("state:     succeeded"), "{out}");
    assert_eq!(
        digest(&tgt.client, "t").await,
        digest(&src.client, "t").await
    );
    // without the token the loader refuses (a plain Flight client, straight to it)
    let spec = haul_shared::jobs::LoadSpec {
        endpoints: vec![format!("https://127.0.0.1:{}", l.port)],
        target_table: "t".into(),
        create_table: false,
        truncate_first: false,
    };
    let client = LoadClient::new(
        &spec,
        &haul_shared::load::LoadAuth {
            token: None,
            tls_ca: Some(ca.clone().into()),
        },
    );
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    let err = client
        .prepare(PrepareLoad {
            version: LOAD_VERSION,
            job_id: unique("j"),
            target_table: "t".into(),
            arrow_schema: schema_to_ipc(&schema).unwrap().to_vec(),
            create_table: false,
            truncate_first: false,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bearer token"), "{err}");
    // regression: the token went in clear to any plaintext loader a submitter named;
    // with a token set, a plaintext loader is refused before anything is sent to it
    let plain = format!("flight://127.0.0.1:{}", l.port);
    let other = TempDest::new();
    let out = cl.haul(&strs(&submit_load(
        &src,
        &other,
        &unique("j"),
        "5000",
        &plain,
        &["--wait"],
    )));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in clear") && err.contains("flight+tls://"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&certs);
}

/// A role created for one test, dropped (with its grants) at the end.
struct RoleGuard {
    name: String,
    db: String,
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        let admin = crate::harness::admin_dsn();
        let in_db = format!("{}/{}", admin.rsplit_once('/').unwrap().0, self.db);
        for (dsn, sql) in [
            (in_db, format!("DROP OWNED BY {}", self.name)),
            (admin, format!("DROP ROLE IF EXISTS {}", self.name)),
        ] {
            let _ = Command::new("psql")
                .arg(dsn)
                .args(["-X", "-q", "-c", &sql])
                .output();
        }
    }
}

/// A loader whose user may not create anything works once the ledger exists, and says
/// what is missing when it does not.
#[tokio::test]
async fn a_loader_needs_no_create_privilege_once_the_ledger_exists() {
    use haul_shared::load::Loader;
    let tgt = TestDb::new().await;
    let role = unique("haul_lp");
    let _guard = RoleGuard {
        name: role.clone(),
        db: tgt.name.clone(),
    };
    Loader::new(database(&tgt.dsn), "haul")
        .ensure_ledger()
        .await
        .unwrap();
    tgt.exec(&format!(
        "CREATE ROLE {role} LOGIN;
         REVOKE CREATE ON DATABASE {db} FROM PUBLIC;
         GRANT USAGE ON SCHEMA haul TO {role};
         GRANT SELECT, INSERT, UPDATE ON haul.load_jobs, haul.load_chunks TO {role};",
        db = tgt.name
    ))
    .await;
    let as_role = tgt.dsn.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(as_role, tgt.dsn);
    Loader::new(database(&as_role), "haul")
        .ensure_ledger()
        .await
        .unwrap();
    let err = Loader::new(database(&as_role), "haul_other")
        .ensure_ledger()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
}

/// Regression (issue 12): a `--load` job resumed as printed ran without the load (the
/// plan did not record it) and "succeeded" with the target missing the remaining chunks.
/// The plan now holds the load: a resume finishes it, and a `haul run` resume without a
/// loader (its loader ran in-process) is refused, saying what to pass.
#[tokio::test]
async fn a_resumed_load_job_finishes_the_load() {
    let src = TestDb::new().await;
    poisonable(&src, 20_000, 10_000, "22023").await;
    let tgt = TestDb::new().await;
    let dest = TempDest::new();
    let mut o = poisoned_run(&src, &dest, "resload");
    load_into(&mut o, &tgt.dsn, "public.t_loaded", true, true);
    let err = run(o.clone()).await.unwrap_err().to_string();
    assert!(err.contains("poisoned row 10000"), "{err}");
    src.exec("DELETE FROM poison").await;

    let mut resume = o.clone();
    resume.resume = true;
    resume.fresh_snapshot = true;
    resume.spec.load = None;
    resume.load_target = None;
    let err = run(resume.clone()).await.unwrap_err().to_string();
    assert!(
        err.contains("loads into public.t_loaded") && err.contains("--load-target"),
        "{err}"
    );

    // as the CLI builds a `--resume ... --load-target <dsn>`: no table, no options
    load_into(&mut resume, &tgt.dsn, "", false, false);
    let s = run(resume).await.unwrap();
    assert_eq!(s.loaded_into.as_deref(), Some("public.t_loaded"));
    assert_eq!(
        digest(&tgt.client, "(SELECT id, v FROM public.t_loaded)").await,
        digest(&src.client, "(SELECT id, v FROM t)").await
    );
    assert_eq!(digest(&tgt.client, "public.t_loaded").await.0, 20_000);
}

/// Regression (issue 12): cancelling a job deleted its staging area while an attempt sat
/// between "parts staged, load committed" and "chunk manifest created"; the attempt then
/// committed a chunk whose parts were gone, a `--resume` skipped it, and the job
/// "succeeded" with rows missing from the lake. An ended job's staging is now kept (and a
/// resume checks committed chunks' parts): the late attempt's chunk is whole, and the
/// resume finishes the job with every row in the lake and in the target.
#[tokio::test]
async fn cancelling_a_job_mid_commit_loses_no_rows() {
    let _broker = BROKER.write().await;
    // w1 stops for 5 s after each load commit, before the chunk's manifest
    let (src, tgt, dest, mut cl, _loader, job) = paused_after_a_load_commit(5_000).await;
    cl.haul_ok(&["cancel", &job]);
    // the paused attempt wakes and commits its chunk after the job ended
    let manifests = dest.0.join(format!("_haul/jobs/{job}/chunks"));
    let t0 = Instant::now();
    while std::fs::read_dir(&manifests).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .count()
    }) < 1
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the paused attempt never committed:\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    cl.signal("w1", "KILL");
    cl.start_worker("w2", &[]);
    cl.wait_workers(1);
    let out = cl.haul_ok(&[
        "submit",
        "--source",
        &src.dsn,
        "--dest",
        dest.0.to_str().unwrap(),
        "--resume",
        &job,
        "--fresh-snapshot",
        "--wait",
    ]);
    assert!(out.contains("state:     succeeded"), "{out}");
    assert_same(&src.client, "t", &dest.0.join("t")).await;
    assert_eq!(
        digest(&tgt.client, "t").await,
        digest(&src.client, "t").await,
        "{}",
        cl.logs()
    );
}

/// The arrays of the test below: lower bounds other than 1, several dimensions, NULL
/// elements, empty arrays, enum and text-rendered (inet) elements; and 3000 plain rows so
/// that the job has several chunks.
const ODD_ARRAYS: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TABLE arr (id int PRIMARY KEY, a int[], t text[], e mood[], b int[], ips inet[]);
    INSERT INTO arr VALUES
      (1, '[0:2]={1,2,3}', '[-3:-2]={x,NULL}', '[5:5]={ok}', '{{1,2},{3,4}}', '[2:2]={10.0.0.1}'),
      (2, '{}', '{\"a,b\",\"c\\\"d\"}', NULL, '[0:1][3:4]={{1,NULL},{3,4}}', '{}'),
      (3, NULL, '{{a},{b}}', '{sad,happy}', '{1}', NULL);
    INSERT INTO arr SELECT g, ARRAY[g, g + 1], ARRAY['v' || g], '{ok}', ARRAY[[g], [g]], '{10.0.0.2}'
      FROM generate_series(4, 3000) g;
    ANALYZE arr;";

/// Each row of `arr` (or a table like it) as `id|a|t|e|b|ips`, the arrays as Postgres
/// renders them (bounds and dimensions shown), in id order.
async fn array_texts(c: &Client, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT id, a::text, t::text, e::text, b::text, ips::text FROM {table} ORDER BY id"
    );
    c.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (1..6)
                .map(|i| r.get::<_, Option<String>>(i).unwrap_or_default())
                .fold(r.get::<_, i32>(0).to_string(), |acc, v| acc + "|" + &v)
        })
        .collect()
}

/// Regression (issue 12): array lower bounds were dropped (`[0:2]={1,2,3}` arrived as
/// `{1,2,3}`) and multi-dimensional arrays were refused. A load-only job now streams
/// arrays in Postgres's binary form, so the target receives every value exactly: into a
/// table the load creates, and into an existing one whose column has another element
/// type (staged and cast by Postgres, which keeps bounds and dimensions). Parquet, whose
/// lists hold neither, refuses such a value naming the column and the fix, and nothing is
/// published; with that fix the text form keeps the bounds.
#[tokio::test]
async fn arrays_reach_a_postgres_target_with_their_bounds_and_dimensions() {
    let src = TestDb::new().await;
    src.exec(ODD_ARRAYS).await;
    let tgt = TestDb::new().await;
    tgt.exec(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE wide (id int PRIMARY KEY, a int[], t text[], e mood[], b bigint[], ips inet[]);",
    )
    .await;
    let load_only = |target: &str, dest: &TempDest| {
        let mut o = options(&src.dsn, "arr", dest);
        o.spec.chunk_rows = 500;
        o.spec.output.parquet = false;
        load_into(&mut o, &tgt.dsn, target, target.is_empty(), false);
        o
    };
    let expected = array_texts(&src.client, "arr").await;
    assert_eq!(expected.len(), 3000);
    assert!(expected[0].contains("[0:2]={1,2,3}"), "{}", expected[0]);

    let dest = TempDest::new();
    let s = run(load_only("", &dest)).await.unwrap();
    assert!(s.chunks > 1, "{} chunks", s.chunks);
    assert_eq!(array_texts(&tgt.client, "public.arr").await, expected);
    assert_eq!(
        digest(&tgt.client, "public.arr").await,
        digest(&src.client, "arr").await
    );

    let dest = TempDest::new();
    run(load_only("public.wide", &dest)).await.unwrap();
    assert_eq!(array_texts(&tgt.client, "public.wide").await, expected);

    // Parquet: refused, naming the column and the fix; readers see nothing
    let dest = TempDest::new();
    let mut o = options(&src.dsn, "arr", &dest);
    o.spec.chunk_rows = 500;
    let err = run(o).await.unwrap_err().to_string();
    assert!(
        err.contains("column \"a\"") && err.contains("lower bound 0") && err.contains("--cast"),
        "{err}"
    );
    let visible: Vec<_> = parquet_files(&dest.0)
        .into_iter()
        .filter(|p| !p.starts_with(dest.0.join("_haul")))
        .collect();
    assert!(visible.is_empty(), "{visible:?}");

    let dest = TempDest::new();
    let mut o = options(&src.dsn, "arr", &dest);
    o.spec.casts = ["a", "t", "e", "b", "ips"]
        .into_iter()
        .map(|c| (c.to_string(), "text".to_string()))
        .collect();
    run(o).await.unwrap();
    let mut texts = std::collections::BTreeMap::new();
    for b in read_batches(&dest.0.join("arr")) {
        use arrow_array::cast::AsArray;
        let ids = b["id"].as_primitive::<arrow_array::types::Int32Type>();
        let (a, bb) = (b["a"].as_string::<i32>(), b["b"].as_string::<i32>());
        for i in 0..b.num_rows() {
            if ids.value(i) <= 2 {
                texts.insert(
                    ids.value(i),
                    (a.value(i).to_owned(), bb.value(i).to_owned()),
                );
            }
        }
    }
    assert_eq!(texts[&1], ("[0:2]={1,2,3}".into(), "{{1,2},{3,4}}".into()));
    assert_eq!(
        texts[&2],
        ("{}".into(), "[0:1][3:4]={{1,NULL},{3,4}}".into())
    );
}

/// Regression: a table with an `int2vector` or `oidvector` column (copied from a catalog)
/// was refused mid-job ("an array value with lower bound 0 … pass --cast"), in Parquet and
/// in a load alike. Those vectors start at 0 by definition, so a list holds them exactly:
/// they are exported as lists and loaded back as vectors (empty ones too, which Postgres
/// cannot receive in binary), with no cast.
#[tokio::test]
async fn catalog_vectors_travel_without_a_cast() {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int16Type, Int32Type, Int64Type};
    let src = TestDb::new().await;
    src.exec(
        "CREATE TABLE vec (id int PRIMARY KEY, iv int2vector, ov oidvector);
         INSERT INTO vec VALUES (1, '', ''), (2, NULL, NULL), (3, '-32768 0 32767', '0 4294967295');
         INSERT INTO vec SELECT g, ((g % 7) || ' ' || (g % 5))::int2vector, g::text::oidvector FROM generate_series(4, 2000) g;
         ANALYZE vec;",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&src.dsn, "vec", &dest);
    o.spec.chunk_rows = 500;
    run(o).await.unwrap();
    let mut lists = std::collections::BTreeMap::new();
    for b in read_batches(&dest.0.join("vec")) {
        let ids = b["id"].as_primitive::<Int32Type>();
        let (iv, ov) = (b["iv"].as_list::<i32>(), b["ov"].as_list::<i32>());
        for i in 0..b.num_rows() {
            let list = |l: &arrow_array::ListArray, wide: bool| {
                (!l.is_null(i)).then(|| {
                    let v = l.value(i);
                    if wide {
                        v.as_primitive::<Int64Type>().values().to_vec()
                    } else {
                        let v = v.as_primitive::<Int16Type>();
                        v.values().iter().map(|x| i64::from(*x)).collect()
                    }
                })
            };
            lists.insert(ids.value(i), (list(iv, false), list(ov, true)));
        }
    }
    assert_eq!(lists.len(), 2000);
    assert_eq!(lists[&1], (Some(vec![]), Some(vec![])));
    assert_eq!(lists[&2], (None, None));
    assert_eq!(
        lists[&3],
        (Some(vec![-32768, 0, 32767]), Some(vec![0, 4294967295]))
    );
    assert_eq!(lists[&10], (Some(vec![3, 0]), Some(vec![10])));
    // and `haul verify` checksums them against the source alike
    let out = std::process::Command::new(haul_bin())
        .args([
            "verify",
            dest.0.join("vec").to_str().unwrap(),
            "--source",
            &src.dsn,
        ])
        .output()
        .unwrap();
    assert_success(&out);

    // into a target the load creates (with Parquet), then load-only into it again
    let tgt = TestDb::new().await;
    for (parquet, create) in [(true, true), (false, false)] {
        let dest = TempDest::new();
        let mut o = options(&src.dsn, "vec", &dest);
        o.spec.chunk_rows = 500;
        o.spec.output.parquet = parquet;
        load_into(&mut o, &tgt.dsn, "public.vec", create, !create);
        run(o).await.unwrap();
        assert_eq!(
            digest(&tgt.client, "public.vec").await,
            digest(&src.client, "vec").await,
            "parquet: {parquet}"
        );
    }
    assert_eq!(
        column_types(&tgt.client, "public.vec").await[1..],
        [
            ("iv".to_string(), "int2vector".to_string()),
            ("ov".to_string(), "oidvector".to_string())
        ]
    );
}

/// Regression (issue 12): a transient failure was nacked and redelivered at once, so a
/// loader down for a second burnt a chunk's three attempts in 70 ms and failed the job.
/// Transient failures now back off (1 s doubling, with jitter) within `--retry-for`,
/// without holding a worker slot: the only loader is killed -9 mid-job and comes back on
/// its port 20 s later; the job succeeds and the target equals the source.
#[tokio::test]
async fn a_job_rides_out_its_loader_down_for_20_seconds() {
    let _broker = BROKER.read().await;
    let src = TestDb::new().await;
    skewed(&src, 20_000).await;
    let tgt = TestDb::new().await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    let loader = LoaderProc::start(&cl, "loader", &tgt.dsn);
    let slow = [("HAUL_FAULT_CHUNK_DELAY_MS", "400")];
    cl.start_worker_env("w1", &[], &slow);
    cl.start_worker_env("w2", &[], &slow);
    cl.wait_workers(2);
    let args = submit_load(&src, &dest, "ride", "1000", &loader.url(), &["--wait"]);
    let mut submit = cl
        .command(&strs(&args))
        .stdout(cl.log_file("submit"))
        .stderr(cl.log_file("submit"))
        .spawn()
        .unwrap();
    wait_for_committed_chunks(&dest, "ride", 2, || cl.logs()).await;

    let port = loader.port;
    loader.signal("KILL");
    drop(loader);
    std::thread::sleep(Duration::from_secs(20));
    let _loader = LoaderProc::start_on(&cl, "loader-again", &tgt.dsn, port, &[]);

    let status = submit.wait().unwrap();
    assert!(status.success(), "the job failed:\n{}", cl.logs());
    assert_eq!(
        digest(&tgt.client, "public.t").await,
        digest(&src.client, "t").await
    );
    let backed_off = ["w1", "w2"]
        .iter()
        .map(|w| cl.log_of(w).matches("trying again after a backoff").count())
        .sum::<usize>();
    assert!(
        backed_off > 0,
        "no attempt failed while the loader was down:\n{}",
        cl.logs()
    );
}

/// Issue 12: the target Postgres goes away for 20 s mid-job (its port refuses connections
/// and the open ones are cut, as when it is stopped): `haul run --load-target` backs off
/// and retries, the job succeeds, and the target equals the source.
#[tokio::test]
async fn a_job_rides_out_its_target_postgres_down_for_20_seconds() {
    let src = TestDb::new().await;
    skewed(&src, 20_000).await;
    let tgt = TestDb::new().await;
    let pg = Outage::start("127.0.0.1:5432");
    let target = tgt.dsn.replacen("127.0.0.1:5432", &pg.addr(), 1);
    assert_ne!(target, tgt.dsn, "the target DSN goes through the forwarder");
    let dest = TempDest::new();
    let run = Command::new(haul_bin())
        .args([
            "run",
            "--source",
            &src.dsn,
            "--table",
            "public.t",
            "--dest",
            dest.0.to_str().unwrap(),
            "--job-id",
            "pgdown",
            "--chunk-rows",
            "1000",
            "--workers",
            "2",
            "--load-target",
            &target,
            "--create-table",
            "--progress",
            "none",
        ])
        .env("HAUL_FAULT_CHUNK_DELAY_MS", "400")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_committed_chunks(&dest, "pgdown", 2, String::new).await;
    pg.down();
    tokio::time::sleep(Duration::from_secs(20)).await;
    pg.up();
    let out = tokio::task::spawn_blocking(move || run.wait_with_output().unwrap())
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("trying again after a backoff"),
        "nothing failed while the target was down:\n{log}"
    );
    assert_eq!(
        digest(&tgt.client, "public.t").await,
        digest(&src.client, "t").await
    );
}
