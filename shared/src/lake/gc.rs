//! `haul gc`: what a lake holds that no manifest needs, found from the manifests alone,
//! and removed only when asked.
//!
//! Garbage is:
//! - staged parts of a committed job (its commit publishes them and then clears its
//!   staging; a process that stopped in between leaves them);
//! - staged parts of an unfinished job that none of its committed chunks lists (attempts
//!   that never committed), once older than the grace period: a running attempt's parts
//!   are young, and committed chunks' parts are kept for `--resume`;
//! - every staged part of an unfinished job split into page ranges (ctid) under a
//!   snapshot, once nothing of it is younger than the grace period: such a job cannot be
//!   resumed (its pages mean other rows under any other snapshot);
//! - parts in a table's folder of an export replaced by `--overwrite`: a log version
//!   added them and a later one removed them (the replacing commit deletes them; one cut
//!   short leaves them, and glob readers see them);
//! - parts in a table's folder that no version of its log names and no commit under way
//!   is publishing, once older than the grace period.
//!
//! Before it looks (when it deletes), each table's interrupted commits older than the
//! grace period are finished or rolled back ([`super::table::recover`]): that removes
//! the parts an `--overwrite` replaced, and takes back what a commit cut short
//! published. Nothing any log version, intent or committed chunk names is garbage, and
//! each folder is listed before the records that could name what it holds are read, so
//! a part published during the look is never taken for garbage.
//!
//! Records (`_haul/jobs/`), logs and intents are never garbage: they are what
//! `--resume`, `haul ls`, `haul verify` and readers read. Folders no haul job wrote to
//! are not looked at.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use object_store::path::Path;
use serde::Serialize;

use super::delta::{self, Action, DeltaLog};
use super::table::{self, Intent};
use super::{ChunkManifest, Dest, DestError, JobManifest, PlanFile};
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

    // every job's table folder, with the manifests of its committed jobs
    let mut tables: BTreeMap<String, Vec<JobManifest>> = BTreeMap::new();
    let jobs = dest.job_ids().await?;
    for job in &jobs {
        let plan: Option<PlanFile> = dest.get_json(&dest.plan_path(job)).await?;
        if let Some(p) = &plan
            && p.output.parquet
        {
            let done: Option<JobManifest> = dest.get_json(&dest.job_manifest_path(job)).await?;
            tables.entry(p.plan.table_dir()).or_default().extend(done);
        }
    }
    if delete {
        for tdir in tables.keys() {
            table::recover(dest, tdir, None, grace).await?;
        }
    }

    // staging: listed first, then the records that keep what it holds
    let staging = dest.path("_haul/staging");
    let mut staged: BTreeMap<String, Vec<object_store::ObjectMeta>> = BTreeMap::new();
    for m in dest.list(&staging).await? {
        let rel = relative(dest, &m.location);
        let job = rel.split('/').nth(2).unwrap_or_default().to_owned();
        staged.entry(job).or_default().push(m);
    }
    for (job, metas) in staged {
        let id = JobId::parse(&job).ok();
        let done = match &id {
            Some(j) => dest
                .get_json::<JobManifest>(&dest.job_manifest_path(j))
                .await?
                .is_some(),
            None => false,
        };
        // a job of page ranges can never be finished once its snapshot is gone: idle past
        // the grace period, its committed chunks' parts are kept for nothing
        let dead = match &id {
            Some(j) if !done => {
                let plan: Option<PlanFile> = dest.get_json(&dest.plan_path(j)).await?;
                let pages = plan.is_some_and(|p| {
                    p.plan.snapshot.is_some()
                        && p.plan.chunks.iter().any(|c| !c.survives_new_snapshot())
                });
                pages
                    && metas.iter().all(|m| !young(m))
                    && dest
                        .list(&dest.path(&format!("_haul/jobs/{j}/chunks")))
                        .await?
                        .iter()
                        .all(|m| !young(m))
            }
            _ => false,
        };
        let keep: HashSet<Path> = match &id {
            Some(j) if !done && !dead => dest
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
            } else if dead {
                format!(
                    "staged by job {job}, split into page ranges and idle past the grace period: it cannot be finished"
                )
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

    // tables' folders: listed first, then every log version and intent
    for (tdir, committed) in tables {
        let log_dir = format!("{tdir}/{}/", delta::LOG_DIR);
        let listed: Vec<object_store::ObjectMeta> = dest
            .list(&dest.path(&tdir))
            .await?
            .into_iter()
            .filter(|m| {
                let rel = relative(dest, &m.location);
                rel.ends_with(".parquet") && !rel.starts_with(&log_dir)
            })
            .collect();
        let named = named_parts(dest, &tdir, &committed).await?;
        for m in listed {
            let rel = relative(dest, &m.location);
            if named.current.contains(&rel) {
                continue;
            }
            let reason = match named.removed.get(&rel) {
                Some(by) => format!("a part of an export since replaced ({by})"),
                None if young(&m) => {
                    too_young += 1;
                    continue;
                }
                None => "a part no version of the table's log names".to_owned(),
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

/// The parts of a table's folder its records account for (relative to the lake's root).
struct Named {
    /// Parts the table holds now, or a commit under way publishes: never garbage.
    current: HashSet<String>,
    /// Parts a log version (or an older haul's job manifest) added that a later commit
    /// removed (`--overwrite` deletes them once it commits; one cut short leaves them,
    /// and glob readers see them): garbage, whatever their age. With what removed them.
    removed: HashMap<String, String>,
}

/// What the table's records say of the parts in its folder: every version of its log
/// (an added part removed by a later version is a replaced export's), an older haul's
/// manifests, and the commits under way (their intents).
async fn named_parts(dest: &Dest, tdir: &str, jobs: &[JobManifest]) -> Result<Named, DestError> {
    let mut added: HashMap<String, u64> = HashMap::new();
    let mut removed: HashMap<String, String> = HashMap::new();
    let log = DeltaLog::new(dest, tdir);
    let mut v = 0;
    while let Some(actions) = log.read_version(v).await? {
        for a in actions {
            match a {
                Action::Add(add) => {
                    let rel = format!("{tdir}/{}", delta::decode_path(&add.path));
                    removed.remove(&rel);
                    added.insert(rel, v);
                }
                Action::Remove(r) => {
                    let rel = format!("{tdir}/{}", delta::decode_path(&r.path));
                    if added.remove(&rel).is_some() {
                        removed.insert(rel, format!("removed by log version {v}"));
                    }
                }
                _ => {}
            }
        }
        v += 1;
    }
    let mut current: HashSet<String> = added.into_keys().collect();
    let now = table::read(dest, tdir).await?;
    current.extend(now.files.into_iter().map(|f| f.path));
    // an older haul's exports: a committed job's parts the table no longer lists
    for m in jobs {
        for f in &m.files {
            if !current.contains(&f.path) {
                removed
                    .entry(f.path.clone())
                    .or_insert_with(|| format!("job {}", m.job));
            }
        }
    }
    for m in dest
        .list(&dest.path(&format!("_haul/intents/{tdir}")))
        .await?
    {
        if let Some(i) = dest.get_json::<Intent>(&m.location).await? {
            for f in i.parts {
                current.insert(f.path);
            }
        }
    }
    for p in &current {
        removed.remove(p);
    }
    Ok(Named { current, removed })
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
