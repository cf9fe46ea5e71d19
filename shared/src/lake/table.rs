//! The table commit: a job's parts become the table's in one version of its Delta log.
//!
//! A state machine with one atomic step (creating the next log version); what a stop at
//! each step leaves, and who finishes it:
//!
//! ```text
//! staged      every chunk committed; parts under _haul/staging/   job's resume commits
//!   | write the intent  _haul/intents/<table>/<job>.json (parts, base version, manifest)
//! intended    nothing visible yet                                 recovery: rolls back
//!   | publish: each part renamed (copied) to its final name
//! published   glob readers may see the parts; log readers do not   recovery: rolls back
//!   | create _delta_log/<n+1>.json if absent   <- the commit point
//! committed   log readers see the job; replaced parts still there recovery: rolls forward
//!   | job manifest, _manifest.json copy, replaced parts deleted, staging cleared
//! cleaned     intent deleted                                      nothing left to do
//! ```
//!
//! Recovery ([`recover`]) runs before anything else touches the table — a job's commit,
//! its planning, `haul gc` — for every intent it finds: an intent whose job is in the
//! log is rolled forward; one whose job is not is rolled back (its parts renamed back to
//! staging, so a resume can commit them again) once its committer is known to be gone:
//! it is the caller's own job, or the intent is older than the caller's patience. A
//! roll-back first writes an abort marker into the log, so a committer that was only
//! slow can never commit after its parts were taken away.
//!
//! Architecture invariant: every check of a commit (the table's owner, the window
//! follows on, no newer export replaced, the attempt not aborted) is made against the
//! version the commit builds on, and the commit is created only as the version after it;
//! a commit that finds its version taken re-reads the log, and retries only while the
//! job's sequence number (the log's haul `txn`) still follows on.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arrow_schema::Schema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use super::delta::{
    self, Action, Add, DeltaLog, Format, Metadata, Protocol, Remove, TableState, Txn,
};
use super::{Dest, DestError, JobManifest, PartFile};
use crate::JobId;
use crate::error::{Classify, ErrorClass};
use crate::jobs::{TableBase, Window};

const KEY_DATABASE: &str = "haul.source.database";
const KEY_SCHEMA: &str = "haul.source.schema";
const KEY_TABLE: &str = "haul.source.table";
const KEY_JOB: &str = "haul.job";
const KEY_SINCE: &str = "haul.export.since_version";
const KEY_WM_COLUMN: &str = "haul.watermark.column";
const KEY_WM_TYPE: &str = "haul.watermark.pg_type";
const KEY_WM_LOW: &str = "haul.watermark.low";
const KEY_WM_HIGH: &str = "haul.watermark.high";

/// How long another process's interrupted commit is left alone by default: a live
/// committer renews its intent far more often while it publishes.
pub const INTENT_PATIENCE: Duration = Duration::from_secs(15 * 60);
/// A committer rewrites its intent this often while it publishes.
const INTENT_RENEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(
        "job {job}: another increment ({other}) was committed to {dest}/{table_dir} while this one ran; its window no longer follows on, so it was not recorded. Run again"
    )]
    IncrementRaced {
        job: JobId,
        other: String,
        dest: String,
        table_dir: String,
    },
    #[error(
        "job {job} was planned against {base} of {dest}/{table_dir}, but {other} has since been committed there; committing would replace a newer export, so nothing was changed. Resume it with --overwrite to replace that export anyway, or run a new job"
    )]
    NewerExport {
        job: JobId,
        base: String,
        other: String,
        dest: String,
        table_dir: String,
    },
    #[error(
        "{dest}/{table_dir} holds {owner}, not {ours}: one folder holds one source table; write this one to another --dest"
    )]
    OtherTable {
        dest: String,
        table_dir: String,
        owner: String,
        ours: String,
    },
    #[error(
        "job {job}: the increments recorded in {dest}/{table_dir} are gone (the table has no log, or another export replaced it); run it as a first increment in a new --dest"
    )]
    IncrementsVanished {
        job: JobId,
        dest: String,
        table_dir: String,
    },
    #[error(
        "job {job}: its commit to {table_dir} was rolled back by a recovery that took it for abandoned; committing again"
    )]
    Aborted { job: JobId, table_dir: String },
}

