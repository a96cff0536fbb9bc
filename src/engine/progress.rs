//! Progress of long work: a bar on a terminal, periodic log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::util::{human_bytes, human_duration};

pub struct Progress {
    total_files: AtomicU64,
    total_bytes: AtomicU64,
    done_files: AtomicU64,
    done_bytes: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
    /// `--metrics`: the finished copies are also counted there.
    metrics: std::sync::OnceLock<crate::metrics::Metrics>,
}

impl Progress {
    /// A bar when stderr is a terminal and `quiet` is off; otherwise only `log_every` lines.
    pub fn start(label: &str, quiet: bool, log_every: Duration) -> Arc<Progress> {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} files  {prefix}  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>-"),
            );
            bar.set_message(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let progress = Arc::new(Progress {
            total_files: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            done_files: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            started: Instant::now(),
            bar,
            metrics: std::sync::OnceLock::new(),
        });
        if progress.bar.is_none() && !log_every.is_zero() {
            let weak = Arc::downgrade(&progress);
            let label = label.to_string();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(log_every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(progress) = weak.upgrade() else {
                        break;
                    };
                    tracing::info!("{label}: {}", progress.line());
                }
            });
        }
        progress
    }

    /// Counts every finished copy in `metrics` from now on.
    pub fn attach_metrics(&self, metrics: crate::metrics::Metrics) {
        let _ = self.metrics.set(metrics);
    }

    pub fn copy_done(&self, outcome: crate::metrics::CopyOutcome, bytes: u64) {
        if let Some(metrics) = self.metrics.get() {
            metrics.copy_done(outcome, bytes);
        }
    }

    pub fn set_totals(&self, files: u64, bytes: u64) {
        self.total_files.store(files, Ordering::Relaxed);
        self.total_bytes.store(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(files);
        }
    }

    pub fn file_done(&self, bytes: u64) {
        self.done_files.fetch_add(1, Ordering::Relaxed);
        let done_bytes = self.done_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_prefix(format!(
                "{} / {}",
                human_bytes(done_bytes),
                human_bytes(self.total_bytes.load(Ordering::Relaxed))
            ));
        }
    }

    /// One line: files, bytes, rate and ETA.
    pub fn line(&self) -> String {
        let (files, total_files) = (
            self.done_files.load(Ordering::Relaxed),
            self.total_files.load(Ordering::Relaxed),
        );
        let (bytes, total_bytes) = (
            self.done_bytes.load(Ordering::Relaxed),
            self.total_bytes.load(Ordering::Relaxed),
        );
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes as f64 / secs;
        let eta = if files > 0 && total_files > files {
            let per_file = secs / files as f64;
            human_duration(Duration::from_secs_f64(
                per_file * (total_files - files) as f64,
            ))
        } else {
            "-".to_string()
        };
        format!(
            "{files}/{total_files} files, {} / {}, {}/s, {:.0} files/s, ETA {eta}",
            human_bytes(bytes),
            human_bytes(total_bytes),
            human_bytes(rate as u64),
            files as f64 / secs
        )
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
