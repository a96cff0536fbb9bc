//! The mount against a reference model (issue 5, DESIGN §4.6, §6): whatever the application
//! does through the mount must look exactly as it does on a plain directory, while the
//! sweeper copies and `purge` removes local copies underneath.
//!
//! 1. A property test: random sequences of file-system operations over a small name space
//!    (3 dirs × 4 names, so they collide often), interleaved with sweeper steps, purges and
//!    remounts, applied to a mounted cutoverfs directory and to a plain directory; among them
//!    hard links and descriptors kept open across unlink, rename over and sweeps (written,
//!    read, fstat-ed, truncated and chmod-ed through), as upload handlers and temporary files
//!    keep theirs. After each
//!    step the trees (listing, sizes, content, modes, owners) and each operation's outcome
//!    (success or errno, and the bytes read) must be equal; after a sweeper step the `file://`
//!    dest holds exactly the model's files. Failures shrink to a minimal sequence.
//! 2. Concurrency: 64 threads writing their own files in fsynced chunks, appending fixed-size
//!    records to shared logs that all of them read, reading legacy files, deleting, truncating,
//!    chmodding and renaming, while the daemon's sweeper races them; the tree must end equal to
//!    the same run on a plain directory (shared logs compared as multisets of records), and the
//!    dest equal to it once the sweeper has caught up.
//!
//! The application's operations run with umask `CUTOVERFS_MODEL_UMASK` (default 002, as many
//! application containers have), the daemon with the usual 022 of a service: a file the
//! application creates must get the mode it asked for, whatever the daemon's own umask.
//!
//! Knobs: `PROPTEST_CASES` (64, about 0.3 s each), `CUTOVERFS_MODEL_MAX_OPS` (25 per case),
//! `PROPTEST_MAX_SHRINK_ITERS` (400), `PROPTEST_MAX_SHRINK_TIME` (ms, 120000);
//! `CUTOVERFS_MODEL_TRACE=1` prints each case's timing, purge summaries and, for a failing case,
//! the daemon's logs.

mod common;

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mount::{is_mounted, Daemon};
use common::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------------
// Trees as the application sees them.

/// One entry of a tree: what the comparison looks at (not times: the two sides differ there).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir {
        mode: Mode,
    },
    File {
        mode: Mode,
        size: u64,
        sha256: String,
        uid: u32,
        gid: u32,
        /// Link count: hard links keep their local copies (purge keeps a file with several
        /// names), so the mount shows the plain directory's counts.
        nlink: u64,
    },
    Other(String),
    /// Listing, stat or reading it failed with this errno.
    Error(&'static str, i32),
}

type Tree = BTreeMap<String, Node>;

/// Permission bits, shown in octal.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Mode(u32);

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0o{:o}", self.0)
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Every entry below `root`, by relative path; errors are recorded, never panicked on.
fn tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                out.insert(format!("{rel}/"), Node::Error("read_dir", errno_of(&e)));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    out.insert(format!("{rel}/"), Node::Error("readdir", errno_of(&e)));
                    continue;
                }
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let node = match fs::symlink_metadata(entry.path()) {
                Err(e) => Node::Error("stat", errno_of(&e)),
                Ok(meta) if meta.is_dir() => {
                    stack.push(child.clone());
                    Node::Dir {
                        mode: Mode(meta.mode() & 0o7777),
                    }
                }
                Ok(meta) if meta.is_file() => match fs::read(entry.path()) {
                    Ok(bytes) => Node::File {
                        mode: Mode(meta.mode() & 0o7777),
                        size: meta.size(),
                        sha256: short_hash(&bytes),
                        uid: meta.uid(),
                        gid: meta.gid(),
                        nlink: meta.nlink(),
                    },
                    Err(e) => Node::Error("read", errno_of(&e)),
                },
                Ok(meta) => Node::Other(format!("{:?}", meta.file_type())),
            };
            out.insert(child, node);
        }
    }
    out
}

fn short_hash(bytes: &[u8]) -> String {
    format!("{}:{}", bytes.len(), &sha256_hex(bytes)[..12])
}

/// The differences between two trees, one line each ("path: want X, got Y").
fn tree_diff(want: &Tree, got: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (path, w) in want {
        match got.get(path) {
            None => out.push(format!("{path}: want {w:?}, got nothing")),
            Some(g) if g != w => out.push(format!("{path}: want {w:?}, got {g:?}")),
            _ => {}
        }
    }
    for (path, g) in got {
        if !want.contains_key(path) {
            out.push(format!("{path}: want nothing, got {g:?}"));
        }
    }
    out
}

/// The files of a tree as the dest holds them: each name a file of its own (hard links are
/// separate objects there, so link counts are not compared).
fn only_files(tree: &Tree) -> Tree {
    tree.iter()
        .filter(|(_, n)| !matches!(n, Node::Dir { .. }))
        .map(|(p, n)| {
            let mut n = n.clone();
            if let Node::File { nlink, .. } = &mut n {
                *nlink = 1;
            }
            (p.clone(), n)
        })
        .collect()
}

