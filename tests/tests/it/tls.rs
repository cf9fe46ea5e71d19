//! Connecting the way production does: the TLS-only server scripts/test-postgres.sh
//! starts (hostssl + SCRAM-SHA-256, or a client certificate; certificates from its own
//! CA, named for `localhost` only), read by `haul run` and by a cluster with
//! `sslmode=verify-full`; what each mistake says; and the password nowhere but in the
//! processes that were given it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use haul_shared::pg::quote_ident;
use haul_shared::queue::ChunkQueue;
use haul_shared::rabbit_queue::RabbitQueue;
use tokio_postgres::Client;

use crate::harness::*;

fn tls_dir() -> PathBuf {
    PathBuf::from(std::env::var("HAUL_TLS_DIR").unwrap_or_else(|_| "/var/tmp/haul-tls".into()))
}

fn tls_port() -> u16 {
    std::env::var("HAUL_PGTLS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5442)
}

/// A database and a password role of their own on the TLS-only server, dropped at the end.
struct TlsDb {
    name: String,
    role: String,
    password: String,
    admin: Client,
    client: Client,
}

impl TlsDb {
    async fn new() -> Self {
        let admin_dsn = |db: &str| {
            format!(
                "host={} port={} user=postgres dbname={db}",
                tls_dir().display(),
                tls_port()
            )
        };
        let admin = connect(&admin_dsn("postgres")).await;
        let (name, role) = (unique("haul_tls"), unique("haul_tls_role"));
        // a password with the characters that break naive parsers and maskers
        let password = format!("p@ss w'rd:{}", uuid::Uuid::new_v4().simple());
        for sql in [
            format!(
                "CREATE ROLE {} LOGIN PASSWORD {}",
                quote_ident(&role),
                haul_shared::pg::quote_literal(&password)
            ),
            format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(&name),
                quote_ident(&role)
            ),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        let client = connect(&admin_dsn(&name)).await;
        Self {
            name,
            role,
            password,
            admin,
            client,
        }
    }

    /// The connection string a user writes: no password in it.
    fn dsn(&self, host: &str, extra: &str) -> String {
        format!(
            "postgresql://{}@{host}:{}/{}?{extra}",
            self.role,
            tls_port(),
            self.name
        )
    }

    fn verify_full(&self) -> String {
        self.dsn(
            "localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={}",
                tls_dir().join("ca.pem").display()
            ),
        )
    }

    /// A file holding the password, as a mounted secret would.
    fn password_file(&self) -> PathBuf {
        let f = std::env::temp_dir().join(unique("haul_pw"));
        std::fs::write(&f, format!("{}\n", self.password)).unwrap();
        f
    }

    async fn exec(&self, sql: &str) {
        self.client.batch_execute(sql).await.unwrap();
    }
}

impl Drop for TlsDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                tls_dir().to_str().unwrap(),
                "-p",
                &tls_port().to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-X",
                "-q",
                "-c",
            ])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE); DROP ROLE IF EXISTS {}",
                quote_ident(&self.name),
                quote_ident(&self.role)
            ))
            .output();
        let _ = &self.admin;
    }
}

fn haul(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(haul_bin())
        .args(args)
        .env("HAUL_LOG", "info")
        .env("HAUL_PROGRESS", "log")
        .env_remove("PGPASSWORD")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Count and checksum of a table computed by its server, for comparing two databases.
async fn sql_digest(client: &Client, table: &str) -> (i64, String) {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY id)), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Every file under `dir`, as bytes, must not contain `needle`.
fn assert_absent_in_files(dir: &Path, needle: &str, what: &str) {
    let files = files_under(dir);
    assert!(
        !files.is_empty(),
        "nothing to check in {what} ({})",
        dir.display()
    );
    for p in files {
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the password is in {what}: {}",
            p.display()
        );
    }
}

const ROWS: i64 = 20_000;

async fn orders(db: &TlsDb) {
    db.exec(&format!(
        "CREATE TABLE orders (id bigint PRIMARY KEY, note text, at timestamptz);
         INSERT INTO orders SELECT g, 'n' || g, '2026-01-01'::timestamptz + g * interval '1 minute'
         FROM generate_series(1, {ROWS}) g; ANALYZE orders;
         ALTER TABLE orders OWNER TO {};",
        quote_ident(&db.role)
    ))
    .await;
}

