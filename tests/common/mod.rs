//! Helpers shared by the integration tests: a private workspace per test, running the binary,
//! reading `status --json`, and comparing trees (content, mode, times, owner).
#![allow(dead_code)]

// The tests hold and kill the binary at named points (src/testhook.rs); those exist only in a
// build with the `test-hooks` feature.
#[cfg(not(feature = "test-hooks"))]
compile_error!(
    "the integration tests need the test hooks: run `cargo test --features test-hooks` (the README's test command)"
);

pub mod cutover;
pub mod mount;
pub mod pg;
pub mod s3;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The nine states of DESIGN §3, in the order of the design.
pub const STATES: [&str; 9] = [
    "pending",
    "copying",
    "copied",
    "verified",
    "failed",
    "missing",
    "conflict",
    "unsupported",
    "deleted",
];

/// How long any single command may run before the test gives up on it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(150);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cutoverfs")
}

/// A `Command` for the binary with no inherited cutoverfs settings.
pub fn command() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_remove("CUTOVERFS_LOG")
        .env_remove("CUTOVERFS_MANIFEST")
        .env_remove("CUTOVERFS_CRASH_AT")
        .env_remove("CUTOVERFS_HOLD_AT")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// The outcome of one run of the binary.
#[derive(Debug, Clone)]
pub struct Run {
    /// Exit code; None when the process was ended by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// The value of a summary line such as `Successfully copied:      3`.
    pub fn field(&self, label: &str) -> Option<String> {
        let prefix = format!("{label}:");
        self.stdout.lines().find_map(|line| {
            line.strip_prefix(&prefix)
                .map(|rest| rest.trim().to_string())
        })
    }

    /// A numeric summary field; panics with the whole output when absent.
    pub fn count(&self, label: &str) -> u64 {
        let value = self
            .field(label)
            .unwrap_or_else(|| panic!("no {label:?} line in output\n{self}"));
        value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{label:?} is not a number: {value:?}\n{self}"))
    }

