//! The mount (issue 4, DESIGN §1, §4.5, §4.6, §5), on real FUSE mounts: the application's view
//! stays identical while files move, verified files come from the dest, the first open queues a
//! copy, a dest that goes down leaves local files readable, a killed daemon's stale mount is
//! cleaned up on restart, and bad input mounts nothing.

mod common;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::mount::{answered, is_mounted, served, wait_until, Daemon};
use common::s3::S3Server;
use common::*;

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A tree with what an application's media folder holds: nested folders, odd modes and
/// times, an empty file, a file of several MiB.
fn media_tree(w: &Work) {
    small_tree(w, 60, 6, 0, 5000, 7);
    w.write(
        "documents/2025/01/19/invoice.pdf",
        &pseudo_random(3 << 20, 3),
    );
    w.write("empty.txt", b"");
    let private = w.write("contracts/secret.txt", b"private");
    set_mode(&private, 0o640);
    set_mode(&w.src.join("contracts"), 0o750);
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    set_times(&w.src.join("empty.txt"), old, old);
}

fn all_verified(w: &Work) -> bool {
    let status = w.status();
    let files = status["files"].as_object().unwrap();
    files
        .iter()
        .all(|(state, n)| state == "verified" || state == "unsupported" || n == 0)
        && state_count(&status, "files", "verified") > 0
}

/// Mounts at `root/mnt` a source that stays reachable at `w.src` (to change it behind the mount).
fn mount_beside(
    w: &Work,
    dest: &str,
    extra: &[&str],
    env: &[(String, String)],
) -> (std::path::PathBuf, Daemon) {
    let mnt = w.root.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut args = os(&[
        "--source",
        w.src.to_str().unwrap(),
        "--dest",
        dest,
        "--manifest",
        &w.manifest_url(),
    ]);
    args.extend(os(extra));
    let daemon = Daemon::start_with_env(&mnt, &args, env);
    (mnt, daemon)
}

/// `cutoverfs sweep` of the workspace's source to an S3 dest.
fn sweep_to_s3(server: &S3Server, w: &Work, dest: &str) {
    let mut sweep = command();
    server.apply_env(&mut sweep);
    run_command(sweep.arg("sweep").args([
        "--source",
        w.src.to_str().unwrap(),
        "--dest",
        dest,
        "--manifest",
        &w.manifest_url(),
        "--no-progress",
    ]))
    .assert_code(0);
}

fn mount_args(w: &Work, extra: &[&str]) -> Vec<OsString> {
    let mut args = os(&["--dest", &w.dest_url(), "--manifest", &w.manifest_url()]);
    args.extend(os(extra));
    args
}

#[test]
fn the_application_sees_the_same_tree_before_during_and_after_the_migration() {
    let w = Work::new();
    media_tree(&w);
    let before = snapshot(&w.src);
    // Over the directory itself: the source is reached through a descriptor opened first.
    let daemon = Daemon::start(&w.src, &mount_args(&w, &[]));
    assert_eq!(snapshot(&w.src), before, "the view changed when mounting");
    wait_until(Duration::from_secs(60), "every file verified", || {
        all_verified(&w)
    });
    assert_eq!(
        snapshot(&w.src),
        before,
        "the view changed after the migration"
    );
    let st = fs::metadata(w.src.join("contracts/secret.txt")).unwrap();
    let ino = std::os::unix::fs::MetadataExt::ino(&st);
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(
            &fs::metadata(w.src.join("contracts/secret.txt")).unwrap()
        ),
        ino,
        "inode numbers must stay stable"
    );
    let log = daemon.stop();
    assert!(
        served(&log, "opens_dest") > 0,
        "verified files must be read from the dest\n{log}"
    );
    // Unmounted: the plain directory is what it always was.
    assert_eq!(snapshot(&w.src), before);
    assert_trees_equal(&w.src, &w.dest);
}

