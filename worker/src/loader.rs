//! `haul loader`: an Arrow Flight server that loads each chunk a worker streams to it
//! (DoPut) into a target Postgres table, exactly once per chunk.
//!
//! # Protocol
//! - The job is prepared once (the `prepare` action, [`Loader::prepare`]): the target table
//!   is created from the stream's schema if asked, its columns are checked against the
//!   stream, it is emptied if asked, and the job is recorded in the ledger. A resumed job
//!   is found there and left alone (no second truncate).
//! - Each chunk is one transaction ([`Loader::load_chunk`]): binary `COPY ... FROM STDIN`
//!   of the streamed batches, then the chunk's ledger row `(job, chunk) -> epoch`, then
//!   COMMIT; only then is the `LoadAck` sent. The ledger lives in the target
//!   (`<ledger schema>.load_jobs`, `.load_chunks`), so the rows and the record that they
//!   were loaded commit together.
//! - A chunk already in the ledger is a replay: under an older epoch and the same
//!   snapshot its rows are already there, identical, and nothing is loaded again; under
//!   another snapshot (a job resumed with `--fresh-snapshot`, or one read without a
//!   snapshot) the rows of the chunk's key range are deleted first, so the replay
//!   replaces and never duplicates.
//! - Fencing: a chunk whose epoch is older than the ledger's is refused. The ledger row
//!   is written with a compare-and-set on the epoch read at the start, so of two attempts
//!   loading at once only one commits.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt, TryStreamExt, pin_mut};
use haul_shared::error::{Classify, ErrorClass};
use haul_shared::jobs::KeyColumn;
use haul_shared::metrics;
use haul_shared::pg::{self, Secret, SourceError, quote_ident};
use haul_shared::proto::wire::{LoadAck, LoadChunk, PrepareLoad, PrepareLoadReply};
use haul_shared::proto::{LOAD_VERSION, range_from_wire};
use haul_shared::{ChunkRange, JobId};
use prost::Message;
use tokio_postgres::Client;
use tonic::{Request, Response, Status, Streaming};

use crate::encode::{COPY_HEADER, COPY_TRAILER, ColumnPlan, Enc, TargetColumn, encode_batch};
use crate::executor::range_predicate;

/// The action that prepares a job on the target.
pub const PREPARE_ACTION: &str = "prepare";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to the target {dsn}: {reason}")]
    Connect {
        dsn: String,
        reason: String,
        transient: bool,
    },
    #[error("target: {0}")]
    Target(SourceError),
    #[error("bad load request: {0}")]
    BadRequest(String),
    #[error(
        "target table {table} does not exist; create it, or pass --create-table to create it from the source's columns"
    )]
    NoTargetTable { table: String },
    #[error("target table {table} does not fit the stream: {problems}")]
    Mismatch { table: String, problems: String },
    #[error(
        "job {job} was not prepared on this loader's target (is every --load endpoint loading the same database?)"
    )]
    NotPrepared { job: String },
    #[error("job {job} loads into {prepared}, not {asked}")]
    OtherTable {
        job: String,
        prepared: String,
        asked: String,
    },
    #[error(
        "chunk {chunk} of job {job}: epoch {epoch} is fenced off, epoch {committed} already loaded it"
    )]
    Fenced {
        job: String,
        chunk: u32,
        epoch: u64,
        committed: u64,
    },
    #[error("chunk {chunk} of job {job} was loaded by another attempt meanwhile; retry")]
    Conflict { job: String, chunk: u32 },
    #[error(
        "chunk {chunk} of job {job} was loaded under another snapshot, and its rows (a ctid range) cannot be told apart in the target; truncate {table} and rerun the job"
    )]
    CannotReplace {
        job: String,
        chunk: u32,
        table: String,
    },
    #[error("the stream broke: {0}")]
    Stream(String),
    #[error("cannot serve: {0}")]
    Serve(String),
    #[error("{0}")]
    Encode(#[from] crate::encode::EncodeError),
}

impl Classify for LoadError {
    fn class(&self) -> ErrorClass {
        match self {
            LoadError::Connect { transient, .. } => {
                if *transient {
                    ErrorClass::Transient
                } else {
                    ErrorClass::User
                }
            }
            LoadError::Target(e) => e.class(),
            LoadError::Fenced { .. } | LoadError::Conflict { .. } | LoadError::Stream(_) => {
                ErrorClass::Transient
            }
            _ => ErrorClass::User,
        }
    }
}

impl LoadError {
    fn query(context: &str, e: tokio_postgres::Error) -> Self {
        LoadError::Target(SourceError::query(context, e))
    }

