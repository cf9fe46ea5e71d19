//! Failure handling: bad input gives one clear error and writes nothing a reader would
//! see; a killed run resumes without loss or duplicates; a fenced-off attempt cannot
//! commit; independent readers see exactly the source's rows.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use haul_shared::jobs::KeyColumn;
use haul_shared::lake::Dest;
use haul_shared::lease::{LeaseStore, MemoryLeaseStore};
use haul_shared::{ChunkId, ChunkRange, JobId, WorkerId};
use haul_worker::executor::{ChunkError, ChunkJob, ChunkOutcome, Progress, run_chunk};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

async fn expect_error(opts: haul::embedded::RunOptions, dest: &TempDest, needles: &[&str]) {
    let err = run(opts).await.expect_err("the job must fail").to_string();
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
    assert!(
        parquet_files(&dest.0).is_empty(),
        "a failed job left parquet files behind"
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, p point, j json, v text);
         INSERT INTO t SELECT g, point(g, g), '{}', 'v' FROM generate_series(1, 100) g;
         CREATE TABLE ok (id int PRIMARY KEY, v text); INSERT INTO ok VALUES (1, 'a');
         CREATE TABLE two (id int PRIMARY KEY, \"a range\" int4range, p point);",
    )
    .await;
    let dest = TempDest::new();
    let o = |table: &str| options(&db.dsn, table, &dest);

    expect_error(o("public.nope"), &dest, &["public.nope", "does not exist"]).await;
    expect_error(o("t"), &dest, &["\"p\"", "point", "--cast p=text"]).await;
    // every unmappable column at once, with the casts to pass (quoted for a shell)
    expect_error(
        o("two"),
        &dest,
        &[
            "columns \"a range\" (int4range), \"p\" (point)",
            "--cast 'a range=text' --cast p=text",
        ],
    )
    .await;
    // refused before planning: nothing of haul's is left in the destination (issue 16)
    let left: Vec<_> = std::fs::read_dir(&dest.0)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let mut bad_col = o("ok");
    bad_col.spec.columns = vec!["id".into(), "missing".into()];
    expect_error(bad_col, &dest, &["\"missing\"", "does not exist"]).await;

    let mut bad_key = o("t");
    bad_key.spec.casts.insert("p".into(), "text".into());
    bad_key.spec.key = vec!["j".into()];
    bad_key.spec.chunk_rows = 10;
    expect_error(bad_key, &dest, &["\"j\"", "json", "ordering", "--key"]).await;

    let mut bad_part = o("ok");
    bad_part.spec.output.partition_by = Some(haul_shared::jobs::PartitionBy::new(
        "v",
        haul_shared::jobs::Granularity::Day,
    ));
    expect_error(bad_part, &dest, &["\"v\"", "date or timestamp"]).await;

    // a table without columns is refused with one line (it failed with an Arrow message)
    db.exec("CREATE TABLE zc (); INSERT INTO zc DEFAULT VALUES;")
        .await;
    expect_error(o("zc"), &dest, &["has no columns to export"]).await;

    // a partition column left out of --columns is named as such, not "does not exist"
    let mut unread = o("t");
    unread.spec.columns = vec!["id".into()];
    unread.spec.output.partition_by = Some(haul_shared::jobs::PartitionBy::new(
        "v",
        haul_shared::jobs::Granularity::Day,
    ));
    expect_error(unread, &dest, &["\"v\" is not among --columns", "add it"]).await;

    let mut unreachable = o("ok");
    unreachable.spec.source = conninfo("postgresql://u@127.0.0.1:1/db");
    unreachable.source_credentials.password = Some(haul_shared::pg::Secret::new("sekrit"));
    let err = run(unreachable).await.unwrap_err().to_string();
    assert!(
        err.contains("cannot connect") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("sekrit"), "the password leaked: {err}");

    let err = haul_shared::pg::ConnInfo::parse("postgresql://u:pw@host:notaport/db")
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid port \"notaport\""), "{err}");

    // a certificate check without a CA to check against: refused at once, not retried
    // as a connect failure
    let mut tls = o("ok");
    tls.spec.source = conninfo(&format!("{}?sslmode=verify-full", db.dsn));
    let started = std::time::Instant::now();
    let err = run(tls).await.unwrap_err().to_string();
    assert!(
        err.contains("sslmode=verify-full needs the CA") && err.contains("sslrootcert"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "the refusal was retried ({:?})",
        started.elapsed()
    );

    // permission denied, as a role that cannot read the table
    let role = unique("haul_noperm");
    db.exec(&format!("CREATE ROLE {role} LOGIN")).await;
    let mut denied = o("ok");
    denied.spec.source = conninfo(&db.dsn.replacen("postgres@", &format!("{role}@"), 1));
    expect_error(denied, &dest, &["permission denied", "GRANT SELECT"]).await;
    drop(db);
    let _ = Command::new("psql")
        .arg(admin_dsn())
        .args(["-X", "-q", "-c"])
        .arg(format!("DROP ROLE IF EXISTS {role}"))
        .output();

    // the server fails the COPY after it has sent rows: its message, nothing written
    copy_fails_midway(&dest).await;

    // an unwritable destination: a path under a regular file
    let file = dest.0.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let db2 = TestDb::new().await;
    db2.exec("CREATE TABLE ok (id int PRIMARY KEY)").await;
    let mut unwritable = options(&db2.dsn, "ok", &dest);
    unwritable.spec.dest = format!("file://{}/lake", file.display());
    let err = run(unwritable).await.unwrap_err().to_string();
    assert!(err.contains("not writable"), "{err}");

    // with the cast, the table that was refused exports
    let mut cast = options(&db2.dsn, "ok", &dest);
    cast.spec.source = conninfo(&db2.dsn);
    run(cast).await.unwrap();
}

