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
use super::target::{
    Target, create_table, plan_columns, range_in_target, resolve_target, target_column,
};

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
        let present = s
            .client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL, \
                 EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($2) \
                         AND attname = 'xid' AND NOT attisdropped)",
                &[
                    &self.ledger_table("load_jobs"),
                    &self.ledger_table("load_chunks"),
                ],
            )
            .await
            .map_err(|e| LoadError::query("looking for the load ledger", e))?;
        let (jobs, chunks, xid) = (present.get(0), present.get(1), present.get(2));
        if jobs && chunks && xid {
            return Ok(());
        }
        if jobs && chunks {
            // a ledger an older haul made: the column a replace needs
            let chunks = self.ledger_table("load_chunks");
            return s
                .client
                .batch_execute(&format!(
                    "ALTER TABLE {chunks} ADD COLUMN IF NOT EXISTS xid bigint"
                ))
                .await
                .map_err(|e| {
                    LoadError::query(
                        &format!(
                            "adding column xid to the load ledger (made by an older haul; as its owner run: ALTER TABLE {chunks} ADD COLUMN xid bigint)"
                        ),
                        e,
                    )
                });
        }
        let sql = format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('haul.ledger')); \
             CREATE SCHEMA IF NOT EXISTS {schema}; \
             CREATE TABLE IF NOT EXISTS {jobs} (job_id text PRIMARY KEY, target_oid oid NOT NULL, \
                target_table text NOT NULL, created boolean NOT NULL, truncated boolean NOT NULL, \
                prepared_at timestamptz NOT NULL DEFAULT now()); \
             CREATE TABLE IF NOT EXISTS {chunks} (job_id text NOT NULL, chunk_id integer NOT NULL, \
                epoch bigint NOT NULL, snapshot text NOT NULL, rows bigint NOT NULL, \
                committed_at timestamptz NOT NULL DEFAULT now(), xid bigint, \
                PRIMARY KEY (job_id, chunk_id)); \
             ALTER TABLE {chunks} ADD COLUMN IF NOT EXISTS xid bigint; \
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
                    "SELECT epoch, snapshot, rows, xid FROM {} WHERE job_id = $1 AND chunk_id = $2",
                    self.ledger_table("load_chunks")
                ),
                &[&job, &chunk_id],
            )
            .await
            .map_err(|e| LoadError::query("reading the load ledger", e))?
            .map(|r| Seen {
                epoch: r.get(0),
                snapshot: r.get(1),
                rows: r.get(2),
                xid: r.get(3),
            });
        let mut replayed = false;
        if let Some(seen) = &seen {
            if seen.epoch > epoch {
                return Err(LoadError::Fenced {
                    job,
                    chunk: cmd.chunk,
                    epoch: cmd.epoch,
                    committed: seen.epoch as u64,
                });
            }
            if !seen.snapshot.is_empty() && seen.snapshot == cmd.snapshot {
                replayed = true;
            } else {
                let deleted = replace(c, &target, &cmd, seen).await?;
                tracing::info!(job_id = %job, chunk_id = %crate::ChunkId(cmd.chunk), deleted, "replaced the rows an attempt under another snapshot loaded");
            }
        }

        self.metrics.in_flight.inc();
        let copied = match &seen {
            Some(Seen { rows, .. }) if replayed => {
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
            Some(_) if replayed => None,
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
        let seen_epoch = seen.as_ref().map(|s| s.epoch).unwrap_or(-1);
        let won = c
            .query_opt(
                &format!(
                    "INSERT INTO {t} AS l (job_id, chunk_id, epoch, snapshot, rows, xid) \
                     VALUES ($1, $2, $3, $4, $5, txid_current()) \
                     ON CONFLICT (job_id, chunk_id) DO UPDATE SET epoch = EXCLUDED.epoch, \
                        snapshot = EXCLUDED.snapshot, rows = EXCLUDED.rows, \
                        xid = CASE WHEN $7 THEN l.xid ELSE EXCLUDED.xid END, \
                        committed_at = now() \
                     WHERE l.epoch = $6 RETURNING 1",
                    t = self.ledger_table("load_chunks")
                ),
                // a replay wrote no rows: the transaction that did stays recorded
                &[
                    &job,
                    &chunk_id,
                    &epoch,
                    &cmd.snapshot,
                    &rows,
                    &seen_epoch,
                    &replayed,
                ],
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

/// A chunk's row in the ledger: the attempt that loaded it.
struct Seen {
    epoch: i64,
    snapshot: String,
    rows: i64,
    /// The loading transaction's id (`txid_current()`, with its epoch); `None` in a row
    /// an older haul wrote.
    xid: Option<i64>,
}

/// Deletes the rows an earlier attempt under another snapshot loaded: exactly those its
/// transaction wrote (`xmin`, recorded in the ledger), narrowed by the chunk's key range
/// when the target orders the key as the source does (so an index on the key serves
/// it). The count must be the ledger's: rows updated or deleted in the target since (or
/// the xid space wrapped, 2^31 transactions later) refuse the replace instead of guessing.
async fn replace(
    c: &Client,
    target: &Target,
    cmd: &ChunkCommand,
    seen: &Seen,
) -> Result<u64, LoadError> {
    let narrow = range_in_target(target, &cmd.range, &cmd.key)?;
    let Some(xid) = seen.xid else {
        // a ledger row from before haul recorded the transaction: only a range in the
        // source's own order can say which rows were the chunk's
        let Some(p) = narrow else {
            return Err(LoadError::CannotReplace {
                job: cmd.job.to_string(),
                chunk: cmd.chunk,
                table: target.quoted.clone(),
            });
        };
        return c
            .execute(&format!("DELETE FROM {} WHERE {p}", target.quoted), &[])
            .await
            .map_err(|e| LoadError::query("removing an earlier attempt's rows", e));
    };
    let sql = format!(
        "DELETE FROM {} WHERE xmin = (($1::bigint % 4294967296)::text)::xid \
         AND txid_current() - $1::bigint < 2147483648{}",
        target.quoted,
        narrow.map(|p| format!(" AND ({p})")).unwrap_or_default()
    );
    let deleted = c
        .execute(&sql, &[&xid])
        .await
        .map_err(|e| LoadError::query("removing an earlier attempt's rows", e))?;
    if deleted != seen.rows as u64 {
        return Err(LoadError::ReplacedRowsChanged {
            job: cmd.job.to_string(),
            chunk: cmd.chunk,
            table: target.quoted.clone(),
            loaded: seen.rows as u64,
            found: deleted,
        });
    }
    Ok(deleted)
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
        key: m.key.into_iter().map(crate::proto::key_from_wire).collect(),
    })
}
