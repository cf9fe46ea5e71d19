//! The lake: where everything lives in the destination, what the manifests hold, and the
//! commit protocol's object-store side ([`commit`]). Everything that writes or reads the
//! destination's layout goes through this module.
//!
//! ```text
//! <dest>/<table>/dt=YYYY-MM-DD/part-<job>-<chunk>-<n>.parquet   published parts (glob: **/part-*.parquet)
//! <dest>/<table>/_delta_log/<version>.json                      the table's commits: its truth
//! <dest>/<table>/_manifest.json                                 a copy of the latest job's manifest
//! <dest>/_haul/jobs/<job>/plan.json                             the job's plan (resume reads it)
//! <dest>/_haul/jobs/<job>/chunks/<chunk>.json                   chunk manifests: the commit points
//! <dest>/_haul/jobs/<job>/_manifest.json                        the job manifest, once it is in the log
//! <dest>/_haul/staging/<job>/<chunk>/<epoch>-<attempt>/...      one attempt's parts until the job commits
//! <dest>/_haul/intents/<table>/<job>.json                       a table commit under way
//! ```
//!
//! Architecture invariant: a part file stays under `<dest>/<table>/` only if the table's
//! log names it: committed chunks' parts stay staged until every chunk is committed, and
//! a table commit publishes them just before it creates the log version that adds them;
//! a commit that gives up, or is rolled back by recovery, takes them back to staging
//! ([`table`]). Only parts named in a chunk manifest are published.
//!
//! Architecture invariant: an attempt's parts are written under its own staging prefix
//! (job, chunk, epoch and a random attempt id); the chunk manifest is created with
//! create-if-absent, so of two attempts at most one commits, and an attempt deletes its
//! staging files only once the manifest it lost to names another attempt's.
//!
//! Architecture invariant: a table's state is its Delta log, never a listing or a
//! manifest: a job is in the table when a log version commits it ([`delta`], [`table`]).

pub mod catalog;
pub mod commit;
pub mod delta;
#[cfg(feature = "testsuite")]
pub mod faults;
pub mod gc;
pub mod manifest;
pub mod reader;
pub mod table;

use std::sync::Arc;

use crate::error::{Classify, ErrorClass};
use crate::{ChunkId, Epoch, JobId};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

pub use manifest::{ChunkManifest, JobManifest, ManifestColumn, PartFile, PlanFile};

#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("invalid destination {dest:?}: {reason}")]
    Invalid { dest: String, reason: String },
    #[error("destination {dest} is not writable: {reason}")]
    NotWritable { dest: String, reason: String },
    #[error("object store error at {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("unreadable manifest {path}: {reason}")]
    BadManifest { path: String, reason: String },
    #[error("haul cannot commit to the table in {table_dir}: {reason}")]
    UnsupportedTable { table_dir: String, reason: String },
    #[error(
        "no S3 credentials for {dest}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_ENDPOINT and AWS_REGION for a server other than AWS), AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, or run where an instance or pod role provides them (the instance metadata service at {endpoint}: {reason})"
    )]
    NoCredentials {
        dest: String,
        endpoint: String,
        reason: String,
    },
}

impl DestError {
    /// An object that should be there is not (e.g. a staged part deleted under it).
    pub fn is_missing_object(&self) -> bool {
        matches!(
            self,
            DestError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }
}

impl Classify for DestError {
    fn class(&self) -> ErrorClass {
        match self {
            DestError::Invalid { .. }
            | DestError::NotWritable { .. }
            | DestError::NoCredentials { .. }
            | DestError::UnsupportedTable { .. } => ErrorClass::User,
            DestError::Store { source, .. } => match source {
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => ErrorClass::User,
                _ => ErrorClass::Transient,
            },
            DestError::BadManifest { .. } => ErrorClass::Internal,
        }
    }
}

fn store_err(path: &Path) -> impl FnOnce(object_store::Error) -> DestError + '_ {
    move |source| DestError::Store {
        path: path.to_string(),
        source,
    }
}

