//! Purge (DESIGN §4.1) rule by rule: a local copy is deleted only when its dest copy, checked
//! right then, is the one verified, and the local copy still is what was verified. Damage done
//! outside cutoverfs (a flipped byte, a lost object, a local change) never costs a file, on
//! `file://` and on S3, whether or not `verify` ran in between.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;

use common::cutover::{files_below, flip_byte, flip_byte_keeping_mtime, Cutover};
use common::mount::wait_until;
use common::*;

/// The tree of the scenario: 301 files over nested folders, as a media tree looks.
fn media_tree(c: &Cutover) -> Vec<String> {
    small_tree(&c.w, 301, 7, 600, 12 * 1024, 5);
    files_below(&c.w.src).into_keys().collect()
}

/// Every file of `truth` is somewhere with its right bytes (its local copy or its dest copy),
/// and a mount over the migration serves each one byte for byte.
fn assert_nothing_lost(c: &Cutover, truth: &BTreeMap<String, Vec<u8>>) {
    assert_each_file_somewhere(c, truth);
    let (mnt, daemon) = c.mount(&["--no-sweep"]);
    for (rel, bytes) in truth {
        let served = fs::read(mnt.join(rel))
            .unwrap_or_else(|e| panic!("{} {rel} through the mount: {e}", c.name()));
        assert!(
            served == *bytes,
            "{} {rel}: the mount served other bytes",
            c.name()
        );
    }
    daemon.stop();
}

/// Every file of `truth` has its local copy or its dest copy with its right bytes (a copy set
/// aside by a purge counts: it is the local copy under another name until the next run).
fn assert_each_file_somewhere(c: &Cutover, truth: &BTreeMap<String, Vec<u8>>) {
    let set_aside = set_aside_copies(&c.w.src);
    for (rel, bytes) in truth {
        let local = fs::read(c.w.src.join(rel)).ok();
        let dest = c.read_dest(rel);
        let aside = set_aside.get(rel);
        assert!(
            local.as_ref() == Some(bytes) || dest.as_ref() == Some(bytes) || aside == Some(bytes),
            "{} {rel}: no right copy left (local: {:?} bytes, dest: {:?} bytes, want {})",
            c.name(),
            local.map(|l| l.len()),
            dest.map(|d| d.len()),
            bytes.len()
        );
    }
}

/// Local copies a purge set aside (`.cutoverfs-purge-PID-NAME`), by the path they stand for.
fn set_aside_copies(src: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    files_below(src)
        .into_iter()
        .filter_map(|(rel, bytes)| {
            let (dir, name) = match rel.rsplit_once('/') {
                Some((dir, name)) => (format!("{dir}/"), name.to_string()),
                None => (String::new(), rel.clone()),
            };
            let rest = name.strip_prefix(".cutoverfs-purge-")?;
            let (_pid, original) = rest.split_once('-')?;
            Some((format!("{dir}{original}"), bytes))
        })
        .collect()
}

