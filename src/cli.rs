//! Command-line flags (each also readable from a `HAUL_*` environment variable), parsed by
//! clap, then validated into the library's option structs.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use haul_shared::JobId;
use haul_shared::jobs::{
    Compression, Granularity, Incremental, JobSpec, LoadSpec, OutputOptions, PartitionBy, Split,
};
use haul_shared::pg::{ConnInfo, Credentials, Database, Secret};

use crate::embedded::RunOptions;
use crate::progress::ProgressMode;

#[derive(Parser, Debug)]
#[command(
    name = "haul",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("HAUL_GIT_REV"), ")"),
    about = "Moves very large Postgres tables into Parquet, in parallel chunks from one snapshot"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `haul_worker=debug`.
    #[arg(long, env = "HAUL_LOG", default_value = "info", global = true)]
    pub log: String,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run one job whole in this process (coordinator + N workers, in-process queue).
    #[command(
        after_help = "Example:\n  haul run --source postgresql://etl@db/shop --table public.orders --dest s3://lake/bronze --partition-by created_at:day --workers 4"
    )]
    Run(RunArgs),
    /// Plan a job without running it: key, chunks, estimated rows per chunk, how the
    /// source would read each (EXPLAIN) and the statements; nothing is read or written.
    /// Takes `haul run`'s flags: `haul plan --source postgresql://127.0.0.1/shop --table orders --dest ./lake`.
    #[command(
        after_help = "Example:\n  haul plan --source postgresql://etl@db/shop --table public.orders --dest ./lake"
    )]
    Plan(RunArgs),
    /// Serve the cluster's gRPC API: plan jobs, queue their chunks, commit them.
    #[command(
        after_help = "Example:\n  haul coordinator --listen 0.0.0.0:50051 --amqp amqp://haul:secret@mq:5672/%2f --redis redis://cache:6379/ --metrics-listen 0.0.0.0:9090"
    )]
    Coordinator(CoordinatorArgs),
    /// Extract chunks from the queue (one process per machine; scale freely).
    #[command(
        after_help = "Example:\n  haul worker --coordinator http://coord-a:50051,http://coord-b:50051 --slots 4"
    )]
    Worker(WorkerArgs),
    /// Serve Arrow Flight: load the chunks workers stream into a target Postgres, once each.
    #[command(
        after_help = "Example:\n  haul loader --listen 0.0.0.0:50052 --target postgresql://loader@warehouse/analytics"
    )]
    Loader(LoaderArgs),
    /// Submit a job to the coordinator (`--wait` follows it and sets the exit code).
    #[command(
        after_help = "Example:\n  haul submit --source postgresql://etl@db/shop --table public.orders --dest s3://lake/bronze --wait"
    )]
    Submit(SubmitArgs),
    /// List the coordinator's jobs.
    #[command(after_help = "Example:\n  haul jobs --json")]
    Jobs(ClientArgs),
    /// Show one job.
    #[command(after_help = "Example:\n  haul status orders-2026-11-30")]
    Status(JobCmdArgs),
    /// Follow one job until it ends (exit code 0 only if it succeeded).
    #[command(after_help = "Example:\n  haul watch orders-2026-11-30")]
    Watch(JobCmdArgs),
    /// Cancel a job (its running chunks stop within seconds).
    #[command(after_help = "Example:\n  haul cancel orders-2026-11-30")]
    Cancel(JobCmdArgs),
    /// Pause a job: no new chunks start; running ones finish.
    #[command(after_help = "Example:\n  haul pause orders-2026-11-30")]
    Pause(JobCmdArgs),
    /// Resume a paused job.
    #[command(after_help = "Example:\n  haul resume orders-2026-11-30")]
    Resume(JobCmdArgs),
    /// List the workers: id, host, slots, in-flight chunks, last heartbeat, state.
    #[command(after_help = "Example:\n  haul workers --json")]
    Workers(ClientArgs),
    /// Drain a worker: no new chunks, in-flight ones finish, then it exits 0.
    #[command(after_help = "Example:\n  haul drain node-7-1234 --wait")]
    Drain(DrainArgs),
    /// Withdraw a drain order that the worker has not acted on yet.
    #[command(after_help = "Example:\n  haul undrain node-7-1234")]
    Undrain(WorkerCmdArgs),
    /// A job's dead-lettered chunks: list them, queue them again, or forget them.
    #[command(after_help = "Example:\n  haul dlq list orders-2026-11-30")]
    Dlq(DlqArgs),
    /// List what a lake holds, from its manifests: every job (embedded or cluster), its
    /// table, rows, files, size, increment window and times, committed or not.
    /// `haul ls ./lake`, `haul ls s3://bucket/lake --json` (JSON Lines, one job a line).
    #[command(after_help = "Example:\n  haul ls s3://lake/bronze --json")]
    Ls(LsArgs),
    /// Show one table of a lake: its committed export (job, rows, files, size, snapshot,
    /// partitions, increment window), its columns with their Postgres and Arrow types, and
    /// every job that wrote to it. `haul show ./lake/orders`, `haul show s3://bucket/lake/orders --json`.
    #[command(after_help = "Example:\n  haul show ./lake/orders")]
    Show(ShowArgs),
    /// Reconcile a committed export with its source, chunk by chunk: Postgres counts and
    /// checksums each chunk's rows, haul reads the chunk's Parquet back and does the same;
    /// exits 1 naming each chunk that differs.
    /// `haul verify ./lake/orders --source postgresql://127.0.0.1/shop`.
    #[command(
        after_help = "Example:\n  haul verify ./lake/orders --source postgresql://etl@db/shop"
    )]
    Verify(VerifyArgs),
    /// List what a lake holds that nothing needs (staged parts of attempts that never
    /// committed, parts of exports since replaced, parts no table log names); with
    /// `--delete`, finish or roll back table commits cut short, then remove it. Records
    /// and logs are never touched. `haul gc ./lake --delete`.
    #[command(after_help = "Example:\n  haul gc ./lake --older-than 24h --delete")]
    Gc(GcArgs),
    /// Print a shell completion script, e.g. `haul completions bash > /etc/bash_completion.d/haul`.
    #[command(after_help = "Example:\n  haul completions bash > /etc/bash_completion.d/haul")]
    Completions(CompletionsArgs),
}

