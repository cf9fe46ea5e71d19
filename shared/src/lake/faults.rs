//! Test-only (feature `testsuite`): an object store that fails, or stops the process, at
//! the n-th call of one kind made while a table commit runs, so that a test can walk
//! every step of the commit protocol.
//!
//! `HAUL_FAULT_STORE=<kind>:<n>:<mode>` with kind `put`, `put_if_absent`, `copy`,
//! `rename`, `delete`, `list` or `get`, and mode `error` (the call fails, as a transient
//! error), `crash` (the process exits with status 86 before the call) or `crash_after`
//! (the call is made, then the process exits: an answer lost), or `pause` (the call waits
//! `HAUL_FAULT_PAUSE_MS`, 3000 by default, first). `HAUL_FAULT_STORE=count`
//! prints the calls of each kind a commit made (`haul-fault-counts {...}` on stderr).
//! Calls are counted only while a commit holds an [`Armed`] guard.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result,
};

/// The exit status of a process stopped by a fault.
pub const CRASH_STATUS: i32 = 86;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Error,
    Crash,
    CrashAfter,
    Pause,
}

#[derive(Debug)]
struct Plan {
    kind: String,
    n: u32,
    mode: Mode,
}

static ARMED: AtomicBool = AtomicBool::new(false);
static COUNTS: Mutex<BTreeMap<&'static str, u32>> = Mutex::new(BTreeMap::new());

fn plan() -> &'static Option<Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let v = std::env::var("HAUL_FAULT_STORE").ok()?;
        let mut it = v.split(':');
        let kind = it.next()?.to_owned();
        let n = it.next()?.parse().ok()?;
        let mode = match it.next()? {
            "error" => Mode::Error,
            "crash" => Mode::Crash,
            "crash_after" => Mode::CrashAfter,
            "pause" => Mode::Pause,
            _ => return None,
        };
        Some(Plan { kind, n, mode })
    })
}

/// Counts calls while alive; in `count` mode, prints them when dropped.
pub struct Armed(());

/// Arms the faults for the duration of a table commit.
pub fn arm() -> Armed {
    ARMED.store(true, Ordering::SeqCst);
    Armed(())
}

impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.store(false, Ordering::SeqCst);
        if std::env::var("HAUL_FAULT_STORE").as_deref() == Ok("count") {
            let counts = COUNTS.lock().map(|c| c.clone()).unwrap_or_default();
            eprintln!(
                "haul-fault-counts {}",
                serde_json::to_string(&counts).unwrap_or_default()
            );
        }
    }
}

/// `store` wrapped when `HAUL_FAULT_STORE` is set.
pub fn wrap_from_env(store: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
    if std::env::var_os("HAUL_FAULT_STORE").is_none() {
        return store;
    }
    Arc::new(FaultyStore { inner: store })
}

/// What the n-th call of `kind` is to do.
fn hit(kind: &'static str) -> Option<Mode> {
    if !ARMED.load(Ordering::SeqCst) {
        return None;
    }
    let n = {
        let mut counts = COUNTS.lock().ok()?;
        let c = counts.entry(kind).or_default();
        *c += 1;
        *c
    };
    match plan() {
        Some(p) if p.kind == kind && p.n == n => {
            eprintln!("haul-fault: {:?} at {kind} #{n}", p.mode);
            Some(p.mode)
        }
        _ => None,
    }
}

fn injected() -> object_store::Error {
    object_store::Error::Generic {
        store: "faults",
        source: "injected failure".into(),
    }
}

fn crash() -> ! {
    std::process::exit(CRASH_STATUS)
}

async fn call<T>(kind: &'static str, f: impl Future<Output = Result<T>>) -> Result<T> {
    match hit(kind) {
        None => f.await,
        Some(Mode::Error) => Err(injected()),
        Some(Mode::Crash) => crash(),
        Some(Mode::CrashAfter) => {
            let _ = f.await;
            crash()
        }
        Some(Mode::Pause) => {
            let ms = std::env::var("HAUL_FAULT_PAUSE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3000);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            f.await
        }
    }
}

#[derive(Debug)]
struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let kind = if matches!(opts.mode, PutMode::Create) {
            "put_if_absent"
        } else {
            "put"
        };
        call(kind, self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        call("put", self.inner.put_multipart_opts(location, opts)).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        call("get", self.inner.get_opts(location, options)).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        call("get", self.inner.get_ranges(location, ranges)).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let inner = Arc::clone(&self.inner);
        locations
            .then(move |loc| {
                let inner = Arc::clone(&inner);
                async move {
                    let loc = loc?;
                    call("delete", inner.delete(&loc)).await?;
                    Ok(loc)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match hit("list") {
            None => self.inner.list(prefix),
            Some(Mode::Error) => futures::stream::once(async { Err(injected()) }).boxed(),
            Some(Mode::Pause) => self.inner.list(prefix),
            Some(_) => crash(),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        match hit("list") {
            None | Some(Mode::Pause) => self.inner.list_with_offset(prefix, offset),
            Some(Mode::Error) => futures::stream::once(async { Err(injected()) }).boxed(),
            Some(_) => crash(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        call("list", self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        call("copy", self.inner.copy_opts(from, to, options)).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        call("rename", self.inner.rename_opts(from, to, options)).await
    }
}
