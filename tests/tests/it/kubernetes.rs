//! What Kubernetes relies on, on real processes and services (no Kubernetes runs here):
//! the probes every role answers at its metrics address, workers scaled on the chunk
//! queue's depth the way KEDA does it (the test plays KEDA, see `harness::keda`), and a
//! rolling restart of every worker in the middle of a job.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Waits until `GET <path>` on `port` answers `status`; returns the body.
fn wait_for_answer(cl: &Cluster, port: u16, path: &str, status: u16) -> String {
    let t0 = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let (got, body) = http_get(port, path);
            if got == status {
                return body;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{path} on {port} still answers {got} {body}\n{}",
                cl.logs()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nothing listens on {port}:\n{}",
            cl.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn every_role_answers_its_probes_at_its_metrics_address() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let mut cl = Cluster::new(None);

    // the active coordinator
    assert_eq!(http_get(cl.metrics_port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(
        wait_for_answer(&cl, cl.metrics_port, "/readyz", 200),
        "active\n"
    );
    assert_eq!(
        sample(&scrape(cl.metrics_port), "haul_coordinator_active"),
        Some(1.0)
    );
    // a second one stands by: alive, and ready (it takes over when the lease frees, e.g.
    // a new pod finding the lease still held by the one it replaces), though it serves
    // no gRPC yet
    let standby_metrics = free_port();
    let mut standby = cl.spawn_coordinator(free_port(), standby_metrics, "standby");
    assert_eq!(
        wait_for_answer(&cl, standby_metrics, "/readyz", 200),
        "standby\n"
    );
    assert_eq!(http_get(standby_metrics, "/healthz").0, 200);
    assert_eq!(
        sample(&scrape(standby_metrics), "haul_coordinator_active"),
        Some(0.0)
    );
    reap(&mut standby);

    // a worker is ready once it consumes the chunk queue
    let wm = free_port();
    cl.start_worker("w1", &["--metrics-listen", &format!("127.0.0.1:{wm}")]);
    assert_eq!(wait_for_answer(&cl, wm, "/readyz", 200), "consuming\n");
    assert_eq!(http_get(wm, "/healthz").0, 200);
    assert_eq!(sample(&scrape(wm), "haul_worker_consuming"), Some(1.0));
    assert_eq!(
        sample(
            &scrape(cl.metrics_port),
            &format!("haul_queue_consumers{{queue=\"{}\"}}", cl.queue)
        ),
        Some(1.0),
        "the coordinator sees the worker consuming"
    );

    // a loader is ready while its target takes connections, and says why not otherwise
    let (lport, lm) = (free_port(), free_port());
    let mut loader = cl
        .command(&[
            "loader",
            "--listen",
            &format!("127.0.0.1:{lport}"),
            "--target",
            &db.dsn,
            "--metrics-listen",
            &format!("127.0.0.1:{lm}"),
        ])
        .stdout(cl.log_file("loader"))
        .stderr(cl.log_file("loader"))
        .spawn()
        .unwrap();
    assert_eq!(
        wait_for_answer(&cl, lm, "/readyz", 200),
        "target reachable\n"
    );
    assert_eq!(http_get(lm, "/healthz").0, 200);
    let admin = connect(&admin_dsn()).await;
    let set = |allow: bool| {
        format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
            haul_shared::pg::quote_ident(&db.name)
        )
    };
    admin.batch_execute(&set(false)).await.unwrap();
    let why = wait_for_answer(&cl, lm, "/readyz", 503);
    admin.batch_execute(&set(true)).await.unwrap();
    assert!(
        why.starts_with("target unreachable:")
            && why.contains("not currently accepting connections"),
        "{why}"
    );
    assert_eq!(
        wait_for_answer(&cl, lm, "/readyz", 200),
        "target reachable\n"
    );
    reap(&mut loader);
}

/// A skewed table of `rows` rows, a destination, and a cluster with no workers yet whose
/// chunks each take `chunk_ms` more (so that scaling and restarts find chunks in flight).
async fn backfill(rows: u64, chunk_ms: &str) -> (TestDb, TempDest, Cluster) {
    let db = TestDb::new().await;
    skewed(&db, rows).await;
    let cl = Cluster::with(None, None, &[("HAUL_FAULT_CHUNK_DELAY_MS", chunk_ms)]);
    (db, TempDest::new(), cl)
}

#[tokio::test]
async fn workers_scaled_on_queue_depth_finish_a_backfill_and_drain_on_scale_in() {
    let _broker = BROKER.write().await;
    let (db, dest, mut cl) = backfill(240_000, "2000").await;
    // k8s/base/worker-scaledobject.yaml's scaler, with seconds for minutes and 12 chunks a
    // worker (its `value` is 4), so that the first scale-ins come with many chunks left:
    // the queue's depth is up to 5 s old when read (RabbitMQ samples it every 5 s)
    let so = ScaledObject {
        min: 0,
        max: 4,
        value: 12.0,
        polling: Duration::from_millis(500),
        cooldown: Duration::from_secs(2),
        grace: Duration::from_secs(30),
    };
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "scaled",
        "5000",
    ));
    let (timeline, terminated) = autoscale(
        &mut cl,
        so,
        &["--drain-grace-secs", "25"],
        "scaled",
        Duration::from_secs(180),
    );
    if let Ok(path) = std::env::var("HAUL_TEST_TIMELINE") {
        std::fs::write(path, timeline_csv(&timeline)).unwrap();
    }
    eprintln!("{}", timeline_csv(&timeline));

    let status = cl.haul_ok(&["status", "scaled"]);
    assert!(status.contains("state:     succeeded"), "{status}");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    // a scale-in drains: the chunks in flight finish where they are
    let m = assert_no_chunk_redone(&dest, "scaled");
    assert!(m.len() >= 40, "{} chunks", m.len());
    // the workers grew with the queue and shrank as it emptied, to zero
    let peak = timeline.iter().map(|s| s.alive).max().unwrap();
    assert_eq!(peak, so.max, "{timeline:?}");
    assert!(
        terminated.len() >= so.max,
        "every worker was scaled in: {terminated:?}"
    );
    for t in &terminated {
        assert!(t.status.success(), "{} exited with {}", t.id, t.status);
        assert!(t.took < so.grace, "{} took {:?}", t.id, t.took);
    }
    // scale-ins came mid-job: a worker sent SIGTERM finished the chunk it was extracting
    // (committed after the signal, by that worker, under its first epoch: checked above)
    let finished_after_sigterm: Vec<_> = terminated
        .iter()
        .filter(|t| {
            m.iter().any(|c| {
                c.worker.0 == t.id
                    && chrono::DateTime::parse_from_rfc3339(&c.committed_at).unwrap() > t.signalled
            })
        })
        .map(|t| &t.id)
        .collect();
    assert!(
        !finished_after_sigterm.is_empty(),
        "no worker was scaled in with a chunk in flight: {terminated:?}\n{timeline:?}"
    );
    let workers_ran: std::collections::BTreeSet<_> = m.iter().map(|m| m.worker.0.clone()).collect();
    assert!(workers_ran.len() >= 2, "{workers_ran:?}");
}

