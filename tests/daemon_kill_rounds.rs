//! The daemon killed -9 in rounds (DESIGN §4.1, §4.7): at random moments, while the sweeper and
//! copy-on-read are copying and the application writes, renames, deletes, changes modes and
//! reads through the mount, with a purge between rounds; after each restart on the same
//! mountpoint the tree is exactly what a reference model of the application's acknowledged
//! operations says (names, sizes, modes, bytes), and in the end the dest and `verify --deep`
//! agree with it too. On `file://` and on S3.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cutover::Cutover;
use common::mount::{wait_until, Daemon};
use common::*;

/// What the application believes is in its directory: path → (bytes, mode).
type Tree = BTreeMap<String, (Vec<u8>, u32)>;

const DIRS: [&str; 4] = ["a", "b", "c/deep", "d"];
const ROUNDS: u64 = 14;

/// One operation of the application, as it made it.
#[derive(Debug, Clone)]
enum Op {
    Write(String, Vec<u8>),
    Append(String, Vec<u8>),
    Rename(String, String),
    Delete(String),
    Chmod(String, u32),
    Read(String),
}

impl Op {
    /// The paths whose state is unknown when this operation was cut off by the kill.
    fn paths(&self) -> Vec<&str> {
        match self {
            Op::Write(p, _) | Op::Append(p, _) | Op::Delete(p) | Op::Chmod(p, _) | Op::Read(p) => {
                vec![p]
            }
            Op::Rename(a, b) => vec![a, b],
        }
    }

    fn apply(&self, tree: &mut Tree) {
        match self {
            Op::Write(p, bytes) => {
                let mode = tree.get(p).map_or(0o644, |(_, m)| *m);
                tree.insert(p.clone(), (bytes.clone(), mode));
            }
            Op::Append(p, bytes) => tree.get_mut(p).unwrap().0.extend_from_slice(bytes),
            Op::Rename(a, b) => {
                let moved = tree.remove(a).unwrap();
                tree.insert(b.clone(), moved);
            }
            Op::Delete(p) => {
                tree.remove(p);
            }
            Op::Chmod(p, mode) => tree.get_mut(p).unwrap().1 = *mode,
            Op::Read(_) => {}
        }
    }

    /// Makes it through the mount; a read must return what the model holds.
    fn run(&self, mnt: &Path, tree: &Tree) -> std::io::Result<()> {
        match self {
            Op::Write(p, bytes) => fs::write(mnt.join(p), bytes),
            Op::Append(p, bytes) => {
                use std::io::Write;
                fs::OpenOptions::new()
                    .append(true)
                    .open(mnt.join(p))?
                    .write_all(bytes)
            }
            Op::Rename(a, b) => fs::rename(mnt.join(a), mnt.join(b)),
            Op::Delete(p) => fs::remove_file(mnt.join(p)),
            Op::Chmod(p, mode) => {
                fs::set_permissions(mnt.join(p), fs::Permissions::from_mode(*mode))
            }
            Op::Read(p) => {
                let got = fs::read(mnt.join(p))?;
                assert!(got == tree[p].0, "{p}: the mount served other bytes");
                Ok(())
            }
        }
    }
}

fn next_op(rng: &mut XorShift, tree: &Tree, serial: &mut u64) -> Op {
    let existing: Vec<&String> = tree.keys().collect();
    let pick =
        |rng: &mut XorShift| existing[rng.range(0, existing.len() as u64 - 1) as usize].clone();
    let mut new_path = |rng: &mut XorShift| {
        *serial += 1;
        format!(
            "{}/n{}.bin",
            DIRS[rng.range(0, DIRS.len() as u64 - 1) as usize],
            serial
        )
    };
    let bytes = |rng: &mut XorShift| {
        let len = rng.range(1, 40_000) as usize;
        pseudo_random(len, rng.next_u64())
    };
    match rng.range(0, 9) {
        _ if existing.len() < 10 => Op::Write(new_path(rng), bytes(rng)),
        0 | 1 => Op::Write(new_path(rng), bytes(rng)),
        2 => Op::Write(pick(rng), bytes(rng)),
        3 => Op::Append(pick(rng), bytes(rng)),
        4 => Op::Rename(pick(rng), new_path(rng)),
        5 => Op::Delete(pick(rng)),
        6 => Op::Chmod(pick(rng), [0o600, 0o640, 0o644][rng.range(0, 2) as usize]),
        _ => Op::Read(pick(rng)),
    }
}