    /// The gRPC status a worker sees: `ABORTED`/`UNAVAILABLE` for what a new attempt may
    /// get past, `FAILED_PRECONDITION`/`INVALID_ARGUMENT` for what the user must fix.
    pub fn to_status(&self) -> Status {
        let msg = self.to_string();
        match self {
            LoadError::Fenced { .. } | LoadError::Conflict { .. } => Status::aborted(msg),
            LoadError::BadRequest(_) | LoadError::Encode(_) => Status::invalid_argument(msg),
            e if e.class().is_retryable() => Status::unavailable(msg),
            _ => Status::failed_precondition(msg),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LoaderMetrics {
    pub rows: AtomicU64,
    /// Bytes of binary COPY data sent to the target.
    pub bytes: AtomicU64,
    pub batches: AtomicU64,
    pub chunks_loaded: AtomicU64,
    pub chunks_replayed: AtomicU64,
    pub chunks_failed: AtomicU64,
    pub in_flight: AtomicU64,
    /// Chunk load latency histogram: counts per bucket of [`LATENCY_BUCKETS`], then +Inf.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ms: AtomicU64,
}

/// Upper bounds (seconds) of the chunk latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 8] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl LoaderMetrics {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms
            .fetch_add(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let mut t = metrics::Text::default();
        t.family(
            "haul_loader_rows_total",
            "counter",
            "Rows committed into the target.",
        )
        .sample("haul_loader_rows_total", &[], n(&self.rows));
        t.family(
            "haul_loader_bytes_total",
            "counter",
            "Binary COPY bytes sent to the target.",
        )
        .sample("haul_loader_bytes_total", &[], n(&self.bytes));
        t.family(
            "haul_loader_batches_total",
            "counter",
            "Arrow batches received.",
        )
        .sample("haul_loader_batches_total", &[], n(&self.batches));
        t.family(
            "haul_loader_chunks_total",
            "counter",
            "Chunk loads by outcome.",
        )
        .sample(
            "haul_loader_chunks_total",
            &[("outcome", "loaded")],
            n(&self.chunks_loaded),
        )
        .sample(
            "haul_loader_chunks_total",
            &[("outcome", "replayed")],
            n(&self.chunks_replayed),
        )
        .sample(
            "haul_loader_chunks_total",
            &[("outcome", "failed")],
            n(&self.chunks_failed),
        );
        t.family(
            "haul_loader_chunks_in_flight",
            "gauge",
            "Chunks being loaded now.",
        )
        .sample("haul_loader_chunks_in_flight", &[], n(&self.in_flight));
        let name = "haul_loader_chunk_seconds";
        t.family(
            name,
            "histogram",
            "Time from a chunk's first batch to its commit.",
        );
        let mut cumulative = 0.0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += n(&self.latency[i]);
            t.sample(
                &format!("{name}_bucket"),
                &[("le", &b.to_string())],
                cumulative,
            );
        }
        cumulative += n(&self.latency[LATENCY_BUCKETS.len()]);
        t.sample(&format!("{name}_bucket"), &[("le", "+Inf")], cumulative);
        t.sample(
            &format!("{name}_sum"),
            &[],
            n(&self.latency_sum_ms) / 1000.0,
        );
        t.sample(&format!("{name}_count"), &[], cumulative);
        t.finish()
    }
}

/// Loads chunks into one target database.
pub struct Loader {
    target: Secret,
    /// Schema of the ledger tables in the target.
    ledger: String,
    pub metrics: Arc<LoaderMetrics>,
}

/// A resolved target table.
struct Target {
    oid: u32,
    quoted: String,
    columns: Vec<TargetColumn>,
}

/// What `do_put` needs from a decoded `LoadChunk`.
struct ChunkCommand {
    job: JobId,
    chunk: u32,
    epoch: u64,
    target_table: String,
    snapshot: String,
    range: ChunkRange,
    key: Vec<KeyColumn>,
}

impl Loader {
    pub fn new(target: Secret, ledger_schema: impl Into<String>) -> Self {
        Self {
            target,
            ledger: ledger_schema.into(),
            metrics: Arc::default(),
        }
    }

    async fn connect(&self) -> Result<pg::Session, LoadError> {
        let s = pg::connect(&self.target).await.map_err(|e| match e {
            SourceError::Connect {
                dsn,
                reason,
                transient,
            } => LoadError::Connect {
                dsn,
                reason,
                transient,
            },
            SourceError::BadDsn { dsn, reason } => LoadError::Connect {
                dsn,
                reason,
                transient: false,
            },
            e => LoadError::Target(e),
        })?;
        s.client
            .batch_execute(
                "SET application_name = 'haul:loader'; SET client_min_messages = warning",
            )
            .await
            .map_err(|e| LoadError::query("naming the session", e))?;
        Ok(s)
    }

