//! `haul gc`: what a lake holds that no manifest needs, found from the manifests alone,
//! and removed only when asked.
//!
//! Garbage is:
//! - staged parts of a committed job (its commit publishes them and then clears its
//!   staging; a process that stopped in between leaves them);
//! - staged parts of an unfinished job that none of its committed chunks lists (attempts
//!   that never committed), once older than the grace period: a running attempt's parts
//!   are young, and committed chunks' parts are kept for `--resume`;
//! - parts in a table's folder of an export replaced by `--overwrite` (the new export's
//!   commit removes them; one cut short leaves them, and glob readers see them);
//! - parts in a table's folder that no job's manifest lists, once older than the grace
//!   period (a job's commit publishes its parts just before it writes its manifest).
//!
//! Records (`_haul/jobs/`) are never garbage: they are what `--resume`, `haul ls` and
//! `haul verify` read. Folders no haul job wrote to are not looked at.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use object_store::path::Path;
use serde::Serialize;

use super::{ChunkManifest, Dest, DestError, JobManifest, PlanFile, table_dir};
use crate::JobId;

/// One object that no manifest needs.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Garbage {
    /// Relative to the lake's root.
    pub path: String,
    pub bytes: u64,
    /// Why it is garbage.
    pub reason: String,
}

/// Objects no manifest needs, and whether they were removed.
#[derive(Clone, Debug, Serialize)]
pub struct GcReport {
    pub removed: bool,
    pub objects: Vec<Garbage>,
    pub bytes: u64,
    /// Objects that would be garbage but are younger than the grace period.
    pub too_young: usize,
}

/// Finds the lake's garbage (see the module docs); with `delete`, removes it (and the
/// folders it leaves empty). Objects modified within `grace` are never garbage unless a
/// committed manifest proves them so.
pub async fn collect(dest: &Dest, grace: Duration, delete: bool) -> Result<GcReport, DestError> {
    let now = chrono::Utc::now();
    let young = |m: &object_store::ObjectMeta| {
        now.signed_duration_since(m.last_modified)
            .to_std()
            .unwrap_or_default()
            < grace
    };
    let mut objects = Vec::new();
    let mut too_young = 0;

    // every job's records: its table's folder, and its manifest if committed
    let mut committed: HashMap<JobId, Option<JobManifest>> = HashMap::new();
    let mut by_table: BTreeMap<String, Vec<JobManifest>> = BTreeMap::new();
    for job in dest.job_ids().await? {
        let plan: Option<PlanFile> = dest.get_json(&dest.plan_path(&job)).await?;
        let manifest: Option<JobManifest> = dest.get_json(&dest.job_manifest_path(&job)).await?;
        if let Some(p) = &plan
            && p.output.parquet
        {
            let list = by_table.entry(table_dir(&p.plan.table.name)).or_default();
            list.extend(manifest.clone());
        }
        committed.insert(job, manifest);
    }

    // staging
    let staging = dest.path("_haul/staging");
    let mut staged: BTreeMap<String, Vec<object_store::ObjectMeta>> = BTreeMap::new();
    for m in dest.list(&staging).await? {
        let rel = relative(dest, &m.location);
        let job = rel.split('/').nth(2).unwrap_or_default().to_owned();
        staged.entry(job).or_default().push(m);
    }
    for (job, metas) in staged {
        let id = JobId::parse(&job).ok();
        let done = id
            .as_ref()
            .and_then(|j| committed.get(j))
            .is_some_and(Option::is_some);
        let keep: HashSet<Path> = match &id {
            Some(j) if !done => dest
                .chunk_manifests(j)
                .await?
                .iter()
                .flat_map(|c: &ChunkManifest| c.files.iter().map(|f| dest.path(&f.staged)))
                .collect(),
            _ => HashSet::new(),
        };
        for m in metas {
            if keep.contains(&m.location) {
                continue;
            }
            let reason = if done {
                format!("staged by job {job}, which has committed")
            } else if young(&m) {
                too_young += 1;
                continue;
            } else {
                format!("staged by an attempt of job {job} that did not commit")
            };
            objects.push(Garbage {
                path: relative(dest, &m.location),
                bytes: m.size,
                reason,
            });
        }
    }

    // tables' folders
    for (tdir, mut jobs) in by_table {
        let current: Option<JobManifest> = dest.get_json(&dest.table_manifest_path(&tdir)).await?;
        // parts a reader may be shown: the current export's, and a job's that committed
        // after it (its table manifest not written yet); replaced exports' are garbage
        let mut wanted: HashSet<String> = HashSet::new();
        let mut replaced: HashMap<String, JobId> = HashMap::new();
        jobs.sort_by(|a, b| a.finished_at.cmp(&b.finished_at));
        for j in &jobs {
            let listed_now = current
                .as_ref()
                .is_some_and(|c| c.job == j.job || c.increments.contains(&j.job));
            let newer = current
                .as_ref()
                .is_none_or(|c| j.finished_at > c.finished_at);
            for f in &j.files {
                if listed_now || newer {
                    wanted.insert(f.path.clone());
                } else {
                    replaced.insert(f.path.clone(), j.job.clone());
                }
            }
        }
        if let Some(c) = &current {
            wanted.extend(c.files.iter().map(|f| f.path.clone()));
        }
        for m in dest.list(&dest.path(&tdir)).await? {
            let rel = relative(dest, &m.location);
            if !rel.ends_with(".parquet") || wanted.contains(&rel) {
                continue;
            }
            let reason = match replaced.get(&rel) {
                Some(job) => format!("a part of job {job}, an export since replaced"),
                None if young(&m) => {
                    too_young += 1;
                    continue;
                }
                None => "a part no job's manifest lists".to_owned(),
            };
            objects.push(Garbage {
                path: rel,
                bytes: m.size,
                reason,
            });
        }
    }

    if delete {
        for g in &objects {
            dest.delete_if_exists(&dest.path(&g.path)).await?;
        }
        let mut folders: HashSet<String> = HashSet::from(["_haul/staging".to_owned()]);
        folders.extend(
            objects
                .iter()
                .filter_map(|g| g.path.split('/').next().map(String::from)),
        );
        for f in folders {
            dest.prune_empty_dirs(&f).await;
        }
    }
    Ok(GcReport {
        removed: delete,
        bytes: objects.iter().map(|g| g.bytes).sum(),
        objects,
        too_young,
    })
}

/// An object's path relative to the lake's root.
fn relative(dest: &Dest, p: &Path) -> String {
    let root = dest.root.as_ref();
    let s = p.as_ref();
    s.strip_prefix(root)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(s)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::*;

    #[test]
    fn paths_are_relative_to_the_root() {
        let d = Dest::from_store(
            Arc::new(InMemory::new()),
            Path::from("lake/x"),
            "mem://".into(),
        );
        assert_eq!(
            relative(&d, &Path::from("lake/x/orders/a.parquet")),
            "orders/a.parquet"
        );
        let d = Dest::from_store(Arc::new(InMemory::new()), Path::from(""), "mem://".into());
        assert_eq!(
            relative(&d, &Path::from("orders/a.parquet")),
            "orders/a.parquet"
        );
    }
}
