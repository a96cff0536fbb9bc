//! Writes through the mount (issue 5, DESIGN §4, §6) on real FUSE mounts: POSIX operations land
//! in the local tree first, written files are queued ahead of the sweep, a changed file is
//! never served stale from the dest, purged files are brought back before they change, unlink
//! and rename keep the local tree, the dest and the manifest together, and a crash between
//! their steps, or during a stream of fsynced writes, loses nothing.

mod common;

use std::ffi::{CString, OsString};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mount::{wait_until, Daemon};
use common::*;

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Mounts at `root/mnt` a source that stays reachable at `w.src`, so tests can look under
/// the mount at what landed locally.
fn mount_beside(w: &Work, extra: &[&str], env: &[(String, String)]) -> (PathBuf, Daemon) {
    let mnt = w.root.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let daemon = Daemon::start_with_env(&mnt, &target_args(w, &w.dest_url(), extra), env);
    (mnt, daemon)
}

/// The daemon again on the same mountpoint, source, dest and manifest (after a crash).
fn restart(w: &Work, mnt: &Path) -> Daemon {
    Daemon::start(mnt, &target_args(w, &w.dest_url(), &[]))
}

fn target_args(w: &Work, dest: &str, extra: &[&str]) -> Vec<OsString> {
    let mut args = os(&[
        "--source",
        w.src.to_str().unwrap(),
        "--dest",
        dest,
        "--manifest",
        &w.manifest_url(),
    ]);
    args.extend(os(extra));
    args
}

fn errno_of<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    result.unwrap_err().raw_os_error().unwrap()
}

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn rename2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (from, to) = (c(from), c(to));
    // SAFETY: two NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn verified(w: &Work) -> u64 {
    state_count(&w.status(), "files", "verified")
}

fn nothing_left_to_copy(w: &Work) -> bool {
    let status = w.status();
    ["pending", "copying", "failed"]
        .iter()
        .all(|s| state_count(&status, "files", s) == 0)
}

/// The files (path → bytes) of a tree, for comparing the mounted view with the dest.
fn file_bytes(root: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    files_of(&snapshot(root))
        .into_keys()
        .map(|rel| {
            let bytes = fs::read(root.join(&rel)).unwrap();
            (rel, bytes)
        })
        .collect()
}

#[test]
fn posix_operations_behave_as_on_a_local_directory() {
    let w = Work::new();
    w.write("keep.txt", b"kept");
    let (mnt, daemon) = mount_beside(&w, &["--no-sweep"], &[]);
    daemon.wait_for_scan();

    // create with O_EXCL, write, pwrite at an offset, read back
    let path = mnt.join("new.bin");
    let mut file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o640)
        .open(&path)
        .unwrap();
    file.write_all(b"hello world").unwrap();
    file.write_all_at(b"HELLO", 0).unwrap();
    file.write_all_at(b"!", 20).unwrap();
    file.sync_all().unwrap();
    let mut back = vec![0u8; 21];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back[..11], b"HELLO world");
    assert_eq!(&back[11..20], &[0u8; 9], "a hole reads as zeros");
    assert_eq!(
        errno_of(OpenOptions::new().write(true).create_new(true).open(&path)),
        libc::EEXIST
    );
    // ftruncate down and up, fallocate
    file.set_len(5).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"HELLO");
    file.set_len(8).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"HELLO\0\0\0");
    // SAFETY: a descriptor we own.
    let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, 4096) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    assert_eq!(fs::metadata(&path).unwrap().len(), 4096);
    drop(file);
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);

    // O_APPEND appends, O_TRUNC truncates
    let mut log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(mnt.join("log.txt"))
        .unwrap();
    log.write_all(b"one\n").unwrap();
    log.write_all(b"two\n").unwrap();
    drop(log);
    assert_eq!(fs::read(mnt.join("log.txt")).unwrap(), b"one\ntwo\n");
    fs::write(mnt.join("log.txt"), b"fresh").unwrap();
    assert_eq!(fs::read(mnt.join("log.txt")).unwrap(), b"fresh");

    // directories
    fs::create_dir(mnt.join("d")).unwrap();
    fs::write(mnt.join("d/inside.txt"), b"in").unwrap();
    assert_eq!(errno_of(fs::remove_dir(mnt.join("d"))), libc::ENOTEMPTY);
    fs::rename(mnt.join("d"), mnt.join("e")).unwrap();
    assert_eq!(fs::read(mnt.join("e/inside.txt")).unwrap(), b"in");
    assert!(!mnt.join("d").exists());
    fs::create_dir(mnt.join("empty")).unwrap();
    fs::remove_dir(mnt.join("empty")).unwrap();
    assert!(!mnt.join("empty").exists());

    // rename over a file, RENAME_NOREPLACE, RENAME_EXCHANGE
    fs::write(mnt.join("a.txt"), b"A").unwrap();
    fs::write(mnt.join("b.txt"), b"B").unwrap();
    assert_eq!(
        errno_of(rename2(
            &mnt.join("a.txt"),
            &mnt.join("b.txt"),
            libc::RENAME_NOREPLACE
        )),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(rename2(
            &mnt.join("a.txt"),
            &mnt.join("b.txt"),
            libc::RENAME_EXCHANGE
        )),
        libc::EINVAL,
        "RENAME_EXCHANGE is not offered"
    );
    fs::rename(mnt.join("a.txt"), mnt.join("b.txt")).unwrap();
    assert_eq!(fs::read(mnt.join("b.txt")).unwrap(), b"A");
    assert!(!mnt.join("a.txt").exists());
    rename2(
        &mnt.join("b.txt"),
        &mnt.join("c.txt"),
        libc::RENAME_NOREPLACE,
    )
    .unwrap();

    // unlink
    fs::remove_file(mnt.join("c.txt")).unwrap();
    assert_eq!(errno_of(fs::read(mnt.join("c.txt"))), libc::ENOENT);
    assert_eq!(errno_of(fs::remove_file(mnt.join("c.txt"))), libc::ENOENT);

    // chmod, chown, utimens
    fs::set_permissions(mnt.join("keep.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(mnt.join("keep.txt"), Some(1234), Some(4321)).unwrap();
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    set_times(&mnt.join("keep.txt"), when, when);
    let meta = fs::metadata(mnt.join("keep.txt")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
    assert_eq!(meta.mtime(), 1_600_000_000);

    // symlinks and hard links work; xattrs are refused with their errno
    std::os::unix::fs::symlink("keep.txt", mnt.join("link")).unwrap();
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        Path::new("keep.txt")
    );
    fs::hard_link(mnt.join("keep.txt"), mnt.join("hard")).unwrap();
    assert_eq!(fs::metadata(mnt.join("hard")).unwrap().nlink(), 2);
    assert_eq!(
        errno_of(fs::hard_link(mnt.join("keep.txt"), mnt.join("hard"))),
        libc::EEXIST
    );
    let name = CString::new("user.test").unwrap();
    let target = c(&mnt.join("keep.txt"));
    // SAFETY: NUL-terminated strings and a 1-byte value.
    let rc = unsafe { libc::setxattr(target.as_ptr(), name.as_ptr(), b"x".as_ptr().cast(), 1, 0) };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );

    // Everything landed in the local tree under the mount, as seen through it.
    let through_mount = snapshot(&mnt);
    daemon.stop();
    assert_eq!(snapshot(&w.src), through_mount);
}

