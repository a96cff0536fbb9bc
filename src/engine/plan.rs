//! What a run would do, computed without writing anything: `plan` and every `--dry-run`.
//!
//! Walks the source like the scanner, applies the same `after_scan` rule to what an existing
//! manifest holds (opened read-only), and for files still to copy asks the dest what is there.
//! With a file list (`--files-from`), also what the list and the tree disagree on.

use std::collections::{BTreeMap, BTreeSet, HashSet};
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
    /// With a file list: what it and the tree disagree on.
    pub files_from: Option<ListReport>,
}

/// What a file list (the application's database) and the source tree disagree on.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ListReport {
    /// The list's file, or `-` for stdin.
    pub list: String,
    /// Distinct paths on the list.
    pub listed: u64,
    /// Files in the tree (and in the globs' scope) that the list does not name: candidates to
    /// leave behind.
    pub orphans: Named,
    /// Listed paths (in the globs' scope) with no file in the tree and no purged copy at the
    /// dest: what `--skip-missing` skips. Their bytes are those the manifest last recorded, 0
    /// for a path never seen.
    pub dangling: Named,
}

/// Files and bytes, and the first of their paths in path order.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Named {
    pub files: u64,
    pub bytes: u64,
    /// At most the number asked for (all of them when `paths.len() == files`).
    pub paths: BTreeSet<String>,
    #[serde(skip)]
    keep: usize,
}

impl Named {
    fn new(keep: usize) -> Named {
        Named {
            keep,
            ..Named::default()
        }
    }

    /// Counts a path; keeps its name while it is among the first `keep` in path order.
    fn add(&mut self, path: &str, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
        let below_last = self.paths.last().is_none_or(|last| path < last.as_str());
        if self.paths.len() < self.keep || (self.keep > 0 && below_last) {
            self.paths.insert(path.to_string());
            if self.paths.len() > self.keep {
                self.paths.pop_last();
            }
        }
    }
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

/// The plan of a sweep with `filter`; with a file list in it, `names` orphan and dangling paths
/// are kept by name (the first in path order).
pub async fn make_plan(
    manifest: Option<&Manifest>,
    source: Arc<SourceTree>,
    store: Arc<dyn Store>,
    filter: &PathFilter,
    names: usize,
) -> Result<Plan, ManifestError> {
    let mut plan = Plan {
        files_from: filter.list().map(|list| ListReport {
            list: list.origin().to_string(),
            listed: list.len() as u64,
            orphans: Named::new(names),
            dangling: Named::new(names),
        }),
        ..Plan::default()
    };
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
            if !filter.matches_globs(&scanned.path) {
                continue;
            }
            if !filter.is_listed(&scanned.path) {
                if let Some(report) = &mut plan.files_from {
                    report.orphans.add(&scanned.path, scanned.size);
                }
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
    gone_files(&mut plan, manifest, filter, &seen).await?;
    let observed = match manifest {
        Some(m) => m.observed_throughput().await?,
        None => None,
    };
    estimate(&mut plan, observed);
    Ok(plan)
}

/// Files in scope that the walk did not find: recorded ones a scan would mark missing, and with
/// a file list every listed path without a file (dangling), recorded or not. A purged file is not
/// gone: its copy is at the dest.
async fn gone_files(
    plan: &mut Plan,
    manifest: Option<&Manifest>,
    filter: &PathFilter,
    seen: &HashSet<String>,
) -> Result<(), ManifestError> {
    let mut unseen: HashSet<&str> = match filter.list() {
        Some(list) => list
            .paths()
            .filter(|p| !seen.contains(*p) && filter.matches_globs(p))
            .collect(),
        None => HashSet::new(),
    };
    let recorded = match manifest {
        Some(m) => m.files().await?,
        None => Vec::new(),
    };
    for file in &recorded {
        if file.purged {
            unseen.remove(file.path.as_str());
            continue;
        }
        if seen.contains(&file.path) || !filter.matches(&file.path) {
            continue;
        }
        let dangling = unseen.remove(file.path.as_str());
        let known_gone = matches!(file.state, State::Missing | State::Deleted);
        if dangling || !known_gone {
            gone(plan, &file.path, file.size, dangling);
        }
    }
    for path in unseen {
        gone(plan, path, 0, true);
    }
    Ok(())
}

fn gone(plan: &mut Plan, path: &str, size: u64, dangling: bool) {
    record(plan, path, State::Missing, Fate::Missing, size);
    if let Some(report) = plan.files_from.as_mut().filter(|_| dangling) {
        report.dangling.add(path, size);
    }
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