    fn ledger_table(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.ledger), quote_ident(name))
    }

    /// Creates the ledger tables if they are missing (under an advisory lock, so that
    /// loaders starting together do not race on the catalog). When they exist, the
    /// loader's user needs only SELECT/INSERT/UPDATE on them.
    pub async fn ensure_ledger(&self) -> Result<(), LoadError> {
        let s = self.connect().await?;
        // tables made in advance (by someone allowed to) need no CREATE privilege here
        let present: bool = s
            .client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
                &[
                    &self.ledger_table("load_jobs"),
                    &self.ledger_table("load_chunks"),
                ],
            )
            .await
            .map_err(|e| LoadError::query("looking for the load ledger", e))?
            .get(0);
        if present {
            return Ok(());
        }
        let sql = format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('haul.ledger')); \
             CREATE SCHEMA IF NOT EXISTS {schema}; \
             CREATE TABLE IF NOT EXISTS {jobs} (job_id text PRIMARY KEY, target_oid oid NOT NULL, \
                target_table text NOT NULL, created boolean NOT NULL, truncated boolean NOT NULL, \
                prepared_at timestamptz NOT NULL DEFAULT now()); \
             CREATE TABLE IF NOT EXISTS {chunks} (job_id text NOT NULL, chunk_id integer NOT NULL, \
                epoch bigint NOT NULL, snapshot text NOT NULL, rows bigint NOT NULL, \
                committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job_id, chunk_id)); \
             COMMIT",
            schema = quote_ident(&self.ledger),
            jobs = self.ledger_table("load_jobs"),
            chunks = self.ledger_table("load_chunks"),
        );
        s.client
            .batch_execute(&sql)
            .await
            .map_err(|e| LoadError::query("creating the load ledger", e))
    }

    /// Prepares a job: see the module docs.
    pub async fn prepare(&self, req: PrepareLoad) -> Result<PrepareLoadReply, LoadError> {
        if req.version != LOAD_VERSION {
            return Err(LoadError::BadRequest(format!(
                "prepare has wire version {}, this loader understands {LOAD_VERSION}",
                req.version
            )));
        }
        let schema = Schema::try_from(arrow_flight::IpcMessage(req.arrow_schema.clone().into()))
            .map_err(|e| LoadError::BadRequest(format!("bad Arrow schema: {e}")))?;
        let s = self.connect().await?;
        let c = &s.client;
        c.batch_execute("BEGIN")
            .await
            .map_err(|e| LoadError::query("beginning", e))?;
        // one preparation per job at a time
        c.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("haul.prepare.{}", req.job_id)],
        )
        .await
        .map_err(|e| LoadError::query("locking the job", e))?;
        let prepared = c
            .query_opt(
                &format!(
                    "SELECT target_table FROM {} WHERE job_id = $1",
                    self.ledger_table("load_jobs")
                ),
                &[&req.job_id],
            )
            .await
            .map_err(|e| LoadError::query("reading the load ledger", e))?;
        let mut created = false;
        let target = match resolve_target(c, &req.target_table).await? {
            Some(t) => t,
            None if req.create_table && prepared.is_none() => {
                create_table(c, &req.target_table, &schema).await?;
                created = true;
                resolve_target(c, &req.target_table).await?.ok_or_else(|| {
                    LoadError::NoTargetTable {
                        table: req.target_table.clone(),
                    }
                })?
            }
            None => {
                return Err(LoadError::NoTargetTable {
                    table: req.target_table.clone(),
                });
            }
        };
        plan_columns(&target, &schema)?;
        if let Some(row) = prepared {
            let was: String = row.get(0);
            if was != target.quoted {
                return Err(LoadError::OtherTable {
                    job: req.job_id,
                    prepared: was,
                    asked: target.quoted,
                });
            }
            c.batch_execute("COMMIT")
                .await
                .map_err(|e| LoadError::query("committing", e))?;
            return Ok(PrepareLoadReply {
                target_table: target.quoted,
                created: false,
                truncated: false,
                already_prepared: true,
            });
        }
        if req.truncate_first && !created {
            c.batch_execute(&format!("TRUNCATE {}", target.quoted))
                .await
                .map_err(|e| LoadError::query("truncating the target table", e))?;
        }
        c.execute(
            &format!(
                "INSERT INTO {} (job_id, target_oid, target_table, created, truncated) \
                 VALUES ($1, $2, $3, $4, $5)",
                self.ledger_table("load_jobs")
            ),
            &[
                &req.job_id,
                &target.oid,
                &target.quoted,
                &created,
                &req.truncate_first,
            ],
        )
        .await
        .map_err(|e| LoadError::query("recording the job in the load ledger", e))?;
        c.batch_execute("COMMIT")
            .await
            .map_err(|e| LoadError::query("committing the preparation", e))?;
        tracing::info!(job = %req.job_id, table = %target.quoted, created, truncated = req.truncate_first, "job prepared");
        Ok(PrepareLoadReply {
            target_table: target.quoted,
            created,
            truncated: req.truncate_first,
            already_prepared: false,
        })
    }

    /// Loads one chunk from a stream of batches: see the module docs.
    async fn load_chunk<S>(&self, cmd: ChunkCommand, batches: S) -> Result<LoadAck, LoadError>
    where
        S: Stream<Item = Result<RecordBatch, FlightError>> + Send,
    {
        let started = Instant::now();
        let s = self.connect().await?;
        let c = &s.client;
        let job = cmd.job.to_string();
        let chunk_id = cmd.chunk as i32;
        let epoch = i64::try_from(cmd.epoch)
            .map_err(|_| LoadError::BadRequest(format!("epoch {} is too large", cmd.epoch)))?;
        c.batch_execute("BEGIN")
            .await
            .map_err(|e| LoadError::query("beginning the load", e))?;
        let prepared: Option<String> = c
            .query_opt(
                &format!(
                    "SELECT target_table FROM {} WHERE job_id = $1",
                    self.ledger_table("load_jobs")
                ),
                &[&job],
            )
            .await
            .map_err(|e| LoadError::query("reading the load ledger", e))?
            .map(|r| r.get(0));
        let Some(prepared) = prepared else {
            return Err(LoadError::NotPrepared { job });
        };
        let target = resolve_target(c, &cmd.target_table).await?.ok_or_else(|| {
            LoadError::NoTargetTable {
                table: cmd.target_table.clone(),
            }
        })?;
        if prepared != target.quoted {
            return Err(LoadError::OtherTable {
                job,
                prepared,
                asked: target.quoted,
            });
        }
        let seen = c
            .query_opt(
                &format!(
                    "SELECT epoch, snapshot, rows FROM {} WHERE job_id = $1 AND chunk_id = $2",
                    self.ledger_table("load_chunks")
                ),
                &[&job, &chunk_id],
            )
            .await
            .map_err(|e| LoadError::query("reading the load ledger", e))?
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    r.get::<_, String>(1),
                    r.get::<_, i64>(2),
                )
            });
        let mut replayed = false;
        if let Some((committed, snapshot, _)) = &seen {
            if *committed > epoch {
                return Err(LoadError::Fenced {
                    job,
                    chunk: cmd.chunk,
                    epoch: cmd.epoch,
                    committed: *committed as u64,
                });
            }
            if !snapshot.is_empty() && *snapshot == cmd.snapshot {
                replayed = true;
            } else if matches!(cmd.range, ChunkRange::Ctid { .. }) {
                return Err(LoadError::CannotReplace {
                    job,
                    chunk: cmd.chunk,
                    table: target.quoted,
                });
            } else {
                let deleted = c
                    .execute(
                        &format!(
                            "DELETE FROM {} WHERE {}",
                            target.quoted,
                            range_predicate(&cmd.range, &cmd.key)
                        ),
                        &[],
                    )
                    .await
                    .map_err(|e| LoadError::query("removing an earlier attempt's rows", e))?;
                tracing::info!(%job, chunk = cmd.chunk, deleted, "replaced the rows an attempt under another snapshot loaded");
            }
        }

        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let copied = match &seen {
            Some((_, _, rows)) if replayed => {
                // the rows are in the target already: drain the stream
                drain(batches).await.map(|n| {
                    if n != *rows as u64 {
                        tracing::warn!(%job, chunk = cmd.chunk, streamed = n, ledger = rows, "a replay streamed another row count than the ledger holds");
                    }
                    *rows
                })
            }
            _ => self.copy_in(c, &target, batches).await.and_then(|n| {
                i64::try_from(n).map_err(|_| LoadError::Stream("row count overflow".into()))
            }),
        };
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        let rows = match copied {
            Ok(n) => n,
            Err(e) => {
                self.metrics.chunks_failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        // compare-and-set on the epoch this attempt saw: of two attempts loading at once,
        // only one commits
        let seen_epoch = seen.as_ref().map(|s| s.0).unwrap_or(-1);
        let won = c
            .query_opt(
                &format!(
                    "INSERT INTO {t} AS l (job_id, chunk_id, epoch, snapshot, rows) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (job_id, chunk_id) DO UPDATE SET epoch = EXCLUDED.epoch, \
                        snapshot = EXCLUDED.snapshot, rows = EXCLUDED.rows, committed_at = now() \
                     WHERE l.epoch = $6 RETURNING 1",
                    t = self.ledger_table("load_chunks")
                ),
                &[&job, &chunk_id, &epoch, &cmd.snapshot, &rows, &seen_epoch],
            )
            .await
            .map_err(|e| LoadError::query("recording the chunk in the load ledger", e))?
            .is_some();
        if !won {
            self.metrics.chunks_failed.fetch_add(1, Ordering::Relaxed);
            return Err(LoadError::Conflict {
                job,
                chunk: cmd.chunk,
            });
        }
        c.batch_execute("COMMIT")
            .await
            .map_err(|e| LoadError::query("committing the load", e))?;
        if replayed {
            self.metrics.chunks_replayed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.metrics.chunks_loaded.fetch_add(1, Ordering::Relaxed);
            self.metrics.rows.fetch_add(rows as u64, Ordering::Relaxed);
        }
        self.metrics.observe(started.elapsed());
        tracing::info!(%job, chunk = cmd.chunk, epoch = cmd.epoch, rows, replayed, ms = started.elapsed().as_millis() as u64, "chunk loaded");
        Ok(LoadAck {
            job_id: job,
            chunk_id: cmd.chunk,
            epoch: cmd.epoch,
            rows: rows as u64,
            replayed,
        })
    }

    /// Streams the batches into the target with binary COPY (through a staging table when
    /// some columns must be cast from text); returns the rows copied.
    async fn copy_in<S>(&self, c: &Client, target: &Target, batches: S) -> Result<u64, LoadError>
    where
        S: Stream<Item = Result<RecordBatch, FlightError>> + Send,
    {
        pin_mut!(batches);
        let Some(first) = batches.next().await else {
            return Ok(0);
        };
        let first = first.map_err(|e| LoadError::Stream(e.to_string()))?;
        let plans = Arc::new(plan_columns(target, &first.schema())?);
        let cols: Vec<String> = plans.iter().map(|p| quote_ident(&p.name)).collect();
        let staged = plans.iter().any(|p| p.cast_to.is_some());
        let copy_into = if staged {
            let defs: Vec<String> = plans
                .iter()
                .map(|p| {
                    let t = match (&p.cast_to, &p.enc) {
                        (Some(_), Enc::Array { .. }) => "text[]".to_owned(),
                        (Some(_), _) => "text".to_owned(),
                        (None, _) => target_column(target, &p.name)
                            .map(|t| t.pg_type.clone())
                            .unwrap_or_else(|| "text".into()),
                    };
                    format!("{} {t}", quote_ident(&p.name))
                })
                .collect();
            c.batch_execute(&format!(
                "CREATE TEMP TABLE haul_stage ({}) ON COMMIT DROP",
                defs.join(", ")
            ))
            .await
            .map_err(|e| LoadError::query("creating the staging table", e))?;
            "haul_stage".to_owned()
        } else {
            target.quoted.clone()
        };
        let sink = c
            .copy_in::<_, Bytes>(&format!(
                "COPY {copy_into} ({}) FROM STDIN (FORMAT binary)",
                cols.join(", ")
            ))
            .await
            .map_err(|e| LoadError::query("starting COPY into the target", e))?;
        pin_mut!(sink);
        sink.send(Bytes::from_static(COPY_HEADER))
            .await
            .map_err(|e| LoadError::query("writing COPY", e))?;
        let mut next = Some(first);
        loop {
            let batch = match next.take() {
                Some(b) => b,
                None => match batches.next().await {
                    Some(b) => b.map_err(|e| LoadError::Stream(e.to_string()))?,
                    None => break,
                },
            };
            self.metrics.batches.fetch_add(1, Ordering::Relaxed);
            let p = Arc::clone(&plans);
            // encoding is CPU work: off the async runtime
            let data = tokio::task::spawn_blocking(move || encode_batch(&batch, &p))
                .await
                .map_err(|e| LoadError::Stream(format!("encoder task: {e}")))??;
            self.metrics
                .bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            sink.send(data)
                .await
                .map_err(|e| LoadError::query("writing COPY", e))?;
        }
        sink.send(Bytes::from_static(COPY_TRAILER))
            .await
            .map_err(|e| LoadError::query("writing COPY", e))?;
        let rows = sink
            .as_mut()
            .finish()
            .await
            .map_err(|e| LoadError::query("COPY into the target", e))?;
        if staged {
            let select: Vec<String> = plans
                .iter()
                .map(|p| match &p.cast_to {
                    Some(t) => format!("{}::{t}", quote_ident(&p.name)),
                    None => quote_ident(&p.name),
                })
                .collect();
            c.batch_execute(&format!(
                "INSERT INTO {} ({}) SELECT {} FROM haul_stage",
                target.quoted,
                cols.join(", "),
                select.join(", ")
            ))
            .await
            .map_err(|e| LoadError::query("moving staged rows into the target", e))?;
        }
        Ok(rows)
    }
}