/// The regular files of a `file://` dest (its directories may outlive what was in them).
fn dest_files(dest: &Path) -> Tree {
    if !dest.exists() {
        return Tree::new();
    }
    only_files(&tree(dest))
}

// ---------------------------------------------------------------------------------------------
// The application's umask, private to the thread that acts as the application.

fn app_umask() -> libc::mode_t {
    std::env::var("CUTOVERFS_MODEL_UMASK")
        .ok()
        .and_then(|v| libc::mode_t::from_str_radix(v.trim_start_matches("0o"), 8).ok())
        .unwrap_or(0o002)
}

/// Gives this thread its own umask (and cwd), so that changing it touches nothing else.
fn private_umask() {
    // SAFETY: unsharing the calling thread's fs attributes; no memory is involved.
    let rc = unsafe { libc::unshare(libc::CLONE_FS) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_FS): {}",
        std::io::Error::last_os_error()
    );
    // Whatever the harness had: processes started from here (the daemon) get 022.
    // SAFETY: umask only changes this thread's (now private) mask.
    unsafe { libc::umask(0o022) };
}

/// Runs `f` as the application: with its umask.
fn as_app<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: as in `private_umask`.
    let old = unsafe { libc::umask(app_umask()) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    out
}

// ---------------------------------------------------------------------------------------------
// The operations.

const DIRS: [&str; 3] = ["", "a", "b"];
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// A path of the name space: `DIRS[dir]/NAMES[name]`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct P(u8, u8);

impl P {
    fn rel(self) -> String {
        let (dir, name) = (DIRS[self.0 as usize], NAMES[self.1 as usize]);
        if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        }
    }
}

impl std::fmt::Debug for P {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.rel())
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// open(O_WRONLY|O_CREAT|O_TRUNC, mode), write the content, close.
    Create {
        path: P,
        mode: Mode,
        len: usize,
        seed: u8,
    },
    /// open(O_WRONLY), pwrite at `offset` (past the end: a hole), close.
    Write {
        path: P,
        offset: u64,
        len: usize,
        seed: u8,
    },
    /// open(O_WRONLY|O_APPEND), write, close.
    Append {
        path: P,
        len: usize,
        seed: u8,
    },
    /// truncate(2) by path, or ftruncate(2) on a descriptor opened for writing.
    Truncate {
        path: P,
        size: u64,
        by_fd: bool,
    },
    Rename {
        from: P,
        to: P,
    },
    Unlink {
        path: P,
    },
    Mkdir {
        path: P,
        mode: Mode,
    },
    Rmdir {
        path: P,
    },
    Chmod {
        path: P,
        mode: Mode,
    },
    Read {
        path: P,
    },
    /// link(2).
    Link {
        from: P,
        to: P,
    },
    /// open(O_RDWR) kept in a slot across the next operations (unlink, rename over it, sweeps
    /// and purges), as temporary files and upload handlers keep theirs.
    Keep {
        slot: usize,
        path: P,
    },
    /// pwrite, read back whole, fstat, ftruncate and fchmod through a kept descriptor.
    FdWrite {
        slot: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    FdRead {
        slot: usize,
    },
    FdStat {
        slot: usize,
    },
    FdTruncate {
        slot: usize,
        size: u64,
    },
    FdChmod {
        slot: usize,
        mode: Mode,
    },
    Close {
        slot: usize,
    },
    /// The daemon's sweeper copies everything (waits until the manifest and the dest show it).
    Sweep,
    /// `cutoverfs purge --confirm` while mounted.
    Purge,
    /// SIGTERM the daemon (no mount may be left), start it again.
    Remount,
}

const FILE_MODES: [u32; 10] = [
    0o600, 0o644, 0o664, 0o666, 0o755, 0o777, 0o000, 0o640, 0o4755, 0o2775,
];
const DIR_MODES: [u32; 5] = [0o700, 0o755, 0o775, 0o777, 0o1777];
const LENS: [usize; 6] = [0, 1, 100, 4096, 5000, 70_001];
const OFFSETS: [u64; 6] = [0, 1, 4095, 4096, 65_536, 100_000];
const SIZES: [u64; 6] = [0, 1, 4096, 10_000, 70_001, 200_000];

fn path() -> impl Strategy<Value = P> {
    (0..DIRS.len() as u8, 0..NAMES.len() as u8).prop_map(|(d, n)| P(d, n))
}

fn pick<T: Clone + std::fmt::Debug + 'static>(values: &[T]) -> impl Strategy<Value = T> {
    prop::sample::select(values.to_vec())
}

fn any_mode() -> impl Strategy<Value = u32> {
    pick(&[FILE_MODES.as_slice(), DIR_MODES.as_slice()].concat())
}

