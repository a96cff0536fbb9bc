//! A real Django client on the mount (issue 5, DESIGN §6): `tests/django/storage_check.py` drives
//! Django's own `FileSystemStorage` with `MEDIA_ROOT` on a live cutoverfs mount (name
//! collisions, concurrent saves, a 5 MiB multipart upload spooled on another file system and
//! copied in by `file_move_safe`, a rename-in from a spool on the mount, overwrite, listdir,
//! times, delete) and asserts every result. This test then checks what Django left through the
//! mount, in the plain local tree once unmounted, and at the dest after a `cutoverfs sweep`.
//!
//! A heavier tier: `#[ignore]`d, switched on by `.ci/run` with `CUTOVERFS_TEST_PYTHON`, a
//! python that has Django.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::{wait_until, Daemon};
use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/django/storage_check.py");

fn all_verified(w: &Work) -> bool {
    let status = w.status();
    let files = status["files"].as_object().unwrap();
    files
        .iter()
        .all(|(state, n)| state == "verified" || state == "deleted" || n == 0)
        && state_count(&status, "files", "verified") > 0
}

/// sha256 of every regular file below `root`, by relative path.
fn file_hashes(root: &Path) -> BTreeMap<String, String> {
    files_of(&snapshot(root))
        .into_iter()
        .map(|(path, entry)| match entry {
            Entry::File { sha256, .. } => (path.to_string_lossy().into_owned(), sha256),
            _ => unreachable!(),
        })
        .collect()
}

/// The last lines of a daemon log: enough to see what the mount answered, short enough to read.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// A directory for Django's upload spool outside the mount: /dev/shm (tmpfs) where there is
/// one, so the move into the mount crosses file systems as uploads spooled to /tmp do.
fn upload_spool() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    let builder = tempfile::Builder::new()
        .prefix("cutoverfs-django-")
        .to_owned();
    if base.is_dir() {
        builder.tempdir_in(base)
    } else {
        builder.tempdir()
    }
    .expect("upload spool dir")
}

