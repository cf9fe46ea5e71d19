//! A coordinator and its workers as real `haul` processes, and what tests do to them:
//! signals, metrics scrapes, certificates, the broker's memory alarm.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use haul_shared::jobs::{ChunkState, JobStore};
use haul_shared::redis_store::RedisStore;
use haul_shared::{ChunkId, JobId};

use super::fixtures::{TestDb, unique};
use super::services::{KeysGuard, QueuesGuard, amqp_url, haul_bin, redis_url};

/// A port nothing listens on now, and never handed out before in this test run: the
/// kernel may offer a just-released port again, and two roles told the same port (a
/// coordinator's gRPC and metrics addresses, say) fail to start.
pub(crate) fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A coordinator and its workers, each a real `haul` process, killed at the end.
pub(crate) struct Cluster {
    pub(crate) url: String,
    pub(crate) port: u16,
    pub(crate) metrics_port: u16,
    pub(crate) queue: String,
    pub(crate) prefix: String,
    pub(crate) token: Option<String>,
    /// Extra environment for every process (e.g. `HAUL_MAX_ATTEMPTS`).
    env: Vec<(String, String)>,
    /// PEM certificate and key the coordinator serves TLS with.
    tls: Option<(String, String)>,
    pub(crate) logs: PathBuf,
    coordinator: Option<Child>,
    workers: Vec<(String, Child)>,
    _keys: KeysGuard,
    _queues: QueuesGuard,
}

impl Cluster {
    pub(crate) fn new(token: Option<&str>) -> Self {
        Self::with(token, None, &[])
    }

    pub(crate) fn with(
        token: Option<&str>,
        tls: Option<(String, String)>,
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let queue = unique("haul_cq");
        let prefix = format!("{}:", unique("haul_ck"));
        let logs = std::env::temp_dir().join(unique("haul_logs"));
        std::fs::create_dir_all(&logs).unwrap();
        let queues = QueuesGuard::default();
        queues.0.lock().unwrap().push(queue.clone());
        let mut c = Self {
            url: if tls.is_some() {
                format!("https://127.0.0.1:{port}")
            } else {
                format!("http://127.0.0.1:{port}")
            },
            port,
            metrics_port: free_port(),
            queue,
            prefix: prefix.clone(),
            token: token.map(str::to_owned),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tls,
            logs,
            coordinator: None,
            workers: Vec::new(),
            _keys: KeysGuard(prefix),
            _queues: queues,
        };
        c.start_coordinator();
        c
    }