#[test]
fn written_files_are_queued_ahead_of_the_sweep_and_reach_the_dest() {
    let w = Work::new();
    small_tree(&w, 1000, 4, 2000, 4000, 11);
    // A slow sweeper: the backlog takes far longer than the test waits.
    let (mnt, daemon) = mount_beside(&w, &["--concurrency", "1", "--bwlimit", "64KiB"], &[]);
    daemon.wait_for_scan();
    fs::create_dir_all(mnt.join("uploads")).unwrap();
    let content = pseudo_random(100_000, 5);
    fs::write(mnt.join("uploads/new.jpg"), &content).unwrap();
    let dest_copy = w.dest.join("uploads/new.jpg");
    wait_until(Duration::from_secs(30), "the new file at the dest", || {
        fs::read(&dest_copy).ok().as_deref() == Some(&content[..])
    });
    let status = w.status();
    let waiting =
        state_count(&status, "files", "pending") + state_count(&status, "files", "copying");
    assert!(
        waiting > 300,
        "the written file must go before the backlog ({waiting} files still waiting)"
    );
    // Landed locally first.
    assert_eq!(fs::read(w.src.join("uploads/new.jpg")).unwrap(), content);
    daemon.stop();
}

#[test]
fn a_file_changed_after_verification_is_never_served_stale() {
    let w = Work::new();
    w.write("photo.jpg", b"version one");
    let (mnt, daemon) = mount_beside(&w, &[], &[]);
    wait_until(Duration::from_secs(30), "the first copy", || {
        nothing_left_to_copy(&w) && verified(&w) == 1
    });
    assert_eq!(fs::read(w.dest.join("photo.jpg")).unwrap(), b"version one");
    // A reader of the dest copy holds the file: a writer waits for it to close...
    let reader = fs::File::open(mnt.join("photo.jpg")).unwrap();
    let path = mnt.join("photo.jpg");
    let writer = std::thread::spawn(move || {
        let mut writer = OpenOptions::new().write(true).open(&path).unwrap();
        writer.write_all(b"VERSION TWO").unwrap();
        writer
    });
    wait_until(Duration::from_secs(30), "the writer waiting", || {
        daemon
            .log_text()
            .contains("a writer waits for the readers of the dest copy")
    });
    assert!(
        !writer.is_finished(),
        "the writer must wait for the dest reader"
    );
    drop(reader);
    let writer = writer.join().unwrap();
    // ...and from then on every reader shares the writer's local file.
    let reader = fs::File::open(mnt.join("photo.jpg")).unwrap();
    let mut seen = vec![0u8; 11];
    reader.read_exact_at(&mut seen, 0).unwrap();
    assert_eq!(&seen, b"VERSION TWO");
    assert_eq!(fs::read(mnt.join("photo.jpg")).unwrap(), b"VERSION TWO");
    // While open for writing, nothing copies it, not even a pass the sweeper makes for another
    // upload meanwhile (the held file is pending, and in path order after that upload).
    assert_eq!(fs::read(w.dest.join("photo.jpg")).unwrap(), b"version one");
    fs::write(mnt.join("another.jpg"), b"another upload").unwrap();
    wait_until(
        Duration::from_secs(30),
        "the other upload at the dest",
        || fs::read(w.dest.join("another.jpg")).ok().as_deref() == Some(&b"another upload"[..]),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fs::read(w.dest.join("photo.jpg")).unwrap(), b"version one");
    drop(writer);
    drop(reader);
    assert_eq!(fs::read(mnt.join("photo.jpg")).unwrap(), b"VERSION TWO");
    wait_until(
        Duration::from_secs(30),
        "the new version at the dest",
        || {
            fs::read(w.dest.join("photo.jpg")).ok().as_deref() == Some(&b"VERSION TWO"[..])
                && nothing_left_to_copy(&w)
        },
    );
    assert_eq!(fs::read(mnt.join("photo.jpg")).unwrap(), b"VERSION TWO");
    // A dest reader that stays open: the writer is refused after a short wait, not hung.
    let reader = fs::File::open(mnt.join("photo.jpg")).unwrap();
    let started = std::time::Instant::now();
    let refused = OpenOptions::new().write(true).open(mnt.join("photo.jpg"));
    assert_eq!(errno_of(refused), libc::ETXTBSY);
    assert!(started.elapsed() >= Duration::from_secs(1));
    drop(reader);
    daemon.stop();
}