#[derive(Args, Debug)]
pub struct DlqArgs {
    /// `list`, `requeue` (a running or paused job's; an ended job is finished with
    /// `submit --resume`) or `purge`.
    #[arg(value_enum)]
    pub action: crate::client::DlqAction,
    /// The job id.
    pub job: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// How to reach the coordinator.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Coordinator address (https:// for TLS); several, comma-separated, for an active
    /// coordinator and its standbys: the active one is used, whichever it is.
    #[arg(
        long,
        env = "HAUL_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// Bearer token the coordinator requires, if any.
    #[arg(long, env = "HAUL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// coordinator.
    #[arg(long, env = "HAUL_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Print JSON (one object, or an array for lists) instead of text, for scripts and
    /// orchestrators.
    #[arg(long, env = "HAUL_JSON")]
    pub json: bool,
}

impl ClientArgs {
    pub fn options(&self) -> haul_shared::rpc::ClientOptions {
        haul_shared::rpc::ClientOptions {
            url: self.coordinator.clone(),
            token: self.token.clone().map(Secret::new),
            tls_ca: self.tls_ca.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct JobCmdArgs {
    /// The job id.
    pub job: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct WorkerCmdArgs {
    /// The worker id, as `haul workers` shows it.
    pub worker: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The worker id, as `haul workers` shows it.
    pub worker: String,
    /// Abort the worker's in-flight chunks and hand them back instead of letting them finish.
    #[arg(long, env = "HAUL_REQUEUE_IN_FLIGHT")]
    pub requeue_in_flight: bool,
    /// Wait until the worker has drained and left.
    #[arg(long, env = "HAUL_WAIT")]
    pub wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The broker and the store the cluster roles share.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "HAUL_AMQP",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp: String,
    /// Redis URL.
    #[arg(
        long,
        env = "HAUL_REDIS",
        default_value = "redis://127.0.0.1:6379/",
        hide_env_values = true
    )]
    pub redis: String,
    /// Chunk queue name (its dead-letter queue is `<name>.dlq`).
    #[arg(long, env = "HAUL_QUEUE", default_value = "haul.chunks")]
    pub queue: String,
    /// Prefix of every Redis key haul writes.
    #[arg(long, env = "HAUL_REDIS_PREFIX", default_value = "haul:")]
    pub redis_prefix: String,
    /// CA certificate (PEM) an amqps:// broker's certificate must chain to (default: the
    /// system's CAs).
    #[arg(long, env = "HAUL_AMQP_CA")]
    pub amqp_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for an amqps:// broker that asks for one; with --amqp-key.
    #[arg(long, env = "HAUL_AMQP_CERT", requires = "amqp_key")]
    pub amqp_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "HAUL_AMQP_KEY", requires = "amqp_cert")]
    pub amqp_key: Option<std::path::PathBuf>,
    /// CA certificate (PEM) a rediss:// server's certificate must chain to (default: the
    /// system's CAs).
    #[arg(long, env = "HAUL_REDIS_CA")]
    pub redis_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a rediss:// server that asks for one; with --redis-key.
    #[arg(long, env = "HAUL_REDIS_CERT", requires = "redis_key")]
    pub redis_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "HAUL_REDIS_KEY", requires = "redis_cert")]
    pub redis_key: Option<std::path::PathBuf>,
    /// Deliveries of one chunk task that end without a verdict (its worker died) before
    /// the task is dead-lettered as a poison chunk; the same on every role. (Failed
    /// attempts are retried within the job's --retry-for instead.)
    #[arg(long, env = "HAUL_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
}

impl ClusterArgs {
    pub fn amqp_tls(&self) -> haul_shared::links::LinkTls {
        haul_shared::links::LinkTls {
            ca: self.amqp_ca.clone(),
            cert: self.amqp_cert.clone(),
            key: self.amqp_key.clone(),
        }
    }

    pub fn redis_tls(&self) -> haul_shared::links::LinkTls {
        haul_shared::links::LinkTls {
            ca: self.redis_ca.clone(),
            cert: self.redis_cert.clone(),
            key: self.redis_key.clone(),
        }
    }
}

