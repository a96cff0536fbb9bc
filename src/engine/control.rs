//! The sweeper settings that may change while it runs (the daemon re-reads its config file on
//! SIGHUP): files in flight (`--concurrency`), the `--bwlimit` and `--max-ops` throttles and the
//! `--include` / `--exclude` scope.
//!
//! Owns: the token buckets and the resizable limit on files in flight. A change never touches a
//! copy already in flight; it applies to the work that starts after it.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::filter::PathFilter;
use crate::store::ReadPace;
use crate::util::human_bytes;

/// The live settings, as a whole: a reload replaces all of them at once or none.
#[derive(Debug, Clone)]
pub struct Limits {
    pub concurrency: usize,
    /// Bytes per second read from the source (file sizes, charged before a copy starts).
    pub bwlimit: Option<u64>,
    /// Write requests per second to the dest: each file counts as the PUT-class requests its
    /// upload takes (at least 1).
    pub max_ops: Option<u64>,
    pub filter: PathFilter,
}

impl Limits {
    /// One `name: old → new` entry per setting that differs.
    pub fn changes_from(&self, old: &Limits) -> Vec<String> {
        let rate = |r: Option<u64>, unit: &dyn Fn(u64) -> String| {
            r.map_or_else(|| "unlimited".to_string(), |r| format!("{}/s", unit(r)))
        };
        let bytes = |n: u64| human_bytes(n);
        let ops = |n: u64| format!("{n} requests");
        let mut changes = Vec::new();
        if self.concurrency != old.concurrency {
            changes.push(format!(
                "concurrency: {} → {}",
                old.concurrency, self.concurrency
            ));
        }
        if self.bwlimit != old.bwlimit {
            changes.push(format!(
                "bwlimit: {} → {}",
                rate(old.bwlimit, &bytes),
                rate(self.bwlimit, &bytes)
            ));
        }
        if self.max_ops != old.max_ops {
            changes.push(format!(
                "max-ops: {} → {}",
                rate(old.max_ops, &ops),
                rate(self.max_ops, &ops)
            ));
        }
        if self.filter.describe() != old.filter.describe() {
            changes.push(format!(
                "scope: {} → {}",
                old.filter.describe(),
                self.filter.describe()
            ));
        }
        changes
    }
}

/// Seconds of allowance a throttle lets through at once after an idle spell. Small, so the rate
/// measured over a few seconds is the limit; a group of files is also kept to half of this.
const BURST_SECONDS: f64 = 0.2;

/// Longest single sleep of a throttled start: a raised limit is seen within this.
const LONGEST_NAP: Duration = Duration::from_millis(100);

/// Shared by everything a sweep starts; `set` swaps the settings in at once.
pub struct LiveLimits {
    current: RwLock<Arc<Limits>>,
    slots: Arc<Slots>,
    bytes: TokenBucket,
    ops: TokenBucket,
    paced_turns: Arc<tokio::sync::Semaphore>,
}

/// Paced copies at once: two, so one's final sync and publishing overlap the other's reads.
const PACED_TURNS: usize = 2;

impl std::fmt::Debug for LiveLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl LiveLimits {
    pub fn new(limits: Limits) -> Arc<LiveLimits> {
        Arc::new(LiveLimits {
            slots: Arc::new(Slots::new(limits.concurrency)),
            bytes: TokenBucket::new(limits.bwlimit),
            ops: TokenBucket::new(limits.max_ops),
            paced_turns: Arc::new(tokio::sync::Semaphore::new(PACED_TURNS)),
            current: RwLock::new(Arc::new(limits)),
        })
    }

