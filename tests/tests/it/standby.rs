//! Extraction from a hot standby: scripts/test-services.sh keeps a streaming replica of
//! the main server on 127.0.0.1:5433 (`HAUL_STANDBY_PORT`).

use std::time::{Duration, Instant};

use crate::harness::*;

fn standby_dsn(db: &str) -> String {
    let port = std::env::var("HAUL_STANDBY_PORT").unwrap_or_else(|_| "5433".into());
    format!("postgresql://postgres@127.0.0.1:{port}/{db}")
}

/// Waits until the standby has replayed everything the primary (`db`) has written.
async fn caught_up(db: &TestDb) -> tokio_postgres::Client {
    let lsn: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let t0 = Instant::now();
    loop {
        if let Ok((client, conn)) =
            tokio_postgres::connect(&standby_dsn(&db.name), tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            let done: bool = client
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .await
                .unwrap()
                .get(0);
            if done {
                return client;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the standby did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A job against the standby reads every chunk from one snapshot exported there, and
/// its output equals the primary's table.
#[tokio::test]
async fn a_job_reads_a_hot_standby_from_one_snapshot() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text, at timestamptz);
         INSERT INTO t SELECT g, md5(g::text), '2026-01-01'::timestamptz + g * interval '1 s'
         FROM generate_series(1, 30000) g; ANALYZE t;",
    )
    .await;
    let standby = caught_up(&db).await;
    let in_recovery: bool = standby
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "port 5433 is not a standby");
    let dest = TempDest::new();
    let mut o = options(&standby_dsn(&db.name), "t", &dest);
    o.spec.chunk_rows = 5000;
    o.job_id = Some(haul_shared::JobId::parse("standby").unwrap());
    let summary = run(o).await.unwrap();
    assert_eq!(summary.rows, 30000);
    assert!(summary.chunks >= 4, "{} chunks", summary.chunks);
    let digest = assert_same(&db.client, "t", &dest.0.join("t")).await;
    assert_eq!(digest.rows, 30000);
    let plan: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dest.0.join("_haul/jobs/standby/plan.json")).unwrap(),
    )
    .unwrap();
    assert!(
        plan.pointer("/plan/snapshot")
            .is_some_and(|s| s.is_string()),
        "no snapshot in {plan}"
    );
}

/// Behind PgBouncer in transaction pooling (scripts/test-services.sh, 127.0.0.1:6432) the
/// session settings haul's text forms rely on and the session holding the snapshot would
/// be shared with other clients between transactions: refused before any data moves,
/// saying what to do.
#[tokio::test]
async fn a_source_behind_transaction_pooling_is_refused() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100);")
        .await;
    let dest = TempDest::new();
    let pooled = format!("postgresql://postgres@127.0.0.1:6432/{}", db.name);
    let err = run(options(&pooled, "t", &dest))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pool_mode=transaction") && err.contains("session mode"),
        "{err}"
    );
    assert!(parquet_files(&dest.0).is_empty(), "data moved");
    // the same table, straight from Postgres
    run(options(&db.dsn, "t", &dest)).await.unwrap();
}