/// The legacy tree, made before mounting: usually the directories `a` and `b` (so that paths
/// below them work), then a few files and directories.
fn setup() -> impl Strategy<Value = Vec<Op>> {
    let dirs = prop::collection::vec(any::<bool>(), 2).prop_map(|made| {
        made.iter()
            .enumerate()
            .filter(|(_, made)| **made)
            .map(|(i, _)| Op::Mkdir {
                path: P(0, i as u8),
                mode: Mode(0o755),
            })
            .collect::<Vec<_>>()
    });
    let more = prop::collection::vec(
        prop_oneof![
            1 => (path(), pick(&DIR_MODES)).prop_map(|(path, mode)| Op::Mkdir { path, mode: Mode(mode) }),
            4 => (path(), pick(&FILE_MODES), pick(&LENS), any::<u8>())
                .prop_map(|(path, mode, len, seed)| Op::Create { path, mode: Mode(mode), len, seed }),
        ],
        0..8,
    );
    (dirs, more).prop_map(|(mut dirs, more)| {
        dirs.extend(more);
        dirs
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (path(), pick(&FILE_MODES), pick(&LENS), any::<u8>())
            .prop_map(|(path, mode, len, seed)| Op::Create { path, mode: Mode(mode), len, seed }),
        3 => (path(), pick(&OFFSETS), pick(&LENS), any::<u8>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        1 => (path(), pick(&LENS), any::<u8>())
            .prop_map(|(path, len, seed)| Op::Append { path, len, seed }),
        2 => (path(), pick(&SIZES), any::<bool>())
            .prop_map(|(path, size, by_fd)| Op::Truncate { path, size, by_fd }),
        3 => (path(), path()).prop_map(|(from, to)| Op::Rename { from, to }),
        2 => path().prop_map(|path| Op::Unlink { path }),
        3 => (path(), pick(&DIR_MODES)).prop_map(|(path, mode)| Op::Mkdir { path, mode: Mode(mode) }),
        1 => path().prop_map(|path| Op::Rmdir { path }),
        2 => (path(), any_mode()).prop_map(|(path, mode)| Op::Chmod { path, mode: Mode(mode) }),
        2 => path().prop_map(|path| Op::Read { path }),
        2 => (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        2 => (0..SLOTS, path()).prop_map(|(slot, path)| Op::Keep { slot, path }),
        2 => (0..SLOTS, pick(&OFFSETS), pick(&LENS), any::<u8>())
            .prop_map(|(slot, offset, len, seed)| Op::FdWrite { slot, offset, len, seed }),
        1 => (0..SLOTS).prop_map(|slot| Op::FdRead { slot }),
        1 => (0..SLOTS).prop_map(|slot| Op::FdStat { slot }),
        1 => (0..SLOTS, pick(&SIZES)).prop_map(|(slot, size)| Op::FdTruncate { slot, size }),
        1 => (0..SLOTS, pick(&FILE_MODES)).prop_map(|(slot, mode)| Op::FdChmod { slot, mode: Mode(mode) }),
        1 => (0..SLOTS).prop_map(|slot| Op::Close { slot }),
        3 => Just(Op::Sweep),
        2 => Just(Op::Purge),
        1 => Just(Op::Remount),
    ]
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(31) as u8) ^ seed.rotate_left((i % 8) as u32))
        .collect()
}

/// What an operation gave the application: success (with the bytes read, for reads) or errno.
#[derive(Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Bytes(Vec<u8>),
    Errno(i32),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok => f.write_str("Ok"),
            Outcome::Bytes(b) => write!(f, "Bytes({})", short_hash(b)),
            Outcome::Errno(e) => write!(f, "Errno({e} {})", std::io::Error::from_raw_os_error(*e)),
        }
    }
}

