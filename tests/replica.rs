//! Replica mounts (issue 7.3, 7.4): `cutoverfs mount --no-source` on a "machine" without the
//! local tree, beside node A mounted over the source, both on one manifest and one dest.
//! A replica reads every file byte-identical; a file not migrated yet is copied on its request
//! by a node that has the source, or fails with EIO after --remote-wait when none runs; changes
//! made through A show on the replica within the documented bound; the replica refuses changes.

mod common;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mount::{wait_until, Daemon};
use common::{files_of, pseudo_random, run, small_tree, snapshot, Work};

/// The replicas' settings in these tests, and the bound they give (docs/multi-node.md): a
/// change made on A shows on the replica within --manifest-cache + --attr-timeout.
const ATTR_TIMEOUT: &str = "1s";
const MANIFEST_CACHE: &str = "1s";
const BOUND: Duration = Duration::from_secs(2);
/// Polling and scheduling on a busy 2-core machine, on top of the bound. Generous, yet well
/// under what a cache that ignores its settings would show (the defaults are 10 s and more).
const SLACK: Duration = Duration::from_secs(3);
/// Time for node A to copy a small file it has just written (the replica's open waits for it).
const COPY: Duration = Duration::from_secs(3);
/// The replica's --remote-wait in the request test: long enough for node A to copy a file on
/// request on a busy machine, short enough to wait out when no node with the source runs.
const REMOTE_WAIT: Duration = Duration::from_secs(10);

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Node A: the daemon mounted over the source itself (its sweeper runs unless `extra` says
/// --no-sweep).
fn node_a(w: &Work, extra: &[&str]) -> Daemon {
    let mut args = os(&["--dest", &w.dest_url(), "--manifest", &w.manifest_url()]);
    args.extend(os(extra));
    let daemon = Daemon::start(&w.src, &args);
    daemon.wait_for_scan();
    daemon
}

/// A replica at `name` beside the workspace: no source, the dest recorded in the manifest.
fn replica(w: &Work, name: &str, extra: &[&str]) -> (PathBuf, Daemon) {
    let mnt = w.root.join(name);
    fs::create_dir(&mnt).unwrap();
    let mut args = os(&[
        "--no-source",
        "--manifest",
        &w.manifest_url(),
        "--attr-timeout",
        ATTR_TIMEOUT,
        "--manifest-cache",
        MANIFEST_CACHE,
    ]);
    args.extend(os(extra));
    let daemon = Daemon::start(&mnt, &args);
    (mnt, daemon)
}

fn verified_files(w: &Work) -> u64 {
    common::state_count(&w.status(), "files", "verified")
}

/// How long after `since` `check` first held (polled every 20 ms, up to 20 s).
fn seen_after(since: Instant, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    while !check() {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "{what}: not seen on the replica after 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    since.elapsed()
}

fn erofs(result: std::io::Result<impl std::fmt::Debug>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
        Ok(v) => panic!("{what} succeeded on a replica: {v:?}"),
    }
}

both_engines! {
    fn a_replica_serves_the_migrated_tree_follows_changes_and_refuses_writes() {
        let w = Work::new();
        small_tree(&w, 60, 6, 10, 40_000, 7);
        w.write("deep/er/still/big.bin", &pseudo_random(3 << 20, 8));
        std::os::unix::fs::symlink("../deep/er/still/big.bin", w.src.join("f00/link")).unwrap();
        let a = node_a(&w, &[]);
        let total = 61;
        wait_until(Duration::from_secs(40), "every file verified", || {
            verified_files(&w) == total
        });
        let (b, replica_daemon) = replica(&w, "replica", &[]);

        // Walk and hash: the same files, bytes, sizes, modes, mtimes and owners as node A shows.
        let on_a = files_of(&snapshot(&w.src));
        let on_b = files_of(&snapshot(&b));
        assert_eq!(on_a.len() as u64, total);
        assert_eq!(on_a, on_b, "the replica's files differ from node A's");
        assert_eq!(
            fs::read_link(b.join("f00/link")).unwrap(),
            Path::new("../deep/er/still/big.bin")
        );

        // Changes through A, each timed until the replica shows it. Right before each, the
        // replica looks at the paths involved, so its caches (kernel and manifest rows, found
        // and not found) hold what is about to change: the worst case.
        let mut seen = Vec::new();
        let warm = |paths: &[&str]| {
            for path in paths {
                let _ = fs::read(b.join(path));
            }
        };
        warm(&["f01/s0/new.txt"]);
        fs::write(w.src.join("f01/s0/new.txt"), b"written on node A").unwrap();
        let t = Instant::now();
        seen.push(("new name", seen_after(t, "new name", || b.join("f01/s0/new.txt").exists())));
        seen.push(("new file content", seen_after(t, "new file content", || {
            fs::read(b.join("f01/s0/new.txt")).ok().as_deref() == Some(b"written on node A")
        })));

        let renamed_from = "f02/s0/file-00002.bin";
        warm(&[renamed_from, "f02/s0/renamed.bin"]);
        fs::rename(w.src.join(renamed_from), w.src.join("f02/s0/renamed.bin")).unwrap();
        let t = Instant::now();
        seen.push(("rename", seen_after(t, "rename", || {
            !b.join(renamed_from).exists() && b.join("f02/s0/renamed.bin").exists()
        })));

        let removed = "f03/s0/file-00003.bin";
        warm(&[removed]);
        fs::remove_file(w.src.join(removed)).unwrap();
        let t = Instant::now();
        seen.push(("unlink", seen_after(t, "unlink", || !b.join(removed).exists())));

        let rewritten = "f04/s0/file-00004.bin";
        let old_content = fs::read(b.join(rewritten)).unwrap();
        let new_content = pseudo_random(5000, 99);
        warm(&[rewritten]);
        fs::write(w.src.join(rewritten), &new_content).unwrap();
        let t = Instant::now();
        seen.push(("rewrite", seen_after(t, "rewrite", || {
            let got = fs::read(b.join(rewritten)).unwrap();
            assert!(got == old_content || got == new_content, "the replica read neither version");
            got == new_content
        })));
        eprintln!("seen on the replica after: {seen:?} (bound {BOUND:?})");
        for (what, after) in &seen {
            // New content is served once node A has copied it: that copy comes on top.
            let copy = if what.contains("content") || *what == "rewrite" { COPY } else { Duration::ZERO };
            assert!(
                *after <= BOUND + SLACK + copy,
                "{what} took {after:?} to show on the replica (bound {BOUND:?})\n{}",
                replica_daemon.log_text()
            );
        }
        // The renamed file's content on the replica is what it was.
        assert_eq!(
            fs::read(b.join("f02/s0/renamed.bin")).unwrap(),
            fs::read(w.src.join("f02/s0/renamed.bin")).unwrap()
        );

        // Nothing can be changed on a replica.
        let existing = b.join("f00/s0/file-00000.bin");
        erofs(fs::write(b.join("f00/made-on-b.txt"), b"x"), "create");
        erofs(fs::OpenOptions::new().append(true).open(&existing), "open for writing");
        erofs(fs::OpenOptions::new().write(true).truncate(true).open(&existing), "truncate");
        erofs(fs::create_dir(b.join("f00/newdir")), "mkdir");
        erofs(fs::remove_file(&existing), "unlink");
        erofs(fs::rename(&existing, b.join("f00/moved")), "rename");
        erofs(fs::remove_dir(b.join("f05/s1")), "rmdir");
        erofs(fs::set_permissions(&existing, std::os::unix::fs::PermissionsExt::from_mode(0o600)), "chmod");
        erofs(std::os::unix::fs::symlink("x", b.join("f00/l2")), "symlink");
        assert!(existing.exists(), "a refused unlink removed nothing");

        let log = replica_daemon.stop();
        assert!(!log.contains("ERROR"), "{log}");
        a.stop();
        // The replica changed nothing on node A's side.
        assert!(w.src.join("f00/s0/file-00000.bin").exists());
    }

    fn a_file_not_migrated_is_copied_on_the_replicas_request_or_fails_after_the_wait() {
        let w = Work::new();
        small_tree(&w, 20, 2, 100, 20_000, 11);
        w.write("wanted/photo.jpg", &pseudo_random(200_000, 12));
        w.write("wanted/other.jpg", &pseudo_random(1000, 13));
        // --no-sweep: nothing is copied unless a replica asks.
        let a = node_a(&w, &["--no-sweep"]);
        assert_eq!(verified_files(&w), 0);
        let remote_wait = format!("{}s", REMOTE_WAIT.as_secs());
        let (b, replica_daemon) =
            replica(&w, "replica", &["--remote-wait", &remote_wait, "--fuse-threads", "2"]);
        // The namespace is there before any copy.
        assert_eq!(fs::read_dir(b.join("wanted")).unwrap().count(), 2);
        assert_eq!(fs::metadata(b.join("wanted/photo.jpg")).unwrap().len(), 200_000);

        let t = Instant::now();
        let got = fs::read(b.join("wanted/photo.jpg"))
            .unwrap_or_else(|e| panic!("read on the replica: {e}\n{}", replica_daemon.log_text()));
        let waited = t.elapsed();
        assert!(got == pseudo_random(200_000, 12), "the replica read other bytes");
        eprintln!("a requested copy was served after {waited:?}");
        assert!(waited < REMOTE_WAIT, "waited {waited:?}");
        // Only the request made node A copy: the rest is still pending.
        assert_eq!(verified_files(&w), 1, "node A copied more than it was asked");
        assert!(replica_daemon.log_text().contains("copy requested from a node with the source"));

        // No node with the source: opens fail after --remote-wait, with a log line. More of
        // them wait at once than the replica has FUSE threads (2), and other requests are
        // answered meanwhile: a waiting open holds no FUSE thread.
        a.stop();
        let waiting: Vec<_> = [
            "wanted/other.jpg",
            "f00/s0/file-00000.bin",
            "f01/s0/file-00001.bin",
            "f00/s1/file-00002.bin",
        ]
        .iter()
        .map(|rel| {
            let path = b.join(rel);
            std::thread::spawn(move || {
                let t = Instant::now();
                (fs::read(path).expect_err("read without any source node"), t.elapsed())
            })
        })
        .collect();
        // Every one of them is waiting once it has asked for its copy.
        let requested = "copy requested from a node with the source";
        wait_until(Duration::from_secs(30), "the four opens waiting", || {
            replica_daemon.log_text().matches(requested).count() >= 5
        });
        let t = Instant::now();
        assert!(fs::read(b.join("wanted/photo.jpg")).unwrap() == pseudo_random(200_000, 12));
        assert_eq!(fs::read_dir(b.join("f00/s0")).unwrap().count(), 2);
        // Well under the wait the others are in: this read did not queue behind them.
        assert!(
            t.elapsed() < REMOTE_WAIT / 3,
            "a read waited behind the waiting opens: {:?}",
            t.elapsed()
        );
        for waiter in waiting {
            let (err, waited) = waiter.join().unwrap();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
            assert!(
                waited >= REMOTE_WAIT - Duration::from_millis(100) && waited < REMOTE_WAIT * 3,
                "EIO after {waited:?}, --remote-wait {remote_wait}"
            );
        }
        let log = replica_daemon.stop();
        assert!(
            log.contains("no node with the source copied this file in time")
                && log.contains("wanted/other.jpg"),
            "{log}"
        );
        assert_eq!(verified_files(&w), 1);
    }
}

#[test]
fn bad_replica_input_mounts_nothing_and_says_why() {
    let w = Work::new();
    w.write("a.txt", b"a");
    let mnt = w.root.join("replica");
    fs::create_dir(&mnt).unwrap();
    let mnt_s = mnt.to_str().unwrap();
    let manifest = w.manifest_url();

    let both = run([
        "mount",
        mnt_s,
        "--no-source",
        "--source",
        w.src.to_str().unwrap(),
        "--manifest",
        &manifest,
        "--foreground",
    ]);
    both.assert_code(2);
    assert!(
        both.stderr.contains("--no-source") && both.stderr.contains("--source"),
        "{both}"
    );

    let none = run([
        "mount",
        mnt_s,
        "--no-source",
        "--manifest",
        &manifest,
        "--foreground",
    ]);
    none.assert_code(2);
    assert!(none.stderr.contains("no manifest at"), "{none}");
    assert!(
        !w.manifest.exists(),
        "a refused replica created the manifest"
    );

    w.sweep(&[]).assert_code(0);
    let other = w.root.join("other-dest");
    fs::create_dir(&other).unwrap();
    let wrong = run([
        "mount",
        mnt_s,
        "--no-source",
        "--manifest",
        &manifest,
        "--dest",
        &common::file_url(&other),
        "--foreground",
    ]);
    wrong.assert_code(2);
    assert!(
        wrong.stderr.contains("is not the dest of this migration"),
        "{wrong}"
    );

    let over_source = run([
        "mount",
        w.src.to_str().unwrap(),
        "--no-source",
        "--manifest",
        &manifest,
        "--foreground",
    ]);
    over_source.assert_code(2);
    assert!(
        over_source.stderr.contains("would hide them"),
        "{over_source}"
    );
    assert!(!common::mount::is_mounted(&mnt) && !common::mount::is_mounted(&w.src));
    assert_eq!(fs::read(w.src.join("a.txt")).unwrap(), b"a");
}