/// The destination: an object store and the root path inside it.
#[derive(Clone, Debug)]
pub struct Dest {
    pub store: Arc<dyn ObjectStore>,
    pub root: Path,
    /// The URL as the user gave it (for messages).
    pub url: String,
    /// For an object store given no credentials in the environment: the instance
    /// metadata service it will ask for them.
    metadata_endpoint: Option<String>,
    /// A local destination's directory: its empty directories are removed after
    /// cleanups (object stores have no directories).
    local_root: Option<std::path::PathBuf>,
}

/// The environment variables through which object_store takes S3 credentials (or is told
/// it needs none); without any, it asks the instance metadata service.
const S3_CREDENTIAL_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_SKIP_SIGNATURE",
];

impl Dest {
    /// Opens `file://path`, a bare path (relative paths are taken from the current
    /// directory), or `s3://bucket/prefix` (with the usual `AWS_*` environment variables).
    /// With `fsync`, local writes (files and their directories) are synced to disk;
    /// object stores are durable once an upload completes.
    pub fn open(url: &str, fsync: bool) -> Result<Self, DestError> {
        let invalid = |reason: String| DestError::Invalid {
            dest: url.to_owned(),
            reason,
        };
        if let Some(p) = local_path(url) {
            if p.is_empty() {
                return Err(invalid("empty path".into()));
            }
            let abs = absolute_path(std::path::Path::new(p)).map_err(|e| invalid(e.to_string()))?;
            std::fs::create_dir_all(&abs).map_err(|e| DestError::NotWritable {
                dest: abs.display().to_string(),
                reason: e.to_string(),
            })?;
            let store = LocalFileSystem::new_with_prefix(&abs)
                .map_err(|e| invalid(e.to_string()))?
                .with_fsync(fsync);
            return Ok(Dest {
                store: with_faults(Arc::new(store)),
                root: Path::default(),
                url: format!("file://{}", abs.display()),
                metadata_endpoint: None,
                local_root: Some(abs),
            });
        }
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        match parsed.scheme() {
            "s3" | "s3a" => {
                // credentials, region, endpoint (AWS_ENDPOINT), AWS_ALLOW_HTTP, ... from the
                // environment; create-if-absent is S3's `If-None-Match: *`
                let store = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                let root = Path::parse(parsed.path().trim_start_matches('/'))
                    .map_err(|e| invalid(e.to_string()))?;
                Ok(Dest {
                    store: with_faults(Arc::new(store)),
                    root,
                    url: url.trim_end_matches('/').to_owned(),
                    metadata_endpoint: (!S3_CREDENTIAL_VARS
                        .iter()
                        .any(|v| std::env::var_os(v).is_some()))
                    .then(|| {
                        std::env::var("AWS_METADATA_ENDPOINT")
                            .unwrap_or_else(|_| "http://169.254.169.254".into())
                            .trim_end_matches('/')
                            .to_owned()
                    }),
                    local_root: None,
                })
            }
            other => Err(invalid(format!(
                "unsupported scheme {other:?}: use a path, file:// or s3://"
            ))),
        }
    }