fn outcome(result: std::io::Result<Option<Vec<u8>>>) -> Outcome {
    match result {
        Ok(None) => Outcome::Ok,
        Ok(Some(bytes)) => Outcome::Bytes(bytes),
        Err(e) => Outcome::Errno(errno_of(&e)),
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// Descriptors kept open across operations, per side.
const SLOTS: usize = 2;

/// The descriptors each side (a root) keeps open (`Op::Keep`).
fn kept() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, [Option<fs::File>; SLOTS]>> {
    static KEPT: std::sync::Mutex<BTreeMap<PathBuf, [Option<fs::File>; SLOTS]>> =
        std::sync::Mutex::new(BTreeMap::new());
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Closes every descriptor `root`'s side keeps.
fn close_kept(root: &Path) {
    kept().remove(root);
}

/// Runs `f` on the descriptor `root`'s side keeps in `slot` (EBADF if none).
fn with_kept(
    root: &Path,
    slot: usize,
    f: impl FnOnce(&fs::File) -> std::io::Result<Option<Vec<u8>>>,
) -> std::io::Result<Option<Vec<u8>>> {
    let kept = kept();
    match kept.get(root).and_then(|slots| slots[slot].as_ref()) {
        Some(file) => f(file),
        None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
    }
}

/// Applies a file-system operation below `root` (the steps of the daemon are no-ops here).
fn apply(root: &Path, op: &Op) -> Outcome {
    let at = |p: &P| root.join(p.rel());
    let result = (|| -> std::io::Result<Option<Vec<u8>>> {
        match op {
            Op::Create {
                path,
                mode,
                len,
                seed,
            } => {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode.0)
                    .open(at(path))?;
                file.write_all(&content(*len, *seed))?;
            }
            Op::Write {
                path,
                offset,
                len,
                seed,
            } => {
                let file = fs::OpenOptions::new().write(true).open(at(path))?;
                file.write_all_at(&content(*len, *seed), *offset)?;
            }
            Op::Append { path, len, seed } => {
                let mut file = fs::OpenOptions::new().append(true).open(at(path))?;
                file.write_all(&content(*len, *seed))?;
            }
            Op::Truncate { path, size, by_fd } => {
                if *by_fd {
                    fs::OpenOptions::new()
                        .write(true)
                        .open(at(path))?
                        .set_len(*size)?;
                } else {
                    let c = c_path(&at(path));
                    // SAFETY: a NUL-terminated path.
                    if unsafe { libc::truncate(c.as_ptr(), *size as libc::off_t) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Op::Rename { from, to } => fs::rename(at(from), at(to))?,
            Op::Unlink { path } => fs::remove_file(at(path))?,
            Op::Mkdir { path, mode } => fs::DirBuilder::new().mode(mode.0).create(at(path))?,
            Op::Rmdir { path } => fs::remove_dir(at(path))?,
            Op::Chmod { path, mode } => {
                fs::set_permissions(at(path), fs::Permissions::from_mode(mode.0))?
            }
            Op::Read { path } => {
                let mut bytes = Vec::new();
                fs::File::open(at(path))?.read_to_end(&mut bytes)?;
                return Ok(Some(bytes));
            }
            Op::Link { from, to } => fs::hard_link(at(from), at(to))?,
            Op::Keep { slot, path } => {
                let file = fs::OpenOptions::new().read(true).write(true).open(at(path));
                let mut kept = kept();
                let slots = kept.entry(root.to_path_buf()).or_default();
                slots[*slot] = None;
                slots[*slot] = Some(file?);
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                seed,
            } => {
                with_kept(root, *slot, |f| {
                    f.write_all_at(&content(*len, *seed), *offset)?;
                    Ok(None)
                })?;
            }
            Op::FdRead { slot } => {
                return with_kept(root, *slot, |f| {
                    let mut bytes = Vec::new();
                    let mut f = f;
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
                    f.read_to_end(&mut bytes)?;
                    Ok(Some(bytes))
                })
            }
            Op::FdStat { slot } => {
                return with_kept(root, *slot, |f| {
                    let m = f.metadata()?;
                    // lseek(SEEK_END) asks the size too.
                    let mut f = f;
                    let end = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))?;
                    Ok(Some(
                        format!(
                            "size={} end={end} mode={:o} nlink={}",
                            m.len(),
                            m.mode() & 0o7777,
                            m.nlink()
                        )
                        .into_bytes(),
                    ))
                });
            }
            Op::FdTruncate { slot, size } => {
                with_kept(root, *slot, |f| {
                    f.set_len(*size)?;
                    Ok(None)
                })?;
            }
            Op::FdChmod { slot, mode } => {
                with_kept(root, *slot, |f| {
                    f.set_permissions(fs::Permissions::from_mode(mode.0))?;
                    Ok(None)
                })?;
            }
            Op::Close { slot } => {
                if let Some(slots) = kept().get_mut(root) {
                    slots[*slot] = None;
                }
            }
            Op::Sweep | Op::Purge | Op::Remount => {}
        }
        Ok(None)
    })();
    outcome(result)
}

// ---------------------------------------------------------------------------------------------
// The daemon's side.

/// How long the sweeper may take to copy what a few operations changed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon over the workspace's source directory itself, with its sweeper on.
fn start(w: &Work) -> Daemon {
    Daemon::start(&w.src, &mount_args(w))
}

fn mount_args(w: &Work) -> Vec<OsString> {
    [
        "--dest",
        &w.dest_url(),
        "--manifest",
        &w.manifest_url(),
        "--concurrency",
        "4",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

/// The sum of `files.<state>` over these states.
fn files_in(status: &serde_json::Value, states: &[&str]) -> u64 {
    states.iter().map(|s| state_count(status, "files", s)).sum()
}

/// Waits until the manifest shows nothing left to copy and the dest holds exactly the files of
/// `model` (content and mode). Err says what was still different: at `timeout`, or once the
/// manifest has shown nothing to copy for well over the idle sweeper's recheck (5 s) with the
/// same difference at the dest (nothing will change it any more). The grace is four rechecks,
/// so a busy machine that runs a recheck late does not end a case early.
fn wait_for_sweeper(w: &Work, model: &Path, timeout: Duration) -> Result<(), String> {
    const IDLE_GRACE: Duration = Duration::from_secs(20);
    let started = Instant::now();
    let mut idle_since: Option<(Instant, Vec<String>)> = None;
    loop {
        let status = w.status();
        let busy = files_in(&status, &["pending", "copying", "copied", "failed"]);
        let diff = tree_diff(&only_files(&tree(model)), &dest_files(&w.dest));
        if busy == 0 && diff.is_empty() {
            if trace() {
                eprintln!(
                    "  sweep settled after {:?}: {} dest files",
                    started.elapsed(),
                    dest_files(&w.dest).len()
                );
            }
            return Ok(());
        }
        let stuck = match &idle_since {
            Some((since, seen)) if busy == 0 && *seen == diff => since.elapsed() > IDLE_GRACE,
            _ => {
                idle_since = (busy == 0).then(|| (Instant::now(), diff.clone()));
                false
            }
        };
        // Only cutoverfs writes this dest: a conflict there is cutoverfs's own leftover, and
        // final (no need to wait for it).
        let conflict = state_count(&status, "files", "conflict") > 0;
        if conflict || stuck || started.elapsed() > timeout {
            return Err(format!(
                "after {:.1?} the manifest shows {busy} files pending/copying/copied/failed, and the dest differs from the model (want = model):\n  {}\nstatus: {} problems: {}",
                started.elapsed(),
                diff.join("\n  "),
                serde_json::to_string(&status["files"]).unwrap(),
                serde_json::to_string(&status["problems"]).unwrap()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn purge(w: &Work) -> Result<(), String> {
    let run = w.cmd_manifest_only("purge", &["--confirm"]);
    if trace() {
        eprintln!("  purge: {}", run.stdout.replace('\n', " | "));
    }
    match run.code {
        Some(0) | Some(1) => Ok(()),
        _ => Err(format!("purge --confirm failed\n{run}")),
    }
}

fn stop(daemon: Daemon, mountpoint: &Path) -> Result<(), String> {
    let log =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| daemon.stop())).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "daemon.stop() panicked".into())
        })?;
    if is_mounted(mountpoint) {
        return Err(format!("still mounted after SIGTERM\n{log}"));
    }
    if fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&mountpoint.to_string_lossy()))
    {
        return Err(format!("/proc/mounts still lists {}", mountpoint.display()));
    }
    Ok(())
}

/// One case: the setup on both sides, mount, every step compared, stop.
fn run_case(setup: &[Op], ops: &[Op]) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let w = Work::new();
    let model = w.root.join("model");
    fs::create_dir(&model).unwrap();
    // The same legacy tree under the mount and in the model, made by the application.
    as_app(|| {
        for op in setup {
            let (a, b) = (apply(&w.src, op), apply(&model, op));
            assert_eq!(a, b, "setup {op:?} differs between two plain directories");
        }
    });
    let mut daemon = Some(start(&w));
    let result = (|| -> Result<(), TestCaseError> {
        let first = tree_diff(&tree(&model), &tree(&w.src));
        prop_assert!(
            first.is_empty(),
            "right after mounting, the mount differs from the model:\n  {}",
            first.join("\n  ")
        );
        for (i, op) in ops.iter().enumerate() {
            match op {
                // A file held open for writing is not copied until it is closed: the sweeper
                // step (which waits for the dest to hold the model) closes what is kept. Kept
                // descriptors across sweeps are the in-process model's (src/fuse/model.rs).
                Op::Sweep => {
                    close_kept(&w.src);
                    close_kept(&model);
                    wait_for_sweeper(&w, &model, SETTLE_TIMEOUT)
                        .map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}")))?
                }
                Op::Purge => {
                    purge(&w).map_err(|e| TestCaseError::fail(format!("step {i}: {e}")))?
                }
                Op::Remount => {
                    // The application closes what it keeps open before the daemon restarts.
                    close_kept(&w.src);
                    close_kept(&model);
                    stop(daemon.take().unwrap(), &w.src)
                        .map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}")))?;
                    daemon = Some(start(&w));
                }
                _ => {
                    let (want, got) = as_app(|| (apply(&model, op), apply(&w.src, op)));
                    prop_assert_eq!(
                        &want,
                        &got,
                        "step {} {:?}: the plain directory gave {:?}, the mount {:?}",
                        i,
                        op,
                        want,
                        got
                    );
                }
            }
            let diff = tree_diff(&tree(&model), &tree(&w.src));
            prop_assert!(
                diff.is_empty(),
                "after step {} {:?} the mount differs from the plain directory (want = plain):\n  {}",
                i,
                op,
                diff.join("\n  ")
            );
        }
        Ok(())
    })();
    close_kept(&w.src);
    close_kept(&model);
    // A daemon that failed to stop at a remount is gone already (its mount removed by Drop).
    let stopped = match daemon.take() {
        Some(daemon) => stop(daemon, &w.src),
        None => Ok(()),
    };
    if trace() && result.is_err() {
        for entry in fs::read_dir(&w.root).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                eprintln!(
                    "--- {}:\n{}",
                    entry.path().display(),
                    fs::read_to_string(entry.path()).unwrap_or_default()
                );
            }
        }
    }
    if trace() {
        eprintln!(
            "case: {} setup ops, {} ops, {:?}: {:?}",
            setup.len(),
            ops.len(),
            started.elapsed(),
            result.as_ref().err()
        );
    }
    result?;
    stopped.map_err(|e| TestCaseError::fail(format!("at the end: {e}")))?;
    Ok(())
}

