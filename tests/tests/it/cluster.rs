//! The cluster, as operators run it: a `haul coordinator` process and `haul worker`
//! processes over the real RabbitMQ, Redis and Postgres on this machine, driven by the
//! `haul` CLI. Each test has its own queue, Redis key prefix, database and destination.

use std::process::Command;
use std::time::{Duration, Instant};

use haul_shared::jobs::{ChunkState, JobStore};
use haul_shared::{ChunkId, JobId};

use crate::harness::*;

/// A database with the skewed table `t`, a destination, and a cluster with two one-slot
/// workers `w1` and `w2`, registered.
async fn two_workers_on_skewed(rows: u64, env: &[(&str, &str)]) -> (TestDb, TempDest, Cluster) {
    let db = TestDb::new().await;
    skewed(&db, rows).await;
    let dest = TempDest::new();
    let mut cl = Cluster::with(None, None, env);
    cl.start_worker("w1", &[]);
    cl.start_worker("w2", &[]);
    cl.wait_workers(2);
    (db, dest, cl)
}

fn running_on(
    worker: &str,
) -> impl Fn(&std::collections::BTreeMap<ChunkId, ChunkState>) -> Option<ChunkId> {
    let worker = worker.to_owned();
    move |s| {
        s.iter()
            .find(|(_, st)| matches!(st, ChunkState::Running { worker: w, .. } if w.0 == worker))
            .map(|(c, _)| *c)
    }
}

#[tokio::test]
async fn two_worker_processes_extract_a_skewed_million_rows() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    skewed(&db, 1_000_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(Some("s3cr3t-t0ken"));
    let (m1, m2) = (free_port(), free_port());
    let (m1s, m2s) = (format!("127.0.0.1:{m1}"), format!("127.0.0.1:{m2}"));
    cl.start_worker("w1", &["--slots", "2", "--metrics-listen", &m1s]);
    cl.start_worker("w2", &["--slots", "2", "--metrics-listen", &m2s]);
    cl.wait_workers(2);

    // (passwords: tls::a_cluster_reads_a_tls_source_without_ever_holding_its_password)
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "e2e", "100000");
    args.extend(["--partition-by", "at:day", "--wait"]);
    let out = cl.haul_ok(&args);
    assert!(out.contains("state:     succeeded"), "{out}");
    let digest = assert_same(&db.client, "t", &dest.0.join("t")).await;
    assert_eq!(digest.rows, 1_000_000);

    let jobs = cl.haul_ok(&["jobs"]);
    assert!(
        jobs.lines()
            .any(|l| l.starts_with("e2e ") && l.contains("succeeded") && l.contains("1000000")),
        "{jobs}"
    );
    let status = cl.haul_ok(&["status", "e2e"]);
    assert!(status.contains("rows:      1,000,000"), "{status}");
    // an ended job says how long it ran, and how fast
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("wall:      ") && l.contains(" rows/s, ")),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cl.haul_ok(&["status", "e2e", "--json"])).unwrap();
    let (submitted, finished) = (
        json["submitted_at_ms"].as_i64().unwrap(),
        json["finished_at_ms"].as_i64().unwrap(),
    );
    assert!(submitted > 0 && finished >= submitted, "{json}");
    assert_eq!(json["wall_ms"].as_i64(), Some(finished - submitted));
    let workers = cl.haul_ok(&["workers"]);
    let lines: Vec<_> = workers
        .lines()
        .filter(|l| l.starts_with("w1 ") || l.starts_with("w2 "))
        .collect();
    assert_eq!(lines.len(), 2, "{workers}");
    let chunks: u64 = lines
        .iter()
        .map(|l| l.split_whitespace().nth(4).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        chunks as usize,
        chunk_manifests(&dest, "e2e").len(),
        "{workers}"
    );
    for l in &lines {
        assert!(l.ends_with(" active") && l.contains(" 2 "), "{l}");
    }
    // Prometheus metrics on every role agree with the outcome
    let done: f64 = [m1, m2]
        .iter()
        .map(|p| sample(&scrape(*p), "haul_worker_chunks_done_total").unwrap())
        .sum();
    assert_eq!(done as u64, chunks);
    let read: f64 = [m1, m2]
        .iter()
        .map(|p| sample(&scrape(*p), "haul_worker_rows_read_total").unwrap())
        .sum();
    assert_eq!(read as u64, 1_000_000, "no row was read twice");
    let coord = scrape(cl.metrics_port);
    assert_eq!(
        sample(&coord, r#"haul_jobs{state="succeeded"}"#),
        Some(1.0),
        "{coord}"
    );
    assert_eq!(
        sample(&coord, r#"haul_workers{state="active"}"#),
        Some(2.0),
        "{coord}"
    );
    assert!(coord.contains("haul_queue_ready_messages{"), "{coord}");
    assert!(!cl.logs().contains("s3cr3t-t0ken"), "a log shows the token");

    // gRPC health is served without the token (probes use it); reflection, which
    // describes the API, only with it
    let ch = tonic::transport::Endpoint::from_shared(cl.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "haul.v1.Jobs".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    {
        use futures::StreamExt;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let list_services = |token: Option<&str>| {
            let mut req = tonic::Request::new(futures::stream::iter(vec![
                tonic_reflection::pb::v1::ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                },
            ]));
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            req
        };
        let refused = ServerReflectionClient::new(ch.clone())
            .server_reflection_info(list_services(None))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
        let mut replies = ServerReflectionClient::new(ch)
            .server_reflection_info(list_services(Some("s3cr3t-t0ken")))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            replies.next().await.unwrap().unwrap().message_response
        else {
            panic!("no service list from reflection");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for want in ["haul.v1.Jobs", "haul.v1.Admin", "haul.v1.Membership"] {
            assert!(names.iter().any(|n| n == want), "{names:?}");
        }
    }

    // the token is required
    let mut no_token = cl.command(&["jobs"]);
    no_token.env_remove("HAUL_TOKEN");
    let out = no_token.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bearer token"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_killed_worker_chunk_is_redone_by_the_other() {
    let _broker = BROKER.write().await;
    let (db, dest, mut cl) = two_workers_on_skewed(200_000, &[]).await;
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "killw",
        "20000",
    ));
    let chunk = cl
        .wait_chunks("killw", "a chunk on w1", running_on("w1"))
        .await;
    cl.worker("w1").kill().unwrap(); // SIGKILL, mid-chunk
    cl.worker("w1").wait().unwrap();

    cl.haul_ok(&["watch", "killw"]);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    let m = chunk_manifests(&dest, "killw");
    let redone = m.iter().find(|m| m.chunk == chunk).unwrap();
    assert_eq!(
        redone.worker.0, "w2",
        "the killed worker's chunk was committed by the other"
    );
    let first = m.iter().map(|m| m.epoch.0).min().unwrap();
    assert!(redone.epoch.0 > first, "under a new lease");
}