    /// `root/rel`, with each `/`-separated segment of `rel` as one path part.
    pub fn path(&self, rel: &str) -> Path {
        rel.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, seg| p.clone().join(seg))
    }

    /// Proves the destination is writable before any data moves.
    pub async fn check_writable(&self) -> Result<(), DestError> {
        let no_credentials = |endpoint: &str, reason: String| DestError::NoCredentials {
            dest: self.url.clone(),
            endpoint: endpoint.to_owned(),
            reason,
        };
        if let Some(metadata) = &self.metadata_endpoint {
            // where no metadata service listens, object_store would retry it for long
            let addr = url::Url::parse(metadata)
                .ok()
                .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)));
            if let Some(addr) = addr {
                let connect = tokio::net::TcpStream::connect(addr);
                match tokio::time::timeout(std::time::Duration::from_secs(2), connect).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(no_credentials(metadata, e.to_string())),
                    Err(_) => return Err(no_credentials(metadata, "no answer within 2 s".into())),
                }
            }
        }
        let probe = self.path(&format!("_haul/probe-{}", probe_suffix()));
        self.store
            .put(&probe, PutPayload::from_static(b"ok"))
            .await
            .map_err(|e| {
                let reason = e.to_string();
                if let Some(metadata) = self
                    .metadata_endpoint
                    .as_deref()
                    .filter(|m| reason.contains(m))
                {
                    no_credentials(
                        metadata,
                        reason.rsplit(" - ").next().unwrap_or(&reason).to_owned(),
                    )
                } else {
                    DestError::NotWritable {
                        dest: self.url.clone(),
                        reason,
                    }
                }
            })?;
        let _ = self.store.delete(&probe).await;
        // a destination haul never wrote to keeps no `_haul/` of the probe's (removing a
        // directory fails, as it should, while it holds anything)
        if let Some(root) = &self.local_root {
            let _ = tokio::fs::remove_dir(root.join("_haul")).await;
        }
        Ok(())
    }

    /// Removes the empty directories at and under `rel` of a local destination, deepest
    /// first (deleting files leaves their directories behind); a no-op elsewhere.
    async fn prune_empty_dirs(&self, rel: &str) {
        let Some(root) = self.local_root.clone() else {
            return;
        };
        fn prune(dir: &std::path::Path) {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        prune(&e.path());
                    }
                }
            }
            // fails, as it should, while the directory holds anything
            let _ = std::fs::remove_dir(dir);
        }
        let dir = root.join(rel);
        let _ = tokio::task::spawn_blocking(move || {
            prune(&dir);
            // and its parents up to the root, where they are left empty
            for parent in dir.ancestors().skip(1) {
                if !parent.starts_with(&root)
                    || parent == root
                    || std::fs::remove_dir(parent).is_err()
                {
                    break;
                }
            }
        })
        .await;
    }

    /// A destination over a store opened elsewhere (credentials as that store has them).
    pub fn from_store(store: Arc<dyn ObjectStore>, root: Path, url: String) -> Self {
        Dest {
            store,
            root,
            url,
            metadata_endpoint: None,
            local_root: None,
        }
    }

    /// Where one attempt stages its parts before it commits: its own folder, even if
    /// a lease store that lost its data hands the same epoch out twice.
    pub fn staging_prefix(&self, job: &JobId, chunk: ChunkId, epoch: Epoch) -> String {
        let attempt = &uuid::Uuid::new_v4().simple().to_string()[..12];
        format!("{}/{chunk}/{epoch}-{attempt}", staging_root(job))
    }
    /// Removes every attempt's staged parts of a job.
    pub async fn clear_staging(&self, job: &JobId) -> Result<(), DestError> {
        self.delete_prefix(&staging_root(job)).await?;
        self.prune_empty_dirs(&staging_root(job)).await;
        Ok(())
    }
    pub fn chunk_manifest_path(&self, job: &JobId, chunk: ChunkId) -> Path {
        self.path(&format!("_haul/jobs/{job}/chunks/{chunk}.json"))
    }
    pub fn plan_path(&self, job: &JobId) -> Path {
        self.path(&format!("_haul/jobs/{job}/plan.json"))
    }
    pub fn job_manifest_path(&self, job: &JobId) -> Path {
        self.path(&format!("_haul/jobs/{job}/_manifest.json"))
    }
    pub fn table_manifest_path(&self, table_dir: &str) -> Path {
        self.path(&format!("{table_dir}/_manifest.json"))
    }

    /// Reads a JSON object, `None` if absent.
    pub async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &Path,
    ) -> Result<Option<T>, DestError> {
        let bytes = match self.store.get(path).await {
            Ok(r) => r.bytes().await.map_err(store_err(path))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err(path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DestError::BadManifest {
                path: path.to_string(),
                reason: e.to_string(),
            })
    }

    /// Writes a JSON object; with `create_only`, fails with `Ok(false)` if it exists.
    pub async fn put_json<T: Serialize>(
        &self,
        path: &Path,
        value: &T,
        create_only: bool,
    ) -> Result<bool, DestError> {
        let body = Bytes::from(serde_json::to_vec_pretty(value).expect("manifests serialize"));
        let mode = if create_only {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        match self
            .store
            .put_opts(path, body.into(), PutOptions::from(mode))
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) if create_only => Ok(false),
            Err(e) => Err(store_err(path)(e)),
        }
    }

    /// Every object under `prefix`.
    pub(crate) async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>, DestError> {
        self.store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(store_err(prefix))
    }

    /// Deletes an object; one that is already gone is fine.
    pub async fn delete_if_exists(&self, path: &Path) -> Result<(), DestError> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(path)(e)),
        }
    }

    /// Every job whose records (`_haul/jobs/<job>/`) are in this destination.
    pub async fn job_ids(&self) -> Result<Vec<JobId>, DestError> {
        let jobs_dir = self.path("_haul/jobs");
        let listed = self
            .store
            .list_with_delimiter(Some(&jobs_dir))
            .await
            .map_err(store_err(&jobs_dir))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|n| JobId::parse(n).ok()))
            .collect())
    }

    /// All committed chunk manifests of a job.
    pub async fn chunk_manifests(&self, job: &JobId) -> Result<Vec<ChunkManifest>, DestError> {
        let metas = self
            .list(&self.path(&format!("_haul/jobs/{job}/chunks")))
            .await?;
        let mut out = Vec::with_capacity(metas.len());
        for m in metas {
            if m.location.extension() != Some("json") {
                continue;
            }
            if let Some(cm) = self.get_json::<ChunkManifest>(&m.location).await? {
                out.push(cm);
            }
        }
        out.sort_by_key(|m| m.chunk);
        Ok(out)
    }

    /// Whether a part is at its final name already (published by an earlier try of
    /// the job's commit).
    async fn is_published(&self, f: &PartFile) -> Result<bool, DestError> {
        let dst = self.path(&f.path);
        match self.store.head(&dst).await {
            Ok(meta) => Ok(meta.size == f.bytes),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_err(&dst)(e)),
        }
    }

    /// Checks that every part a chunk manifest lists is still there, staged or
    /// published: a resume trusts a committed chunk only then. A missing part is an
    /// error for which [`DestError::is_missing_object`] holds.
    pub async fn check_parts(&self, manifest: &ChunkManifest) -> Result<(), DestError> {
        for f in &manifest.files {
            if self.is_published(f).await? {
                continue;
            }
            let src = self.path(&f.staged);
            self.store.head(&src).await.map_err(store_err(&src))?;
        }
        Ok(())
    }

    /// Publishes a committed part to its final name: a rename on a local disk, a
    /// server-side copy on object stores (never a re-upload). Idempotent: a part already
    /// in place is left alone.
    pub async fn publish_part(&self, f: &PartFile) -> Result<(), DestError> {
        if self.is_published(f).await? {
            return Ok(());
        }
        let src = self.path(&f.staged);
        self.store
            .rename(&src, &self.path(&f.path))
            .await
            .map_err(store_err(&src))
    }

    /// Takes a published part back to its staged name (a table commit that gave up).
    /// Idempotent: a part not published is left alone.
    pub async fn unpublish_part(&self, f: &PartFile) -> Result<(), DestError> {
        let dst = self.path(&f.path);
        match self.store.rename(&dst, &self.path(&f.staged)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(&dst)(e)),
        }
    }

    /// Publishes every part of a chunk (see [`Dest::publish_part`]).
    pub async fn publish(&self, manifest: &ChunkManifest) -> Result<(), DestError> {
        for f in &manifest.files {
            self.publish_part(f).await?;
        }
        Ok(())
    }

    /// Deletes the staged parts of a job's attempts that did not commit, keeping those
    /// that committed chunks list (they are published when the job commits, or finish it
    /// on resume). Only safe once no attempt of the job can still be running.
    pub async fn clear_uncommitted_staging(&self, job: &JobId) -> Result<(), DestError> {
        let keep: std::collections::HashSet<Path> = self
            .chunk_manifests(job)
            .await?
            .iter()
            .flat_map(|m| m.files.iter().map(|f| self.path(&f.staged)))
            .collect();
        for m in self.list(&self.path(&staging_root(job))).await? {
            if !keep.contains(&m.location) {
                self.delete_if_exists(&m.location).await?;
            }
        }
        self.prune_empty_dirs(&staging_root(job)).await;
        Ok(())
    }

    /// Deletes everything under `rel` (a staging prefix); missing objects are fine.
    pub async fn delete_prefix(&self, rel: &str) -> Result<(), DestError> {
        for m in self.list(&self.path(rel)).await? {
            self.delete_if_exists(&m.location).await?;
        }
        Ok(())
    }
}

