//! Purge (DESIGN §4.1, §7): removes the local copies of files verified at the dest, and only
//! those whose local copy still is what was verified (size and mtime; with `paranoid`, the
//! SHA-256 too). The mount keeps serving purged files from the dest.
//!
//! The purge is recorded before the local file goes, and a file that the mount opens for
//! writing meanwhile is never lost: the local copy is first renamed aside, the manifest asked
//! whether the purge still stands (an open for writing changes the row), the dest copy
//! confirmed as recorded (`verify::check_dest_copy`: size, hash and ETag or file stamp; re-read
//! with `paranoid`), and only then removed; otherwise it is put back. A "verified" recorded long
//! ago is never trusted on its own: the dest copy may have been lost or damaged since.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::verify::{check_dest_copy, remove_bad_copy, Problem};
use super::PathFilter;
use crate::manifest::{AtDest, Manifest, ManifestError, DATA_AT_RISK};
use crate::source::{Attrs, SourceTree};
use crate::store::Store;

/// A purge sets a local copy aside as `.cutoverfs-purge-PID-NAME` for an instant; names of that
/// form are cutoverfs's own in the local tree (nothing else is reserved).
const SET_ASIDE_PREFIX: &str = ".cutoverfs-purge-";

/// The purge's process id if `name` has the form of a set-aside name.
pub fn set_aside_pid(name: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(SET_ASIDE_PREFIX.as_bytes())?;
    let dash = rest.iter().position(|b| *b == b'-')?;
    std::str::from_utf8(&rest[..dash]).ok()?.parse().ok()
}

