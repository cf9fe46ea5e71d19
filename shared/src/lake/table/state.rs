//! What a lake table holds now: its owner, its latest job and window, its parts — from
//! its Delta log, or from an older haul's `_manifest.json` (which the next commit takes
//! over).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::TableError;
use crate::JobId;
use crate::jobs::TableBase;
use crate::lake::delta::{self, DeltaLog, TableState};
use crate::lake::{Dest, DestError, JobManifest, PartFile};

// haul's records in the table's `metaData.configuration`: the source table it holds, its
// latest job, where the current export began, and a series' window
pub(super) const KEY_DATABASE: &str = "haul.source.database";
pub(super) const KEY_SCHEMA: &str = "haul.source.schema";
pub(super) const KEY_TABLE: &str = "haul.source.table";
pub(super) const KEY_JOB: &str = "haul.job";
pub(super) const KEY_SINCE: &str = "haul.export.since_version";
pub(super) const KEY_WM_COLUMN: &str = "haul.watermark.column";
pub(super) const KEY_WM_TYPE: &str = "haul.watermark.pg_type";
pub(super) const KEY_WM_LOW: &str = "haul.watermark.low";
pub(super) const KEY_WM_HIGH: &str = "haul.watermark.high";

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
    pub(super) fn of_state(s: &TableState) -> Option<Self> {
        Some(TableIdentity {
            database: s.config(KEY_DATABASE)?.to_owned(),
            schema: s.config(KEY_SCHEMA)?.to_owned(),
            table: s.config(KEY_TABLE)?.to_owned(),
        })
    }

    /// Refuses a table that holds another source table.
    pub(super) fn check(
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

pub(super) fn now_of(s: &TableState, table_dir: &str) -> TableNow {
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

/// An older haul's `_manifest.json` of a table whose log holds no haul job yet: the
/// export it records is taken over by the next commit. (The copy haul writes after each
/// commit names its log version.)
pub(super) async fn legacy_manifest(
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
