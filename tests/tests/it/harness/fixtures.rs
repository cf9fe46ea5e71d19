//! Fixtures: a fresh database per test, a temporary destination, and an
//! order-independent checksum of a table computed two independent ways — by Postgres
//! from the source rows, and in Rust from the Parquet files read back.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use haul::embedded::{JobSummary, RunOptions};
use haul::progress::ProgressMode;
use haul_coordinator::RunError;
use haul_shared::jobs::{JobSpec, OutputOptions};
use haul_shared::pg::{ConnInfo, Database, quote_ident};
use md5::{Digest, Md5};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Tests that use RabbitMQ hold this: the cluster tests exclusively (they spawn several
/// processes each, and one of them closes every broker connection), the others shared.
pub static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        uuid::Uuid::new_v4().simple().to_string()[..6].to_owned()
    )
}

/// The Python with DuckDB and pyarrow that `scripts/test.sh` prepares (HAUL_TEST_PYTHON);
/// a relative path is taken from the workspace root, where scripts/test.sh runs.
pub fn test_python() -> PathBuf {
    let python = std::env::var("HAUL_TEST_PYTHON")
        .expect("HAUL_TEST_PYTHON is unset: run the suite with scripts/test.sh");
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(python)
}

/// The admin DSN tests create their databases from.
pub fn admin_dsn() -> String {
    std::env::var("HAUL_TEST_PG")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into())
}

fn dsn_for(db: &str) -> String {
    let admin = admin_dsn();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{db}")
}

/// A database of its own, dropped when the test ends (pass or fail).
pub struct TestDb {
    pub name: String,
    pub dsn: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::with_options("").await
    }

    /// A database created with `options` after its name (`ENCODING 'SQL_ASCII' ...`).
    pub async fn with_options(options: &str) -> Self {
        let name = unique("haul_t");
        let admin = connect(&admin_dsn()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {} {options}", quote_ident(&name)))
            .await
            .expect("create test database");
        let dsn = dsn_for(&name);
        let client = connect(&dsn).await;
        Self { name, dsn, client }
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .arg(admin_dsn())
            .args(["-X", "-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&self.name)
            ))
            .output();
    }
}

pub async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn}: {e}"));
    tokio::spawn(conn);
    client
        .batch_execute("SET TimeZone = 'UTC'; SET extra_float_digits = 3")
        .await
        .unwrap();
    client
}

/// A temporary destination folder, removed at the end.
pub struct TempDest(pub PathBuf);

impl TempDest {
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(unique("haul_dest"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn url(&self) -> String {
        format!("file://{}", self.0.display())
    }
}

impl Drop for TempDest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test's connection string as a job holds it (the tests' local server needs no password).
pub fn conninfo(dsn: &str) -> ConnInfo {
    ConnInfo::parse(dsn).expect("a valid connection string").0
}

/// A test's connection string as a process that connects holds it.
pub fn database(dsn: &str) -> Database {
    Database::from_user(dsn, None).expect("a valid connection string")
}

/// Makes `o` also load its rows, through the in-process loader, into `table` (the
/// source table's name when empty) of the database at `target_dsn`.
pub fn load_into(o: &mut RunOptions, target_dsn: &str, table: &str, create: bool, truncate: bool) {
    o.spec.load = Some(haul_shared::jobs::LoadSpec {
        endpoints: vec![],
        target_table: table.into(),
        create_table: create,
        truncate_first: truncate,
    });
    o.load_target = Some(database(target_dsn));
}

pub fn options(dsn: &str, table: &str, dest: &TempDest) -> RunOptions {
    RunOptions {
        spec: JobSpec {
            source: conninfo(dsn),
            table: table.into(),
            columns: vec![],
            key: vec![],
            split: Default::default(),
            casts: Default::default(),
            dest: dest.url(),
            chunk_rows: 1000,
            output: OutputOptions::default(),
            use_snapshot: true,
            load: None,
            incremental: None,
            retry_for_secs: haul_shared::jobs::DEFAULT_RETRY_FOR_SECS,
        },
        job_id: None,
        resume: false,
        fresh_snapshot: false,
        overwrite: false,
        workers: 2,
        max_attempts: 3,
        lease_ttl: Duration::from_secs(10),
        progress: ProgressMode::None,
        source_credentials: Default::default(),
        load_target: None,
        ledger_schema: "haul".into(),
    }
}

/// A hand-made plan of `table` as one chunk, without a snapshot, for tests that drive the
/// executor or worker loop directly, or record a job by hand.
pub async fn one_chunk_plan(
    db: &TestDb,
    table: &str,
    key: Vec<haul_shared::jobs::KeyColumn>,
    rows: u64,
) -> haul_shared::jobs::JobPlan {
    let session = haul_shared::pg::connect(&database(&db.dsn)).await.unwrap();
    let table = haul_shared::pg::resolve_table(&session.client, table, &[], &Default::default())
        .await
        .unwrap();
    haul_shared::jobs::JobPlan {
        snapshot_at: None,
        table,
        key,
        chunks: vec![haul_shared::ChunkRange::All],
        estimated_rows: rows,
        snapshot: None,
        window: None,
        base: Default::default(),
        database: db.name.clone(),
    }
}

/// Asserts a spawned `haul` exited 0, showing its stderr if not.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn run(opts: RunOptions) -> Result<JobSummary, RunError> {
    haul::embedded::run(opts, CancellationToken::new()).await
}