/// The operator's sequence of issue 16 after a damaged dest: three flipped bytes at the dest
/// (first, middle and last file), a dest object deleted, a local file appended to; then
/// (optionally) verify --deep, sweep, verify --deep, a paranoid dry run and a paranoid purge.
fn damaged_dest_then_purge(c: Cutover, verify_between: bool) {
    let files = media_tree(&c);
    c.run("sweep", &[]).assert_code(0);
    let (first, middle, last) = (&files[0], &files[files.len() / 2], &files[files.len() - 1]);
    for rel in [first, middle, last] {
        flip_byte(&c.dest_file(rel), 17);
    }
    let lost = &files[100];
    c.delete_dest(lost);
    let appended = &files[200];
    fs::OpenOptions::new()
        .append(true)
        .open(c.w.src.join(appended))
        .unwrap()
        .write_all(b"+appended")
        .unwrap();
    let truth = files_below(&c.w.src);

    if verify_between {
        let found = c.run("verify", &["--deep", "--format", "json"]);
        found.assert_code(1);
        let report: serde_json::Value = serde_json::from_str(&found.stdout).unwrap();
        let mut broken: Vec<&str> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap())
            .collect();
        broken.sort();
        let mut expected = vec![first, middle, last, lost, appended];
        expected.sort();
        assert_eq!(broken, expected, "{found}");
    }
    c.run("sweep", &[]);
    if verify_between {
        c.run("verify", &["--deep"]);
    }
    let before = files_below(&c.w.src);
    let dry = c.run("purge", &["--paranoid"]);
    assert!(dry.stdout.contains("Nothing was deleted"), "{dry}");
    assert_eq!(files_below(&c.w.src), before, "a dry run deleted something");
    c.run("purge", &["--confirm", "--paranoid"]);
    assert_nothing_lost(&c, &truth);

    // What purge refused is copied again by the next sweep, and then purged.
    c.run("sweep", &[]).assert_code(0);
    c.run("verify", &["--deep"]).assert_code(0);
    c.run("purge", &["--confirm", "--paranoid"]).assert_code(0);
    assert!(
        files_below(&c.w.src).is_empty(),
        "every local copy purged in the end"
    );
    assert_nothing_lost(&c, &truth);
}

#[test]
fn file_dest_damaged_then_verified_swept_and_purged_loses_nothing() {
    damaged_dest_then_purge(Cutover::file(), true);
}

#[test]
fn file_dest_damaged_then_purged_without_verify_loses_nothing() {
    damaged_dest_then_purge(Cutover::file(), false);
}

#[test]
fn s3_dest_damaged_then_verified_swept_and_purged_loses_nothing() {
    damaged_dest_then_purge(Cutover::s3(), true);
}

#[test]
fn s3_dest_damaged_then_purged_without_verify_loses_nothing() {
    damaged_dest_then_purge(Cutover::s3(), false);
}

/// Without `--paranoid`, purge checks the dest copy by what a stat or HEAD tells: on `file://`
/// a rewritten copy has a new stamp (mtime, inode) and is read back before anything is
/// deleted; a lost object is seen by any check.
#[test]
fn a_plain_purge_checks_each_file_dest_copy_before_deleting() {
    let c = Cutover::file();
    let files = media_tree(&c);
    c.run("sweep", &[]).assert_code(0);
    flip_byte(&c.dest_file(&files[3]), 1);
    c.delete_dest(&files[4]);
    let truth = files_below(&c.w.src);
    let purge = c.run("purge", &["--confirm"]);
    purge.assert_code(1);
    assert_eq!(purge.count("Refused"), 2, "{purge}");
    assert!(
        purge.stdout.contains(&files[3]) && purge.stdout.contains(&files[4]),
        "{purge}"
    );
    assert!(purge.stdout.contains("pending again"), "{purge}");
    let status = c.w.status();
    assert_eq!(state_count(&status, "files", "pending"), 2, "{status:#}");
    assert_nothing_lost(&c, &truth);
}