async fn copy_fails_midway(dest: &TempDest) {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE mid (id int PRIMARY KEY, v text);
         INSERT INTO mid SELECT g, CASE WHEN g = 2900 THEN 'x' ELSE g::text END
         FROM generate_series(1, 3000) g;",
    )
    .await;
    let mut o = options(&db.dsn, "mid", dest);
    o.spec.casts.insert("v".into(), "integer".into());
    o.spec.chunk_rows = 3000;
    expect_error(o, dest, &["invalid input syntax for type integer", "\"x\""]).await;
}

#[tokio::test]
async fn a_killed_run_resumes_without_loss_or_duplicates() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE big (id bigint PRIMARY KEY, payload text);
         INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 150000) g; ANALYZE big;",
    )
    .await;
    let dest = TempDest::new();
    let args = |extra: &[&str]| {
        let mut c = Command::new(haul_bin());
        c.args([
            "run",
            "--source",
            &db.dsn,
            "--dest",
            &dest.url(),
            "--progress",
            "none",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    };
    let mut child = args(&[
        "--table",
        "big",
        "--job-id",
        "killed",
        "--chunk-rows",
        "1000",
        "--workers",
        "1",
    ])
    .spawn()
    .unwrap();
    let mut waited = 0;
    while committed_chunks(&dest, "killed") < 5 {
        std::thread::sleep(Duration::from_millis(20));
        waited += 1;
        assert!(waited < 3000, "no chunk committed in a minute");
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it could be killed"
        );
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = committed_chunks(&dest, "killed");
    let rows_before: u64 = chunk_manifests(&dest, "killed")
        .iter()
        .map(|c| c.rows)
        .sum();
    assert!(before < 150, "the run finished before the kill");
    assert!(!dest.0.join("big/_manifest.json").exists());

    // glob readers see nothing of a job that has not committed, even now: the committed
    // chunks' parts are staged, and published only when the job commits
    let visible = parquet_files(&dest.0.join("big"));
    assert!(
        visible.is_empty(),
        "parts visible before the commit: {visible:?}"
    );
    let staged = parquet_files(&dest.0.join("_haul/staging/killed"));
    assert!(
        staged.len() >= before,
        "committed chunks' parts are kept staged"
    );

    // the old snapshot died with the process: resuming needs consent to a fresh one
    let out = args(&["--resume", "killed"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--fresh-snapshot"), "{stderr}");

    let out = args(&["--resume", "killed", "--fresh-snapshot"])
        .output()
        .unwrap();
    assert_success(&out);
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(summary.contains("150,000 rows ("), "{summary}");
    // the summary tells the killed run's rows apart (the rate counts only this run's)
    let grouped = rows_before
        .to_string()
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        summary.contains(&format!("({grouped} of them committed before this run)")),
        "{summary}"
    );
    assert_same(&db.client, "big", &dest.0.join("big")).await;
    let ids: std::collections::HashSet<i64> = read_batches(&dest.0.join("big"))
        .iter()
        .flat_map(|b| {
            arrow_array::cast::AsArray::as_primitive::<arrow_array::types::Int64Type>(b.column(0))
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(ids.len(), 150000, "duplicate rows");

    // and a finished job stays finished
    let out = args(&["--resume", "killed", "--fresh-snapshot"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("already succeeded"));
}

#[tokio::test]
async fn a_fenced_off_attempt_cannot_commit() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 3000) g;")
        .await;
    let dest_dir = TempDest::new();
    let dest = Dest::open(&dest_dir.url(), false).unwrap();
    let key = vec![KeyColumn {
        name: "id".into(),
        pg_type: "integer".into(),
        ordering: haul_shared::range::KeyOrdering::Natural,
    }];
    let plan = one_chunk_plan(&db, "t", key, 3000).await;
    let spec = options(&db.dsn, "t", &dest_dir).spec;
    let source = database(&db.dsn);
    let job = JobId::parse("fence").unwrap();
    let leases: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::default());
    let ttl = Duration::from_millis(300);
    let progress = Progress::default();
    let range = ChunkRange::Key {
        lower: None,
        upper: Some(vec!["2001".into()]),
    };
    let attempt = |lease: &haul_shared::lease::Lease| {
        let lease = lease.clone();
        let (spec, plan, job, dest, leases, range) = (
            spec.clone(),
            plan.clone(),
            job.clone(),
            dest.clone(),
            Arc::clone(&leases),
            range.clone(),
        );
        let (progress, source) = (&progress, &source);
        async move {
            run_chunk(ChunkJob {
                job_id: &job,
                spec: &spec,
                source,
                plan: &plan,
                chunk: ChunkId(0),
                range: &range,
                dest: &dest,
                lease: &lease,
                leases: leases.as_ref(),
                progress,
                load: None,
                cancel: CancellationToken::new(),
            })
            .await
        }
    };

    // the zombie's lease expires (it was paused) and a second worker takes the chunk
    let zombie = leases
        .acquire("fence/0", &WorkerId("zombie".into()), ttl)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(ttl * 2).await;
    let live = leases
        .acquire("fence/0", &WorkerId("live".into()), ttl * 100)
        .await
        .unwrap()
        .unwrap();
    assert!(live.epoch > zombie.epoch);

    // the zombie wakes up and finishes its extraction: it must not commit
    let err = attempt(&zombie)
        .await
        .expect_err("a fenced-off attempt must not commit");
    assert!(matches!(err, ChunkError::LeaseLost { .. }), "{err}");
    assert!(
        parquet_files(&dest_dir.0).is_empty(),
        "the zombie left files behind"
    );

    let ok = attempt(&live).await.unwrap();
    assert!(
        matches!(ok, ChunkOutcome::Committed { rows: 2000, .. }),
        "{ok:?}"
    );
    // a redelivery of the committed chunk is a cheap no-op that changes nothing
    let files = parquet_files(&dest_dir.0);
    let again = attempt(&live).await.unwrap();
    assert!(matches!(
        again,
        ChunkOutcome::AlreadyCommitted { rows: 2000, .. }
    ));
    assert_eq!(parquet_files(&dest_dir.0), files);
    // the winner's parts stay staged until the job commits, and they are its only ones
    // (its attempt's own folder: `<epoch>-<attempt id>`)
    let chunk_dir = dest_dir.0.join("_haul/staging/fence/000000");
    let folder = files
        .first()
        .and_then(|f| f.strip_prefix(&chunk_dir).ok())
        .and_then(|r| r.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .expect("the winner's parts");
    let live_prefix = chunk_dir.join(&folder);
    assert!(
        folder.starts_with(&format!("{}-", live.epoch.0)),
        "{live_prefix:?}"
    );
    assert!(
        files.iter().all(|f| f.starts_with(&live_prefix)),
        "{files:?}"
    );
    let rows: usize = read_batches(&live_prefix)
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 2000);
}

/// DuckDB (glob + hive partitioning) and pyarrow read the output unchanged. Needs the
/// Python environment `scripts/test.sh` prepares (HAUL_TEST_PYTHON).
#[tokio::test]
async fn duckdb_and_pyarrow_read_the_output() {
    let python = crate::harness::test_python();
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE orders (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, status text, total_cents bigint, metadata jsonb, u uuid);
         INSERT INTO orders SELECT g, timestamptz '2024-01-01 00:00:00+00' + g * interval '17 minutes', 's' || (g % 5), g * 3,
                jsonb_build_object('g', g), md5(g::text)::uuid FROM generate_series(1, 20000) g;",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "orders", &dest);
    o.spec.chunk_rows = 5000;
    o.spec.output.partition_by = Some(haul_shared::jobs::PartitionBy::new(
        "created_at",
        haul_shared::jobs::Granularity::Day,
    ));
    run(o).await.unwrap();
    let want = db
        .client
        .query_one(
            "SELECT count(*)::int8, sum(total_cents)::int8, count(DISTINCT id)::int8 FROM orders",
            &[],
        )
        .await
        .unwrap();
    let (n, sum, distinct): (i64, i64, i64) = (want.get(0), want.get(1), want.get(2));
    let script = format!(
        r#"
import duckdb, pyarrow.dataset as ds, pyarrow.compute as pc
root = {root:?}
r = duckdb.sql(f"SELECT count(*), sum(total_cents), count(DISTINCT id), count(DISTINCT dt) FROM read_parquet('{{root}}/orders/**/part-*.parquet', hive_partitioning=true)").fetchone()
t = ds.dataset(root + "/orders", format="parquet", partitioning="hive").to_table()
print(r[0], r[1], r[2], t.num_rows, pc.sum(t["total_cents"]).as_py(), len(pc.unique(t["id"])), r[3] > 1)
"#,
        root = dest.0.display().to_string()
    );
    let out = Command::new(python).args(["-c", &script]).output().unwrap();
    assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{n} {sum} {distinct} {n} {sum} {distinct} True")
    );
}

#[tokio::test]
async fn a_lost_snapshot_fails_the_job_instead_of_mixing_points_in_time() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text);
         INSERT INTO t SELECT g, repeat('v', 100) FROM generate_series(1, 60000) g; ANALYZE t;",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "t", &dest);
    o.spec.chunk_rows = 500;
    o.workers = 1;
    let job = tokio::spawn(run(o));
    // once some chunks are in, end the planning session that holds the snapshot
    let chunks = dest.0.join("_haul/jobs");
    for _ in 0..500 {
        let n = std::fs::read_dir(&chunks)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|j| std::fs::read_dir(j.ok()?.path().join("chunks")).ok())
            .map(|d| d.count())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed: i64 = db
        .client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'haul:snapshot:%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "the snapshot-holding session was not found");
    let err = job
        .await
        .unwrap()
        .expect_err("the job must fail")
        .to_string();
    assert!(
        err.contains("snapshot") && err.contains("--fresh-snapshot"),
        "{err}"
    );
    assert!(!dest.0.join("t/_manifest.json").exists());
}