/// A copy a purge running on this machine has set aside right now: not part of the tree (the
/// mount hides it, the scan skips it). One whose purge is gone is a file like any other, and
/// the scan reports it.
pub fn set_aside_in_flight(name: &[u8]) -> bool {
    set_aside_pid(name).is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

#[derive(Debug, Clone, Default)]
pub struct PurgeOptions {
    pub filter: PathFilter,
    pub paranoid: bool,
    /// false: only report what would be purged.
    pub confirm: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PurgeReport {
    /// Verified files looked at.
    pub checked: u64,
    /// Local copies removed (or that would be, in a dry run).
    pub purged: u64,
    pub purged_bytes: u64,
    /// Verified files whose local copy was already gone (recorded as purged).
    pub already_gone: u64,
    /// Files left alone, with the reason.
    pub refused: Vec<(String, String)>,
}

pub async fn purge(
    manifest: &Manifest,
    store: &dyn Store,
    source: &Arc<SourceTree>,
    opts: &PurgeOptions,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<PurgeReport, ManifestError> {
    let mut report = PurgeReport::default();
    if opts.confirm {
        finish_interrupted(manifest, source).await?;
    }
    let mut after = String::new();
    loop {
        let page = manifest.purge_candidates(&after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.path.clone();
        for file in page {
            if *stop.borrow() {
                return Ok(report);
            }
            if !opts.filter.matches(&file.path) {
                continue;
            }
            if let Some(why) = crate::manifest::refused_path(&file.path) {
                tracing::error!("{why}; not purged");
                report.refused.push((file.path.clone(), why));
                continue;
            }
            report.checked += 1;
            let Some(outcome) =
                super::unless_stopped(stop, purge_file(manifest, store, source, &file, opts)).await
            else {
                // Stopped mid-file: what this process set aside goes back, as after a crash.
                finish_interrupted_by(manifest, source, Whose::ThisProcess).await?;
                return Ok(report);
            };
            let outcome = outcome?;
            match outcome {
                Purged::Refused(reason) => {
                    tracing::warn!(path = %file.path, reason = %reason, "not purged");
                    report.refused.push((file.path.clone(), reason));
                }
                Purged::AlreadyGone => report.already_gone += 1,
                Purged::Removed => {
                    report.purged += 1;
                    report.purged_bytes += file.size;
                }
            }
        }
    }
    Ok(report)
}

/// What became of one candidate (in a dry run: what would).
enum Purged {
    Removed,
    AlreadyGone,
    Refused(String),
}

async fn purge_file(
    manifest: &Manifest,
    store: &dyn Store,
    source: &Arc<SourceTree>,
    file: &AtDest,
    opts: &PurgeOptions,
) -> Result<Purged, ManifestError> {
    let local = match check_local(source, file, opts.paranoid).await {
        Ok(local) => local,
        Err(reason) => return Ok(Purged::Refused(reason)),
    };
    match local {
        Local::Gone => {
            // Nothing to delete, but "purged" is only recorded for a dest copy that is there.
            if let Err(refusal) = check_dest(manifest, store, file, opts).await? {
                tracing::error!(path = %file.path, reason = %refusal,
                    "DATA AT RISK: the local copy is gone and the dest copy is not what was verified");
                return Ok(Purged::Refused(format!(
                    "{DATA_AT_RISK}: no local copy, and {refusal}"
                )));
            }
            if opts.confirm {
                manifest.mark_purged(file, None).await?;
            }
            Ok(Purged::AlreadyGone)
        }
        Local::Matches if opts.confirm => purge_one(manifest, store, source, file, opts).await,
        Local::Matches => Ok(match check_dest(manifest, store, file, opts).await? {
            Ok(()) => Purged::Removed,
            Err(refusal) => Purged::Refused(refusal),
        }),
    }
}

/// Confirms the dest copy is the one verified (`verify::check_dest_copy`; re-read with
/// `--paranoid`); Ok(Err(reason)) when it is not, after `refuse_dest` recorded it.
async fn check_dest(
    manifest: &Manifest,
    store: &dyn Store,
    file: &AtDest,
    opts: &PurgeOptions,
) -> Result<Result<(), String>, ManifestError> {
    match check_dest_copy(manifest, store, file, opts.paranoid).await {
        Ok(()) => Ok(Ok(())),
        Err(problem) => refuse_dest(manifest, store, file, opts, problem)
            .await
            .map(Err),
    }
}

/// A dest copy found missing or different: with `--confirm` the file goes back to `pending` so
/// the next sweep copies it again, and a broken object of ours is removed for that copy (the
/// local copy, just checked, is good). A check that could not be made changes nothing.
/// Returns the reason to report.
async fn refuse_dest(
    manifest: &Manifest,
    store: &dyn Store,
    file: &AtDest,
    opts: &PurgeOptions,
    (problem, detail): (Problem, String),
) -> Result<String, ManifestError> {
    if problem == Problem::CheckFailed || !opts.confirm {
        return Ok(detail);
    }
    let finding = format!("purge found {detail}");
    if manifest
        .dest_copy_changed(&file.path, file.version, &finding)
        .await?
    {
        remove_bad_copy(manifest, store, file).await;
    }
    Ok(format!(
        "{detail}; the file is pending again, its local copy kept"
    ))
}

enum Local {
    Matches,
    Gone,
}

async fn check_local(
    source: &Arc<SourceTree>,
    file: &AtDest,
    paranoid: bool,
) -> Result<Local, String> {
    let attrs = match source.stat_at(Path::new(&file.path)) {
        Ok(st) => Attrs::from_stat(&st),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Local::Gone),
        Err(e) => return Err(format!("cannot stat the local copy: {e}")),
    };
    if attrs.mode & libc::S_IFMT != libc::S_IFREG {
        return Err("the local path is no longer a regular file".into());
    }
    if attrs.nlink > 1 {
        // Its names would become separate files (each served from its own dest copy): a write
        // through one would no longer show through the others.
        return Err(format!(
            "the local copy has {} names (hard links); it is kept while it has more than one",
            attrs.nlink
        ));
    }
    if attrs.size != file.size || attrs.mtime_ns != file.mtime_ns {
        return Err(format!(
            "the local copy changed after it was verified (now {} bytes, mtime {} ns; verified {} bytes, mtime {} ns)",
            attrs.size, attrs.mtime_ns, file.size, file.mtime_ns
        ));
    }
    if paranoid {
        let (tree, rel) = (source.clone(), file.path.clone());
        let hashed = tokio::task::spawn_blocking(move || {
            let opened = tree.open_file(&rel)?;
            crate::util::sha256_of(&opened.file)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read the local copy: {e}"))?;
        if Some(&hashed.1) != file.sha256.as_ref() {
            return Err(format!(
                "the local copy's SHA-256 {} differs from the verified copy's",
                hashed.1
            ));
        }
    }
    Ok(Local::Matches)
}

/// Removes one local copy; Purged::Refused when it was put back instead. The copy is set aside
/// first (no writer can reach it under that name), then it must still be what was verified,
/// the purge must still stand in the manifest, and the dest copy must be confirmed, right
/// before the local copy goes.
async fn purge_one(
    manifest: &Manifest,
    store: &dyn Store,
    source: &Arc<SourceTree>,
    file: &AtDest,
    opts: &PurgeOptions,
) -> Result<Purged, ManifestError> {
    let rel = PathBuf::from(&file.path);
    let aside = Aside::new(&rel);
    let Some(version) = manifest.mark_purged(file, Some(&aside.to_text())).await? else {
        return Ok(Purged::Refused(
            "the file changed in the manifest meanwhile".into(),
        ));
    };
    crate::testhook::crash_point("purge:recorded");
    let aside = aside.rel;
    if let Err(e) = rename_no_replace(source, &rel, &aside) {
        manifest.unpurge(&file.path).await?;
        return Ok(Purged::Refused(format!(
            "cannot move the local copy aside: {e}"
        )));
    }
    crate::testhook::crash_point("purge:set-aside");
    crate::testhook::hold_point_async("purge:set-aside", &file.path).await;
    let unchanged = source
        .stat_at(&aside)
        .map(|st| {
            let now = Attrs::from_stat(&st);
            now.size == file.size && now.mtime_ns == file.mtime_ns
        })
        .unwrap_or(false);
    if !unchanged || !manifest.purge_stands(&file.path, version).await? {
        put_back(source, &file.path, &rel, &aside);
        manifest.unpurge(&file.path).await?;
        return Ok(Purged::Refused(
            "opened for writing or changed during the purge".into(),
        ));
    }
    let marked = AtDest {
        version,
        ..file.clone()
    };
    match check_dest_copy(manifest, store, &marked, opts.paranoid).await {
        Ok(()) => {
            if let Err(e) = unlink(source, &aside) {
                tracing::warn!(path = %file.path, error = %e, "cannot remove the local copy set aside");
            }
            crate::testhook::crash_point("purge:removed");
            manifest.purge_done(&file.path).await?;
            Ok(Purged::Removed)
        }
        Err(problem) => {
            // The local copy is back under its name before the file is pending again.
            put_back(source, &file.path, &rel, &aside);
            manifest.unpurge(&file.path).await?;
            let reason = refuse_dest(manifest, store, &marked, opts, problem).await?;
            Ok(Purged::Refused(reason))
        }
    }
}

/// Puts a local copy set aside back at its name, unless a newer one is there already (brought
/// back by the mount): then ours is the old one.
fn put_back(source: &SourceTree, path: &str, rel: &Path, aside: &Path) {
    match rename_no_replace(source, aside, rel) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            let _ = unlink(source, aside);
        }
        Err(e) => {
            tracing::error!(path, aside = %aside.display(), error = %e, "cannot put the local copy back; it is at the name shown")
        }
    }
}

/// Where a purge sets a local copy aside while it confirms the dest copy, and which process did:
/// recorded in the manifest before the rename (`purge_aside`), so that what a crash leaves is
/// finished by the next purge or mount (`finish_interrupted`).
struct Aside {
    host: String,
    pid: u32,
    rel: PathBuf,
}

impl Aside {
    fn new(rel: &Path) -> Aside {
        let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or_default();
        let pid = std::process::id();
        let mut aside = format!("{SET_ASIDE_PREFIX}{pid}-").into_bytes();
        aside.extend_from_slice(name);
        let aside =
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(aside));
        Aside {
            host: crate::util::hostname(),
            pid,
            rel: match rel.parent() {
                Some(parent) => parent.join(aside),
                None => aside,
            },
        }
    }

    /// `HOST<TAB>PID<TAB>PATH`, the path last (manifest paths are UTF-8 and may hold a tab).
    fn to_text(&self) -> String {
        format!("{}\t{}\t{}", self.host, self.pid, self.rel.display())
    }

    fn from_text(text: &str) -> Option<Aside> {
        let mut parts = text.splitn(3, '\t');
        let host = parts.next()?.to_string();
        let pid = parts.next()?.parse().ok()?;
        let rel = PathBuf::from(parts.next()?);
        Some(Aside { host, pid, rel })
    }

    /// Whether the purge that set it aside may still be running (on another host it may).
    fn owner_may_run(&self) -> bool {
        self.host != crate::util::hostname()
            || self.pid == std::process::id()
            || Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    fn by_this_process(&self) -> bool {
        self.host == crate::util::hostname() && self.pid == std::process::id()
    }
}

/// What a run did about purges a crash interrupted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Local copies kept (put back where they had been set aside): a later purge takes them.
    pub restored: u64,
    /// Purges that had removed the local copy: only the record was left to finish.
    pub completed: u64,
}

/// Finishes or undoes every purge of this host that a crash interrupted (recorded, maybe set
/// aside, never done). A set-aside copy goes back to its name (or, if a newer copy is there
/// already, the stale one goes) and the file is not purged; a copy already removed leaves only
/// the record to clear. Purges of running processes and of other hosts are left alone. Runs
/// at the start of every purge and mount.
pub async fn finish_interrupted(
    manifest: &Manifest,
    source: &SourceTree,
) -> Result<Finished, ManifestError> {
    finish_interrupted_by(manifest, source, Whose::Ended).await
}

/// Whose interrupted purges to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whose {
    /// Of processes of this host that ended (crashed) before finishing them.
    Ended,
    /// Of this process, which was stopped in the middle of one.
    ThisProcess,
}

async fn finish_interrupted_by(
    manifest: &Manifest,
    source: &SourceTree,
    whose: Whose,
) -> Result<Finished, ManifestError> {
    let mut done = Finished::default();
    for (path, text) in manifest.interrupted_purges().await? {
        if super::verify::refused(&path) {
            continue;
        }
        let Some(aside) = Aside::from_text(&text) else {
            tracing::warn!(path, aside = text, "unreadable purge record; left as it is");
            continue;
        };
        let ours = match whose {
            Whose::Ended => !aside.owner_may_run(),
            Whose::ThisProcess => aside.by_this_process(),
        };
        if !ours {
            continue;
        }
        let rel = PathBuf::from(&path);
        let set_aside = source.stat_at(&aside.rel).is_ok();
        let local = source.stat_at(&rel).is_ok();
        if set_aside {
            put_back(source, &path, &rel, &aside.rel);
        }
        if set_aside || local {
            manifest.unpurge(&path).await?;
            done.restored += 1;
        } else {
            manifest.purge_done(&path).await?;
            done.completed += 1;
        }
    }
    if done != Finished::default() {
        tracing::info!(
            restored = done.restored,
            completed = done.completed,
            "finished purges a crash interrupted"
        );
    }
    Ok(done)
}

fn rename_no_replace(tree: &SourceTree, from: &Path, to: &Path) -> io::Result<()> {
    tree.rename(from, to, libc::RENAME_NOREPLACE)
}

fn unlink(tree: &SourceTree, rel: &Path) -> io::Result<()> {
    tree.unlink(rel)
}