/// What the local tree, the dest and the manifest's trail say of `rel`: for a failure message.
fn diagnose(c: &Cutover, daemon: &Daemon, rel: &str) -> String {
    let local = fs::metadata(c.w.src.join(rel)).map(|m| m.len());
    let dest = c.read_dest(rel).map(|b| b.len());
    let trail = c.w.cmd_manifest_only("log", &["--path", rel]).stdout;
    let log = daemon.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(rel)).collect();
    format!(
        "{rel}: local copy {local:?} bytes, dest copy {dest:?} bytes; trail:\n{trail}\nthe daemon's log of it:\n{}",
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// The tree as the mount shows it.
fn seen(c: &Cutover, daemon: &Daemon, mnt: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(mnt.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let child = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(child);
            } else {
                let bytes = fs::read(entry.path()).unwrap();
                assert_eq!(
                    bytes.len() as u64,
                    meta.len(),
                    "size and bytes differ: {}",
                    diagnose(c, daemon, &child.to_string_lossy())
                );
                out.insert(
                    child.to_string_lossy().into_owned(),
                    (bytes, meta.permissions().mode() & 0o7777),
                );
            }
        }
    }
    out
}

/// The mount shows the model exactly, but for the paths of an operation the kill cut off,
/// which may show it done or not (a write cut off may have left any part of its bytes, as on a
/// plain directory); the model then takes what the mount shows for those.
fn check_and_settle(
    c: &Cutover,
    daemon: &Daemon,
    mnt: &Path,
    tree: &mut Tree,
    cut_off: Option<&Op>,
    round: u64,
) {
    let now = seen(c, daemon, mnt);
    let unsure: Vec<&str> = cut_off.map(|op| op.paths()).unwrap_or_default();
    let differing: Vec<&String> = now
        .keys()
        .chain(tree.keys())
        .filter(|p| !unsure.contains(&p.as_str()) && now.get(*p) != tree.get(*p))
        .collect();
    assert!(
        differing.is_empty(),
        "round {round}: the tree differs from the model at {differing:?} (cut off: {:?})\n{}",
        cut_off.map(|op| op.paths()),
        differing
            .iter()
            .map(|p| format!(
                "shown {:?}, model {:?}; {}",
                now.get(*p).map(|(b, m)| (b.len(), format!("{m:o}"))),
                tree.get(*p).map(|(b, m)| (b.len(), format!("{m:o}"))),
                diagnose(c, daemon, p)
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    if let Some(op) = cut_off {
        if let Op::Rename(a, b) = op {
            let before = tree.get(a).cloned();
            let ok = (now.get(a) == before.as_ref() && !now.contains_key(b))
                || (!now.contains_key(a) && now.get(b) == before.as_ref());
            assert!(
                ok,
                "round {round}: a rename cut off is neither done nor undone: {op:?}"
            );
        }
        for p in unsure {
            match now.get(p) {
                Some(state) => tree.insert(p.to_string(), state.clone()),
                None => tree.remove(p),
            };
        }
    }
}

fn daemon_args(c: &Cutover, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args = c.target();
    args.extend(
        ["--lease-timeout", "2s", "--bwlimit", "1MiB"]
            .iter()
            .chain(extra)
            .map(std::ffi::OsString::from),
    );
    args
}

fn kill_rounds(c: Cutover) {
    let mut rng = XorShift::new(if matches!(c.dest, common::cutover::Dest::File) {
        7
    } else {
        11
    });
    for dir in DIRS {
        fs::create_dir_all(c.w.src.join(dir)).unwrap();
    }
    let mut tree = Tree::new();
    for i in 0..120 {
        let rel = format!("{}/f{i}.bin", DIRS[i % DIRS.len()]);
        let bytes = pseudo_random(rng.range(1, 60_000) as usize, i as u64);
        c.w.write(&rel, &bytes);
        tree.insert(rel, (bytes, 0o644));
    }
    for rel in tree.keys() {
        fs::set_permissions(c.w.src.join(rel), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mnt = c.w.root.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mut serial = 0;
    let (mut crashed_itself, mut cut_offs, mut purges) = (0, 0, 0);
    let crash_points = [
        "sweep:copied",
        "sweep:recorded",
        "remove:recorded",
        "remove:local-done",
        "rename:recorded",
        "rename:local-done",
    ];
    for round in 0..ROUNDS {
        // Odd rounds: the daemon kills itself at one of its steps; even rounds: the
        // test kills it after a random number of the application's operations.
        let mut env = c.env();
        if round % 2 == 1 {
            // Every point in turn, at a random passage.
            let point = crash_points[(round as usize / 2) % crash_points.len()];
            env.push((
                "CUTOVERFS_CRASH_AT".into(),
                format!("{point}#{}", rng.range(1, 3)),
            ));
        }
        let mut daemon = Daemon::start_with_env(&mnt, &daemon_args(&c, &[]), &env);
        let kill_after = rng.range(5, 40) as usize;
        let done = Arc::new(AtomicUsize::new(0));
        let ops: Vec<Op> = {
            let mut planned = tree.clone();
            (0..80)
                .map(|_| {
                    let op = next_op(&mut rng, &planned, &mut serial);
                    op.apply(&mut planned);
                    op
                })
                .collect()
        };
        let worker = {
            let (mnt, done, mut model, ops) =
                (mnt.clone(), done.clone(), tree.clone(), ops.clone());
            std::thread::spawn(move || {
                for op in &ops {
                    if op.run(&mnt, &model).is_err() {
                        return (model, Some(op.clone()));
                    }
                    op.apply(&mut model);
                    done.fetch_add(1, Ordering::SeqCst);
                }
                (model, None)
            })
        };
        // Killed by the test after `kill_after` operations, or by itself at its crash point
        // (if it is not reached before the operations end, the test kills it then).
        wait_until(
            Duration::from_secs(120),
            "the application's operations",
            || {
                done.load(Ordering::SeqCst) >= kill_after.min(ops.len())
                    && (round % 2 == 0 || worker.is_finished())
                    || daemon.has_exited()
            },
        );
        let stale = if daemon.has_exited() {
            crashed_itself += 1;
            daemon.crashed()
        } else {
            daemon.kill9()
        };
        let (model, cut_off) = worker.join().unwrap();
        cut_offs += usize::from(cut_off.is_some());
        tree = model;
        drop(stale);

        let daemon = Daemon::start_with_env(&mnt, &daemon_args(&c, &[]), &c.env());
        check_and_settle(&c, &daemon, &mnt, &mut tree, cut_off.as_ref(), round);
        if round % 3 == 2 {
            // A purge between rounds, while the mount serves: the view does not change.
            let purge = c.run("purge", &["--confirm"]);
            purges += purge.count("Local copies deleted");
            check_and_settle(&c, &daemon, &mnt, &mut tree, None, round);
        }
        daemon.stop();
    }

    eprintln!(
        "{}: {ROUNDS} rounds, {crashed_itself} daemons killed at their crash point, {cut_offs} operations cut off, {purges} local copies purged between rounds",
        c.name()
    );
    assert!(
        crashed_itself >= 2,
        "too few rounds reached their crash point"
    );
    assert!(purges > 0, "the purges between rounds purged nothing");
    // In the end: everything copied, the dest and a deep verify agree with the model.
    let daemon = Daemon::start_with_env(&mnt, &c.target(), &c.env());
    let all_verified = |status: &serde_json::Value| {
        state_count(status, "files", "verified") == tree.len() as u64
            && ["pending", "copying", "failed", "conflict"]
                .iter()
                .all(|s| state_count(status, "files", s) == 0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let status = c.w.status();
        if all_verified(&status) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: not every file verified in 120 s: {status:#}\n{}",
            c.name(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    check_and_settle(&c, &daemon, &mnt, &mut tree, None, ROUNDS);
    // Objects of removed files go in the background (a copy that was in flight when its file
    // was removed may land late at an S3 server, and is deleted once it has).
    let wanted: std::collections::BTreeSet<String> = tree.keys().cloned().collect();
    let settled = || {
        c.dest_paths()
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            == wanted
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !settled() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop();
    c.run("verify", &["--deep"]).assert_code(0);
    let at_dest: std::collections::BTreeSet<String> = c.dest_paths().into_iter().collect();
    let extra: Vec<_> = at_dest.difference(&wanted).collect();
    let lacking: Vec<_> = wanted.difference(&at_dest).collect();
    let trails: Vec<String> = extra
        .iter()
        .map(|p| c.w.cmd_manifest_only("log", &["--path", p]).stdout)
        .collect();
    assert!(
        extra.is_empty() && lacking.is_empty(),
        "{}: objects at the dest that should not be there: {extra:?}; missing: {lacking:?}\n{}",
        c.name(),
        trails.join("\n")
    );
    for (rel, (bytes, mode)) in &tree {
        assert!(
            c.read_dest(rel).as_ref() == Some(bytes),
            "{}: {rel} at the dest",
            c.name()
        );
        if matches!(c.dest, common::cutover::Dest::File) {
            let at = fs::metadata(c.dest_file(rel)).unwrap().permissions().mode() & 0o7777;
            assert_eq!(at, *mode, "{rel}: mode at the dest");
        }
    }
}

#[test]
fn file_dest_survives_kill_9_rounds_under_load() {
    kill_rounds(Cutover::file());
}

#[test]
fn s3_dest_survives_kill_9_rounds_under_load() {
    kill_rounds(Cutover::s3());
}