    pub fn assert_code(&self, expected: i32) -> &Self {
        assert_eq!(self.code, Some(expected), "unexpected exit code\n{self}");
        self
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- exit code: {:?} ({:.2?})\n--- stdout:\n{}\n--- stderr:\n{}\n---",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs the binary to completion (with a timeout) and captures everything.
pub fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_command(command().args(args))
}

pub fn run_command(cmd: &mut Command) -> Run {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start cutoverfs");
    wait_capturing(child, started, COMMAND_TIMEOUT)
}

/// Waits for a child whose stdout and stderr are piped, killing it after `timeout`.
pub fn wait_capturing(mut child: Child, started: Instant, timeout: Duration) -> Run {
    // Either stream may go to a file instead of a pipe (the caller then reads it itself).
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(out) = out.as_mut() {
            let _ = out.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(err) = err.as_mut() {
            let _ = err.read_to_end(&mut buf);
        }
        buf
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
            panic!(
                "cutoverfs did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    Run {
        code: status.code(),
        stdout,
        stderr,
        elapsed: started.elapsed(),
    }
}

/// The manifest engine a test's `Work` uses; `both_engines!` runs a test once with each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

thread_local! {
    static ENGINE: std::cell::Cell<Engine> = const { std::cell::Cell::new(Engine::Sqlite) };
}

/// Runs `body` with every `Work::new()` on this thread using `engine`'s manifest.
pub fn with_engine(engine: Engine, body: impl FnOnce()) {
    ENGINE.with(|e| e.set(engine));
    body();
    ENGINE.with(|e| e.set(Engine::Sqlite));
}

/// Turns each `fn name() { .. }` into two tests, `name::sqlite` and `name::postgres`, whose
/// `Work`s use a SQLite manifest and a fresh database on the test binary's PostgreSQL cluster.
#[macro_export]
macro_rules! both_engines {
    ($($(#[$meta:meta])* fn $name:ident() $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                fn body() $body
                $(#[$meta])*
                #[test]
                fn sqlite() {
                    $crate::common::with_engine($crate::common::Engine::Sqlite, body)
                }
                $(#[$meta])*
                #[test]
                fn postgres() {
                    $crate::common::with_engine($crate::common::Engine::Postgres, body)
                }
            }
        )*
    };
}

/// One test's private workspace: `src/` (created), a dest path and a manifest path (not created).
/// With the PostgreSQL engine, the manifest is a fresh database (`pg_url`) and `manifest` is
/// an unused path.
pub struct Work {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub src: PathBuf,
    pub dest: PathBuf,
    pub manifest: PathBuf,
    pub pg_url: Option<String>,
}

impl Work {
    pub fn new() -> Work {
        let tmp = tempfile::Builder::new()
            .prefix("cutoverfs-it-")
            .tempdir()
            .expect("temp dir");
        // Canonical, so paths compare equal to what cutoverfs records.
        let root = fs::canonicalize(tmp.path()).unwrap();
        let src = root.join("src");
        fs::create_dir(&src).unwrap();
        let pg_url = (ENGINE.with(|e| e.get()) == Engine::Postgres)
            .then(|| pg::PgCluster::shared().create_database());
        Work {
            dest: root.join("dest"),
            manifest: root.join("state").join("manifest.db"),
            src,
            root,
            tmp,
            pg_url,
        }
    }

    pub fn engine(&self) -> Engine {
        if self.pg_url.is_some() {
            Engine::Postgres
        } else {
            Engine::Sqlite
        }
    }

    pub fn dest_url(&self) -> String {
        file_url(&self.dest)
    }

    pub fn manifest_url(&self) -> String {
        match &self.pg_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.manifest.display()),
        }
    }

    /// Writes `content` at `rel` below the source, creating parent directories.
    pub fn write(&self, rel: &str, content: &[u8]) -> PathBuf {
        write_file(&self.src.join(rel), content)
    }

    /// `--source --dest --manifest` of this workspace.
    pub fn target(&self) -> Vec<OsString> {
        vec![
            "--source".into(),
            self.src.clone().into(),
            "--dest".into(),
            self.dest_url().into(),
            "--manifest".into(),
            self.manifest_url().into(),
        ]
    }

    /// `--source --dest --manifest` of this workspace with another dest (an S3 URL).
    pub fn target_with_dest(&self, dest: &str) -> Vec<OsString> {
        vec![
            "--source".into(),
            self.src.clone().into(),
            "--dest".into(),
            dest.into(),
            "--manifest".into(),
            self.manifest_url().into(),
        ]
    }

    /// `cutoverfs <cmd> <target flags> <extra>`.
    pub fn cmd(&self, cmd: &str, extra: &[&str]) -> Run {
        let mut args: Vec<OsString> = vec![cmd.into()];
        args.extend(self.target());
        args.extend(extra.iter().map(OsString::from));
        run(args)
    }

    /// `cutoverfs sweep` with this workspace, no progress bar, fast retries (unless `extra` sets
    /// `--retry-delay`).
    pub fn sweep(&self, extra: &[&str]) -> Run {
        let mut args = vec!["--no-progress"];
        if !extra.contains(&"--retry-delay") {
            args.extend(["--retry-delay", "10ms"]);
        }
        args.extend_from_slice(extra);
        self.cmd("sweep", &args)
    }

    /// `cutoverfs <cmd> --manifest M <extra>`: relies on the pair recorded in the manifest.
    pub fn cmd_manifest_only(&self, cmd: &str, extra: &[&str]) -> Run {
        let mut args: Vec<OsString> =
            vec![cmd.into(), "--manifest".into(), self.manifest_url().into()];
        args.extend(extra.iter().map(OsString::from));
        run(args)
    }

    /// `status --json` parsed; panics with the output when it fails.
    pub fn status(&self) -> Value {
        self.status_if_any()
            .expect("status --json: no manifest at the workspace's URL")
    }

    /// `status --json` parsed, or None while no sweep or mount has created the manifest yet (on
    /// either engine); panics with the output on any other failure.
    pub fn status_if_any(&self) -> Option<Value> {
        let run = self.cmd_manifest_only("status", &["--json"]);
        if run.code == Some(2) && run.stderr.contains("no manifest at") {
            return None;
        }
        run.assert_code(0);
        Some(
            serde_json::from_str(&run.stdout)
                .unwrap_or_else(|e| panic!("status --json is not JSON: {e}\n{run}")),
        )
    }
}

impl Default for Work {
    fn default() -> Self {
        Work::new()
    }
}

/// A local address nothing listens on now (for `--metrics`).
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

impl Work {
    /// `mount` arguments for this work's dest and manifest, serving metrics at `addr`.
    pub fn metrics_mount_args(&self, addr: &str) -> Vec<std::ffi::OsString> {
        [
            "--dest",
            &self.dest_url(),
            "--manifest",
            &self.manifest_url(),
            "--metrics",
            addr,
        ]
        .iter()
        .map(Into::into)
        .collect()
    }
}

/// Runs `sql` on a SQLite manifest behind cutoverfs' back: with the `sqlite3` shell when there
/// is one, else with Python's sqlite3 module (Debian's python3, which `.ci/run` installs).
pub fn sqlite_exec(db: &Path, sql: &str) {
    let shell = Command::new("sqlite3").arg(db).arg(sql).output();
    if matches!(&shell, Ok(out) if out.status.success()) {
        return;
    }
    let script = format!(
        "import sqlite3; c = sqlite3.connect({:?}); c.executescript({sql:?}); c.commit()",
        db.display().to_string()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 for sqlite3");
    assert!(
        out.status.success(),
        "cannot run {sql:?} on {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

pub fn write_file(path: &Path, content: &[u8]) -> PathBuf {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, content).unwrap();
    path.to_path_buf()
}

/// Sets a file's access and modification times.
pub fn set_times(path: &Path, atime: SystemTime, mtime: SystemTime) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_times(fs::FileTimes::new().set_accessed(atime).set_modified(mtime))
        .unwrap();
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// xorshift64: small, reproducible randomness for delays and sizes.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// What the tests compare about one entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    File {
        sha256: String,
        size: u64,
        mode: u32,
        mtime_ns: i64,
        uid: u32,
        gid: u32,
    },
    Other {
        kind: String,
    },
}

/// Every entry below `root` (relative paths), symlinks not followed.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for entry in
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        {
            let entry = entry.unwrap();
            let rel_child = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            let ft = meta.file_type();
            let value = if ft.is_dir() {
                stack.push(rel_child.clone());
                Entry::Dir {
                    mode: meta.mode() & 0o7777,
                }
            } else if ft.is_file() {
                let bytes = fs::read(entry.path()).unwrap();
                Entry::File {
                    sha256: sha256_hex(&bytes),
                    size: meta.size(),
                    mode: meta.mode() & 0o7777,
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                    uid: meta.uid(),
                    gid: meta.gid(),
                }
            } else {
                Entry::Other {
                    kind: format!("{ft:?}"),
                }
            };
            out.insert(rel_child, value);
        }
    }
    out
}