#[tokio::test]
async fn a_paused_zombie_worker_cannot_commit() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    skewed(&db, 200_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    // a short AMQP heartbeat, so the broker notices the frozen worker and redelivers
    let amqp = format!("{}?heartbeat=2", amqp_url());
    let zm = free_port();
    let zm_addr = format!("127.0.0.1:{zm}");
    cl.start_worker("zombie", &["--amqp", &amqp, "--metrics-listen", &zm_addr]);
    cl.start_worker("w2", &[]);
    cl.wait_workers(2);
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "zomb",
        "20000",
    ));
    let chunk = cl
        .wait_chunks("zomb", "a chunk on the zombie", running_on("zombie"))
        .await;
    cl.signal("zombie", "STOP");
    // its lease expires, the broker redelivers, and the other worker commits the chunk
    cl.wait_chunks("zomb", "the other worker to commit the chunk", move |s| {
        matches!(s.get(&chunk), Some(ChunkState::Committed { .. })).then_some(chunk)
    })
    .await;
    cl.signal("zombie", "CONT");
    cl.haul_ok(&["watch", "zomb"]);

    // the zombie finds its lease gone and cleans up after itself
    let t0 = Instant::now();
    while !cl.log_of("zombie").contains("lease") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the zombie never noticed:\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let staged = files_under(&dest.0.join("_haul/staging"));
    assert!(staged.is_empty(), "staging files left: {staged:?}");
    // its metrics say so: a lease lost at renewal, or refused at the commit's fence
    let z = scrape(zm);
    let lost = sample(&z, "haul_worker_leases_lost_total").unwrap()
        + sample(&z, "haul_worker_commit_conflicts_total").unwrap();
    assert!(lost >= 1.0, "{z}");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    let m = chunk_manifests(&dest, "zomb");
    let c = m.iter().find(|m| m.chunk == chunk).unwrap();
    assert_eq!(c.worker.0, "w2");
    let first = m.iter().map(|m| m.epoch.0).min().unwrap();
    assert!(c.epoch.0 > first, "under a new lease");
    assert!(
        cl.worker("zombie").try_wait().unwrap().is_none(),
        "the zombie crashed"
    );
}

/// A chunk whose failure looks transient (a serialization failure, 40001) but never goes
/// away is tried again after a backoff until `--retry-for` is spent, then fails the job
/// naming it, and its task goes to the dead-letter queue; the other chunks complete.
#[tokio::test]
async fn a_chunk_failing_transiently_past_retry_for_fails_and_is_dead_lettered() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    poisonable(&db, 50_000, 20_000, "40001").await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.start_worker("w2", &[]);
    cl.wait_workers(2);
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "poison", "5000");
    args.extend(["--cast", "v=poison_t", "--retry-for", "4s", "--wait"]);
    let out = cl.haul(&args);
    assert!(!out.status.success(), "a job with a poison chunk succeeded");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("poisoned row") && err.contains("--retry-for 4s"),
        "{err}"
    );

    let store = cl.store().await;
    let states = store
        .chunk_states(&JobId::parse("poison").unwrap())
        .await
        .unwrap();
    let failed: Vec<_> = states
        .iter()
        .filter(|(_, s)| matches!(s, ChunkState::Failed { .. }))
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(failed.len(), 1, "{states:?}");
    assert!(err.contains(&format!("chunk {}", failed[0])), "{err}");
    assert!(
        states
            .iter()
            .filter(|(c, _)| **c != failed[0])
            .all(|(_, s)| matches!(s, ChunkState::Committed { .. })),
        "the other chunks complete: {states:?}"
    );

    // exactly one dead letter, the poison chunk's task, seen by the coordinator and
    // listed by `haul dlq`
    let job = JobId::parse("poison").unwrap();
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead = store.dead_letters(&job).await.unwrap();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].chunk, failed[0]);
    let listed = cl.haul_ok(&["dlq", "list", "poison"]);
    assert!(
        listed.contains(&failed[0].to_string()) && listed.contains("poisoned row"),
        "{listed}"
    );
    let tries: usize = ["w1", "w2"]
        .iter()
        .map(|w| cl.log_of(w).matches("poisoned row").count())
        .sum();
    // 1 s then 2 s (each plus jitter) of backoff: two or three attempts in 4 s
    assert!((2..=4).contains(&tries), "{tries} attempts:\n{}", cl.logs());
    for w in ["w1", "w2"] {
        assert!(cl.worker(w).try_wait().unwrap().is_none(), "{w} crashed");
    }
}