/// The chunk manifest files of `job` in a local destination (a manifest being created is
/// staged as `<chunk>.json#<n>` first: only `.json` files count).
fn chunk_manifest_files(dest: &TempDest, job: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dest.0.join(format!("_haul/jobs/{job}/chunks")))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

/// How many chunks of `job` are committed in a local destination.
pub fn committed_chunks(dest: &TempDest, job: &str) -> usize {
    chunk_manifest_files(dest, job).len()
}

/// The committed chunks' manifests of `job` in a local destination.
pub fn chunk_manifests(dest: &TempDest, job: &str) -> Vec<haul_shared::lake::ChunkManifest> {
    chunk_manifest_files(dest, job)
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

/// Asserts that every chunk of `job` was committed by the first attempt that took it: all
/// under the job's first lease epoch (a chunk taken again gets a later one).
pub fn assert_no_chunk_redone(dest: &TempDest, job: &str) -> Vec<haul_shared::lake::ChunkManifest> {
    let m = chunk_manifests(dest, job);
    let first = m.iter().map(|m| m.epoch.0).min().unwrap();
    let redone: Vec<_> = m
        .iter()
        .filter(|m| m.epoch.0 != first)
        .map(|m| (m.chunk, &m.worker.0, m.epoch.0))
        .collect();
    assert!(redone.is_empty(), "chunks taken again: {redone:?}");
    m
}

/// Waits until at least `n` chunks of `job` are committed in `dest`, without blocking the
/// runtime (a test's own forwarders may run on it); `logs` says why on a timeout.
pub async fn wait_for_committed_chunks(
    dest: &TempDest,
    job: &str,
    n: usize,
    logs: impl Fn() -> String,
) {
    let t0 = std::time::Instant::now();
    while committed_chunks(dest, job) < n {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no {n} chunks of {job} committed:\n{}",
            logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The names of the directories right under `dir` (partition folders), sorted.
pub fn subdir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // the table's Delta log is no partition
        .filter(|n| !n.starts_with('_'))
        .collect();
    names.sort();
    names
}

/// Every part file under `dir`, recursively: what a glob reader of `**/part-*.parquet`
/// sees (the Delta log's checkpoints are Parquet files too, under `_delta_log/`).
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<_> = files_under(dir)
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|x| x == "parquet")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        })
        .collect();
    out.sort();
    out
}

/// Every file under `dir`, at any depth (none if it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn read_batches(dir: &Path) -> Vec<RecordBatch> {
    batches_from_bytes(
        parquet_files(dir)
            .into_iter()
            .map(|f| bytes::Bytes::from(std::fs::read(f).unwrap()))
            .collect(),
    )
}