/// `haul run` with `sslmode=verify-full` and a SCRAM password from a password file
/// extracts the table exactly, and loads it into a TLS target (its password in the URL,
/// kept by the process); every mistake is refused naming it; the password is in no
/// output, log or lake file.
#[tokio::test]
async fn haul_run_reads_and_loads_over_verified_tls_with_scram() {
    let db = TlsDb::new().await;
    orders(&db).await;
    let tgt = TlsDb::new().await;
    let dest = TempDest::new();
    let pwfile = db.password_file();
    let lake = dest.0.join("lake");
    let lake_s = lake.to_str().unwrap();
    let pwfile_s = pwfile.to_str().unwrap();

    // the target's password in its URL, percent-encoded as URLs need
    let target = format!(
        "postgresql://{}:{}@localhost:{}/{}?sslmode=verify-full&sslrootcert={}",
        tgt.role,
        utf8_percent_encode(&tgt.password),
        tls_port(),
        tgt.name,
        tls_dir().join("ca.pem").display()
    );
    let out = haul(
        &[
            "run",
            "--source",
            &db.verify_full(),
            "--source-password-file",
            pwfile_s,
            "--table",
            "public.orders",
            "--dest",
            lake_s,
            "--chunk-rows",
            "5000",
            "--load-target",
            &target,
            "--create-table",
        ],
        &[],
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        !all.contains(&db.password) && !all.contains(&tgt.password),
        "{all}"
    );
    let digest = assert_same(&db.client, "orders", &lake.join("orders")).await;
    assert_eq!(digest.rows, ROWS);
    assert_eq!(
        sql_digest(&tgt.client, "public.orders").await,
        sql_digest(&db.client, "public.orders").await
    );
    assert_absent_in_files(&lake, &db.password, "the lake");
    assert_absent_in_files(&lake, &tgt.password, "the lake");

    // every connection of the job was TLS: the server saw no plain one from the role
    let plain: i64 = db
        .admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.usename = $1 AND NOT s.ssl",
            &[&db.role],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);

    let refused = |source: String, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "run",
            "--table",
            "public.orders",
            "--dest",
            lake_s,
            "--overwrite",
            "--retry-for",
            "1s",
        ];
        args.extend_from_slice(extra);
        args.extend(["--source", &source]);
        let out = haul(&args, env);
        assert!(!out.status.success());
        let all = text(&out);
        assert!(!all.contains(&db.password), "{all}");
        all.lines()
            .find(|l| l.starts_with("haul: error"))
            .unwrap_or_else(|| panic!("no error line: {all}"))
            .to_owned()
    };
    let with_pw = ["--source-password-file", pwfile_s];

    // a CA that did not sign the server's certificate
    let other_ca = db.dsn(
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            tls_dir().join("other-ca.pem").display()
        ),
    );
    let err = refused(other_ca, &with_pw, &[]);
    assert!(err.contains("not signed by a CA in sslrootcert"), "{err}");
    // a name the certificate does not hold (it names localhost only)
    let by_ip = db.dsn(
        "127.0.0.1",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            tls_dir().join("ca.pem").display()
        ),
    );
    let err = refused(by_ip.clone(), &with_pw, &[]);
    assert!(
        err.contains("not valid for the name \"127.0.0.1\""),
        "{err}"
    );
    // verify-ca checks the chain, not the name: the same address works
    let by_ip_ca = by_ip.replace("verify-full", "verify-ca");
    let out = haul(
        &[
            "run",
            "--source",
            &by_ip_ca,
            "--table",
            "public.orders",
            "--dest",
            lake_s,
            "--overwrite",
            "--source-password-file",
            pwfile_s,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    // no TLS: the server refuses, and haul says what to do
    let err = refused(db.dsn("localhost", "sslmode=disable"), &with_pw, &[]);
    assert!(
        err.contains("no encryption") && err.contains("use sslmode=require or stronger"),
        "{err}"
    );
    // a wrong password, naming where it came from
    let wrong = std::env::temp_dir().join(unique("haul_wrong_pw"));
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let err = refused(
        db.verify_full(),
        &["--source-password-file", wrong.to_str().unwrap()],
        &[],
    );
    assert!(
        err.contains("password authentication failed")
            && err.contains(&format!("the password file {}", wrong.display())),
        "{err}"
    );
    // no password anywhere
    let err = refused(db.verify_full(), &[], &[("PGPASSFILE", "/nonexistent")]);
    assert!(
        err.contains("asks for a password") && err.contains("PGPASSWORD"),
        "{err}"
    );
    // the same for a load target: no TLS, a wrong password, a CA that did not sign it
    for (target, want) in [
        (
            tgt.dsn("localhost", "sslmode=disable"),
            "use sslmode=require or stronger",
        ),
        (tgt.verify_full(), "password authentication failed"),
        (
            tgt.dsn(
                "localhost",
                &format!(
                    "sslmode=verify-full&sslrootcert={}",
                    tls_dir().join("other-ca.pem").display()
                ),
            ),
            "not signed by a CA in sslrootcert",
        ),
    ] {
        let err = refused(
            db.verify_full(),
            &[
                "--source-password-file",
                pwfile_s,
                "--load-target",
                &target,
                "--target-password-file",
                wrong.to_str().unwrap(),
            ],
            &[],
        );
        assert!(err.contains(want), "{err}");
        assert!(!err.contains(&tgt.password), "{err}");
    }
    // PGPASSWORD works as libpq's does
    let out = haul(
        &[
            "run",
            "--source",
            &db.verify_full(),
            "--table",
            "public.orders",
            "--dest",
            lake_s,
            "--overwrite",
        ],
        &[("PGPASSWORD", &db.password)],
    );
    assert!(out.status.success(), "{}", text(&out));

    // a client certificate instead of a password (role haul_cert, `cert` in pg_hba)
    let cert_dsn = format!(
        "host=localhost port={} dbname={} user=haul_cert sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        tls_port(),
        db.name,
        tls_dir().join("ca.pem").display(),
        tls_dir().join("client.crt").display(),
        tls_dir().join("client.key").display()
    );
    let out = haul(
        &[
            "run",
            "--source",
            &cert_dsn,
            "--table",
            "public.orders",
            "--dest",
            lake_s,
            "--overwrite",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_same(&db.client, "orders", &lake.join("orders")).await;
    let _ = std::fs::remove_file(&wrong);
    let _ = std::fs::remove_file(&pwfile);
}

/// A password as a URL's userinfo holds it.
fn utf8_percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The cluster reads a TLS source submitted without a password (`verify-full`), the
/// coordinator and workers finding it in their own pgpass file; the password is in no
/// Redis key, queue message, lake file, log, metric or client output; `submit` refuses a
/// connection string that holds one.
#[tokio::test]
async fn a_cluster_reads_a_tls_source_without_ever_holding_its_password() {
    let _broker = BROKER.write().await;
    let db = TlsDb::new().await;
    orders(&db).await;
    let dest = TempDest::new();
    let pgpass = std::env::temp_dir().join(unique("haul_pgpass"));
    std::fs::write(
        &pgpass,
        format!(
            "localhost:{}:{}:{}:{}\n",
            tls_port(),
            db.name,
            db.role,
            db.password.replace('\\', "\\\\").replace(':', "\\:")
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut cl = Cluster::with(None, None, &[("PGPASSFILE", pgpass.to_str().unwrap())]);
    let lake = dest.0.to_str().unwrap();

    // a password in the connection string is refused before anything is sent
    let with_pw =
        db.verify_full()
            .replacen('@', &format!(":{}@", utf8_percent_encode(&db.password)), 1);
    let out = cl.haul(&[
        "submit",
        "--source",
        &with_pw,
        "--table",
        "public.orders",
        "--dest",
        lake,
    ]);
    assert!(!out.status.success());
    let all = text(&out);
    assert!(all.contains("the cluster never carries one"), "{all}");
    assert!(!all.contains(&db.password), "{all}");

    // submitted while no worker runs: the tasks wait in the queue, to be read
    let job = cl
        .haul_ok(&[
            "submit",
            "--source",
            &db.verify_full(),
            "--table",
            "public.orders",
            "--dest",
            lake,
            "--chunk-rows",
            "5000",
        ])
        .trim()
        .to_owned();
    let queue = RabbitQueue::connect(&amqp_url(), &cl.queue, 3)
        .await
        .unwrap();
    let mut sub = queue.subscribe(100).await.unwrap();
    let mut held = Vec::new();
    while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        assert!(
            !d.body
                .windows(db.password.len())
                .any(|w| w == db.password.as_bytes()),
            "the password is in a queue message"
        );
        held.push(d);
    }
    assert!(held.len() >= 2, "{} tasks queued", held.len());
    // stop consuming first, or the tasks handed back would come straight back here
    sub.cancel().await.unwrap();
    for d in held {
        d.nack().await.unwrap();
    }
    drop((sub, queue));

    let worker_metrics = free_port();
    let wm = format!("127.0.0.1:{worker_metrics}");
    cl.start_worker("w1", &["--metrics-listen", &wm]);
    cl.start_worker("w2", &[]);
    let out = cl.haul_ok(&["watch", &job]);
    assert!(out.contains("state:     succeeded"), "{out}\n{}", cl.logs());
    assert_same(&db.client, "orders", &dest.0.join("orders")).await;

    // the password is nowhere the cluster writes or answers
    let mut answers = out;
    for args in [
        vec!["status", job.as_str()],
        vec!["status", job.as_str(), "--json"],
        vec!["jobs"],
        vec!["workers"],
    ] {
        answers.push_str(&cl.haul_ok(&args));
    }
    answers.push_str(&scrape(cl.metrics_port));
    answers.push_str(&scrape(worker_metrics));
    answers.push_str(&cl.logs());
    assert!(
        !answers.contains(&db.password),
        "the password is in an answer or log"
    );
    assert!(
        answers.contains("sslmode=verify-full"),
        "the source is shown without it"
    );
    let store = redis_values(&cl.prefix);
    assert!(store.contains(&db.name), "the job is in Redis");
    assert!(!store.contains(&db.password), "the password is in Redis");
    assert_absent_in_files(&dest.0, &db.password, "the lake");
    let _ = std::fs::remove_file(&pgpass);
}

/// Every value under `prefix` in Redis, whatever its type, as one text.
fn redis_values(prefix: &str) -> String {
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-u", &redis_url(), "--raw"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut all = String::new();
    for key in cli(&["--scan", "--pattern", &format!("{prefix}*")]).lines() {
        let value = match cli(&["TYPE", key]).trim() {
            "string" => cli(&["GET", key]),
            "hash" => cli(&["HGETALL", key]),
            "set" => cli(&["SMEMBERS", key]),
            "zset" => cli(&["ZRANGE", key, "0", "-1", "WITHSCORES"]),
            "list" => cli(&["LRANGE", key, "0", "-1"]),
            other => panic!("key {key} has type {other}"),
        };
        all.push_str(&value);
    }
    all
}

/// The cluster's own links over TLS: coordinator and workers on `amqps://` and
/// `rediss://` (the CA given with `--amqp-ca`/`--redis-ca`) run a job to the end; the job
/// lives in the TLS Redis; a worker given a CA that did not sign the broker's certificate
/// stops at once, saying so.
#[tokio::test]
async fn a_cluster_runs_over_amqps_and_rediss() {
    let _broker = BROKER.write().await;
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20000) g; ANALYZE t;",
    )
    .await;
    let dest = TempDest::new();
    let ca = tls_dir().join("ca.pem");
    let ca_s = ca.to_str().unwrap();
    let env = [
        ("HAUL_AMQP", "amqps://guest:guest@127.0.0.1:5671/%2f"),
        ("HAUL_AMQP_CA", ca_s),
        ("HAUL_REDIS", "rediss://127.0.0.1:6380/"),
        ("HAUL_REDIS_CA", ca_s),
    ];
    let mut cl = Cluster::with(None, None, &env);
    let _keys = TlsKeys(cl.prefix.clone());
    cl.start_worker("w1", &[]);
    cl.start_worker("w2", &[]);
    let mut args = submit_args(&db.dsn, dest.0.to_str().unwrap(), "overtls", "5000");
    args.push("--wait");
    let out = cl.haul_ok(&args);
    assert!(out.contains("state:     succeeded"), "{out}\n{}", cl.logs());
    assert_same(&db.client, "t", &dest.0.join("t")).await;
    let keys = tls_redis(&["--scan", "--pattern", &format!("{}*", cl.prefix)]);
    assert!(
        keys.contains("overtls"),
        "the job is not in the TLS Redis: {keys}"
    );

    // a CA that did not sign the broker's certificate: the worker stops, naming it
    let out = cl
        .command(&["worker", "--id", "w3"])
        .env("HAUL_AMQP_CA", tls_dir().join("other-ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.1:5671: the server's certificate was refused (UnknownIssuer)"),
        "{err}"
    );
}

fn tls_redis(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(tls_dir().join("ca.pem"))
        .args(["-h", "127.0.0.1", "-p", "6380"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes a test's keys from the TLS Redis.
struct TlsKeys(String);

impl Drop for TlsKeys {
    fn drop(&mut self) {
        for key in tls_redis(&["--scan", "--pattern", &format!("{}*", self.0)]).lines() {
            tls_redis(&["DEL", key]);
        }
    }
}
