//! Group commit for a local dest: one `syncfs` makes many files durable at once.
//!
//! A worker that needs its writes on disk asks for a sync that *starts after* its request and
//! waits for it; requests that arrive while a sync runs share the next one. This gives every
//! file the guarantee of its own fsync (and of a directory fsync after a link) at a fraction of
//! the cost when many small files are in flight.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

#[derive(Default)]
struct Requests {
    wanted: u64,
    started: u64,
    closed: bool,
}

/// What the syncer reports: the last generation completed and the last one that failed.
#[derive(Clone, Copy, Default)]
struct Completed {
    generation: u64,
    last_failed: u64,
}

struct Shared {
    requests: Mutex<Requests>,
    wake: Condvar,
    completed: watch::Sender<Completed>,
}

pub struct SyncGroup {
    shared: Arc<Shared>,
}

impl SyncGroup {
    /// Starts the syncer for the file system that holds `dir`.
    pub fn start(dir: File) -> SyncGroup {
        let (completed, _) = watch::channel(Completed::default());
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
            completed,
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("dest-sync".into())
            .spawn(move || run_syncer(&worker, &dir))
            .expect("cannot start the dest sync thread");
        SyncGroup { shared }
    }

    /// Returns once everything written before the call is durable on the dest's file system.
    pub async fn wait(&self) -> io::Result<()> {
        let target = {
            let mut requests = self
                .shared
                .requests
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let target = requests.started + 1;
            if requests.wanted < target {
                requests.wanted = target;
                self.shared.wake.notify_one();
            }
            target
        };
        let mut completed = self.shared.completed.subscribe();
        let done = *completed
            .wait_for(|c| c.generation >= target)
            .await
            .map_err(|_| io::Error::other("dest sync thread stopped"))?;
        if done.last_failed >= target {
            return Err(io::Error::other(
                "syncfs reported a write error on the dest file system",
            ));
        }
        Ok(())
    }
}

impl Drop for SyncGroup {
    fn drop(&mut self) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.wake.notify_one();
    }
}

fn run_syncer(shared: &Shared, dir: &File) {
    loop {
        let generation = {
            let mut requests = shared.requests.lock().unwrap_or_else(|e| e.into_inner());
            while requests.wanted <= requests.started && !requests.closed {
                requests = shared
                    .wake
                    .wait(requests)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if requests.closed && requests.wanted <= requests.started {
                return;
            }
            requests.started = requests.wanted;
            requests.started
        };
        // SAFETY: syncfs on a descriptor we own.
        let failed = unsafe { libc::syncfs(dir.as_raw_fd()) } != 0;
        if failed {
            tracing::error!(error = %io::Error::last_os_error(), "syncfs on the dest failed");
        }
        shared.completed.send_modify(|c| {
            c.generation = generation;
            if failed {
                c.last_failed = generation;
            }
        });
    }
}