fn target_column<'a>(t: &'a Target, name: &str) -> Option<&'a TargetColumn> {
    t.columns.iter().find(|c| c.name == name)
}

/// Matches every stream column with a target column; one error lists every problem.
fn plan_columns(target: &Target, schema: &Schema) -> Result<Vec<ColumnPlan>, LoadError> {
    let mut plans = Vec::new();
    let mut problems = Vec::new();
    for f in schema.fields() {
        match target_column(target, f.name()) {
            None => problems.push(format!("no column {:?}", f.name())),
            Some(t) => match crate::encode::plan_column(f, t) {
                Ok(p) => plans.push(p),
                Err(e) => problems.push(format!("column {:?}: {e}", f.name())),
            },
        }
    }
    if problems.is_empty() {
        Ok(plans)
    } else {
        Err(LoadError::Mismatch {
            table: target.quoted.clone(),
            problems: problems.join("; "),
        })
    }
}

async fn drain<S>(batches: S) -> Result<u64, LoadError>
where
    S: Stream<Item = Result<RecordBatch, FlightError>> + Send,
{
    batches
        .map_err(|e| LoadError::Stream(e.to_string()))
        .try_fold(0u64, |n, b| async move { Ok(n + b.num_rows() as u64) })
        .await
}

const TARGET_COLUMNS_SQL: &str = "\
    SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
           bt.typreceive::text, et.oid, ebt.typreceive::text \
    FROM pg_attribute a \
    JOIN pg_type t ON t.oid = a.atttypid \
    JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
    LEFT JOIN pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A' \
    LEFT JOIN pg_type ebt ON ebt.oid = CASE WHEN et.typtype = 'd' THEN et.typbasetype ELSE et.oid END \
    WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
    ORDER BY a.attnum";