/// Reads whole Parquet files held in memory.
pub fn batches_from_bytes(files: Vec<bytes::Bytes>) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for f in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            out.push(b.unwrap());
        }
    }
    out
}

/// Count, per-column null counts, and the sum of a 64-bit hash of every row's canonical
/// text (order-independent).
#[derive(Debug, PartialEq, Eq)]
pub struct Digest64 {
    pub rows: i64,
    pub nulls: Vec<i64>,
    pub sum: i128,
}

fn row_hash(s: &str) -> i64 {
    let d = Md5::digest(s.as_bytes());
    i64::from_be_bytes(d[..8].try_into().unwrap())
}

/// The digest of Parquet rows (all columns, or only column `only`), from Arrow values.
fn digest_batches(batches: &[RecordBatch], only: Option<usize>) -> Digest64 {
    let ncols = batches.first().map(|b| b.num_columns()).unwrap_or(0);
    let mut d = Digest64 {
        rows: 0,
        nulls: vec![0; ncols],
        sum: 0,
    };
    for b in batches {
        for (i, c) in b.columns().iter().enumerate() {
            d.nulls[i] += c.null_count() as i64;
        }
        for r in 0..b.num_rows() {
            let parts: Vec<String> = b
                .columns()
                .iter()
                .enumerate()
                .filter(|(i, _)| only.is_none_or(|o| o == *i))
                .map(|(_, c)| c)
                .map(|c| rust_canon(c.as_ref(), r).unwrap_or_else(|| "\\N".into()))
                .collect();
            d.sum += row_hash(&parts.join("|")) as i128;
            d.rows += 1;
        }
    }
    d
}

/// The same digest, computed by Postgres over the source table, for the columns (and
/// Arrow types) of the output.
pub async fn pg_digest(client: &Client, table: &str, cols: &[(String, DataType)]) -> Digest64 {
    let canon: Vec<String> = cols
        .iter()
        .map(|(n, t)| format!("coalesce({}, '\\N')", pg_canon(&quote_ident(n), t)))
        .collect();
    let nulls: Vec<String> = cols
        .iter()
        .map(|(n, _)| format!("count(*) - count({})", quote_ident(n)))
        .collect();
    let sql = format!(
        "SELECT count(*)::int8, coalesce(sum(('x' || substr(md5(concat_ws('|', {})), 1, 16))::bit(64)::int8::numeric), 0)::text {} FROM {table}",
        if canon.is_empty() {
            "''".to_string()
        } else {
            canon.join(", ")
        },
        nulls
            .iter()
            .map(|n| format!(", ({n})::int8"))
            .collect::<String>()
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    Digest64 {
        rows: row.get(0),
        sum: row.get::<_, String>(1).parse().unwrap(),
        nulls: (0..cols.len()).map(|i| row.get::<_, i64>(i + 2)).collect(),
    }
}

/// The output's columns with their Arrow types (from the first Parquet file).
pub fn output_columns(dir: &Path) -> Vec<(String, DataType)> {
    let f = parquet_files(dir)
        .into_iter()
        .next()
        .expect("at least one parquet file");
    let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap()).unwrap();
    b.schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect()
}

/// Asserts the Parquet output under `dir` holds exactly the rows of `table`.
pub async fn assert_same(client: &Client, table: &str, dir: &Path) -> Digest64 {
    assert_same_batches(client, table, &read_batches(dir)).await
}

/// Asserts `batches` hold exactly the rows of `table` (count, null counts, checksum).
pub async fn assert_same_batches(
    client: &Client,
    table: &str,
    batches: &[RecordBatch],
) -> Digest64 {
    let first = batches.first().expect("at least one batch");
    let cols: Vec<(String, DataType)> = first
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    let want = pg_digest(client, table, &cols).await;
    let got = digest_batches(batches, None);
    if got != want {
        // name the columns that differ, with one value as Rust renders it
        let mut bad = Vec::new();
        for (i, c) in cols.iter().enumerate() {
            let one = pg_digest(client, table, std::slice::from_ref(c)).await;
            let mut mine = digest_batches(batches, Some(i));
            mine.nulls = vec![mine.nulls[i]];
            if mine != one {
                let sample = batches
                    .iter()
                    .find(|b| b.num_rows() > 0)
                    .and_then(|b| rust_canon(b.column(i).as_ref(), 0));
                bad.push(format!("{} ({}) e.g. {sample:?}", c.0, c.1));
            }
        }
        panic!(
            "parquet output differs from source {table} in columns {bad:?}: {got:?} vs {want:?}"
        );
    }
    got
}

