//! Purge (DESIGN §4.1, §7): removes the local copies of files verified at the dest, and only
//! those whose local copy still is what was verified (size and mtime; with `paranoid`, the
//! SHA-256 too). The mount keeps serving purged files from the dest.
//!
//! The purge is recorded before the local file goes, and a file that the mount opens for
//! writing meanwhile is never lost: the local copy is first renamed aside, the manifest asked
//! whether the purge still stands (an open for writing changes the row), and only then removed;
//! otherwise it is put back.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::PathFilter;
use crate::manifest::{Manifest, ManifestError, PurgeCandidate};
use crate::source::{c_rel, Attrs, SourceTree};

/// Local names starting with this are cutoverfs's own, for an instant; the mount hides them.
pub const RESERVED_PREFIX: &str = ".cutoverfs-";

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
    source: &Arc<SourceTree>,
    opts: &PurgeOptions,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<PurgeReport, ManifestError> {
    let mut report = PurgeReport::default();
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
            report.checked += 1;
            match check_local(source, &file, opts.paranoid).await {
                Err(reason) => {
                    tracing::warn!(path = %file.path, reason = %reason, "not purged");
                    report.refused.push((file.path.clone(), reason));
                }
                Ok(Local::Gone) => {
                    if opts.confirm {
                        manifest.mark_purged(&file).await?;
                    }
                    report.already_gone += 1;
                }
                Ok(Local::Matches) => {
                    if opts.confirm {
                        if let Err(reason) = purge_one(manifest, source, &file).await? {
                            report.refused.push((file.path.clone(), reason));
                            continue;
                        }
                    }
                    report.purged += 1;
                    report.purged_bytes += file.size;
                }
            }
        }
    }
    Ok(report)
}

enum Local {
    Matches,
    Gone,
}

async fn check_local(
    source: &Arc<SourceTree>,
    file: &PurgeCandidate,
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

/// Removes one local copy; Ok(Err(reason)) when it was put back instead.
async fn purge_one(
    manifest: &Manifest,
    source: &Arc<SourceTree>,
    file: &PurgeCandidate,
) -> Result<Result<(), String>, ManifestError> {
    let Some(version) = manifest.mark_purged(file).await? else {
        return Ok(Err("the file changed in the manifest meanwhile".into()));
    };
    crate::util::crash_point("purge:recorded");
    let rel = PathBuf::from(&file.path);
    let aside = aside_name(&rel);
    if let Err(e) = rename_no_replace(source, &rel, &aside) {
        manifest.unpurge(&file.path).await?;
        return Ok(Err(format!("cannot move the local copy aside: {e}")));
    }
    crate::util::crash_point("purge:set-aside");
    let unchanged = source
        .stat_at(&aside)
        .map(|st| {
            let now = Attrs::from_stat(&st);
            now.size == file.size && now.mtime_ns == file.mtime_ns
        })
        .unwrap_or(false);
    if unchanged && manifest.purge_stands(&file.path, version).await? {
        if let Err(e) = unlink(source, &aside) {
            tracing::warn!(path = %file.path, error = %e, "cannot remove the local copy set aside");
        }
        return Ok(Ok(()));
    }
    // Opened for writing (or changed) meanwhile: the local copy stays.
    match rename_no_replace(source, &aside, &rel) {
        Ok(()) => {}
        // A newer local copy is there already (brought back by the mount): ours is the old one.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            let _ = unlink(source, &aside);
        }
        Err(e) => {
            tracing::error!(path = %file.path, aside = %aside.display(), error = %e, "cannot put the local copy back; it is at the name shown")
        }
    }
    manifest.unpurge(&file.path).await?;
    Ok(Err("opened for writing or changed during the purge".into()))
}

fn aside_name(rel: &Path) -> PathBuf {
    let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    let mut aside = format!("{RESERVED_PREFIX}purge-{}-", std::process::id()).into_bytes();
    aside.extend_from_slice(name);
    let aside =
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(aside));
    match rel.parent() {
        Some(parent) => parent.join(aside),
        None => aside,
    }
}

fn rename_no_replace(tree: &SourceTree, from: &Path, to: &Path) -> io::Result<()> {
    let (from, to): (CString, CString) = (c_rel(from)?, c_rel(to)?);
    // SAFETY: two NUL-terminated relative paths and the root's descriptor.
    let rc = unsafe {
        libc::renameat2(
            tree.dir_fd(),
            from.as_ptr(),
            tree.dir_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unlink(tree: &SourceTree, rel: &Path) -> io::Result<()> {
    let c = c_rel(rel)?;
    // SAFETY: a NUL-terminated relative path and the root's descriptor.
    if unsafe { libc::unlinkat(tree.dir_fd(), c.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
