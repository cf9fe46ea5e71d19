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

/// Regression: `haul run`'s Ctrl-C hint (`run again with --resume <job> --fresh-snapshot`)
/// did not work as printed: it needed `--source` and, for any lake but `./lake`, `--dest`.
/// The hint is a whole command now, and a resume takes the source from the job's plan.
#[tokio::test]
async fn an_interrupted_run_is_finished_by_the_command_it_prints() {
    let src = TestDb::new().await;
    skewed(&src, 40_000).await;
    let dest = TempDest::new();
    let lake = dest.0.join("my lake");
    let child = std::process::Command::new(haul_bin())
        .args(["run", "--source", &src.dsn, "--table", "public.t", "--dest"])
        .arg(&lake)
        .args([
            "--job-id",
            "ctrlc",
            "--chunk-rows",
            "5000",
            "--workers",
            "1",
        ])
        .args(["--progress", "none"])
        .env("HAUL_FAULT_CHUNK_DELAY_MS", "300")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let lake_dest = TempDest(lake.clone());
    while committed_chunks(&lake_dest, "ctrlc") < 1 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no chunk committed");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    std::mem::forget(lake_dest);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let command = printed_command(&stderr, "haul ");
    assert!(!command.contains("--source"), "{command}");
    let done = run_as_printed(&command, []);
    assert_success(&done);
    assert_same(&src.client, "t", &lake.join("t")).await;
}

/// Regression: a job id reused in the cluster for another table and destination replaced
/// the coordinator's record of the first job (`haul jobs` lost it, and a later submit of
/// the first printed the other's table, exit 0). One id names one job: refused.
#[tokio::test]
async fn a_job_id_names_one_job_in_the_cluster() {
    let _broker = BROKER.read().await;
    let src = TestDb::new().await;
    skewed(&src, 5_000).await;
    src.exec("CREATE TABLE u AS SELECT * FROM t; ALTER TABLE u ADD PRIMARY KEY (id);")
        .await;
    let (first, second) = (TempDest::new(), TempDest::new());
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.wait_workers(1);
    let job = unique("j");
    let mut args = submit_args(&src.dsn, first.0.to_str().unwrap(), &job, "5000");
    args.push("--wait");
    cl.haul_ok(&args);
    let mut args = submit_args(&src.dsn, second.0.to_str().unwrap(), &job, "5000");
    args[4] = "public.u";
    args.push("--wait");
    let out = cl.haul(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("job id {job} is taken")) && err.contains("public.t"),
        "{err}"
    );
    let jobs = cl.haul_ok(&["jobs"]);
    let line = jobs.lines().find(|l| l.contains(&job)).unwrap_or_default();
    assert!(line.contains("public.t"), "{jobs}");
    assert!(parquet_files(&second.0).is_empty());
}

/// Regression: `haul ls <lake> | head -1`, `haul show … | head` and `completions zsh |
/// head` exited 101 with a panic's backtrace (a print to a closed pipe). Like any Unix
/// tool, haul now ends quietly there.
#[tokio::test]
async fn a_closed_pipe_ends_haul_quietly() {
    let src = TestDb::new().await;
    skewed(&src, 2_000).await;
    let dest = TempDest::new();
    run(options(&src.dsn, "t", &dest)).await.unwrap();
    let lake = dest.0.to_str().unwrap().to_owned();
    let table = format!("{lake}/t");
    for args in [
        vec!["completions", "zsh"],
        vec!["ls", lake.as_str()],
        vec!["show", table.as_str()],
    ] {
        // the reader is gone before haul writes a byte
        let script = format!(
            "exec 3>&1; {} {} 2>&3 | true; echo \"exit=${{PIPESTATUS[0]}}\"",
            haul_bin().display(),
            args.join(" ")
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(!said.contains("panicked"), "{args:?}: {said}");
        assert!(
            said.contains("exit=0") || said.contains("exit=141"),
            "{args:?}: {said}"
        );
    }
}

/// Numbers a reader gets wrong: a decimal over 38 digits (DuckDB misreads it without an
/// error) and an unconstrained `numeric` (text for every value) are named at plan time,
/// each with the `--cast` that avoids the trap.
#[tokio::test]
async fn plan_names_the_columns_readers_get_wrong() {
    let src = TestDb::new().await;
    src.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, big numeric(50,10), free numeric, ok numeric(12,2));
         INSERT INTO t VALUES (1, 12345678901234567890123456789012345678.12, 1.5, 2.25);",
    )
    .await;
    let dest = TempDest::new();
    let out = std::process::Command::new(haul_bin())
        .args(["plan", "--source", &src.dsn, "--table", "t", "--dest"])
        .arg(&dest.0)
        .arg("--json")
        .output()
        .unwrap();
    assert_success(&out);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings: Vec<&str> = plan["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].contains("column \"big\"")
            && warnings[0].contains("DuckDB misreads")
            && warnings[0].contains("--cast big=text"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("column \"free\"") && warnings[1].contains("--cast free=numeric(p,s)"),
        "{warnings:?}"
    );
}

/// Regression: `--json` printed nothing on stdout when the command failed; a script
/// reading it gets one object with the error now (and the line on stderr as before).
#[tokio::test]
async fn json_output_reports_a_failure_too() {
    let src = TestDb::new().await;
    let dest = TempDest::new();
    let out = std::process::Command::new(haul_bin())
        .args([
            "run",
            "--source",
            &src.dsn,
            "--table",
            "no_such_table",
            "--dest",
        ])
        .arg(&dest.0)
        .args(["--json", "--progress", "none"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("no_such_table"), "{err}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(err));
}

/// Regression: a job of page ranges (a table without a key) that was killed sent the user
/// in a circle (`--resume` → "rerun it as a new job"; a rerun → "already started; pass
/// --resume"), and `gc` kept its committed parts forever. Both answers now say it cannot
/// be finished and to export again under another id; gc reclaims its parts once idle.
#[tokio::test]
async fn a_dead_job_of_page_ranges_is_not_a_circle() {
    let src = TestDb::new().await;
    src.exec(
        "CREATE TABLE nokey AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 60000) g;
         ANALYZE nokey;",
    )
    .await;
    let dest = TempDest::new();
    let run_args = |extra: &[&str]| {
        let mut c = std::process::Command::new(haul_bin());
        c.args(["run", "--source", &src.dsn, "--table", "nokey", "--dest"])
            .arg(&dest.0)
            .args([
                "--chunk-rows",
                "10000",
                "--workers",
                "1",
                "--progress",
                "none",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let mut child = run_args(&["--job-id", "pages"])
        .env("HAUL_FAULT_CHUNK_DELAY_MS", "300")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while committed_chunks(&dest, "pages") < 1 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no chunk committed");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for extra in [
        &["--job-id", "pages"][..],
        &["--resume", "pages", "--fresh-snapshot"][..],
    ] {
        let out = run_args(extra).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot be finished") && err.contains("another job id"),
            "{extra:?}: {err}"
        );
    }
    let staged = parquet_files(&dest.0.join("_haul/staging/pages"));
    assert!(!staged.is_empty());
    let out = std::process::Command::new(haul_bin())
        .args(["gc"])
        .arg(&dest.0)
        .args(["--older-than", "0", "--delete"])
        .output()
        .unwrap();
    assert_success(&out);
    assert!(
        parquet_files(&dest.0.join("_haul/staging/pages")).is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // and the table exports under a new id
    let out = run_args(&[]).output().unwrap();
    assert_success(&out);
    assert_same(&src.client, "nokey", &dest.0.join("nokey")).await;
}
