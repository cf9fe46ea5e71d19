//! Progress of a running job: a bar on a terminal, plain log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use haul_shared::JobId;
use haul_worker::executor::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    Bar,
    Log,
    None,
}

pub struct Reporter {
    bar: Option<ProgressBar>,
    log_every: Option<Duration>,
    last_log: Instant,
    started: Instant,
    job: JobId,
    estimated_rows: u64,
    chunks: usize,
    base_rows: u64,
}

impl Reporter {
    pub fn new(mode: ProgressMode, job: &JobId, estimated_rows: u64, chunks: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let (bar, log_every) = match mode {
            ProgressMode::Bar => (true, None),
            ProgressMode::Auto if tty => (true, None),
            ProgressMode::Auto | ProgressMode::Log => (false, Some(Duration::from_secs(5))),
            ProgressMode::None => (false, None),
        };
        let bar = bar.then(|| {
            let b = ProgressBar::with_draw_target(
                Some(estimated_rows.max(1)),
                ProgressDrawTarget::stderr(),
            );
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{bar:30}] {human_pos}/~{human_len} rows  {msg}  ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Self {
            bar,
            log_every,
            last_log: Instant::now(),
            started: Instant::now(),
            job: job.clone(),
            estimated_rows,
            chunks,
            base_rows: 0,
        }
    }

    /// Rows already committed before this run (a resume).
    pub fn set_base(&mut self, rows: u64) {
        self.base_rows = rows;
    }

    pub fn update(&mut self, p: &Progress, chunks_done: usize) {
        let rows = self.base_rows + p.rows.load(Ordering::Relaxed);
        let bytes = p.source_bytes.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let mibps = bytes as f64 / secs / (1024.0 * 1024.0);
        if let Some(b) = &self.bar {
            if rows > b.length().unwrap_or(0) {
                b.set_length(rows);
            }
            b.set_position(rows);
            b.set_message(format!(
                "chunks {chunks_done}/{}  {mibps:.1} MiB/s",
                self.chunks
            ));
        }
        if let Some(every) = self.log_every
            && self.last_log.elapsed() >= every
        {
            self.last_log = Instant::now();
            let rate = rows as f64 / secs;
            let eta = (self.estimated_rows.saturating_sub(rows) as f64 / rate.max(1.0)) as u64;
            tracing::info!(
                job_id = %self.job,
                rows,
                estimated_rows = self.estimated_rows,
                chunks_done,
                chunks = self.chunks,
                mib_per_s = format!("{mibps:.1}"),
                eta_s = eta,
                "progress"
            );
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