    pub fn get(&self) -> Arc<Limits> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies new settings to the work that starts from now on; returns what changed.
    pub fn set(&self, limits: Limits) -> Vec<String> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let changes = limits.changes_from(&current);
        self.slots.set_limit(limits.concurrency);
        self.bytes.set_rate(limits.bwlimit);
        self.ops.set_rate(limits.max_ops);
        *current = Arc::new(limits);
        changes
    }

    /// Files and bytes at most in the next group handed to the store: under a throttle, a group
    /// is a small slice of a second's allowance, so no group is a burst of its own.
    pub(super) fn group_caps(&self, files: usize, bytes: u64) -> (usize, u64) {
        let limits = self.get();
        let slice = |rate: u64| ((rate as f64 * BURST_SECONDS / 2.0) as u64).max(1);
        let bytes = limits.bwlimit.map_or(bytes, |r| bytes.min(slice(r)));
        let files = limits
            .max_ops
            .map_or(files, |r| files.min(slice(r) as usize));
        (files, bytes)
    }

    /// Waits for `files` of the files-in-flight slots (all of them free, when more than the
    /// limit are asked for after it was lowered).
    pub(super) async fn slots(&self, files: usize) -> SlotGuard {
        self.slots.clone().acquire(files).await
    }

    /// Files larger than this are not charged to `--bwlimit` when they start: the store paces
    /// their reads chunk by chunk (`pacer`), so a large file is no burst of its own size.
    pub(super) fn paced_above(&self) -> Option<u64> {
        self.get()
            .bwlimit
            .map(|rate| Bucket::burst(rate as f64) as u64)
    }

    /// Paces the reads of one large file; once the sweep is stopping, the copy in flight
    /// finishes unpaced, so a stop is not held up by a low limit.
    pub(super) fn pacer(
        self: &Arc<Self>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<dyn ReadPace> {
        Arc::new(Pacer {
            limits: self.clone(),
            stop,
        })
    }

    /// Waits until both throttles allow a group of `bytes` and `requests` to start, and charges
    /// them before it starts (a group may overdraw; the next waits until that is paid back).
    /// A group with a file the store paces also waits for one of the few turns of paced copies
    /// (held until it is done): paced reads wait on I/O threads, which copies that could go on
    /// meanwhile must not run out of.
    pub(super) async fn start(
        &self,
        bytes: u64,
        requests: u64,
        paced: bool,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let turn = if paced {
            self.paced_turns.clone().acquire_owned().await.ok()
        } else {
            None
        };
        self.pace(bytes, requests).await;
        turn
    }

    async fn pace(&self, bytes: u64, requests: u64) {
        self.bytes.take(bytes).await;
        self.ops.take(requests).await;
    }
}

struct Pacer {
    limits: Arc<LiveLimits>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl ReadPace for Pacer {
    fn wait_blocking(&self, bytes: u64) {
        self.limits
            .bytes
            .take_blocking(bytes, || *self.stop.borrow());
    }
}

/// A token bucket that may go into debt: a start waits until the balance is not negative, then
/// takes its whole amount. So the rate over any span is the limit, give or take one burst and
/// one start.
struct TokenBucket(Mutex<Bucket>);

struct Bucket {
    rate: Option<f64>,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn burst(rate: f64) -> f64 {
        (rate * BURST_SECONDS).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let earned = rate * now.saturating_duration_since(self.at).as_secs_f64();
            self.tokens = (self.tokens + earned).min(Bucket::burst(rate));
        }
        self.at = now;
    }
}

