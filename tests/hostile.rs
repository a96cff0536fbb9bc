//! Hostile names and rows (issue 16.9): nothing cutoverfs does to the source or a `file://`
//! dest leaves their roots, even when a path component is swapped for a symlink in the middle
//! of a copy; manifest rows whose paths could lead elsewhere (absolute, `..`, `.`, empty
//! components: a shared PostgreSQL manifest can be written by others) are refused with a clear
//! reason and never followed, by the sweeper, the mount and a replica; and the one name form
//! cutoverfs keeps for itself in the local tree is refused to the application with a reason and
//! reported when a file has it already.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::process::Stdio;

use common::cutover::{files_below, Cutover};
use common::mount::Daemon;
use common::*;

fn spawn_held(c: &Cutover, cmd: &str, extra: &[&str], hold: &Hold) -> std::process::Child {
    let mut command = c.command(cmd, extra);
    hold.apply(&mut command);
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A source directory swapped for a symlink to somewhere else while a file in it is being
/// copied: the copy is not verified, nothing from the other place is read or copied, and the
/// other place is left as it was.
#[test]
fn a_source_directory_swapped_for_a_symlink_mid_copy_leads_nowhere() {
    let c = Cutover::file();
    c.w.write("docs/report.pdf", b"the real report");
    c.w.write("docs/other.pdf", b"another file");
    let outside = c.w.root.join("outside");
    write_file(&outside.join("report.pdf"), b"SECRET: not part of the tree");
    write_file(&outside.join("other.pdf"), b"SECRET: not part of the tree");
    let before = files_below(&outside);

    let hold = Hold::at_subject("copy:read", "docs/report.pdf");
    let mut sweep = spawn_held(&c, "sweep", &["--max-retries", "1"], &hold);
    hold.wait_reached(|| sweep.try_wait().unwrap().is_none());
    fs::rename(c.w.src.join("docs"), c.w.root.join("moved-docs")).unwrap();
    symlink(&outside, c.w.src.join("docs")).unwrap();
    hold.release();
    let run = wait_capturing(sweep, std::time::Instant::now(), COMMAND_TIMEOUT);

    assert_eq!(
        files_below(&outside),
        before,
        "the place the symlink names was changed\n{run}"
    );
    for (rel, bytes) in files_below(&c.w.dest) {
        assert!(
            !bytes.starts_with(b"SECRET"),
            "{rel} at the dest came from outside the tree\n{run}"
        );
    }
    // The file held mid-copy is not verified (docs/other.pdf, copied before the swap, is).
    let status = c.w.status();
    let held = problem(&status, "docs/report.pdf")
        .unwrap_or_else(|| panic!("the held copy is not reported: {status:#}\n{run}"));
    assert_eq!(held["state"], "failed", "{held}");
    assert_eq!(state_count(&status, "files", "verified"), 1, "{status:#}");
}

/// A `file://` dest directory swapped for a symlink to somewhere else while a copy into it is
/// held: publishing refuses to go through it, and nothing lands in the other place.
#[test]
fn a_dest_directory_swapped_for_a_symlink_mid_copy_leads_nowhere() {
    let c = Cutover::file();
    c.w.write("docs/2024/report.pdf", b"the real report");
    let outside = c.w.root.join("outside");
    // What the swapped-in link leads to has the same shape, so only refusing to go through a
    // link anywhere in the path keeps the file out of it.
    fs::create_dir_all(outside.join("2024")).unwrap();
    let hold = Hold::at_subject("copy:read", "docs/2024/report.pdf");
    let mut sweep = spawn_held(&c, "sweep", &["--max-retries", "0"], &hold);
    hold.wait_reached(|| sweep.try_wait().unwrap().is_none());
    // The copy's directory at the dest exists now (its unnamed file is in it).
    fs::rename(c.w.dest.join("docs"), c.w.root.join("moved-dest-docs")).unwrap();
    symlink(&outside, c.w.dest.join("docs")).unwrap();
    hold.release();
    let run = wait_capturing(sweep, std::time::Instant::now(), COMMAND_TIMEOUT);
    assert!(
        files_below(&outside).is_empty(),
        "a file landed outside the dest\n{run}"
    );
    let status = c.w.status();
    assert_eq!(
        state_count(&status, "files", "failed"),
        1,
        "{status:#}\n{run}"
    );
}

/// Rows nobody but a hostile writer makes: the sweeper refuses each with its reason (never
/// reading or writing where it points), the mount and a replica neither show nor follow them,
/// and verify, purge and rollback leave them alone.
#[test]
fn manifest_rows_that_lead_elsewhere_are_refused_everywhere() {
    let c = Cutover::file();
    c.w.write("a/fine.txt", b"fine");
    c.run("sweep", &[]).assert_code(0);
    // Targets the rows point at, outside the source and the dest.
    write_file(&c.w.root.join("outside.txt"), b"SECRET outside");
    let hostile = [
        ("../outside.txt", "pending"),
        ("/etc/hostname", "pending"),
        ("a/./fine.txt", "pending"),
        ("a//fine.txt", "pending"),
        ("a/..", "verified"),
        ("a/../../outside.txt", "verified"),
    ];
    let values: Vec<String> = hostile
        .iter()
        .map(|(path, state)| format!("('{path}', 'file', '{state}', 14, 0, 33188, '{path}', 1, 1)"))
        .collect();
    sqlite_exec(
        &c.w.manifest,
        &format!(
            "INSERT INTO entries (path, kind, state, size, mtime_ns, mode, dest_key, created_at, updated_at) VALUES {};",
            values.join(", ")
        ),
    );
    let dest_before = files_below(&c.w.dest);

    let sweep = c.run("sweep", &[]);
    for (path, state) in hostile.iter().filter(|(_, s)| *s == "pending") {
        assert!(
            sweep.stderr.contains(&format!("{path:?} is refused")),
            "{path} ({state}) not refused by name\n{sweep}"
        );
    }
    let status = c.w.status();
    for (path, _) in hostile.iter().filter(|(_, s)| *s == "pending") {
        let p = problem(&status, path).unwrap_or_else(|| panic!("{path} not reported: {status:#}"));
        assert_eq!(p["state"], "unsupported", "{path}: {p}");
        assert!(
            p["reason"].as_str().unwrap().contains("refused"),
            "{path}: {p}"
        );
    }
    assert_eq!(
        files_below(&c.w.dest),
        dest_before,
        "the sweep wrote at the dest for them"
    );
    assert!(
        !c.w.root.join("dest/../outside.txt").exists()
            || fs::read(c.w.root.join("outside.txt")).unwrap() == b"SECRET outside"
    );

    // The mount and a replica list the directory as it is.
    let (mnt, daemon) = c.mount(&["--no-sweep"]);
    let names: Vec<String> = fs::read_dir(mnt.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["fine.txt"], "the mount listed a refused row");
    daemon.stop();
    let replica = c.w.root.join("replica");
    fs::create_dir_all(&replica).unwrap();
    let args: Vec<std::ffi::OsString> = [
        "--no-source",
        "--manifest",
        &c.w.manifest_url(),
        "--dest",
        &c.dest_url(),
    ]
    .iter()
    .map(std::ffi::OsString::from)
    .collect();
    let daemon = Daemon::start(&replica, &args);
    let names: Vec<String> = fs::read_dir(replica.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["fine.txt"], "the replica listed a refused row");
    daemon.stop();

    // verify, purge and rollback leave them alone, saying so.
    let verify = c.run("verify", &["--deep"]);
    assert!(
        verify.stderr.contains("\"a/../../outside.txt\" is refused"),
        "{verify}"
    );
    let purge = c.run("purge", &["--confirm"]);
    assert!(purge.stdout.contains("a/../../outside.txt"), "{purge}");
    let rollback = c.run("rollback", &["--all"]);
    assert!(
        rollback.stdout.contains("refused") || rollback.stderr.contains("refused"),
        "{rollback}"
    );
    assert_eq!(
        fs::read(c.w.root.join("outside.txt")).unwrap(),
        b"SECRET outside"
    );
}

/// The application cannot create a file under the one name form cutoverfs keeps for itself
/// (the error says why in the log); a file that has such a name already is reported, not hidden.
#[test]
fn the_reserved_name_form_is_refused_to_the_application_and_reported_when_found() {
    let c = Cutover::file();
    c.w.write("media/photo.jpg", b"photo");
    // As if left by someone else (no purge with that process id runs).
    c.w.write("media/.cutoverfs-purge-999999999-old.jpg", b"an old file");
    let sweep = c.run("sweep", &[]);
    let status = c.w.status();
    let p = problem(&status, "media/.cutoverfs-purge-999999999-old.jpg")
        .unwrap_or_else(|| panic!("not reported: {status:#}\n{sweep}"));
    assert_eq!(p["state"], "unsupported");
    assert!(
        p["reason"].as_str().unwrap().contains("rename the file"),
        "{p}"
    );
    let plan = c.run("plan", &["--json"]);
    let json: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    assert_eq!(json["by_state"]["unsupported"]["files"], 1, "{plan}");

    let (mnt, daemon) = c.mount(&["--no-sweep"]);
    assert!(
        mnt.join("media/.cutoverfs-purge-999999999-old.jpg")
            .exists(),
        "hidden by the mount"
    );
    let refused = fs::write(mnt.join("media/.cutoverfs-purge-12-new.jpg"), b"x").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EPERM), "{refused}");
    let refused = fs::rename(
        mnt.join("media/photo.jpg"),
        mnt.join("media/.cutoverfs-purge-1-p.jpg"),
    )
    .unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EPERM), "{refused}");
    // Other names that start like it are the application's as any.
    fs::write(mnt.join("media/.cutoverfs-notes.txt"), b"mine").unwrap();
    assert_eq!(
        fs::read(mnt.join("media/.cutoverfs-notes.txt")).unwrap(),
        b"mine"
    );
    let log = daemon.stop();
    assert!(
        log.contains("are reserved for the local copies purge sets aside"),
        "{log}"
    );
}