/// Sweeps everything through the daemon, then purges the local copies while mounted.
fn migrate_and_purge(w: &Work) {
    wait_until(Duration::from_secs(60), "everything verified", || {
        nothing_left_to_copy(w) && verified(w) > 0
    });
    w.cmd_manifest_only("purge", &["--confirm"]).assert_code(0);
}

#[test]
fn purged_files_stay_visible_and_are_brought_back_before_they_change() {
    let w = Work::new();
    w.write("docs/a.txt", b"alpha");
    w.write("docs/b.txt", b"bravo");
    w.write("docs/c.txt", b"charlie");
    w.write("d.txt", b"delta");
    set_mode(&w.src.join("docs/a.txt"), 0o640);
    let (mnt, daemon) = mount_beside(&w, &[], &[]);
    daemon.wait_for_scan();
    let before = snapshot(&mnt);
    migrate_and_purge(&w);
    for rel in ["docs/a.txt", "docs/b.txt", "docs/c.txt", "d.txt"] {
        assert!(!w.src.join(rel).exists(), "{rel} must be purged locally");
    }
    assert_eq!(snapshot(&mnt), before, "purge must not change the view");

    // Append: brought back first, then written locally.
    let mut f = OpenOptions::new()
        .append(true)
        .open(mnt.join("docs/a.txt"))
        .unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    assert_eq!(fs::read(w.src.join("docs/a.txt")).unwrap(), b"alpha+more");
    assert_eq!(
        fs::metadata(w.src.join("docs/a.txt")).unwrap().mode() & 0o7777,
        0o640
    );
    // chmod and rename of purged files
    fs::set_permissions(mnt.join("docs/b.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::read(w.src.join("docs/b.txt")).unwrap(), b"bravo");
    fs::rename(mnt.join("docs"), mnt.join("papers")).unwrap();
    assert_eq!(fs::read(mnt.join("papers/c.txt")).unwrap(), b"charlie");
    assert_eq!(fs::read(w.src.join("papers/c.txt")).unwrap(), b"charlie");
    // unlink of a purged file removes its dest object
    fs::remove_file(mnt.join("d.txt")).unwrap();
    assert!(!mnt.join("d.txt").exists());
    wait_until(Duration::from_secs(60), "the changes copied", || {
        nothing_left_to_copy(&w) && w.dest.join("papers/a.txt").exists()
    });
    assert!(!w.dest.join("d.txt").exists(), "our object must go");
    assert!(!w.dest.join("docs/a.txt").exists(), "the old key must go");
    // A copy in flight when its file was renamed away is deleted by the daemon soon after.
    wait_until(
        Duration::from_secs(30),
        "the dest to match the view",
        || file_bytes(&mnt) == file_bytes(&w.dest),
    );
    daemon.stop();
}

#[test]
fn unlink_and_rename_never_touch_an_object_cutoverfs_did_not_write() {
    let w = Work::new();
    w.write("ours.txt", b"ours");
    w.write("theirs.txt", b"local version");
    // Someone else's object already sits at that key: a conflict, never replaced or deleted.
    write_file(&w.dest.join("theirs.txt"), b"their version");
    let (mnt, daemon) = mount_beside(&w, &[], &[]);
    wait_until(Duration::from_secs(30), "the sweep", || {
        let status = w.status();
        state_count(&status, "files", "conflict") == 1 && verified(&w) == 1
    });
    fs::rename(mnt.join("theirs.txt"), mnt.join("moved.txt")).unwrap();
    fs::remove_file(mnt.join("ours.txt")).unwrap();
    wait_until(Duration::from_secs(30), "the moved file copied", || {
        w.dest.join("moved.txt").exists() && nothing_left_to_copy(&w)
    });
    assert_eq!(
        fs::read(w.dest.join("theirs.txt")).unwrap(),
        b"their version"
    );
    assert!(!w.dest.join("ours.txt").exists());
    assert_eq!(
        fs::read(w.dest.join("moved.txt")).unwrap(),
        b"local version"
    );
    daemon.stop();
}

#[test]
fn a_crash_between_the_steps_of_unlink_or_rename_is_repaired_at_restart() {
    for point in [
        "remove:recorded",
        "remove:local-done",
        "rename:recorded",
        "rename:local-done",
    ] {
        let w = Work::new();
        w.write("dir/a.txt", b"alpha");
        w.write("dir/b.txt", b"bravo");
        w.write("c.txt", b"charlie");
        let env = vec![("CUTOVERFS_CRASH_AT".to_string(), point.to_string())];
        // A rename holds the files at their new names until the local tree is renamed: after
        // a crash in between, the hold lasts its lease.
        let (mnt, daemon) = mount_beside(&w, &["--lease-timeout", "2s"], &env);
        wait_until(Duration::from_secs(30), "the first sweep", || {
            nothing_left_to_copy(&w) && verified(&w) == 3
        });
        let done = if point.starts_with("remove") {
            fs::remove_file(mnt.join("c.txt"))
        } else {
            fs::rename(mnt.join("dir"), mnt.join("moved"))
        };
        assert!(
            done.is_err(),
            "{point}: the daemon must have died mid-operation"
        );
        let stale = daemon.crashed();
        drop(stale);

        let daemon = restart(&w, &mnt);
        daemon.wait_for_scan();
        wait_until(Duration::from_secs(60), "the sweep after restart", || {
            nothing_left_to_copy(&w)
        });
        let view = file_bytes(&mnt);
        // The operation happened entirely or not at all, and nothing was lost.
        let expected_names: Vec<&[&str]> = if point.starts_with("remove") {
            vec![
                &["c.txt", "dir/a.txt", "dir/b.txt"],
                &["dir/a.txt", "dir/b.txt"],
            ]
        } else {
            vec![
                &["c.txt", "dir/a.txt", "dir/b.txt"],
                &["c.txt", "moved/a.txt", "moved/b.txt"],
            ]
        };
        let names: Vec<String> = view
            .keys()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert!(
            expected_names
                .iter()
                .any(|e| e.iter().map(|s| s.to_string()).collect::<Vec<_>>() == names),
            "{point}: unexpected tree {names:?}"
        );
        for (rel, bytes) in &view {
            let want: &[u8] = match rel.file_name().unwrap().to_str().unwrap() {
                "a.txt" => b"alpha",
                "b.txt" => b"bravo",
                _ => b"charlie",
            };
            assert_eq!(bytes, want, "{point}: {}", rel.display());
        }
        // No dest object the manifest does not stand for: the dest holds exactly the view.
        assert_eq!(file_bytes(&w.dest), view, "{point}: dest and view differ");
        daemon.stop();
    }
}

#[test]
fn kill_9_during_fsynced_writes_loses_no_acknowledged_byte() {
    let w = Work::new();
    w.write("seed.txt", b"seed");
    // The journal is held while open for writing; the killed daemon's hold ends with its lease,
    // after which the restarted daemon copies it.
    let (mnt, daemon) = mount_beside(&w, &["--lease-timeout", "2s"], &[]);
    daemon.wait_for_scan();
    let record = |i: u64| -> Vec<u8> {
        let mut r = format!("record {i:08} ").into_bytes();
        r.resize(4096, b'.' + (i % 40) as u8);
        r
    };
    let path = mnt.join("journal.log");
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = progress.clone();
    let writer = std::thread::spawn(move || {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut acknowledged = 0u64;
        for i in 0.. {
            if file.write_all(&record(i)).is_err() || file.sync_data().is_err() {
                break;
            }
            acknowledged = i + 1;
            progress.store(acknowledged, std::sync::atomic::Ordering::SeqCst);
        }
        acknowledged
    });
    // Killed in the middle of the writes, once enough of them are acknowledged.
    wait_until(Duration::from_secs(60), "20 acknowledged records", || {
        seen.load(std::sync::atomic::Ordering::SeqCst) >= 20
    });
    let stale = daemon.kill9();
    let acknowledged = writer.join().unwrap();
    drop(stale);
    assert!(acknowledged > 10, "only {acknowledged} records written");
    let local = fs::read(w.src.join("journal.log")).unwrap();
    assert!(
        local.len() as u64 >= acknowledged * 4096,
        "{} bytes on disk, {acknowledged} records acknowledged",
        local.len()
    );
    for i in 0..acknowledged {
        let at = (i * 4096) as usize;
        assert_eq!(&local[at..at + 4096], &record(i)[..], "record {i}");
    }
    // After a restart the file is whole through the mount and reaches the dest.
    let daemon = restart(&w, &mnt);
    daemon.wait_for_scan();
    assert_eq!(fs::read(mnt.join("journal.log")).unwrap(), local);
    wait_until(Duration::from_secs(60), "the journal at the dest", || {
        fs::read(w.dest.join("journal.log")).ok().as_deref() == Some(&local[..])
    });
    daemon.stop();
}

#[test]
fn on_s3_unlink_deletes_our_object_and_rename_moves_it_to_the_new_key() {
    let server = common::s3::S3Server::in_process();
    let w = Work::new();
    let dest = server.dest_url("media");
    w.write("keep.txt", b"keep");
    w.write("old/name.txt", b"renamed content");
    w.write("gone.txt", b"to be deleted");
    let mnt = w.root.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let daemon = Daemon::start_with_env(&mnt, &target_args(&w, &dest, &[]), &server.env());
    wait_until(Duration::from_secs(30), "the first sweep", || {
        nothing_left_to_copy(&w) && verified(&w) == 3
    });
    assert!(server.get("media/gone.txt").is_some());
    fs::remove_file(mnt.join("gone.txt")).unwrap();
    assert_eq!(
        server.get("media/gone.txt"),
        None,
        "our object must go with the file"
    );
    fs::rename(mnt.join("old"), mnt.join("new")).unwrap();
    assert_eq!(
        server.get("media/old/name.txt"),
        None,
        "the old key must go"
    );
    wait_until(
        Duration::from_secs(30),
        "the renamed file at its new key",
        || server.get("media/new/name.txt").as_deref() == Some(&b"renamed content"[..]),
    );
    assert_eq!(
        fs::read(mnt.join("new/name.txt")).unwrap(),
        b"renamed content"
    );
    assert_eq!(server.get("media/keep.txt").as_deref(), Some(&b"keep"[..]));
    daemon.stop();
}

#[test]
fn files_removed_while_being_copied_leave_nothing_at_the_dest() {
    let w = Work::new();
    w.write("keep.txt", b"keep");
    let (mnt, daemon) = mount_beside(&w, &[], &[]);
    daemon.wait_for_scan();
    fs::create_dir(mnt.join("trash")).unwrap();
    for i in 0..30 {
        let path = mnt.join(format!("trash/f{i}"));
        fs::write(&path, pseudo_random(65536, i)).unwrap();
        std::thread::sleep(Duration::from_millis((i % 7) * 3));
        fs::remove_file(&path).unwrap();
    }
    // Copies that raced with the removals are deleted by the daemon itself, soon.
    wait_until(
        Duration::from_secs(40),
        "no removed file at the dest",
        || {
            nothing_left_to_copy(&w)
                && fs::read_dir(w.dest.join("trash"))
                    .map(|d| d.count() == 0)
                    .unwrap_or(true)
        },
    );
    assert_eq!(fs::read(w.dest.join("keep.txt")).unwrap(), b"keep");
    daemon.stop();
}

/// A copy that an open for writing takes from its worker may still be published afterwards, by a
/// worker past its last check whose daemon then dies (or by an S3 server finishing the request of
/// a client that died). If the file is removed meanwhile, that late object must not stay at the
/// dest. The copy is held as it is about to be published while the application appends to the
/// file and removes it; released, it is published and the daemon kills itself right after
/// (`sweep:copied`), before it could clean up; the restarted daemon must delete the object.
#[test]
fn a_copy_taken_away_by_a_writer_and_published_after_the_removal_is_deleted() {
    let w = Work::new();
    w.write("upload.bin", &pseudo_random(5000, 77));
    let hold = Hold::at_subject("copy:publish", "upload.bin");
    let mut env = hold.env();
    env.push(("CUTOVERFS_CRASH_AT".into(), "sweep:copied".into()));
    let (mnt, mut daemon) = mount_beside(&w, &[], &env);
    hold.wait_reached(|| daemon.try_exit().is_none());
    {
        let mut writer = OpenOptions::new()
            .append(true)
            .open(mnt.join("upload.bin"))
            .unwrap();
        writer.write_all(b"more").unwrap();
    }
    fs::remove_file(mnt.join("upload.bin")).unwrap();
    hold.release();
    wait_until(
        Duration::from_secs(60),
        "the daemon at its crash point",
        || daemon.has_exited(),
    );
    assert!(
        w.dest.join("upload.bin").exists(),
        "the held copy was not published: the test did not test"
    );
    drop(daemon.crashed());
    let daemon = restart(&w, &mnt);
    daemon.wait_for_scan();
    wait_until(
        Duration::from_secs(60),
        "the late object of the removed file deleted",
        || !w.dest.join("upload.bin").exists(),
    );
    assert!(!mnt.join("upload.bin").exists());
    daemon.stop();
}

/// Waits until the kernel's clock for file timestamps has moved past `ctime` (seconds, ns), so
/// a change made next gets a later ctime than the one already seen.
fn clock_past(ctime: (i64, i64)) {
    loop {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
        if (now.tv_sec, now.tv_nsec) > ctime {
            return;
        }
        std::thread::yield_now();
    }
}

fn ctime_of(meta: &fs::Metadata) -> (i64, i64) {
    (meta.ctime(), meta.ctime_nsec())
}

/// What a program sees of a file used after its unlink, of a file renamed over while open and
/// of hard links, one line per observation; run on a plain directory and on the mount, the
/// lines must be the same. Apart: whether hard-linked names show one inode number, where the
/// mount differs on purpose (docs/SEMANTICS.md, "Where it differs").
struct Observations {
    lines: Vec<String>,
    links_share_inode: Vec<bool>,
}

fn open_unlinked_and_linked_observations(root: &Path) -> Observations {
    use std::io::{Read, Seek, SeekFrom};
    let mut seen = Vec::new();
    let mut links_share_inode = Vec::new();
    let stat = |m: &fs::Metadata| {
        format!(
            "nlink={} size={} mode={:o}",
            m.nlink(),
            m.len(),
            m.mode() & 0o7777
        )
    };

    // A descriptor outlives the name: fstat, write, lseek, read, ftruncate, fsync, fchmod.
    let gone = root.join("gone.txt");
    fs::write(&gone, b"first bytes").unwrap();
    let mut fd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&gone)
        .unwrap();
    fs::remove_file(&gone).unwrap();
    seen.push(format!("name after unlink: exists={}", gone.exists()));
    seen.push(format!(
        "fstat after unlink: {}",
        stat(&fd.metadata().unwrap())
    ));
    fd.write_all_at(b" and more", 11).unwrap();
    seen.push(format!("SEEK_END: {}", fd.seek(SeekFrom::End(0)).unwrap()));
    let mut text = String::new();
    fd.seek(SeekFrom::Start(0)).unwrap();
    fd.read_to_string(&mut text).unwrap();
    seen.push(format!("read: {text:?}"));
    fd.set_len(5).unwrap();
    fd.sync_all().unwrap();
    fd.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    seen.push(format!(
        "after ftruncate+fchmod: {}",
        stat(&fd.metadata().unwrap())
    ));
    // A new file under the old name is another file.
    fs::write(&gone, b"another file").unwrap();
    let mut old = vec![0u8; 5];
    fd.read_exact_at(&mut old, 0).unwrap();
    seen.push(format!(
        "old descriptor reads {:?}",
        String::from_utf8_lossy(&old)
    ));
    seen.push(format!(
        "name reads {:?}",
        fs::read_to_string(&gone).unwrap()
    ));
    drop(fd);
    seen.push(format!(
        "after close, name reads {:?}",
        fs::read_to_string(&gone).unwrap()
    ));

    // Renamed over while open: the descriptor keeps the old file.
    fs::write(root.join("photo.jpg"), b"old photo").unwrap();
    let held = fs::File::open(root.join("photo.jpg")).unwrap();
    let held_ino = held.metadata().unwrap().ino();
    fs::write(root.join("photo.jpg.tmp"), b"new photo").unwrap();
    fs::rename(root.join("photo.jpg.tmp"), root.join("photo.jpg")).unwrap();
    let mut text = String::new();
    (&held).read_to_string(&mut text).unwrap();
    seen.push(format!("held descriptor reads {text:?}"));
    seen.push(format!("held: {}", stat(&held.metadata().unwrap())));
    let now = fs::metadata(root.join("photo.jpg")).unwrap();
    seen.push(format!(
        "name: {} reads {:?}, same inode as held: {}",
        stat(&now),
        fs::read_to_string(root.join("photo.jpg")).unwrap(),
        now.ino() == held_ino
    ));
    drop(held);

    // Hard links: one inode under several names; link and unlink change the link count and
    // the ctime; a change through one name shows through the others.
    let (a, b) = (root.join("a.txt"), root.join("b.txt"));
    fs::write(&a, b"shared").unwrap();
    let before = fs::metadata(&a).unwrap();
    clock_past(ctime_of(&before));
    fs::hard_link(&a, &b).unwrap();
    let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
    seen.push(format!(
        "linked: a {} b {}, inode kept: {}, ctime later: {}",
        stat(&ma),
        stat(&mb),
        ma.ino() == before.ino(),
        ctime_of(&ma) > ctime_of(&before)
    ));
    links_share_inode.push(ma.ino() == mb.ino());
    OpenOptions::new()
        .append(true)
        .open(&b)
        .unwrap()
        .write_all(b"+more")
        .unwrap();
    fs::set_permissions(&a, fs::Permissions::from_mode(0o640)).unwrap();
    seen.push(format!(
        "a reads {:?}; b {}",
        fs::read_to_string(&a).unwrap(),
        stat(&fs::metadata(&b).unwrap())
    ));
    let fd = fs::File::open(&a).unwrap();
    let before = fs::metadata(&b).unwrap();
    clock_past(ctime_of(&before));
    fs::remove_file(&a).unwrap();
    let after = fs::metadata(&b).unwrap();
    seen.push(format!(
        "a unlinked: b {}, descriptor {}, ctime later: {}",
        stat(&after),
        stat(&fd.metadata().unwrap()),
        ctime_of(&after) > ctime_of(&before)
    ));
    fs::create_dir(root.join("d")).unwrap();
    fs::rename(&b, root.join("d/c.txt")).unwrap();
    fs::hard_link(root.join("d/c.txt"), root.join("e.txt")).unwrap();
    let (mc, me) = (
        fs::metadata(root.join("d/c.txt")).unwrap(),
        fs::metadata(root.join("e.txt")).unwrap(),
    );
    seen.push(format!(
        "renamed into d and linked back: c {} e {}",
        stat(&mc),
        stat(&me)
    ));
    links_share_inode.push(mc.ino() == me.ino());
    links_share_inode.push(mc.ino() == fd.metadata().unwrap().ino());
    fs::remove_file(root.join("d/c.txt")).unwrap();
    fs::remove_file(root.join("e.txt")).unwrap();
    let mut text = String::new();
    (&fd).read_to_string(&mut text).unwrap();
    seen.push(format!(
        "all names gone: descriptor {} reads {text:?}",
        stat(&fd.metadata().unwrap())
    ));
    drop(fd);
    let mut names: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    seen.push(format!("names left: {names:?}"));
    Observations {
        lines: seen,
        links_share_inode,
    }
}

#[test]
fn open_unlinked_files_and_hard_links_behave_as_on_a_local_directory() {
    let plain = tempfile::tempdir().unwrap();
    fs::write(plain.path().join("seed.txt"), b"seed").unwrap();
    let expected = open_unlinked_and_linked_observations(plain.path());

    let w = Work::new();
    w.write("seed.txt", b"seed");
    let (mnt, daemon) = mount_beside(&w, &[], &[]);
    daemon.wait_for_scan();
    let seen = open_unlinked_and_linked_observations(&mnt);
    assert_eq!(
        seen.lines, expected.lines,
        "the mount differs from a plain directory"
    );
    // Each name of a hard-linked file keeps a number of its own on the mount (one manifest row
    // and one dest object per name); docs/SEMANTICS.md says so. If this changes, change it there.
    assert_eq!(expected.links_share_inode, [true, true, true]);
    assert_eq!(seen.links_share_inode, [false, false, false]);

    // Nothing that was unlinked reached the dest, or stayed there: in the end the dest holds
    // exactly the files the mount shows.
    let shown = file_bytes(&mnt);
    wait_until(
        Duration::from_secs(60),
        "the dest to hold exactly the mounted files",
        || nothing_left_to_copy(&w) && file_bytes(&w.dest) == shown,
    );
    daemon.stop();
}

/// The inode number a manifest row holds for `rel` (None: the row has none).
fn row_ino(w: &Work, rel: &str) -> Option<u64> {
    row_field(w, rel, "ino").and_then(|v| v.parse().ok())
}

/// A column of `rel`'s manifest row as text (None: no row, or NULL).
fn row_field(w: &Work, rel: &str, column: &str) -> Option<String> {
    let script = format!(
        "import sqlite3; r = sqlite3.connect({:?}).execute('SELECT {column} FROM entries WHERE path = ?', ({rel:?},)).fetchone(); print('' if r is None or r[0] is None else r[0])",
        w.manifest.display().to_string()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 for sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!value.is_empty()).then_some(value)
}

/// A file created through the mount is held from its creation: while its writer has it open,
/// no worker may copy it. Before, numbering the new name recorded it pending and unheld, the
/// sweeper copied it half written, and a read right after the close got that copy as the
/// verified file (found by tests/mount_model.rs's concurrent workers).
#[test]
fn a_new_file_is_held_from_its_creation_until_its_writer_closes_it() {
    let w = Work::new();
    w.write("old.txt", b"old");
    let (mnt, daemon) = mount_beside(&w, &[], &[]);
    daemon.wait_for_scan();
    let mut f = fs::File::create(mnt.join("new.bin")).unwrap();
    f.write_all(&[1; 50_000]).unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        row_field(&w, "new.bin", "state").as_deref(),
        Some("pending")
    );
    assert!(
        row_field(&w, "new.bin", "lease_owner").is_some(),
        "new.bin is not held while it is open for writing"
    );
    f.write_all(&[2; 50_000]).unwrap();
    drop(f);
    let mut want = vec![1; 50_000];
    want.extend([2; 50_000]);
    assert!(fs::read(mnt.join("new.bin")).unwrap() == want);
    wait_until(Duration::from_secs(60), "new.bin verified", || {
        row_field(&w, "new.bin", "state").as_deref() == Some("verified")
    });
    assert!(fs::read(w.dest.join("new.bin")).unwrap() == want);
    daemon.stop();
}

