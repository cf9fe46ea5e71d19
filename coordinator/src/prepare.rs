//! Preparing a job, the same in both modes: check the destination, open and export the
//! snapshot, plan the chunks inside it (or reload a resumed job's plan), write
//! `plan.json`, prepare the load target, and queue the chunks not yet committed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use haul_shared::error::Classify;
use haul_shared::jobs::{ChunkState, JobPlan, JobRecord, JobSpec, JobStore, LoadSpec};
use haul_shared::lake::table::{self, TableError, TableIdentity, TableNow};
use haul_shared::lake::{ChunkManifest, Dest, JobManifest, PlanFile, table_dir};
use haul_shared::load::{LoadAuth, LoadClient};
use haul_shared::pg::{self, SourceError, quote_ident};
use haul_shared::proto::Task;
use haul_shared::queue::ChunkQueue;
use haul_shared::{ChunkId, JobId};
use tracing::{info, warn};

use crate::error::RunError;
use crate::planner;

/// How a job is prepared: which job, and what to do about an earlier attempt of it.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub job_id: Option<JobId>,
    pub resume: bool,
    pub fresh_snapshot: bool,
    pub overwrite: bool,
    /// Workers (times slots) expected to extract at once; the planner makes at least
    /// twice as many chunks when the table is big enough.
    pub parallelism: usize,
    /// How this process logs in to the source (the job carries no password).
    pub source_credentials: pg::Credentials,
}

/// A planned job, ready for its chunks to be queued.
pub struct Prepared {
    pub job: JobId,
    /// The spec as planned (a resumed job keeps its original shape).
    pub spec: JobSpec,
    pub plan: JobPlan,
    pub dest: Dest,
    /// The session holding the exported snapshot open (its transaction is already
    /// committed when the job reads without one).
    pub holder: pg::Session,
    /// Chunks an earlier attempt committed, their parts checked.
    pub committed: BTreeMap<ChunkId, ChunkManifest>,
    pub table_dir: String,
    pub started_at: String,
    /// This call planned the job (it is not a resume).
    pub planned_now: bool,
}

/// The outcome of preparing a job ([`prepare`]: [`Prepared`]) or of planning it only
/// ([`plan_only`]: [`DryRun`]).
pub enum Preparation<T = Prepared> {
    /// The job had already succeeded; nothing to do.
    AlreadyDone(Box<JobManifest>),
    Ready(Box<T>),
}

/// A job planned and not started: its plan, and the session it was planned in (for the
/// caller to ask the source about the chunks' queries).
pub struct DryRun {
    pub job: JobId,
    pub spec: JobSpec,
    pub plan: JobPlan,
    pub dest: Dest,
    pub table_dir: String,
    pub session: pg::Session,
    /// Chunks an earlier attempt committed (a dry run of `--resume`).
    pub committed: usize,
}