/// The target table and its columns, or `None` when it does not exist.
async fn resolve_target(c: &Client, table: &str) -> Result<Option<Target>, LoadError> {
    let row = c
        .query_opt(
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
            &[&table],
        )
        .await
        .map_err(|e| match e.code() {
            Some(code) if code.code().starts_with("42") || code.code().starts_with("22") => {
                LoadError::BadRequest(format!("target table {table:?}: {}", pg::pg_reason(&e)))
            }
            _ => LoadError::query("resolving the target table", e),
        })?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let rows = c
        .query(TARGET_COLUMNS_SQL, &[&oid])
        .await
        .map_err(|e| LoadError::query("reading the target's columns", e))?;
    let columns = rows
        .iter()
        .map(|r| TargetColumn {
            name: r.get(0),
            pg_type: r.get(1),
            not_null: r.get(2),
            recv: r.get(3),
            element: r
                .get::<_, Option<u32>>(4)
                .map(|oid| (oid, r.get::<_, Option<String>>(5).unwrap_or_default())),
        })
        .collect();
    Ok(Some(Target {
        oid,
        quoted: row.get(1),
        columns,
    }))
}

/// The Postgres type haul creates for an Arrow type when the source's type is not
/// available in the target.
fn pg_type_for(dt: &DataType) -> Option<String> {
    Some(match dt {
        DataType::Boolean => "boolean".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("numeric({p},{s})"),
        DataType::Utf8 => "text".into(),
        DataType::Binary => "bytea".into(),
        DataType::Date32 => "date".into(),
        DataType::Time64(TimeUnit::Microsecond) => "time".into(),
        DataType::Timestamp(TimeUnit::Microsecond, None) => "timestamp".into(),
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => "timestamptz".into(),
        DataType::Struct(f) if f == &haul_shared::pg::interval_fields() => "interval".into(),
        DataType::FixedSizeBinary(16) => "uuid".into(),
        DataType::List(e) => format!("{}[]", pg_type_for(e.data_type())?),
        _ => return None,
    })
}