#[tokio::test]
async fn no_snapshot_mode_still_exports_every_row() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 5000) g;")
        .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "t", &dest);
    o.spec.use_snapshot = false;
    let s = run(o).await.unwrap();
    assert!(s.chunks > 1);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.0.join("t/_manifest.json")).unwrap()).unwrap();
    assert!(m["snapshot"].is_null());
}

/// A job store whose first "committed" write fails, as a Redis blip would.
struct FlakyJobStore {
    inner: haul_shared::jobs::MemoryJobStore,
    failed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl haul_shared::jobs::JobStore for FlakyJobStore {
    async fn put_job(
        &self,
        job: &haul_shared::jobs::JobRecord,
    ) -> Result<(), haul_shared::lease::StoreError> {
        self.inner.put_job(job).await
    }
    async fn replan_job(
        &self,
        job: &haul_shared::jobs::JobRecord,
    ) -> Result<(), haul_shared::lease::StoreError> {
        self.inner.replan_job(job).await
    }
    async fn get_job(
        &self,
        id: &JobId,
    ) -> Result<Option<haul_shared::jobs::JobRecord>, haul_shared::lease::StoreError> {
        self.inner.get_job(id).await
    }
    async fn list_jobs(&self) -> Result<Vec<JobId>, haul_shared::lease::StoreError> {
        self.inner.list_jobs().await
    }
    async fn set_job_state(
        &self,
        id: &JobId,
        state: &haul_shared::jobs::JobState,
    ) -> Result<(), haul_shared::lease::StoreError> {
        self.inner.set_job_state(id, state).await
    }
    async fn set_chunk_state(
        &self,
        id: &JobId,
        chunk: ChunkId,
        state: &haul_shared::jobs::ChunkState,
    ) -> Result<(), haul_shared::lease::StoreError> {
        if matches!(state, haul_shared::jobs::ChunkState::Committed { .. })
            && !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(haul_shared::lease::StoreError::Unavailable("blip".into()));
        }
        self.inner.set_chunk_state(id, chunk, state).await
    }
    async fn chunk_states(
        &self,
        id: &JobId,
    ) -> Result<
        std::collections::BTreeMap<ChunkId, haul_shared::jobs::ChunkState>,
        haul_shared::lease::StoreError,
    > {
        self.inner.chunk_states(id).await
    }
    async fn add_dead_letter(
        &self,
        id: &JobId,
        dead: &haul_shared::jobs::DeadLetter,
    ) -> Result<(), haul_shared::lease::StoreError> {
        self.inner.add_dead_letter(id, dead).await
    }
    async fn dead_letters(
        &self,
        id: &JobId,
    ) -> Result<Vec<haul_shared::jobs::DeadLetter>, haul_shared::lease::StoreError> {
        self.inner.dead_letters(id).await
    }
    async fn remove_dead_letters(
        &self,
        id: &JobId,
        chunks: &[ChunkId],
    ) -> Result<(), haul_shared::lease::StoreError> {
        self.inner.remove_dead_letters(id, chunks).await
    }
}