/// Postgres's rendering of a value, matching [`rust_canon`] for the Arrow type it maps to.
fn pg_canon(e: &str, t: &DataType) -> String {
    match t {
        DataType::Boolean => {
            format!("CASE WHEN {e} IS NULL THEN NULL WHEN {e} THEN 't' ELSE 'f' END")
        }
        DataType::Float32 => format!("encode(float4send({e}), 'hex')"),
        DataType::Float64 => format!("encode(float8send({e}), 'hex')"),
        DataType::Binary => format!("encode({e}, 'hex')"),
        DataType::Date32 => format!(
            "CASE WHEN isfinite({e}) THEN ({e} - date '1970-01-01')::text ELSE {e}::text END"
        ),
        DataType::Timestamp(..) => format!(
            "CASE WHEN isfinite({e}) THEN trunc(extract(epoch FROM {e}) * 1000000)::int8::text ELSE {e}::text END"
        ),
        DataType::Time64(_) => format!("trunc(extract(epoch FROM {e}) * 1000000)::int8::text"),
        DataType::Struct(_) => format!("encode(interval_send({e}), 'hex')"),
        DataType::List(f) => format!(
            "CASE WHEN {e} IS NULL THEN NULL ELSE '{{' || coalesce((SELECT string_agg(coalesce({}, 'NULL'), ',' ORDER BY o) FROM unnest({e}) WITH ORDINALITY AS u(el, o)), '') || '}}' END",
            pg_canon("u.el", f.data_type())
        ),
        // text-like (incl. char(n) with its padding), numbers, uuid: the output function
        _ => format!("CASE WHEN {e} IS NULL THEN NULL ELSE concat({e}) END"),
    }
}

