//! The S3-compatible server on loopback (SeaweedFS, started by `scripts/services.sh`).

use std::process::Command;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

pub(crate) const ENDPOINT: &str = "http://127.0.0.1:8333";

/// The environment a `haul` process needs to reach the test server.
pub(crate) const S3_ENV: [(&str, &str); 5] = [
    ("AWS_ENDPOINT", ENDPOINT),
    ("AWS_ALLOW_HTTP", "true"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_ACCESS_KEY_ID", "haul"),
    ("AWS_SECRET_ACCESS_KEY", "haul"),
];

pub(crate) fn store(bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(ENDPOINT)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("haul")
            .with_secret_access_key("haul")
            .build()
            .unwrap(),
    )
}

/// Creates `bucket` on the test server unless it exists.
pub(crate) fn ensure_bucket(bucket: &str) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .arg(format!("{ENDPOINT}/{bucket}"))
        .output()
        .expect("curl");
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        code == "200" || code == "409",
        "cannot create bucket {bucket} (HTTP {code}): is the S3 server up (scripts/services.sh)?"
    );
}