    pub(crate) fn log_file(&self, name: &str) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .unwrap()
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(haul_bin());
        c.args(args)
            .env("HAUL_AMQP", amqp_url())
            .env("HAUL_REDIS", redis_url())
            .env("HAUL_QUEUE", &self.queue)
            .env("HAUL_REDIS_PREFIX", &self.prefix)
            .env("HAUL_COORDINATOR", &self.url)
            .env("HAUL_LOG", "info")
            .env_remove("HAUL_TOKEN");
        if let Some(t) = &self.token {
            c.env("HAUL_TOKEN", t);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub(crate) fn start_coordinator(&mut self) {
        let child = self.spawn_coordinator(self.port, self.metrics_port, "coordinator");
        self.coordinator = Some(child);
        self.wait_active(&self.url.clone(), "coordinator");
    }

    /// Waits until the coordinator at `url` is the active one (it listens from the start,
    /// and answers job calls once it has taken over): its gRPC health says so.
    pub(crate) fn wait_active(&self, url: &str, what: &str) {
        let t0 = Instant::now();
        loop {
            let mut cmd = self.command(&["jobs", "--json"]);
            if let Some((cert, _)) = &self.tls {
                // test_certs() keeps its CA beside the certificate
                let ca = Path::new(cert).with_file_name("ca.pem");
                cmd.env("HAUL_TLS_CA", ca);
            }
            let out = cmd
                .env("HAUL_COORDINATOR", url)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{what} did not turn active: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a process of this cluster (`what`) listens on `port`.
    pub(crate) fn wait_listening(&self, port: u16, what: &str) {
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{what} did not start:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A second coordinator on this cluster's Redis prefix and queue (its log is
    /// `standby`), listening: it stands by while this cluster's is active. Returns it and
    /// its URL.
    pub(crate) fn start_standby(&self) -> (Child, String) {
        let port = free_port();
        let child = self.spawn_coordinator(port, free_port(), "standby");
        self.wait_listening(port, "the standby");
        (child, format!("http://127.0.0.1:{port}"))
    }

    /// Asserts the standby is alive and still standing by, then stops it.
    pub(crate) fn stop_standby(&self, mut standby: Child) {
        assert!(
            standby.try_wait().unwrap().is_none(),
            "the standby died:\n{}",
            self.log_of("standby")
        );
        let log = self.log_of("standby");
        assert!(
            log.contains("standing by") && !log.contains("this coordinator is the active one"),
            "{log}"
        );
        standby.kill().unwrap();
        standby.wait().unwrap();
    }

    /// A coordinator serving gRPC on `port` and metrics and health on `metrics_port`.
    pub(crate) fn spawn_coordinator(&self, port: u16, metrics_port: u16, log: &str) -> Child {
        let listen = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{metrics_port}");
        let mut args = vec![
            "coordinator",
            "--listen",
            &listen,
            "--parallelism",
            "2",
            "--metrics-listen",
            &metrics,
        ];
        if let Some((cert, key)) = &self.tls {
            args.extend(["--tls-cert", cert, "--tls-key", key]);
        }
        self.command(&args)
            .stdout(self.log_file(log))
            .stderr(self.log_file(log))
            .spawn()
            .unwrap()
    }

    pub(crate) fn kill_coordinator(&mut self) {
        let mut c = self.coordinator.take().unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    pub(crate) fn start_worker(&mut self, id: &str, extra: &[&str]) {
        self.start_worker_env(id, extra, &[]);
    }

    /// A worker with environment of its own (e.g. a fault injection).
    pub(crate) fn start_worker_env(&mut self, id: &str, extra: &[&str], env: &[(&str, &str)]) {
        let mut args = vec!["worker", "--id", id];
        if !extra.contains(&"--lease-ttl-secs") {
            args.extend(["--lease-ttl-secs", "3"]);
        }
        if !extra.contains(&"--slots") {
            args.extend(["--slots", "1"]);
        }
        args.extend_from_slice(extra);
        let child = self
            .command(&args)
            .envs(env.iter().copied())
            .stdout(self.log_file(id))
            .stderr(self.log_file(id))
            .spawn()
            .unwrap();
        self.workers.push((id.to_owned(), child));
    }

    pub(crate) fn worker(&mut self, id: &str) -> &mut Child {
        &mut self.workers.iter_mut().find(|(w, _)| w == id).unwrap().1
    }

    pub(crate) fn signal(&mut self, id: &str, sig: &str) {
        let pid = self.worker(id).id();
        signal(pid, sig);
    }

    /// Finishes a failed job with the command its reason prints (`haul submit --resume
    /// <job> --fresh-snapshot`), run as printed through a shell, then follows it to its
    /// success. The dsn and dest are the job's own: the command must not need them.
    pub(crate) fn finish_under_a_fresh_snapshot(&self, job: &str) {
        let status = self.haul(&["status", job, "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let reason = status["reason"].as_str().unwrap_or_default();
        let printed = printed_command(reason, "haul submit --resume");
        let cluster_env = self.command(&[]);
        let envs = cluster_env
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_os_string(), v?.to_os_string())));
        let out = run_as_printed(&printed, envs);
        assert!(
            out.status.success(),
            "`{printed}` failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        let out = self.haul_ok(&["watch", job]);
        assert!(out.contains("state:     succeeded"), "{out}");
    }

    /// Runs a `haul` client command against this cluster.
    pub(crate) fn haul(&self, args: &[&str]) -> Output {
        self.command(args)
            .env("HAUL_PROGRESS", "log")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub(crate) fn haul_ok(&self, args: &[&str]) -> String {
        let out = self.haul(args);
        assert!(
            out.status.success(),
            "haul {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub(crate) fn wait_workers(&self, n: usize) {
        let t0 = Instant::now();
        loop {
            let out = self.haul(&["workers"]);
            let active = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.ends_with(" active"))
                .count();
            if active >= n {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "workers did not register:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(&self.logs).unwrap().flatten() {
            out.push_str(&format!("--- {}\n", e.path().display()));
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
        out
    }

    pub(crate) fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    pub(crate) async fn store(&self) -> RedisStore {
        RedisStore::connect(&redis_url(), &self.prefix)
            .await
            .unwrap()
    }

    /// Waits until `pred` holds for the job's chunk states.
    pub(crate) async fn wait_chunks(
        &self,
        job: &str,
        what: &str,
        pred: impl Fn(&std::collections::BTreeMap<ChunkId, ChunkState>) -> Option<ChunkId>,
    ) -> ChunkId {
        let store = self.store().await;
        let job = JobId::parse(job).unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(c) = pred(&store.chunk_states(&job).await.unwrap()) {
                return c;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The first command a message prints between backquotes that starts with `prefix`.
pub(crate) fn printed_command(message: &str, prefix: &str) -> String {
    message
        .split('`')
        .skip(1)
        .step_by(2)
        .find(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}…` command printed in: {message}"))
        .to_owned()
}

/// Runs a command haul printed, as printed, through a shell, with the tested binary first
/// on `PATH` and `envs` (a cluster's addresses) added to the environment.
pub(crate) fn run_as_printed(
    command: &str,
    envs: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Output {
    Command::new("sh")
        .args(["-c", command])
        .env("HAUL_PROGRESS", "none")
        .envs(envs)
        .env("PATH", path_with_haul())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `PATH` with the tested `haul` binary's folder first, so that a command haul prints
/// runs as printed.
pub(crate) fn path_with_haul() -> String {
    let bin = haul_bin();
    let dir = bin.parent().unwrap().to_str().unwrap().to_owned();
    format!("{dir}:{}", std::env::var("PATH").unwrap_or_default())
}

/// `haul submit` of table `public.t` from `dsn` into `dest` as job `job`, in chunks of
/// `chunk_rows` rows; tests add flags to it.
pub(crate) fn submit_args<'a>(
    dsn: &'a str,
    dest: &'a str,
    job: &'a str,
    chunk_rows: &'a str,
) -> Vec<&'a str> {
    vec![
        "submit",
        "--source",
        dsn,
        "--table",
        "public.t",
        "--dest",
        dest,
        "--job-id",
        job,
        "--chunk-rows",
        chunk_rows,
    ]
}

/// Sends `sig` (e.g. `STOP`) to a process, which must exist.
pub(crate) fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Kills a child for good, continuing it first in case a test stopped it.
pub(crate) fn reap(c: &mut Child) {
    let _ = Command::new("kill")
        .args(["-s", "CONT", &c.id().to_string()])
        .output();
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.workers {
            reap(c);
        }
        if let Some(c) = &mut self.coordinator {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.logs);
        } else {
            eprintln!("cluster logs kept in {}", self.logs.display());
        }
    }
}

/// `GET /metrics` on a local port: the body of a 200 answer.
pub(crate) fn scrape(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// `GET <path>` on a local port: the status code and the body.
pub(crate) fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out}"));
    (status, body.to_owned())
}

/// The value of one sample line (`name{labels} value`) in a scrape.
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A skewed table: dense ids, then a sparse tail of huge ones.
pub(crate) async fn skewed(db: &TestDb, rows: u64) {
    db.exec(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, grp int, amount numeric(12,2), note text, at timestamptz);
         INSERT INTO t SELECT CASE WHEN g <= {dense} THEN g ELSE g::bigint * 1000003 END, g % 7,
                (g % 100000) / 100.0, repeat(md5(g::text), 2), '2024-01-01'::timestamptz + g * interval '1 second'
           FROM generate_series(1, {rows}) g;
         ANALYZE t;",
        dense = rows * 9 / 10
    ))
    .await;
}

pub(crate) fn committed_at_least(
    n: usize,
) -> impl Fn(&std::collections::BTreeMap<ChunkId, ChunkState>) -> Option<ChunkId> {
    move |s| {
        let done: Vec<_> = s
            .iter()
            .filter(|(_, st)| matches!(st, ChunkState::Committed { .. }))
            .collect();
        (done.len() >= n).then(|| *done[0].0)
    }
}

/// A CA and a server certificate for 127.0.0.1/localhost signed by it (openssl CLI):
/// (folder, ca.pem, cert.pem, key.pem).
pub(crate) fn test_certs() -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let certs = std::env::temp_dir().join(unique("haul_tls"));
    std::fs::create_dir_all(&certs).unwrap();
    // a CA, and a server certificate for 127.0.0.1 signed by it
    let (ca, cert, key) = (
        certs.join("ca.pem"),
        certs.join("cert.pem"),
        certs.join("key.pem"),
    );
    std::fs::write(
        certs.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let p = |f: &str| certs.join(f).to_str().unwrap().to_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: Vec<Vec<String>> = vec![
        ["req", "-x509", "-days", "1", "-subj", "/CN=haul-test-ca"]
            .iter()
            .chain(&ec)
            .map(|s| s.to_string())
            .chain(["-keyout".into(), p("ca.key"), "-out".into(), p("ca.pem")])
            .collect(),
        ["req", "-subj", "/CN=localhost"]
            .iter()
            .chain(&ec)
            .map(|s| s.to_string())
            .chain(["-keyout".into(), p("key.pem"), "-out".into(), p("cert.csr")])
            .collect(),
        vec![
            "x509".into(),
            "-req".into(),
            "-days".into(),
            "1".into(),
            "-in".into(),
            p("cert.csr"),
            "-CA".into(),
            p("ca.pem"),
            "-CAkey".into(),
            p("ca.key"),
            "-CAcreateserial".into(),
            "-extfile".into(),
            p("ext.cnf"),
            "-out".into(),
            p("cert.pem"),
        ],
    ];
    for step in steps {
        let out = Command::new("openssl").args(&step).output().unwrap();
        assert!(out.status.success(), "openssl {step:?}: {out:?}");
    }
    (certs, ca, cert, key)
}

/// Turns the broker's memory alarm on (publishers are blocked: their messages are not
/// confirmed) until dropped, which restores the watermark it found.
pub(crate) struct MemoryAlarm(String);

impl MemoryAlarm {
    pub(crate) fn raise() -> Self {
        let out = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                "vm_memory_monitor:get_vm_memory_high_watermark().",
            ])
            .output()
            .unwrap();
        let found = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let restore = if found.parse::<f64>().is_ok_and(|w| w > 0.0) {
            found
        } else {
            "0.4".to_owned()
        };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
        Self(restore)
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.0]);
    }
}

pub(crate) fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}