/// The Rust side's rendering of one Arrow value; `None` for NULL.
pub fn rust_canon(a: &dyn Array, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Some(match a.data_type() {
        DataType::Boolean => if a.as_boolean().value(i) { "t" } else { "f" }.into(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::Float32 => hex(&a.as_primitive::<Float32Type>().value(i).to_be_bytes()),
        DataType::Float64 => hex(&a.as_primitive::<Float64Type>().value(i).to_be_bytes()),
        DataType::Decimal128(..) => a.as_primitive::<Decimal128Type>().value_as_string(i),
        DataType::Decimal256(..) => a.as_primitive::<Decimal256Type>().value_as_string(i),
        DataType::Utf8 => a.as_string::<i32>().value(i).to_owned(),
        DataType::Binary => hex(a.as_binary::<i32>().value(i)),
        DataType::FixedSizeBinary(16) => {
            let u = uuid::Uuid::from_slice(a.as_fixed_size_binary().value(i)).unwrap();
            u.hyphenated().to_string()
        }
        DataType::Date32 => match a.as_primitive::<Date32Type>().value(i) {
            i32::MAX => "infinity".into(),
            // haul's -infinity marker (DuckDB's), not Postgres's i32::MIN
            -2_147_483_647 => "-infinity".into(),
            d => d.to_string(),
        },
        DataType::Timestamp(..) => match a.as_primitive::<TimestampMicrosecondType>().value(i) {
            i64::MAX => "infinity".into(),
            -9_223_372_036_854_775_807 => "-infinity".into(),
            t => t.to_string(),
        },
        DataType::Time64(_) => a
            .as_primitive::<Time64MicrosecondType>()
            .value(i)
            .to_string(),
        DataType::Struct(_) => {
            let s = a.as_struct();
            let months = s
                .column_by_name("months")
                .unwrap()
                .as_primitive::<Int32Type>()
                .value(i);
            let days = s
                .column_by_name("days")
                .unwrap()
                .as_primitive::<Int32Type>()
                .value(i);
            let micros = s
                .column_by_name("microseconds")
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(i);
            let mut b = micros.to_be_bytes().to_vec();
            b.extend(days.to_be_bytes());
            b.extend(months.to_be_bytes());
            hex(&b)
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            let v = l.value(i);
            let parts: Vec<String> = (0..v.len())
                .map(|j| rust_canon(v.as_ref(), j).unwrap_or_else(|| "NULL".into()))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        other => panic!("no canonical form for {other}"),
    })
}

/// Table `t (id bigint PRIMARY KEY, v bigint)` with ids `1..=rows`, and a domain `poison_t`
/// over bigint whose check fails with SQLSTATE `sqlstate` for every id listed in table
/// `poison` (`poison_id` at first): reading with `--cast v=poison_t` fails the chunk
/// holding that row until it is deleted from `poison`. `22023` is a user error (the chunk
/// fails for good at once), `40001` a transient one (retried up to the delivery limit).
pub async fn poisonable(db: &TestDb, rows: i64, poison_id: i64, sqlstate: &str) {
    db.exec(&format!(
        "CREATE TABLE poison (id bigint);
         INSERT INTO poison VALUES ({poison_id});
         CREATE FUNCTION poison_check(bigint) RETURNS bool LANGUAGE plpgsql STABLE AS $$
         BEGIN
           IF EXISTS (SELECT 1 FROM poison WHERE id = $1) THEN
             RAISE EXCEPTION 'poisoned row %', $1 USING ERRCODE = '{sqlstate}';
           END IF;
           RETURN true;
         END $$;
         CREATE DOMAIN poison_t AS bigint CHECK (poison_check(VALUE));
         CREATE TABLE t (id bigint PRIMARY KEY, v bigint);
         INSERT INTO t SELECT g, g FROM generate_series(1, {rows}) g; ANALYZE t;"
    ))
    .await;
}

/// `haul run` options for job `job` over [`poisonable`]'s table `t`, reading `v` through
/// `poison_t` in 2000-row chunks: the chunk holding the poisoned row fails.
pub fn poisoned_run(db: &TestDb, dest: &TempDest, job: &str) -> RunOptions {
    let mut o = options(&db.dsn, "t", dest);
    o.spec.casts.insert("v".into(), "poison_t".into());
    o.spec.chunk_rows = 2_000;
    o.job_id = Some(haul_shared::JobId::parse(job).unwrap());
    o
}

/// Asserts that job `job` in `dest` has exactly one chunk without a chunk manifest (the
/// other chunks settled), and that the job's error `err` names it. Returns the job's
/// number of chunks.
pub fn assert_one_chunk_failed(err: &str, dest: &Path, job: &str) -> usize {
    let plan: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dest.join(format!("_haul/jobs/{job}/plan.json"))).expect("plan.json"),
    )
    .expect("plan.json parses");
    let chunks = plan["plan"]["chunks"].as_array().expect("chunks").len();
    assert!(chunks >= 5, "{chunks} chunks");
    // chunk manifests are named as haul names chunks: `000042.json`
    let missing: Vec<String> = (0..chunks)
        .map(|i| format!("{i:06}"))
        .filter(|c| {
            !dest
                .join(format!("_haul/jobs/{job}/chunks/{c}.json"))
                .exists()
        })
        .collect();
    assert_eq!(missing.len(), 1, "the other chunks settled: {missing:?}");
    assert!(
        err.contains(&format!("chunk {} failed", missing[0])),
        "{err}"
    );
    // the committed chunks' parts stay staged: a reader of the table's folder sees
    // nothing of a job that failed (issue 12: they were published chunk by chunk)
    let visible: Vec<_> = parquet_files(dest)
        .into_iter()
        .filter(|p| !p.starts_with(dest.join("_haul")))
        .collect();
    assert!(
        visible.is_empty(),
        "a failed job's parts are visible: {visible:?}"
    );
    assert!(
        !parquet_files(&dest.join(format!("_haul/staging/{job}"))).is_empty(),
        "the committed chunks' parts were not kept for a resume"
    );
    chunks
}