/// How a role that reads jobs' sources (run, coordinator, worker) finds their password:
/// this flag, then `PGPASSWORD`, then the pgpass file (`PGPASSFILE`, `~/.pgpass`). Jobs
/// never carry one.
#[derive(Args, Debug, Clone)]
pub struct SourceLogin {
    /// File holding the source's password, read again at every connection (a rotated
    /// secret or a short-lived token keeps working).
    #[arg(long, env = "HAUL_SOURCE_PASSWORD_FILE")]
    pub source_password_file: Option<std::path::PathBuf>,
}

impl SourceLogin {
    pub fn credentials(&self) -> haul_shared::pg::Credentials {
        haul_shared::pg::Credentials::from_file(self.source_password_file.clone())
    }
}

/// How a server role (coordinator, loader) authenticates its callers.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Require this bearer token on every RPC.
    #[arg(long, env = "HAUL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS certificate (PEM); with --tls-key, serve TLS.
    #[arg(long, env = "HAUL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "HAUL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ServeArgs {
    pub fn token(&self) -> Option<Secret> {
        self.token.clone().map(Secret::new)
    }

    pub fn tls(&self) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        self.tls_cert.clone().zip(self.tls_key.clone())
    }
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "HAUL_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub login: SourceLogin,
    /// Chunks the cluster extracts at once (workers × slots), so planning makes enough chunks.
    #[arg(long, env = "HAUL_PARALLELISM", default_value_t = 4, value_parser = workers_count)]
    pub parallelism: usize,
    /// CA certificate (PEM) to trust for flight+tls:// loaders (the coordinator prepares each
    /// job's load through one).
    #[arg(long, env = "HAUL_LOADER_TLS_CA")]
    pub loader_tls_ca: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on http://<addr>/metrics.
    #[arg(long, env = "HAUL_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The address clients reach this coordinator at, which a standby names when it
    /// answers (default: `--listen`'s, with this host's name for an unspecified address).
    #[arg(long, env = "HAUL_ADVERTISE")]
    pub advertise: Option<String>,
}

impl CoordinatorArgs {
    /// `--advertise`, or the URL `--listen` implies.
    pub fn advertise_url(&self) -> String {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        let scheme = if self.serve.tls().is_some() {
            "https"
        } else {
            "http"
        };
        let host = if self.listen.ip().is_unspecified() {
            haul_shared::workers::hostname()
        } else {
            self.listen.ip().to_string()
        };
        format!("{scheme}://{host}:{}", self.listen.port())
    }
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub login: SourceLogin,
    /// Chunks this worker extracts at once (and its queue prefetch).
    #[arg(long, env = "HAUL_SLOTS", default_value_t = 2, value_parser = workers_count)]
    pub slots: usize,
    /// Worker id; `<host>-<pid>` by default.
    #[arg(long, env = "HAUL_WORKER_ID")]
    pub id: Option<String>,
    /// Chunk lease time-to-live in seconds (renewed every third of it).
    #[arg(long, env = "HAUL_LEASE_TTL_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_ttl_secs: u64,
    /// On drain, abort chunks still running after this many seconds (default: wait for them).
    #[arg(long, env = "HAUL_DRAIN_GRACE_SECS")]
    pub drain_grace_secs: Option<u64>,
    /// Serve Prometheus metrics on http://<addr>/metrics.
    #[arg(long, env = "HAUL_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub job: JobArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Follow the job until it ends; exit non-zero with the reason if it fails.
    #[arg(long, env = "HAUL_WAIT")]
    pub wait: bool,
    /// Progress display with --wait.
    #[arg(long, env = "HAUL_PROGRESS", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Chunks extracted at once.
    #[arg(long, env = "HAUL_WORKERS", default_value_t = 2, value_parser = workers_count)]
    pub workers: usize,
    /// Progress display.
    #[arg(long, env = "HAUL_PROGRESS", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Deliveries of one chunk task that end without a verdict before it is given up (failed
    /// attempts are retried within --retry-for instead).
    #[arg(long, env = "HAUL_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Chunk lease time-to-live in seconds (renewed every third of it).
    #[arg(long, env = "HAUL_LEASE_TTL_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_ttl_secs: u64,
    #[command(flatten)]
    pub login: SourceLogin,
    /// File holding --load-target's password, read again at every connection.
    #[arg(long, env = "HAUL_TARGET_PASSWORD_FILE", requires = "load_target")]
    pub target_password_file: Option<std::path::PathBuf>,
    /// Also load the rows into this Postgres (an in-process loader), e.g. postgresql://host/warehouse.
    #[arg(
        long,
        env = "HAUL_LOAD_TARGET",
        hide_env_values = true,
        conflicts_with = "load"
    )]
    pub load_target: Option<String>,
    /// Schema of haul's load ledger tables in the target.
    #[arg(long, env = "HAUL_LEDGER_SCHEMA", default_value = "haul")]
    pub ledger_schema: String,
    /// Print the summary as JSON, for scripts and orchestrators.
    #[arg(long, env = "HAUL_JSON")]
    pub json: bool,
    /// Plan the job and show its chunks, their estimated rows and how the source would
    /// read each (EXPLAIN), without extracting or writing anything (same as `haul plan`).
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// The lake: a path, `file:///abs` or `s3://bucket/prefix` (what jobs had as --dest).
    pub dest: String,
    /// Print JSON Lines (one object per job) instead of a table, for scripts and lineage.
    #[arg(long, env = "HAUL_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The table's folder in the lake: `<dest>/<table>`, e.g. `./lake/orders` or
    /// `s3://bucket/lake/orders`.
    pub table: String,
    /// Print one JSON object instead of text.
    #[arg(long, env = "HAUL_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The table's folder in the lake: `<dest>/<table>`, e.g. `./lake/orders`.
    pub table: String,
    /// The source the export came from (a password in it stays in this process).
    #[arg(long, env = "HAUL_SOURCE", hide_env_values = true)]
    pub source: String,
    #[command(flatten)]
    pub login: SourceLogin,
    /// Verify this job of the export (an earlier increment of a series); the last one
    /// otherwise. Rows updated after an increment moved to a later window, so an older
    /// increment differs from the source by them.
    #[arg(long)]
    pub job: Option<String>,
    /// Chunks verified at once (a source session and a Parquet reader each).
    #[arg(long, env = "HAUL_WORKERS", default_value_t = 2, value_parser = workers_count)]
    pub workers: usize,
    /// Print the report as one JSON object (every chunk's counts and checksums).
    #[arg(long, env = "HAUL_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// The lake: a path, `file:///abs` or `s3://bucket/prefix`.
    pub dest: String,
    /// Remove what is listed (without it, only list: a dry run).
    #[arg(long)]
    pub delete: bool,
    /// Objects no record accounts for are garbage only once older than this (a running
    /// attempt's parts are young), and a table commit cut short is recovered only once its
    /// intent is: `0`, `90s`, `30m`, `6h`.
    #[arg(long, default_value = "6h", value_parser = age)]
    pub older_than: Secs,
    /// Print the report as one JSON object.
    #[arg(long, env = "HAUL_JSON")]
    pub json: bool,
}

