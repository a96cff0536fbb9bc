//! File states (DESIGN §3) and the one rule that maps a re-scan onto them.
//!
//! Kept free of I/O so the rule can be tested exhaustively; the SQL side only stores what
//! `after_scan` decides.

use std::fmt;
use std::str::FromStr;

/// Why a path read from the manifest may not be acted on, if it may not: a row names a place
/// below the source root, and one that is absolute or has `..`, `.` or empty components (which
/// the scan never writes, but a shared PostgreSQL manifest can be written by others) could name
/// a place outside it, or another row's place. Such rows are refused, never followed.
pub fn refused_path(path: &str) -> Option<String> {
    let why = if path.starts_with('/') {
        "it is absolute"
    } else if path.split('/').any(|c| c == "..") {
        "it has a '..' component"
    } else if path.split('/').any(|c| c == ".") {
        "it has a '.' component"
    } else if !path.is_empty() && path.split('/').any(str::is_empty) {
        "it has an empty component"
    } else if path.contains('\0') {
        "it has a NUL byte"
    } else {
        return None;
    };
    Some(format!(
        "the manifest row's path {path:?} is refused: {why}; cutoverfs never writes such a row, so it was written by something else"
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Copying,
    Copied,
    Verified,
    Failed,
    Missing,
    Conflict,
    Unsupported,
    Deleted,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Pending,
        State::Copying,
        State::Copied,
        State::Verified,
        State::Failed,
        State::Missing,
        State::Conflict,
        State::Unsupported,
        State::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Copying => "copying",
            State::Copied => "copied",
            State::Verified => "verified",
            State::Failed => "failed",
            State::Missing => "missing",
            State::Conflict => "conflict",
            State::Unsupported => "unsupported",
            State::Deleted => "deleted",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown state {s:?} in the manifest"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Special,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Special => "special",
        }
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Kind::File, Kind::Dir, Kind::Symlink, Kind::Special]
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("unknown entry kind {s:?} in the manifest"))
    }
}

/// What the scanner saw at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub link_target: Option<String>,
    /// Set when cutoverfs cannot migrate this entry, with the reason.
    pub unsupported: Option<String>,
}

/// The part of a manifest row a re-scan compares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub kind: Kind,
    pub state: State,
    pub reason: Option<String>,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub version: i64,
    /// cutoverfs wrote the object now at this path's key.
    pub dest_owned: bool,
}

/// The decision for one scanned path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanChange {
    /// Only mark the row as seen by this scan.
    Unchanged,
    /// Write the scanned attributes with this state. `fresh_copy` clears what the previous copy
    /// recorded about the content (hash, attempts, errors) because the content changed.
    Write {
        state: State,
        reason: Option<String>,
        fresh_copy: bool,
    },
}

