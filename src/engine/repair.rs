//! Repairs what a crash between the steps of a removal or rename left behind (DESIGN §4.7).
//!
//! The mount records a removal before it touches the local tree, and deletes the dest object
//! after. So a row marked `deleted` that still names an object of ours means one of two
//! things: the local file is still there (the removal never happened: the row stands again),
//! or it is gone (the removal happened: the object is deleted now). Runs before the mount goes
//! live and before a sweep, when nothing else changes the tree.

use std::path::Path;
use std::sync::Arc;

use crate::manifest::{Leftover, Manifest, ManifestError};
use crate::source::SourceTree;
use crate::store::{Removal, Store};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repaired {
    /// Removals that never reached the local tree: the rows stand again.
    pub restored: u64,
    /// Dest objects of removed files, deleted now.
    pub deleted: u64,
    /// Objects left where they are: not ours, or the dest could not be reached (retried next
    /// time).
    pub left: u64,
}

pub async fn repair_removals(
    manifest: &Manifest,
    source: &Arc<SourceTree>,
    store: &Arc<dyn Store>,
) -> Result<Repaired, ManifestError> {
    let mut done = Repaired::default();
    let writer = manifest.id().to_string();
    for leftover in manifest.leftovers().await? {
        if super::verify::refused(&leftover.path) || super::verify::refused(&leftover.dest_key) {
            continue;
        }
        let local = source.stat_at(Path::new(&leftover.path));
        if local.is_ok() {
            if manifest.undelete(&leftover.path, leftover.version).await? {
                done.restored += 1;
            }
            continue;
        }
        match store
            .delete_owned(&leftover.dest_key, &leftover.owned_sha256, &writer)
            .await
        {
            Ok(removal) => {
                settle(manifest, &leftover).await?;
                match removal {
                    Removal::Deleted => done.deleted += 1,
                    Removal::Absent => {}
                    Removal::NotOurs => done.left += 1,
                }
            }
            Err(e) => {
                tracing::warn!(path = %leftover.path, key = %leftover.dest_key, error = %e, "cannot delete the dest object of a removed file; retried next time");
                done.left += 1;
            }
        }
    }
    if done != Repaired::default() {
        tracing::info!(
            restored = done.restored,
            deleted = done.deleted,
            left = done.left,
            "repaired removals interrupted by a crash"
        );
    }
    Ok(done)
}

/// While the mount is live: deletes the dest objects of removed files whose local copy is gone
/// (left by a copy that was published after its file was removed, or by a dest that was down at
/// the removal). A row whose local file exists is left to the removal in progress, or to the
/// next start. If the application re-created the file while its old object was being deleted,
/// the new file is copied again.
pub async fn clean_leftovers_live(
    manifest: &Manifest,
    source: &Arc<SourceTree>,
    store: &Arc<dyn Store>,
) -> Result<u64, ManifestError> {
    let writer = manifest.id().to_string();
    let mut deleted = 0;
    for leftover in manifest.leftovers().await? {
        if super::verify::refused(&leftover.path) || super::verify::refused(&leftover.dest_key) {
            continue;
        }
        if source.stat_at(Path::new(&leftover.path)).is_ok() {
            continue;
        }
        let removal = store
            .delete_owned(&leftover.dest_key, &leftover.owned_sha256, &writer)
            .await;
        match removal {
            Ok(removal) => {
                if removal == Removal::Deleted {
                    deleted += 1;
                }
                if !settle(manifest, &leftover).await? {
                    continue;
                }
                if manifest.recopy_if_recreated(&leftover.path).await? {
                    tracing::info!(path = %leftover.path, "re-created while its old object was deleted; copying it again");
                }
            }
            Err(e) => {
                tracing::debug!(path = %leftover.path, error = %e, "cannot delete a removed file's dest object yet");
            }
        }
    }
    if deleted > 0 {
        tracing::info!(objects = deleted, "deleted dest objects of removed files");
    }
    Ok(deleted)
}

/// Records what deleting a leftover's object did; false when the leftover stays recorded: a
/// copy in flight when the file was removed may still land at the key after this deletion
/// (`Leftover::may_still_land`: one that finished after its process was killed, one an S3
/// server completed for a client that died), so the key is looked at again until then.
pub async fn settle(manifest: &Manifest, leftover: &Leftover) -> Result<bool, ManifestError> {
    if leftover.may_still_land() {
        return Ok(false);
    }
    manifest.leftover_cleared(leftover).await?;
    Ok(true)
}