/// Regression: a chunk whose "committed" state could not be recorded used to be acked
/// anyway, and its job waited for it forever.
#[tokio::test]
async fn a_commit_the_store_missed_is_redelivered_and_recorded_once() {
    use haul_shared::jobs::{ChunkState, JobRecord, JobState, JobStore};
    use haul_shared::queue::{ChunkQueue, MemoryQueue};
    use haul_worker::worker::Services;

    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000);")
        .await;
    let dest = TempDest::new();
    let job = JobId::parse("flaky").unwrap();
    let store = Arc::new(FlakyJobStore {
        inner: Default::default(),
        failed: Default::default(),
    });
    store
        .put_job(&JobRecord {
            id: job.clone(),
            spec: options(&db.dsn, "t", &dest).spec,
            plan: Some(one_chunk_plan(&db, "t", vec![], 1000).await),
            state: JobState::Running,
            submitted_at: String::new(),
        })
        .await
        .unwrap();
    let queue = Arc::new(MemoryQueue::new(3));
    let task = haul_shared::proto::Task {
        job_id: job.clone(),
        chunk_id: ChunkId(0),
        range: ChunkRange::All,
        retry: Default::default(),
        run: String::new(),
    };
    queue.publish(task.encode()).await.unwrap();
    let (ctl, worker) = in_process_worker(
        "w",
        Duration::from_secs(10),
        Services {
            queue: Arc::clone(&queue) as Arc<dyn ChunkQueue>,
            leases: Arc::new(MemoryLeaseStore::default()),
            jobs: Arc::clone(&store) as Arc<dyn JobStore>,
        },
    );
    let mut recorded = false;
    for _ in 0..200 {
        if matches!(
            store.chunk_states(&job).await.unwrap().get(&ChunkId(0)),
            Some(ChunkState::Committed { rows: 1000, .. })
        ) {
            recorded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctl.stop();
    worker.await.unwrap().unwrap();
    assert!(
        store.failed.load(std::sync::atomic::Ordering::SeqCst),
        "the blip never happened"
    );
    assert!(recorded, "the committed chunk was never recorded");
    assert!(queue.drain_dead_letters().await.unwrap().is_empty());
    assert_eq!(queue.ready_count().await.unwrap(), 0);
    // the chunk's parts are staged (the job commits them): one attempt's, once
    let rows: usize = read_batches(&dest.0.join("_haul/staging/flaky"))
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 1000, "the redelivery must not write the chunk twice");
}

