//! The table commit is a transaction: every step of it, failed or stopped (the process
//! exits at the n-th object-store call of each kind), is recovered by the next run, and
//! independent readers — delta-rs through the table's Delta log, DuckDB globbing the
//! folder — then see the previous table or the new one, complete, never a mix, and never
//! a file the log names missing. Plus a regression test for each defect the review of
//! the old best-effort commit found.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::harness::*;

/// A row digest both sides compute: rows, sum of ids, sum of `length(v)`.
type Digest = [i64; 3];

async fn pg_digest(db: &TestDb, filter: &str) -> Digest {
    let r = db
        .client
        .query_one(
            &format!(
                "SELECT count(*)::int8, coalesce(sum(id), 0)::int8, coalesce(sum(length(v)), 0)::int8 FROM t {filter}"
            ),
            &[],
        )
        .await
        .unwrap();
    [r.get(0), r.get(1), r.get(2)]
}

fn haul(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(haul_bin());
    c.args(args).env("HAUL_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `haul run` of table `t` into `dest` as job `job`, with `extra` flags.
fn run_args(db: &TestDb, dest: &str, job: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "run",
        "--source",
        &db.dsn,
        "--table",
        "t",
        "--dest",
        dest,
        "--job-id",
        job,
        "--chunk-rows",
        "1000",
        "--partition-by",
        "d",
        "--progress",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// [`run_job`] in the background, its stderr piped.
fn spawn_job(
    db: &TestDb,
    dest: &str,
    job: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    let mut c = Command::new(haul_bin());
    c.args(run_args(db, dest, job, extra))
        .env("HAUL_LOG", "warn")
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn run_job(db: &TestDb, dest: &str, job: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let args = run_args(db, dest, job, extra);
    haul(&args.iter().map(String::as_str).collect::<Vec<_>>(), env)
}

/// `haul run --resume job --fresh-snapshot`: the job as planned, finished.
fn resume(db: &TestDb, dest: &str, job: &str) -> Output {
    resume_env(db, dest, job, &[])
}

fn resume_env(db: &TestDb, dest: &str, job: &str, env: &[(&str, &str)]) -> Output {
    haul(
        &[
            "run",
            "--source",
            &db.dsn,
            "--dest",
            dest,
            "--resume",
            job,
            "--fresh-snapshot",
            "--progress",
            "none",
        ],
        env,
    )
}

/// The calls of each kind one commit of `job` makes.
fn count_calls(
    db: &TestDb,
    dest: &str,
    job: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<(String, u32)> {
    let env = [env, &[("HAUL_FAULT_STORE", "count")]].concat();
    let out = run_job(db, dest, job, extra, &env);
    assert_success(&out);
    let err = stderr(&out);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("haul-fault-counts "))
        .unwrap_or_else(|| panic!("no counts in {err}"));
    let counts: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
    counts
        .into_iter()
        .filter(|(k, _)| k != "get")
        .map(|(k, v)| (k, v.as_u64().unwrap() as u32))
        .collect()
}

/// The modes each kind of call is walked with.
fn modes(kind: &str) -> &'static [&'static str] {
    match kind {
        "put_if_absent" | "rename" => &["error", "crash", "crash_after"],
        _ => &["error", "crash"],
    }
}

/// A copy of the lake in `from` (a table already committed there), for one case.
fn copy_lake(from: &Path) -> TempDest {
    let to = TempDest::new();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(&to.0)
        .status()
        .unwrap();
    assert!(st.success());
    to
}

/// What the readers see of each table folder: delta-rs's latest version through the
/// log (`null` without a log) and DuckDB's `**/part-*.parquet` glob, as [`Digest`]s, or
/// the reader's error.
fn read_tables(dirs: &[PathBuf]) -> Vec<(Value, Value)> {
    let script = r#"
import glob, json, os, sys
import deltalake, duckdb, pyarrow.compute as pc
out = []
for d in json.load(sys.stdin):
    r = {}
    try:
        if os.path.isdir(os.path.join(d, "_delta_log")):
            t = deltalake.DeltaTable(d).to_pyarrow_table(columns=["id", "v"])
            r["delta"] = [t.num_rows, int(pc.sum(t["id"]).as_py() or 0), int(pc.sum(pc.utf8_length(t["v"])).as_py() or 0)]
        else:
            r["delta"] = None
    except Exception as e:
        r["delta"] = "error: " + str(e).splitlines()[0]
    files = glob.glob(os.path.join(d, "**", "part-*.parquet"), recursive=True)
    if files:
        g = duckdb.sql(f"SELECT count(*), coalesce(sum(id), 0), coalesce(sum(length(v)), 0) FROM read_parquet('{d}/**/part-*.parquet')").fetchone()
        r["glob"] = [int(x) for x in g]
    else:
        r["glob"] = [0, 0, 0]
    out.append(r)
print(json.dumps(out))
"#;
    let mut child = Command::new(test_python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(json!(dirs).to_string().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter()
        .map(|r| (r["delta"].clone(), r["glob"].clone()))
        .collect()
}

/// One case of a walk: its table folder and what it must hold.
struct Case {
    name: String,
    table: PathBuf,
    /// The digests a reader may see (previous table, new table).
    allowed: Vec<Option<Digest>>,
    _dest: TempDest,
}

/// Checks every case with one reader process: the log reader sees an allowed table,
/// and the glob reader exactly what the log reader sees.
fn check_cases(cases: &[Case]) {
    let dirs: Vec<PathBuf> = cases.iter().map(|c| c.table.clone()).collect();
    let seen = read_tables(&dirs);
    let mut bad = Vec::new();
    for (c, (delta, glob)) in cases.iter().zip(seen) {
        let as_digest = |v: &Value| -> Option<Digest> { serde_json::from_value(v.clone()).ok() };
        let d = as_digest(&delta);
        let ok_delta = match &delta {
            Value::Null => c.allowed.contains(&None),
            _ => d.is_some() && c.allowed.contains(&d),
        };
        let g = as_digest(&glob);
        let ok_glob = g == Some(d.unwrap_or([0, 0, 0]));
        if !(ok_delta && ok_glob) {
            bad.push(format!(
                "{}: log reader {delta}, glob reader {glob}, allowed {:?}",
                c.name, c.allowed
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} cases wrong:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

async fn orders_like(db: &TestDb) {
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL, d date NOT NULL,
                         updated_at timestamptz NOT NULL);
         INSERT INTO t SELECT g, 'old-' || g, date '2024-01-01' + g % 2,
                              now() - interval '1 hour'
         FROM generate_series(1, 3000) g;",
    )
    .await;
}

/// A database with [`orders_like`]'s `t`, and an empty lake (its URL too).
async fn orders_lake() -> (TestDb, TempDest, String) {
    let db = TestDb::new().await;
    orders_like(&db).await;
    let dest = TempDest::new();
    let url = dest.url();
    (db, dest, url)
}

/// Walks every step of one commit × {error, stop, stop after the call}: `setup` makes
/// the lake the job commits into (a template copied per case) and `change` the source's
/// rows before the job runs; after the faulted run, a resume of the same job must
/// finish it (the new table, complete); readers are checked after the fault and after
/// the recovery.
async fn walk(
    db: &TestDb,
    template: &TempDest,
    job: &str,
    extra: &[&str],
    prev: Option<Digest>,
    new: Digest,
) {
    let counted = copy_lake(&template.0);
    let counts = count_calls(db, &counted.url(), job, extra, &[]);
    assert!(counts.iter().any(|(k, _)| k == "rename"), "{counts:?}");
    let mut cases = Vec::new();
    for (kind, count) in &counts {
        for n in 1..=*count {
            for mode in modes(kind) {
                let name = format!("{kind}:{n}:{mode}");
                let dest = copy_lake(&template.0);
                let url = dest.url();
                let out = run_job(db, &url, job, extra, &[("HAUL_FAULT_STORE", &name)]);
                let code = out.status.code();
                match *mode {
                    // a transient failure of one call: the commit is tried again
                    "error" => assert_eq!(code, Some(0), "{name}: {}", stderr(&out)),
                    _ => assert_eq!(code, Some(86), "{name}: {}", stderr(&out)),
                }
                // a copy of the lake as the fault left it: log readers see one table
                let left = copy_lake(&dest.0);
                cases.push(Case {
                    name: format!("{name} (as left)"),
                    table: left.0.join("t"),
                    // before a first export: no table, or the empty one its log's
                    // version 0 creates
                    allowed: match prev {
                        Some(p) => vec![Some(p), Some(new)],
                        None => vec![None, Some([0, 0, 0]), Some(new)],
                    },
                    _dest: left,
                });
                // the job run again finishes it
                let again = resume(db, &url, job);
                assert_success(&again);
                cases.push(Case {
                    name: format!("{name} (recovered)"),
                    table: dest.0.join("t"),
                    allowed: vec![Some(new)],
                    _dest: dest,
                });
            }
        }
    }
    // the "as left" cases: only the log reader is bound (a stopped commit may have
    // published parts a glob reader sees until recovery)
    let (left, recovered): (Vec<Case>, Vec<Case>) = cases
        .into_iter()
        .partition(|c| c.name.ends_with("(as left)"));
    check_cases(&recovered);
    let seen = read_tables(&left.iter().map(|c| c.table.clone()).collect::<Vec<_>>());
    for (c, (delta, _)) in left.iter().zip(seen) {
        let d: Option<Digest> = serde_json::from_value(delta.clone()).ok();
        assert!(
            c.allowed.contains(&d) || (delta.is_null() && c.allowed.contains(&None)),
            "{}: the log reader saw {delta}, allowed {:?}",
            c.name,
            c.allowed
        );
    }
}

/// A first export, every commit step failed and stopped: the resume commits it.
#[tokio::test]
async fn every_step_of_a_first_export_commit_recovers() {
    let db = TestDb::new().await;
    orders_like(&db).await;
    let template = TempDest::new();
    let new = pg_digest(&db, "").await;
    walk(&db, &template, "first", &[], None, new).await;
}

/// An `--overwrite` of an older export, every commit step failed and stopped.
#[tokio::test]
async fn every_step_of_an_overwrite_commit_recovers() {
    let db = TestDb::new().await;
    orders_like(&db).await;
    let template = TempDest::new();
    assert_success(&run_job(&db, &template.url(), "before", &[], &[]));
    let prev = pg_digest(&db, "").await;
    db.exec("UPDATE t SET v = 'newer-' || id WHERE id % 3 = 0; DELETE FROM t WHERE id > 2900;")
        .await;
    let new = pg_digest(&db, "").await;
    assert_ne!(prev, new);
    walk(&db, &template, "replace", &["--overwrite"], Some(prev), new).await;
}

/// An increment on top of a first one, every commit step failed and stopped.
#[tokio::test]
async fn every_step_of_an_increment_commit_recovers() {
    let db = TestDb::new().await;
    orders_like(&db).await;
    let template = TempDest::new();
    let inc = ["--incremental", "updated_at", "--lag-secs", "0"];
    assert_success(&run_job(&db, &template.url(), "inc-1", &inc, &[]));
    let prev = pg_digest(&db, "").await;
    db.exec(
        "INSERT INTO t SELECT g, 'old-' || g, date '2024-01-03', clock_timestamp()
         FROM generate_series(3001, 4000) g;",
    )
    .await;
    let new = pg_digest(&db, "").await;
    walk(&db, &template, "inc-2", &inc, Some(prev), new).await;
}

/// What both readers see of `table`, asserting they agree.
fn table_digest(table: &Path) -> Option<Digest> {
    let (delta, glob) = read_tables(&[table.to_path_buf()]).remove(0);
    let d: Option<Digest> = serde_json::from_value(delta.clone()).ok();
    let g: Digest = serde_json::from_value(glob.clone()).unwrap();
    assert_eq!(
        g,
        d.unwrap_or([0, 0, 0]),
        "log reader {delta}, glob reader {glob}"
    );
    assert!(d.is_some() || delta.is_null(), "log reader {delta}");
    d
}

/// Makes the partition folder `dt=<day>` of table `t` a file, so publishing a part
/// there fails (as an object store that is down would), until [`unblock`].
fn block(dest: &TempDest, day: &str) -> PathBuf {
    let p = dest.0.join("t").join(format!("dt={day}"));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, b"in the way").unwrap();
    p
}

fn unblock(p: &Path) {
    std::fs::remove_file(p).unwrap();
}

/// Regression: an increment whose publishing failed moved the table's window anyway,
/// its manifest listed files that did not exist, and the next increment "succeeded"
/// with nothing.
#[tokio::test]
async fn a_failed_increment_moves_no_window() {
    let (db, dest, url) = orders_lake().await;
    let inc = ["--incremental", "updated_at"];
    assert_success(&run_job(&db, &url, "inc-1", &inc, &[]));
    let first = pg_digest(&db, "").await;
    db.exec(
        "INSERT INTO t SELECT g, 'late-' || g, date '2024-01-05', clock_timestamp()
         FROM generate_series(3001, 3350) g;",
    )
    .await;
    let blocker = block(&dest, "2024-01-05");
    let out = run_job(&db, &url, "inc-2", &inc, &[]);
    assert!(!out.status.success(), "the increment cannot publish");
    unblock(&blocker);
    // the table is the first increment, to both readers; its window has not moved
    assert_eq!(table_digest(&dest.0.join("t")), Some(first));
    let lake = haul_shared::lake::Dest::open(&url, false).unwrap();
    let now = haul_shared::lake::table::read(&lake, "t").await.unwrap();
    assert_eq!(now.job.as_deref(), Some("inc-1"));
    // the failed one resumes, and the table then holds every row
    assert_success(&resume(&db, &url, "inc-2"));
    assert_eq!(
        table_digest(&dest.0.join("t")),
        Some(pg_digest(&db, "").await)
    );
    // the next one follows on, with nothing new
    assert_success(&run_job(&db, &url, "inc-3", &inc, &[]));
    assert_eq!(
        table_digest(&dest.0.join("t")),
        Some(pg_digest(&db, "").await)
    );
}

/// Regression: tables of one name in two schemas shared a folder (an increment of one
/// was taken as the other's next); two tables whose folder names collide are refused.
#[tokio::test]
async fn one_name_in_two_schemas_are_two_tables() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE SCHEMA sales; CREATE SCHEMA archive;
         CREATE TABLE sales.t (id bigint PRIMARY KEY, v text, updated_at timestamptz NOT NULL);
         CREATE TABLE archive.t (LIKE sales.t INCLUDING ALL);
         INSERT INTO sales.t SELECT g, 's' || g, now() - interval '1 hour' FROM generate_series(1, 700) g;
         INSERT INTO archive.t SELECT g, 'a' || g, now() - interval '1 hour' FROM generate_series(1, 900) g;
         CREATE TABLE \"x y\" (id bigint PRIMARY KEY); CREATE TABLE x_y (id bigint PRIMARY KEY);
         INSERT INTO x_y VALUES (1), (2);",
    )
    .await;
    let dest = TempDest::new();
    let url = dest.url();
    for (table, job) in [("sales.t", "s1"), ("archive.t", "a1")] {
        let out = haul(
            &[
                "run",
                "--source",
                &db.dsn,
                "--table",
                table,
                "--dest",
                &url,
                "--job-id",
                job,
                "--incremental",
                "updated_at",
                "--progress",
                "none",
            ],
            &[],
        );
        assert_success(&out);
    }
    assert_same(&db.client, "sales.t", &dest.0.join("sales.t")).await;
    assert_same(&db.client, "archive.t", &dest.0.join("archive.t")).await;
    // `x y` and x_y both clean to the folder x_y: the second is refused, the first kept
    let plain = |table: &str, job: &str| {
        haul(
            &[
                "run",
                "--source",
                &db.dsn,
                "--table",
                table,
                "--dest",
                &url,
                "--job-id",
                job,
                "--progress",
                "none",
            ],
            &[],
        )
    };
    assert_success(&plain("x_y", "xy1"));
    let out = plain("\"x y\"", "xy2");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("holds") && err.contains("public.x_y") && err.contains("public.x y"),
        "{err}"
    );
    assert_same(&db.client, "x_y", &dest.0.join("x_y")).await;
}

/// Regression: resuming an old job after a newer one succeeded replaced the newer
/// export (and mixed two snapshots) without --overwrite.
#[tokio::test]
async fn a_resume_never_replaces_a_newer_export_unasked() {
    let (db, dest, url) = orders_lake().await;
    let blocker = block(&dest, "2024-01-02");
    assert!(!run_job(&db, &url, "a1", &[], &[]).status.success());
    unblock(&blocker);
    assert_success(&run_job(&db, &url, "b1", &[], &[]));
    db.exec("UPDATE t SET v = 'newer-' || id").await;
    let b1 = table_digest(&dest.0.join("t"));
    let out = resume(&db, &url, "a1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("b1") && err.contains("--overwrite"), "{err}");
    assert_eq!(table_digest(&dest.0.join("t")), b1, "b1's export untouched");
    // asked for, it replaces it
    let args = [
        "run",
        "--source",
        &db.dsn,
        "--dest",
        &url,
        "--resume",
        "a1",
        "--fresh-snapshot",
        "--overwrite",
        "--progress",
        "none",
    ];
    assert_success(&haul(&args, &[]));
    let a1 = table_digest(&dest.0.join("t")).unwrap();
    assert_eq!(a1[0], 3000);
}

/// Regression: an --overwrite whose publishing failed left its parts beside the
/// previous export, so glob readers saw both.
#[tokio::test]
async fn a_failed_overwrite_leaves_the_previous_export_alone() {
    let (db, dest, url) = orders_lake().await;
    db.exec("UPDATE t SET d = date '2024-01-01'").await;
    assert_success(&run_job(&db, &url, "old", &[], &[]));
    let old = pg_digest(&db, "").await;
    db.exec("UPDATE t SET d = date '2024-01-01' + (id % 2)::int, v = 'new-' || id")
        .await;
    let blocker = block(&dest, "2024-01-02");
    assert!(
        !run_job(&db, &url, "new", &["--overwrite"], &[])
            .status
            .success()
    );
    unblock(&blocker);
    assert_eq!(table_digest(&dest.0.join("t")), Some(old));
    assert_success(&resume(&db, &url, "new"));
    assert_eq!(
        table_digest(&dest.0.join("t")),
        Some(pg_digest(&db, "").await)
    );
}

/// Two --overwrite jobs planned against the same export commit at once: one wins, the
/// other is refused and leaves nothing behind; readers see the winner's export whole.
#[tokio::test]
async fn two_overwrites_racing_commit_one() {
    let (db, dest, url) = orders_lake().await;
    assert_success(&run_job(&db, &url, "base", &[], &[]));
    let spawn = |job: &str| {
        spawn_job(
            &db,
            &url,
            job,
            &["--overwrite"],
            &[("HAUL_FAULT_CHUNK_DELAY_MS", "1500")],
        )
    };
    let (a, b) = (spawn("race-a"), spawn("race-b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let won = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "a: {}\nb: {}", stderr(&a), stderr(&b));
    let loser = if a.status.success() { &b } else { &a };
    assert!(
        stderr(loser).contains("has since been committed"),
        "{}",
        stderr(loser)
    );
    assert_eq!(
        table_digest(&dest.0.join("t")),
        Some(pg_digest(&db, "").await)
    );
}

/// `haul gc --delete --older-than 0` while a commit is publishing takes the commit for
/// abandoned and rolls it back; the committer then finds its attempt aborted and
/// commits again, so the job still ends with the table whole.
#[tokio::test]
async fn gc_during_a_commit_loses_nothing() {
    let (db, dest, url) = orders_lake().await;
    let child = spawn_job(
        &db,
        &url,
        "slow",
        &[],
        &[
            ("HAUL_FAULT_STORE", "rename:3:pause"),
            ("HAUL_FAULT_PAUSE_MS", "4000"),
        ],
    );
    let intent = dest.0.join("_haul/intents/t/slow.json");
    let t0 = std::time::Instant::now();
    while !intent.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "no intent"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let gc = haul(&["gc", &url, "--delete", "--older-than", "0"], &[]);
    assert_success(&gc);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    assert_eq!(
        table_digest(&dest.0.join("t")),
        Some(pg_digest(&db, "").await)
    );
    // and a gc now finds nothing of the table's to collect
    let gc = haul(&["gc", &url, "--older-than", "0", "--json"], &[]);
    assert_success(&gc);
    let report: Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert_eq!(report["objects"], json!([]), "{report}");
}

/// A long series of increments: the log gets checkpoints (reading it stays bounded),
/// glob readers of `**/part-*.parquet` never read a checkpoint as data, delta-rs reads
/// the table through the checkpoint, and `_manifest.json` does not grow with the series.
#[tokio::test]
async fn a_long_series_of_increments_is_checkpointed() {
    let (db, dest, url) = orders_lake().await;
    let inc = ["--incremental", "updated_at"];
    let mut sizes = Vec::new();
    for i in 1..=11 {
        db.exec(&format!(
            "INSERT INTO t SELECT g, 'i{i}-' || g, date '2024-02-01' + {i}, clock_timestamp()
             FROM generate_series(10000 * {i}, 10000 * {i} + 99) g;"
        ))
        .await;
        assert_success(&run_job(&db, &url, &format!("inc-{i}"), &inc, &[]));
        sizes.push(
            std::fs::metadata(dest.0.join("t/_manifest.json"))
                .unwrap()
                .len(),
        );
    }
    assert!(
        dest.0
            .join("t/_delta_log/00000000000000000010.checkpoint.parquet")
            .exists()
    );
    assert!(dest.0.join("t/_delta_log/_last_checkpoint").exists());
    assert_eq!(
        table_digest(&dest.0.join("t")),
        Some(pg_digest(&db, "").await)
    );
    // a reader through the checkpoint alone: the log's state read back by haul too
    let lake = haul_shared::lake::Dest::open(&url, false).unwrap();
    let now = haul_shared::lake::table::read(&lake, "t").await.unwrap();
    assert_eq!(now.base.seq, 11);
    assert_eq!(
        now.files.iter().map(|f| f.rows).sum::<u64>(),
        3000 + 11 * 100
    );
    assert!(sizes[10] < sizes[1] + 2048, "the manifest grew: {sizes:?}");
    // delta-rs's time travel shows each job as one version
    let script = format!(
        "import deltalake; t = deltalake.DeltaTable('{}'); print(t.version(), [h.get('operation') for h in t.history()][:2])",
        dest.0.join("t").display()
    );
    let out = Command::new(test_python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_success(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.starts_with("11 "), "{s}");
}

/// Every object under `from` copied under `to` (server-side).
async fn copy_prefix(store: &dyn object_store::ObjectStore, from: &str, to: &str) {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let metas: Vec<_> = store
        .list(Some(&object_store::path::Path::from(from)))
        .try_collect()
        .await
        .unwrap();
    for m in metas {
        let rel = m.location.as_ref().strip_prefix(from).unwrap();
        let dst = object_store::path::Path::from(format!("{to}{rel}"));
        store.copy(&m.location, &dst).await.unwrap();
    }
}

/// The objects under `prefix`, downloaded into a local folder of the same shape.
async fn mirror(store: &dyn object_store::ObjectStore, prefix: &str) -> TempDest {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let local = TempDest::new();
    let metas: Vec<_> = store
        .list(Some(&object_store::path::Path::from(prefix)))
        .try_collect()
        .await
        .unwrap();
    for m in metas {
        let rel = m
            .location
            .as_ref()
            .strip_prefix(prefix)
            .unwrap()
            .trim_start_matches('/');
        let p = local.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    local
}

/// An `--overwrite` on S3 (the suite's SeaweedFS: copies, conditional creates and
/// deletes as S3 makes them), every commit step stopped (before the call, and after it
/// for the conditional create and the copies) and resumed: readers of the table then
/// see the new export whole.
#[tokio::test]
async fn every_step_of_an_overwrite_commit_on_s3_recovers() {
    let bucket = "haul-test";
    ensure_bucket(bucket);
    let s3 = store(bucket);
    let root = unique("commit-walk");
    let db = TestDb::new().await;
    orders_like(&db).await;
    let url = |p: &str| format!("s3://{bucket}/{root}/{p}");
    assert_success(&run_job(&db, &url("base"), "before", &[], &S3_ENV));
    db.exec("UPDATE t SET v = 'newer-' || id WHERE id % 3 = 0; DELETE FROM t WHERE id > 2900;")
        .await;
    let new = pg_digest(&db, "").await;
    copy_prefix(
        s3.as_ref(),
        &format!("{root}/base"),
        &format!("{root}/counted"),
    )
    .await;
    let counts = count_calls(&db, &url("counted"), "replace", &["--overwrite"], &S3_ENV);
    let mut cases = Vec::new();
    for (kind, count) in &counts {
        for n in 1..=*count {
            for mode in modes(kind).iter().filter(|m| **m != "error") {
                let name = format!("{kind}:{n}:{mode}");
                let case = format!("case-{}", name.replace(':', "-"));
                copy_prefix(
                    s3.as_ref(),
                    &format!("{root}/base"),
                    &format!("{root}/{case}"),
                )
                .await;
                let env = [&S3_ENV[..], &[("HAUL_FAULT_STORE", name.as_str())]].concat();
                let out = run_job(&db, &url(&case), "replace", &["--overwrite"], &env);
                assert_eq!(out.status.code(), Some(86), "{name}: {}", stderr(&out));
                assert_success(&resume_env(&db, &url(&case), "replace", &S3_ENV));
                let local = mirror(s3.as_ref(), &format!("{root}/{case}")).await;
                cases.push(Case {
                    name,
                    table: local.0.join("t"),
                    allowed: vec![Some(new)],
                    _dest: local,
                });
            }
        }
    }
    check_cases(&cases);
    // the walk's objects go
    use futures::TryStreamExt;
    let metas: Vec<_> = s3
        .list(Some(&object_store::path::Path::from(root.as_str())))
        .try_collect()
        .await
        .unwrap();
    for m in metas {
        let _ = object_store::ObjectStoreExt::delete(s3.as_ref(), &m.location).await;
    }
}

/// A lake an older haul wrote (`_manifest.json` only, no log) is taken over by its next
/// commit: a series of increments goes on from its high mark, and the log then holds
/// every increment's parts.
#[tokio::test]
async fn a_lake_without_a_log_is_taken_over() {
    let (db, dest, url) = orders_lake().await;
    let inc = ["--incremental", "updated_at"];
    assert_success(&run_job(&db, &url, "old-1", &inc, &[]));
    // as an older haul left it: no log, the table's manifest listing the increments
    std::fs::remove_dir_all(dest.0.join("t/_delta_log")).unwrap();
    let p = dest.0.join("t/_manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("table_version");
    m["increments"] = json!(["old-1"]);
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();

    db.exec(
        "INSERT INTO t SELECT g, 'next-' || g, date '2024-01-04', clock_timestamp()
         FROM generate_series(3001, 3500) g;",
    )
    .await;
    let out = run_job(&db, &url, "new-2", &inc, &[]);
    assert_success(&out);
    assert_eq!(
        table_digest(&dest.0.join("t")),
        Some(pg_digest(&db, "").await)
    );
    let jobs = haul(&["ls", &url, "--json"], &[]);
    assert_success(&jobs);
    let states: Vec<(String, String)> = String::from_utf8_lossy(&jobs.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["job_id"].as_str().unwrap().to_owned(),
                v["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&("old-1".into(), "committed".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&("new-2".into(), "committed".into())),
        "{states:?}"
    );
}

/// Benchmark, not a test (`bench/commit-cost.sh` runs it): what a table commit costs as
/// a series of increments grows to 1,000 (local disk), with a checkpoint every 10
/// versions. Prints the commit time at a few points of the series.
#[tokio::test]
#[ignore]
async fn bench_commit_cost_over_a_long_series() {
    use haul_shared::JobId;
    use haul_shared::jobs::Window;
    use haul_shared::lake::table::{self, TableCommit, TableIdentity};
    use haul_shared::lake::{Dest, JobManifest, PartFile};
    let n: u64 = std::env::var("HAUL_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dest = TempDest::new();
    let lake = Dest::open(&dest.url(), false).unwrap();
    let schema = arrow_schema::Schema::new(vec![arrow_schema::Field::new(
        "id",
        arrow_schema::DataType::Int64,
        false,
    )]);
    let mut high: Option<String> = None;
    let mut times = Vec::new();
    for i in 1..=n {
        let job = JobId::parse(&format!("inc-{i}")).unwrap();
        let staged = format!("_haul/staging/{job}/000000/1-x/part-{job}-000000-0000.parquet");
        let path = format!("t/part-{job}-000000-0000.parquet");
        let p = dest.0.join(&staged);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let window = Window {
            column: "updated_at".into(),
            pg_type: "timestamptz".into(),
            low: high.clone(),
            high: format!("2024-01-01 00:00:00+00 {i:06}"),
        };
        let manifest = JobManifest {
            job: job.clone(),
            table: "public.t".into(),
            source: "dbname=bench".into(),
            snapshot: None,
            columns: Vec::new(),
            partition_by: None,
            chunks: 1,
            rows: 100,
            bytes: 4096,
            files: vec![PartFile {
                path,
                staged,
                rows: 100,
                bytes: 4096,
                partition: String::new(),
            }],
            started_at: String::new(),
            finished_at: String::new(),
            watermark: Some(window.clone()),
            increments: Vec::new(),
            table_version: None,
        };
        let base = table::read(&lake, "t").await.unwrap().base;
        let t0 = std::time::Instant::now();
        table::commit(
            &lake,
            TableCommit {
                job: &job,
                table_dir: "t",
                identity: TableIdentity {
                    database: "bench".into(),
                    schema: "public".into(),
                    table: "t".into(),
                },
                window: Some(&window),
                base: &base,
                schema: &schema,
                partition_field: None,
                manifest,
            },
        )
        .await
        .unwrap();
        times.push(t0.elapsed());
        high = Some(window.high.clone());
    }
    let at = |k: usize| {
        // the median of the 9 commits around the k-th
        let lo = k.saturating_sub(5).min(times.len() - 1);
        let mut w: Vec<_> = times[lo..(lo + 9).min(times.len())].to_vec();
        w.sort();
        w[w.len() / 2]
    };
    println!("table commit, local disk, one part per increment (median of 9 around each):");
    for k in [1usize, 10, 100, 500, n as usize] {
        if k <= times.len() {
            println!("  increment {k:>5}: {:>7.2} ms", at(k).as_secs_f64() * 1e3);
        }
    }
    let now = table::read(&lake, "t").await.unwrap();
    assert_eq!(now.base.seq, n);
    assert_eq!(now.files.len() as u64, n);
}
