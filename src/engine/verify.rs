//! Verify (DESIGN §7): re-checks every file the manifest records at the dest against the dest
//! object and the local copy, and records what is wrong so the file leaves `verified`.
//!
//! Without `deep`, the dest is asked for the object's size and the content hash cutoverfs
//! recorded on it (one HEAD on S3, a stat and an xattr on a local dest); with `deep` its bytes
//! are read back and hashed. A local copy is compared by size and mtime (and re-hashed with
//! `deep`). It talks to the dest only through `Store`.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;

use super::{PathFilter, Progress};
use crate::manifest::{AtDest, Manifest, ManifestError};
use crate::source::{Attrs, SourceTree};
use crate::store::{ObjectFacts, Store};

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub filter: PathFilter,
    pub deep: bool,
    /// Files checked at once.
    pub concurrency: usize,
}

/// What is wrong with one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// Nothing at the dest key.
    DestMissing,
    /// The dest object's size differs from the manifest's.
    DestSize,
    /// The dest object's content (read back, or the hash recorded on it) differs.
    DestHash,
    /// The local copy differs from what was verified.
    LocalChanged,
    /// The check itself failed (dest unreachable, unreadable file): nothing was recorded.
    CheckFailed,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::DestMissing => "dest_missing",
            Problem::DestSize => "dest_size",
            Problem::DestHash => "dest_hash",
            Problem::LocalChanged => "local_changed",
            Problem::CheckFailed => "check_failed",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub path: String,
    pub problem: Problem,
    pub detail: String,
    /// The local copy was purged: the dest object was the only copy.
    pub data_at_risk: bool,
    /// The finding was recorded in the manifest (the file left `verified`).
    pub recorded: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub checked_bytes: u64,
    pub ok: u64,
    /// Files whose dest copy is the only one (purged locally).
    pub dest_only: u64,
    pub findings: Vec<Finding>,
    pub deep: bool,
}

impl VerifyReport {
    pub fn data_at_risk(&self) -> usize {
        self.findings.iter().filter(|f| f.data_at_risk).count()
    }
}