/// Creates the target table: each column gets the source's type (from the field's
/// `haul.pg_type` metadata) when the target knows that type and it can take the stream's
/// values, otherwise the type of its Arrow mapping.
async fn create_table(c: &Client, table: &str, schema: &Schema) -> Result<(), LoadError> {
    let parts: Vec<String> = c
        .query_one("SELECT parse_ident($1)", &[&table])
        .await
        .map_err(|e| {
            LoadError::BadRequest(format!("target table {table:?}: {}", pg::pg_reason(&e)))
        })?
        .get(0);
    let quoted = match parts.as_slice() {
        [name] => quote_ident(name),
        [schema, name] => format!("{}.{}", quote_ident(schema), quote_ident(name)),
        _ => {
            return Err(LoadError::BadRequest(format!(
                "target table {table:?}: expected schema.table"
            )));
        }
    };
    let mut defs = Vec::new();
    for f in schema.fields() {
        let ty = source_type_if_usable(c, f).await?;
        let ty = match ty {
            Some(t) => t,
            None => pg_type_for(f.data_type()).ok_or_else(|| LoadError::Mismatch {
                table: quoted.clone(),
                problems: format!(
                    "no Postgres type for column {:?} ({})",
                    f.name(),
                    f.data_type()
                ),
            })?,
        };
        let not_null = if f.is_nullable() { "" } else { " NOT NULL" };
        defs.push(format!("{} {ty}{not_null}", quote_ident(f.name())));
    }
    c.batch_execute(&format!("CREATE TABLE {quoted} ({})", defs.join(", ")))
        .await
        .map_err(|e| LoadError::query("creating the target table", e))?;
    tracing::info!(table = %quoted, "created the target table");
    Ok(())
}