/// A duration that may be zero (`--older-than 0`).
fn age(s: &str) -> Result<Secs, String> {
    match s.trim() {
        "0" | "0s" | "0m" | "0h" => Ok(Secs(0)),
        t => t.parse(),
    }
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct LoaderArgs {
    /// Address to serve Arrow Flight on.
    #[arg(long, env = "HAUL_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: std::net::SocketAddr,
    /// Target Postgres: a postgresql:// URL or key=value connection string, libpq's PG*
    /// variables filling the rest (the password is never logged).
    #[arg(long, env = "HAUL_TARGET", hide_env_values = true)]
    pub target: String,
    /// File holding the target's password, read again at every connection (else
    /// PGPASSWORD, then ~/.pgpass).
    #[arg(long, env = "HAUL_TARGET_PASSWORD_FILE")]
    pub target_password_file: Option<std::path::PathBuf>,
    /// Schema of haul's load ledger tables in the target.
    #[arg(long, env = "HAUL_LEDGER_SCHEMA", default_value = "haul")]
    pub ledger_schema: String,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Serve Prometheus metrics on http://<addr>/metrics.
    #[arg(long, env = "HAUL_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What to extract and how: the flags `run` and `submit` share.
#[derive(Args, Debug)]
pub struct JobArgs {
    /// Source Postgres: a postgresql:// URL or key=value connection string with libpq's
    /// options (sslmode, sslrootcert, …); libpq's PG* variables fill what it leaves out.
    /// The password comes from PGPASSWORD, ~/.pgpass or --source-password-file; `haul run`
    /// also takes one in the URL (never logged or stored), `haul submit` refuses it.
    /// With --resume it may be left out: the job's own is used.
    #[arg(
        long,
        env = "HAUL_SOURCE",
        hide_env_values = true,
        required_unless_present = "resume"
    )]
    pub source: Option<String>,
    /// Table to extract: `schema.table` (quote mixed-case names: '"Sales"."Orders"').
    #[arg(long, env = "HAUL_TABLE", required_unless_present = "resume")]
    pub table: Option<String>,
    /// Destination: a path, file:///abs/path, or s3://bucket/prefix [default: file://./lake;
    /// with loading and no --dest, no Parquet is written and ./lake keeps only the job's manifests].
    #[arg(long, env = "HAUL_DEST")]
    pub dest: Option<String>,
    /// Columns to extract (comma-separated); all by default.
    #[arg(long, env = "HAUL_COLUMNS", value_delimiter = ',')]
    pub columns: Vec<String>,
    /// Key column(s) to split on; the primary key by default.
    #[arg(long, env = "HAUL_KEY", value_delimiter = ',')]
    pub key: Vec<String>,
    /// How to split the table: `key` ranges (resumable) or heap page `ctid` ranges (cheapest
    /// for the source, but an interrupted job must be rerun, not resumed).
    #[arg(long, env = "HAUL_SPLIT", value_enum, default_value_t = SplitArg::Key)]
    pub split: SplitArg,
    /// Cast a column in the source query, `col=type` (e.g. `--cast shape=text`); repeatable,
    /// or comma-separated (a type's own commas, as in `numeric(12,2)`, are kept).
    #[arg(long = "cast", env = "HAUL_CAST")]
    pub casts: Vec<Casts>,
    /// Hive-partition the output by a date/timestamp column: `col:day|month|year[:as=<field>]`
    /// (folders `<field>=...`, `dt` unless named; it must not name an exported column).
    #[arg(long, env = "HAUL_PARTITION_BY", value_parser = parse_partition)]
    pub partition_by: Option<PartitionBy>,
    /// Target rows per chunk.
    #[arg(long, env = "HAUL_CHUNK_ROWS", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_rows: u64,
    /// Rows per Arrow batch.
    #[arg(long, env = "HAUL_BATCH_ROWS", default_value_t = 32768, value_parser = batch_rows)]
    pub batch_rows: usize,
    /// Rows per Parquet row group.
    #[arg(long, env = "HAUL_ROW_GROUP_ROWS", default_value_t = 128 * 1024, value_parser = row_group_rows)]
    pub row_group_rows: usize,
    /// Rows per Parquet file before the next part starts.
    #[arg(long, env = "HAUL_MAX_FILE_ROWS", default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_file_rows: u64,
    /// Bytes per Parquet file before the next part starts (suffixes KiB, MiB, GiB).
    #[arg(long, env = "HAUL_MAX_FILE_BYTES", default_value = "512MiB")]
    pub max_file_bytes: ByteSize,
    /// Parquet compression: snappy, zstd, zstd:<level>, none.
    #[arg(long, env = "HAUL_COMPRESSION", default_value = "snappy", value_parser = parse_compression)]
    pub compression: Compression,
    /// Name the job (a-z, 0-9, -, _); generated by default. Re-running a succeeded job is a no-op.
    #[arg(long, env = "HAUL_JOB_ID")]
    pub job_id: Option<String>,
    /// Finish an interrupted job: skip its committed chunks, extract the rest.
    #[arg(
        long,
        env = "HAUL_RESUME",
        value_name = "JOB",
        conflicts_with = "job_id"
    )]
    pub resume: Option<String>,
    /// With --resume: read the remaining chunks under a new snapshot (the old one died with its process).
    #[arg(long, env = "HAUL_FRESH_SNAPSHOT", requires = "resume")]
    pub fresh_snapshot: bool,
    /// Do not export a snapshot: each chunk reads the table as of its own start (for sources that cannot export one).
    #[arg(long, env = "HAUL_NO_SNAPSHOT")]
    pub no_snapshot: bool,
    /// Replace an earlier export of the same table in --dest once this job commits.
    #[arg(long, env = "HAUL_OVERWRITE")]
    pub overwrite: bool,
    /// Local destinations: fsync part files and manifests before each commit (survives power loss).
    #[arg(long, env = "HAUL_FSYNC")]
    pub fsync: bool,
    /// Also load every chunk into a target database through these loaders
    /// (`flight://host:port`, `flight+tls://host:port`; comma-separated).
    #[arg(long, env = "HAUL_LOAD", value_delimiter = ',')]
    pub load: Vec<String>,
    /// Table to load into (`schema.table`); the source table's name by default.
    #[arg(long, env = "HAUL_TARGET_TABLE")]
    pub target_table: Option<String>,
    /// Create the target table from the source's columns if it does not exist.
    #[arg(long, env = "HAUL_CREATE_TABLE")]
    pub create_table: bool,
    /// Empty the target table before the job loads its first chunk (not again on --resume).
    #[arg(long, env = "HAUL_TRUNCATE_FIRST")]
    pub truncate_first: bool,
    /// Only load the target: write no Parquet (the job's small manifests still go to --dest).
    #[arg(long, env = "HAUL_NO_PARQUET")]
    pub no_parquet: bool,
    /// Add `_haul_job_id` (text) and `_haul_extracted_at` (timestamptz: the job's snapshot
    /// time) to every row of the Parquet output, for freshness checks (dbt's
    /// `loaded_at_field`), de-duplication and lineage downstream.
    #[arg(long, env = "HAUL_LINEAGE_COLUMNS")]
    pub lineage_columns: bool,
    /// Extract only the rows whose watermark column (a timestamptz/timestamp set on every
    /// change, e.g. `updated_at`) moved past the last increment in --dest; the first
    /// increment takes everything up to now.
    #[arg(long, env = "HAUL_INCREMENTAL", value_name = "COLUMN", conflicts_with_all = ["overwrite", "load"])]
    pub incremental: Option<String>,
    /// With --incremental: stop the window this many seconds before the snapshot, for rows
    /// whose watermark comes from a clock that runs late (an application's).
    #[arg(
        long,
        env = "HAUL_LAG_SECS",
        default_value_t = 0,
        requires = "incremental"
    )]
    pub lag_secs: u64,
    /// How long a chunk's transient failures (a source or target failover, a loader or
    /// object store briefly down) are retried, with backoff from 1 s to 60 s, before the
    /// chunk fails for good: `90s`, `10m`, `1h`.
    #[arg(long, env = "HAUL_RETRY_FOR", default_value = "10m")]
    pub retry_for: Secs,
}

