//! A newcomer's second hour: their own data and their own mistakes, met with answers that
//! say what is going on and what to do.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Regression: a cluster with no worker waited forever in silence (`submit --wait
/// --progress log` printed nothing after "running", the bar showed `ETA 0s`). The
/// coordinator says why nothing moves — in the progress line, a warning, and `status` —
/// and once a worker comes the job finishes.
#[tokio::test]
async fn a_job_nobody_works_on_says_why() {
    let _broker = BROKER.read().await;
    let src = TestDb::new().await;
    skewed(&src, 20_000).await;
    let dest = TempDest::new();
    let mut cl = Cluster::new(None);
    let job = unique("j");
    let mut args = submit_args(&src.dsn, dest.0.to_str().unwrap(), &job, "5000");
    args.extend(["--wait", "--progress", "log"]);
    let mut submit = cl
        .command(&args)
        .stdout(Stdio::null())
        .stderr(cl.log_file("submit"))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let log = cl.log_of("submit");
        if log.contains("the job is not moving") && log.contains("stalled=") {
            assert!(log.contains("no worker is running"), "{log}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no word of why the job waits:\n{}",
            cl.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = cl.haul_ok(&["status", &job]);
    assert!(
        status.contains("stalled:   no worker is running"),
        "{status}"
    );
    assert!(
        !cl.log_of("submit").contains("eta_s=0"),
        "an ETA without a rate"
    );

    cl.start_worker("w1", &[]);
    let t0 = Instant::now();
    let exit = loop {
        if let Some(s) = submit.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the job did not finish:\n{}",
            cl.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(exit.success(), "{}", cl.logs());
    assert_same(&src.client, "t", &dest.0.join("t")).await;
    let status = cl.haul_ok(&["status", &job]);
    assert!(!status.contains("stalled"), "{status}");
}
