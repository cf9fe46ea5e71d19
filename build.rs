//! Stamps the `haul` binary with the git revision it was built from (`haul --version`).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    // an image build has no .git: it passes the revision in HAUL_GIT_REV
    println!("cargo:rerun-if-env-changed=HAUL_GIT_REV");
    let given = std::env::var("HAUL_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty() && r != "unknown");
    let rev = given
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HAUL_GIT_REV={rev}");
    // a new commit or checkout changes HEAD or the branch it points to
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        for f in ["HEAD", "refs/heads", "packed-refs"] {
            let p = std::path::Path::new(&dir).join(f);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