async fn source_type_if_usable(c: &Client, f: &Field) -> Result<Option<String>, LoadError> {
    let Some(pg_type) = f.metadata().get("haul.pg_type") else {
        return Ok(None);
    };
    // to_regtype errors on syntax it cannot parse; treat that as unknown too
    let row = c
        .query_opt(
            "SELECT format_type(t.oid, NULL), bt.typreceive::text, et.oid, ebt.typreceive::text \
             FROM pg_type t \
             JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             LEFT JOIN pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A' \
             LEFT JOIN pg_type ebt ON ebt.oid = CASE WHEN et.typtype = 'd' THEN et.typbasetype ELSE et.oid END \
             WHERE t.oid = to_regtype($1)",
            &[pg_type],
        )
        .await
        .ok()
        .flatten();
    let Some(row) = row else { return Ok(None) };
    let candidate = TargetColumn {
        name: f.name().clone(),
        pg_type: pg_type.clone(),
        recv: row.get(1),
        element: row
            .get::<_, Option<u32>>(2)
            .map(|oid| (oid, row.get::<_, Option<String>>(3).unwrap_or_default())),
        not_null: !f.is_nullable(),
    };
    Ok(crate::encode::plan_column(f, &candidate)
        .ok()
        .map(|_| pg_type.clone()))
}

fn decode_command(desc: &FlightDescriptor) -> Result<ChunkCommand, LoadError> {
    let m = LoadChunk::decode(desc.cmd.clone())
        .map_err(|e| LoadError::BadRequest(format!("malformed LoadChunk: {e}")))?;
    if m.version != LOAD_VERSION {
        return Err(LoadError::BadRequest(format!(
            "LoadChunk has wire version {}, this loader understands {LOAD_VERSION}",
            m.version
        )));
    }
    Ok(ChunkCommand {
        job: JobId::parse(&m.job_id).map_err(LoadError::BadRequest)?,
        chunk: m.chunk_id,
        epoch: m.epoch,
        target_table: m.target_table,
        snapshot: m.snapshot,
        range: range_from_wire(m.range)
            .ok_or_else(|| LoadError::BadRequest("LoadChunk is missing its range".into()))?,
        key: m
            .key
            .into_iter()
            .map(|k| KeyColumn {
                name: k.name,
                pg_type: k.pg_type,
            })
            .collect(),
    })
}