/// Only the regular files of a snapshot.
pub fn files_of(snapshot: &BTreeMap<PathBuf, Entry>) -> BTreeMap<PathBuf, Entry> {
    snapshot
        .iter()
        .filter(|(_, e)| matches!(e, Entry::File { .. }))
        .map(|(p, e)| (p.clone(), e.clone()))
        .collect()
}

/// Asserts that every regular file of `src` is at `dest` with the same content, size, mode,
/// mtime and owner, that directories exist with the same mode, and that `dest` holds nothing
/// else.
pub fn assert_trees_equal(src: &Path, dest: &Path) {
    let a = snapshot(src);
    let b = snapshot(dest);
    let mut problems = Vec::new();
    for (path, entry) in &a {
        match (entry, b.get(path)) {
            (Entry::Other { .. }, _) => {}
            (_, None) => problems.push(format!("{} is missing at dest", path.display())),
            (want, Some(got)) if want != got => problems.push(format!(
                "{}: source {want:?} but dest {got:?}",
                path.display()
            )),
            _ => {}
        }
    }
    for path in b.keys() {
        if !a.contains_key(path) {
            problems.push(format!(
                "{} is at dest but not in the source",
                path.display()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "trees differ ({} problems):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Names in `dest` that look like cutoverfs temporary files (".cutoverfs-*").
pub fn leftover_temp_files(dest: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if !dest.exists() {
        return found;
    }
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name().as_bytes().starts_with(b".cutoverfs-") {
                found.push(entry.path());
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found
}

/// The number at `files.<state>` (or `bytes.<state>`) of a `status --json` value.
pub fn state_count(status: &Value, section: &str, state: &str) -> u64 {
    status[section][state]
        .as_u64()
        .unwrap_or_else(|| panic!("no number at {section}.{state} in {status:#}"))
}

/// Asserts that `status.files` has exactly these non-zero states (all others zero).
pub fn assert_file_states(status: &Value, expected: &[(&str, u64)]) {
    for state in STATES {
        let want = expected
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        assert_eq!(
            state_count(status, "files", state),
            want,
            "files.{state} in status:\n{status:#}"
        );
    }
}

/// The problems of a `status --json` value with this path.
pub fn problem<'a>(status: &'a Value, path: &str) -> Option<&'a Value> {
    status["problems"]
        .as_array()?
        .iter()
        .find(|p| p["path"].as_str() == Some(path))
}

/// Every file (name and bytes) below `dir`, for "nothing changed" checks.
pub fn dir_contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return out;
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                out.insert(entry.path(), fs::read(entry.path()).unwrap_or_default());
            }
        }
    }
    out
}

