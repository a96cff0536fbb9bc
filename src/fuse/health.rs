//! Whether the dest answers reads (DESIGN §4.5: a dest that is slow or down never makes a file
//! with a local copy unreadable).
//!
//! Owns the mount's view of the dest's health: after a failed or too slow read, opens of files
//! with a local copy go to the local copy, and a probe off the request path (a HEAD of the key
//! that failed, every `PROBE_EVERY`) decides when the dest is back; no application read is spent
//! finding out. Talks to the dest only through `Store`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::Store;

/// How often a dest that is down is asked again, and how long each question may take.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

pub struct DestHealth {
    store: Arc<dyn Store>,
    rt: tokio::runtime::Handle,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    down: bool,
    /// A probe task is running.
    probing: bool,
}

impl DestHealth {
    pub fn new(store: Arc<dyn Store>, rt: tokio::runtime::Handle) -> Arc<DestHealth> {
        Arc::new(DestHealth {
            store,
            rt,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_down(&self) -> bool {
        self.lock().down
    }

    /// A read of `key` failed or took too long: serve local copies until a probe of `key`
    /// answers.
    pub fn mark_down(self: &Arc<Self>, why: &str, key: &str) {
        let start_probe = {
            let mut state = self.lock();
            if !state.down {
                tracing::warn!(
                    error = why,
                    "dest read failed; serving local copies until it answers again"
                );
            }
            state.down = true;
            !std::mem::replace(&mut state.probing, true)
        };
        if start_probe {
            let (health, key) = (self.clone(), key.to_string());
            self.rt
                .spawn(async move { health.probe_until_up(&key).await });
        }
    }

    async fn probe_until_up(&self, key: &str) {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let answer = tokio::time::timeout(PROBE_DEADLINE, self.store.existing_size(key)).await;
            if matches!(answer, Ok(Ok(_))) {
                self.lock().probing = false;
                self.mark_up();
                return;
            }
        }
    }

    pub fn mark_up(&self) {
        let mut state = self.lock();
        if std::mem::take(&mut state.down) {
            tracing::info!("dest reads work again");
        }
    }
}