impl TokenBucket {
    fn new(rate: Option<u64>) -> TokenBucket {
        TokenBucket(Mutex::new(Bucket {
            rate: rate.map(|r| r.max(1) as f64),
            tokens: 0.0,
            at: Instant::now(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What was earned at the old rate is kept; a debt is paid back at the new one.
    fn set_rate(&self, rate: Option<u64>) {
        let mut bucket = self.lock();
        bucket.refill(Instant::now());
        bucket.rate = rate.map(|r| r.max(1) as f64);
        if bucket.rate.is_none() {
            bucket.tokens = 0.0;
        }
    }

    async fn take(&self, amount: u64) {
        while let Some(wait) = self.try_take(amount) {
            tokio::time::sleep(wait).await;
        }
    }

    /// `take` for an I/O thread; gives up waiting once `stopping` says so.
    fn take_blocking(&self, amount: u64, stopping: impl Fn() -> bool) {
        while let Some(wait) = self.try_take(amount) {
            if stopping() {
                return;
            }
            std::thread::sleep(wait);
        }
    }

    /// Takes `amount` if the balance allows it now (None), else says how long to nap.
    fn try_take(&self, amount: u64) -> Option<Duration> {
        let mut bucket = self.lock();
        let rate = bucket.rate?;
        bucket.refill(Instant::now());
        if bucket.tokens >= 0.0 {
            bucket.tokens -= amount as f64;
            return None;
        }
        let wait = Duration::from_secs_f64(-bucket.tokens / rate);
        Some(wait.clamp(Duration::from_millis(1), LONGEST_NAP))
    }
}

/// Files in flight, with a limit that may change: a start waits until its files fit, or until
/// nothing is in flight (a group larger than a lowered limit then goes alone).
struct Slots {
    state: Mutex<(usize, usize)>,
    freed: tokio::sync::Notify,
}

pub(super) struct SlotGuard {
    slots: Arc<Slots>,
    files: usize,
}

impl Slots {
    fn new(limit: usize) -> Slots {
        Slots {
            state: Mutex::new((0, limit.max(1))),
            freed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_limit(&self, limit: usize) {
        self.lock().1 = limit.max(1);
        self.freed.notify_waiters();
    }

    async fn acquire(self: Arc<Self>, files: usize) -> SlotGuard {
        loop {
            {
                let freed = self.freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if self.try_take(files) {
                    break;
                }
                freed.await;
            }
        }
        SlotGuard { slots: self, files }
    }

    fn try_take(&self, files: usize) -> bool {
        let mut state = self.lock();
        let (in_use, limit) = *state;
        let fits = in_use == 0 || in_use + files <= limit;
        if fits {
            state.0 += files;
        }
        fits
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.lock().0 -= self.files;
        self.slots.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(bwlimit: Option<u64>, max_ops: Option<u64>) -> Limits {
        Limits {
            concurrency: 8,
            bwlimit,
            max_ops,
            filter: PathFilter::default(),
        }
    }

    /// 1 MiB/s, charged in 64 KiB starts for 2 s: within a burst and one start of 2 MiB.
    #[tokio::test]
    async fn a_throttle_holds_its_rate_from_the_first_start() {
        let live = LiveLimits::new(limits(Some(1 << 20), None));
        let started = Instant::now();
        let mut charged = 0u64;
        while started.elapsed() < Duration::from_secs(2) {
            live.pace(64 << 10, 1).await;
            charged += 64 << 10;
        }
        let rate = charged as f64 / started.elapsed().as_secs_f64() / (1 << 20) as f64;
        assert!((0.9..1.1).contains(&rate), "{rate} MiB/s");
    }

    #[tokio::test]
    async fn a_raised_limit_is_seen_by_a_start_waiting_on_a_debt() {
        let live = LiveLimits::new(limits(None, Some(1)));
        live.pace(0, 100).await; // 100 s of debt at 1 request per second
        let waiting = {
            let live = live.clone();
            tokio::spawn(async move { live.pace(0, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished());
        let changes = live.set(limits(None, Some(10_000)));
        assert_eq!(changes, ["max-ops: 1 requests/s → 10000 requests/s"]);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the start waited on after the limit was raised")
            .unwrap();
    }

    #[tokio::test]
    async fn a_group_larger_than_a_lowered_limit_goes_alone() {
        let live = LiveLimits::new(limits(None, None));
        let first = live.slots(6).await;
        live.set(Limits {
            concurrency: 2,
            ..limits(None, None)
        });
        let next = {
            let live = live.clone();
            tokio::spawn(async move { live.slots(4).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !next.is_finished(),
            "started beside 6 files with a limit of 2"
        );
        drop(first);
        let held = tokio::time::timeout(Duration::from_secs(1), next)
            .await
            .unwrap()
            .unwrap();
        drop(held);
        let _two = live.slots(2).await;
    }
}
