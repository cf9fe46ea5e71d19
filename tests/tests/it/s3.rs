//! An `s3://` destination, against a real S3-compatible server on loopback (SeaweedFS,
//! started by `scripts/services.sh`).

use std::process::Command;
use std::sync::Arc;

use futures::TryStreamExt;
use haul_shared::lake::Dest;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::harness::*;

#[tokio::test]
async fn exports_to_s3_and_commits_with_create_if_absent() {
    // one shared bucket (each bucket costs the server volumes), a prefix of our own
    let bucket = "haul-test";
    let prefix = unique("bronze");
    ensure_bucket(bucket);

    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE orders (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, note text);
         INSERT INTO orders SELECT g, timestamptz '2024-05-01 00:00:00+00' + g * interval '5 minutes', repeat('n', g % 40)
         FROM generate_series(1, 12000) g; ANALYZE orders;",
    )
    .await;
    let url = format!("s3://{bucket}/{prefix}");
    let out = Command::new(haul_bin())
        .args([
            "run", "--source", &db.dsn, "--table", "orders", "--dest", &url,
        ])
        .args([
            "--partition-by",
            "created_at:day",
            "--chunk-rows",
            "3000",
            "--progress",
            "none",
        ])
        .env("AWS_ENDPOINT", ENDPOINT)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "haul")
        .env("AWS_SECRET_ACCESS_KEY", "haul")
        .output()
        .unwrap();
    assert_success(&out);

    let s = store(bucket);
    let metas: Vec<_> = s
        .list(Some(&Path::from(prefix.as_str())))
        .try_collect()
        .await
        .unwrap();
    let names: Vec<String> = metas.iter().map(|m| m.location.to_string()).collect();
    assert!(
        names
            .iter()
            .any(|n| *n == format!("{prefix}/orders/_manifest.json")),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("_haul/staging")),
        "staging left behind: {names:?}"
    );
    let mut parts = Vec::new();
    for m in metas.iter().filter(|m| {
        m.location
            .as_ref()
            .starts_with(&format!("{prefix}/orders/dt="))
    }) {
        assert!(m.location.as_ref().ends_with(".parquet"));
        parts.push(s.get(&m.location).await.unwrap().bytes().await.unwrap());
    }
    assert!(parts.len() > 1);
    let batches = batches_from_bytes(parts);
    assert_same_batches(&db.client, "orders", &batches).await;

    // the commit point really is create-if-absent on this server: a second commit of a
    // chunk is refused
    let dest = Dest::from_store(Arc::clone(&s), Path::from(prefix.as_str()), url.clone());
    let job: String = serde_json::from_slice::<serde_json::Value>(
        &s.get(&Path::from(format!("{prefix}/orders/_manifest.json")))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap()["job"]
        .as_str()
        .unwrap()
        .to_owned();
    let chunk = dest.chunk_manifest_path(
        &haul_shared::JobId::parse(&job).unwrap(),
        haul_shared::ChunkId(0),
    );
    let created = dest
        .put_json(&chunk, &serde_json::json!({"zombie": true}), true)
        .await
        .unwrap();
    assert!(
        !created,
        "the S3 server let a second commit of chunk 0 overwrite the first"
    );

    // clean up our prefix
    let all: Vec<_> = s
        .list(Some(&Path::from(prefix.as_str())))
        .try_collect()
        .await
        .unwrap();
    for m in all {
        let _ = s.delete(&m.location).await;
    }
}

/// Regression (issue 12): `--dest s3://...` without credentials failed, after retries, as
/// `Generic S3 error: ... 169.254.169.254`. It now fails at once, in one line, saying that
/// no credentials were found and how to give them, and writes nothing.
#[tokio::test]
async fn an_s3_destination_without_credentials_says_how_to_give_them() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);")
        .await;
    ensure_bucket("haul-test");
    let mut cmd = Command::new(haul_bin());
    cmd.args([
        "run",
        "--source",
        &db.dsn,
        "--table",
        "t",
        "--dest",
        "s3://haul-test/nocreds",
        "--progress",
        "none",
    ]);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    // where no instance metadata service listens (as on most machines but a cloud VM)
    let out = cmd
        .env("AWS_ENDPOINT", ENDPOINT)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_METADATA_ENDPOINT", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("haul: error: no S3 credentials for s3://haul-test/nocreds")
            && last.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    let listed: Vec<_> = store("haul-test")
        .list(Some(&Path::from("nocreds")))
        .try_collect()
        .await
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
}

/// Issue 12: the S3 server goes away for 20 s mid-job (its port refuses connections and
/// the open ones are cut): the job rides it out and the objects read back equal the source.
#[tokio::test]
async fn a_job_rides_out_its_s3_server_down_for_20_seconds() {
    let bucket = "haul-test";
    ensure_bucket(bucket);
    let prefix = unique("s3down");
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, note text);
         INSERT INTO t SELECT g, repeat('n', g % 40) FROM generate_series(1, 20000) g; ANALYZE t;",
    )
    .await;
    let s3 = Outage::start(ENDPOINT.trim_start_matches("http://"));
    let url = format!("s3://{bucket}/{prefix}");
    let run = Command::new(haul_bin())
        .args([
            "run",
            "--source",
            &db.dsn,
            "--table",
            "t",
            "--dest",
            &url,
            "--job-id",
            "s3down",
            "--chunk-rows",
            "1000",
            "--workers",
            "2",
            "--progress",
            "none",
        ])
        .env("AWS_ENDPOINT", format!("http://{}", s3.addr()))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "haul")
        .env("AWS_SECRET_ACCESS_KEY", "haul")
        .env("HAUL_FAULT_CHUNK_DELAY_MS", "400")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let s = store(bucket);
    let chunks = Path::from(format!("{prefix}/_haul/jobs/s3down/chunks"));
    let t0 = std::time::Instant::now();
    loop {
        let n = s
            .list(Some(&chunks))
            .try_collect::<Vec<_>>()
            .await
            .map(|v| v.len())
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no chunk committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s3.down();
    tokio::time::sleep(std::time::Duration::from_secs(20)).await;
    s3.up();
    let out = tokio::task::spawn_blocking(move || run.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut parts = Vec::new();
    let metas: Vec<_> = s
        .list(Some(&Path::from(format!("{prefix}/t"))))
        .try_collect()
        .await
        .unwrap();
    for m in metas
        .iter()
        .filter(|m| m.location.as_ref().ends_with(".parquet"))
    {
        parts.push(s.get(&m.location).await.unwrap().bytes().await.unwrap());
    }
    assert_same_batches(&db.client, "t", &batches_from_bytes(parts)).await;
}
