//! Rollback (DESIGN §1.8, §4, §7): takes files back to their local copies. Deletes only dest
//! objects cutoverfs wrote (§4.2), never touches a local file (§4.1), and holds the files back
//! from sweeps until an operator runs `cutoverfs sweep` again.
//!
//! The local copy becomes the only copy again, so before anything changes it must still be
//! what was copied: present, same size and mtime, and the same SHA-256 read afresh. Then, per
//! file (§4.7): the rollback is recorded (the mount serves the local copy from then on), the
//! object is deleted, and the row forgets the object. A crash between the steps leaves a row
//! that still names its object; the next run of `rollback`, whatever it selects, finishes it.

use std::path::Path;
use std::sync::Arc;

use super::PathFilter;
use crate::manifest::{Manifest, RollbackRow, RollbackSelector, State};
use crate::source::{Attrs, SourceTree};
use crate::store::{Removal, Store};

#[derive(Debug, Clone)]
pub struct RollbackOptions {
    pub selector: RollbackSelector,
    /// Narrows the selection down (`--path`); unfinished rollbacks are finished whatever it says.
    pub filter: PathFilter,
    /// How the operator chose the files, for the audit trail ("--batch 3").
    pub label: String,
    /// false: only report what would be done.
    pub confirm: bool,
}

/// What happened (or would happen) to one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Rolled back; the object of ours at its key is deleted.
    Deleted,
    /// Rolled back; there was no object of ours to delete (none, or one cutoverfs did not
    /// write, which stays).
    Reset,
    /// Rolled back; the object at its key turned out not to be cutoverfs's and was left.
    LeftNotOurs,
    /// Refused, nothing changed for this file.
    Refused,
    /// Recorded as rolled back, but the object could not be deleted yet: run again.
    Unfinished,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FileOutcome {
    pub path: String,
    pub action: Action,
    /// The dest key concerned, or the reason of a refusal or error.
    pub detail: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RollbackReport {
    /// Files the selector picked (unfinished rollbacks included).
    pub selected: u64,
    /// Files rolled back (or that would be).
    pub rolled_back: u64,
    pub rolled_back_bytes: u64,
    /// Dest objects of cutoverfs deleted (or that would be).
    pub objects_deleted: u64,
    /// Rollbacks a crash or an unreachable dest had left half done, finished now.
    pub resumed: u64,
    /// Already rolled back earlier, nothing left to do.
    pub already: u64,
    /// Nothing to roll back: removed through the mount, unsupported, or missing with nothing
    /// at the dest.
    pub nothing_to_do: u64,
    /// Per file, in path order: every file rolled back, refused or left unfinished.
    pub files: Vec<FileOutcome>,
}

impl RollbackReport {
    pub fn count(&self, action: &Action) -> usize {
        self.files.iter().filter(|f| &f.action == action).count()
    }
}

/// What to do with one row.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Already,
    NothingToDo,
    Refuse(String),
    RollBack { check_local: bool, delete: bool },
}

/// The rule, per row (unit-tested below).
fn decide(row: &RollbackRow, now_ms: i64) -> Decision {
    if row.unfinished() {
        return Decision::RollBack {
            check_local: true,
            delete: true,
        };
    }
    if row.rolled_back {
        return Decision::Already;
    }
    match row.state {
        State::Deleted | State::Unsupported => return Decision::NothingToDo,
        _ if row.purged => {
            return Decision::Refuse(
                "the local copy was purged: the dest holds the only copy".into(),
            )
        }
        State::Missing if row.has_owned_object() => {
            return Decision::Refuse(
                "the local copy is gone: the dest object is the only copy".into(),
            )
        }
        State::Missing => return Decision::NothingToDo,
        State::Copying if row.lease_expires_at.is_some_and(|t| t >= now_ms) => {
            return Decision::Refuse(format!(
                "being copied right now (lease of {}); run again when it is done",
                row.lease_owner.as_deref().unwrap_or("another node")
            ))
        }
        _ => {}
    }
    // A verified file was served from the dest: the local copy takes over and must be right.
    // Any other file is served locally already; it is checked only before an object goes.
    let serving_from_dest = matches!(row.state, State::Verified | State::Copied);
    Decision::RollBack {
        check_local: serving_from_dest || row.has_owned_object(),
        delete: row.has_owned_object(),
    }
}