fn trace() -> bool {
    std::env::var_os("CUTOVERFS_MODEL_TRACE").is_some()
}

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: env_or("PROPTEST_CASES", 64),
        max_shrink_iters: env_or("PROPTEST_MAX_SHRINK_ITERS", 400),
        // A failure that needs the sweeper takes seconds per try; shrinking stops after this.
        max_shrink_time: env_or("PROPTEST_MAX_SHRINK_TIME", 120_000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_mount_behaves_like_a_plain_directory_while_files_migrate(
        setup in setup(),
        ops in prop::collection::vec(op(), 1..env_or("CUTOVERFS_MODEL_MAX_OPS", 25) as usize + 1),
    ) {
        private_umask();
        run_case(&setup, &ops)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrency.

const THREADS: usize = 64;
const SHARED: usize = 4;
const LEGACY: usize = 16;
const CHUNKS: u64 = 6;
/// One appended record: fixed size, so that O_APPEND writes never interleave inside one.
const RECORD: usize = 64;

fn record(thread: usize, seq: u64) -> Vec<u8> {
    let mut r = format!("thread {thread:02} record {seq:02} ").into_bytes();
    r.resize(RECORD - 1, b'.');
    r.push(b'\n');
    r
}

fn legacy_content(i: usize) -> Vec<u8> {
    pseudo_random(20_000 + i * 9_000, 500 + i as u64)
}

/// The tree every run starts from: legacy files the threads read, old files they delete,
/// shared logs they append to (with records already in them), and the directories they write
/// into.
fn legacy_tree(root: &Path) {
    for i in 0..LEGACY {
        write_file(
            &root.join(format!("legacy/l{i:02}.bin")),
            &legacy_content(i),
        );
    }
    for i in 0..SHARED {
        let old: Vec<u8> = (0..10).flat_map(|seq| record(99, seq)).collect();
        write_file(&root.join(format!("shared/s{i}.log")), &old);
    }
    for t in 0..THREADS {
        write_file(
            &root.join(format!("old/o{t:02}.bin")),
            &pseudo_random(30_000, 900 + t as u64),
        );
    }
    for d in 0..4 {
        fs::create_dir_all(root.join(format!("d{d}"))).unwrap();
    }
    fs::create_dir_all(root.join("done")).unwrap();
}

/// Complete records of a shared log (a read may end inside a record being appended).
fn records_of(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    bytes
        .chunks(RECORD)
        .filter(|r| r.len() == RECORD)
        .map(|r| {
            if r.starts_with(b"thread ") && r.ends_with(b".\n") {
                Ok(r.to_vec())
            } else {
                Err(format!("malformed record {:?}", String::from_utf8_lossy(r)))
            }
        })
        .collect()
}

/// One thread's work below `root`: a temporary file written first and removed later, an old
/// (legacy) file removed early, its own file written in fsynced chunks, the same chunks into a
/// spool file unlinked as soon as it was made (as `tempfile.TemporaryFile` does) and used through
/// its descriptor only, a record appended to a shared log after each chunk, reads of shared logs
/// and legacy files, then for some a second name (a hard link) through which the later changes
/// are checked, a rewrite, a truncate or a chmod, and a rename into the shared `done/`.
fn worker(root: &Path, t: usize) -> Result<(), String> {
    let ctx = |what: &str, e: std::io::Error| format!("thread {t}: {what}: {e}");
    let mut rng = XorShift::new(t as u64 + 1);
    // A temporary file, closed now (so the sweeper takes it) and removed after the chunks.
    let temp = root.join(format!("d{}/tmp-{t:02}.part", t % 4));
    fs::write(&temp, pseudo_random(30_000, t as u64 + 7)).map_err(|e| ctx("write temp", e))?;
    let own = root.join(format!("d{}/own-{t:02}.bin", t % 4));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&own)
        .map_err(|e| ctx("create", e))?;
    let spool_path = root.join(format!("d{}/spool-{t:02}.tmp", t % 4));
    let mut spool = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&spool_path)
        .map_err(|e| ctx("create spool", e))?;
    fs::remove_file(&spool_path).map_err(|e| ctx("unlink open spool", e))?;
    let mut written = 0u64;
    let mut content = Vec::new();
    for chunk in 0..CHUNKS {
        let len = rng.range(1, 40_000) as usize;
        let data = pseudo_random(len, t as u64 * 1000 + chunk);
        file.write_all(&data).map_err(|e| ctx("write", e))?;
        spool.write_all(&data).map_err(|e| ctx("write spool", e))?;
        content.extend_from_slice(&data);
        written += len as u64;
        file.sync_all().map_err(|e| ctx("fsync", e))?;
        let size = fs::metadata(&own).map_err(|e| ctx("stat own", e))?.len();
        if size != written {
            return Err(format!(
                "thread {t}: own file is {size} bytes after writing {written}"
            ));
        }
        let shared = root.join(format!("shared/s{}.log", (t + chunk as usize) % SHARED));
        fs::OpenOptions::new()
            .append(true)
            .open(&shared)
            .and_then(|mut f| f.write_all(&record(t, chunk)))
            .map_err(|e| ctx("append", e))?;
        let log = fs::read(root.join(format!("shared/s{}.log", chunk as usize % SHARED)))
            .map_err(|e| ctx("read shared", e))?;
        records_of(&log).map_err(|e| format!("thread {t}: {e}"))?;
        if chunk == 1 {
            // An old upload the application deletes while the sweeper is migrating the tree.
            fs::remove_file(root.join(format!("old/o{t:02}.bin")))
                .map_err(|e| ctx("unlink an old file", e))?;
        }
        let l = (t + chunk as usize) % LEGACY;
        let legacy = fs::read(root.join(format!("legacy/l{l:02}.bin")))
            .map_err(|e| ctx("read legacy", e))?;
        if legacy != legacy_content(l) {
            return Err(format!(
                "thread {t}: legacy/l{l:02}.bin read back wrong ({} bytes)",
                legacy.len()
            ));
        }
    }
    drop(file);
    check_spool(&mut spool, &content).map_err(|e| format!("thread {t}: {e}"))?;
    let own_now = fs::read(&own).map_err(|e| ctx("read own", e))?;
    if own_now != content {
        return Err(format!(
            "thread {t}: own file read back {} bytes, other than the {} written",
            own_now.len(),
            content.len()
        ));
    }
    drop(spool);
    fs::remove_file(&temp).map_err(|e| ctx("unlink temp", e))?;
    let link = root.join(format!("d{}/link-{t:02}.bin", (t + 2) % 4));
    if t % 4 == 1 {
        fs::hard_link(&own, &link).map_err(|e| ctx("link", e))?;
        let nlink = fs::metadata(&link)
            .map_err(|e| ctx("stat link", e))?
            .nlink();
        if nlink != 2 {
            return Err(format!("thread {t}: {nlink} links after link(2), want 2"));
        }
    }
    if t % 3 == 0 {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&own)
            .map_err(|e| ctx("reopen", e))?;
        file.write_all_at(&pseudo_random(5000, t as u64), 100)
            .map_err(|e| ctx("pwrite", e))?;
        file.sync_data().map_err(|e| ctx("fdatasync", e))?;
    }
    if t % 5 == 0 {
        fs::OpenOptions::new()
            .write(true)
            .open(&own)
            .and_then(|f| f.set_len(written / 2))
            .map_err(|e| ctx("truncate", e))?;
    }
    if t % 2 == 0 {
        fs::set_permissions(&own, fs::Permissions::from_mode(0o640))
            .map_err(|e| ctx("chmod", e))?;
    }
    if t % 4 == 1 {
        // Whatever was done through the first name shows through the second.
        let (a, b) = (
            fs::read(&own).map_err(|e| ctx("read own", e))?,
            fs::read(&link).map_err(|e| ctx("read link", e))?,
        );
        if a != b {
            return Err(format!(
                "thread {t}: the two names of one file read differently ({} and {} bytes)",
                a.len(),
                b.len()
            ));
        }
    }
    // Read another thread's file (it may be anywhere in its life; only errors count).
    let other = root.join(format!("d{}/own-{:02}.bin", (t + 1) % 4, (t + 1) % THREADS));
    match fs::read(&other) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx("read another thread's file", e)),
    }
    fs::rename(&own, root.join(format!("done/own-{t:02}.bin"))).map_err(|e| ctx("rename", e))?;
    Ok(())
}