/// A duration in whole seconds: `90`, `90s`, `10m`, `2h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secs(pub u64);

impl std::str::FromStr for Secs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
        let mult = match unit.trim() {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(format!("invalid duration {s:?}: use e.g. 90s, 10m or 2h")),
        };
        match n.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Secs(n * mult)),
            _ => Err(format!("invalid duration {s:?}: use e.g. 90s, 10m or 2h")),
        }
    }
}

/// How a split is named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    /// Key ranges: resumable under a new snapshot.
    Key,
    /// Heap page ranges: cheapest for the source, but an interrupted job must be rerun.
    Ctid,
}

impl From<SplitArg> for Split {
    fn from(s: SplitArg) -> Self {
        match s {
            SplitArg::Key => Split::Key,
            SplitArg::Ctid => Split::Ctid,
        }
    }
}

/// A positive size in bytes: `512MiB`, `2GiB`, `1000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match parse_bytes(s)? {
            0 => Err(format!("invalid size {s:?}: it must be positive")),
            n => Ok(ByteSize(n)),
        }
    }
}

/// A count that must be at least 1.
/// A count in `1..=max` (the limits live in `haul_shared::jobs`, which the coordinator
/// checks submitted jobs against too).
fn count_in(s: &str, max: u64) -> Result<usize, String> {
    let n = s.parse::<u64>().map_err(|e| e.to_string())?;
    match n {
        0 => Err("must be at least 1".into()),
        n if n > max => Err(format!("must be at most {max}")),
        n => Ok(n as usize),
    }
}