/// A chunk that fails for good lets the other chunks settle (they commit), then the job
/// fails naming it, and `--resume` finishes it once its cause is gone. Embedded mode
/// used to abort the other chunks at the first failure; it now runs the cluster's job
/// driver (the cluster's twin of this test is in cluster.rs).
#[tokio::test]
async fn a_chunk_failing_for_good_lets_the_others_settle_and_resume_finishes_it() {
    let db = TestDb::new().await;
    poisonable(&db, 20_000, 10_000, "22023").await;
    let dest = TempDest::new();
    let o = poisoned_run(&db, &dest, "settle");
    let err = run(o.clone()).await.unwrap_err().to_string();
    assert!(err.contains("poisoned row 10000"), "{err}");
    let chunks = assert_one_chunk_failed(&err, &dest.0, "settle");
    assert!(
        !dest.0.join("t/_manifest.json").exists(),
        "a failed job has no manifest"
    );

    db.exec("DELETE FROM poison").await;
    let mut resume = o;
    resume.resume = true;
    resume.fresh_snapshot = true;
    let s = run(resume).await.unwrap();
    assert_eq!(s.rows, 20_000);
    assert_eq!(s.chunks, chunks);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

/// Regression (issue 12): a finite timestamp past 294247-01-10 04:00:54.775806 UTC (the
/// last instant Arrow's microseconds from 1970 hold) wrapped: `…775807` became the
/// +infinity marker, later ones -infinity or a date in 290308 BC, and the job succeeded.
/// The last holdable instant round-trips exactly; one microsecond later, in a timestamp,
/// a timestamptz or a timestamp array, the job fails naming the column and the fix; with
/// that fix (`--cast <column>=text`) it exports the value's text.
#[tokio::test]
async fn timestamps_past_arrows_range_are_refused_not_wrapped() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE ts (id int PRIMARY KEY, a timestamp, b timestamptz, c timestamp[]);
         INSERT INTO ts VALUES
           (1, '294247-01-10 04:00:54.775806', '294247-01-10 04:00:54.775806+00',
               ARRAY['294247-01-10 04:00:54.775806'::timestamp]),
           (2, 'infinity', '-infinity', ARRAY['infinity'::timestamp]),
           (3, '2024-01-01', '2024-01-01 00:00+00', NULL);",
    )
    .await;
    let dest = TempDest::new();
    run(options(&db.dsn, "ts", &dest)).await.unwrap();
    let batches = read_batches(&dest.0.join("ts"));
    let mut seen = BTreeMap::new();
    for b in &batches {
        let ids = b.column(0).as_primitive::<arrow_array::types::Int32Type>();
        let a = b
            .column(1)
            .as_primitive::<arrow_array::types::TimestampMicrosecondType>();
        let c = b.column(3).as_list::<i32>();
        for i in 0..b.num_rows() {
            let first = (!c.is_null(i)).then(|| {
                c.value(i)
                    .as_primitive::<arrow_array::types::TimestampMicrosecondType>()
                    .value(0)
            });
            seen.insert(ids.value(i), (a.value(i), first));
        }
    }
    assert_eq!(
        seen[&1],
        (i64::MAX - 1, Some(i64::MAX - 1)),
        "the last instant"
    );
    assert_eq!(seen[&2], (i64::MAX, Some(i64::MAX)), "+infinity");

    for (column, later) in [
        ("a", "'294247-01-10 04:00:54.775807'"),
        ("b", "'294276-12-31 23:59:59.999999+00'"),
        ("c", "ARRAY['294247-01-10 04:00:54.775807'::timestamp]"),
    ] {
        db.exec(&format!("UPDATE ts SET {column} = {later} WHERE id = 3"))
            .await;
        let bad = TempDest::new();
        expect_error(
            options(&db.dsn, "ts", &bad),
            &bad,
            &[
                &format!("column \"{column}\""),
                "294247-01-10",
                "--cast <column>=text",
            ],
        )
        .await;
        let out = TempDest::new();
        let mut cast = options(&db.dsn, "ts", &out);
        cast.spec.casts.insert(column.into(), "text".into());
        run(cast)
            .await
            .unwrap_or_else(|e| panic!("{column} as text: {e}"));
        db.exec(&format!("UPDATE ts SET {column} = NULL WHERE id = 3"))
            .await;
    }
}

/// Regression (issue 12): a table column named like the Hive partition folder (`dt`, with
/// `--partition-by created_at:day`) was silently shadowed: DuckDB and pyarrow with Hive
/// partitioning showed the folder's date instead of the column for every row. The
/// collision is refused before any data moves, naming the fix; with the partition field
/// named (`:as=load_dt`), both readers see the table's own `dt` values and `load_dt`.
#[tokio::test]
async fn a_column_named_like_the_partition_field_is_never_shadowed() {
    let python = crate::harness::test_python();
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE ev (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, dt date NOT NULL);
         INSERT INTO ev SELECT g, timestamptz '2024-01-01 00:00:00+00' + g * interval '7 hours',
                (timestamptz '2024-01-01 00:00:00+00' + g * interval '7 hours')::date + 100
         FROM generate_series(1, 2000) g;",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "ev", &dest);
    o.spec.chunk_rows = 500;
    o.spec.output.partition_by = Some(haul_shared::jobs::PartitionBy::new(
        "created_at",
        haul_shared::jobs::Granularity::Day,
    ));
    expect_error(
        o.clone(),
        &dest,
        &[
            "partition field \"dt\"",
            "column of that name",
            ":as=<field>",
        ],
    )
    .await;
    let mut bad = o.clone();
    bad.spec.output.partition_by.as_mut().unwrap().field = "load/dt".into();
    expect_error(bad, &dest, &["letters, digits and _"]).await;

    o.spec.output.partition_by.as_mut().unwrap().field = "load_dt".into();
    run(o).await.unwrap();
    assert!(dest.0.join("ev/load_dt=2024-01-01").is_dir());
    let script = format!(
        r#"
import duckdb, pyarrow.dataset as ds, pyarrow.compute as pc
root = {root:?}
d = duckdb.sql(f"SELECT count(*), count(*) FILTER (WHERE dt = CAST(created_at AT TIME ZONE 'UTC' AS DATE) + 100), count(*) FILTER (WHERE load_dt = CAST(created_at AT TIME ZONE 'UTC' AS DATE)) FROM read_parquet('{{root}}/ev/**/part-*.parquet', hive_partitioning=true)").fetchone()
t = ds.dataset(root + "/ev", format="parquet", partitioning="hive").to_table()
print(d[0], d[1], d[2], t.num_rows, "dt" in t.column_names, "load_dt" in t.column_names)
"#,
        root = dest.0.display().to_string()
    );
    let out = Command::new(python).args(["-c", &script]).output().unwrap();
    assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2000 2000 2000 2000 True True"
    );
}

