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

mod actions;
mod state;

pub use state::{TableIdentity, TableNow, current, holds, read};

use std::time::Duration;

use arrow_schema::Schema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use self::actions::{actions, create_actions, new_commit_info};
use self::state::{KEY_JOB, KEY_WM_HIGH, legacy_manifest};
use super::delta::{self, Action, DeltaLog, TableState};
use super::{Dest, DestError, JobManifest, PartFile};
use crate::JobId;
use crate::error::{Classify, ErrorClass};
use crate::jobs::{TableBase, Window};

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

/// Publishes the intent's parts to their final names (idempotent), renewing the intent
/// as it goes so that recovery leaves a live commit alone.
async fn publish(
    dest: &Dest,
    table_dir: &str,
    job: &JobId,
    intent: &Intent,
) -> Result<(), DestError> {
    let mut renewed = std::time::Instant::now();
    // (a rename each on a disk, a server-side copy each on object stores: many at once)
    for batch in intent.parts.chunks(PUBLISH_CONCURRENCY) {
        let each: Vec<_> = batch.iter().map(|f| dest.publish_part(f)).collect();
        futures::future::try_join_all(each).await?;
        if renewed.elapsed() > INTENT_RENEW {
            dest.put_json(&intent_path(dest, table_dir, job), intent, false)
                .await?;
            renewed = std::time::Instant::now();
        }
    }
    Ok(())
}

/// Parts published (or taken back) at once.
const PUBLISH_CONCURRENCY: usize = 16;

/// Takes published parts back to their staged names (a commit that gave up): glob
/// readers no longer see them, and a resume can publish them again.
async fn unpublish(dest: &Dest, parts: &[PartFile]) -> Result<(), DestError> {
    for batch in parts.chunks(PUBLISH_CONCURRENCY) {
        let each: Vec<_> = batch.iter().map(|f| dest.unpublish_part(f)).collect();
        futures::future::try_join_all(each).await?;
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
    if let (true, latest) = still_latest(&log, job, version).await? {
        let copy = JobManifest {
            table_version: Some(latest),
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

/// Whether `job`, committed at `version` (whose `metaData` names it), is still the
/// table's latest job, and the latest version: only the versions after it are read
/// (usually none), not the log from its checkpoint.
async fn still_latest(
    log: &DeltaLog<'_>,
    job: &JobId,
    version: u64,
) -> Result<(bool, u64), DestError> {
    let (mut latest, mut ours) = (version, true);
    while let Some(actions) = log.read_version(latest + 1).await? {
        latest += 1;
        for a in &actions {
            if let Action::Metadata(m) = a {
                ours =
                    m.configuration.get(KEY_JOB).and_then(|v| v.as_deref()) == Some(job.as_str());
            }
        }
    }
    Ok((ours, latest))
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
