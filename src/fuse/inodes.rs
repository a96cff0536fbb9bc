//! Inode numbers: one per path, handed out on first sight and kept for the life of the mount.
//!
//! Numbers are never reused, even after the kernel forgets an inode: an application that
//! compares `st_ino` across a migration sees the same number before and after the file moved.
//! The cost is one table row per path ever looked up (about 100 bytes).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const ROOT: u64 = 1;

#[derive(Default)]
struct Table {
    paths: HashMap<u64, Arc<Path>>,
    numbers: HashMap<Arc<Path>, u64>,
    next: u64,
}

pub struct Inodes {
    table: Mutex<Table>,
}

impl Inodes {
    pub fn new() -> Inodes {
        let mut table = Table {
            next: ROOT + 1,
            ..Default::default()
        };
        let root: Arc<Path> = Arc::from(PathBuf::new());
        table.paths.insert(ROOT, root.clone());
        table.numbers.insert(root, ROOT);
        Inodes {
            table: Mutex::new(table),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The path (relative to the root, "" for the root) of a known inode.
    pub fn path(&self, ino: u64) -> Option<Arc<Path>> {
        self.lock().paths.get(&ino).cloned()
    }

    /// The inode of a path, numbered now if it is new.
    pub fn number(&self, path: &Path) -> u64 {
        let mut table = self.lock();
        if let Some(ino) = table.numbers.get(path) {
            return *ino;
        }
        let ino = table.next;
        table.next += 1;
        let path: Arc<Path> = Arc::from(path);
        table.paths.insert(ino, path.clone());
        table.numbers.insert(path, ino);
        ino
    }

    /// A path was removed: the next file created there gets a new number.
    pub fn forget(&self, path: &Path) {
        let mut table = self.lock();
        table.numbers.remove(path);
    }

    /// A path (and everything below it) was renamed: its numbers move with it, so open files
    /// and the kernel's inodes follow the rename.
    pub fn rename(&self, from: &Path, to: &Path) {
        let mut table = self.lock();
        let Table { paths, numbers, .. } = &mut *table;
        numbers.remove(to);
        let moved: Vec<(u64, Arc<Path>)> = paths
            .iter()
            .filter_map(|(ino, path)| {
                let rest = path.strip_prefix(from).ok()?;
                let new: Arc<Path> = if rest.as_os_str().is_empty() {
                    Arc::from(to)
                } else {
                    Arc::from(to.join(rest))
                };
                Some((*ino, new))
            })
            .collect();
        for (ino, new) in moved {
            if let Some(old) = paths.insert(ino, new.clone()) {
                if numbers.get(&old) == Some(&ino) {
                    numbers.remove(&old);
                }
            }
            numbers.insert(new, ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_and_distinct() {
        let inodes = Inodes::new();
        let a = inodes.number(Path::new("a"));
        let b = inodes.number(Path::new("a/b"));
        assert_ne!(a, b);
        assert_ne!(a, ROOT);
        assert_eq!(inodes.number(Path::new("a")), a);
        assert_eq!(inodes.path(b).as_deref(), Some(Path::new("a/b")));
        assert_eq!(inodes.path(ROOT).as_deref(), Some(Path::new("")));
    }

    #[test]
    fn a_rename_moves_numbers_with_the_subtree() {
        let inodes = Inodes::new();
        let dir = inodes.number(Path::new("a"));
        let file = inodes.number(Path::new("a/f"));
        let other = inodes.number(Path::new("ab"));
        inodes.rename(Path::new("a"), Path::new("z"));
        assert_eq!(inodes.path(dir).as_deref(), Some(Path::new("z")));
        assert_eq!(inodes.path(file).as_deref(), Some(Path::new("z/f")));
        assert_eq!(inodes.path(other).as_deref(), Some(Path::new("ab")));
        assert_eq!(inodes.number(Path::new("z/f")), file);
        assert_ne!(inodes.number(Path::new("a/f")), file);
    }
}