/// Regression (issue 12): finite dates past year 262143 (chrono's range) were filed under
/// `dt=infinity`, and DuckDB read haul's -infinity marker (Postgres's i32::MIN) as a date
/// in 5877642 BC. Every finite day now has its own folder, Postgres's whole range
/// included, and DuckDB reads both infinities as such (date and timestamp).
#[tokio::test]
async fn far_dates_get_their_own_folders_and_readers_see_infinity() {
    let python = crate::harness::test_python();
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE far (id int PRIMARY KEY, d date, ts timestamp);
         INSERT INTO far VALUES (1, '262144-01-01', '2024-01-01'), (2, '5874897-12-31', 'infinity'),
           (3, '4714-11-24 BC', '-infinity'), (4, 'infinity', '294247-01-10'),
           (5, '-infinity', '4713-01-01 BC'), (6, '2024-02-29', NULL), (7, NULL, '1999-12-31 23:59:59');",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "far", &dest);
    o.spec.output.partition_by = Some(haul_shared::jobs::PartitionBy::new(
        "d",
        haul_shared::jobs::Granularity::Day,
    ));
    run(o).await.unwrap();
    assert_same(&db.client, "far", &dest.0.join("far")).await;
    assert_eq!(
        subdir_names(&dest.0.join("far")),
        [
            "dt=+262144-01-01",
            "dt=+5874897-12-31",
            "dt=-4713-11-24",
            "dt=-infinity",
            "dt=2024-02-29",
            "dt=__HIVE_DEFAULT_PARTITION__",
            "dt=infinity",
        ]
    );
    let script = format!(
        r#"
import duckdb
rows = duckdb.sql("SELECT id, d::varchar, ts::varchar FROM read_parquet('{root}/far/**/part-*.parquet', hive_partitioning=false) WHERE id IN (2, 3, 4, 5) ORDER BY id").fetchall()
print(rows)
"#,
        root = dest.0.display()
    );
    let out = Command::new(python).args(["-c", &script]).output().unwrap();
    assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[(2, '5874897-12-31', 'infinity'), (3, '4714-11-24 (BC)', '-infinity'), \
         (4, 'infinity', '294247-01-10 00:00:00'), (5, '-infinity', '4713-01-01 (BC) 00:00:00')]"
    );
}

/// Regression (issue 12): `numeric(5,-2)` and `numeric(3,5)` failed after three attempts
/// with `parquet: Invalid DECIMAL scale: -2`. They map to decimals that hold every value
/// exactly (a scale-0 decimal of precision 7; a decimal(5,5)), and read back equal.
#[tokio::test]
async fn numerics_with_negative_or_large_scales_export_exactly() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE n (id int PRIMARY KEY, a numeric(5,-2), b numeric(3,5), c numeric(2,-3)[]);
         INSERT INTO n VALUES (1, 9999900, 0.00999, '{99000,-1000}'), (2, -12345, -0.00001, NULL),
           (3, 0, 0, '{}'), (4, NULL, NULL, '{NULL}');",
    )
    .await;
    let dest = TempDest::new();
    let s = run(options(&db.dsn, "n", &dest)).await.unwrap();
    assert_eq!(s.rows, 4);
    let types: Vec<String> = read_batches(&dest.0.join("n"))[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.data_type().to_string())
        .collect();
    assert_eq!(
        types[1..],
        [
            "Decimal128(7, 0)",
            "Decimal128(5, 5)",
            "List(Decimal128(5, 0), field: 'element')"
        ]
    );
    assert_same(&db.client, "n", &dest.0.join("n")).await;
}

