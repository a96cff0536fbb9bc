//! Less common paths through a sweep: attribute-only changes, ownership of dest objects,
//! equivalent spellings of the same pair, special mode bits, and two sweeps sharing a manifest.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use common::*;

both_engines! {
    /// Invariant 6: after `touch` (same bytes, new mtime) the next sweep must leave the dest with
    /// the source's new mtime — the manifest records the new one, the dest must not keep the old.
    fn touching_a_verified_file_brings_its_new_mtime_to_the_dest() {
        let w = Work::new();
        let path = w.write("a/photo.jpg", &pseudo_random(10_000, 1));
        w.write("a/other.txt", b"other");
        set_times(
            &path,
            SystemTime::now(),
            SystemTime::now() - Duration::from_secs(7200),
        );
        w.sweep(&[]).assert_code(0);
        assert_trees_equal(&w.src, &w.dest);

        set_times(
            &path,
            SystemTime::now(),
            SystemTime::now() - Duration::from_secs(60),
        );
        let run = w.sweep(&[]);
        run.assert_code(0);
        assert_file_states(&w.status(), &[("verified", 2)]);
        let (s, d) = (
            fs::metadata(&path).unwrap(),
            fs::metadata(w.dest.join("a/photo.jpg")).unwrap(),
        );
        assert_eq!(
            (s.mtime(), s.mtime_nsec()),
            (d.mtime(), d.mtime_nsec()),
            "the dest kept the old mtime after the source was touched\n{run}"
        );
    }
}

both_engines! {
    /// Invariant 6 for modes: a chmod on a verified file reaches the dest on the next sweep.
    fn chmod_of_a_verified_file_reaches_the_dest() {
        let w = Work::new();
        let path = w.write("a/doc.pdf", b"contract");
        set_mode(&path, 0o644);
        w.sweep(&[]).assert_code(0);
        set_mode(&path, 0o600);
        let run = w.sweep(&[]);
        run.assert_code(0);
        let mode = fs::metadata(w.dest.join("a/doc.pdf")).unwrap().mode() & 0o7777;
        assert_eq!(
            mode, 0o600,
            "the dest kept mode {mode:o} after chmod 600 of the source\n{run}"
        );
    }
}

both_engines! {
    /// As root, a chown on a verified file reaches the dest on the next sweep.
    fn chown_of_a_verified_file_reaches_the_dest() {
        let w = Work::new();
        let path = w.write("a/doc.pdf", b"contract");
        w.sweep(&[]).assert_code(0);
        std::os::unix::fs::chown(&path, Some(4321), Some(8765)).unwrap();
        let run = w.sweep(&[]);
        run.assert_code(0);
        let d = fs::metadata(w.dest.join("a/doc.pdf")).unwrap();
        assert_eq!(
            (d.uid(), d.gid()),
            (4321, 8765),
            "the dest kept its owner after chown of the source\n{run}"
        );
    }
}

both_engines! {
    fn setuid_setgid_and_sticky_bits_are_preserved() {
        let w = Work::new();
        for (rel, mode) in [
            ("bin/suid", 0o4755),
            ("bin/sgid", 0o2750),
            ("bin/sticky", 0o1777),
            ("bin/none", 0o000),
        ] {
            let p = w.write(rel, rel.as_bytes());
            std::os::unix::fs::chown(&p, Some(1234), Some(1234)).unwrap();
            set_mode(&p, mode);
        }
        w.sweep(&[]).assert_code(0);
        assert_trees_equal(&w.src, &w.dest);
    }
}

both_engines! {
    /// Invariant 2: an identical file that was at the dest before cutoverfs is not cutoverfs's; when
    /// the source later changes, it is a conflict, never replaced.
    fn a_foreign_identical_dest_file_is_never_replaced_later() {
        let w = Work::new();
        w.write("a/x.txt", b"same");
        let theirs = write_file(&w.dest.join("a/x.txt"), b"same");
        let ino = fs::metadata(&theirs).unwrap().ino();
        let first = w.sweep(&[]);
        first.assert_code(0);
        assert_eq!(first.count("Already exist"), 1, "{first}");

        w.write("a/x.txt", b"changed in the source");
        let run = w.sweep(&[]);
        run.assert_code(1);
        assert_eq!(run.count("Conflicts"), 1, "{run}");
        assert_eq!(fs::read(&theirs).unwrap(), b"same");
        assert_eq!(
            fs::metadata(&theirs).unwrap().ino(),
            ino,
            "the foreign file was replaced"
        );
    }
}

both_engines! {
    fn a_conflict_clears_once_the_foreign_file_is_removed() {
        let w = Work::new();
        w.write("a/x.txt", b"mine");
        write_file(&w.dest.join("a/x.txt"), b"theirs");
        w.sweep(&[]).assert_code(1);
        fs::remove_file(w.dest.join("a/x.txt")).unwrap();
        let run = w.sweep(&[]);
        run.assert_code(0);
        assert_eq!(run.count("Successfully copied"), 1, "{run}");
        assert_eq!(fs::read(w.dest.join("a/x.txt")).unwrap(), b"mine");
        assert_file_states(&w.status(), &[("verified", 1)]);
    }
}