/// Checks the destination, opens the snapshot, plans (or reloads the plan of a resumed
/// job), writes `plan.json`, and republishes chunks committed earlier. Shared by
/// `haul run` and the cluster coordinator.
pub async fn prepare(spec: &JobSpec, opts: &PrepareOptions) -> Result<Preparation, RunError> {
    let p = match plan_job(spec, opts, false).await? {
        Preparation::AlreadyDone(m) => return Ok(Preparation::AlreadyDone(m)),
        Preparation::Ready(p) => *p,
    };
    let Planned {
        job,
        spec,
        plan,
        dest,
        holder,
        tdir,
        previous,
        started_at,
    } = p;
    // (`haul plan` reports these in its own output)
    if spec.output.parquet {
        for caveat in plan.table.reader_caveats() {
            tracing::warn!(table = %plan.table.quoted(), "{caveat}");
        }
    }
    let plan_file = PlanFile {
        job: job.clone(),
        table: spec.table.clone(),
        dest: spec.dest.clone(),
        columns: spec.columns.clone(),
        key: spec.key.clone(),
        split: spec.split,
        casts: spec.casts.clone(),
        chunk_rows: spec.chunk_rows,
        output: spec.output.clone(),
        use_snapshot: spec.use_snapshot,
        incremental: spec.incremental.clone(),
        load: spec.load.clone(),
        plan: plan.clone(),
        created_at: started_at.clone(),
        source: Some(spec.source.clone()),
    };
    if !dest
        .put_json(&dest.plan_path(&job), &plan_file, previous.is_none())
        .await?
    {
        // another process planned the same job id between our check and now
        return Err(RunError::AlreadyStarted { job });
    }

    // Chunks committed by an earlier run are skipped (their parts stay staged until the
    // job commits). A chunk manifest whose parts are gone (neither published nor staged)
    // is not trusted: the chunk is extracted again.
    let mut committed = BTreeMap::new();
    for m in dest.chunk_manifests(&job).await? {
        match dest.check_parts(&m).await {
            Ok(()) => {
                committed.insert(m.chunk, m);
            }
            Err(e) if e.is_missing_object() => {
                warn!(job_id = %job, chunk_id = %m.chunk, error = %e, "a committed chunk's parts are missing; extracting it again");
                dest.delete_if_exists(&dest.chunk_manifest_path(&job, m.chunk))
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
    }

    Ok(Preparation::Ready(Box::new(Prepared {
        job,
        spec,
        plan,
        dest,
        holder,
        committed,
        table_dir: tdir,
        started_at,
        planned_now: previous.is_none(),
    })))
}

/// Plans a job without starting it (`haul plan`): the destination is read, never written,
/// and no snapshot is exported. The job's first steps are [`prepare`]'s.
pub async fn plan_only(
    spec: &JobSpec,
    opts: &PrepareOptions,
) -> Result<Preparation<DryRun>, RunError> {
    let p = match plan_job(spec, opts, true).await? {
        Preparation::AlreadyDone(m) => return Ok(Preparation::AlreadyDone(m)),
        Preparation::Ready(p) => *p,
    };
    let committed = p.dest.chunk_manifests(&p.job).await?.len();
    Ok(Preparation::Ready(Box::new(DryRun {
        job: p.job,
        spec: p.spec,
        plan: p.plan,
        dest: p.dest,
        table_dir: p.tdir,
        session: p.holder,
        committed,
    })))
}

/// A job planned, before anything is written for it.
struct Planned {
    job: JobId,
    spec: JobSpec,
    plan: JobPlan,
    dest: Dest,
    holder: pg::Session,
    tdir: String,
    /// The plan an earlier run wrote (a resume).
    previous: Option<PlanFile>,
    started_at: String,
}

/// What [`prepare`] and [`plan_only`] share: the destination checked (for writing too,
/// unless `dry_run`), the job id's record read, the snapshot opened (exported unless
/// `dry_run`) and the job planned in it.
async fn plan_job(
    spec: &JobSpec,
    opts: &PrepareOptions,
    dry_run: bool,
) -> Result<Preparation<Planned>, RunError> {
    let started_at = chrono::Utc::now().to_rfc3339();
    if spec.incremental.is_some() && spec.load.is_some() {
        return Err(RunError::IncrementalLoad);
    }
    let mut spec = spec.clone();
    let dest = Dest::open(&spec.dest, spec.output.fsync)?;
    if !dry_run {
        dest.check_writable().await?;
    }
    let job = opts.job_id.clone().unwrap_or_else(JobId::generate);

    let previous: Option<PlanFile> = dest.get_json(&dest.plan_path(&job)).await?;
    if let Some(p) = &previous
        && p.output.parquet
        && !dry_run
    {
        // a commit of this job cut short is finished first (then the job is done)
        table::recover(
            &dest,
            &p.plan.table_dir(),
            Some(&job),
            table::INTENT_PATIENCE,
        )
        .await?;
    }
    if let Some(m) = dest
        .get_json::<JobManifest>(&dest.job_manifest_path(&job))
        .await?
    {
        if !opts.resume
            && let Some(p) = dest.get_json::<PlanFile>(&dest.plan_path(&job)).await?
            && let Some((what, was, now)) = spec_difference(&p, &m, &spec)
        {
            // the same id for another job: a no-op here would silently skip it
            return Err(RunError::JobIdTaken {
                job,
                dest: dest.url.clone(),
                what,
                was,
                now,
            });
        }
        if !opts.resume
            && spec.incremental.is_some()
            && let Some(w) = &m.watermark
        {
            // a fixed id reused for the next increment would export nothing, and say so
            // with exit 0; each increment is a job of its own
            return Err(RunError::IncrementDone {
                job,
                dest: dest.url.clone(),
                window: format!("({}, {}]", w.low.as_deref().unwrap_or("-infinity"), w.high),
            });
        }
        return Ok(Preparation::AlreadyDone(Box::new(m)));
    }
    match (&previous, opts.resume) {
        // a job of page ranges cannot be finished: say so, not "pass --resume"
        (Some(p), false) if p.plan.chunks.iter().any(|c| !c.survives_new_snapshot()) => {
            return Err(RunError::CannotResumeCtid { job });
        }
        (Some(_), false) => return Err(RunError::AlreadyStarted { job }),
        (None, true) => {
            return Err(RunError::NoSuchJob {
                job,
                dest: dest.url.clone(),
            });
        }
        _ => {}
    }
    if let Some(p) = &previous {
        // a resumed job keeps its original shape; only the source may come from the
        // caller (left out, it is the job's own)
        if spec.source.is_empty() {
            spec.source = p
                .source
                .clone()
                .ok_or_else(|| RunError::ResumeNeedsSource { job: job.clone() })?;
        }
        spec.table = p.table.clone();
        spec.columns = p.columns.clone();
        spec.key = p.key.clone();
        spec.split = p.split;
        spec.casts = p.casts.clone();
        spec.chunk_rows = p.chunk_rows;
        spec.output = p.output.clone();
        spec.use_snapshot = p.use_snapshot;
        spec.incremental = p.incremental.clone();
        spec.load = resumed_load(&job, p.load.as_ref(), spec.load.take())?;
        if let Some(s) = &p.plan.snapshot
            && !opts.fresh_snapshot
        {
            return Err(RunError::NeedsFreshSnapshot {
                job,
                snapshot: s.clone(),
            });
        }
        if p.plan.chunks.iter().any(|c| !c.survives_new_snapshot()) {
            return Err(RunError::CannotResumeCtid { job });
        }
    }

    // The planning session holds the snapshot open until the job ends. A source that is
    // restarting or briefly unreachable gets a few tries; a wrong DSN fails at once.
    let source = pg::Database {
        info: spec.source.clone(),
        creds: opts.source_credentials.clone(),
    };
    let holder = (|| pg::connect(&source))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_times(4),
        )
        .when(|e| e.class().is_retryable())
        .notify(|e, wait| warn!(error = %e, wait_ms = wait.as_millis() as u64, "connecting to the source failed; retrying"))
        .await?;
    pg::refuse_transaction_pooling(&source, &holder).await?;
    // named, so operators can tell it apart in pg_stat_activity (it holds back vacuum)
    holder
        .client
        .batch_execute(&format!(
            "SET application_name = {}",
            pg::quote_literal(&format!("haul:snapshot:{job}"))
        ))
        .await
        .map_err(|e| SourceError::query("naming the snapshot session", e))?;
    holder
        .client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| SourceError::query("beginning the snapshot transaction", e))?;
    // the snapshot is taken at the transaction's first statement: this one, whose start
    // time the rows' `_haul_extracted_at` carries (without a snapshot: planning's time)
    const AT: &str = "(extract(epoch FROM statement_timestamp()) * 1000000)::int8";
    let (snapshot, at_us) = if spec.use_snapshot && !dry_run {
        let row = holder
            .client
            .query_one(&format!("SELECT pg_export_snapshot(), {AT}"), &[])
            .await
            .map_err(|e| SourceError::SnapshotUnsupported {
                reason: pg::pg_reason(&e),
            })?;
        (Some(row.get::<_, String>(0)), row.get::<_, i64>(1))
    } else {
        let row = holder
            .client
            .query_one(&format!("SELECT {AT}"), &[])
            .await
            .map_err(|e| SourceError::query("reading the source's clock", e))?;
        (None, row.get::<_, i64>(0))
    };
    let snapshot_at = chrono::DateTime::from_timestamp_micros(at_us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    let mut table =
        pg::resolve_table(&holder.client, &spec.table, &spec.columns, &spec.casts).await?;
    if !spec.output.parquet && spec.load.is_some() {
        // Postgres to Postgres: arrays travel as they are, bounds and dimensions kept
        table.keep_arrays_verbatim();
    }
    if table.columns.is_empty() {
        return Err(RunError::NoColumns {
            table: table.quoted(),
        });
    }
    if let Some(p) = &spec.output.partition_by {
        if table.column(&p.column).is_none() {
            if !spec.columns.is_empty() {
                // it may well exist, but is not among the columns read
                return Err(RunError::PartitionColumnNotRead {
                    column: p.column.clone(),
                });
            }
            return Err(SourceError::ColumnNotFound {
                table: table.quoted(),
                column: p.column.clone(),
            }
            .into());
        }
        // a Hive-partitioning reader (DuckDB, pyarrow, Spark) adds the partition field as
        // a column, shadowing an exported column of the same name with the folder's value
        let valid = !p.field.is_empty()
            && p.field
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        let taken = table
            .columns
            .iter()
            .any(|c| c.name.eq_ignore_ascii_case(&p.field));
        if !valid || taken {
            return Err(RunError::PartitionField {
                field: p.field.clone(),
                column: p.column.clone(),
                reason: if taken {
                    "the table has a column of that name, which readers with Hive partitioning would show with the folder's value instead of its own"
                } else {
                    "a partition field is made of letters, digits and _"
                },
            });
        }
    }
    if spec.output.lineage {
        for column in haul_shared::jobs::LINEAGE_COLUMNS {
            if table.column(column).is_some() {
                return Err(RunError::LineageColumnTaken {
                    table: table.quoted(),
                    column: column.to_owned(),
                });
            }
        }
    }
    let tdir = table_dir(&table.schema, &table.name);
    let database: String = holder
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| SourceError::query("reading the database's name", e))?
        .get(0);
    let lake_table = if spec.output.parquet {
        if !dry_run {
            // an interrupted commit to the table is finished or rolled back first
            table::recover(&dest, &tdir, Some(&job), table::INTENT_PATIENCE).await?;
        }
        let now = table::read(&dest, &tdir).await?;
        let ours = TableIdentity {
            database: database.clone(),
            schema: table.schema.clone(),
            table: table.name.clone(),
        };
        if let Some(owner) = now.owner.as_ref().filter(|o| **o != ours) {
            return Err(TableError::OtherTable {
                dest: dest.url.clone(),
                table_dir: tdir,
                owner: owner.to_string(),
                ours: ours.to_string(),
            }
            .into());
        }
        now
    } else {
        TableNow::default()
    };
    if let Some(l) = spec.load.as_mut()
        && l.target_table.is_empty()
    {
        // recorded in the plan by name, so a resume loads into the same table
        l.target_table = table.quoted();
    }

    let plan = match &previous {
        Some(p) => {
            if p.plan.table.columns != table.columns {
                return Err(RunError::TableChanged {
                    job,
                    table: table.quoted(),
                });
            }
            let mut base = p.plan.base.clone();
            if spec.output.parquet && lake_table.base.seq != base.seq {
                // the table moved on since the job was planned (its own commit would
                // have been finished above, and the job found done)
                if opts.overwrite && p.plan.window.is_none() {
                    base = lake_table.base.clone();
                } else {
                    let other = format!("job {}", lake_table.job.as_deref().unwrap_or("?"));
                    return Err(match &p.plan.window {
                        Some(_) => TableError::IncrementRaced {
                            job,
                            other,
                            dest: dest.url.clone(),
                            table_dir: tdir,
                        },
                        None => TableError::NewerExport {
                            job,
                            base: match &base.job {
                                Some(j) => format!("job {j}'s export"),
                                None => "an empty table".into(),
                            },
                            other,
                            dest: dest.url.clone(),
                            table_dir: tdir,
                        },
                    }
                    .into());
                }
            }
            JobPlan {
                snapshot: snapshot.clone(),
                snapshot_at: snapshot_at.clone(),
                base,
                database: if p.plan.database.is_empty() {
                    database.clone()
                } else {
                    p.plan.database.clone()
                },
                ..p.plan.clone()
            }
        }
        None => {
            let window = match &spec.incremental {
                Some(inc) => {
                    Some(window(&holder.client, &table, inc, &lake_table, &dest, &tdir).await?)
                }
                None => {
                    if !opts.overwrite
                        && spec.output.parquet
                        && let Some(other) = &lake_table.job
                    {
                        return Err(RunError::DestinationTaken {
                            dest: dest.url.clone(),
                            table_dir: tdir,
                            other: other.clone(),
                        });
                    }
                    None
                }
            };
            let filter = window.as_ref().map(|w| w.predicate());
            let t0 = Instant::now();
            let planned = planner::plan(
                &holder.client,
                &table,
                &spec.key,
                spec.chunk_rows,
                opts.parallelism.max(1) as u64,
                spec.split,
                filter.as_deref(),
            )
            .await?;
            info!(
                chunks = planned.chunks.len(),
                estimated_rows = planned.estimated_rows,
                key = ?planned.key.iter().map(|k| quote_ident(&k.name)).collect::<Vec<_>>(),
                planning_ms = t0.elapsed().as_millis() as u64,
                "planned"
            );
            JobPlan {
                table: table.clone(),
                key: planned.key,
                chunks: planned.chunks,
                estimated_rows: planned.estimated_rows,
                snapshot: snapshot.clone(),
                snapshot_at: snapshot_at.clone(),
                window,
                base: lake_table.base.clone(),
                database: database.clone(),
            }
        }
    };
    if snapshot.is_none() {
        // without a snapshot to hold, the planning transaction need not stay open (it
        // would only hold back vacuum)
        holder
            .client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SourceError::query("ending the planning transaction", e))?;
    }
    Ok(Preparation::Ready(Box::new(Planned {
        job,
        spec,
        plan,
        dest,
        holder,
        tdir,
        previous,
        started_at,
    })))
}

