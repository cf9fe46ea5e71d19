//! Progress of a running job, the same display in both modes: `haul run` feeds it from its
//! workers' counters and its job store, `submit --wait` / `watch` from the coordinator's
//! status stream. A bar on a terminal (rows, MiB/s, rows/s, chunks done/running/waiting/
//! failed, ETA), with log lines printed above it ([`LogWriter`]); plain log lines every
//! 5 s otherwise.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// A bar (log lines are printed above it).
    Bar,
    /// A log line every 5 seconds.
    Log,
    /// Nothing until the summary.
    None,
}

/// Where a job stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Rows read so far (committed chunks' and running ones').
    pub rows: u64,
    /// Bytes read from the source so far.
    pub bytes: u64,
    pub estimated_rows: u64,
    pub chunks_total: usize,
    pub chunks_done: usize,
    pub chunks_running: usize,
    /// Chunks waiting out a backoff before their next try.
    pub chunks_waiting: usize,
    /// Of the waiting chunk tried again first: what its last attempt failed with, and
    /// when it is tried again (Unix milliseconds).
    pub waiting: Option<(String, i64)>,
    pub chunks_failed: usize,
    pub paused: bool,
    /// Why nothing is working on the job (no worker alive, ...), when the coordinator
    /// says so.
    pub stalled: Option<String>,
}

/// The chunks' part of a progress line: `chunks 3/8 (2 running, 3 waiting to retry:
/// <why>; next try in 12 s)`.
pub fn chunks_line(s: &Snapshot) -> String {
    let mut chunks = format!(
        "chunks {}/{} ({} running",
        s.chunks_done, s.chunks_total, s.chunks_running
    );
    if s.chunks_waiting > 0 {
        chunks += &format!(", {} waiting to retry", s.chunks_waiting);
        if let Some((reason, at)) = &s.waiting {
            chunks += &format!(": {}; next try {}", first_line(reason), in_secs(*at));
        }
    }
    if s.chunks_failed > 0 {
        chunks += &format!(", {} failed", s.chunks_failed);
    }
    chunks.push(')');
    if let Some(why) = &s.stalled {
        chunks += &format!("  not moving: {}", first_line(why));
    }
    chunks
}

/// `1h 02m`, `3m 20s`, `12s`.
fn human_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The first line of a reason, cut to fit a progress line.
pub fn first_line(reason: &str) -> String {
    let line = reason.lines().next().unwrap_or_default();
    match line.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_owned(),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `in 12 s` (or `now`) for a Unix-milliseconds time.
pub fn in_secs(at_ms: i64) -> String {
    match (at_ms - now_ms()).max(0) / 1000 {
        0 => "now".into(),
        s => format!("in {s} s"),
    }
}

/// The bar being drawn, if any: [`LogWriter`] prints log lines above it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// The log's writer: stderr, with a progress bar, if one is drawn, lifted out of the way
/// of each line and drawn again below it (instead of stale bars piling up between lines).
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().map(|b| b.clone()).unwrap_or(None);
        match bar {
            Some(b) => b.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

pub struct Reporter {
    bar: Option<ProgressBar>,
    log_every: Option<Duration>,
    last_log: Instant,
    started: Instant,
    job: String,
    /// What was done before this process followed the job (a resume's committed chunks,
    /// a job watched midway): not counted in the rates.
    base: Option<(u64, u64)>,
    /// Whether the bar has been drawn (from the first update on).
    drawn: bool,
}

impl Reporter {
    pub fn new(mode: ProgressMode, job: &str) -> Self {
        let tty = std::io::stderr().is_terminal();
        let (bar, log_every) = match mode {
            ProgressMode::Bar => (true, None),
            ProgressMode::Auto if tty => (true, None),
            ProgressMode::Auto | ProgressMode::Log => (false, Some(Duration::from_secs(5))),
            ProgressMode::None => (false, None),
        };
        let bar = bar.then(|| {
            let b = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{bar:25}] {human_pos}/~{human_len} rows  {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            // drawn from the first update on, not before: `0/~1 rows` said nothing
            if let Ok(mut g) = BAR.lock() {
                *g = Some(b.clone());
            }
            b
        });
        Self {
            bar,
            log_every,
            // the first line after `log_every`: a job done sooner shows only its summary
            last_log: Instant::now(),
            started: Instant::now(),
            job: job.to_owned(),
            base: None,
            drawn: false,
        }
    }

    /// Work done before this process followed the job (a resume's committed rows): shown,
    /// not counted in the rates. Without it, the first snapshot is the base.
    pub fn set_base(&mut self, rows: u64, bytes: u64) {
        self.base = Some((rows, bytes));
    }

    pub fn update(&mut self, s: &Snapshot) {
        let (base_rows, base_bytes) = *self.base.get_or_insert((s.rows, s.bytes));
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rows_per_s = s.rows.saturating_sub(base_rows) as f64 / secs;
        let mib_per_s = s.bytes.saturating_sub(base_bytes) as f64 / secs / (1024.0 * 1024.0);
        let chunks = chunks_line(s);
        let paused = if s.paused { "  (paused)" } else { "" };
        // no ETA without a rate (nothing read yet, paused, or nothing working on it)
        let eta = (rows_per_s >= 1.0 && !s.paused && s.stalled.is_none())
            .then(|| (s.estimated_rows.saturating_sub(s.rows) as f64 / rows_per_s) as u64);
        if let Some(b) = &self.bar {
            if !self.drawn {
                self.drawn = true;
                b.enable_steady_tick(Duration::from_millis(200));
            }
            b.set_length(s.estimated_rows.max(s.rows).max(1));
            b.set_position(s.rows);
            b.set_message(format!(
                "read {mib_per_s:.1} MiB/s  {}/s  {chunks}{paused}{}",
                HumanCount(rows_per_s as u64),
                eta.map(|e| format!("  ETA {}", human_secs(e)))
                    .unwrap_or_default()
            ));
        }
        if let Some(every) = self.log_every
            && self.last_log.elapsed() >= every
        {
            self.last_log = Instant::now();
            tracing::info!(
                job_id = %self.job,
                rows = s.rows,
                estimated_rows = s.estimated_rows,
                chunks_done = s.chunks_done,
                chunks = s.chunks_total,
                chunks_running = s.chunks_running,
                chunks_waiting = s.chunks_waiting,
                waiting_reason = s.waiting.as_ref().map(|(r, _)| first_line(r)),
                next_try_in_s = s.waiting.as_ref().map(|(_, at)| (at - now_ms()).max(0) / 1000),
                chunks_failed = s.chunks_failed,
                mib_per_s = format!("{mib_per_s:.1}"),
                rows_per_s = rows_per_s as u64,
                eta_s = eta,
                paused = s.paused,
                stalled = s.stalled.as_deref(),
                "progress"
            );
        }
    }

    /// Rows and bytes this process saw done (not counting the base), for the summary's
    /// rates.
    pub fn done_here(&self, s: &Snapshot) -> (u64, u64) {
        let (r, b) = self.base.unwrap_or_default();
        (s.rows.saturating_sub(r), s.bytes.saturating_sub(b))
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
            if let Ok(mut g) = BAR.lock() {
                *g = None;
            }
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}