/// A directory removed or renamed through the mount stays at a `file://` dest as an empty
/// directory; a file later given that name takes its place. A directory that still holds
/// anything is a conflict and stays as it was.
#[test]
fn an_empty_dest_directory_gives_way_to_a_file_of_its_name() {
    let w = Work::new();
    w.write("a/photo", b"a file now");
    w.write("a/album", b"a file too");
    fs::create_dir_all(w.dest.join("a/photo")).unwrap();
    let theirs = write_file(&w.dest.join("a/album/kept.txt"), b"theirs");
    let run = w.sweep(&[]);
    run.assert_code(1);
    assert_eq!(run.count("Successfully copied"), 1, "{run}");
    assert_eq!(run.count("Conflicts"), 1, "{run}");
    assert_eq!(fs::read(w.dest.join("a/photo")).unwrap(), b"a file now");
    assert_eq!(fs::read(&theirs).unwrap(), b"theirs");
}

#[test]
fn later_commands_may_leave_out_source_and_dest_or_spell_them_differently() {
    let w = Work::new();
    w.write("a/x.txt", b"x");
    w.sweep(&[]).assert_code(0);
    w.write("a/y.txt", b"y");

    // Only the manifest.
    let run = w.cmd_manifest_only("sweep", &["--no-progress"]);
    run.assert_code(0);
    assert_eq!(run.count("Successfully copied"), 1, "{run}");

    // The same pair through a symlink, a trailing slash and a plain-path manifest.
    let alias = w.root.join("alias-of-src");
    std::os::unix::fs::symlink(&w.src, &alias).unwrap();
    w.write("a/z.txt", b"z");
    let run = common::run([
        "sweep".as_ref(),
        "--no-progress".as_ref(),
        "--source".as_ref(),
        alias.as_os_str(),
        "--dest".as_ref(),
        format!("{}/", w.dest_url()).as_ref(),
        "--manifest".as_ref(),
        w.manifest.as_os_str(),
    ]);
    run.assert_code(0);
    assert_eq!(run.count("Successfully copied"), 1, "{run}");
    assert_trees_equal(&w.src, &w.dest);
}

fn spawn_sweep(w: &Work) -> std::process::Child {
    let mut args = vec!["sweep".into()];
    args.extend(w.target());
    args.extend(
        [
            "--no-progress",
            "--batch-size",
            "25",
            "--concurrency",
            "4",
            "--lease-timeout",
            "5s",
        ]
        .map(Into::into),
    );
    command()
        .args::<Vec<std::ffi::OsString>, _>(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

both_engines! {
    /// Two sweeps on one manifest and dest at the same time (DESIGN §2 "node"): leases keep them
    /// apart; every file is copied once and both finish. The manifest exists already here.
    fn two_concurrent_sweeps_share_the_work_and_both_complete() {
        let w = Work::new();
        w.write("first.txt", b"creates the manifest");
        w.sweep(&[]).assert_code(0);
        let files = 800;
        small_tree(&w, files, 8, 512, 6 * 1024, 31);
        for i in 0..2 {
            w.write(&format!("big/b{i}.bin"), &pseudo_random(3 << 20, 60 + i));
        }
        let started = Instant::now();
        let (a, b) = (spawn_sweep(&w), spawn_sweep(&w));
        let ra = wait_capturing(a, started, COMMAND_TIMEOUT);
        let rb = wait_capturing(b, started, COMMAND_TIMEOUT);
        ra.assert_code(0);
        rb.assert_code(0);
        let new = files as u64 + 2;
        assert_file_states(&w.status(), &[("verified", new + 1)]);
        assert_trees_equal(&w.src, &w.dest);
        assert!(leftover_temp_files(&w.dest).is_empty());

        let copied = ra.count("Successfully copied") + rb.count("Successfully copied");
        assert_eq!(
            copied, new,
            "each file is copied by exactly one sweep\n{ra}\n{rb}"
        );
        let rows: serde_json::Value =
            serde_json::from_str(&w.cmd_manifest_only("batches", &["--json"]).stdout).unwrap();
        let sum: u64 = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["copied"].as_u64().unwrap())
            .sum();
        assert_eq!(sum, new + 1);
    }
}

both_engines! {
    /// Two nodes started together on a manifest that does not exist yet: both must come up (one
    /// creates the schema, the other waits for it), not fail on "table already exists".
    fn two_sweeps_starting_together_on_a_new_manifest_both_succeed() {
        let mut failures = Vec::new();
        // The race is narrow; a few tries make it show.
        for attempt in 0..5 {
            let w = Work::new();
            small_tree(&w, 50, 2, 100, 1000, 8);
            let started = Instant::now();
            let (a, b) = (spawn_sweep(&w), spawn_sweep(&w));
            let ra = wait_capturing(a, started, COMMAND_TIMEOUT);
            let rb = wait_capturing(b, started, COMMAND_TIMEOUT);
            for r in [ra, rb] {
                if r.code != Some(0) {
                    failures.push(format!("attempt {attempt}:\n{r}"));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of 10 sweeps failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
