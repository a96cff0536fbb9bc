//! The migration engine: scanning the source into the manifest and copying files to the dest.
//!
//! Owns: the walk, the worker pool, batches, leases, retries and progress. It talks to the
//! source through `SourceTree`, to the dest only through the `Store` trait, and records every
//! decision in the `Manifest` before or right after acting on it (DESIGN §4.7). It never prints:
//! commands turn its reports into output.

pub mod control;
pub mod file_list;
pub mod filter;
pub mod plan;
pub mod progress;
pub mod purge;
pub mod repair;
pub mod rollback;
pub mod scan;
pub mod sweep;
pub mod verify;

pub use control::{Limits, LiveLimits};

/// Runs `work` unless a stop (SIGTERM, Ctrl-C) comes first; None then, and `work` is dropped
/// where it stood. Only for work that a crash at any await point leaves consistent (DESIGN
/// §4.7), which every step of verify, purge, rollback and plan is built for: a stop is then no
/// worse than a crash, and never waits for a slow dest or a large file.
pub async fn unless_stopped<T>(
    stop: &tokio::sync::watch::Receiver<bool>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut stop = stop.clone();
    // A plain bool, so no lock guard of the channel lives across an await.
    let stopped = async move { stop.wait_for(|stopped| *stopped).await.is_ok() };
    tokio::select! {
        biased;
        true = stopped => None,
        done = work => Some(done),
    }
}
pub use filter::PathFilter;
pub use progress::Progress;

/// The name this process's sweeper uses in leases and batches, and the node of the changes it
/// records in the audit trail: the same string, so the trail tells who held each lease.
pub fn process_node() -> String {
    static NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NODE.get_or_init(node_id).clone()
}

/// A name for a lease holder in this process: host, pid and the time it was made.
pub fn node_id() -> String {
    let host = crate::util::hostname();
    format!(
        "{host}:{}:{}",
        std::process::id(),
        crate::manifest::now_ms()
    )
}