#[test]
fn verified_files_are_read_from_the_dest_and_local_ones_by_passthrough() {
    let w = Work::new();
    w.write("a/one.txt", b"original one");
    w.write("b/two.txt", b"original two");
    w.sweep(&[]).assert_code(0);
    w.write("c/new.txt", b"not migrated");
    let (mnt, daemon) = mount_beside(&w, &w.dest_url(), &["--no-sweep"], &[]);
    daemon.wait_for_scan();
    // Change the local copy behind the mount's back: a file served from the dest does not see it.
    fs::write(w.src.join("a/one.txt"), b"CHANGED one!").unwrap();
    assert_eq!(fs::read(mnt.join("a/one.txt")).unwrap(), b"original one");
    assert_eq!(fs::read(mnt.join("c/new.txt")).unwrap(), b"not migrated");
    // A verified file whose local copy is gone stays in the namespace, served from the dest.
    fs::remove_file(w.src.join("b/two.txt")).unwrap();
    assert_eq!(fs::read(mnt.join("b/two.txt")).unwrap(), b"original two");
    let names: Vec<_> = fs::read_dir(mnt.join("b"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["two.txt"]);
    let log = daemon.stop();
    assert!(served(&log, "opens_dest") >= 2, "{log}");
    assert!(served(&log, "opens_local") >= 1, "{log}");
    if log.contains("FUSE passthrough on") {
        assert!(served(&log, "passthrough_opens") >= 3, "{log}");
        assert_eq!(
            served(&log, "read_requests"),
            0,
            "passthrough files must send no READ\n{log}"
        );
        // The daemon's own count of the requests it answered agrees (docs/SEMANTICS.md, "Round
        // trips"): the opens, and no READ or FLUSH.
        assert!(answered(&log, "open") >= 3, "{log}");
        assert_eq!(answered(&log, "read"), 0, "{log}");
        assert_eq!(answered(&log, "flush"), 0, "{log}");
    } else {
        panic!("this kernel offers FUSE passthrough; the daemon must use it\n{log}");
    }
}

/// The daemon stopped right after the application's opens still records every one of them in
/// the copy-on-read queue: the queue's last statement runs before the manifest is closed.
#[test]
fn opens_just_before_the_daemon_stops_are_queued_all_the_same() {
    let w = Work::new();
    for i in 0..40 {
        w.write(&format!("d/f{i}.txt"), format!("file {i}").as_bytes());
    }
    w.sweep(&["--include", "nothing/**"]).assert_code(0);
    let (mnt, daemon) = mount_beside(&w, &w.dest_url(), &["--no-sweep"], &[]);
    for i in 0..40 {
        assert_eq!(
            fs::read(mnt.join(format!("d/f{i}.txt"))).unwrap(),
            format!("file {i}").as_bytes()
        );
    }
    let log = daemon.stop();
    assert_eq!(w.status()["copy_on_read_queued"], 40, "{log}");
    assert!(!log.contains("cannot queue files"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn the_first_open_of_a_pending_file_queues_it_ahead_of_the_sweep() {
    let w = Work::new();
    small_tree(&w, 300, 10, 10, 100, 3);
    w.write("zzz/wanted.txt", b"read me first");
    // Record the tree without copying anything: a sweep of nothing in scope.
    w.sweep(&["--include", "nothing/**"]).assert_code(0);
    let (mnt, daemon) = mount_beside(&w, &w.dest_url(), &["--no-sweep"], &[]);
    let started = Instant::now();
    assert_eq!(
        fs::read(mnt.join("zzz/wanted.txt")).unwrap(),
        b"read me first"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the read waited for something"
    );
    wait_until(Duration::from_secs(10), "the file queued", || {
        w.status()["copy_on_read_queued"] == 1
    });
    // The next sweep takes the queued file first, in a batch of its own.
    w.sweep(&["--batch-size", "1000"]).assert_code(0);
    let batches: serde_json::Value =
        serde_json::from_str(&w.cmd_manifest_only("batches", &["--json"]).stdout).unwrap();
    let first = batches
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_i64().unwrap())
        .min()
        .unwrap();
    let batch = w.cmd_manifest_only("batch", &[&first.to_string(), "--json"]);
    let batch: serde_json::Value = serde_json::from_str(&batch.stdout).unwrap();
    let paths: Vec<&str> = batch["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"zzz/wanted.txt") && paths.len() == 1,
        "{batch:#}"
    );
    daemon.stop();
}

#[test]
fn the_sweeper_inside_the_daemon_copies_everything_and_status_sees_it() {
    let w = Work::new();
    small_tree(&w, 120, 5, 0, 3000, 11);
    let daemon = Daemon::start(
        &w.src,
        &mount_args(&w, &["--concurrency", "4", "--bwlimit", "50MiB"]),
    );
    // Opened before its copy: served from the local copy.
    let first = w.src.join("f00/s0/file-00000.bin");
    let content = fs::read(&first).unwrap();
    wait_until(Duration::from_secs(60), "every file verified", || {
        all_verified(&w)
    });
    // The next open after the file is verified is served from the dest.
    assert_eq!(fs::read(&first).unwrap(), content);
    let log = daemon.stop();
    assert!(log.contains("sweeper stopped"), "{log}");
    assert!(served(&log, "opens_dest") >= 1, "{log}");
    assert_trees_equal(&w.src, &w.dest);
}

#[test]
fn killed_daemon_leaves_a_stale_mount_that_the_next_start_cleans_up() {
    let w = Work::new();
    media_tree(&w);
    let before = snapshot(&w.src);
    let daemon = Daemon::start(&w.src, &mount_args(&w, &["--lease-timeout", "2s"]));
    // Files it was copying stay leased until the lease expires; a short lease keeps this quick.
    let _stale = daemon.kill9();
    let err = fs::read_dir(&w.src).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "expected a stale mount: {err}"
    );
    let again = Daemon::start(&w.src, &mount_args(&w, &["--lease-timeout", "2s"]));
    assert!(
        again.log_text().contains("stale mount"),
        "{}",
        again.log_text()
    );
    assert_eq!(snapshot(&w.src), before);
    wait_until(Duration::from_secs(60), "every file verified", || {
        all_verified(&w)
    });
    again.stop();
    assert_trees_equal(&w.src, &w.dest);
}

#[test]
fn bad_input_mounts_nothing_and_says_why() {
    let w = Work::new();
    w.write("a.txt", b"a");
    let missing = w.root.join("no-such-dir");
    let err = Daemon::try_start(&missing, &mount_args(&w, &[]))
        .err()
        .expect("must fail");
    assert!(err.contains("no-such-dir"), "{err}");

    let bad_dest = os(&["--dest", "ftp://x/y", "--manifest", &w.manifest_url()]);
    let err = Daemon::try_start(&w.src, &bad_dest)
        .err()
        .expect("must fail");
    assert!(err.contains("unknown scheme"), "{err}");
    assert!(!is_mounted(&w.src));
    assert!(!w.manifest.exists(), "a refused mount created the manifest");

    let daemon = Daemon::start(&w.src, &mount_args(&w, &["--no-sweep"]));
    let err = Daemon::try_start(&w.src, &mount_args(&w, &["--no-sweep"]))
        .err()
        .expect("must fail");
    assert!(err.contains("busy"), "{err}");
    assert_eq!(
        fs::read(w.src.join("a.txt")).unwrap(),
        b"a",
        "the first mount must survive"
    );
    daemon.stop();
}

#[test]
fn unmount_from_outside_stops_the_daemon_cleanly() {
    let w = Work::new();
    w.write("a.txt", b"a");
    let mut daemon = Daemon::start(&w.src, &mount_args(&w, &[]));
    let status = std::process::Command::new("umount")
        .arg(&w.src)
        .status()
        .unwrap();
    assert!(status.success());
    wait_until(Duration::from_secs(20), "the daemon to exit", || {
        daemon.try_exit().is_some()
    });
    assert!(
        daemon.log_text().contains("unmounted from outside"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn mount_helper_takes_mount_options() {
    let w = Work::new();
    w.write("a/b.txt", b"via fstab");
    let helper = w.root.join("mount.cutoverfs");
    std::os::unix::fs::symlink(bin(), &helper).unwrap();
    let options = format!(
        "rw,nofail,dest={},manifest={},no_sweep",
        w.dest_url(),
        w.manifest_url()
    );
    let out = std::process::Command::new(&helper)
        .args([
            OsString::from("cutoverfs"),
            w.src.clone().into(),
            "-o".into(),
            options.into(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The helper returns once the mount is live, with the daemon in the background.
    assert!(is_mounted(&w.src));
    assert_eq!(fs::read(w.src.join("a/b.txt")).unwrap(), b"via fstab");
    let status = std::process::Command::new("umount")
        .arg(&w.src)
        .status()
        .unwrap();
    assert!(status.success());
    wait_until(Duration::from_secs(20), "unmounted", || !is_mounted(&w.src));
}

#[test]
fn a_daemon_started_in_the_background_logs_and_stops_on_sigterm() {
    let w = Work::new();
    w.write("a.txt", b"a");
    let log = w.root.join("daemon.log");
    let mut start = command();
    start
        .arg("--log-file")
        .arg(&log)
        .arg("mount")
        .arg(&w.src)
        .args(mount_args(&w, &[]));
    run_command(&mut start).assert_code(0);
    assert!(is_mounted(&w.src));
    let text = || fs::read_to_string(&log).unwrap_or_default();
    wait_until(Duration::from_secs(30), "the scan logged", || {
        text().contains("scan done")
    });
    let pid = daemon_pid(&w.src);
    // SAFETY: signalling the daemon this test started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    wait_until(Duration::from_secs(30), "unmounted", || !is_mounted(&w.src));
    wait_until(Duration::from_secs(30), "the stop logged", || {
        text().contains("unmounted")
    });
}

/// The pid of the daemon serving `mountpoint`, from the process table.
fn daemon_pid(mountpoint: &std::path::Path) -> i32 {
    let wanted = mountpoint.to_string_lossy().into_owned();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "mount")
            && args.contains(&wanted)
            && args.iter().any(|a| a == "--foreground")
        {
            return pid;
        }
    }
    panic!("no daemon for {wanted}");
}

fn s3_work(server: &S3Server, prefix: &str) -> (Work, String) {
    let w = Work::new();
    let dest = server.dest_url(prefix);
    (w, dest)
}

#[test]
fn s3_served_files_read_right_sequentially_and_at_random() {
    let server = S3Server::in_process();
    let (w, dest) = s3_work(&server, "media");
    let big = pseudo_random(20 << 20, 5);
    w.write("v/big.bin", &big);
    w.write("v/small.txt", b"small");
    sweep_to_s3(&server, &w, &dest);
    let (mnt, daemon) = mount_beside(&w, &dest, &["--no-sweep"], &server.env());
    daemon.wait_for_scan();
    // The local copy is changed behind the mount: anything read must come from S3.
    fs::write(w.src.join("v/big.bin"), pseudo_random(20 << 20, 6)).unwrap();
    assert_eq!(
        sha256_hex(&fs::read(mnt.join("v/big.bin")).unwrap()),
        sha256_hex(&big)
    );
    let file = fs::File::open(mnt.join("v/big.bin")).unwrap();
    let mut rng = XorShift::new(9);
    for _ in 0..40 {
        let offset = rng.range(0, big.len() as u64 - 1);
        let len = rng.range(1, 300_000) as usize;
        let mut buf = vec![0u8; len];
        let n = file.read_at(&mut buf, offset).unwrap();
        let end = (offset as usize + len).min(big.len());
        assert_eq!(&buf[..n], &big[offset as usize..end], "at {offset}+{len}");
    }
    drop(file);
    let log = daemon.stop();
    assert!(served(&log, "bytes_from_dest") >= big.len() as u64, "{log}");
}

#[test]
fn a_dest_that_goes_down_leaves_every_local_file_readable() {
    let server = S3Server::in_process();
    let (w, dest) = s3_work(&server, "media");
    small_tree(&w, 40, 4, 10, 4000, 21);
    sweep_to_s3(&server, &w, &dest);
    let before = snapshot(&w.src);
    let (mnt, daemon) = mount_beside(&w, &dest, &[], &server.env());
    server.stop();
    let started = Instant::now();
    assert_eq!(
        snapshot(&mnt),
        before,
        "files with a local copy must stay readable"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "reads hung on the dead dest: {:?}",
        started.elapsed()
    );
    // Neither copy: EIO, quickly, not a hang.
    let gone = before
        .keys()
        .find(|p| p.extension().is_some())
        .unwrap()
        .clone();
    fs::remove_file(w.src.join(&gone)).unwrap();
    let err = fs::read(mnt.join(&gone)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = daemon.stop();
    assert!(
        log.contains("dest read failed") || served(&log, "opens_local") > 0,
        "{log}"
    );
}

/// The inode number of every path below `root`, by path.
fn inode_numbers(root: &std::path::Path) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    let mut numbers = std::collections::BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                dirs.push(path.clone());
            }
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            numbers.insert(rel, meta.ino());
        }
    }
    numbers
}

#[test]
fn inode_numbers_stay_the_same_across_forgets_remounts_and_the_migration() {
    let w = Work::new();
    media_tree(&w);
    let daemon = Daemon::start(&w.src, &mount_args(&w, &["--no-sweep"]));
    daemon.wait_for_scan();
    let first = inode_numbers(&w.src);
    assert!(first.len() > 5, "the tree is too small to tell: {first:?}");
    let distinct: std::collections::BTreeSet<_> = first.values().collect();
    assert_eq!(
        distinct.len(),
        first.len(),
        "two paths share a number: {first:?}"
    );

    // The kernel forgets every inode it does not use (the mount's daemon is asked to FORGET).
    let same_after_forget = |why: &str| {
        fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
        assert_eq!(inode_numbers(&w.src), first, "numbers changed {why}");
    };
    same_after_forget("after the kernel forgot them");
    daemon.stop();

    // Another daemon, with the sweeper: the numbers are the manifest's, during and after the
    // migration.
    let daemon = Daemon::start(&w.src, &mount_args(&w, &[]));
    assert_eq!(
        inode_numbers(&w.src),
        first,
        "numbers changed across a remount"
    );
    wait_until(Duration::from_secs(60), "every file verified", || {
        all_verified(&w)
    });
    same_after_forget("with the migration");
    daemon.stop();
}