/// The path of a local destination (`file://<path>`, or a bare path), `None` for any other
/// URL.
pub fn local_path(url: &str) -> Option<&str> {
    url.strip_prefix("file://")
        .or_else(|| (!url.contains("://")).then_some(url))
}

/// `p` made absolute against the working directory, with its `.` segments dropped.
pub fn absolute_path(p: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(abs.components().collect())
}

/// A name unlikely to clash with another process's probe.
fn probe_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{n:x}-{}", std::process::id())
}

/// Every attempt of a job stages under this prefix, outside every table's folder.
fn staging_root(job: &JobId) -> String {
    format!("_haul/staging/{job}")
}

/// The table's folder under the destination: a table of `public` by its name, any other
/// by `<schema>.<name>` (so one name in two schemas has two folders), with every
/// character other than ASCII letters, digits, `_` and `-` replaced by `_` in each (object
/// stores and glob readers treat the others specially; the only `.` is the schema's),
/// and never starting with `_` or `.`, which Spark and Hive readers skip as hidden. Two
/// tables whose names differ only in replaced characters share a folder: the table's log
/// records which one it holds and refuses the other.
pub fn table_dir(schema: &str, name: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let s = if schema == "public" || schema.is_empty() {
        clean(name)
    } else {
        format!("{}.{}", clean(schema), clean(name))
    };
    if s.is_empty() || s.starts_with(['_', '.']) {
        format!("t{s}")
    } else {
        s
    }
}

/// An object store wrapped in the test suite's fault injection when `HAUL_FAULT_STORE`
/// asks for it (feature `testsuite`); the store itself otherwise.
fn with_faults(store: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
    #[cfg(feature = "testsuite")]
    {
        faults::wrap_from_env(store)
    }
    #[cfg(not(feature = "testsuite"))]
    {
        store
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_dirs_are_reader_safe() {
        assert_eq!(super::table_dir("public", "orders"), "orders");
        assert_eq!(super::table_dir("public", r#"My "Orders""#), "My__Orders_");
        assert_eq!(super::table_dir("public", "_tmp"), "t_tmp");
        assert_eq!(super::table_dir("public", "a/b"), "a_b");
    }

    #[test]
    fn one_name_in_two_schemas_has_two_folders() {
        // regression: sales.orders and archive.orders shared the folder `orders`
        assert_eq!(super::table_dir("sales", "orders"), "sales.orders");
        assert_eq!(super::table_dir("archive", "orders"), "archive.orders");
        // a dot in a name cannot pose as a schema's
        assert_eq!(super::table_dir("public", "sales.orders"), "sales_orders");
        assert_eq!(super::table_dir("a.b", "c"), "a_b.c");
    }
}