fn batch_rows(s: &str) -> Result<usize, String> {
    count_in(s, haul_shared::jobs::MAX_BATCH_ROWS)
}

fn row_group_rows(s: &str) -> Result<usize, String> {
    count_in(s, haul_shared::jobs::MAX_ROW_GROUP_ROWS)
}

fn workers_count(s: &str) -> Result<usize, String> {
    count_in(s, haul_shared::jobs::MAX_WORKERS)
}

/// `column=type[,column=type...]`: split at the commas outside parentheses, so a type's
/// own commas (`numeric(12,2)`) stay with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Casts(pub Vec<(String, String)>);

impl std::str::FromStr for Casts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        let (mut depth, mut start) = (0i32, 0);
        let mut push = |c: &str| {
            c.split_once('=')
                .map(|(c, t)| (c.trim(), t.trim()))
                .filter(|(c, t)| !c.is_empty() && !t.is_empty())
                .map(|(c, t)| out.push((c.to_owned(), t.to_owned())))
                .ok_or_else(|| {
                    format!("invalid --cast {c:?}: use <column>=<type>, e.g. shape=text")
                })
        };
        for (i, ch) in s.char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    push(&s[start..i])?;
                    start = i + 1;
                }
                _ => {}
            }
        }
        push(&s[start..])?;
        Ok(Casts(out))
    }
}

/// Parses `512MiB`, `2GiB`, `1000`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: use e.g. 512MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {s:?}: use KiB, MiB or GiB"
            ));
        }
    };
    Ok(n * mult)
}

pub fn parse_compression(s: &str) -> Result<Compression, String> {
    match s.split_once(':') {
        None if s == "snappy" => Ok(Compression::Snappy),
        None if s == "none" => Ok(Compression::None),
        None if s == "zstd" => Ok(Compression::Zstd { level: 3 }),
        Some(("zstd", level)) => level
            .parse::<i32>()
            .ok()
            .filter(|l| (1..=22).contains(l))
            .map(|level| Compression::Zstd { level })
            .ok_or_else(|| format!("invalid zstd level {level:?}: use 1-22")),
        _ => Err(format!(
            "invalid --compression {s:?}: use snappy, zstd, zstd:<level> or none"
        )),
    }
}

/// `<column>[:day|month|year][:as=<field>]`: the granularity is `day` unless given, the
/// partition field (the folders' name) `dt` unless given.
pub fn parse_partition(s: &str) -> Result<PartitionBy, String> {
    let mut parts = s.split(':');
    let column = parts.next().unwrap_or_default();
    if column.is_empty() {
        return Err("--partition-by needs a column: <column>:day".into());
    }
    let mut p = PartitionBy::new(column, Granularity::Day);
    for part in parts {
        match part {
            "day" => p.granularity = Granularity::Day,
            "month" => p.granularity = Granularity::Month,
            "year" => p.granularity = Granularity::Year,
            _ => match part.strip_prefix("as=") {
                Some(field) => p.field = field.to_owned(),
                None => {
                    return Err(format!(
                        "invalid --partition-by part {part:?}: use <column>:day|month|year[:as=<field>]"
                    ));
                }
            },
        }
    }
    Ok(p)
}

/// A job as the flags describe it.
pub struct JobRequest {
    pub spec: JobSpec,
    pub job_id: Option<JobId>,
    pub resume: bool,
    pub fresh_snapshot: bool,
    pub overwrite: bool,
    /// `--dest` was given (without it, a loading job writes no Parquet).
    pub dest_given: bool,
    /// A password given in `--source`: `haul run` keeps it in its process, `haul submit`
    /// refuses it.
    pub source_password: Option<Secret>,
}

/// The destination when none is given.
pub const DEFAULT_DEST: &str = "file://./lake";

/// A local destination (a path, or `file://` with a relative path) as an absolute
/// `file://` URL, resolved in this process's working directory; any other URL as it is.
/// `haul submit` sends this, since the coordinator and workers run elsewhere.
pub fn absolute_dest(dest: &str) -> Result<String, String> {
    let Some(path) = haul_shared::lake::local_path(dest) else {
        return Ok(dest.to_owned());
    };
    let abs = haul_shared::lake::absolute_path(std::path::Path::new(path))
        .map_err(|e| format!("--dest {dest}: cannot resolve it here: {e}"))?;
    Ok(format!("file://{}", abs.display()))
}

