//! Copy-up (DESIGN §6): a file that lives only at the dest (its local copy was purged) is
//! brought back to the local tree before anything changes it, so every write lands locally.
//!
//! The content is read through the store, checked against the SHA-256 the manifest recorded,
//! written to an unnamed file, given the recorded mode, owner and mtime, made durable and only
//! then linked to its name: a crash leaves either no local copy or the whole file.

use std::io::{self, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::local;
use super::rows::Rows;
use crate::manifest::{Entry, Kind};
use crate::source::SourceTree;
use crate::store::Store;

const CHUNK: u64 = 8 << 20;

/// Brings `entry`'s file back to the local tree (a no-op if a local copy appeared meanwhile).
pub fn copy_up(
    tree: &SourceTree,
    rows: &Rows,
    store: &dyn Store,
    rt: &tokio::runtime::Handle,
    entry: &Entry,
) -> io::Result<()> {
    let rel = Path::new(&entry.path);
    let _span = tracing::info_span!("copy_up", path = %entry.path).entered();
    if local::exists(tree, rel)? {
        return Ok(());
    }
    let (Some(key), Some(expected)) = (&entry.dest_key, &entry.sha256) else {
        tracing::error!("no dest copy is recorded for a file without a local copy");
        return Err(io::Error::from_raw_os_error(libc::EIO));
    };
    let parent = rel.parent().unwrap_or(Path::new(""));
    ensure_local_dirs(tree, rows, parent)?;
    let mut file = local::unnamed_file(tree, parent)?;
    let mut hasher = Sha256::new();
    let mut offset = 0;
    while offset < entry.size {
        let len = CHUNK.min(entry.size - offset);
        let data = rt
            .block_on(store.read_range(key, offset, len))
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read the dest copy back");
                io::Error::from_raw_os_error(libc::EIO)
            })?;
        if data.is_empty() {
            break;
        }
        hasher.update(&data);
        file.write_all(&data)?;
        offset += data.len() as u64;
    }
    let got = hex::encode(hasher.finalize());
    if offset != entry.size || &got != expected {
        tracing::error!(
            bytes = offset,
            expected_bytes = entry.size,
            sha256 = %got,
            expected_sha256 = %expected,
            "the dest copy does not match the manifest; not bringing it back"
        );
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    restore_attributes(&file, entry)?;
    file.sync_all()?;
    match local::link_unnamed(tree, &file, rel) {
        Ok(()) => {}
        // Someone created the local file meanwhile: theirs is the newer one.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(()),
        Err(e) => return Err(e),
    }
    local::sync_dir(tree, parent)?;
    tracing::info!(bytes = entry.size, "brought back to the local tree");
    Ok(())
}

fn restore_attributes(file: &std::fs::File, entry: &Entry) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::fchown(file, Some(entry.uid), Some(entry.gid))?;
    file.set_permissions(std::fs::Permissions::from_mode(entry.mode & 0o7777))?;
    let mtime =
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(entry.mtime_ns.max(0) as u64);
    local::set_file_times(file, local::SetTime::Keep, local::SetTime::At(mtime))
}

/// Creates the local directories above a dest-only file, with the modes and owners the
/// manifest recorded for them.
pub fn ensure_local_dirs(tree: &SourceTree, rows: &Rows, dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || local::exists(tree, dir)? {
        return Ok(());
    }
    ensure_local_dirs(tree, rows, dir.parent().unwrap_or(Path::new("")))?;
    let recorded = rows.entry(dir)?.filter(|e| e.kind == Kind::Dir);
    let mode = recorded.as_ref().map_or(0o755, |e| e.mode & 0o7777);
    match local::mkdir(tree, dir, mode) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(e) = recorded {
        local::chown(tree, dir, Some(e.uid), Some(e.gid))?;
    }
    Ok(())
}