#[tokio::test]
async fn a_rolling_restart_of_every_worker_mid_job_loses_no_chunk() {
    let _broker = BROKER.write().await;
    let (db, dest, mut cl) = backfill(200_000, "500").await;
    let grace = Duration::from_secs(30);
    let worker = |cl: &mut Cluster, id: &str| {
        let port = free_port();
        cl.start_worker(
            id,
            &[
                "--metrics-listen",
                &format!("127.0.0.1:{port}"),
                "--drain-grace-secs",
                "25",
            ],
        );
        port
    };
    let mut old = Vec::new();
    for id in ["w1", "w2", "w3"] {
        old.push((id.to_owned(), worker(&mut cl, id)));
    }
    cl.wait_workers(3);
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "rolled",
        "5000",
    ));
    cl.wait_chunks("rolled", "a committed chunk", committed_at_least(1))
        .await;
    // the coordinator holds the job's snapshot, and says for how long
    let series = r#"haul_job_snapshot_age_seconds{job="rolled"}"#;
    let age = sample(&scrape(cl.metrics_port), series);
    assert!(age.is_some_and(|a| a > 0.0), "{age:?}");
    // maxSurge 1, maxUnavailable 0: a new pod, ready, then an old one terminated
    for (i, (id, _)) in old.iter().enumerate() {
        let new = format!("r{}", i + 1);
        let port = worker(&mut cl, &new);
        wait_for_answer(&cl, port, "/readyz", 200);
        let t0 = Instant::now();
        cl.signal(id, "TERM");
        let st = cl.worker(id).wait().unwrap();
        assert!(st.success(), "{id} exited with {st}:\n{}", cl.logs());
        assert!(t0.elapsed() < grace, "{id} took {:?}", t0.elapsed());
    }
    let status = cl.haul_ok(&["watch", "rolled"]);
    assert!(status.contains("succeeded"), "{status}");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    let m = assert_no_chunk_redone(&dest, "rolled");
    // the ended job's snapshot is released (just after its end is recorded)
    let t0 = Instant::now();
    while sample(&scrape(cl.metrics_port), series).is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "snapshot still held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by: std::collections::BTreeSet<_> = m.iter().map(|m| m.worker.0.as_str()).collect();
    assert!(
        by.iter().any(|w| w.starts_with('w')) && by.iter().any(|w| w.starts_with('r')),
        "old and new workers both committed chunks: {by:?}"
    );
}