impl TryFrom<JobArgs> for JobRequest {
    type Error = String;

    fn try_from(a: JobArgs) -> Result<Self, String> {
        let casts: BTreeMap<String, String> = a.casts.into_iter().flat_map(|c| c.0).collect();
        let job_id = a
            .resume
            .as_deref()
            .or(a.job_id.as_deref())
            .map(JobId::parse)
            .transpose()?;
        let (source, source_password) = match &a.source {
            Some(s) => ConnInfo::from_user(s).map_err(|e| format!("--source: {e}"))?,
            // a resume without one: the job's own, from its plan
            None => (ConnInfo::default(), None),
        };
        let endpoints = a
            .load
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| haul_shared::rpc::flight_url(e).map_err(|m| format!("--load {m}")))
            .collect::<Result<Vec<_>, _>>()?;
        // loading with no destination given: the target is the only output
        let dest_given = a.dest.is_some();
        let no_parquet = a.no_parquet || (!dest_given && !endpoints.is_empty());
        let load = (!endpoints.is_empty()
            || a.target_table.is_some()
            || a.create_table
            || a.truncate_first
            || no_parquet)
            .then(|| LoadSpec {
                endpoints,
                target_table: a.target_table.unwrap_or_default(),
                create_table: a.create_table,
                truncate_first: a.truncate_first,
            });
        Ok(JobRequest {
            spec: JobSpec {
                source,
                table: a.table.unwrap_or_default(),
                columns: a.columns,
                key: a.key,
                split: a.split.into(),
                casts,
                dest: a.dest.unwrap_or_else(|| DEFAULT_DEST.into()),
                chunk_rows: a.chunk_rows,
                output: OutputOptions {
                    compression: a.compression,
                    batch_rows: a.batch_rows,
                    row_group_rows: a.row_group_rows,
                    max_file_rows: a.max_file_rows,
                    max_file_bytes: a.max_file_bytes.0,
                    partition_by: a.partition_by,
                    fsync: a.fsync,
                    parquet: !no_parquet,
                    lineage: a.lineage_columns,
                },
                use_snapshot: !a.no_snapshot,
                load,
                incremental: a.incremental.map(|column| Incremental {
                    column,
                    lag_secs: a.lag_secs,
                }),
                retry_for_secs: a.retry_for.0,
            },
            job_id,
            resume: a.resume.is_some(),
            fresh_snapshot: a.fresh_snapshot,
            overwrite: a.overwrite,
            dest_given,
            source_password,
        })
    }
}

impl TryFrom<RunArgs> for RunOptions {
    type Error = String;

