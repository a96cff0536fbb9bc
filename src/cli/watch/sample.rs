//! The readings of `status --watch`: the manifest read on an interval in a task of its own, and
//! the copy rate over the last minute worked out from those readings.
//!
//! Owns: the sampling task and the rate window. Read-only: it runs the manifest's report queries
//! and nothing else (no write, no lease); it may not draw or print (the view does).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::manifest::{BatchRow, Manifest, Problem, State};

/// What one read of the manifest found.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the read finished.
    pub taken: Instant,
    /// How long the read took (a slow manifest shows here).
    pub took: Duration,
    /// Files and bytes of every state, zero included, in the design's order.
    pub by_state: Vec<(State, u64, u64)>,
    /// Files opened before their copy, queued first (copy-on-read).
    pub copy_on_read: u64,
    /// Sweeps and sweepers at work now.
    pub running: Vec<BatchRow>,
    /// The files that went wrong most recently, with their reasons.
    pub recent_problems: Vec<Problem>,
    pub rate: Option<Rate>,
}

impl Sample {
    pub fn count(&self, state: State) -> (u64, u64) {
        self.by_state
            .iter()
            .find(|(s, _, _)| *s == state)
            .map_or((0, 0), |(_, files, bytes)| (*files, *bytes))
    }

    /// Files and bytes queued for a copy now. Unlike `status`, failed files are left out: they
    /// wait for a retry or the next sweep, and a live ETA for them would say nothing.
    pub fn queued(&self) -> (u64, u64) {
        [State::Pending, State::Copying, State::Copied]
            .iter()
            .map(|s| self.count(*s))
            .fold((0, 0), |acc, (f, b)| (acc.0 + f, acc.1 + b))
    }

    /// Every file the manifest counts, in any state.
    pub fn total(&self) -> (u64, u64) {
        self.by_state
            .iter()
            .fold((0, 0), |acc, (_, f, b)| (acc.0 + f, acc.1 + b))
    }
}

/// The latest news from the manifest: the last good sample, and the error of the last read
/// when it failed (the view then shows both, so a manifest that stops answering is visible).
#[derive(Debug, Clone, Default)]
pub struct Latest {
    pub sample: Option<Arc<Sample>>,
    pub error: Option<String>,
}

/// How fast files become verified, and over what.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub files_per_second: f64,
    pub bytes_per_second: f64,
    pub basis: Basis,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Basis {
    /// Verified counts of this watch's own samples, over the last minute.
    LastMinute,
    /// The recorded batches that finished (before the watch has a minute of samples).
    FinishedBatches,
    /// This watch's own samples, over the time it has watched (less than a minute, and no
    /// batch finished yet).
    Watched(Duration),
}

impl Rate {
    /// Time until `left` files and bytes are copied at this rate: the slower of the two
    /// measures (files and bytes are counted over the same time, so adding them would count
    /// it twice). None when nothing moves.
    pub fn eta(&self, left: (u64, u64)) -> Option<Duration> {
        let by_files = (self.files_per_second > 0.0).then(|| left.0 as f64 / self.files_per_second);
        let by_bytes = (self.bytes_per_second > 0.0).then(|| left.1 as f64 / self.bytes_per_second);
        let secs = match (by_files, by_bytes) {
            (Some(f), Some(b)) => f.max(b),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return None,
        };
        Duration::try_from_secs_f64(secs).ok()
    }
}

/// The span the live rate is measured over.
pub const MINUTE: Duration = Duration::from_secs(60);

/// Verified files and bytes at successive instants, a minute's worth (plus the one reading
/// just before it, so the span covers the whole minute once there is one).
#[derive(Debug, Default)]
pub struct Window {
    points: VecDeque<(Instant, u64, u64)>,
}

impl Window {
    pub fn push(&mut self, at: Instant, files: u64, bytes: u64) {
        self.points.push_back((at, files, bytes));
        while self
            .points
            .get(1)
            .is_some_and(|second| at.duration_since(second.0) >= MINUTE)
        {
            self.points.pop_front();
        }
    }

    /// Files and bytes per second between the oldest and the newest reading, and the span.
    /// Counts that went down (a rollback, a file changed at the source) count as no progress.
    pub fn rate(&self) -> Option<(f64, f64, Duration)> {
        let (first, last) = (self.points.front()?, self.points.back()?);
        let span = last.0.duration_since(first.0);
        if span.is_zero() {
            return None;
        }
        let secs = span.as_secs_f64();
        Some((
            last.1.saturating_sub(first.1) as f64 / secs,
            last.2.saturating_sub(first.2) as f64 / secs,
            span,
        ))
    }

