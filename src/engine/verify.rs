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
use crate::store::{CopyMismatch, ObjectFacts, Store};

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
    /// The dest object was modified or replaced since it was verified (its ETag or file stamp
    /// moved); its bytes may still be right, but nothing vouches for them.
    DestChanged,
    /// The local copy differs from what was verified.
    LocalChanged,
    /// The check itself failed (dest unreachable, unreadable file): nothing was recorded.
    CheckFailed,
}

impl Problem {
    pub fn of(mismatch: CopyMismatch) -> Problem {
        match mismatch {
            CopyMismatch::Missing => Problem::DestMissing,
            CopyMismatch::Size => Problem::DestSize,
            CopyMismatch::Hash => Problem::DestHash,
            CopyMismatch::Changed => Problem::DestChanged,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Problem::DestMissing => "dest_missing",
            Problem::DestSize => "dest_size",
            Problem::DestHash => "dest_hash",
            Problem::DestChanged => "dest_changed",
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
            .filter(|f| opts.filter.matches(&f.path) && !refused(&f.path))
            .collect();
        progress.set_totals(
            report.checked + files.len() as u64,
            report.checked_bytes + files.iter().map(|f| f.size).sum::<u64>(),
        );
        // Each file is checked, recorded and repaired inside its own future: a finding recorded
        // from the loop below would wait for a dest I/O slot held by checks the paused stream
        // no longer polls (tests/verify.rs, many broken files).
        let mut checks = futures_util::stream::iter(files)
            .map(|file| async move {
                crate::testhook::hold_point_async("verify:check", &file.path).await;
                let (problem, local_good) =
                    check_one(manifest, store.as_ref(), source, &file, opts.deep).await;
                let finding = match problem {
                    None => None,
                    Some((problem, detail)) => Some(
                        settle(manifest, store.as_ref(), &file, problem, detail, local_good).await,
                    ),
                };
                (file, finding)
            })
            .buffer_unordered(opts.concurrency.max(1));
        while let Some(Some((file, finding))) = super::unless_stopped(stop, checks.next()).await {
            report.checked += 1;
            report.checked_bytes += file.size;
            report.dest_only += u64::from(file.purged);
            progress.file_done(file.size);
            match finding {
                None => report.ok += 1,
                Some(finding) => report.findings.push(finding?),
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
pub(crate) async fn remove_bad_copy(manifest: &Manifest, store: &dyn Store, file: &AtDest) {
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

/// A row whose path may not be acted on (`manifest::refused_path`): said, and left alone.
pub(crate) fn refused(path: &str) -> bool {
    match crate::manifest::refused_path(path) {
        Some(why) => {
            tracing::error!("{why}; left alone");
            true
        }
        None => false,
    }
}

/// Records a finding and, where a good local copy is there to copy again, removes the broken
/// dest object of ours.
async fn settle(
    manifest: &Manifest,
    store: &dyn Store,
    file: &AtDest,
    problem: Problem,
    detail: String,
    local_good: bool,
) -> Result<Finding, ManifestError> {
    let finding = record(manifest, file, problem, detail).await?;
    let broken = matches!(
        problem,
        Problem::DestHash | Problem::DestSize | Problem::DestChanged
    );
    if finding.recorded && local_good && broken {
        remove_bad_copy(manifest, store, file).await;
    }
    Ok(finding)
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
    manifest: &Manifest,
    store: &dyn Store,
    source: &Arc<SourceTree>,
    file: &AtDest,
    deep: bool,
) -> (Option<(Problem, String)>, bool) {
    let dest = check_dest_copy(manifest, store, file, deep).await.err();
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

/// Checks the dest copy of a verified file against what was recorded when it was verified:
/// its size and the hash recorded on it (with `deep`, the hash of its bytes read back), and its
/// ETag or file stamp. A copy whose stamp moved is read back before it is called changed: when
/// its bytes are still those verified (a dest restored from a backup, a `touch` at the dest),
/// the new stamp is recorded and the copy is good.
pub(crate) async fn check_dest_copy(
    manifest: &Manifest,
    store: &dyn Store,
    file: &AtDest,
    deep: bool,
) -> Result<(), (Problem, String)> {
    let inspect = |deep| async move {
        store.inspect(&file.dest_key, deep).await.map_err(|e| {
            (
                Problem::CheckFailed,
                format!("cannot check the dest object: {e}"),
            )
        })
    };
    let mut found = inspect(deep).await?;
    let mut mismatch = ObjectFacts::compare(found.as_ref(), &file.recorded_copy());
    if !deep
        && mismatch
            .as_ref()
            .is_some_and(|(m, _)| *m == CopyMismatch::Changed)
    {
        found = inspect(true).await?;
        mismatch = ObjectFacts::compare(found.as_ref(), &file.recorded_copy());
    }
    match (mismatch, found) {
        (None, _) => Ok(()),
        (Some((CopyMismatch::Changed, detail)), Some(found)) if found.read_sha256.is_some() => {
            // Read back and hashed right: only the stamp is new.
            tracing::info!(path = %file.path, %detail, "dest copy re-read and intact; its new stamp is recorded");
            if let Err(e) = manifest.restamp(file, found.etag.as_deref()).await {
                tracing::warn!(path = %file.path, error = %e, "cannot record the new stamp");
            }
            Ok(())
        }
        (Some((mismatch, detail)), _) => Err((Problem::of(mismatch), detail)),
    }
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