/// A local copy that changed after it was verified is refused and kept: by size, by mtime, and
/// (only `--paranoid` can tell) by content with size and mtime put back.
#[test]
fn a_local_copy_changed_after_it_was_verified_is_refused_and_kept() {
    let c = Cutover::file();
    c.w.write("size.bin", b"0123456789");
    c.w.write("mtime.bin", b"0123456789");
    c.w.write("content.bin", b"0123456789");
    c.w.write("same.bin", b"0123456789");
    c.run("sweep", &[]).assert_code(0);
    fs::write(c.w.src.join("size.bin"), b"0123456789+").unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(c.w.src.join("mtime.bin"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    flip_byte_keeping_mtime(&c.w.src.join("content.bin"), 4);
    let truth = files_below(&c.w.src);

    // Size and mtime are seen by a plain purge (a dry run: it would delete the other two).
    let plain = c.run("purge", &[]);
    assert_eq!(plain.count("Would delete"), 2, "{plain}");
    assert_eq!(plain.count("Refused"), 2, "{plain}");
    assert!(
        plain.stdout.contains("size.bin: the local copy changed"),
        "{plain}"
    );
    assert!(
        plain.stdout.contains("mtime.bin: the local copy changed"),
        "{plain}"
    );

    let paranoid = c.run("purge", &["--confirm", "--paranoid"]);
    assert_eq!(paranoid.count("Local copies deleted"), 1, "{paranoid}");
    assert_eq!(paranoid.count("Refused"), 3, "{paranoid}");
    assert!(
        paranoid
            .stdout
            .contains("content.bin: the local copy's SHA-256"),
        "{paranoid}"
    );
    for rel in ["size.bin", "mtime.bin", "content.bin"] {
        assert_eq!(
            fs::read(c.w.src.join(rel)).unwrap(),
            truth[rel],
            "{rel} kept as it is"
        );
    }
    assert!(!c.w.src.join("same.bin").exists());
}

/// Only verified files are ever purged: pending, failed, conflict and missing ones keep their
/// local copies, whatever purge is asked.
#[test]
fn pending_failed_conflict_and_missing_files_are_never_purged() {
    let c = Cutover::file();
    c.w.write("ok.txt", b"verified");
    c.w.write("conflict.txt", b"ours");
    write_file(&c.w.dest.join("conflict.txt"), b"someone else's");
    // A file where the dest needs a directory: its copy fails.
    c.w.write("blocked/inner.txt", b"cannot be copied");
    write_file(
        &c.w.dest.join("blocked"),
        b"a file where a directory is needed",
    );
    c.w.write("gone.txt", b"vanishes after the scan");
    c.run("sweep", &["--max-retries", "0"]).assert_code(1);
    fs::remove_file(c.w.src.join("gone.txt")).unwrap();
    c.run("sweep", &["--max-retries", "0"]);
    // Recorded pending by a daemon's scan, never copied.
    c.w.write("pending.txt", b"new after the sweep");
    let (_mnt, daemon) = c.mount(&["--no-sweep"]);
    daemon.wait_for_scan();
    daemon.stop();
    let status = c.w.status();
    assert_eq!(state_count(&status, "files", "pending"), 1, "{status:#}");
    assert_eq!(state_count(&status, "files", "conflict"), 1, "{status:#}");
    assert_eq!(state_count(&status, "files", "failed"), 1, "{status:#}");
    assert_eq!(state_count(&status, "files", "missing"), 1, "{status:#}");

    let purge = c.run("purge", &["--confirm", "--paranoid"]);
    purge.assert_code(0);
    assert_eq!(purge.count("Local copies deleted"), 1, "{purge}");
    assert!(!c.w.src.join("ok.txt").exists());
    for (rel, bytes) in [
        ("conflict.txt", &b"ours"[..]),
        ("blocked/inner.txt", b"cannot be copied"),
        ("pending.txt", b"new after the sweep"),
    ] {
        assert_eq!(
            fs::read(c.w.src.join(rel)).unwrap(),
            bytes,
            "{rel} must be kept"
        );
    }
    assert_eq!(
        fs::read(c.w.dest.join("conflict.txt")).unwrap(),
        b"someone else's"
    );
    let after = c.w.status();
    for state in ["pending", "failed", "conflict", "missing"] {
        assert_eq!(state_count(&after, "files", state), 1, "{state}: {after:#}");
    }
}

/// A dry run deletes nothing and changes nothing in the manifest.
#[test]
fn a_dry_run_deletes_nothing_and_records_nothing() {
    let c = Cutover::file();
    let files = media_tree(&c);
    c.run("sweep", &[]).assert_code(0);
    flip_byte(&c.dest_file(&files[9]), 0);
    let manifest_before = fs::read(&c.w.manifest).unwrap();
    let local_before = files_below(&c.w.src);
    let dry = c.run("purge", &["--paranoid"]);
    assert_eq!(dry.count("Would delete"), files.len() as u64 - 1, "{dry}");
    assert_eq!(dry.count("Refused"), 1, "{dry}");
    assert!(dry.stdout.contains("Nothing was deleted"), "{dry}");
    assert_eq!(files_below(&c.w.src), local_before);
    assert_eq!(
        fs::read(&c.w.manifest).unwrap(),
        manifest_before,
        "the dry run changed the manifest"
    );
    assert_eq!(
        state_count(&c.w.status(), "files", "verified"),
        files.len() as u64
    );
}

/// A writer that opens a file through the mount while purge has its local copy set aside keeps
/// what it wrote: the purge sees the file held and puts the copy back (or leaves the newer one).
#[test]
fn a_writer_through_the_mount_during_purge_keeps_its_data() {
    let c = Cutover::file();
    c.w.write("docs/report.txt", b"first draft");
    c.w.write("docs/other.txt", b"untouched");
    let (mnt, daemon) = c.mount(&[]);
    wait_until(
        std::time::Duration::from_secs(60),
        "both files verified",
        || state_count(&c.w.status(), "files", "verified") == 2,
    );
    let hold = Hold::at_subject("purge:set-aside", "docs/report.txt");
    let mut purge = c.command("purge", &["--confirm"]);
    hold.apply(&mut purge);
    let purge = purge
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = purge.id();
    hold.wait_reached(|| process_alive(pid));
    // The local copy is set aside right now: the mount brings the file back from the dest and
    // the application writes it.
    fs::write(mnt.join("docs/report.txt"), b"second draft, longer").unwrap();
    hold.release();
    let run = wait_capturing(purge, std::time::Instant::now(), COMMAND_TIMEOUT);
    assert!(
        run.stdout
            .contains("docs/report.txt: opened for writing or changed"),
        "{run}"
    );
    assert_eq!(
        fs::read(mnt.join("docs/report.txt")).unwrap(),
        b"second draft, longer"
    );
    assert_eq!(
        fs::read(c.w.src.join("docs/report.txt")).unwrap(),
        b"second draft, longer"
    );
    assert!(
        !c.w.src.join("docs/other.txt").exists(),
        "the other file was purged"
    );
    assert_eq!(fs::read(mnt.join("docs/other.txt")).unwrap(), b"untouched");
    daemon.stop();
}

fn process_alive(pid: u32) -> bool {
    // A zombie counts as ended: its status file says so.
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| !s.contains("State:\tZ"))
        .unwrap_or(false)
}

/// kill -9 at every step of a purge loses nothing and the next run finishes the job.
#[test]
fn purge_killed_at_each_step_loses_nothing_and_the_next_run_finishes() {
    for point in ["purge:recorded", "purge:set-aside", "purge:removed"] {
        let c = Cutover::file();
        let files = media_tree(&c);
        c.run("sweep", &[]).assert_code(0);
        let truth = files_below(&c.w.src);
        // Two crashes in a row, then the run that must finish what they left.
        for nth in [1, 150] {
            let killed = run_command(
                c.command("purge", &["--confirm"])
                    .env("CUTOVERFS_CRASH_AT", format!("{point}#{nth}")),
            );
            assert_eq!(killed.code, None, "{point}#{nth} was not reached: {killed}");
            assert_each_file_somewhere(&c, &truth);
        }
        let last = c.run("purge", &["--confirm", "--paranoid"]);
        last.assert_code(0);
        assert!(files_below(&c.w.src).is_empty(), "{point}: {last}");
        assert_eq!(
            state_count(&c.w.status(), "files", "verified"),
            files.len() as u64,
            "{point}"
        );
        c.run("verify", &["--deep"]).assert_code(0);
        assert_nothing_lost(&c, &truth);
        // No set-aside copies left behind.
        let leftovers: Vec<_> = walk_names(&c.w.src)
            .into_iter()
            .filter(|n| n.starts_with(".cutoverfs-"))
            .collect();
        assert!(leftovers.is_empty(), "{point}: {leftovers:?}");
    }
}

fn walk_names(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            out.push(entry.file_name().to_string_lossy().into_owned());
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    out
}

/// A purge with an S3 dest, then every file read through the mount is byte-identical.
#[test]
fn an_s3_purge_then_the_whole_tree_reads_back_through_the_mount() {
    let c = Cutover::s3();
    media_tree(&c);
    c.w.write("big/scan.tiff", &pseudo_random(9 << 20, 3));
    let truth = files_below(&c.w.src);
    c.run("sweep", &[]).assert_code(0);
    c.run("purge", &["--confirm"]).assert_code(0);
    assert!(files_below(&c.w.src).is_empty());
    assert_nothing_lost(&c, &truth);
}

/// Reads through the mount never serve a `file://` dest copy that changed since it was verified:
/// with a local copy, the local copy is served and the file goes back to pending; without one
/// (purged), the open fails with EIO and a DATA AT RISK line names the file, never wrong bytes.
#[test]
fn a_mount_never_serves_a_damaged_file_dest_copy() {
    let c = Cutover::file();
    c.w.write("kept/photo.jpg", &pseudo_random(70_000, 1));
    c.w.write("kept/intact.jpg", &pseudo_random(5_000, 2));
    c.w.write("purged/scan.pdf", &pseudo_random(40_000, 3));
    c.w.write("lost/gone.pdf", &pseudo_random(3_000, 4));
    c.w.write("quiet/rot.pdf", &pseudo_random(9_000, 5));
    c.run("sweep", &[]).assert_code(0);
    c.run(
        "purge",
        &[
            "--confirm",
            "--path",
            "purged/*",
            "--path",
            "lost/*",
            "--path",
            "quiet/*",
        ],
    )
    .assert_code(0);
    let truth = |rel: &str| {
        let (len, seed) = match rel {
            "kept/photo.jpg" => (70_000, 1),
            "kept/intact.jpg" => (5_000, 2),
            "purged/scan.pdf" => (40_000, 3),
            "lost/gone.pdf" => (3_000, 4),
            _ => (9_000, 5),
        };
        pseudo_random(len, seed)
    };
    flip_byte(&c.dest_file("kept/photo.jpg"), 33_000);
    flip_byte(&c.dest_file("purged/scan.pdf"), 100);
    c.delete_dest("lost/gone.pdf");

    let (mnt, daemon) = c.mount(&["--no-sweep"]);
    for rel in ["kept/photo.jpg", "kept/intact.jpg"] {
        assert!(
            fs::read(mnt.join(rel)).unwrap() == truth(rel),
            "{rel}: wrong bytes served"
        );
    }
    for rel in ["purged/scan.pdf", "lost/gone.pdf"] {
        let err = fs::read(mnt.join(rel)).expect_err(rel);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{rel}: {err}");
    }
    wait_until(
        std::time::Duration::from_secs(30),
        "the damaged copy pending again",
        || state_count(&c.w.status(), "files", "pending") == 1,
    );
    let log = daemon.stop();
    for rel in ["purged/scan.pdf", "lost/gone.pdf"] {
        assert!(
            log.lines()
                .any(|l| l.contains("DATA AT RISK") && l.contains(rel)),
            "no DATA AT RISK line for {rel}:\n{log}"
        );
    }
    // The limit of a cheap check, documented: a byte flipped with the mtime put back is served
    // until a deep verify finds it (a paranoid purge would not have purged it).
    flip_byte_keeping_mtime(&c.dest_file("quiet/rot.pdf"), 5);
    let deep = c.run("verify", &["--deep", "--path", "quiet/*"]);
    deep.assert_code(1);
    assert!(
        deep.stdout.contains("DATA AT RISK") || deep.stderr.contains("DATA AT RISK"),
        "{deep}"
    );
}