#[tokio::test]
async fn a_drained_worker_finishes_its_chunk_and_exits_zero() {
    let _broker = BROKER.write().await;
    let (db, dest, mut cl) = two_workers_on_skewed(200_000, &[]).await;
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "drainj",
        "20000",
    ));
    let chunk = cl
        .wait_chunks("drainj", "a chunk on w1", running_on("w1"))
        .await;
    cl.haul_ok(&["drain", "w1", "--wait"]);
    let st = cl.worker("w1").wait().unwrap();
    assert!(st.success(), "drained worker exited with {st}");

    cl.haul_ok(&["watch", "drainj"]);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    let m = assert_no_chunk_redone(&dest, "drainj");
    let c = m.iter().find(|m| m.chunk == chunk).unwrap();
    assert_eq!(
        c.worker.0, "w1",
        "the in-flight chunk finished on the drained worker"
    );
    assert!(
        !cl.haul_ok(&["workers"]).contains("w1 "),
        "the drained worker deregistered"
    );

    // SIGTERM drains too (what Kubernetes sends): the idle worker leaves and exits 0
    cl.signal("w2", "TERM");
    let st = cl.worker("w2").wait().unwrap();
    assert!(st.success(), "SIGTERM-drained worker exited with {st}");
    assert!(cl.log_of("w2").contains("SIGTERM"));
}

#[tokio::test]
async fn the_job_survives_a_broker_connection_blip() {
    let _broker = BROKER.write().await;
    let (db, dest, mut cl) = two_workers_on_skewed(200_000, &[]).await;
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "blip",
        "10000",
    ));
    cl.wait_chunks("blip", "two committed chunks", committed_at_least(2))
        .await;
    let st = Command::new("rabbitmqctl")
        .args(["-q", "close_all_connections", "haul test: broker blip"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    cl.haul_ok(&["watch", "blip"]);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    for w in ["w1", "w2"] {
        assert!(
            cl.worker(w).try_wait().unwrap().is_none(),
            "{w} died with the connection"
        );
    }
}

#[tokio::test]
async fn a_restarted_coordinator_carries_on() {
    let _broker = BROKER.write().await;
    // chunks slowed down, so that the job runs while its coordinator dies
    let (db, dest, mut cl) =
        two_workers_on_skewed(200_000, &[("HAUL_FAULT_CHUNK_DELAY_MS", "700")]).await;

    // a second coordinator on the same Redis prefix stands by while the first is active;
    // it listens, and clients given both addresses use the active one, whichever is first
    let (mut standby, standby_url) = cl.start_standby();
    let both = format!("{standby_url},{}", cl.url);

    // asked alone, the standby says where the active coordinator is
    let out = cl
        .command(&["jobs"])
        .env("HAUL_COORDINATOR", &standby_url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "this coordinator is standing by; the active coordinator is {}",
            cl.url
        )),
        "{err}"
    );
    // without a snapshot, the job carries on under the new coordinator
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "restart1", "10000");
    args.push("--no-snapshot");
    let out = cl
        .command(&args)
        .env("HAUL_COORDINATOR", &both)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", cl.logs());
    assert!(
        cl.log_of("standby").contains("standing by"),
        "{}",
        cl.log_of("standby")
    );
    // a watcher given both addresses follows the job through the active one's death
    let watcher = cl
        .command(&["watch", "restart1"])
        .env("HAUL_COORDINATOR", &both)
        .env("HAUL_PROGRESS", "log")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cl.wait_chunks("restart1", "two committed chunks", committed_at_least(2))
        .await;
    cl.kill_coordinator();
    let killed = std::time::Instant::now();
    // the standby takes over once the dead one's lease expires
    cl.wait_active(&standby_url, "the standby");
    eprintln!(
        "the standby took over {:?} after the kill",
        killed.elapsed()
    );
    let out = watcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", cl.logs());
    assert!(err.contains("lost the coordinator"), "{err}");
    assert!(err.contains("following the job again"), "{err}");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    standby.kill().unwrap();
    standby.wait().unwrap();
    cl.start_coordinator();

    // with one, the snapshot died with the coordinator: the job fails saying how to
    // finish it, and finishes under a fresh snapshot
    let dest2 = TempDest::new();
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest2.0.to_str().unwrap(),
        "restart2",
        "10000",
    ));
    cl.wait_chunks("restart2", "two committed chunks", committed_at_least(2))
        .await;
    cl.kill_coordinator();
    cl.start_coordinator();
    let out = cl.haul(&["watch", "restart2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("--resume restart2 --fresh-snapshot"), "{err}");
    cl.finish_under_a_fresh_snapshot("restart2");
    assert_same(&db.client, "t", &dest2.0.join("t")).await;
}

/// A coordinator taking over serves at once, whatever the jobs it takes over: one whose
/// destination hangs (an S3 endpoint that accepts connections and never answers, as
/// behind a network partition) is taken over in the background, while `haul jobs`
/// answers and another job runs to the end.
#[tokio::test]
async fn a_takeover_is_not_held_up_by_a_job_whose_destination_hangs() {
    use haul_shared::jobs::{JobRecord, JobState};
    let _broker = BROKER.read().await;
    let hangs = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hangs.local_addr().unwrap());
    let env = [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "haul"),
        ("AWS_SECRET_ACCESS_KEY", "haul"),
    ];
    let (db, dest, mut cl) = two_workers_on_skewed(20_000, &env).await;
    let mut spec = options(&db.dsn, "t", &dest).spec;
    spec.dest = "s3://haul-hangs/lake".into();
    cl.store()
        .await
        .put_job(&JobRecord {
            id: JobId::parse("hangs").unwrap(),
            spec,
            plan: Some(one_chunk_plan(&db, "t", vec![], 20_000).await),
            state: JobState::Running,
            submitted_at: String::new(),
        })
        .await
        .unwrap();
    cl.kill_coordinator();
    // waits until `haul jobs` answers (a minute at most): the job's destination would
    // hold a takeover that waited for it for longer (object_store's retries)
    cl.start_coordinator();
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "other", "5000");
    args.push("--wait");
    cl.haul_ok(&args);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    let shown = cl.haul_ok(&["status", "hangs"]);
    assert!(shown.contains("state:     running"), "{shown}");
    drop(hangs);
}

