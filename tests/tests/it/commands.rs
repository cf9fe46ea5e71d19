//! The commands people reach for around a job: `--version` and shell completions.

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