/// How `spec` differs from the finished job recorded under the same id (`plan`, `done`),
/// if it asks for something else: another source, table, columns, casts, partitioning,
/// watermark or load target. `(what, recorded, asked)`.
fn spec_difference(
    plan: &PlanFile,
    done: &JobManifest,
    spec: &JobSpec,
) -> Option<(&'static str, String, String)> {
    // each as its flag would say it, never Rust's debug text
    let list = |v: &[String]| {
        if v.is_empty() {
            "every column".to_owned()
        } else {
            v.join(",")
        }
    };
    let casts = |c: &std::collections::BTreeMap<String, String>| {
        if c.is_empty() {
            "no casts".to_owned()
        } else {
            c.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let partitioning = |p: &Option<haul_shared::jobs::PartitionBy>| match p {
        None => "none".to_owned(),
        Some(p) => {
            let g = format!("{:?}", p.granularity).to_lowercase();
            if p.field == "dt" {
                format!("{}:{g}", p.column)
            } else {
                format!("{}:{g}:as={}", p.column, p.field)
            }
        }
    };
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
    // the table as named then or now (`t` and `public.t` name the same table)
    let now = spec.table.as_str();
    let same_table = now == plan.table
        || now == done.table
        || (!now.contains('.')
            && done
                .table
                .strip_suffix(now)
                .is_some_and(|s| s.ends_with('.')));
    let watermark =
        |i: &Option<haul_shared::jobs::Incremental>| i.as_ref().map(|i| i.column.clone());
    let target =
        |l: &Option<haul_shared::jobs::LoadSpec>| l.as_ref().map(|l| l.target_table.clone());
    // a load target left empty means the source table's name, as recorded
    let same_target = target(&plan.load) == target(&spec.load)
        || target(&spec.load).is_some_and(|t| t.is_empty());
    let source = spec.source.to_string();
    [
        ("source", done.source == source, done.source.clone(), source),
        ("table", same_table, plan.table.clone(), spec.table.clone()),
        (
            "columns",
            plan.columns == spec.columns,
            list(&plan.columns),
            list(&spec.columns),
        ),
        (
            "casts",
            plan.casts == spec.casts,
            casts(&plan.casts),
            casts(&spec.casts),
        ),
        (
            "partitioning",
            plan.output.partition_by == spec.output.partition_by,
            partitioning(&plan.output.partition_by),
            partitioning(&spec.output.partition_by),
        ),
        (
            "incremental column",
            watermark(&plan.incremental) == watermark(&spec.incremental),
            or_none(watermark(&plan.incremental)),
            or_none(watermark(&spec.incremental)),
        ),
        (
            "load target",
            same_target,
            or_none(target(&plan.load)),
            or_none(target(&spec.load)),
        ),
    ]
    .into_iter()
    .find(|(_, same, _, _)| !same)
    .map(|(what, _, was, now)| (what, was, now))
}

/// A resumed job's load: the one its plan records, so a resume finishes the load too.
/// The caller may give the loaders' addresses again (they move); a resume that would add
/// a load, or load into another table, is refused: it would change what the job means.
fn resumed_load(
    job: &JobId,
    planned: Option<&LoadSpec>,
    given: Option<LoadSpec>,
) -> Result<Option<LoadSpec>, RunError> {
    let changes = |what: String| RunError::ResumeChanges {
        job: job.clone(),
        what,
    };
    match (planned, given) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(changes(
            "it did not load a target; resume it without --load".into(),
        )),
        (Some(p), None) => Ok(Some(p.clone())),
        (Some(p), Some(g)) => {
            if !g.target_table.is_empty() && g.target_table != p.target_table {
                return Err(changes(format!(
                    "it loads into {}, not {}",
                    p.target_table, g.target_table
                )));
            }
            Ok(Some(LoadSpec {
                endpoints: if g.endpoints.is_empty() {
                    p.endpoints.clone()
                } else {
                    g.endpoints
                },
                ..p.clone()
            }))
        }
    }
}

/// An incremental job's window, computed in the planning transaction (the job's
/// snapshot): `low` is the high mark of the destination's last increment, `high` the
/// snapshot's time less the lag, and earlier than the start of every transaction that
/// was writing in the database at that moment, so a row committed after the snapshot
/// (its watermark no earlier than its transaction's start) always falls in a later
/// window.
async fn window(
    client: &tokio_postgres::Client,
    table: &pg::TableInfo,
    inc: &haul_shared::jobs::Incremental,
    existing: &TableNow,
    dest: &Dest,
    tdir: &str,
) -> Result<haul_shared::jobs::Window, RunError> {
    let low = match (&existing.job, &existing.watermark) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(RunError::NotIncremental {
                column: inc.column.clone(),
                dest: dest.url.clone(),
                table_dir: tdir.to_owned(),
            });
        }
        (Some(_), Some((column, _))) if *column != inc.column => {
            return Err(RunError::OtherWatermark {
                column: inc.column.clone(),
                other: column.clone(),
                dest: dest.url.clone(),
            });
        }
        (Some(_), Some((_, high))) => Some(high.clone()),
    };
    let row = client
        .query_opt(
            "SELECT atttypid::regtype::text FROM pg_attribute \
             WHERE attrelid = $1::oid AND attname = $2 AND attnum > 0 AND NOT attisdropped",
            &[&table.oid, &inc.column],
        )
        .await
        .map_err(|e| SourceError::query("looking up the watermark column", e))?
        .ok_or_else(|| SourceError::ColumnNotFound {
            table: table.quoted(),
            column: inc.column.clone(),
        })?;
    let pg_type: String = row.get(0);
    // the window's type, and the cast that turns `now()` into it
    let (window_type, as_type) = match pg_type.as_str() {
        "timestamp with time zone" => ("timestamptz", ""),
        // haul's session's time zone is UTC; the column's writers must have been too
        "timestamp without time zone" => {
            let zone: String = client
                .query_one(
                    "SELECT reset_val FROM pg_settings WHERE name = 'TimeZone'",
                    &[],
                )
                .await
                .map_err(|e| SourceError::query("reading the database's time zone", e))?
                .get(0);
            if !is_utc(&zone) {
                return Err(RunError::LocalWatermark {
                    column: inc.column.clone(),
                    table: table.quoted(),
                    zone,
                });
            }
            ("timestamp", "::timestamp")
        }
        _ => {
            return Err(RunError::BadWatermark {
                column: inc.column.clone(),
                pg_type,
            });
        }
    };
    // Who can see other sessions' transactions: without that, only the lag protects
    // rows that commit late.
    let sees_all: bool = client
        .query_one(
            "SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') \
             OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(|e| SourceError::query("checking the role's privileges", e))?
        .get(0);
    if !sees_all {
        warn!(
            "the source user cannot see other sessions' transactions (grant it pg_read_all_stats): \
             only --lag-secs guards rows committed after the snapshot"
        );
    }
    // Every transaction open in the database could still commit a row stamped with a
    // time from its start, whether it has written yet or not (a transaction gets an xid
    // only at its first write): the window ends before the oldest one began. Prepared
    // transactions are bounded by their PREPARE time (their start is not recorded).
    // haul's own read-only sessions (snapshots, chunk readers) write nothing; its
    // loaders do, and count.
    const OPEN: &str = "FROM pg_stat_activity \
         WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() \
           AND datname = current_database() AND backend_type = 'client backend' \
           AND coalesce(application_name, '') <> 'haul' \
           AND coalesce(application_name, '') NOT LIKE 'haul:snapshot:%'";
    let high: String = client
        .query_one(
            &format!(
                "SELECT (LEAST(now() - make_interval(secs => $1::float8), \
                   (SELECT min(xact_start) - interval '1 microsecond' {OPEN}), \
                   (SELECT min(prepared) - interval '1 microsecond' FROM pg_prepared_xacts \
                    WHERE database = current_database())){as_type})::text"
            ),
            &[&(inc.lag_secs as f64)],
        )
        .await
        .map_err(|e| SourceError::query("computing the window's high mark", e))?
        .get(0);
    // an idle-in-transaction session holds every increment back: say which
    if let Some(r) = client
        .query_opt(
            &format!(
                "SELECT pid, coalesce(application_name, ''), coalesce(state, ''), \
                        extract(epoch FROM now() - xact_start)::int8 \
                 {OPEN} AND xact_start < now() - interval '10 minutes' \
                 ORDER BY xact_start LIMIT 1"
            ),
            &[],
        )
        .await
        .map_err(|e| SourceError::query("looking for old transactions", e))?
    {
        warn!(
            pid = r.get::<_, i32>(0),
            application = r.get::<_, String>(1),
            state = r.get::<_, String>(2),
            open_secs = r.get::<_, i64>(3),
            "a transaction open in the source for over 10 minutes holds the increment's high mark back to its start (it could still commit rows stamped then); end it, or the windows stay behind it"
        );
    }
    let standby: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(|e| SourceError::query("asking whether the source is a standby", e))?
        .get(0);
    if standby && inc.lag_secs == 0 {
        warn!(
            "the source is a standby: the primary's open transactions are not visible here, so only --lag-secs guards rows they commit later; set it above your longest write transaction"
        );
    }
    Ok(haul_shared::jobs::Window {
        column: inc.column.clone(),
        pg_type: window_type.into(),
        low,
        high,
    })
}