pub async fn rollback(
    manifest: &Manifest,
    source: &Arc<SourceTree>,
    store: &Arc<dyn Store>,
    opts: &RollbackOptions,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<RollbackReport> {
    let mut report = RollbackReport::default();
    let writer = manifest.id().to_string();
    let mut after = String::new();
    loop {
        let page = manifest
            .rollback_candidates(&opts.selector, &after, 500)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.path.clone();
        for row in page {
            if *stop.borrow() {
                return Ok(report);
            }
            if !row.unfinished() && !opts.filter.matches(&row.path) {
                continue;
            }
            report.selected += 1;
            if let Some(why) = crate::manifest::refused_path(&row.path) {
                refuse(&mut report, &row.path, why);
                continue;
            }
            let (check_local, delete) = match decide(&row, crate::manifest::now_ms()) {
                Decision::Already => {
                    report.already += 1;
                    continue;
                }
                Decision::NothingToDo => {
                    report.nothing_to_do += 1;
                    continue;
                }
                Decision::Refuse(reason) => {
                    refuse(&mut report, &row.path, reason);
                    continue;
                }
                Decision::RollBack {
                    check_local,
                    delete,
                } => (check_local, delete),
            };
            if check_local {
                let Some(checked) =
                    super::unless_stopped(stop, check_local_copy(source, &row)).await
                else {
                    return Ok(report);
                };
                if let Err(reason) = checked {
                    refuse(&mut report, &row.path, reason);
                    continue;
                }
            }
            let key = match (delete, &row.dest_key) {
                (false, _) => None,
                (true, Some(key)) => Some(key.clone()),
                (true, None) => match store.key_for(&row.path) {
                    Ok(key) => Some(key),
                    Err(why) => {
                        refuse(&mut report, &row.path, format!("no dest key: {why}"));
                        continue;
                    }
                },
            };
            let outcome = if opts.confirm {
                let one = async {
                    crate::testhook::hold_point_async("rollback:file", &row.path).await;
                    roll_back_one(manifest, store, &writer, &row, key.as_deref(), opts).await
                };
                // Stopped mid-file, the rollback is left unfinished, as a crash would leave it:
                // the next run finishes it.
                let Some(one) = super::unless_stopped(stop, one).await else {
                    return Ok(report);
                };
                match one? {
                    Some(outcome) => outcome,
                    None => {
                        refuse(
                            &mut report,
                            &row.path,
                            "the file changed in the manifest meanwhile; run again".into(),
                        );
                        continue;
                    }
                }
            } else {
                FileOutcome {
                    path: row.path.clone(),
                    action: if key.is_some() {
                        Action::Deleted
                    } else {
                        Action::Reset
                    },
                    detail: key.clone().unwrap_or_default(),
                }
            };
            if outcome.action == Action::Deleted {
                report.objects_deleted += 1;
            }
            if row.unfinished() {
                report.resumed += 1;
            }
            if outcome.action != Action::Unfinished {
                report.rolled_back += 1;
                report.rolled_back_bytes += row.size;
            }
            report.files.push(outcome);
        }
    }
    Ok(report)
}

fn refuse(report: &mut RollbackReport, path: &str, reason: String) {
    tracing::warn!(path, reason = %reason, "not rolled back");
    report.files.push(FileOutcome {
        path: path.to_string(),
        action: Action::Refused,
        detail: reason,
    });
}

/// Records, deletes, forgets — in that order, so a crash anywhere leaves a row that still
/// knows its object. None when the row changed since it was read.
async fn roll_back_one(
    manifest: &Manifest,
    store: &Arc<dyn Store>,
    writer: &str,
    row: &RollbackRow,
    key: Option<&str>,
    opts: &RollbackOptions,
) -> anyhow::Result<Option<FileOutcome>> {
    let reason = format!("rolled back ({})", opts.label);
    if !row.rolled_back && !manifest.mark_rolled_back(row, key, &reason).await? {
        return Ok(None);
    }
    crate::testhook::crash_point("rollback:recorded");
    let outcome = |action, detail: String| {
        Some(FileOutcome {
            path: row.path.clone(),
            action,
            detail,
        })
    };
    let Some(key) = key else {
        return Ok(outcome(Action::Reset, String::new()));
    };
    let removal = match store.delete_owned(key, &row.owned_sha256, writer).await {
        Ok(removal) => removal,
        Err(e) => {
            tracing::warn!(path = %row.path, key, error = %e, "cannot delete the dest object; the rollback is finished by the next run");
            return Ok(outcome(
                Action::Unfinished,
                format!("cannot delete the dest object {key}: {e}; run rollback again to finish"),
            ));
        }
    };
    crate::testhook::crash_point("rollback:deleted");
    let (action, why) = match removal {
        Removal::Deleted => (Action::Deleted, "dest object deleted"),
        Removal::Absent => (Action::Reset, "no object at the dest"),
        Removal::NotOurs => (
            Action::LeftNotOurs,
            "the object at the dest is not cutoverfs's and was left",
        ),
    };
    manifest
        .finish_rollback(&row.path, &format!("{reason}: {why}"))
        .await?;
    Ok(outcome(action, key.to_string()))
}

/// The local copy exists and is what the manifest recorded: size, mtime and, when the
/// manifest knows it, the SHA-256 of its bytes read now.
async fn check_local_copy(source: &Arc<SourceTree>, row: &RollbackRow) -> Result<(), String> {
    let attrs = match source.stat_at(Path::new(&row.path)) {
        Ok(st) => Attrs::from_stat(&st),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Err("there is no local copy: the dest object is the only copy".into())
        }
        Err(e) => return Err(format!("cannot stat the local copy: {e}")),
    };
    if attrs.mode & libc::S_IFMT != libc::S_IFREG {
        return Err("the local path is no longer a regular file".into());
    }
    if attrs.size != row.size || attrs.mtime_ns != row.mtime_ns {
        return Err(format!(
            "the local copy changed since it was copied (now {} bytes, mtime {} ns; recorded {} bytes, mtime {} ns)",
            attrs.size, attrs.mtime_ns, row.size, row.mtime_ns
        ));
    }
    let Some(expected) = row.sha256.clone() else {
        return Ok(());
    };
    let (tree, rel) = (source.clone(), row.path.clone());
    let (size, hashed) = tokio::task::spawn_blocking(move || {
        let opened = tree.open_file(&rel)?;
        crate::util::sha256_of(&opened.file)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot read the local copy: {e}"))?;
    if hashed != expected || size != row.size {
        return Err(format!(
            "the local copy's SHA-256 {hashed} differs from the copied one {expected}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: State) -> RollbackRow {
        RollbackRow {
            path: "a/b.jpg".into(),
            state,
            size: 3,
            mtime_ns: 1,
            sha256: Some("aa".into()),
            dest_key: Some("a/b.jpg".into()),
            owned_sha256: vec!["aa".into()],
            purged: false,
            version: 4,
            lease_owner: None,
            lease_expires_at: None,
            rolled_back: false,
        }
    }

    #[test]
    fn a_verified_file_is_checked_and_its_object_deleted_unless_not_ours() {
        let both = Decision::RollBack {
            check_local: true,
            delete: true,
        };
        assert_eq!(decide(&row(State::Verified), 0), both);
        let mut foreign = row(State::Verified);
        foreign.owned_sha256.clear();
        assert_eq!(
            decide(&foreign, 0),
            Decision::RollBack {
                check_local: true,
                delete: false
            }
        );
    }

    #[test]
    fn purged_or_locally_missing_files_with_a_dest_copy_are_refused() {
        let mut purged = row(State::Verified);
        purged.purged = true;
        assert!(matches!(decide(&purged, 0), Decision::Refuse(r) if r.contains("purged")));
        assert!(
            matches!(decide(&row(State::Missing), 0), Decision::Refuse(r) if r.contains("only copy"))
        );
        let mut gone = row(State::Missing);
        gone.owned_sha256.clear();
        assert_eq!(decide(&gone, 0), Decision::NothingToDo);
    }

    #[test]
    fn a_live_copy_is_refused_and_a_dead_one_taken_over() {
        let mut copying = row(State::Copying);
        copying.lease_expires_at = Some(100);
        assert!(matches!(decide(&copying, 50), Decision::Refuse(_)));
        assert!(matches!(
            decide(&copying, 150),
            Decision::RollBack { delete: true, .. }
        ));
    }

    #[test]
    fn failed_files_without_an_object_are_only_held_back() {
        let mut failed = row(State::Failed);
        failed.owned_sha256.clear();
        assert_eq!(
            decide(&failed, 0),
            Decision::RollBack {
                check_local: false,
                delete: false
            }
        );
    }

    #[test]
    fn an_unfinished_rollback_is_finished_and_a_finished_one_left() {
        let mut unfinished = row(State::Pending);
        unfinished.rolled_back = true;
        assert!(matches!(
            decide(&unfinished, 0),
            Decision::RollBack { delete: true, .. }
        ));
        unfinished.owned_sha256.clear();
        assert_eq!(decide(&unfinished, 0), Decision::Already);
        let mut removed = row(State::Deleted);
        removed.owned_sha256.clear();
        assert_eq!(decide(&removed, 0), Decision::NothingToDo);
    }
}
