//! What a run would do, computed without writing anything: `plan` and every `--dry-run`.
//!
//! Walks the source like the scanner, applies the same `after_scan` rule to what an existing
//! manifest holds (opened read-only), and for files still to copy asks the dest what is there.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::filter::PathFilter;
use super::scan::start_walk;
use crate::manifest::{after_scan, Kind, Manifest, ManifestError, ScanChange, State};
use crate::source::SourceTree;
use crate::store::Store;

/// What would happen to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Would be copied.
    Copy,
    /// Already verified by an earlier run.
    Verified,
    /// The dest already holds a file of the same size (confirmed by hash when copied).
    AlreadyThere,
    /// The dest holds a different file: left alone as a conflict.
    Conflict,
    Missing,
    Unsupported,
    /// Another state the manifest holds (failed, copying, deleted...), left as is.
    Other,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Totals {
    pub files: u64,
    pub bytes: u64,
}

impl Totals {
    fn add(&mut self, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Plan {
    pub files: Totals,
    pub dirs: u64,
    /// By the state each file would have after a scan now.
    pub by_state: BTreeMap<State, Totals>,
    /// By what a sweep would do with it.
    pub by_fate: BTreeMap<Fate, Totals>,
    /// By top-level folder ("." for files at the root): all files, and those to copy.
    pub by_folder: BTreeMap<String, (Totals, Totals)>,
    pub estimate_seconds: f64,
    pub estimate_basis: String,
    /// Requests a sweep would make of a dest that bills them (S3): writes, and reads (HEADs).
    pub requests: Requests,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Requests {
    /// PUT, COPY, POST, LIST class.
    pub put: u64,
    /// GET, HEAD class.
    pub get: u64,
}

/// Prices of an object store, for the estimate `plan` prints.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Prices {
    pub storage_gb_month: f64,
    pub put_per_1000: f64,
    pub get_per_1000: f64,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Cost {
    /// The requests of the migration, paid once.
    pub requests_once: f64,
    /// Storing every file in scope, per month.
    pub storage_month: f64,
}

impl Plan {
    pub fn cost(&self, prices: &Prices) -> Cost {
        let gb = self.files.bytes as f64 / 1e9;
        Cost {
            requests_once: self.requests.put as f64 / 1000.0 * prices.put_per_1000
                + self.requests.get as f64 / 1000.0 * prices.get_per_1000,
            storage_month: gb * prices.storage_gb_month,
        }
    }
}

const DEST_QUERIES_IN_FLIGHT: usize = 64;

/// Default speeds for estimates before any batch has been measured.
const ASSUMED_BYTES_PER_SEC: f64 = 200.0 * 1024.0 * 1024.0;
const ASSUMED_FILES_PER_SEC: f64 = 2000.0;

pub async fn make_plan(
    manifest: Option<&Manifest>,
    source: Arc<SourceTree>,
    store: Arc<dyn Store>,
    filter: &PathFilter,
) -> Result<Plan, ManifestError> {
    let mut plan = Plan::default();
    let mut seen = HashSet::new();
    let mut walk = start_walk(source, store.clone());
    while let Some(batch) = walk.batches.recv().await {
        let paths: Vec<&str> = batch.iter().map(|s| s.path.as_str()).collect();
        let recorded = match manifest {
            Some(m) => m.recorded(&paths).await?,
            None => Default::default(),
        };
        let mut files = Vec::new();
        for scanned in &batch {
            if scanned.kind == Kind::Dir && scanned.unsupported.is_none() {
                plan.dirs += 1;
                continue;
            }
            if !filter.matches(&scanned.path) {
                continue;
            }
            seen.insert(scanned.path.clone());
            let old = recorded.get(&scanned.path);
            let state = match (after_scan(old, scanned), old) {
                (ScanChange::Write { state, .. }, _) => state,
                (ScanChange::Unchanged, Some(old)) => old.state,
                (ScanChange::Unchanged, None) => State::Pending,
            };
            files.push((scanned, state, old.is_some_and(|o| o.dest_owned)));
        }
        // The dest is asked about many files at once: one at a time, a remote dest would take
        // a round trip per file.
        let fates: Vec<Fate> = futures_util::stream::iter(&files)
            .map(|(scanned, state, owned)| {
                let store = &store;
                async move {
                    match state {
                        State::Pending => {
                            fate_at_dest(&**store, &scanned.path, scanned.size, *owned).await
                        }
                        State::Verified => Fate::Verified,
                        State::Unsupported => Fate::Unsupported,
                        State::Conflict => Fate::Conflict,
                        _ => Fate::Other,
                    }
                }
            })
            .buffered(DEST_QUERIES_IN_FLIGHT)
            .collect()
            .await;
        for ((scanned, state, _), fate) in files.into_iter().zip(fates) {
            if state == State::Pending {
                plan.requests.get += 1;
            }
            if fate == Fate::Copy {
                plan.requests.put += store.put_requests(scanned.size);
            }
            record(&mut plan, &scanned.path, state, fate, scanned.size);
        }
    }
    if let Some(manifest) = manifest {
        for file in manifest.files().await? {
            let gone = !seen.contains(&file.path) && filter.matches(&file.path);
            if gone && !matches!(file.state, State::Missing | State::Deleted) {
                record(
                    &mut plan,
                    &file.path,
                    State::Missing,
                    Fate::Missing,
                    file.size,
                );
            }
        }
    }
    let observed = match manifest {
        Some(m) => m.observed_throughput().await?,
        None => None,
    };
    estimate(&mut plan, observed);
    Ok(plan)
}

/// What a sweep would find at the dest. By size only (a dry run reads no content); an object
/// cutoverfs wrote earlier is replaced, never a conflict.
async fn fate_at_dest(store: &dyn Store, path: &str, size: u64, owned: bool) -> Fate {
    crate::testhook::hold_point_async("plan:dest", path).await;
    let Ok(key) = store.key_for(path) else {
        return Fate::Unsupported;
    };
    match store.existing_size(&key).await {
        Ok(None) | Err(_) => Fate::Copy,
        Ok(Some(existing)) if existing == size => Fate::AlreadyThere,
        Ok(Some(_)) if owned => Fate::Copy,
        Ok(Some(_)) => Fate::Conflict,
    }
}

fn record(plan: &mut Plan, path: &str, state: State, fate: Fate, size: u64) {
    plan.files.add(size);
    plan.by_state.entry(state).or_default().add(size);
    plan.by_fate.entry(fate).or_default().add(size);
    let folder = match path.split_once('/') {
        Some((top, _)) => top.to_string(),
        None => ".".to_string(),
    };
    let (all, to_copy) = plan.by_folder.entry(folder).or_default();
    all.add(size);
    if fate == Fate::Copy {
        to_copy.add(size);
    }
}

fn estimate(plan: &mut Plan, observed: Option<(u64, u64, f64)>) {
    let to_copy = plan.by_fate.get(&Fate::Copy).cloned().unwrap_or_default();
    let checks = plan.by_fate.get(&Fate::AlreadyThere).map_or(0, |t| t.files);
    let (files_per_sec, bytes_per_sec, basis) = match observed {
        Some((files, bytes, secs)) if secs > 0.5 => (
            files as f64 / secs,
            (bytes as f64 / secs).max(1.0),
            format!(
                "measured on earlier batches: {:.0} files/s, {}/s",
                files as f64 / secs,
                crate::util::human_bytes((bytes as f64 / secs) as u64)
            ),
        ),
        _ => (
            ASSUMED_FILES_PER_SEC,
            ASSUMED_BYTES_PER_SEC,
            format!(
                "assumed {:.0} files/s and {}/s (no batch measured yet)",
                ASSUMED_FILES_PER_SEC,
                crate::util::human_bytes(ASSUMED_BYTES_PER_SEC as u64)
            ),
        ),
    };
    plan.estimate_seconds =
        (to_copy.files + checks) as f64 / files_per_sec + to_copy.bytes as f64 / bytes_per_sec;
    plan.estimate_basis = basis;
}

impl Plan {
    pub fn estimate(&self) -> Duration {
        Duration::from_secs_f64(self.estimate_seconds)
    }

    pub fn count(&self, fate: Fate) -> Totals {
        self.by_fate.get(&fate).cloned().unwrap_or_default()
    }
}
