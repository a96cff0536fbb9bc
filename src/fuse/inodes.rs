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
}
