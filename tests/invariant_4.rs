//! Invariant 4 (DESIGN §4.4), made to happen rather than hoped for: a copy is held in the
//! middle (the source read, not yet published), the source changes meanwhile, also with its
//! size and mtime put back so only the inode change time tells, and the copy is released. That
//! copy is never verified, and the next pass copies the new content. On `file://` and on S3,
//! in one part and in several.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Stdio;

use common::cutover::Cutover;
use common::*;

/// Rewrites bytes of `path` in place and puts its mtime back: size and mtime as before.
fn change_keeping_size_and_mtime(path: &std::path::Path) {
    let mtime = fs::metadata(path).unwrap().modified().unwrap();
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(b"CHANGED WHILE COPIED", 10).unwrap();
    file.set_modified(mtime).unwrap();
}

fn changed_mid_copy(c: Cutover, size: usize, extra: &[&str], keep_size_and_mtime: bool) {
    let rel = "scans/contract.pdf";
    let path = c.w.write(rel, &pseudo_random(size, 5));
    c.w.write("scans/other.pdf", &pseudo_random(1000, 6));
    let hold = Hold::at_subject("copy:read", rel);
    let mut command = c.command("sweep", extra);
    hold.apply(&mut command);
    let mut sweep = command
        .args(["--max-retries", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hold.wait_reached(|| sweep.try_wait().unwrap().is_none());
    if keep_size_and_mtime {
        change_keeping_size_and_mtime(&path);
    } else {
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"appended", size as u64)
            .unwrap();
    }
    // Nothing is visible at the key while the copy is held.
    assert!(
        c.read_dest(rel).is_none(),
        "{}: a partial object is visible",
        c.name()
    );
    hold.release();
    let run = wait_capturing(sweep, std::time::Instant::now(), COMMAND_TIMEOUT);
    let now = fs::read(&path).unwrap();
    let status = c.w.status();
    assert_ne!(
        problem(&status, rel).map(|p| p["state"].clone()),
        None,
        "{}: the copy of a changed source is not reported\n{run}",
        c.name()
    );
    assert!(
        c.read_dest(rel).is_none_or(|at_dest| at_dest == now),
        "{}: the dest holds the old content\n{run}",
        c.name()
    );
    // The file was not verified with the old content, so the next pass copies the new one.
    c.run(
        "sweep",
        &extra
            .iter()
            .copied()
            .chain(["--retry-delay", "10ms"])
            .collect::<Vec<_>>(),
    )
    .assert_code(0);
    assert!(
        c.read_dest(rel) == Some(now),
        "{}: the new content is not at the dest",
        c.name()
    );
    c.run("verify", &["--deep"]).assert_code(0);
}

#[test]
fn file_dest_a_source_changed_mid_copy_is_never_verified() {
    changed_mid_copy(Cutover::file(), 300_000, &[], false);
    changed_mid_copy(Cutover::file(), 300_000, &[], true);
    // Large enough for the in-kernel copy path.
    changed_mid_copy(Cutover::file(), 3 << 20, &[], true);
}

#[test]
fn s3_dest_a_source_changed_mid_copy_is_never_verified() {
    changed_mid_copy(Cutover::s3(), 300_000, &[], false);
    changed_mid_copy(Cutover::s3(), 300_000, &[], true);
    // In parts (multipart upload).
    let parts = ["--s3-multipart-threshold", "5MiB", "--s3-part-size", "5MiB"];
    changed_mid_copy(Cutover::s3(), 11 << 20, &parts, true);
}