#[tokio::test]
async fn pause_resume_and_cancel() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    skewed(&db, 100_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.wait_workers(1);

    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "pj",
        "5000",
    ));
    let paused = cl.haul_ok(&["pause", "pj"]);
    assert!(paused.contains("state:     paused"), "{paused}");
    assert!(
        paused.contains("held open for"),
        "the snapshot's age is shown: {paused}"
    );
    // the queued chunks are parked, not run
    cl.wait_chunks("pj", "parked chunks", |s| {
        s.iter()
            .find(|(_, st)| **st == ChunkState::Parked)
            .map(|(c, _)| *c)
    })
    .await;
    let store = cl.store().await;
    let id = JobId::parse("pj").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = store.chunk_states(&id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = store.chunk_states(&id).await.unwrap();
    let done = |s: &std::collections::BTreeMap<ChunkId, ChunkState>| {
        s.values()
            .filter(|st| matches!(st, ChunkState::Committed { .. }))
            .count()
    };
    assert_eq!(done(&before), done(&after), "chunks ran while paused");
    assert!(done(&after) < after.len());
    let out = cl.haul(&["pause", "pj"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only when running"),
        "{out:?}"
    );
    cl.haul_ok(&["resume", "pj"]);
    cl.haul_ok(&["watch", "pj"]);
    assert_same(&db.client, "t", &dest.0.join("t")).await;

    let dest2 = TempDest::new();
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest2.0.to_str().unwrap(),
        "cj",
        "5000",
    ));
    let c = cl.haul_ok(&["cancel", "cj"]);
    assert!(c.contains("state:     cancelled"), "{c}");
    // regression: a cancelled job kept showing its chunks "running" long after
    assert!(c.contains(" 0 running, 0 waiting"), "{c}");
    let out = cl.haul(&["watch", "cj"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    assert!(!dest2.0.join("t/_manifest.json").exists());
    assert!(cl.worker("w1").try_wait().unwrap().is_none());
    let _ = store.get_job(&id).await.unwrap();
}

#[tokio::test]
async fn tls_with_a_token() {
    let _broker = BROKER.write().await;
    let (certs, ca, cert, key) = test_certs();
    let tls = (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    );
    let mut cl = Cluster::with(Some("tls-t0ken"), Some(tls), &[]);
    let ca = ca.to_str().unwrap().to_owned();
    cl.start_worker("w1", &["--tls-ca", &ca]);
    let t0 = Instant::now();
    loop {
        let out = cl.haul(&["workers", "--tls-ca", &ca]);
        if String::from_utf8_lossy(&out.stdout).contains(" active") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no worker over TLS: {out:?}\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let db = TestDb::new().await;
    skewed(&db, 20_000).await;
    let dest = TempDest::new();
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "tlsjob", "5000");
    args.extend(["--wait", "--tls-ca", &ca]);
    cl.haul_ok(&args);
    assert_same(&db.client, "t", &dest.0.join("t")).await;

    // a client that does not trust the certificate is refused
    let out = cl.haul(&["jobs"]);
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&certs);
}

#[tokio::test]
async fn a_worker_killed_on_the_last_attempt_fails_the_job_instead_of_hanging_it() {
    let _broker = BROKER.write().await;
    // one attempt per chunk: a dead worker's task goes straight to the dead-letter queue
    let (db, dest, mut cl) = two_workers_on_skewed(200_000, &[("HAUL_MAX_ATTEMPTS", "1")]).await;
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "lastgo",
        "20000",
    ));
    let chunk = cl
        .wait_chunks("lastgo", "a chunk on w1", running_on("w1"))
        .await;
    cl.worker("w1").kill().unwrap();
    cl.worker("w1").wait().unwrap();

    let out = cl.haul(&["watch", "lastgo"]);
    assert!(
        !out.status.success(),
        "the job succeeded without chunk {chunk}"
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    // (the coordinator's dead-letter consumer, or its check of dead last attempts,
    // whichever sees it first)
    assert!(
        err.contains(&format!("chunk {chunk} failed"))
            && err.contains("dead-letter queue")
            && err.contains("w1"),
        "{err}"
    );
    let states = cl
        .store()
        .await
        .chunk_states(&JobId::parse("lastgo").unwrap())
        .await
        .unwrap();
    assert!(
        states
            .iter()
            .all(|(c, s)| *c == chunk || matches!(s, ChunkState::Committed { .. })),
        "the other chunks complete: {states:?}"
    );

    // finishing it redoes only that chunk, and the output is whole
    cl.finish_under_a_fresh_snapshot("lastgo");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

#[tokio::test]
async fn a_drain_can_hand_in_flight_chunks_back_without_spending_an_attempt() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    // chunks that take seconds: a domain check that sleeps on every 5000th row
    db.exec(
        "CREATE FUNCTION slow_check(bigint) RETURNS bool LANGUAGE plpgsql AS $$
         BEGIN
           IF $1 % 5000 = 0 THEN PERFORM pg_sleep(1); END IF;
           RETURN true;
         END $$;
         CREATE DOMAIN slow_t AS bigint CHECK (slow_check(VALUE));
         CREATE TABLE t (id bigint PRIMARY KEY, v bigint, note text);
         INSERT INTO t SELECT g, g, md5(g::text) FROM generate_series(1, 100000) g; ANALYZE t;",
    )
    .await;
    let dest = TempDest::new();
    // one attempt per chunk: a handed-back chunk that counted as a failed attempt would
    // go to the dead-letter queue and fail the job
    let mut cl = Cluster::with(None, None, &[("HAUL_MAX_ATTEMPTS", "1")]);
    cl.start_worker("w1", &[]);
    cl.start_worker("w2", &[]);
    cl.wait_workers(2);
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "handback", "20000");
    args.extend(["--cast", "v=slow_t"]);
    cl.haul_ok(&args);
    let chunk = cl
        .wait_chunks("handback", "a chunk on w1", running_on("w1"))
        .await;
    cl.haul_ok(&["drain", "w1", "--requeue-in-flight", "--wait"]);
    let st = cl.worker("w1").wait().unwrap();
    assert!(st.success(), "drained worker exited with {st}");

    cl.haul_ok(&["watch", "handback"]);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    let m = chunk_manifests(&dest, "handback");
    let c = m.iter().find(|m| m.chunk == chunk).unwrap();
    assert_eq!(
        c.worker.0, "w2",
        "the handed-back chunk was redone by the other worker"
    );
    assert!(
        cl.log_of("w1").contains("handing it back"),
        "{}",
        cl.log_of("w1")
    );
}

