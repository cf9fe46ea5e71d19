//! The services the tests talk to (RabbitMQ, Redis) and the `haul` binary they spawn.

use std::path::PathBuf;
use std::process::Command;

pub(crate) fn haul_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("haul");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "-p",
                "haul",
                "--bin",
                "haul",
                "--features",
                "testsuite",
            ])
            .status()
            .unwrap();
        assert!(st.success());
    }
    bin
}

pub(crate) fn redis_url() -> String {
    std::env::var("HAUL_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// Removes the test's keys even when the suite panics.
pub(crate) struct KeysGuard(pub(crate) String);

impl Drop for KeysGuard {
    fn drop(&mut self) {
        let url = redis_url();
        let Ok(out) = std::process::Command::new("redis-cli")
            .args(["-u", &url, "--scan", "--pattern", &format!("{}*", self.0)])
            .output()
        else {
            return;
        };
        for key in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = std::process::Command::new("redis-cli")
                .args(["-u", &url, "DEL", key])
                .output();
        }
    }
}

pub(crate) fn amqp_url() -> String {
    std::env::var("HAUL_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Deletes the test's queues (and their dead-letter queues) even when the suite panics.
#[derive(Default)]
pub(crate) struct QueuesGuard(pub(crate) std::sync::Mutex<Vec<String>>);

impl Drop for QueuesGuard {
    fn drop(&mut self) {
        for name in self.0.lock().map(|n| n.clone()).unwrap_or_default() {
            for q in [name.clone(), format!("{name}.dlq")] {
                let _ = std::process::Command::new("rabbitmqctl")
                    .args(["-q", "delete_queue", &q])
                    .output();
            }
        }
    }
}