pub async fn verify(
    manifest: &Manifest,
    store: &Arc<dyn Store>,
    source: &Arc<SourceTree>,
    opts: &VerifyOptions,
    progress: &Arc<Progress>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<VerifyReport, ManifestError> {
    let mut report = VerifyReport {
        deep: opts.deep,
        ..Default::default()
    };
    let mut after = String::new();
    loop {
        let page = manifest.at_dest(&after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.path.clone();
        let files: Vec<AtDest> = page
            .into_iter()
            .filter(|f| opts.filter.matches(&f.path))
            .collect();
        progress.set_totals(
            report.checked + files.len() as u64,
            report.checked_bytes + files.iter().map(|f| f.size).sum::<u64>(),
        );
        let mut checks = futures_util::stream::iter(files)
            .map(|file| async move {
                let problem = check_one(store.as_ref(), source, &file, opts.deep).await;
                (file, problem.0, problem.1)
            })
            .buffer_unordered(opts.concurrency.max(1));
        while let Some((file, problem, local_good)) = checks.next().await {
            report.checked += 1;
            report.checked_bytes += file.size;
            report.dest_only += u64::from(file.purged);
            progress.file_done(file.size);
            match problem {
                None => report.ok += 1,
                Some((problem, detail)) => {
                    let finding = record(manifest, &file, problem, detail).await?;
                    if finding.recorded
                        && local_good
                        && matches!(problem, Problem::DestHash | Problem::DestSize)
                    {
                        remove_bad_copy(manifest, store.as_ref(), &file).await;
                    }
                    report.findings.push(finding);
                }
            }
            if *stop.borrow() {
                break;
            }
        }
        if *stop.borrow() {
            break;
        }
    }
    // Files are checked concurrently: report them in path order, the same on every run.
    report.findings.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(report)
}

/// A broken object of ours whose file still has a good local copy is deleted, so the next sweep
/// writes it afresh (the sweep trusts the content hash recorded on our own objects and would
/// otherwise take the broken one as already there). A purged file's object is never touched:
/// broken or not, it is all there is.
async fn remove_bad_copy(manifest: &Manifest, store: &dyn Store, file: &AtDest) {
    if file.purged {
        return;
    }
    match store
        .delete_owned(&file.dest_key, &file.owned_sha256, manifest.id())
        .await
    {
        Ok(removal) => {
            tracing::info!(path = %file.path, key = %file.dest_key, ?removal, "broken dest object removed for a fresh copy")
        }
        Err(e) => {
            tracing::warn!(path = %file.path, key = %file.dest_key, error = %e, "cannot remove the broken dest object")
        }
    }
}

async fn record(
    manifest: &Manifest,
    file: &AtDest,
    problem: Problem,
    detail: String,
) -> Result<Finding, ManifestError> {
    let data_at_risk = file.purged && problem != Problem::CheckFailed;
    let recorded = problem != Problem::CheckFailed
        && manifest
            .record_verify_finding(file, &detail, problem == Problem::LocalChanged)
            .await?;
    if data_at_risk {
        tracing::error!(path = %file.path, problem = problem.as_str(), detail = %detail,
            "DATA AT RISK: the local copy was purged and the dest copy is not what was verified");
    } else {
        tracing::warn!(path = %file.path, problem = problem.as_str(), detail = %detail, "verify found a problem");
    }
    Ok(Finding {
        path: file.path.clone(),
        problem,
        detail,
        data_at_risk,
        recorded,
    })
}

/// What is wrong with a file, if anything, and whether a good local copy is there to copy
/// again.
async fn check_one(
    store: &dyn Store,
    source: &Arc<SourceTree>,
    file: &AtDest,
    deep: bool,
) -> (Option<(Problem, String)>, bool) {
    let dest = match store.inspect(&file.dest_key, deep).await {
        Ok(found) => check_dest(file, found),
        Err(e) => Some((
            Problem::CheckFailed,
            format!("cannot check the dest object: {e}"),
        )),
    };
    if file.purged {
        return (dest, false);
    }
    match check_local(source, file, deep).await {
        Local::Good => (dest, true),
        Local::Gone => (dest, false),
        // A changed local copy is what is recorded; the dest object then stays as it is.
        Local::Bad(problem, detail) => (Some((problem, detail)), false),
    }
}

fn check_dest(file: &AtDest, found: Option<ObjectFacts>) -> Option<(Problem, String)> {
    let Some(found) = found else {
        return Some((
            Problem::DestMissing,
            format!("the dest object {} is missing", file.dest_key),
        ));
    };
    if found.size != file.size {
        return Some((
            Problem::DestSize,
            format!(
                "the dest object {} has {} bytes, the manifest {}",
                file.dest_key, found.size, file.size
            ),
        ));
    }
    let expected = file.sha256.as_deref()?;
    let (seen, how) = match (&found.read_sha256, &found.recorded_sha256) {
        (Some(read), _) => (read, "read back"),
        (None, Some(recorded)) => (recorded, "recorded on it"),
        (None, None) => return None,
    };
    (seen != expected).then(|| {
        (
            Problem::DestHash,
            format!(
                "the dest object {} has SHA-256 {seen} ({how}), the manifest {expected}",
                file.dest_key
            ),
        )
    })
}

enum Local {
    Good,
    /// No local copy (and no purge recorded): the next scan records it.
    Gone,
    Bad(Problem, String),
}

async fn check_local(source: &Arc<SourceTree>, file: &AtDest, deep: bool) -> Local {
    let attrs = match source.stat_at(Path::new(&file.path)) {
        Ok(st) => Attrs::from_stat(&st),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Local::Gone,
        Err(e) => {
            return Local::Bad(
                Problem::CheckFailed,
                format!("cannot stat the local copy: {e}"),
            )
        }
    };
    if attrs.size != file.size || attrs.mtime_ns != file.mtime_ns {
        return Local::Bad(
            Problem::LocalChanged,
            format!(
                "the local copy changed after it was verified (now {} bytes, mtime {} ns; verified {} bytes, mtime {} ns)",
                attrs.size, attrs.mtime_ns, file.size, file.mtime_ns
            ),
        );
    }
    if !deep {
        return Local::Good;
    }
    let (tree, rel) = (source.clone(), file.path.clone());
    let hashed = tokio::task::spawn_blocking(move || {
        let opened = tree.open_file(&rel)?;
        crate::util::sha256_of(&opened.file)
    })
    .await;
    match hashed {
        Ok(Ok((_, sha))) if Some(&sha) == file.sha256.as_ref() => Local::Good,
        Ok(Ok((_, sha))) => Local::Bad(
            Problem::LocalChanged,
            format!("the local copy's SHA-256 {sha} differs from the verified copy's"),
        ),
        Ok(Err(e)) => Local::Bad(
            Problem::CheckFailed,
            format!("cannot read the local copy: {e}"),
        ),
        Err(e) => Local::Bad(Problem::CheckFailed, e.to_string()),
    }
}