/// The state an entry takes after a scan saw it (DESIGN §3, issue "re-scans are incremental").
pub fn after_scan(old: Option<&Recorded>, seen: &Scanned) -> ScanChange {
    let first_state = || match (&seen.unsupported, seen.kind) {
        (Some(_), _) => State::Unsupported,
        (None, Kind::Dir) => State::Verified,
        (None, _) => State::Pending,
    };
    let Some(old) = old else {
        return ScanChange::Write {
            state: first_state(),
            reason: seen.unsupported.clone(),
            fresh_copy: true,
        };
    };
    let content_changed =
        old.kind != seen.kind || old.size != seen.size || old.mtime_ns != seen.mtime_ns;
    let attrs_changed = old.mode != seen.mode || old.uid != seen.uid || old.gid != seen.gid;

    if let Some(reason) = &seen.unsupported {
        if old.state == State::Unsupported
            && old.reason.as_ref() == Some(reason)
            && !content_changed
            && !attrs_changed
        {
            return ScanChange::Unchanged;
        }
        return ScanChange::Write {
            state: State::Unsupported,
            reason: Some(reason.clone()),
            fresh_copy: true,
        };
    }
    if seen.kind == Kind::Dir {
        return if content_changed || attrs_changed || old.state != State::Verified {
            ScanChange::Write {
                state: State::Verified,
                reason: None,
                fresh_copy: false,
            }
        } else {
            ScanChange::Unchanged
        };
    }
    match old.state {
        // A worker holds it: the worker itself proves the source did not change under it (§4.4);
        // a change after that is seen by the next scan.
        State::Copying => ScanChange::Unchanged,
        // Back on disk, or now of a kind we can copy: start over. The copy recognises an object it
        // wrote before by its hash, so nothing is copied twice for nothing.
        State::Missing | State::Unsupported | State::Deleted => ScanChange::Write {
            state: State::Pending,
            reason: None,
            fresh_copy: true,
        },
        _ if content_changed => ScanChange::Write {
            state: State::Pending,
            reason: None,
            fresh_copy: true,
        },
        // Same content, new mode or owner: a copied file goes back to pending so the sweep
        // brings the attributes to the dest (it finds the content there and only re-applies
        // them, DESIGN §4.6).
        State::Verified | State::Copied if attrs_changed => ScanChange::Write {
            state: State::Pending,
            reason: None,
            fresh_copy: false,
        },
        state if attrs_changed => ScanChange::Write {
            state,
            reason: old.reason.clone(),
            fresh_copy: false,
        },
        _ => ScanChange::Unchanged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(kind: Kind, size: u64, mtime_ns: i64) -> Scanned {
        Scanned {
            path: "a/b.jpg".into(),
            kind,
            size,
            mtime_ns,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            link_target: None,
            unsupported: None,
        }
    }

    fn recorded(state: State, size: u64, mtime_ns: i64) -> Recorded {
        Recorded {
            kind: Kind::File,
            state,
            reason: None,
            size,
            mtime_ns,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            version: 3,
            dest_owned: false,
        }
    }

    #[test]
    fn new_file_is_pending_and_new_dir_is_recorded_verified() {
        assert!(matches!(
            after_scan(None, &seen(Kind::File, 1, 1)),
            ScanChange::Write {
                state: State::Pending,
                ..
            }
        ));
        assert!(matches!(
            after_scan(None, &seen(Kind::Dir, 0, 1)),
            ScanChange::Write {
                state: State::Verified,
                ..
            }
        ));
    }

    #[test]
    fn verified_file_changed_after_copy_goes_back_to_pending() {
        let old = recorded(State::Verified, 10, 5);
        assert_eq!(
            after_scan(Some(&old), &seen(Kind::File, 10, 5)),
            ScanChange::Unchanged
        );
        assert_eq!(
            after_scan(Some(&old), &seen(Kind::File, 11, 5)),
            ScanChange::Write {
                state: State::Pending,
                reason: None,
                fresh_copy: true
            }
        );
        assert_eq!(
            after_scan(Some(&old), &seen(Kind::File, 10, 6)),
            ScanChange::Write {
                state: State::Pending,
                reason: None,
                fresh_copy: true
            }
        );
    }

    #[test]
    fn a_leased_file_is_left_to_its_worker() {
        let old = recorded(State::Copying, 10, 5);
        assert_eq!(
            after_scan(Some(&old), &seen(Kind::File, 99, 99)),
            ScanChange::Unchanged
        );
    }

    #[test]
    fn a_missing_file_that_reappears_is_pending_again() {
        let old = recorded(State::Missing, 10, 5);
        assert!(matches!(
            after_scan(Some(&old), &seen(Kind::File, 10, 5)),
            ScanChange::Write {
                state: State::Pending,
                ..
            }
        ));
    }

    #[test]
    fn mode_change_of_a_copied_file_sends_it_back_without_forgetting_the_copy() {
        let old = recorded(State::Verified, 10, 5);
        let mut s = seen(Kind::File, 10, 5);
        s.mode = 0o100600;
        assert_eq!(
            after_scan(Some(&old), &s),
            ScanChange::Write {
                state: State::Pending,
                reason: None,
                fresh_copy: false
            }
        );
        let failed = recorded(State::Failed, 10, 5);
        assert_eq!(
            after_scan(Some(&failed), &s),
            ScanChange::Write {
                state: State::Failed,
                reason: None,
                fresh_copy: false
            }
        );
    }

    #[test]
    fn unsupported_is_recorded_with_reason_once() {
        let mut s = seen(Kind::Special, 0, 1);
        s.unsupported = Some("fifo".into());
        let first = after_scan(None, &s);
        assert_eq!(
            first,
            ScanChange::Write {
                state: State::Unsupported,
                reason: Some("fifo".into()),
                fresh_copy: true
            }
        );
        let mut old = recorded(State::Unsupported, 0, 1);
        old.kind = Kind::Special;
        old.reason = Some("fifo".into());
        assert_eq!(after_scan(Some(&old), &s), ScanChange::Unchanged);
    }
}