/// The cluster's twin of the embedded test in faults.rs: a chunk that fails for good (a
/// user error, so at once, no retries) lets the other chunks settle, the job fails naming
/// it, and `submit --resume` finishes it once its cause is gone.
#[tokio::test]
async fn a_chunk_failing_for_good_lets_the_others_settle_and_resume_finishes_it() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    poisonable(&db, 20_000, 10_000, "22023").await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.start_worker("w2", &[]);
    cl.wait_workers(2);
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "settle", "2000");
    args.extend(["--cast", "v=poison_t", "--wait"]);
    let out = cl.haul(&args);
    assert!(
        !out.status.success(),
        "a job with a failing chunk succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("poisoned row 10000"), "{err}");
    assert_one_chunk_failed(&err, &dest.0, "settle");
    let tries: usize = ["w1", "w2"]
        .iter()
        .map(|w| cl.log_of(w).matches("poisoned row").count())
        .sum();
    assert_eq!(tries, 1, "a user error is not retried:\n{}", cl.logs());

    db.exec("DELETE FROM poison").await;
    cl.finish_under_a_fresh_snapshot("settle");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

/// A database with a 20,000-row table `t`, and a submit of job `job` over it to `dest`
/// made while the broker is under a memory alarm (so the coordinator's first chunk task
/// waits for its confirm): once the job is planned, every broker connection is closed,
/// and the alarm lifted after `lift_after` (with `None`, only once the call has ended).
/// Returns the database and the call's outcome.
async fn submit_through_a_broker_blip(
    cl: &Cluster,
    dest: &TempDest,
    job: &str,
    lift_after: Option<Duration>,
) -> (
    TestDb,
    Result<tonic::Response<haul_shared::proto::wire::JobStatus>, tonic::Status>,
) {
    use haul_shared::proto::wire::{SubmitRequest, jobs_client::JobsClient};
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text);
         INSERT INTO t SELECT g, g::text FROM generate_series(1, 20000) g; ANALYZE t;",
    )
    .await;
    let mut client = JobsClient::connect(cl.url.clone()).await.unwrap();
    let req = SubmitRequest {
        source: db.dsn.clone(),
        table: "public.t".into(),
        dest: dest.0.to_str().unwrap().into(),
        job_id: job.into(),
        chunk_rows: 1000,
        ..Default::default()
    };
    let alarm = MemoryAlarm::raise();
    let call = tokio::spawn(async move { client.submit(req).await });
    let t0 = Instant::now();
    while !cl.log_of("coordinator").contains("planned") {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", cl.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    rabbitmqctl(&["close_all_connections", "haul test: a blip while queueing"]);
    if let Some(after) = lift_after {
        tokio::time::sleep(after).await;
        drop(alarm);
    }
    // the queue retries for 30 s, each publish waiting 10 s for its confirm
    let outcome = tokio::time::timeout(Duration::from_secs(90), call)
        .await
        .expect("the submit ended")
        .unwrap();
    (db, outcome)
}

/// A broker that cannot take a submitted job's chunks for longer than the queue's retry
/// window (its connections closed while it stays under a memory alarm: no confirm comes)
/// reaches the client as UNAVAILABLE with a retry hint (the queue's error keeps its class
/// all the way to the wire), the job is recorded as failed with the way to finish it, and
/// that way works.
#[tokio::test]
async fn a_broker_outage_while_queueing_reaches_the_client_as_unavailable() {
    let _broker = BROKER.write().await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    let (db, outcome) = submit_through_a_broker_blip(&cl, &dest, "outage", None).await;
    let status = outcome.expect_err("the submit failed");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("chunk queue")
            && status.message().contains(haul_shared::error::RETRY_HINT),
        "{status:?}"
    );
    let shown = cl.haul_ok(&["status", "outage"]);
    assert!(
        shown.contains("failed") && shown.contains("--resume outage --fresh-snapshot"),
        "{shown}"
    );

    cl.start_worker("w1", &[]);
    cl.wait_workers(1);
    cl.finish_under_a_fresh_snapshot("outage");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