impl Classify for TableError {
    fn class(&self) -> ErrorClass {
        match self {
            TableError::Dest(e) => e.class(),
            TableError::IncrementRaced { .. }
            | TableError::NewerExport { .. }
            | TableError::OtherTable { .. }
            | TableError::IncrementsVanished { .. } => ErrorClass::User,
            TableError::Aborted { .. } => ErrorClass::Transient,
        }
    }
}

/// The source table a lake table holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableIdentity {
    pub database: String,
    pub schema: String,
    pub table: String,
}

impl std::fmt::Display for TableIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.database, self.schema, self.table)
    }
}

impl TableIdentity {
    fn of_state(s: &TableState) -> Option<Self> {
        Some(TableIdentity {
            database: s.config(KEY_DATABASE)?.to_owned(),
            schema: s.config(KEY_SCHEMA)?.to_owned(),
            table: s.config(KEY_TABLE)?.to_owned(),
        })
    }

    /// Refuses a table that holds another source table.
    fn check(
        &self,
        owner: Option<&TableIdentity>,
        dest: &Dest,
        table_dir: &str,
    ) -> Result<(), TableError> {
        match owner {
            Some(o) if o != self => Err(TableError::OtherTable {
                dest: dest.url.clone(),
                table_dir: table_dir.to_owned(),
                owner: o.to_string(),
                ours: self.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

/// What a table holds now, as a job's planning needs it.
#[derive(Clone, Debug, Default)]
pub struct TableNow {
    /// The base a job planned now builds on.
    pub base: TableBase,
    pub owner: Option<TableIdentity>,
    /// The watermark column of a series of increments, and its high mark.
    pub watermark: Option<(String, String)>,
    /// The current export's latest job, if the table holds one.
    pub job: Option<String>,
    /// Parts the table's readers see, relative to the destination root.
    pub files: Vec<PartFile>,
    /// The log version of the current export's first job (a full export or the first
    /// increment): jobs committed at or after it are what the table holds.
    pub since_version: Option<u64>,
    /// Written by an older haul: `_manifest.json` only, no log.
    pub legacy: Option<JobManifest>,
}

/// Reads a table's latest state: from its log, or from an older haul's `_manifest.json`
/// (taken over by the next commit).
pub async fn read(dest: &Dest, table_dir: &str) -> Result<TableNow, DestError> {
    let state = DeltaLog::new(dest, table_dir).read().await?;
    let legacy = match &state {
        Some(s) if s.haul_seq() > 0 => return Ok(now_of(s, table_dir)),
        Some(s) => legacy_manifest(dest, table_dir, s).await?,
        None => dest
            .get_json::<JobManifest>(&dest.table_manifest_path(table_dir))
            .await?
            .filter(|m| m.table_version.is_none()),
    };
    let Some(m) = legacy else {
        return Ok(state.map(|s| now_of(&s, table_dir)).unwrap_or_default());
    };
    Ok(TableNow {
        base: TableBase {
            seq: 0,
            version: state.as_ref().map(|s| s.version),
            job: Some(m.job.to_string()),
        },
        owner: state.as_ref().and_then(TableIdentity::of_state),
        watermark: m
            .watermark
            .as_ref()
            .map(|w| (w.column.clone(), w.high.clone())),
        job: Some(m.job.to_string()),
        files: m.files.clone(),
        since_version: None,
        legacy: Some(m),
    })
}

fn now_of(s: &TableState, table_dir: &str) -> TableNow {
    let job = s.config(KEY_JOB).map(str::to_owned);
    TableNow {
        base: TableBase {
            seq: s.haul_seq(),
            version: Some(s.version),
            job: job.clone(),
        },
        owner: TableIdentity::of_state(s),
        watermark: s
            .config(KEY_WM_COLUMN)
            .zip(s.config(KEY_WM_HIGH))
            .map(|(c, h)| (c.to_owned(), h.to_owned())),
        job,
        files: s
            .files
            .values()
            .map(|a| {
                let rel = delta::decode_path(&a.path);
                PartFile {
                    path: format!("{table_dir}/{rel}"),
                    staged: String::new(),
                    rows: a
                        .stats
                        .as_deref()
                        .and_then(|st| serde_json::from_str::<Value>(st).ok())
                        .and_then(|v| v.get("numRecords")?.as_u64())
                        .unwrap_or_default(),
                    bytes: a.size.unsigned_abs(),
                    partition: rel
                        .rsplit_once('/')
                        .map(|(p, _)| p.to_owned())
                        .unwrap_or_default(),
                }
            })
            .collect(),
        since_version: s.config(KEY_SINCE).and_then(|v| v.parse().ok()),
        legacy: None,
    }
}

/// The record of a commit under way, written before anything is published.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Intent {
    pub job: JobId,
    /// This try of the commit (an abort marker names it).
    pub attempt: String,
    /// The log version the commit was based on (`None`: the table had no log).
    pub base_version: Option<u64>,
    pub parts: Vec<PartFile>,
    /// The job's manifest, written once the commit is in the log.
    pub manifest: JobManifest,
    /// Parts of an older haul's export this commit replaces (not in any log).
    #[serde(default)]
    pub legacy_parts: Vec<String>,
}

fn intents_dir(table_dir: &str) -> String {
    format!("_haul/intents/{table_dir}")
}

fn intent_path(dest: &Dest, table_dir: &str, job: &JobId) -> object_store::path::Path {
    dest.path(&format!("{}/{job}.json", intents_dir(table_dir)))
}

/// A job's commit to its table.
pub struct TableCommit<'a> {
    pub job: &'a JobId,
    pub table_dir: &'a str,
    pub identity: TableIdentity,
    /// An increment's window (appended); `None`: a full export (replaces the table).
    pub window: Option<&'a Window>,
    /// The table as the job was planned against it.
    pub base: &'a TableBase,
    /// The parts' schema, and the partition folders' field.
    pub schema: &'a Schema,
    pub partition_field: Option<&'a str>,
    /// The job's own manifest (its parts, rows, window).
    pub manifest: JobManifest,
}

/// How a commit's try at one log version ended.
enum Outcome {
    /// The job is in the log, at this version.
    Committed(u64),
    /// Another commit took the version; try again on the new latest.
    Retry,
}

/// Commits a job to its table (see the module docs): recovery first, then intent,
/// publish, the log version, clean-up. Safe to call again after any failure; a job
/// already in the log is only cleaned up after.
pub async fn commit(dest: &Dest, c: TableCommit<'_>) -> Result<JobManifest, TableError> {
    let started = std::time::Instant::now();
    let log = DeltaLog::new(dest, c.table_dir);
    recover(dest, c.table_dir, Some(c.job), INTENT_PATIENCE).await?;
    let parts = c.manifest.files.clone();
    let attempt = uuid::Uuid::new_v4().simple().to_string();
    let mut published = false;
    loop {
        let Some(state) = log.read().await? else {
            // version 0 creates the table (empty): the job's commit is the next one, so
            // an intent always has a log in which a recovery can fence it
            if c.base.seq > 0 && c.window.is_some() {
                return Err(TableError::IncrementsVanished {
                    job: c.job.clone(),
                    dest: dest.url.clone(),
                    table_dir: c.table_dir.to_owned(),
                });
            }
            log.try_commit(0, &create_actions(&c)).await?;
            continue;
        };
        let from = c.base.version.map_or(0, |v| v + 1);
        if state.haul_seq() != c.base.seq {
            // already in the log (a commit whose answer was lost, or cut short after it)
            if let Some(v) = find_job(&log, c.job, from).await? {
                return finish(dest, c.table_dir, c.job, v).await;
            }
            give_up(dest, &c).await?;
            return Err(conflict(dest, &c, &state));
        }
        if find_abort(&log, c.job, &attempt, from).await? {
            give_up(dest, &c).await?;
            return Err(TableError::Aborted {
                job: c.job.clone(),
                table_dir: c.table_dir.to_owned(),
            });
        }
        let refused = state
            .check_writable(c.table_dir)
            .map_err(TableError::from)
            .and_then(|()| {
                c.identity
                    .check(TableIdentity::of_state(&state).as_ref(), dest, c.table_dir)
            });
        if let Err(e) = refused {
            // (another writer changed the table since an earlier try published)
            give_up(dest, &c).await?;
            return Err(e);
        }
        let legacy = legacy_manifest(dest, c.table_dir, &state).await?;
        if let Some(w) = c.window {
            let high = match &legacy {
                Some(l) => l.watermark.as_ref().map(|lw| lw.high.clone()),
                None => state.config(KEY_WM_HIGH).map(str::to_owned),
            };
            if high != w.low {
                give_up(dest, &c).await?;
                return Err(conflict(dest, &c, &state));
            }
        }
        let actions = actions(&c, &state, legacy.as_ref(), &attempt);
        let intent = Intent {
            job: c.job.clone(),
            attempt: attempt.clone(),
            base_version: Some(state.version),
            parts: parts.clone(),
            manifest: c.manifest.clone(),
            legacy_parts: match (&legacy, c.window) {
                (Some(l), None) => l.files.iter().map(|f| f.path.clone()).collect(),
                _ => Vec::new(),
            },
        };
        dest.put_json(&intent_path(dest, c.table_dir, c.job), &intent, false)
            .await?;
        if !published {
            published = true;
            if let Err(e) = publish(dest, c.table_dir, c.job, &intent).await {
                // nothing names the parts: glob readers must not see them (a store that
                // failed the publish may fail this too; recovery finishes it then)
                if let Err(undo) = give_up(dest, &c).await {
                    warn!(job_id = %c.job, error = %undo, "could not take back the parts published so far");
                }
                return Err(e.into());
            }
        }
        let version = state.version + 1;
        match try_version(&log, version, &actions).await? {
            Outcome::Committed(v) => {
                let m = finish(dest, c.table_dir, c.job, v).await?;
                if v % delta::CHECKPOINT_INTERVAL == 0 {
                    checkpoint(&log).await;
                }
                info!(
                    job_id = %c.job,
                    table = c.table_dir,
                    version = v,
                    commit_ms = started.elapsed().as_millis() as u64,
                    "table committed"
                );
                return Ok(m);
            }
            Outcome::Retry => {
                warn!(job_id = %c.job, table = c.table_dir, version, "another commit took the table's next version; reading it again");
            }
        }
    }
}

/// A commit that will not happen: its parts back to staging (whichever try of it
/// published them: the job is not in the log, and its part names are its own), its
/// intent gone.
async fn give_up(dest: &Dest, c: &TableCommit<'_>) -> Result<(), DestError> {
    unpublish(dest, &c.manifest.files).await?;
    dest.delete_if_exists(&intent_path(dest, c.table_dir, c.job))
        .await
}

/// An older haul's `_manifest.json` of a table whose log holds no haul job yet: the
/// export it records is taken over by the next commit. (The copy haul writes after each
/// commit names its log version.)
async fn legacy_manifest(
    dest: &Dest,
    table_dir: &str,
    state: &TableState,
) -> Result<Option<JobManifest>, DestError> {
    if state.haul_seq() > 0 {
        return Ok(None);
    }
    Ok(dest
        .get_json::<JobManifest>(&dest.table_manifest_path(table_dir))
        .await?
        .filter(|m| m.table_version.is_none()))
}

/// A version's `commitInfo`: what it did, and haul's own record (`haul`).
fn new_commit_info(operation: &str, parameters: Option<Value>, haul: Value) -> Map<String, Value> {
    let mut info = Map::new();
    info.insert(
        "timestamp".into(),
        json!(chrono::Utc::now().timestamp_millis()),
    );
    info.insert("operation".into(), json!(operation));
    if let Some(p) = parameters {
        info.insert("operationParameters".into(), p);
    }
    info.insert(
        "engineInfo".into(),
        json!(format!("haul/{}", env!("CARGO_PKG_VERSION"))),
    );
    info.insert("haul".into(), haul);
    info
}

/// Version 0 of a table: its protocol and schema, and the source table it holds.
fn create_actions(c: &TableCommit<'_>) -> Vec<Action> {
    let partition_fields: Vec<String> = c.partition_field.map(str::to_owned).into_iter().collect();
    let (schema_string, ntz) = delta::schema_string(c.schema, &partition_fields);
    let info = new_commit_info("CREATE TABLE", None, json!({ "create": c.job }));
    let configuration = BTreeMap::from([
        (KEY_DATABASE.to_owned(), Some(c.identity.database.clone())),
        (KEY_SCHEMA.to_owned(), Some(c.identity.schema.clone())),
        (KEY_TABLE.to_owned(), Some(c.identity.table.clone())),
    ]);
    vec![
        Action::CommitInfo(info),
        Action::Protocol(protocol(None, ntz)),
        Action::Metadata(Metadata {
            id: uuid::Uuid::new_v4().to_string(),
            name: None,
            description: None,
            format: Format {
                provider: "parquet".into(),
                options: BTreeMap::new(),
            },
            schema_string,
            partition_columns: partition_fields,
            configuration,
            created_time: Some(chrono::Utc::now().timestamp_millis()),
        }),
    ]
}

async fn try_version(log: &DeltaLog<'_>, v: u64, actions: &[Action]) -> Result<Outcome, DestError> {
    if log.try_commit(v, actions).await? {
        return Ok(Outcome::Committed(v));
    }
    // taken: by this very commit (an answer lost and the put retried), or another
    let ours = commit_info(actions).and_then(|m| m.get("haul").cloned());
    if let Some(existing) = log.read_version(v).await?
        && commit_info(&existing).and_then(|m| m.get("haul").cloned()) == ours
    {
        return Ok(Outcome::Committed(v));
    }
    Ok(Outcome::Retry)
}

fn commit_info(actions: &[Action]) -> Option<&Map<String, Value>> {
    actions.iter().find_map(|a| match a {
        Action::CommitInfo(m) => Some(m),
        _ => None,
    })
}

/// haul's record in a version's commit info.
fn haul_info(actions: &[Action]) -> Option<&Map<String, Value>> {
    commit_info(actions)?.get("haul")?.as_object()
}

/// The version at or after `from` that commits `job`, if any.
async fn find_job(log: &DeltaLog<'_>, job: &JobId, from: u64) -> Result<Option<u64>, DestError> {
    let mut v = from;
    while let Some(actions) = log.read_version(v).await? {
        if haul_info(&actions)
            .and_then(|h| h.get("job"))
            .and_then(Value::as_str)
            == Some(job.as_str())
        {
            return Ok(Some(v));
        }
        v += 1;
    }
    Ok(None)
}

/// Whether a version at or after `from` aborts this attempt of `job`'s commit.
async fn find_abort(
    log: &DeltaLog<'_>,
    job: &JobId,
    attempt: &str,
    from: u64,
) -> Result<bool, DestError> {
    let mut v = from;
    while let Some(actions) = log.read_version(v).await? {
        if let Some(h) = haul_info(&actions)
            && h.get("abort").and_then(Value::as_str) == Some(job.as_str())
            && h.get("attempt").and_then(Value::as_str) == Some(attempt)
        {
            return Ok(true);
        }
        v += 1;
    }
    Ok(false)
}

/// The refusal of a commit whose base is no longer the table's latest.
fn conflict(dest: &Dest, c: &TableCommit<'_>, s: &TableState) -> TableError {
    let other = s.config(KEY_JOB).unwrap_or("another job").to_owned();
    if c.window.is_some() {
        return TableError::IncrementRaced {
            job: c.job.clone(),
            other,
            dest: dest.url.clone(),
            table_dir: c.table_dir.to_owned(),
        };
    }
    TableError::NewerExport {
        job: c.job.clone(),
        base: match &c.base.job {
            Some(j) => format!("job {j}'s export"),
            None => "an empty table".into(),
        },
        other: format!("job {other}"),
        dest: dest.url.clone(),
        table_dir: c.table_dir.to_owned(),
    }
}

/// The actions of a job's commit on top of `state`.
fn actions(
    c: &TableCommit<'_>,
    state: &TableState,
    legacy: Option<&JobManifest>,
    attempt: &str,
) -> Vec<Action> {
    let now = chrono::Utc::now().timestamp_millis();
    let version = state.version + 1;
    let partition_fields: Vec<String> = c.partition_field.map(str::to_owned).into_iter().collect();
    let (schema_string, ntz) = delta::schema_string(c.schema, &partition_fields);
    let mut configuration: BTreeMap<String, Option<String>> = state
        .metadata
        .as_ref()
        .map(|m| m.configuration.clone())
        .unwrap_or_default();
    let mut set = |k: &str, v: &str| {
        configuration.insert(k.to_owned(), Some(v.to_owned()));
    };
    set(KEY_DATABASE, &c.identity.database);
    set(KEY_SCHEMA, &c.identity.schema);
    set(KEY_TABLE, &c.identity.table);
    set(KEY_JOB, c.job.as_str());
    // an increment appends to the series (a first one appends to nothing)
    let append = c.window.is_some();
    if !append || c.window.is_some_and(|w| w.low.is_none()) || legacy.is_some() {
        set(KEY_SINCE, &version.to_string());
    }
    if let Some(w) = c.window {
        set(KEY_WM_COLUMN, &w.column);
        set(KEY_WM_TYPE, &w.pg_type);
        set(KEY_WM_HIGH, &w.high);
        match &w.low {
            Some(low) => set(KEY_WM_LOW, low),
            None => {
                configuration.remove(KEY_WM_LOW);
            }
        }
    } else {
        for k in [KEY_WM_COLUMN, KEY_WM_TYPE, KEY_WM_LOW, KEY_WM_HIGH] {
            configuration.remove(k);
        }
    }
    let mut out = Vec::new();
    let info = new_commit_info(
        "WRITE",
        Some(json!({
            "mode": if append { "Append" } else { "Overwrite" },
            "partitionBy": serde_json::to_string(&partition_fields).unwrap_or_default(),
        })),
        json!({
            "job": c.job,
            "attempt": attempt,
            "seq": c.base.seq + 1,
            "rows": c.manifest.rows,
            "window": c.window,
        }),
    );
    out.push(Action::CommitInfo(info));
    let old_protocol = state.protocol.clone();
    let needs_ntz = ntz
        && !old_protocol
            .as_ref()
            .and_then(|p| p.reader_features.as_ref())
            .is_some_and(|f| f.iter().any(|x| x == "timestampNtz"));
    if old_protocol.is_none() || needs_ntz {
        out.push(Action::Protocol(protocol(old_protocol.as_ref(), ntz)));
    }
    let old_meta = state.metadata.clone();
    out.push(Action::Metadata(Metadata {
        id: old_meta
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        name: None,
        description: None,
        format: Format {
            provider: "parquet".into(),
            options: BTreeMap::new(),
        },
        schema_string,
        partition_columns: partition_fields.clone(),
        configuration,
        created_time: Some(old_meta.and_then(|m| m.created_time).unwrap_or(now)),
    }));
    out.push(Action::Txn(Txn {
        app_id: delta::APP_ID.into(),
        version: i64::try_from(c.base.seq + 1).unwrap_or(i64::MAX),
        last_updated: Some(now),
    }));
    if !append {
        for a in state.files.values() {
            out.push(Action::Remove(Remove {
                path: a.path.clone(),
                deletion_timestamp: Some(now),
                data_change: true,
                extended_file_metadata: Some(true),
                partition_values: Some(a.partition_values.clone()),
                size: Some(a.size),
            }));
        }
    }
    let field = c.partition_field;
    let mut adds: Vec<&PartFile> = c.manifest.files.iter().collect();
    if append {
        // taking over an older haul's series of increments: its parts join the log
        adds.extend(legacy.iter().flat_map(|l| l.files.iter()));
    }
    for f in adds {
        out.push(Action::Add(add_of(c.table_dir, f, field, now)));
    }
    out
}

fn protocol(old: Option<&Protocol>, ntz: bool) -> Protocol {
    if !ntz {
        return old.cloned().unwrap_or(Protocol {
            min_reader_version: 1,
            min_writer_version: 2,
            reader_features: None,
            writer_features: None,
        });
    }
    let mut readers: BTreeSet<String> = old
        .and_then(|p| p.reader_features.clone())
        .into_iter()
        .flatten()
        .collect();
    let mut writers: BTreeSet<String> = old
        .and_then(|p| p.writer_features.clone())
        .into_iter()
        .flatten()
        .collect();
    readers.insert("timestampNtz".into());
    writers.insert("timestampNtz".into());
    Protocol {
        min_reader_version: 3,
        min_writer_version: 7,
        reader_features: Some(readers.into_iter().collect()),
        writer_features: Some(writers.into_iter().collect()),
    }
}

fn add_of(table_dir: &str, f: &PartFile, field: Option<&str>, now: i64) -> Add {
    let rel = f
        .path
        .strip_prefix(table_dir)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(&f.path);
    let mut partition_values = BTreeMap::new();
    if let Some(field) = field {
        let value = f
            .partition
            .strip_prefix(field)
            .and_then(|v| v.strip_prefix('='))
            .filter(|v| *v != "__HIVE_DEFAULT_PARTITION__")
            .map(str::to_owned);
        partition_values.insert(field.to_owned(), value);
    }
    Add {
        path: delta::encode_path(rel),
        partition_values,
        size: i64::try_from(f.bytes).unwrap_or(i64::MAX),
        modification_time: now,
        data_change: true,
        stats: Some(json!({ "numRecords": f.rows }).to_string()),
        tags: None,
    }
}

/// Publishes the intent's parts to their final names (idempotent), renewing the intent
/// as it goes so that recovery leaves a live commit alone.
async fn publish(
    dest: &Dest,
    table_dir: &str,
    job: &JobId,
    intent: &Intent,
) -> Result<(), DestError> {
    let mut renewed = std::time::Instant::now();
    for f in &intent.parts {
        dest.publish_part(f).await?;
        if renewed.elapsed() > INTENT_RENEW {
            dest.put_json(&intent_path(dest, table_dir, job), intent, false)
                .await?;
            renewed = std::time::Instant::now();
        }
    }
    Ok(())
}

/// Takes published parts back to their staged names (a commit that gave up): glob
/// readers no longer see them, and a resume can publish them again.
async fn unpublish(dest: &Dest, parts: &[PartFile]) -> Result<(), DestError> {
    for f in parts {
        dest.unpublish_part(f).await?;
    }
    Ok(())
}

/// After the job's commit at `version`: its manifest, the table's `_manifest.json`
/// copy, the parts the commit removed deleted, its staging cleared, its intent deleted.
/// Each step may be repeated.
async fn finish(
    dest: &Dest,
    table_dir: &str,
    job: &JobId,
    version: u64,
) -> Result<JobManifest, TableError> {
    let log = DeltaLog::new(dest, table_dir);
    let ipath = intent_path(dest, table_dir, job);
    let intent: Option<Intent> = dest.get_json(&ipath).await?;
    let mut manifest = match &intent {
        Some(i) => i.manifest.clone(),
        None => match dest
            .get_json::<JobManifest>(&dest.job_manifest_path(job))
            .await?
        {
            Some(m) => m,
            // nothing left to finish: the job's manifest went with its intent
            None => {
                return Err(DestError::BadManifest {
                    path: ipath.to_string(),
                    reason: format!("job {job} is in the log at version {version}, but neither its intent nor its manifest is there"),
                }
                .into());
            }
        },
    };
    manifest.table_version = Some(version);
    dest.put_json(&dest.job_manifest_path(job), &manifest, true)
        .await?;
    let actions = log.read_version(version).await?.unwrap_or_default();
    for a in &actions {
        if let Action::Remove(r) = a {
            let rel = format!("{table_dir}/{}", delta::decode_path(&r.path));
            dest.delete_if_exists(&dest.path(&rel)).await?;
        }
    }
    for p in intent.iter().flat_map(|i| i.legacy_parts.iter()) {
        dest.delete_if_exists(&dest.path(p)).await?;
    }
    // the convenience copy: the table's latest job's manifest (never read as the truth)
    if let Some(s) = log.read().await?
        && s.config(KEY_JOB) == Some(job.as_str())
    {
        let copy = JobManifest {
            table_version: Some(s.version),
            ..manifest.clone()
        };
        dest.put_json(&dest.table_manifest_path(table_dir), &copy, false)
            .await?;
    }
    dest.clear_staging(job).await?;
    dest.delete_if_exists(&ipath).await?;
    dest.prune_empty_dirs(&intents_dir(table_dir)).await;
    Ok(manifest)
}

async fn checkpoint(log: &DeltaLog<'_>) {
    let r = async {
        if let Some(s) = log.read().await? {
            log.checkpoint(&s).await?;
        }
        Ok::<_, DestError>(())
    }
    .await;
    if let Err(e) = r {
        warn!(error = %e, "writing a checkpoint of the table's log failed; the next commit tries again");
    }
}

/// Finishes or rolls back every interrupted commit of the table (see the module docs).
/// `own`'s intent is this caller's job's; another job's is rolled back only once it is
/// older than `patience` (a live committer renews it).
pub async fn recover(
    dest: &Dest,
    table_dir: &str,
    own: Option<&JobId>,
    patience: Duration,
) -> Result<(), DestError> {
    let dir = dest.path(&intents_dir(table_dir));
    let metas = dest.list(&dir).await?;
    if metas.is_empty() {
        return Ok(());
    }
    let log = DeltaLog::new(dest, table_dir);
    for meta in metas {
        let Some(intent) = dest.get_json::<Intent>(&meta.location).await? else {
            continue;
        };
        let from = intent.base_version.map_or(0, |v| v + 1);
        if let Some(v) = find_job(&log, &intent.job, from).await? {
            info!(job_id = %intent.job, table = table_dir, version = v, "finishing a commit that was cut short");
            finish(dest, table_dir, &intent.job, v)
                .await
                .map_err(|e| match e {
                    TableError::Dest(d) => d,
                    other => DestError::BadManifest {
                        path: meta.location.to_string(),
                        reason: other.to_string(),
                    },
                })?;
            continue;
        }
        let ours = own == Some(&intent.job);
        let age = chrono::Utc::now()
            .signed_duration_since(meta.last_modified)
            .to_std()
            .unwrap_or_default();
        if ours {
            // the caller commits it again (publishing is idempotent)
            continue;
        }
        if age < patience {
            continue;
        }
        warn!(job_id = %intent.job, table = table_dir, "rolling back a commit that was cut short");
        match abort(&log, &intent).await? {
            Some(v) => {
                // its committer won the race after all
                finish(dest, table_dir, &intent.job, v).await.map_err(|e| {
                    DestError::BadManifest {
                        path: meta.location.to_string(),
                        reason: e.to_string(),
                    }
                })?;
            }
            None => {
                unpublish(dest, &intent.parts).await?;
                dest.delete_if_exists(&meta.location).await?;
            }
        }
    }
    dest.prune_empty_dirs(&intents_dir(table_dir)).await;
    Ok(())
}

/// Writes a marker into the log that the intent's attempt is void, so its committer, if
/// only slow, gives up instead of committing parts that are being taken away.
/// `Some(version)` if the job committed after all.
async fn abort(log: &DeltaLog<'_>, intent: &Intent) -> Result<Option<u64>, DestError> {
    let from = intent.base_version.map_or(0, |b| b + 1);
    loop {
        if let Some(v) = find_job(log, &intent.job, from).await? {
            return Ok(Some(v));
        }
        // an intent is written only once the table has a log (version 0 creates it)
        let v = log.read().await?.map_or(0, |s| s.version + 1);
        let info = new_commit_info(
            "haul: abort an abandoned commit",
            None,
            json!({ "abort": intent.job, "attempt": intent.attempt }),
        );
        if log.try_commit(v, &[Action::CommitInfo(info)]).await? {
            return Ok(None);
        }
    }
}

/// Whether the table (as `now`) holds the job `m` committed: its parts are the table's,
/// or (a job that wrote no part) it was committed into the current export.
pub fn holds(now: &TableNow, m: &JobManifest) -> bool {
    if let Some(l) = &now.legacy {
        return l.job == m.job || l.increments.contains(&m.job);
    }
    if m.files.is_empty() {
        return m
            .table_version
            .zip(now.since_version)
            .is_some_and(|(v, since)| v >= since);
    }
    let paths: BTreeSet<&str> = now.files.iter().map(|f| f.path.as_str()).collect();
    m.files.iter().any(|f| paths.contains(f.path.as_str()))
}

/// The table's current export as one manifest: its latest job's (schema, source,
/// snapshot, window), with the rows, bytes and parts of everything the table holds.
/// `None` when nothing is committed.
pub async fn current(
    dest: &Dest,
    table_dir: &str,
) -> Result<Option<(TableNow, JobManifest)>, DestError> {
    let now = read(dest, table_dir).await?;
    let latest = match (&now.legacy, &now.job) {
        (Some(l), _) => Some(l.clone()),
        (None, Some(j)) => match JobId::parse(j) {
            Ok(id) => {
                dest.get_json::<JobManifest>(&dest.job_manifest_path(&id))
                    .await?
            }
            Err(_) => None,
        },
        (None, None) => None,
    };
    Ok(latest.map(|m| {
        let view = JobManifest {
            rows: now.files.iter().map(|f| f.rows).sum(),
            bytes: now.files.iter().map(|f| f.bytes).sum(),
            files: now.files.clone(),
            ..m
        };
        (now, view)
    }))
}