    fn try_from(a: RunArgs) -> Result<Self, String> {
        let mut j = JobRequest::try_from(a.job)?;
        let load_target = a
            .load_target
            .as_deref()
            .map(|t| Database::from_user(t, a.target_password_file.clone()))
            .transpose()
            .map_err(|e| format!("--load-target: {e}"))?;
        if load_target.is_some() {
            j.spec.load.get_or_insert_with(|| LoadSpec {
                endpoints: Vec::new(),
                target_table: String::new(),
                create_table: false,
                truncate_first: false,
            });
            if !j.dest_given {
                // loading with no destination given: the target is the only output
                j.spec.output.parquet = false;
            }
        } else {
            j.spec.check_load()?;
        }
        Ok(RunOptions {
            spec: j.spec,
            job_id: j.job_id,
            resume: j.resume,
            fresh_snapshot: j.fresh_snapshot,
            overwrite: j.overwrite,
            workers: a.workers,
            max_attempts: a.max_attempts,
            lease_ttl: Duration::from_secs(a.lease_ttl_secs),
            progress: a.progress,
            source_credentials: Credentials {
                password: j.source_password,
                password_file: a.login.source_password_file,
            },
            load_target,
            ledger_schema: a.ledger_schema,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_options(args: &[&str]) -> Result<RunOptions, String> {
        let mut argv = vec![
            "haul",
            "run",
            "--source",
            "postgresql://u@h/db",
            "--table",
            "t",
        ];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.cmd {
            Cmd::Run(a) => RunOptions::try_from(a),
            _ => unreachable!(),
        }
    }

    /// Regression: `--batch-rows 1000000000000` aborted the process allocating its
    /// builders; sizes and counts are bounded, with the limit in the message.
    #[test]
    fn sizes_and_counts_are_bounded() {
        let e = run_options(&["--batch-rows", "1000000000000"])
            .err()
            .unwrap();
        assert!(e.contains("must be at most 1048576"), "{e}");
        assert!(run_options(&["--batch-rows", "1048576"]).is_ok());
        let e = run_options(&["--row-group-rows", "99999999999"])
            .err()
            .unwrap();
        assert!(e.contains("must be at most"), "{e}");
        let e = run_options(&["--workers", "100000"]).err().unwrap();
        assert!(e.contains("must be at most 1024"), "{e}");
        assert!(run_options(&["--workers", "0"]).is_err());
    }

    /// Every command's help ends with an example that parses, and every value of every
    /// enum flag says what it means.
    #[test]
    fn every_command_has_an_example_that_parses_and_described_values() {
        use clap::CommandFactory;
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let example = help
                .strip_prefix("Example:\n  ")
                .unwrap_or_else(|| panic!("haul {name} has no example"));
            let argv: Vec<&str> = example
                .split(" > ")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            assert_eq!(argv[..2], ["haul", name]);
            if let Err(e) = Cli::try_parse_from(&argv) {
                panic!("haul {name}'s example does not parse: {e}");
            }
            for arg in sub
                .get_arguments()
                .filter(|a| a.get_action().takes_values())
            {
                for v in arg.get_possible_values() {
                    if ["bash", "zsh", "fish", "elvish", "powershell"].contains(&v.get_name()) {
                        continue; // clap_complete's shells
                    }
                    assert!(
                        v.get_help().is_some(),
                        "haul {name} --{}: value {} is not described",
                        arg.get_id(),
                        v.get_name()
                    );
                }
            }
        }
    }

    #[test]
    fn relative_destinations_resolve_where_they_were_typed() {
        let cwd = std::env::current_dir().unwrap();
        let here = |p: &str| format!("file://{}", cwd.join(p).display());
        assert_eq!(absolute_dest("./lake").unwrap(), here("lake"));
        assert_eq!(absolute_dest("file://./lake").unwrap(), here("lake"));
        assert_eq!(absolute_dest("lake/x").unwrap(), here("lake/x"));
        assert_eq!(absolute_dest("/data/lake").unwrap(), "file:///data/lake");
        assert_eq!(
            absolute_dest("file:///data/lake").unwrap(),
            "file:///data/lake"
        );
        assert_eq!(absolute_dest("s3://b/p").unwrap(), "s3://b/p");
    }

    #[test]
    fn loading_without_a_destination_writes_no_parquet() {
        let t = "--load-target=postgresql://u@h/wh";
        let o = run_options(&[t]).unwrap();
        assert!(!o.spec.output.parquet);
        assert_eq!(o.spec.dest, DEFAULT_DEST);
        assert!(
            run_options(&[t, "--dest", "/tmp/x"])
                .unwrap()
                .spec
                .output
                .parquet
        );
        assert!(
            !run_options(&[t, "--dest", "/tmp/x", "--no-parquet"])
                .unwrap()
                .spec
                .output
                .parquet
        );
        let o = run_options(&["--load", "flight://a:1,flight://b:2"]).unwrap();
        assert!(!o.spec.output.parquet);
        assert_eq!(o.spec.load.unwrap().endpoints, ["http://a:1", "http://b:2"]);
        assert!(run_options(&[]).unwrap().spec.output.parquet);
        assert!(run_options(&["--create-table"]).is_err());
    }

    #[test]
    fn lineage_columns_are_for_parquet_only() {
        let o = run_options(&["--lineage-columns"]).unwrap();
        assert!(o.spec.output.lineage);
        let err = run_options(&[
            "--lineage-columns",
            "--dest",
            "/tmp/x",
            "--load",
            "flight://a:1",
        ])
        .unwrap_err();
        assert!(err.contains("--lineage-columns"), "{err}");
    }

    #[test]
    fn parses_option_values() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(
            parse_compression("zstd:9").unwrap(),
            Compression::Zstd { level: 9 }
        );
        assert!(parse_compression("lz5").is_err());
        let p = parse_partition("created_at:month").unwrap();
        assert_eq!(
            (p.column.as_str(), p.granularity),
            ("created_at", Granularity::Month)
        );
        assert_eq!(parse_partition("d").unwrap().granularity, Granularity::Day);
        assert!(parse_partition("d:week").is_err());
        let p = parse_partition("at:month:as=load_month").unwrap();
        assert_eq!(
            (p.column.as_str(), p.granularity, p.field.as_str()),
            ("at", Granularity::Month, "load_month")
        );
        assert_eq!(parse_partition("at").unwrap().field, "dt");
    }

    #[test]
    fn flag_values_are_typed_and_zero_is_refused() {
        let o = run_options(&[
            "--split",
            "ctid",
            "--cast",
            "a=text,b=int",
            "--max-file-bytes",
            "2GiB",
            "--compression",
            "zstd:5",
            "--partition-by",
            "at:year",
        ])
        .unwrap();
        assert_eq!(o.spec.split, Split::Ctid);
        assert_eq!(o.spec.casts["b"], "int");
        assert_eq!(o.spec.output.max_file_bytes, 2 << 30);
        assert_eq!(o.spec.output.compression, Compression::Zstd { level: 5 });
        assert_eq!(
            o.spec.output.partition_by.unwrap().granularity,
            Granularity::Year
        );
        for zero in [
            ["--workers", "0"],
            ["--chunk-rows", "0"],
            ["--batch-rows", "0"],
            ["--max-file-rows", "0"],
            ["--max-file-bytes", "0"],
            ["--max-attempts", "0"],
            ["--lease-ttl-secs", "0"],
        ] {
            assert!(run_options(&zero).is_err(), "{zero:?} was taken");
        }
        assert!(run_options(&["--split", "pages"]).is_err());
        assert!(run_options(&["--cast", "a"]).is_err());
        // a type's own commas stay with it (issue 12: `numeric(12,2)` was split)
        let o = run_options(&["--cast", "n=numeric(12,2),m=text", "--cast", "k=int"]).unwrap();
        assert_eq!(o.spec.casts["n"], "numeric(12,2)");
        assert_eq!(o.spec.casts["m"], "text");
        assert_eq!(o.spec.casts["k"], "int");
    }
}
