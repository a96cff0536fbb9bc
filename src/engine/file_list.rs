//! The application's own list of files (`--files-from`, `--files-from0`): reading and checking
//! it, and the set of paths a command is then restricted to.
//!
//! Owns: the list's format (one path relative to the source root per line, or NUL-separated),
//! which lines are skipped, which paths are refused, and the in-memory set. The list is read
//! whole before the command changes anything, so a bad line refuses the command (DESIGN §4.8).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// How the entries of a list are separated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Separator {
    /// One path per line (`\n`; a trailing `\r` is dropped); empty lines and lines starting with
    /// `#` or `;` are skipped, as rclone and rsync do.
    Newline,
    /// NUL-terminated entries (`find -print0`), taken as they are: only empty entries are
    /// skipped, a name may hold any other byte.
    Nul,
}

/// The paths of a list, each once. Memory: the path plus about 40 bytes (its allocation and its
/// slot in the table), so 1,000,000 paths of 60 bytes take about 100 MB; lookups are O(1).
#[derive(Debug, Clone)]
pub struct FileList {
    paths: HashSet<Box<str>>,
    /// Where the list came from, for summaries: the file's path or `-` (stdin).
    origin: String,
}

/// Why a list cannot be used; nothing is done then.
#[derive(Debug, thiserror::Error)]
pub enum FileListError {
    #[error("cannot read the file list {origin}: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("file list {origin}, {unit} {number}: {text:?} {why}")]
    BadEntry {
        origin: String,
        unit: &'static str,
        number: usize,
        text: String,
        why: &'static str,
    },
}

impl FileList {
    /// Reads the list at `path` (`-` for stdin).
    pub fn read(path: &Path, separator: Separator) -> Result<FileList, FileListError> {
        let origin = path.display().to_string();
        if path == Path::new("-") {
            return Self::parse(std::io::stdin().lock(), separator, origin);
        }
        let file = std::fs::File::open(path).map_err(|source| FileListError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(std::io::BufReader::new(file), separator, origin)
    }

    /// Parses a list from `reader`, one entry at a time (the list's text is never held whole).
    pub fn parse(
        mut reader: impl BufRead,
        separator: Separator,
        origin: String,
    ) -> Result<FileList, FileListError> {
        let (byte, unit) = match separator {
            Separator::Newline => (b'\n', "line"),
            Separator::Nul => (0, "entry"),
        };
        let mut paths = HashSet::new();
        let mut entry = Vec::new();
        for number in 1.. {
            entry.clear();
            let read =
                reader
                    .read_until(byte, &mut entry)
                    .map_err(|source| FileListError::Read {
                        origin: origin.clone(),
                        source,
                    })?;
            if read == 0 {
                break;
            }
            if entry.last() == Some(&byte) {
                entry.pop();
            }
            let path = checked_entry(&entry, separator).map_err(|why| FileListError::BadEntry {
                origin: origin.clone(),
                unit,
                number,
                text: String::from_utf8_lossy(&entry).into_owned(),
                why,
            })?;
            if let Some(path) = path {
                paths.insert(path.into());
            }
        }
        paths.shrink_to_fit();
        Ok(FileList { paths, origin })
    }

    pub fn contains(&self, path: &str) -> bool {
        self.paths.contains(path)
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.paths.iter().map(|p| &**p)
    }
}

/// The path an entry names, None for an entry to skip, or why it is refused.
fn checked_entry(entry: &[u8], separator: Separator) -> Result<Option<&str>, &'static str> {
    let entry = match separator {
        Separator::Newline => entry.strip_suffix(b"\r").unwrap_or(entry),
        Separator::Nul => entry,
    };
    let skipped =
        entry.is_empty() || (separator == Separator::Newline && matches!(entry[0], b'#' | b';'));
    if skipped {
        return Ok(None);
    }
    let text = std::str::from_utf8(entry).map_err(|_| "is not UTF-8")?;
    refusal(text).map_or(Ok(Some(text)), Err)
}

/// Why a listed path cannot name a file below the source root, if it cannot.
fn refusal(path: &str) -> Option<&'static str> {
    if path.starts_with('/') {
        return Some("is absolute: list paths relative to the source root (as the application's database stores them)");
    }
    if path.contains('\0') {
        return Some("has a NUL byte (use --files-from0 for NUL-separated lists)");
    }
    path.split('/').find_map(|component| match component {
        "" => Some("has an empty component (a doubled or trailing '/')"),
        "." => Some("has a '.' component: list paths relative to the source root, without './'"),
        ".." => Some("has a '..' component: a listed path must stay below the source root"),
        _ => None,
    })
}

/// `--files-from FILE` or `--files-from0 FILE` as given, before reading.
pub fn list_source(
    files_from: Option<&PathBuf>,
    files_from0: Option<&PathBuf>,
) -> Option<(PathBuf, Separator)> {
    match (files_from, files_from0) {
        (Some(path), _) => Some((path.clone(), Separator::Newline)),
        (None, Some(path)) => Some((path.clone(), Separator::Nul)),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8], separator: Separator) -> Result<FileList, FileListError> {
        FileList::parse(text, separator, "list.txt".into())
    }

    #[test]
    fn lines_skip_comments_and_empty_lines_and_drop_a_trailing_cr() {
        let list = parse(
            b"# every FileField\n\na/b.pdf\r\n;x\nc d.jpg\na/b.pdf\n #not a comment",
            Separator::Newline,
        )
        .unwrap();
        let mut paths: Vec<&str> = list.paths().collect();
        paths.sort();
        assert_eq!(paths, [" #not a comment", "a/b.pdf", "c d.jpg"]);
    }

    #[test]
    fn nul_entries_are_taken_as_they_are() {
        let list = parse(b"#a\0with\nnewline\0\0trail\r\0", Separator::Nul).unwrap();
        for path in ["#a", "with\nnewline", "trail\r"] {
            assert!(list.contains(path), "{path:?}");
        }
        assert_eq!(list.len(), 3);
    }

    #[test]
    fn a_bad_line_is_named_with_its_number_and_reason() {
        for (text, why) in [
            (&b"ok\n/etc/passwd\n"[..], "absolute"),
            (b"ok\n../up\n", "'..'"),
            (b"ok\n./a\n", "'.'"),
            (b"ok\na//b\n", "empty component"),
            (b"ok\na/\n", "empty component"),
            (b"ok\na\0b\n", "NUL"),
            (b"ok\n\xff\n", "UTF-8"),
        ] {
            let err = parse(text, Separator::Newline).unwrap_err().to_string();
            assert!(err.contains("line 2") && err.contains(why), "{err}");
        }
    }
}