/// The spool, unlinked while open, holds `content` through its descriptor; then it is
/// truncated and checked again through `fstat`.
fn check_spool(spool: &mut fs::File, content: &[u8]) -> Result<(), String> {
    let size = |f: &fs::File| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| format!("fstat spool: {e}"))
    };
    let written = content.len() as u64;
    if size(spool)? != written {
        return Err(format!("spool is {} bytes, want {written}", size(spool)?));
    }
    let mut back = Vec::new();
    spool
        .seek(std::io::SeekFrom::Start(0))
        .and_then(|_| spool.read_to_end(&mut back))
        .map_err(|e| format!("read spool: {e}"))?;
    if back != content {
        let at = back.iter().zip(content).position(|(a, b)| a != b);
        return Err(format!(
            "the spool read back {} bytes other than the {written} written (first difference at {at:?})",
            back.len()
        ));
    }
    spool
        .set_len(written / 3)
        .map_err(|e| format!("ftruncate spool: {e}"))?;
    if size(spool)? != written / 3 {
        return Err(format!("spool is {} bytes after ftruncate", size(spool)?));
    }
    Ok(())
}

/// Runs the 64 workers against `root`; the errors they met.
fn run_workers(root: &Path) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| s.spawn(move || worker(root, t)))
            .collect();
        handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a worker panicked".into()))
                    .err()
            })
            .collect()
    })
}