/// `a.txt` ("alpha") and `b.txt` ("bravo") migrated and purged (no local copy), their rows then
/// stripped of their inode numbers; the daemon stopped. Returns the workspace and mountpoint.
fn purged_without_numbers() -> (Work, PathBuf) {
    let w = Work::new();
    w.write("a.txt", b"alpha");
    w.write("b.txt", b"bravo");
    let (mnt, daemon) = mount_beside(&w, &[], &[]);
    daemon.wait_for_scan();
    migrate_and_purge(&w);
    daemon.stop();
    sqlite_exec(
        &w.manifest,
        "UPDATE entries SET ino = NULL WHERE path <> ''",
    );
    (w, mnt)
}

/// A file with no local copy whose row holds no number (a manifest upgraded from before
/// numbers after a purge, or one a memory-only number was cleared from) is given one from the
/// manifest's counter at its first lookup, recorded in its row: every later daemon shows the
/// same st_ino, whatever order the paths are looked up in (issue 15.3).
#[test]
fn a_purged_file_without_a_number_gets_one_that_lasts() {
    let (w, mnt) = purged_without_numbers();

    let daemon = restart(&w, &mnt);
    let a = fs::metadata(mnt.join("a.txt")).unwrap().ino();
    let b = fs::metadata(mnt.join("b.txt")).unwrap().ino();
    assert_ne!(a, b, "two files under one inode number");
    for (rel, ino) in [("a.txt", a), ("b.txt", b)] {
        assert!(
            ino < 1 << 62,
            "{rel} got the mount's memory-only number {ino}"
        );
        wait_until(Duration::from_secs(60), "the number recorded", || {
            row_ino(&w, rel) == Some(ino)
        });
    }
    daemon.stop();

    // Another daemon, the other order.
    let daemon = restart(&w, &mnt);
    assert_eq!(fs::read(mnt.join("b.txt")).unwrap(), b"bravo");
    assert_eq!(fs::metadata(mnt.join("b.txt")).unwrap().ino(), b);
    assert_eq!(fs::metadata(mnt.join("a.txt")).unwrap().ino(), a);
    daemon.stop();
}