/// The Flight service of `haul loader`.
#[derive(Clone)]
pub struct LoaderService {
    pub loader: Arc<Loader>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl FlightService for LoaderService {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;
    type DoExchangeStream = BoxStream<FlightData>;

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented(
            "no handshake: send the bearer token as an authorization header",
        ))
    }

    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented(
            "a loader does not serve jobs; ask the coordinator",
        ))
    }

    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented(
            "a loader does not serve jobs; ask the coordinator",
        ))
    }

    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("poll_flight_info"))
    }

    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("get_schema"))
    }

    async fn do_get(&self, _: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        Err(Status::unimplemented(
            "a loader does not serve jobs; ask the coordinator",
        ))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let mut input = request.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty DoPut"))?;
        let desc = first
            .flight_descriptor
            .clone()
            .ok_or_else(|| Status::invalid_argument("DoPut without a LoadChunk descriptor"))?;
        let cmd = decode_command(&desc).map_err(|e| e.to_status())?;
        let (job, chunk, epoch) = (cmd.job.clone(), cmd.chunk, cmd.epoch);
        let data =
            futures::stream::once(async move { Ok(first) }).chain(input.map_err(FlightError::from));
        let batches = FlightRecordBatchStream::new_from_flight_data(data);
        let ack = self.loader.load_chunk(cmd, batches).await.map_err(|e| {
            tracing::warn!(%job, chunk, epoch, error = %e, "chunk not loaded");
            e.to_status()
        })?;
        let result = PutResult {
            app_metadata: ack.encode_to_vec().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(result)
        }))))
    }

    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        if action.r#type != PREPARE_ACTION {
            return Err(Status::unimplemented(format!(
                "unknown action {:?}; a loader knows {PREPARE_ACTION:?}",
                action.r#type
            )));
        }
        let req = PrepareLoad::decode(action.body)
            .map_err(|e| Status::invalid_argument(format!("malformed PrepareLoad: {e}")))?;
        let reply = self.loader.prepare(req).await.map_err(|e| e.to_status())?;
        let body: Bytes = reply.encode_to_vec().into();
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(arrow_flight::Result { body })
        }))))
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        let t = ActionType {
            r#type: PREPARE_ACTION.into(),
            description: "Create/check/empty the target table of a job, once per job".into(),
        };
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(t)
        }))))
    }
}

/// The schema as a Flight IPC message, as `PrepareLoad.arrow_schema` carries it.
pub fn schema_to_ipc(schema: &SchemaRef) -> Result<Bytes, arrow_schema::ArrowError> {
    let opts = arrow_ipc::writer::IpcWriteOptions::default();
    let msg: arrow_flight::IpcMessage =
        arrow_flight::SchemaAsIpc::new(schema.as_ref(), &opts).try_into()?;
    Ok(msg.0)
}

/// How `haul loader` (or `haul run --load-target`) serves.
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub target: Secret,
    /// Schema of the ledger tables in the target.
    pub ledger_schema: String,
    /// Require this bearer token on every RPC.
    pub token: Option<Secret>,
    /// TLS certificate and key (PEM).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Serves the loader's Flight service (and gRPC health) on `listener` until `shutdown`
/// fires. The ledger is created first, so a target that cannot take it fails at start.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: LoaderOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), LoadError> {
    use arrow_flight::flight_service_server::FlightServiceServer;
    use tonic::transport::{Identity, Server, ServerTlsConfig};

    let loader = Arc::new(Loader::new(opts.target.clone(), opts.ledger_schema.clone()));
    loader.ensure_ledger().await?;
    if let Some(addr) = opts.metrics_listen {
        let m = Arc::clone(&loader.metrics);
        let render: metrics::Render = Arc::new(move || {
            let text = m.render();
            Box::pin(async move { text })
        });
        metrics::spawn(addr, render, shutdown.clone())
            .await
            .map_err(|e| LoadError::Serve(format!("metrics on {addr}: {e}")))?;
    }
    let mut builder = Server::builder()
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20);
    if let Some((cert, key)) = &opts.tls {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|e| {
                LoadError::Serve(format!("cannot read the TLS file {}: {e}", p.display()))
            })
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| LoadError::Serve(format!("TLS: {e}")))?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<FlightServiceServer<LoaderService>>()
        .await;
    let auth = haul_shared::rpc::RequireToken::new(opts.token.as_ref());
    let flight =
        FlightServiceServer::new(LoaderService { loader }).max_decoding_message_size(256 << 20);
    let addr = listener.local_addr().ok();
    tracing::info!(listen = ?addr, target = %opts.target, tls = opts.tls.is_some(), token = opts.token.is_some(), "loader serving");
    builder
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            flight, auth,
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await
        .map_err(|e| LoadError::Serve(haul_shared::rpc::error_chain(&e)))
}
