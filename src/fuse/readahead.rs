//! Directory listings built ahead of the kernel's readdir (issue 15.4).
//!
//! A walk (`find`, a backup, a Django `collectstatic`) reads one directory at a time and waits
//! for each: the daemon's part of a listing (a directory read, a stat per name, one manifest
//! query) and the kernel's part (turning the answer into inodes) take turns. When a directory
//! is listed, its subdirectories are likely next, so one thread lists them in advance, newest
//! first (a depth-first walk asks for the first subdirectory next). Its work overlaps the kernel's and the walker's, on the other
//! core. Each request of the kernel lets it list `WINDOW` more, so it stops when the walk
//! does. What is built ahead is served only to the first request for it, and only within the
//! listing cache's lifetime (`Core::listing`); a change made here drops it (`dir_changed`).
//!
//! Owns: the queue of directories to list and what was listed ahead. It builds listings only
//! through `Core::build_listing`.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::core::Core;

/// Listings built ahead since the kernel last asked for one, at most.
const WINDOW: usize = 4;
/// Threads listing ahead: one. On two cores the walker, the kernel and the daemon's replies
/// share the other; a second thread made 1M-file walks slower (12.1 s against 10.9 s).
const THREADS: usize = 1;
/// Directories waiting to be listed ahead, at most (8 bytes each).
const QUEUED: usize = 65_536;
/// A listing built ahead that nobody asked for within this long no longer counts.
const STALE: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct ReadAhead {
    /// Directories to list ahead, and how many more may be listed before the kernel asks for
    /// another listing (each request gives `WINDOW` again: a walk that stops stops this too).
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Built ahead, not asked for yet, with when.
    ahead: DashMap<u64, Instant, foldhash::fast::RandomState>,
}

#[derive(Default)]
struct Queue {
    dirs: VecDeque<u64>,
    credit: usize,
}

impl ReadAhead {
    /// Starts the thread that lists ahead for `core`; it ends with the core.
    pub fn start(core: &Arc<Core>) {
        for _ in 0..THREADS {
            let weak = Arc::downgrade(core);
            let spawned = std::thread::Builder::new()
                .name("readdir-ahead".into())
                .spawn(move || run(weak));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no thread to list directories ahead; walks are slower");
            }
        }
    }

    /// The kernel listed a directory whose subdirectories are `dirs` (in listing order).
    pub fn listed(&self, dirs: impl DoubleEndedIterator<Item = u64>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for ino in dirs.rev() {
            queue.dirs.push_front(ino);
        }
        queue.dirs.truncate(QUEUED);
        queue.credit = WINDOW;
        drop(queue);
        self.wake.notify_one();
    }

    /// Whether `ino` was listed ahead (and now counts as asked for).
    pub fn take(&self, ino: u64) -> bool {
        self.ahead.remove(&ino).is_some()
    }

    /// A listing built ahead was dropped (the directory changed).
    pub fn forget(&self, ino: u64) {
        self.ahead.remove(&ino);
    }

    /// The next directory to list ahead, while there is credit; None when the core is gone.
    fn next(&self, core: &Weak<Core>) -> Option<u64> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            core.upgrade()?;
            if queue.credit > 0 {
                if let Some(ino) = queue.dirs.pop_front() {
                    queue.credit -= 1;
                    self.ahead.retain(|_, at| at.elapsed() < STALE);
                    return Some(ino);
                }
            }
            queue = self
                .wake
                .wait_timeout(queue, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn run(weak: Weak<Core>) {
    loop {
        let Some(core) = weak.upgrade() else { return };
        let ahead = core.readahead.clone();
        drop(core);
        let Some(ino) = ahead.next(&weak) else { return };
        let Some(core) = weak.upgrade() else { return };
        // Counted before it is built: a request that comes meanwhile takes the count (and
        // builds the listing itself), so nothing stays counted that nobody will ask for.
        ahead.ahead.insert(ino, Instant::now());
        if !core.build_ahead(ino) {
            ahead.ahead.remove(&ino);
        }
    }
}