/// Whether a `TimeZone` setting is UTC under one of its names.
fn is_utc(zone: &str) -> bool {
    let z = zone.to_ascii_uppercase();
    let z = z.strip_prefix("ETC/").unwrap_or(&z);
    matches!(
        z,
        "UTC" | "UCT" | "GMT" | "ZULU" | "UNIVERSAL" | "GREENWICH" | "GMT0" | "GMT+0" | "GMT-0"
    )
}

/// With `--load`: names the target table (the source table's name unless given) and
/// prepares the job on it through a loader — created, checked against the columns, and
/// emptied if asked, once per job — before any chunk is queued.
pub async fn prepare_load(p: &mut Prepared, auth: &LoadAuth) -> Result<(), RunError> {
    let Some(load) = p.spec.load.as_mut() else {
        return Ok(());
    };
    if load.endpoints.is_empty() {
        return Err(RunError::NoLoaders);
    }
    if load.target_table.is_empty() {
        load.target_table = p.plan.table.quoted();
    }
    let schema = std::sync::Arc::new(p.plan.table.arrow_schema());
    let req = haul_shared::proto::wire::PrepareLoad {
        version: haul_shared::proto::LOAD_VERSION,
        job_id: p.job.to_string(),
        target_table: load.target_table.clone(),
        arrow_schema: haul_shared::load::schema_to_ipc(&schema)
            .map_err(|e| RunError::Internal(format!("encoding the schema: {e}")))?
            .to_vec(),
        create_table: load.create_table,
        truncate_first: load.truncate_first,
    };
    let client = LoadClient::new(load, auth);
    let reply = match client.prepare(req).await {
        Ok(r) => r,
        Err(e) => {
            // nothing was queued: let the same job id be submitted again once fixed
            if p.planned_now {
                let _ = p.dest.delete_if_exists(&p.dest.plan_path(&p.job)).await;
            }
            return Err(e.into());
        }
    };
    info!(
        target = %reply.target_table,
        created = reply.created,
        truncated = reply.truncated,
        resumed = reply.already_prepared,
        "load target ready"
    );
    load.target_table = reply.target_table;
    Ok(())
}

/// Records every chunk's state (committed ones as committed) and queues the rest.
pub async fn queue_chunks(
    record: &JobRecord,
    committed: &BTreeMap<ChunkId, ChunkManifest>,
    jobs: &dyn JobStore,
    queue: &dyn ChunkQueue,
) -> Result<(), RunError> {
    let plan = record
        .plan
        .as_ref()
        .ok_or_else(|| RunError::Internal(format!("job {} has no plan", record.id)))?;
    for (i, range) in plan.chunks.iter().enumerate() {
        let chunk = ChunkId(i as u32);
        if let Some(m) = committed.get(&chunk) {
            let state = ChunkState::Committed {
                rows: m.rows,
                bytes: m.bytes,
            };
            jobs.set_chunk_state(&record.id, chunk, &state).await?;
            continue;
        }
        jobs.set_chunk_state(&record.id, chunk, &ChunkState::Pending)
            .await?;
        let task = Task {
            retry: Default::default(),
            job_id: record.id.clone(),
            chunk_id: chunk,
            range: range.clone(),
            run: record.submitted_at.clone(),
        };
        queue.publish(task.encode()).await?;
    }
    Ok(())
}
