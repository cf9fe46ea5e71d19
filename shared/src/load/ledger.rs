//! The load ledger: one target transaction per chunk, keyed by (job, chunk), fenced by
//! epoch; and the once-per-job preparation of the target.

use std::sync::Arc;
use std::time::Instant;

use crate::jobs::KeyColumn;
use crate::pg::{self, Database, SourceError, quote_ident};
use crate::proto::wire::{LoadAck, LoadChunk, PrepareLoad, PrepareLoadReply};
use crate::proto::{LOAD_VERSION, range_from_wire};
use crate::{ChunkRange, JobId};
use arrow_array::RecordBatch;
use arrow_flight::FlightDescriptor;
use arrow_flight::error::FlightError;
use arrow_schema::Schema;
use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt, TryStreamExt, pin_mut};
use prost::Message;
use tokio_postgres::Client;

use super::encode::{COPY_HEADER, COPY_TRAILER, Enc, encode_batch};
use super::error::LoadError;
use super::metrics::{LoaderMetrics, Outcome};
use super::target::{Target, create_table, plan_columns, resolve_target, target_column};

/// Loads chunks into one target database.
pub struct Loader {
    target: Database,
    /// Schema of the ledger tables in the target.
    ledger: String,
    pub metrics: Arc<LoaderMetrics>,
}

/// What `do_put` needs from a decoded `LoadChunk`.
pub(super) struct ChunkCommand {
    pub(super) job: JobId,
    pub(super) chunk: u32,
    pub(super) epoch: u64,
    pub(super) target_table: String,
    pub(super) snapshot: String,
    pub(super) range: ChunkRange,
    pub(super) key: Vec<KeyColumn>,
}

impl Loader {
    pub fn new(target: Database, ledger_schema: impl Into<String>) -> Self {
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
        tracing::info!(job_id = %req.job_id, table = %target.quoted, created, truncated = req.truncate_first, "job prepared");
        Ok(PrepareLoadReply {
            target_table: target.quoted,
            created,
            truncated: req.truncate_first,
            already_prepared: false,
        })
    }

    /// Loads one chunk from a stream of batches: see the module docs.
    pub(super) async fn load_chunk<S>(
        &self,
        cmd: ChunkCommand,
        batches: S,
        end: std::sync::Arc<std::sync::Mutex<Option<u64>>>,
    ) -> Result<LoadAck, LoadError>
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
                // the key's types are the target's own, from its catalog: nothing of the
                // request but quoted literals and identifiers reaches the statement
                let key = cmd
                    .key
                    .iter()
                    .map(|k| match super::target::target_column(&target, &k.name) {
                        Some(col) => Ok(crate::jobs::KeyColumn {
                            name: k.name.clone(),
                            pg_type: col.pg_type.clone(),
                        }),
                        None => Err(LoadError::BadRequest(format!(
                            "key column {:?} is not a column of {}",
                            k.name, target.quoted
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let deleted = c
                    .execute(
                        &format!(
                            "DELETE FROM {} WHERE {}",
                            target.quoted,
                            cmd.range.predicate(&key)
                        ),
                        &[],
                    )
                    .await
                    .map_err(|e| LoadError::query("removing an earlier attempt's rows", e))?;
                tracing::info!(job_id = %job, chunk_id = %crate::ChunkId(cmd.chunk), deleted, "replaced the rows an attempt under another snapshot loaded");
            }
        }

        self.metrics.in_flight.inc();
        let copied = match &seen {
            Some((_, _, rows)) if replayed => {
                // the rows are in the target already: drain the stream
                drain(batches).await.map(|n| {
                    if n != *rows as u64 {
                        tracing::warn!(job_id = %job, chunk_id = %crate::ChunkId(cmd.chunk), streamed = n, ledger = rows, "a replay streamed another row count than the ledger holds");
                    }
                    *rows
                })
            }
            _ => self.copy_in(c, &target, batches).await.and_then(|n| {
                i64::try_from(n).map_err(|_| LoadError::Stream("row count overflow".into()))
            }),
        };
        self.metrics.in_flight.dec();
        // the whole chunk, or nothing: its rows count only once the worker said how many
        // it sent, and that many arrived
        let streamed = match &seen {
            Some((_, _, _)) if replayed => None,
            _ => copied.as_ref().ok().copied(),
        };
        let copied = copied.and_then(|n| {
            let said = end.lock().ok().and_then(|e| *e);
            match (said, streamed) {
                (None, _) => Err(LoadError::Stream(
                    "the stream ended without the chunk's end (the worker stopped sending mid-chunk?); nothing was committed".into(),
                )),
                (Some(s), Some(got)) if s != got as u64 => Err(LoadError::Stream(format!(
                    "the worker sent {s} rows but {got} arrived; nothing was committed"
                ))),
                _ => Ok(n),
            }
        });
        let rows = match copied {
            Ok(n) => n,
            Err(e) => {
                self.metrics.chunk(Outcome::Failed);
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
            self.metrics.chunk(Outcome::Failed);
            return Err(LoadError::Conflict {
                job,
                chunk: cmd.chunk,
            });
        }
        c.batch_execute("COMMIT")
            .await
            .map_err(|e| LoadError::query("committing the load", e))?;
        if replayed {
            self.metrics.chunk(Outcome::Replayed);
        } else {
            self.metrics.chunk(Outcome::Loaded);
            self.metrics.rows.inc_by(rows as u64);
        }
        self.metrics.observe(started.elapsed());
        tracing::info!(job_id = %job, chunk_id = %crate::ChunkId(cmd.chunk), epoch = cmd.epoch, rows, replayed, ms = started.elapsed().as_millis() as u64, "chunk loaded");
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
                        (Some(_), Enc::ArrayVerbatim { array_type, .. }) => {
                            (*array_type).to_owned()
                        }
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
            self.metrics.batches.inc();
            let p = Arc::clone(&plans);
            // encoding is CPU work: off the async runtime
            let data = tokio::task::spawn_blocking(move || encode_batch(&batch, &p))
                .await
                .map_err(|e| LoadError::Stream(format!("encoder task: {e}")))??;
            self.metrics.bytes.inc_by(data.len() as u64);
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

async fn drain<S>(batches: S) -> Result<u64, LoadError>
where
    S: Stream<Item = Result<RecordBatch, FlightError>> + Send,
{
    batches
        .map_err(|e| LoadError::Stream(e.to_string()))
        .try_fold(0u64, |n, b| async move { Ok(n + b.num_rows() as u64) })
        .await
}

pub(super) fn decode_command(desc: &FlightDescriptor) -> Result<ChunkCommand, LoadError> {
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