#[test]
#[ignore = "heavier tier: needs CUTOVERFS_TEST_PYTHON (a python with Django); .ci/run runs it"]
fn django_file_system_storage_works_on_the_mount_and_its_files_migrate() {
    let python = django_python("django");
    let w = Work::new();
    // The media folder as the application left it before the cutover.
    let legacy: Vec<(&str, Vec<u8>)> = vec![
        ("legacy/2019/03/photo.jpg", pseudo_random(700_000, 11)),
        ("legacy/readme.txt", b"uploaded in 2019\n".to_vec()),
        ("legacy/terms.txt", b"terms, version 1\n".repeat(40)),
        ("avatars/old.png", pseudo_random(20_000, 12)),
        ("avatars/retired.png", pseudo_random(30_000, 13)),
    ];
    for (rel, content) in &legacy {
        w.write(rel, content);
    }
    // Part of it migrated before the mount by the CLI, the rest by the daemon's sweeper: either
    // way Django then overwrites and deletes files that have dest objects cutoverfs wrote.
    w.sweep(&["--include", "legacy/**"]).assert_code(0);
    let args: Vec<OsString> = vec![
        "--dest".into(),
        w.dest_url().into(),
        "--manifest".into(),
        w.manifest_url().into(),
    ];
    // Over the media directory itself, as deployed: Django's paths do not change.
    let daemon = Daemon::start(&w.src, &args);
    daemon.wait_for_scan();
    wait_until(
        Duration::from_secs(60),
        "every legacy file verified before Django starts",
        || all_verified(&w),
    );

    let spool = upload_spool();
    let report_path = w.root.join("django-report.json");
    let mut cmd = Command::new(&python);
    cmd.arg(SCRIPT).arg(&w.src).arg(spool.path());
    for (rel, content) in &legacy {
        if *rel != "avatars/retired.png" {
            cmd.arg("--existing")
                .arg(format!("{rel}={}", sha256_hex(content)));
        }
    }
    cmd.args(["--delete-existing", "avatars/retired.png"])
        .args(["--overwrite-existing", "legacy/terms.txt"])
        .arg("--report")
        .arg(&report_path)
        // Nothing written into the source checkout; the script's cwd is off the mount.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(&w.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let child = cmd.spawn().expect("start the Django check");
    let run = wait_capturing(child, started, Duration::from_secs(300));
    assert_eq!(
        run.code,
        Some(0),
        "the Django check failed on the mount\n{run}\n--- daemon log (tail):\n{}",
        log_tail(&daemon.log_text())
    );
    eprintln!("{}", run.stdout);
    assert!(
        run.stdout.contains("steps passed"),
        "no summary from the Django check\n{run}"
    );
    assert!(
        fs::read_dir(spool.path()).unwrap().next().is_none(),
        "Django left files in its upload spool {}",
        spool.path().display()
    );

    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&report_path).unwrap()).unwrap();
    let expected: BTreeMap<String, String> = report["files"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let deleted: Vec<String> = report["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(deleted, ["avatars/retired.png"]);
    assert!(
        expected.contains_key("documents/2025/01/19/invoice.pdf"),
        "the 5 MiB upload is not in the report: {expected:?}"
    );
    assert_ne!(
        expected["legacy/terms.txt"],
        sha256_hex(&legacy[2].1),
        "the overwrite is not in the report"
    );

    // Through the mount: exactly what Django left, byte for byte, and nothing else.
    assert_eq!(
        file_hashes(&w.src),
        expected,
        "the mount's files differ from what Django stored"
    );
    for rel in &deleted {
        assert!(
            !w.src.join(rel).exists(),
            "{rel} is still visible on the mount"
        );
    }

    let log = daemon.stop();
    // WARN lines are allowed: the sweeper copying a file Django is still writing gives up that
    // copy and retries, as designed. An ERROR is something the mount could not do.
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        errors.is_empty(),
        "the daemon logged problems while Django ran:\n{}",
        errors.join("\n")
    );

    // Unmounted: the data landed in the plain local directory.
    assert_eq!(
        file_hashes(&w.src),
        expected,
        "the local tree differs from what Django stored through the mount"
    );

    // A sweep with the same manifest brings the dest level with the local tree, every file
    // verified, and the deleted one gone from both.
    let sweep = w.sweep(&[]);
    sweep.assert_code(0);
    let status = w.status();
    assert_eq!(
        state_count(&status, "files", "verified"),
        expected.len() as u64,
        "every file Django left must be verified\n{status:#}\n{sweep}"
    );
    for state in [
        "pending", "copying", "copied", "failed", "missing", "conflict",
    ] {
        assert_eq!(
            state_count(&status, "files", state),
            0,
            "files.{state} after the sweep\n{status:#}\n{sweep}"
        );
    }
    for (rel, sha) in &expected {
        let at_dest = fs::read(w.dest.join(rel))
            .unwrap_or_else(|e| panic!("{rel} at the dest: {e}\n{status:#}"));
        let local = fs::read(w.src.join(rel)).unwrap();
        assert!(
            at_dest == local,
            "{rel}: the dest holds {} bytes, the local copy {}",
            at_dest.len(),
            local.len()
        );
        assert_eq!(&sha256_hex(&at_dest), sha, "{rel} at the dest");
    }
    // Mode and mtime too: Django's chmod to FILE_UPLOAD_PERMISSIONS and file_move_safe's
    // copystat come after the data, through setattr on the mount, and must reach the dest.
    let local_meta = files_of(&snapshot(&w.src));
    let dest_meta = files_of(&snapshot(&w.dest));
    for rel in expected.keys() {
        let rel = Path::new(rel);
        assert_eq!(
            dest_meta.get(rel),
            local_meta.get(rel),
            "{}: the dest's copy differs from the local file",
            rel.display()
        );
    }
    for rel in &deleted {
        assert!(
            !w.dest.join(rel).exists(),
            "deleted {rel} is still at the dest"
        );
        assert!(!w.src.join(rel).exists(), "deleted {rel} is still local");
    }
    // Nothing else at the dest: a file Django deleted, even one deleted while the sweeper was
    // copying it, must not stay behind there as an orphan.
    let extra: Vec<String> = file_hashes(&w.dest)
        .into_keys()
        .filter(|rel| !expected.contains_key(rel))
        .collect();
    assert!(
        extra.is_empty(),
        "the dest holds files Django did not leave: {extra:?}\n--- what the daemon logged about \
         them:\n{}\n--- the sweep:\n{sweep}",
        log.lines()
            .filter(|l| extra.iter().any(|rel| l.contains(rel.as_str())))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        leftover_temp_files(&w.dest).is_empty(),
        "temporary files at the dest: {:?}",
        leftover_temp_files(&w.dest)
    );
}