    /// The rate to show: over the last minute once the window spans one; before that the
    /// finished batches' rate, or failing that what this watch has seen move so far.
    pub fn best_rate(&self, finished_batches: Option<(u64, u64, f64)>) -> Option<Rate> {
        let own = self.rate();
        if let Some((files, bytes, _)) = own.filter(|(_, _, span)| *span >= MINUTE) {
            return Some(Rate {
                files_per_second: files,
                bytes_per_second: bytes,
                basis: Basis::LastMinute,
            });
        }
        if let Some((files, bytes, secs)) = finished_batches {
            return Some(Rate {
                files_per_second: files as f64 / secs,
                bytes_per_second: bytes as f64 / secs,
                basis: Basis::FinishedBatches,
            });
        }
        own.filter(|(files, _, _)| *files > 0.0)
            .map(|(files, bytes, span)| Rate {
                files_per_second: files,
                bytes_per_second: bytes,
                basis: Basis::Watched(span),
            })
    }
}

/// Reads the manifest every `interval` (the next read starts an interval after the last one
/// started, or at once when a read took longer) until the task is aborted; each reading
/// replaces the last in the returned channel.
pub fn start(
    manifest: Manifest,
    interval: Duration,
    problems: usize,
) -> (watch::Receiver<Latest>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Latest::default());
    let task = tokio::spawn(async move {
        let mut window = Window::default();
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let read = read(&manifest, problems, &mut window).await;
            tx.send_modify(|latest| match read {
                Ok(sample) => {
                    latest.sample = Some(Arc::new(sample));
                    latest.error = None;
                }
                Err(e) => latest.error = Some(format!("{e:#}")),
            });
        }
    });
    (rx, task)
}

async fn read(manifest: &Manifest, problems: usize, window: &mut Window) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let by_state = manifest.count_by_state().await?;
    let copy_on_read = manifest.count_prioritized().await?;
    let running = manifest.running_batches().await?;
    let recent_problems = manifest.recent_problems(problems).await?;
    let finished_batches = manifest.observed_throughput().await?;
    let taken = Instant::now();
    let mut sample = Sample {
        taken,
        took: taken - started,
        by_state,
        copy_on_read,
        running,
        recent_problems,
        rate: None,
    };
    let (files, bytes) = sample.count(State::Verified);
    window.push(taken, files, bytes);
    sample.rate = window.best_rate(finished_batches);
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_covers_the_last_minute_once_there_is_one() {
        let t0 = Instant::now();
        let mut window = Window::default();
        // 10 files/s for the first 30 s, then 2 files/s.
        for s in 0..=30u64 {
            window.push(t0 + Duration::from_secs(s), s * 10, s * 1000);
        }
        let early = window.best_rate(None).unwrap();
        assert_eq!(early.basis, Basis::Watched(Duration::from_secs(30)));
        assert!((early.files_per_second - 10.0).abs() < 1e-9);
        let batches = window.best_rate(Some((100, 1000, 50.0))).unwrap();
        assert_eq!(batches.basis, Basis::FinishedBatches);
        assert!((batches.files_per_second - 2.0).abs() < 1e-9);

        for s in 31..=120u64 {
            window.push(t0 + Duration::from_secs(s), 300 + (s - 30) * 2, 0);
        }
        let live = window.best_rate(Some((100, 1000, 50.0))).unwrap();
        assert_eq!(live.basis, Basis::LastMinute);
        assert!((live.files_per_second - 2.0).abs() < 1e-9, "{live:?}");
    }

    #[test]
    fn counts_that_go_down_are_no_progress_and_stillness_has_no_eta() {
        let t0 = Instant::now();
        let mut window = Window::default();
        window.push(t0, 50, 500);
        window.push(t0 + Duration::from_secs(61), 40, 400);
        let rate = window.best_rate(None).unwrap();
        assert_eq!(rate.files_per_second, 0.0);
        assert_eq!(rate.eta((10, 100)), None);
    }

    #[test]
    fn the_eta_is_the_slower_of_files_and_bytes() {
        let rate = Rate {
            files_per_second: 10.0,
            bytes_per_second: 100.0,
            basis: Basis::LastMinute,
        };
        assert_eq!(rate.eta((100, 100)), Some(Duration::from_secs(10)));
        assert_eq!(rate.eta((10, 10_000)), Some(Duration::from_secs(100)));
    }
}
