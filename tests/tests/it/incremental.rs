//! Incremental extraction: each increment reads the rows whose watermark moved past the
//! last committed one's, a row whose transaction commits after an increment's snapshot
//! lands in a later increment (never skipped), and the table's log holds every
//! increment's files.

use haul_coordinator::RunError;
use haul_shared::JobId;
use haul_shared::jobs::Incremental;
use haul_shared::lake::JobManifest;

use crate::harness::*;

fn increment(db: &TestDb, dest: &TempDest, job: &str) -> haul::embedded::RunOptions {
    let mut o = options(&db.dsn, "ev", dest);
    o.spec.incremental = Some(Incremental {
        column: "updated_at".into(),
        lag_secs: 0,
    });
    o.spec.chunk_rows = 1000;
    o.job_id = Some(JobId::parse(job).unwrap());
    o
}

fn job_manifest(dest: &TempDest, job: &str) -> JobManifest {
    let p = dest.0.join(format!("_haul/jobs/{job}/_manifest.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// Asserts the increment's own files hold exactly the source rows in its window.
async fn assert_increment(db: &TestDb, dest: &TempDest, job: &str, rows: u64) -> JobManifest {
    let m = job_manifest(dest, job);
    assert_eq!(m.rows, rows, "{job}");
    let w = m
        .watermark
        .clone()
        .expect("an increment's manifest has its window");
    let batches = batches_from_bytes(
        m.files
            .iter()
            .map(|f| bytes::Bytes::from(std::fs::read(dest.0.join(&f.path)).unwrap()))
            .collect(),
    );
    if rows > 0 {
        let window = format!("(SELECT * FROM ev WHERE {}) w", w.predicate());
        assert_same_batches(&db.client, &window, &batches).await;
    } else {
        assert!(batches.iter().all(|b| b.num_rows() == 0));
    }
    m
}

#[tokio::test]
async fn increments_follow_on_and_late_commits_are_not_skipped() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE ev (id bigint PRIMARY KEY, v text, updated_at timestamptz NOT NULL);
         INSERT INTO ev SELECT g, 'v' || g, now() - interval '1 day' + g * interval '1 second'
         FROM generate_series(1, 5000) g;
         ANALYZE ev;",
    )
    .await;
    let dest = TempDest::new();

    // the first increment: everything up to now
    let s = run(increment(&db, &dest, "inc-1")).await.unwrap();
    assert_eq!(s.rows, 5000);
    assert!(s.chunks >= 2, "{} chunks", s.chunks);
    let m1 = assert_increment(&db, &dest, "inc-1", 5000).await;
    assert_eq!(m1.watermark.as_ref().unwrap().low, None);

    // changes committed before the second increment: 300 updates, 200 inserts
    db.exec(
        "UPDATE ev SET v = v || '!', updated_at = now() WHERE id <= 300;
         INSERT INTO ev SELECT g, 'new', now() FROM generate_series(5001, 5200) g;",
    )
    .await;
    // a writer whose transaction started before the second increment's snapshot and
    // commits after it: its row's watermark (its transaction's start) is older than that
    // snapshot's time, yet the increment cannot see it
    let late = connect(&db.dsn).await;
    late.batch_execute("BEGIN; INSERT INTO ev VALUES (100001, 'late', now())")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    run(increment(&db, &dest, "inc-2")).await.unwrap();
    let m2 = assert_increment(&db, &dest, "inc-2", 500).await;
    let w2 = m2.watermark.clone().unwrap();
    assert_eq!(w2.low, m1.watermark.as_ref().map(|w| w.high.clone()));

    late.batch_execute("COMMIT").await.unwrap();
    // the late row is in the next increment, alone
    run(increment(&db, &dest, "inc-3")).await.unwrap();
    let m3 = assert_increment(&db, &dest, "inc-3", 1).await;
    // nothing changed: an empty increment, and the window still moves on
    run(increment(&db, &dest, "inc-4")).await.unwrap();
    let m4 = assert_increment(&db, &dest, "inc-4", 0).await;
    assert_eq!(
        m4.watermark.unwrap().low,
        m3.watermark.as_ref().map(|w| w.high.clone())
    );

    // the table's log holds every increment's files; a glob reader sees them all
    let lake = haul_shared::lake::Dest::open(&dest.url(), false).unwrap();
    let (now, table) = haul_shared::lake::table::current(&lake, "ev")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.base.seq, 4, "four jobs in the log");
    assert_eq!(table.job.as_str(), "inc-4");
    assert_eq!(table.rows, 5501);
    assert_eq!(
        table.files.len(),
        [&m1, &m2, &m3].iter().map(|m| m.files.len()).sum::<usize>()
    );
    let all: usize = read_batches(&dest.0.join("ev"))
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(all, 5501);
    // the latest version of each row, taken from the increments, is the table
    let latest = db
        .client
        .query_one("SELECT count(*) FROM ev", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(latest, 5201);

    // regression: a committed increment's id reused (a fixed --job-id run nightly)
    // exported nothing and exited 0; it is refused, naming the window it holds
    let e = run(increment(&db, &dest, "inc-2")).await.unwrap_err();
    assert!(matches!(e, RunError::IncrementDone { .. }), "{e}");
    assert!(
        e.to_string().contains("each increment is a job of its own"),
        "{e}"
    );

    // bad input: a watermark that is not a timestamp, a full export's destination
    let mut bad = increment(&db, &dest, "inc-bad");
    bad.spec.incremental.as_mut().unwrap().column = "v".into();
    let e = run(bad).await.unwrap_err();
    assert!(matches!(e, RunError::OtherWatermark { .. }), "{e}");
    let fresh = TempDest::new();
    let mut bad = increment(&db, &fresh, "inc-bad");
    bad.spec.incremental.as_mut().unwrap().column = "v".into();
    let e = run(bad).await.unwrap_err().to_string();
    assert!(e.contains("the column has type text"), "{e}");
    let mut full = options(&db.dsn, "ev", &fresh);
    full.job_id = Some(JobId::parse("full").unwrap());
    run(full).await.unwrap();
    let e = run(increment(&db, &fresh, "inc-after-full"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds a full export"), "{e}");
}

#[tokio::test]
async fn increments_through_the_cluster() {
    let _broker = crate::harness::BROKER.write().await;
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE ev (id bigint PRIMARY KEY, v text, updated_at timestamp NOT NULL);
         INSERT INTO ev SELECT g, 'v' || g, now() AT TIME ZONE 'UTC' - interval '1 hour'
         FROM generate_series(1, 20000) g;
         ANALYZE ev;",
    )
    .await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &["--slots", "2"]);
    cl.wait_workers(1);
    let submit = |job: &str| -> Vec<String> {
        [
            "submit",
            "--source",
            &db.dsn,
            "--table",
            "public.ev",
            "--dest",
            dest.0.to_str().unwrap(),
            "--job-id",
            job,
            "--chunk-rows",
            "5000",
            "--incremental",
            "updated_at",
            "--lag-secs",
            "1",
            "--wait",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = submit("c-inc-1");
    cl.haul_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let m1 = assert_increment(&db, &dest, "c-inc-1", 20000).await;
    assert!(m1.chunks >= 2, "{} chunks", m1.chunks);
    db.exec("UPDATE ev SET v = 'changed', updated_at = now() AT TIME ZONE 'UTC' WHERE id % 10 = 0")
        .await;
    // the window stops a second (--lag-secs) before the snapshot
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let args = submit("c-inc-2");
    cl.haul_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let m2 = assert_increment(&db, &dest, "c-inc-2", 2000).await;
    let w = m2.watermark.unwrap();
    assert_eq!(w.pg_type, "timestamp");
    assert_eq!(w.low, m1.watermark.map(|w| w.high));
}

/// Regression: a transaction that began before an increment's snapshot but had not
/// written yet (no xid), then wrote `updated_at = now()` — its start — and committed
/// after the snapshot, fell below the next window: every job succeeded and the row was
/// never extracted. The window now ends before every open transaction's start.
#[tokio::test]
async fn a_transaction_that_had_not_written_yet_is_not_skipped() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE ev (id bigint PRIMARY KEY, v text, updated_at timestamptz NOT NULL);
         INSERT INTO ev SELECT g, 'v', now() - interval '1 hour' FROM generate_series(1, 100) g;",
    )
    .await;
    let dest = TempDest::new();
    // a session that began a transaction and read the clock, and writes later
    let late = connect(&db.dsn).await;
    late.batch_execute("BEGIN; SELECT now();").await.unwrap();
    run(increment(&db, &dest, "before-write")).await.unwrap();
    late.batch_execute(
        "INSERT INTO ev VALUES (1000, 'late', now()); UPDATE ev SET updated_at = now(), v = 'touched' WHERE id = 1; COMMIT;",
    )
    .await
    .unwrap();
    run(increment(&db, &dest, "after-write")).await.unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for job in ["before-write", "after-write"] {
        let m = job_manifest(&dest, job);
        let batches = batches_from_bytes(
            m.files
                .iter()
                .map(|f| bytes::Bytes::from(std::fs::read(dest.0.join(&f.path)).unwrap()))
                .collect(),
        );
        for b in &batches {
            let ids = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow_array::Int64Array>()
                .unwrap();
            let vs = b
                .column(1)
                .as_any()
                .downcast_ref::<arrow_array::StringArray>()
                .unwrap();
            for i in 0..b.num_rows() {
                seen.insert(ids.value(i), vs.value(i).to_owned());
            }
        }
    }
    assert_eq!(
        seen.get(&1000).map(String::as_str),
        Some("late"),
        "the insert was skipped"
    );
    assert_eq!(
        seen.get(&1).map(String::as_str),
        Some("touched"),
        "the update was skipped"
    );
    assert_eq!(seen.len(), 101);
}

/// Regression: a `timestamp without time zone` watermark written in local time (the
/// database's sessions default to another TimeZone) was taken as UTC: hours of rows fell
/// outside every window. It is refused, naming the zone and the fixes.
#[tokio::test]
async fn a_local_time_watermark_is_refused() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "ALTER DATABASE {} SET TimeZone = 'America/New_York'",
        haul_shared::pg::quote_ident(&db.name)
    ))
    .await;
    db.exec(
        "CREATE TABLE ev (id bigint PRIMARY KEY, v text, updated_at timestamp NOT NULL DEFAULT now());
         INSERT INTO ev (id, v) SELECT g, 'v' FROM generate_series(1, 10) g;",
    )
    .await;
    let dest = TempDest::new();
    let e = run(increment(&db, &dest, "local")).await.unwrap_err();
    assert!(matches!(e, RunError::LocalWatermark { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("America/New_York") && msg.contains("TYPE timestamptz"),
        "{msg}"
    );
    assert!(!dest.0.join("ev").exists(), "nothing written");
}
