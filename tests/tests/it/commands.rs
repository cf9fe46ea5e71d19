//! The commands people reach for around a job: `--version`, shell completions, `haul ls`.

use std::process::Command;

use crate::harness::*;

/// `haul --version` names the git revision it was built from.
#[test]
fn version_names_the_git_revision() {
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(rev.status.success(), "not a git checkout");
    let rev = String::from_utf8(rev.stdout).unwrap();
    let out = Command::new(haul_bin()).arg("--version").output().unwrap();
    assert_success(&out);
    let version = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        version.trim(),
        format!("haul {} (git {})", env!("CARGO_PKG_VERSION"), rev.trim())
    );
}

/// `haul completions bash` prints a script bash accepts, completing subcommands and flags.
#[test]
fn bash_completions_parse_and_know_the_commands() {
    let out = Command::new(haul_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert_success(&out);
    let script = String::from_utf8(out.stdout).unwrap();
    for word in [
        "submit",
        "watch",
        "dlq",
        "--source-password-file",
        "--amqp-ca",
    ] {
        assert!(script.contains(word), "no {word} in the completions");
    }
    let file = std::env::temp_dir().join(unique("haul_completions"));
    std::fs::write(&file, &script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    let _ = std::fs::remove_file(&file);
    assert_success(&check);
    let bad = Command::new(haul_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("possible values: bash"),
        "{bad:?}"
    );
}

/// `haul ls <lake>`: every job whose records are in a lake, from its manifests alone:
/// committed, superseded by an `--overwrite` export, loaded (a load-only job), or
/// unfinished (a failed job, with the chunks it did commit); JSON Lines with `--json`; a folder without haul's records is
/// an error, not an empty list.
#[tokio::test]
async fn ls_lists_a_lakes_jobs_committed_superseded_or_unfinished() {
    let db = TestDb::new().await;
    poisonable(&db, 10_000, 5_000, "22023").await;
    db.exec("CREATE TABLE u AS SELECT g AS id FROM generate_series(1, 3000) g")
        .await;
    let dest = TempDest::new();
    let err = run(poisoned_run(&db, &dest, "ls-failed"))
        .await
        .unwrap_err()
        .to_string();
    let chunks = assert_one_chunk_failed(&err, &dest.0, "ls-failed");
    for (job, overwrite) in [("ls-first", false), ("ls-second", true)] {
        let mut o = options(&db.dsn, "public.u", &dest);
        o.job_id = Some(haul_shared::JobId::parse(job).unwrap());
        o.overwrite = overwrite;
        run(o).await.unwrap();
    }
    // a load-only job of the same table, its records in the same lake (regression: it
    // was listed as "superseded", as if an export of the table had replaced it)
    let tgt = TestDb::new().await;
    let mut o = options(&db.dsn, "public.u", &dest);
    o.job_id = Some(haul_shared::JobId::parse("ls-loaded").unwrap());
    o.spec.output.parquet = false;
    load_into(&mut o, &tgt.dsn, "", true, false);
    run(o).await.unwrap();

    let out = Command::new(haul_bin())
        .args(["ls", dest.0.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert_success(&out);
    let jobs: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_id = |id: &str| jobs.iter().find(|j| j["job_id"] == id).unwrap().clone();
    assert_eq!(jobs.len(), 4, "{jobs:?}");
    assert_eq!(by_id("ls-loaded")["state"], "loaded");
    let failed = by_id("ls-failed");
    assert_eq!(failed["state"], "unfinished");
    assert_eq!(failed["table_dir"], "t");
    assert_eq!(failed["chunks"], chunks);
    assert_eq!(failed["chunks_done"], chunks - 1);
    // the rows of its committed chunks: all but the failed chunk's
    let committed_rows: u64 = chunk_manifests(&dest, "ls-failed")
        .iter()
        .map(|c| c.rows)
        .sum();
    assert_eq!(failed["rows"], committed_rows);
    assert!(committed_rows > 0 && committed_rows < 10_000);
    assert_eq!(by_id("ls-first")["state"], "superseded");
    let second = by_id("ls-second");
    assert_eq!(second["state"], "committed");
    assert_eq!(second["table"], "public.u");
    assert_eq!(second["rows"], 3000);
    assert!(!second["finished_at"].as_str().unwrap().is_empty());

    let out = Command::new(haul_bin())
        .args(["ls", dest.0.to_str().unwrap()])
        .output()
        .unwrap();
    assert_success(&out);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("table "), "{table}");
    assert_eq!(table.lines().count(), 5, "{table}");

    let empty = TempDest::new();
    let out = Command::new(haul_bin())
        .args(["ls", empty.0.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("no haul jobs in"), "{msg}");
}

/// Regression: a job whose chunks were all waiting to retry (a full disk) showed
/// `chunks_waiting=26` and nothing about why. `status`, its JSON and the progress line
/// say what the chunk tried next failed with, and when it is tried again.
#[test]
fn waiting_chunks_say_why_and_when() {
    use haul_shared::jobs::{ChunkState, JobRecord, JobState, Retry};
    use haul_shared::{ChunkId, JobId};
    let dest = TempDest::new();
    let rec = JobRecord {
        id: JobId::parse("waits").unwrap(),
        spec: options("postgresql://u@127.0.0.1/db", "t", &dest).spec,
        plan: None,
        state: JobState::Running,
        submitted_at: String::new(),
    };
    let now = chrono::Utc::now().timestamp_millis() as u64;
    let waiting = |secs: u64, reason: &str| ChunkState::Waiting {
        retry_at_ms: now + secs * 1000,
        retry: Retry {
            failures: 3,
            since_ms: now,
        },
        reason: reason.into(),
    };
    let chunks = std::collections::BTreeMap::from([
        (ChunkId(0), waiting(40, "later one")),
        (
            ChunkId(1),
            waiting(12, "writing part: No space left on device"),
        ),
        (ChunkId(2), ChunkState::Pending),
    ]);
    let s = haul_shared::proto::job_status_to_wire(&rec, &chunks);
    assert_eq!(s.chunks_waiting, 2);
    let text = haul::client::status_text(&s);
    assert!(
        text.contains("waiting:   writing part: No space left on device (next try in 1"),
        "{text}"
    );
    let snap = haul::progress::Snapshot {
        chunks_total: 3,
        chunks_waiting: 2,
        waiting: Some((s.waiting_reason.clone(), s.next_retry_at_ms)),
        ..Default::default()
    };
    let line = haul::progress::chunks_line(&snap);
    assert!(
        line.contains("2 waiting to retry: writing part: No space left on device; next try in 1"),
        "{line}"
    );
    assert_eq!(s.next_retry_at_ms as u64, now + 12_000);
}