/// A broker connection closed while a submitted job's chunks are being queued (as a
/// broker restarting, or closing a connection on an internal error, does) is ridden out:
/// the coordinator's publishes wait for the connection to come back and the job runs.
#[tokio::test]
async fn a_broker_blip_while_queueing_is_ridden_out() {
    let _broker = BROKER.write().await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.wait_workers(1);
    let (db, outcome) =
        submit_through_a_broker_blip(&cl, &dest, "blip-queueing", Some(Duration::from_secs(1)))
            .await;
    assert!(outcome.is_ok(), "{outcome:?}\n{}", cl.logs());
    assert!(
        cl.log_of("coordinator")
            .contains("publishing a chunk task failed; retrying"),
        "the blip did not reach the publishes:\n{}",
        cl.logs()
    );
    cl.haul_ok(&["watch", "blip-queueing"]);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

/// A job id submitted again after its job ended, to another destination, is refused
/// (issue 25; it was planned anew, and the coordinator's record of the first job was
/// replaced by the second's, so a later submit of the first printed the second): the
/// first job's record stays, and its export is untouched.
#[tokio::test]
async fn a_job_id_submitted_again_to_another_destination_is_refused() {
    let _broker = BROKER.read().await;
    let (db, first, cl) = two_workers_on_skewed(20_000, &[]).await;
    let mut args = submit_args(&db.dsn, first.0.to_str().unwrap(), "again", "2000");
    args.push("--wait");
    cl.haul_ok(&args);
    assert_same(&db.client, "t", &first.0.join("t")).await;

    let second = TempDest::new();
    let mut args = submit_args(&db.dsn, second.0.to_str().unwrap(), "again", "5000");
    args.push("--wait");
    let out = cl.haul(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("job id again is taken"), "{err}");
    assert!(parquet_files(&second.0).is_empty());
    let shown = cl.haul_ok(&["status", "again"]);
    assert!(shown.contains(first.0.to_str().unwrap()), "{shown}");
    // the same job again is still a no-op
    let mut args = submit_args(&db.dsn, first.0.to_str().unwrap(), "again", "2000");
    args.push("--wait");
    assert!(cl.haul_ok(&args).contains("state:     succeeded"));
}

/// Starts a job `job` of 4 chunks over `skewed` table `t` while a dead holder ("ghost")
/// holds chunk 0's lease, lets worker `w1` (one slot) take chunk 0 and wait out that
/// lease, and kills it there: with one delivery allowed, the task is dead-lettered while
/// the job store still says the chunk is pending. Returns the ghost's lease.
async fn dead_letter_a_pending_chunk(
    cl: &mut Cluster,
    db: &TestDb,
    dest: &TempDest,
    job: &str,
) -> haul_shared::lease::Lease {
    use haul_shared::lease::LeaseStore;
    let store = cl.store().await;
    let ghost = store
        .acquire(
            &format!("{job}/000000"),
            &haul_shared::WorkerId("ghost".into()),
            Duration::from_secs(600),
        )
        .await
        .unwrap()
        .expect("the chunk's lease is free");
    cl.start_worker("w1", &["--slots", "1"]);
    cl.wait_workers(1);
    cl.haul_ok(&submit_args(&db.dsn, dest.0.to_str().unwrap(), job, "5000"));
    let t0 = Instant::now();
    while !cl
        .log_of("w1")
        .contains("waiting for it to commit or let go")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "w1 never waited:\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cl.worker("w1").kill().unwrap();
    cl.worker("w1").wait().unwrap();
    ghost
}

/// Regression (issue 12): a chunk dead-lettered by the broker while the job store still
/// said it was pending or running (its redeliveries died while they waited out a dead
/// holder's lease) was never failed, and `submit --wait` waited forever. The coordinator
/// now consumes the dead-letter queue: the chunk fails, the job ends naming it, and
/// `haul dlq` lists it; requeueing an ended job's dead letters points to `--resume`, and
/// purging forgets them.
#[tokio::test]
async fn a_dead_lettered_pending_chunk_ends_its_job_instead_of_hanging_it() {
    use haul_shared::lease::LeaseStore;
    let _broker = BROKER.read().await;
    let db = TestDb::new().await;
    skewed(&db, 20_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::with(None, None, &[("HAUL_MAX_ATTEMPTS", "1")]);
    let ghost = dead_letter_a_pending_chunk(&mut cl, &db, &dest, "hang").await;
    cl.start_worker("w2", &[]);
    let out = cl.haul(&["watch", "hang"]);
    assert!(!out.status.success(), "the job succeeded without chunk 0");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("chunk 000000 failed") && err.contains("dead-letter queue"),
        "{err}"
    );
    let listed = cl.haul_ok(&["dlq", "list", "hang"]);
    assert!(
        listed.contains("1 chunk(s) dead-lettered") && listed.contains("000000"),
        "{listed}"
    );
    let out = cl.haul(&["dlq", "requeue", "hang"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("haul submit --resume hang --fresh-snapshot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cl.haul_ok(&["dlq", "purge", "hang"])
            .contains("1 chunk(s) forgotten")
    );
    assert!(cl.haul_ok(&["dlq", "list", "hang"]).contains("0 chunk(s)"));

    cl.store().await.release(&ghost).await.unwrap();
    cl.finish_under_a_fresh_snapshot("hang");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

/// `haul dlq requeue` gives a running job's dead-lettered chunks another go: the chunk
/// goes back to pending with a fresh task, and the job completes with every row.
#[tokio::test]
async fn dlq_requeue_gives_a_running_jobs_dead_letters_another_go() {
    use haul_shared::lease::LeaseStore;
    let _broker = BROKER.read().await;
    let db = TestDb::new().await;
    skewed(&db, 20_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::with(None, None, &[("HAUL_MAX_ATTEMPTS", "1")]);
    let ghost = dead_letter_a_pending_chunk(&mut cl, &db, &dest, "again").await;
    // no worker runs: the job is still running, its other chunks pending
    let t0 = Instant::now();
    loop {
        let listed = cl.haul_ok(&["dlq", "list", "again"]);
        if listed.contains("000000") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{listed}\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cl.store().await.release(&ghost).await.unwrap();
    assert!(
        cl.haul_ok(&["dlq", "requeue", "again"])
            .contains("1 chunk(s) queued again")
    );
    cl.start_worker("w2", &[]);
    cl.haul_ok(&["watch", "again"]);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    assert!(cl.haul_ok(&["dlq", "list", "again"]).contains("0 chunk(s)"));
}

/// Starts two workers whose chunks take 300 ms more, submits job `job` over `skewed`
/// table `t` in 1000-row chunks with `--wait`, and returns once 3 chunks are committed,
/// with the submit's exit status to come.
async fn slow_job_under_way(
    cl: &mut Cluster,
    db: &TestDb,
    dest: &TempDest,
    job: &str,
) -> tokio::task::JoinHandle<std::process::ExitStatus> {
    let slow = [("HAUL_FAULT_CHUNK_DELAY_MS", "300")];
    cl.start_worker_env("w1", &[], &slow);
    cl.start_worker_env("w2", &[], &slow);
    cl.wait_workers(2);
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), job, "1000");
    args.push("--wait");
    let mut submit = cl
        .command(&args)
        .stdout(cl.log_file("submit"))
        .stderr(cl.log_file("submit"))
        .spawn()
        .unwrap();
    wait_for_committed_chunks(dest, job, 3, || cl.logs()).await;
    tokio::task::spawn_blocking(move || submit.wait().unwrap())
}

/// Deletes every key of the cluster's prefix: what a FLUSHALL (or a failover to an empty
/// replica) does to it, without touching other tests' keys.
fn lose_redis_data(cl: &Cluster) {
    let out = Command::new("redis-cli")
        .args([
            "-u",
            &redis_url(),
            "--scan",
            "--pattern",
            &format!("{}*", cl.prefix),
        ])
        .output()
        .unwrap();
    let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(!keys.is_empty(), "the cluster has keys to lose");
    let st = Command::new("redis-cli")
        .args(["-u", &redis_url(), "DEL"])
        .args(&keys)
        .output()
        .unwrap();
    assert!(st.status.success());
}

/// Regression (issue 12): Redis losing its data mid-job (FLUSHALL, or a failover to an
/// empty replica) made the coordinator lose its leader lease and stop serving, the job
/// vanish from the API, and its chunks go to the dead-letter queue. Redis is a cache:
/// the coordinator takes its lease again, restores the job from its driver's record and
/// the destination's chunk manifests, queues the open chunks again, and the job succeeds
/// with every row.
#[tokio::test]
async fn a_job_survives_redis_losing_its_data() {
    let _broker = BROKER.read().await;
    let db = TestDb::new().await;
    skewed(&db, 20_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    // with a standby there: the lease Redis lost is the active coordinator's to take back
    let (standby, _) = cl.start_standby();
    let submit = slow_job_under_way(&mut cl, &db, &dest, "flushed").await;
    lose_redis_data(&cl);
    assert!(
        submit.await.unwrap().success(),
        "the job did not survive:\n{}",
        cl.logs()
    );
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    assert!(
        cl.log_of("coordinator").contains("took it again"),
        "{}",
        cl.logs()
    );
    assert!(
        cl.log_of("coordinator").contains("restoring it"),
        "{}",
        cl.logs()
    );
    assert!(cl.haul_ok(&["status", "flushed"]).contains("succeeded"));
    cl.stop_standby(standby);
}

/// Regression (issue 12): Redis unreachable for a while (here 20 s, longer than the
/// coordinator's lease) left the coordinator alive but no longer serving, and
/// `submit --wait` waited forever. Every role (a standby too) now waits Redis out: the job
/// succeeds with every row once it is back.
#[tokio::test]
async fn a_job_rides_out_redis_down_for_20_seconds() {
    let _broker = BROKER.read().await;
    let db = TestDb::new().await;
    skewed(&db, 20_000).await;
    let dest = TempDest::new();
    let redis = Outage::start(
        redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/'),
    );
    let via = format!("redis://{}/", redis.addr());
    let mut cl = Cluster::with(None, None, &[("HAUL_REDIS", via.as_str())]);
    // a standby rides it out too, still standing by: the lease expired while nobody could
    // reach Redis, and the active coordinator takes it back
    let (standby, _) = cl.start_standby();
    let submit = slow_job_under_way(&mut cl, &db, &dest, "redisdown").await;
    redis.down();
    tokio::time::sleep(Duration::from_secs(20)).await;
    redis.up();
    assert!(
        submit.await.unwrap().success(),
        "the job did not ride the outage out:\n{}",
        cl.logs()
    );
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    cl.stop_standby(standby);
}

/// Regression (issue 16): a relative `--dest` on `haul submit` was resolved in the
/// coordinator's and workers' working directories. It now means the directory where the
/// user typed it: the export lands there, and status shows the absolute path.
#[tokio::test]
async fn a_relative_dest_on_submit_means_where_it_was_typed() {
    let _broker = BROKER.read().await;
    let db = TestDb::new().await;
    skewed(&db, 20_000).await;
    let here = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.wait_workers(1);
    let out = cl
        .command(&[
            "submit", "--source", &db.dsn, "--table", "public.t", "--dest", "./lake", "--job-id",
            "rel", "--wait",
        ])
        .current_dir(&here.0)
        .output()
        .unwrap();
    assert_success(&out);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!("file://{}/lake", here.0.display())),
        "{status}"
    );
    assert_same(&db.client, "t", &here.0.join("lake/t")).await;
}

/// Regression (issue 16): a killed worker's chunk waited out its lease TTL, silently,
/// before another worker could take it. The coordinator now releases the leases of a
/// worker whose heartbeats stopped as soon as it counts as gone, and logs it: with a
/// 10-minute lease TTL, the job still finishes within a couple of minutes.
#[tokio::test]
async fn a_gone_workers_leases_are_released_without_waiting_out_the_ttl() {
    let _broker = BROKER.read().await;
    let db = TestDb::new().await;
    skewed(&db, 200_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &["--lease-ttl-secs", "600"]);
    cl.start_worker("w2", &["--lease-ttl-secs", "600"]);
    cl.wait_workers(2);
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "reap",
        "20000",
    ));
    let chunk = cl
        .wait_chunks("reap", "a chunk on w1", running_on("w1"))
        .await;
    cl.worker("w1").kill().unwrap(); // SIGKILL, mid-chunk: no deregistration
    cl.worker("w1").wait().unwrap();

    let t0 = Instant::now();
    loop {
        let status = cl.haul_ok(&["status", "reap"]);
        if status.contains("succeeded") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the chunk waited for the dead worker's lease:\n{status}\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        cl.log_of("coordinator")
            .contains("worker stopped heartbeating; released its lease"),
        "{}",
        cl.logs()
    );
    let m = chunk_manifests(&dest, "reap");
    assert_eq!(m.iter().find(|m| m.chunk == chunk).unwrap().worker.0, "w2");
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

/// `--json` (issue 16): `submit --wait`, `status`, `jobs` and `workers` print JSON that
/// scripts and orchestrators parse, with the same figures as the text.
#[tokio::test]
async fn clients_print_json_for_scripts() {
    let _broker = BROKER.read().await;
    let db = TestDb::new().await;
    skewed(&db, 20_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.wait_workers(1);
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "js", "5000");
    args.extend(["--wait", "--json"]);
    let parse = |out: String| -> serde_json::Value {
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let done = parse(cl.haul_ok(&args));
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["rows_done"], 20_000);
    assert_eq!(done["chunks"]["done"], done["chunks"]["total"]);
    assert_eq!(parse(cl.haul_ok(&["status", "js", "--json"])), done);
    let jobs = parse(cl.haul_ok(&["jobs", "--json"]));
    assert!(
        jobs.as_array().unwrap().iter().any(|j| j["job_id"] == "js"),
        "{jobs}"
    );
    let workers = parse(cl.haul_ok(&["workers", "--json"]));
    let w1 = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == "w1")
        .unwrap_or_else(|| panic!("{workers}"));
    assert_eq!(w1["state"], "active");
    assert_eq!(w1["slots"], 1);
    assert!(w1["pid"].as_u64().is_some_and(|p| p > 0), "{w1}");
}

/// Regression (issue 13): a worker ran whatever well-formed task it received, so a task
/// published by anyone with broker access — a whole-table range on chunk 0, or a chunk id
/// the plan does not have — made a job "succeed" with duplicate or missing rows. Tasks are
/// now checked against the job's plan and dropped unread when they do not match.
#[tokio::test]
async fn forged_tasks_are_dropped_unread() {
    use haul_shared::queue::ChunkQueue;
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    skewed(&db, 20_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    // queued while no worker runs, so the forged tasks are taken with the real ones
    cl.haul_ok(&submit_args(
        &db.dsn,
        dest.0.to_str().unwrap(),
        "forged",
        "5000",
    ));
    let queue = haul_shared::rabbit_queue::RabbitQueue::connect(&amqp_url(), &cl.queue, 3)
        .await
        .unwrap();
    // the forged tasks go first: the real ones are taken off and queued again after them
    let mut sub = queue.subscribe(100).await.unwrap();
    let mut real = Vec::new();
    while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        real.push(d);
    }
    assert_eq!(real.len(), 4, "the job's 4 chunk tasks");
    sub.cancel().await.unwrap();
    let job = JobId::parse("forged").unwrap();
    for (chunk, range) in [
        (ChunkId(0), haul_shared::ChunkRange::All),
        (ChunkId(999_999), haul_shared::ChunkRange::All),
    ] {
        let task = haul_shared::proto::Task {
            job_id: job.clone(),
            chunk_id: chunk,
            range,
            retry: Default::default(),
            run: String::new(),
        };
        queue.publish(task.encode()).await.unwrap();
    }
    for d in real {
        queue.publish(d.body.clone()).await.unwrap();
        d.ack().await.unwrap();
    }
    drop((sub, queue));
    cl.start_worker("w1", &[]);
    let out = cl.haul_ok(&["watch", "forged"]);
    assert!(out.contains("state:     succeeded"), "{out}\n{}", cl.logs());
    let digest = assert_same(&db.client, "t", &dest.0.join("t")).await;
    assert_eq!(digest.rows, 20_000, "no row twice, none missing");
    let log = cl.log_of("w1");
    assert_eq!(
        log.matches("task does not match its job's plan").count(),
        2,
        "{log}"
    );
    assert!(log.contains("chunk 999999 is not in the plan"), "{log}");
}

/// Regression: Flight DoGet of a job exported with `--lineage-columns` failed (the plan's
/// schema has two columns fewer than the files); the coordinator now serves the files'
/// schema, lineage columns included.
#[tokio::test]
async fn flight_serves_a_job_with_lineage_columns() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    skewed(&db, 5_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.wait_workers(1);
    let job = unique("lin");
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), &job, "2000");
    args.extend(["--lineage-columns", "--wait"]);
    let out = cl.haul_ok(&args);
    assert!(out.contains("state:     succeeded"), "{out}");
    let script = format!(
        r#"
import pyarrow.flight as fl
c = fl.connect("grpc://127.0.0.1:{port}")
info = c.get_flight_info(fl.FlightDescriptor.for_path("{job}"))
t = c.do_get(info.endpoints[0].ticket).read_all()
assert t.num_rows == 5000, t.num_rows
assert t.schema.names[-2:] == ["_haul_job_id", "_haul_extracted_at"], t.schema.names
assert set(t["_haul_job_id"].to_pylist()) == {{"{job}"}}
print("flight ok")
"#,
        port = cl.url.rsplit(':').next().unwrap(),
    );
    let out = Command::new(test_python())
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