/// A path whose row holds no inode number (rows of an earlier cutoverfs, rows a rename moved)
/// and no local copy gets a number from the mount's memory; writing it must not put that number
/// in the manifest: the next daemon hands the same memory-only numbers to other such paths, and
/// the kernel would open one file under the other's number (found by daemon_kill_rounds).
#[test]
fn a_number_from_the_mounts_memory_never_reaches_the_manifest() {
    let (w, mnt) = purged_without_numbers();

    let daemon = restart(&w, &mnt);
    let mut f = OpenOptions::new()
        .append(true)
        .open(mnt.join("a.txt"))
        .unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    wait_until(Duration::from_secs(60), "a.txt recorded", || {
        row_ino(&w, "a.txt").is_some()
    });
    daemon.stop();
    let ino = row_ino(&w, "a.txt").unwrap();
    assert!(
        ino < 1 << 62,
        "a.txt's row holds the mount's memory-only number {ino}"
    );

    // Another daemon: b.txt (no number, no local copy) is looked up first, then a.txt.
    let daemon = restart(&w, &mnt);
    assert_eq!(fs::read(mnt.join("b.txt")).unwrap(), b"bravo");
    assert_eq!(fs::read(mnt.join("a.txt")).unwrap(), b"alpha+more");
    let (a, b) = (
        fs::metadata(mnt.join("a.txt")).unwrap().ino(),
        fs::metadata(mnt.join("b.txt")).unwrap().ino(),
    );
    assert_ne!(a, b, "two files under one inode number");
    daemon.stop();
}