/// The records of each shared log, sorted (appends from different threads come in any order).
fn shared_records(root: &Path) -> BTreeMap<String, Result<Vec<Vec<u8>>, String>> {
    (0..SHARED)
        .map(|i| {
            let name = format!("shared/s{i}.log");
            let records = fs::read(root.join(&name))
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    if bytes.len() % RECORD != 0 {
                        return Err(format!("{} bytes: not whole records", bytes.len()));
                    }
                    records_of(&bytes)
                })
                .map(|mut r| {
                    r.sort();
                    r
                });
            (name, records)
        })
        .collect()
}

/// A tree without the shared logs (compared by `shared_records`).
fn without_shared(tree: Tree) -> Tree {
    tree.into_iter()
        .filter(|(p, _)| !p.starts_with("shared/"))
        .collect()
}

#[test]
fn concurrent_writers_through_the_mount_end_like_on_a_plain_directory() {
    let w = Work::new();
    let plain = w.root.join("plain");
    legacy_tree(&w.src);
    legacy_tree(&plain);
    let daemon = Daemon::start(&w.src, &mount_args(&w));

    let started = Instant::now();
    let errors = run_workers(&w.src);
    let through_mount = started.elapsed();
    assert!(
        errors.is_empty(),
        "through the mount ({} errors):\n{}",
        errors.len(),
        errors.join("\n")
    );
    let errors = run_workers(&plain);
    assert!(
        errors.is_empty(),
        "on the plain directory:\n{}",
        errors.join("\n")
    );
    eprintln!(
        "64 workers: {through_mount:.2?} through the mount, {:.2?} in all",
        started.elapsed()
    );

    let diff = tree_diff(&without_shared(tree(&plain)), &without_shared(tree(&w.src)));
    assert!(
        diff.is_empty(),
        "the mount differs from the plain directory (want = plain):\n  {}",
        diff.join("\n  ")
    );
    let (want, got) = (shared_records(&plain), shared_records(&w.src));
    for (name, want) in &want {
        let want = want.as_ref().unwrap();
        let got = &got[name];
        assert!(
            got.as_ref() == Ok(want),
            "{name}: {} records on the plain directory, through the mount: {:?}",
            want.len(),
            got.as_ref().map(|r| r.len())
        );
    }

    // The sweeper raced the writers; once it has caught up, the dest is the tree.
    let files = only_files(&tree(&w.src));
    let settled = Instant::now();
    loop {
        let status = w.status();
        let busy = files_in(&status, &["pending", "copying", "copied", "failed"]);
        let diff = tree_diff(&files, &dest_files(&w.dest));
        if busy == 0 && diff.is_empty() {
            break;
        }
        assert!(
            settled.elapsed() < Duration::from_secs(90),
            "the sweeper did not catch up: {busy} files pending/copying/copied/failed; the dest differs from the tree (want = tree):\n  {}\nstatus: {} problems: {}",
            diff.join("\n  "),
            status["files"],
            status["problems"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "sweeper caught up {:.2?} after the writers",
        settled.elapsed()
    );
    let status = w.status();
    assert_eq!(
        state_count(&status, "files", "verified"),
        files.len() as u64,
        "every file verified: {status:#}"
    );

    let log = daemon.stop();
    assert!(!is_mounted(&w.src), "a mount is left after SIGTERM");
    eprintln!(
        "the daemon's sweeper: {} copies verified, {} outcomes dropped (file changed or held meanwhile)",
        log.matches("copied and verified").count(),
        log.matches("lease lost").count()
    );
    // Unmounted, the local tree is what the application saw; a sweep finds nothing to do.
    let diff = tree_diff(&files, &only_files(&tree(&w.src)));
    assert!(
        diff.is_empty(),
        "the local tree after unmounting:\n  {}",
        diff.join("\n  ")
    );
    let sweep = w.sweep(&[]);
    sweep.assert_code(0);
    assert_eq!(sweep.count("Successfully copied"), 0, "{sweep}");
    let diff = tree_diff(&files, &dest_files(&w.dest));
    assert!(
        diff.is_empty(),
        "the dest after a last sweep:\n  {}",
        diff.join("\n  ")
    );
}