/// A tree of `count` small files (sizes `lo..=hi` bytes) spread over `folders` top-level
/// folders with one level of subfolders. Returns the total bytes.
pub fn small_tree(work: &Work, count: usize, folders: usize, lo: u64, hi: u64, seed: u64) -> u64 {
    let mut rng = XorShift::new(seed);
    let mut total = 0;
    for i in 0..count {
        let len = rng.range(lo, hi) as usize;
        let rel = format!("f{:02}/s{}/file-{i:05}.bin", i % folders, (i / folders) % 5);
        work.write(
            &rel,
            &pseudo_random(len, seed.wrapping_mul(1_000_003) + i as u64),
        );
        total += len as u64;
    }
    total
}

/// How long a test waits for a process to reach a hold point. Generous: it protects against a
/// point that is never reached (a hang or a wrong name), not against a slow machine.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(120);

/// A hold point of the binary (src/testhook.rs): the process stops there until released, so a
/// test acts while a copy, a purge or a sweep is in progress for certain.
pub struct Hold {
    dir: tempfile::TempDir,
    point: String,
    subject: Option<String>,
}

impl Hold {
    /// Holds the first passage of `point` (for any subject).
    pub fn at(point: &str) -> Hold {
        Hold {
            dir: tempfile::Builder::new()
                .prefix("cutoverfs-hold-")
                .tempdir()
                .expect("hold dir"),
            point: point.to_string(),
            subject: None,
        }
    }

    /// Holds the first passage of `point` for `subject` (e.g. a file's path).
    pub fn at_subject(point: &str, subject: &str) -> Hold {
        Hold {
            subject: Some(subject.to_string()),
            ..Hold::at(point)
        }
    }

    /// The environment that asks a process for this hold.
    pub fn env(&self) -> Vec<(String, String)> {
        let at = match &self.subject {
            Some(subject) => format!("{}@{subject}", self.point),
            None => self.point.clone(),
        };
        vec![
            ("CUTOVERFS_HOLD_AT".into(), at),
            (
                "CUTOVERFS_HOLD_DIR".into(),
                self.dir.path().display().to_string(),
            ),
        ]
    }

    pub fn apply(&self, cmd: &mut Command) {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }

    fn file(&self, what: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.{what}", self.point.replace(':', "-")))
    }

    pub fn is_reached(&self) -> bool {
        self.file("reached").exists()
    }

    /// Waits until the process is held there; returns the subject it was held for. Panics after
    /// `HOLD_TIMEOUT`, or at once when `alive` says the process ended.
    pub fn wait_reached(&self, mut alive: impl FnMut() -> bool) -> String {
        let started = Instant::now();
        loop {
            if let Ok(subject) = fs::read_to_string(self.file("reached")) {
                return subject;
            }
            assert!(
                alive(),
                "the process ended before reaching the hold point {}",
                self.point
            );
            assert!(
                started.elapsed() < HOLD_TIMEOUT,
                "the hold point {} was not reached in {HOLD_TIMEOUT:?}",
                self.point
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn release(&self) {
        fs::write(self.file("release"), b"").expect("release the hold");
    }
}

/// The python of the Django tier (`CUTOVERFS_TEST_PYTHON`), checked to import `modules`
/// (comma-separated, e.g. "django, storages, boto3"). Unset or lacking a module means the tier
/// was asked for without its tool: a failure, never a silent skip. .ci/run builds it:
/// `python3 -m venv VENV && VENV/bin/pip install 'Django>=4.2,<6' 'django-storages[s3]>=1.14'`.
pub fn django_python(modules: &str) -> PathBuf {
    let python = match std::env::var_os("CUTOVERFS_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "CUTOVERFS_TEST_PYTHON is not set: this test needs a python that can import {modules} \
             (.ci/run builds one: python3 -m venv VENV && VENV/bin/pip install 'Django>=4.2,<6' \
             'django-storages[s3]>=1.14'; then CUTOVERFS_TEST_PYTHON=VENV/bin/python cargo test \
             --features test-hooks --test NAME -- --ignored)"
        ),
    };
    let out = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .unwrap_or_else(|e| panic!("CUTOVERFS_TEST_PYTHON={}: {e}", python.display()));
    assert!(
        out.status.success(),
        "CUTOVERFS_TEST_PYTHON={} cannot import {modules}:\n{}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    python
}