/// Regression (issue 12): bytes that are not UTF-8 in a SQL_ASCII database failed as
/// `invalid byte sequence for encoding "UTF8": 0xe9`, naming neither table nor column.
/// The job now fails naming the column and the fix, at once (it cannot succeed), and with
/// that fix (`--cast note=bytea`) exports the bytes as stored; valid text is unchanged.
#[tokio::test]
async fn non_utf8_bytes_in_a_sql_ascii_database_name_the_column() {
    let db =
        TestDb::with_options("ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
            .await;
    db.exec(
        "CREATE TABLE latin (id int PRIMARY KEY, name text, note text);
         INSERT INTO latin SELECT g, 'n' || g, 'plain' FROM generate_series(1, 3000) g;
         UPDATE latin SET note = E'caf\\xe9' WHERE id = 2500;",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "latin", &dest);
    o.spec.chunk_rows = 1000;
    let err = run(o.clone()).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("column \"note\"") && msg.contains("--cast <column>=bytea"),
        "{msg}"
    );
    use haul_shared::error::{Classify, ErrorClass};
    assert_eq!(err.class(), ErrorClass::User, "{msg}");

    o.spec.casts.insert("note".into(), "bytea".into());
    run(o).await.unwrap();
    let mut notes = BTreeMap::new();
    for b in read_batches(&dest.0.join("latin")) {
        let ids = b["id"].as_primitive::<arrow_array::types::Int32Type>();
        let note = b["note"].as_binary::<i32>();
        for i in 0..b.num_rows() {
            notes.insert(ids.value(i), note.value(i).to_vec());
        }
    }
    assert_eq!(notes.len(), 3000);
    assert_eq!(notes[&2500], b"caf\xe9");
    assert_eq!(notes[&1], b"plain");
}

/// A login role for one test, dropped after the databases that grant it anything (declare
/// it before them).
struct TestRole(String);

impl TestRole {
    async fn new(db: &TestDb) -> Self {
        let role = unique("haul_role");
        db.exec(&format!("CREATE ROLE {role} LOGIN")).await;
        TestRole(role)
    }
    fn dsn(&self, db: &TestDb) -> haul_shared::pg::ConnInfo {
        conninfo(&db.dsn.replacen("postgres@", &format!("{}@", self.0), 1))
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(admin_dsn())
            .args(["-X", "-q", "-c"])
            .arg(format!("DROP ROLE IF EXISTS {}", self.0))
            .output();
    }
}

/// Regression (issue 12): a table in a schema the role lacks USAGE on was reported as
/// "does not exist", and a role with column-level SELECT grants was refused even with
/// `--columns` limited to its columns. Now: the first names the missing USAGE; the second
/// names the columns it cannot read and the fix, and with `--columns` it exports them.
#[tokio::test]
async fn permissions_are_named_and_column_grants_are_enough() {
    let admin = TestDb::new().await;
    let role = TestRole::new(&admin).await;
    let db = TestDb::new().await;
    db.exec(&format!(
        "CREATE SCHEMA private; CREATE TABLE private.t (id int PRIMARY KEY);
         CREATE TABLE c (id int PRIMARY KEY, v text, secret text);
         INSERT INTO c SELECT g, 'v' || g, 's' || g FROM generate_series(1, 3000) g;
         GRANT SELECT (id, v) ON c TO {r};",
        r = role.0
    ))
    .await;
    let dest = TempDest::new();
    let as_role = |table: &str| {
        let mut o = options(&db.dsn, table, &dest);
        o.spec.source = role.dsn(&db);
        o
    };
    expect_error(
        as_role("private.t"),
        &dest,
        &["permission denied for schema private", "USAGE"],
    )
    .await;
    expect_error(
        as_role("c"),
        &dest,
        &["cannot SELECT column(s) \"secret\"", "--columns"],
    )
    .await;
    let mut o = as_role("c");
    o.spec.columns = vec!["id".into(), "v".into()];
    o.spec.chunk_rows = 1000;
    assert_eq!(run(o).await.unwrap().rows, 3000);
    let batches = read_batches(&dest.0.join("c"));
    assert_eq!(batches[0].num_columns(), 2);
    assert_same_batches(&db.client, "c", &batches).await;
}

/// Regression (issue 12): a resume trusted every chunk manifest. One whose parts are gone
/// (neither published nor staged) now has its chunk extracted again, and the job ends
/// with every row.
#[tokio::test]
async fn a_resume_redoes_a_committed_chunk_whose_parts_are_gone() {
    let db = TestDb::new().await;
    poisonable(&db, 20_000, 10_000, "22023").await;
    let dest = TempDest::new();
    let o = poisoned_run(&db, &dest, "gone");
    run(o.clone()).await.unwrap_err();
    // a committed chunk loses its part
    let manifest = std::fs::read_dir(dest.0.join("_haul/jobs/gone/chunks"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a committed chunk");
    let m: haul_shared::lake::ChunkManifest =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    for f in &m.files {
        std::fs::remove_file(dest.0.join(&f.staged)).unwrap();
    }

    db.exec("DELETE FROM poison").await;
    let mut resume = o;
    resume.resume = true;
    resume.fresh_snapshot = true;
    let s = run(resume).await.unwrap();
    assert_eq!(s.rows, 20_000);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

/// Regression: a dead letter of an earlier run of a job (its task dead-lettered, then the
/// job submitted again under the same id) failed the new run's chunk. Tasks carry their
/// run; the dead-letter watcher leaves another run's chunk alone.
#[tokio::test]
async fn a_dead_letter_of_an_earlier_run_leaves_the_new_run_alone() {
    use haul_shared::jobs::{ChunkState, JobRecord, JobState, JobStore, MemoryJobStore};
    use haul_shared::queue::{ChunkQueue, MemoryQueue};
    let dest = TempDest::new();
    let jobs = Arc::new(MemoryJobStore::default());
    let queue = Arc::new(MemoryQueue::new(3));
    let job = JobId::parse("rerun").unwrap();
    jobs.put_job(&JobRecord {
        id: job.clone(),
        spec: options("postgresql://u@127.0.0.1/db", "t", &dest).spec,
        plan: None,
        state: JobState::Running,
        submitted_at: "run-2".into(),
    })
    .await
    .unwrap();
    let mut sub = queue.subscribe(4).await.unwrap();
    for (chunk, run) in [(0, "run-1"), (1, "run-2")] {
        jobs.set_chunk_state(&job, ChunkId(chunk), &ChunkState::Pending)
            .await
            .unwrap();
        let task = haul_shared::proto::Task {
            job_id: job.clone(),
            chunk_id: ChunkId(chunk),
            range: ChunkRange::All,
            retry: Default::default(),
            run: run.into(),
        };
        queue.publish(task.encode()).await.unwrap();
        sub.next().await.unwrap().reject().await.unwrap();
    }
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(haul_coordinator::dead_letters::watch(
        Arc::clone(&queue) as Arc<dyn ChunkQueue>,
        Arc::clone(&jobs) as Arc<dyn JobStore>,
        stop.clone(),
    ));
    let t0 = std::time::Instant::now();
    loop {
        let states = jobs.chunk_states(&job).await.unwrap();
        if matches!(states.get(&ChunkId(1)), Some(ChunkState::Failed { .. })) {
            assert_eq!(
                states.get(&ChunkId(0)),
                Some(&ChunkState::Pending),
                "{states:?}"
            );
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // the earlier run's letter was consumed too, and recorded nowhere
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dead = jobs.dead_letters(&job).await.unwrap();
    assert_eq!(
        dead.iter().map(|d| d.chunk).collect::<Vec<_>>(),
        [ChunkId(1)]
    );
    assert!(queue.drain_dead_letters().await.unwrap().is_empty());
    stop.cancel();
    watcher.await.unwrap();
}

/// Regression: a redelivered task whose chunk's lease a live attempt held overwrote the
/// chunk's state (as waiting) and spent its --retry-for budget, until the healthy attempt
/// was cancelled and the job failed. The duplicate is dropped; the state stays the live
/// attempt's.
#[tokio::test]
async fn a_duplicate_of_a_chunk_a_live_attempt_holds_leaves_it_alone() {
    use haul_shared::jobs::{ChunkState, JobRecord, JobState, JobStore, MemoryJobStore};
    use haul_shared::queue::{ChunkQueue, MemoryQueue};
    use haul_worker::worker::Services;

    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10);")
        .await;
    let dest = TempDest::new();
    let job = JobId::parse("busy").unwrap();
    let jobs = Arc::new(MemoryJobStore::default());
    jobs.put_job(&JobRecord {
        id: job.clone(),
        spec: options(&db.dsn, "t", &dest).spec,
        plan: Some(one_chunk_plan(&db, "t", vec![], 10).await),
        state: JobState::Running,
        submitted_at: String::new(),
    })
    .await
    .unwrap();
    // the live attempt: it holds the lease (renewing it) and the chunk runs under it
    let leases = Arc::new(MemoryLeaseStore::default());
    let key = format!("{job}/{}", ChunkId(0));
    let live = WorkerId("live".into());
    let held = leases
        .acquire(&key, &live, Duration::from_secs(1))
        .await
        .unwrap()
        .expect("the lease is free");
    let running = ChunkState::Running {
        worker: live.clone(),
        attempt: 1,
    };
    jobs.set_chunk_state(&job, ChunkId(0), &running)
        .await
        .unwrap();
    let renewing = CancellationToken::new();
    let renewer = {
        let (leases, held, stop) = (Arc::clone(&leases), held.clone(), renewing.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let _ = leases.renew(&held, Duration::from_secs(1)).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let queue = Arc::new(MemoryQueue::new(3));
    let task = haul_shared::proto::Task {
        job_id: job.clone(),
        chunk_id: ChunkId(0),
        range: ChunkRange::All,
        retry: Default::default(),
        run: String::new(),
    };
    queue.publish(task.encode()).await.unwrap();
    let (ctl, worker) = in_process_worker(
        "dup",
        Duration::from_secs(1),
        Services {
            queue: Arc::clone(&queue) as Arc<dyn ChunkQueue>,
            leases: Arc::clone(&leases) as Arc<dyn LeaseStore>,
            jobs: Arc::clone(&jobs) as Arc<dyn JobStore>,
        },
    );
    // the duplicate waits out twice the lease's TTL, then is dropped
    let t0 = std::time::Instant::now();
    while queue.ready_count().await.unwrap() > 0 || t0.elapsed() < Duration::from_secs(3) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the duplicate was never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        jobs.chunk_states(&job).await.unwrap().get(&ChunkId(0)),
        Some(&running),
        "the live attempt's state was overwritten"
    );
    assert_eq!(queue.ready_count().await.unwrap(), 0);
    assert!(queue.drain_dead_letters().await.unwrap().is_empty());
    assert!(
        leases.is_current(&held).await.unwrap(),
        "the live lease was taken"
    );
    ctl.stop();
    worker.await.unwrap().unwrap();
    renewing.cancel();
    renewer.await.unwrap();
}

/// The worker loop `haul worker` runs, in this process: one slot over `svc`, with the
/// given lease TTL. Stop it with the returned control.
fn in_process_worker(
    id: &str,
    lease_ttl: Duration,
    svc: haul_worker::worker::Services,
) -> (
    haul_worker::worker::Control,
    tokio::task::JoinHandle<Result<(), haul_shared::queue::QueueError>>,
) {
    use haul_worker::worker::{Control, WorkerConfig, run_worker};
    let ctl = Control::default();
    let worker = tokio::spawn(run_worker(
        WorkerConfig {
            id: WorkerId(id.into()),
            slots: 1,
            lease_ttl,
            max_attempts: 3,
            load_auth: Default::default(),
            source_credentials: Default::default(),
        },
        svc,
        Arc::new(Progress::default()),
        ctl.clone(),
    ));
    (ctl, worker)
}
