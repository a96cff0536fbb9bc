//! `cutoverfs sweep` on small trees: copies, re-runs, incremental re-scans, unsupported entries,
//! conflicts, filters and dry runs.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, SystemTime};

use common::*;

#[test]
fn help_lists_the_available_commands_only() {
    let run = run(["--help"]);
    run.assert_code(0);
    let commands: Vec<String> = run
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for wanted in [
        "sweep", "plan", "status", "batches", "batch", "mount", "purge", "rollback", "verify",
        "log", "demo",
    ] {
        assert!(
            commands.iter().any(|c| c == wanted),
            "{wanted} not in the command list {commands:?}\n{run}"
        );
    }
    // A command that does not exist is refused, not silently accepted.
    let refused = common::run(["restore", "--help"]);
    assert_ne!(refused.code, Some(0), "`restore` is accepted\n{refused}");
}

both_engines! {
    fn first_sweep_copies_everything_with_attributes_and_second_copies_nothing() {
        let w = Work::new();
        let now = SystemTime::now();
        let files: Vec<(&str, Vec<u8>, u32)> = vec![
            ("top.txt", b"hello world\n".to_vec(), 0o644),
            ("empty.dat", Vec::new(), 0o600),
            (
                "documents/2025/01/19/invoice.pdf",
                pseudo_random(70_000, 1),
                0o640,
            ),
            (
                "documents/2025/01/20/scan.tiff",
                pseudo_random(3 << 20, 2),
                0o755,
            ),
            (
                "missions/expenses/R1/M2/receipt.jpg",
                pseudo_random(48 * 1024, 3),
                0o444,
            ),
            (
                "missions/name with spaces & ünïcödé.txt",
                b"x".to_vec(),
                0o604,
            ),
        ];
        for (i, (rel, content, mode)) in files.iter().enumerate() {
            let path = w.write(rel, content);
            set_mode(&path, *mode);
            std::os::unix::fs::chown(&path, Some(1000 + i as u32), Some(2000 + i as u32)).unwrap();
            let mtime = now - Duration::from_secs(86_400 * 30 + i as u64 * 7)
                + Duration::from_nanos(123_456_789);
            let atime = now - Duration::from_secs(3600 + i as u64);
            set_times(&path, atime, mtime);
        }
        set_mode(&w.src.join("documents/2025"), 0o750);
        fs::create_dir_all(w.src.join("empty/dir")).unwrap();
        let src_before = snapshot(&w.src);
        // Access times as the sweep will find them (the read above may have moved them: relatime
        // updates an atime older than the ctime, which set_times just moved).
        let atimes: Vec<(i64, i64)> = files
            .iter()
            .map(|(rel, _, _)| {
                fs::metadata(w.src.join(rel))
                    .map(|m| (m.atime(), m.atime_nsec()))
                    .unwrap()
            })
            .collect();

        let first = w.sweep(&[]);
        first.assert_code(0);
        assert!(first.stdout.contains("MIGRATION COMPLETE"), "{first}");
        assert_eq!(first.count("Total files processed"), 6, "{first}");
        assert_eq!(first.count("Successfully copied"), 6, "{first}");
        assert_eq!(first.count("Already exist"), 0, "{first}");
        assert_eq!(first.count("Conflicts"), 0, "{first}");
        assert_eq!(first.count("Failed"), 0, "{first}");
        assert_eq!(first.count("Errors"), 0, "{first}");

        // Access times, checked before anything reads the dest files.
        for ((rel, _, _), atime) in files.iter().zip(&atimes) {
            let d = fs::metadata(w.dest.join(rel)).unwrap();
            assert_eq!(*atime, (d.atime(), d.atime_nsec()), "atime of {rel}");
        }
        assert_trees_equal(&w.src, &w.dest);
        assert!(
            w.dest.join("empty/dir").is_dir(),
            "empty directories are recorded and created at the dest"
        );
        assert_eq!(snapshot(&w.src), src_before, "the sweep changed the source");
        assert!(leftover_temp_files(&w.dest).is_empty());

        if w.engine() == common::Engine::Sqlite {
            let meta = fs::metadata(&w.manifest).expect("manifest file exists");
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o600,
                "manifest file mode"
            );
        }

        let status = w.status();
        assert_file_states(&status, &[("verified", 6)]);
        let total: u64 = files.iter().map(|(_, c, _)| c.len() as u64).sum();
        assert_eq!(state_count(&status, "bytes", "verified"), total);

        let second = w.sweep(&[]);
        second.assert_code(0);
        assert_eq!(second.count("Successfully copied"), 0, "{second}");
        assert_eq!(second.count("Already exist"), 6, "{second}");
        assert_eq!(second.count("Total files processed"), 6, "{second}");
        assert!(second.stdout.contains("MIGRATION COMPLETE"), "{second}");
        assert_trees_equal(&w.src, &w.dest);
    }
}

both_engines! {
    fn logs_go_to_stderr_and_cutoverfs_log_raises_verbosity() {
        let w = Work::new();
        w.write("a/one.txt", b"one");
        let run = run_command(
            command()
                .env("CUTOVERFS_LOG", "debug")
                .args(["sweep", "--no-progress"])
                .args(w.target()),
        );
        run.assert_code(0);
        assert!(
            run.stderr.contains("DEBUG"),
            "CUTOVERFS_LOG=debug shows debug lines\n{run}"
        );
        assert!(
            !run.stdout.contains("DEBUG") && !run.stdout.contains("INFO"),
            "log lines on stdout\n{run}"
        );

        let w2 = Work::new();
        w2.write("a/one.txt", b"one");
        let quiet = w2.sweep(&[]);
        quiet.assert_code(0);
        assert!(
            !quiet.stderr.contains("DEBUG"),
            "debug lines at the default level\n{quiet}"
        );
    }
}

both_engines! {
    fn incremental_rescan_recopies_changed_copies_new_and_reports_deleted() {
        let w = Work::new();
        w.write("docs/changed.txt", b"version one");
        w.write("docs/deleted.txt", b"soon gone");
        w.write("docs/same.txt", b"never touched");
        w.sweep(&[]).assert_code(0);
        assert_eq!(
            fs::read(w.dest.join("docs/changed.txt")).unwrap(),
            b"version one"
        );

        // Modified (another size, later mtime), deleted, added.
        let changed = w.write("docs/changed.txt", b"version two, longer than the first");
        set_times(
            &changed,
            SystemTime::now(),
            SystemTime::now() + Duration::from_secs(5),
        );
        fs::remove_file(w.src.join("docs/deleted.txt")).unwrap();
        w.write("docs/new.txt", b"brand new");

        let run = w.sweep(&[]);
        run.assert_code(1);
        assert!(run.stdout.contains("MIGRATION INCOMPLETE"), "{run}");
        assert_eq!(
            run.count("Successfully copied"),
            2,
            "changed and new are copied\n{run}"
        );
        assert_eq!(run.count("Missing"), 1, "{run}");
        assert_eq!(run.count("Skipped (missing)"), 0, "{run}");
        assert!(
            run.stdout.contains("docs/deleted.txt"),
            "the missing file is named\n{run}"
        );
        assert_eq!(
            fs::read(w.dest.join("docs/changed.txt")).unwrap(),
            b"version two, longer than the first"
        );
        assert_eq!(fs::read(w.dest.join("docs/new.txt")).unwrap(), b"brand new");
        assert_eq!(
            fs::read(w.dest.join("docs/same.txt")).unwrap(),
            b"never touched"
        );
        // The dest copy of a deleted source file is kept (nothing is lost).
        assert_eq!(
            fs::read(w.dest.join("docs/deleted.txt")).unwrap(),
            b"soon gone"
        );
        let (s, d) = (
            fs::metadata(&changed).unwrap(),
            fs::metadata(w.dest.join("docs/changed.txt")).unwrap(),
        );
        assert_eq!(
            (s.mtime(), s.mtime_nsec()),
            (d.mtime(), d.mtime_nsec()),
            "mtime of the re-copied file"
        );
        assert!(
            leftover_temp_files(&w.dest).is_empty(),
            "{:?}",
            leftover_temp_files(&w.dest)
        );

        let status = w.status();
        assert_file_states(&status, &[("verified", 3), ("missing", 1)]);
        let p = problem(&status, "docs/deleted.txt").expect("the missing file is a problem");
        assert_eq!(p["state"], "missing");

        let skip = w.sweep(&["--skip-missing"]);
        skip.assert_code(0);
        assert!(skip.stdout.contains("MIGRATION COMPLETE"), "{skip}");
        assert_eq!(
            skip.field("Skipped (missing)").as_deref(),
            Some("1"),
            "{skip}"
        );
        assert_eq!(skip.count("Successfully copied"), 0, "{skip}");
        assert_eq!(skip.count("Errors"), 0, "{skip}");
        assert!(
            skip.field("Missing").is_none(),
            "no Missing line with --skip-missing\n{skip}"
        );
    }
}

both_engines! {
    fn a_file_that_comes_back_is_copied_again() {
        let w = Work::new();
        w.write("a/x.txt", b"x1");
        w.write("a/y.txt", b"y");
        w.sweep(&[]).assert_code(0);
        fs::remove_file(w.src.join("a/x.txt")).unwrap();
        w.sweep(&[]).assert_code(1);
        // Back, with new content: the dest object is ours, so it is replaced.
        w.write("a/x.txt", b"x2 is back");
        let run = w.sweep(&[]);
        run.assert_code(0);
        assert_eq!(fs::read(w.dest.join("a/x.txt")).unwrap(), b"x2 is back");
        assert_file_states(&w.status(), &[("verified", 2)]);
    }
}

both_engines! {
    fn symlinks_fifos_and_non_utf8_names_are_unsupported_with_reasons() {
        let w = Work::new();
        w.write("ok/regular.txt", b"fine");
        std::os::unix::fs::symlink("regular.txt", w.src.join("ok/link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", w.src.join("ok/outside-link")).unwrap();
        mkfifo(&w.src.join("ok/pipe"));
        let bad_name = OsStr::from_bytes(b"bad-\xff\xfe-name.txt");
        write_file(&w.src.join("ok").join(bad_name), b"latin-1 name");

        let run = w.sweep(&[]);
        run.assert_code(0);
        assert!(run.stdout.contains("MIGRATION COMPLETE"), "{run}");
        assert_eq!(run.count("Skipped (unsupported)"), 4, "{run}");
        assert_eq!(run.count("Successfully copied"), 1, "{run}");

        let status = w.status();
        assert_file_states(&status, &[("verified", 1), ("unsupported", 4)]);
        let reason = |path: &str| -> String {
            let p =
                problem(&status, path).unwrap_or_else(|| panic!("{path} not in problems: {status:#}"));
            assert_eq!(p["state"], "unsupported", "{p}");
            p["reason"].as_str().unwrap_or_default().to_lowercase()
        };
        assert!(reason("ok/link").contains("symbolic link"), "{status:#}");
        assert!(
            reason("ok/outside-link").contains("symbolic link"),
            "{status:#}"
        );
        assert!(reason("ok/pipe").contains("fifo"), "{status:#}");
        let bad = status["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["path"].as_str().is_some_and(|s| s.starts_with("ok/bad-")))
            .unwrap_or_else(|| panic!("the non-UTF-8 name is not in problems: {status:#}"));
        assert!(bad["reason"].as_str().unwrap().contains("UTF-8"), "{bad}");
        assert!(
            bad["reason"].as_str().unwrap().contains("\\xff"),
            "the bad bytes are shown escaped: {bad}"
        );

        let at_dest: Vec<_> = fs::read_dir(w.dest.join("ok"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            at_dest,
            vec![std::ffi::OsString::from("regular.txt")],
            "only the regular file is at the dest"
        );

        // A second run records nothing new and still succeeds.
        let again = w.sweep(&[]);
        again.assert_code(0);
        assert_eq!(again.count("Skipped (unsupported)"), 4, "{again}");
    }
}

both_engines! {
    fn a_directory_with_a_non_utf8_name_is_reported_and_not_copied() {
        let w = Work::new();
        w.write("fine/a.txt", b"a");
        let bad_dir = w.src.join(OsStr::from_bytes(b"caf\xe9"));
        write_file(&bad_dir.join("inside.txt"), b"inside");
        let run = w.sweep(&[]);
        run.assert_code(0);
        assert!(!w.dest.join(OsStr::from_bytes(b"caf\xe9")).exists());
        assert_eq!(fs::read(w.dest.join("fine/a.txt")).unwrap(), b"a");
        let status = w.status();
        let bad = status["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["path"].as_str().is_some_and(|s| s.starts_with("caf")))
            .unwrap_or_else(|| panic!("the non-UTF-8 directory is not in problems: {status:#}"));
        assert_eq!(bad["state"], "unsupported");
        // The summary must not hide it: a whole directory (and every file in it) was skipped.
        assert!(
            run.count("Skipped (unsupported)") >= 1,
            "the skipped directory is not counted\n{run}"
        );
    }
}

both_engines! {
    fn identical_dest_file_counts_as_already_there() {
        let w = Work::new();
        w.write("a/same.txt", b"identical bytes");
        w.write("a/other.txt", b"to copy");
        write_file(&w.dest.join("a/same.txt"), b"identical bytes");
        let run = w.sweep(&[]);
        run.assert_code(0);
        assert_eq!(run.count("Already exist"), 1, "{run}");
        assert_eq!(run.count("Successfully copied"), 1, "{run}");
        assert_file_states(&w.status(), &[("verified", 2)]);
    }
}

both_engines! {
    fn different_dest_file_is_a_conflict_and_never_overwritten() {
        let w = Work::new();
        w.write("a/clash.txt", b"the source version");
        w.write("a/fine.txt", b"fine");
        let theirs = write_file(&w.dest.join("a/clash.txt"), b"someone else's file");
        set_mode(&theirs, 0o640);
        let before = fs::metadata(&theirs).unwrap();

        let run = w.sweep(&[]);
        run.assert_code(1);
        assert!(run.stdout.contains("MIGRATION INCOMPLETE"), "{run}");
        assert_eq!(run.count("Conflicts"), 1, "{run}");
        assert_eq!(run.count("Errors"), 1, "{run}");
        assert_eq!(
            fs::read(&theirs).unwrap(),
            b"someone else's file",
            "a foreign dest file was changed"
        );
        let after = fs::metadata(&theirs).unwrap();
        assert_eq!(
            (before.ino(), before.mode(), before.mtime_nsec()),
            (after.ino(), after.mode(), after.mtime_nsec())
        );

        let status = w.status();
        assert_file_states(&status, &[("verified", 1), ("conflict", 1)]);
        let p = problem(&status, "a/clash.txt").expect("the conflict is a problem");
        assert_eq!(p["state"], "conflict");
        assert!(
            p["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "conflict without a reason: {p}"
        );

        // Still refused on the next run.
        let again = w.sweep(&[]);
        again.assert_code(1);
        assert_eq!(fs::read(&theirs).unwrap(), b"someone else's file");
        assert!(leftover_temp_files(&w.dest).is_empty());
    }
}

both_engines! {
    fn a_directory_at_the_key_is_a_conflict() {
        let w = Work::new();
        w.write("a/thing", b"a file in the source");
        fs::create_dir_all(w.dest.join("a/thing/child")).unwrap();
        let run = w.sweep(&[]);
        run.assert_code(1);
        assert!(w.dest.join("a/thing/child").is_dir());
        let status = w.status();
        assert_eq!(state_count(&status, "files", "conflict"), 1, "{status:#}");
    }
}

both_engines! {
    fn include_and_exclude_limit_what_is_copied() {
        let w = Work::new();
        w.write("documents/a.pdf", b"a");
        w.write("documents/tmp/b.pdf", b"b");
        w.write("documents/c.txt", b"c");
        w.write("contracts/x/d.pdf", b"d");
        w.write("missions/e.jpg", b"e");
        w.write("f.pdf", b"f");

        let run = w.sweep(&["--include", "*.pdf", "--exclude", "**/tmp/**"]);
        run.assert_code(0);
        assert_eq!(run.count("Successfully copied"), 3, "{run}");
        assert_eq!(run.count("Total files processed"), 3, "{run}");
        let copied: Vec<_> = files_of(&snapshot(&w.dest))
            .into_keys()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            copied,
            vec!["contracts/x/d.pdf", "documents/a.pdf", "f.pdf"]
        );
        // Out-of-scope files are recorded, not copied.
        let status = w.status();
        assert_file_states(&status, &[("verified", 3), ("pending", 3)]);

        let docs = w.sweep(&["--include", "documents/**"]);
        docs.assert_code(0);
        assert_eq!(docs.count("Successfully copied"), 2, "{docs}");
        assert!(w.dest.join("documents/tmp/b.pdf").exists());
        assert!(w.dest.join("documents/c.txt").exists());
        assert!(
            !w.dest.join("missions").exists(),
            "missions/ is out of scope"
        );
        assert_file_states(&w.status(), &[("verified", 5), ("pending", 1)]);
    }
}

#[test]
fn dry_run_without_manifest_creates_nothing() {
    let w = Work::new();
    w.write("a/one.txt", b"1");
    w.write("a/two.txt", b"22");
    w.write("b/three.txt", b"333");
    std::os::unix::fs::symlink("one.txt", w.src.join("a/link")).unwrap();
    let run = w.sweep(&["--dry-run"]);
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("DRY RUN COMPLETE - No files were actually modified"),
        "{run}"
    );
    assert_eq!(run.count("Total files processed"), 4, "{run}");
    assert_eq!(run.count("Successfully copied"), 3, "{run}");
    assert_eq!(run.count("Already exist"), 0, "{run}");
    assert_eq!(run.count("Skipped (unsupported)"), 1, "{run}");
    assert!(!w.manifest.exists(), "a dry run created the manifest");
    assert!(
        !w.manifest.parent().unwrap().exists(),
        "a dry run created the manifest directory"
    );
    assert!(!w.dest.exists(), "a dry run created the dest");
}

both_engines! {
    fn dry_run_sees_identical_and_conflicting_dest_files_without_touching_them() {
        let w = Work::new();
        w.write("a/same.txt", b"same");
        w.write("a/clash.txt", b"mine");
        w.write("a/new.txt", b"new");
        write_file(&w.dest.join("a/same.txt"), b"same");
        write_file(&w.dest.join("a/clash.txt"), b"theirs, longer");
        let before = dir_contents(&w.dest);
        let run = w.sweep(&["--dry-run"]);
        run.assert_code(0);
        assert_eq!(run.count("Successfully copied"), 1, "{run}");
        assert_eq!(run.count("Already exist"), 1, "{run}");
        assert_eq!(run.count("Conflicts"), 1, "{run}");
        assert_eq!(dir_contents(&w.dest), before);
        assert!(!w.manifest.exists());
    }
}

#[test]
fn dry_run_on_an_existing_manifest_changes_nothing() {
    let w = Work::new();
    w.write("a/one.txt", b"1");
    w.write("a/two.txt", b"22");
    w.sweep(&[]).assert_code(0);
    // Then the source moves on.
    w.write("a/three.txt", b"333");
    w.write("a/one.txt", b"one, changed");
    fs::remove_file(w.src.join("a/two.txt")).unwrap();
    let db_before = fs::read(&w.manifest).unwrap();
    let dest_before = dir_contents(&w.dest);

    let run = w.sweep(&["--dry-run"]);
    run.assert_code(0);
    assert!(run.stdout.contains("DRY RUN COMPLETE"), "{run}");
    assert_eq!(run.count("Total files processed"), 3, "{run}");
    assert_eq!(run.count("Missing"), 1, "{run}");
    assert_eq!(
        fs::read(&w.manifest).unwrap(),
        db_before,
        "a dry run changed the manifest file"
    );
    assert_eq!(
        dir_contents(&w.dest),
        dest_before,
        "a dry run changed the dest"
    );
    // The manifest still says what the real run left.
    assert_file_states(&w.status(), &[("verified", 2)]);
}

both_engines! {
    /// A file cutoverfs copied earlier and that changed since is re-copied by the sweep (the dest
    /// object is its own); the dry run must say so, not announce a conflict.
    fn dry_run_counts_a_changed_file_copied_earlier_as_a_copy_not_a_conflict() {
        let w = Work::new();
        w.write("a/one.txt", b"1");
        w.write("a/two.txt", b"22");
        w.sweep(&[]).assert_code(0);
        w.write("a/one.txt", b"one, changed");

        let dry = w.sweep(&["--dry-run"]);
        dry.assert_code(0);
        let real = w.sweep(&[]);
        real.assert_code(0);
        assert_eq!(real.count("Successfully copied"), 1, "{real}");
        assert_eq!(real.count("Conflicts"), 0, "{real}");
        assert_eq!(
            dry.count("Conflicts"),
            real.count("Conflicts"),
            "the dry run disagrees with the sweep\n{dry}"
        );
        assert_eq!(
            dry.count("Successfully copied"),
            1,
            "the dry run disagrees with the sweep\n{dry}"
        );
    }
}

/// A dry run "writes nothing (not even the manifest)": no files may appear next to it either.
#[test]
fn dry_run_on_an_existing_manifest_leaves_no_new_files_beside_it() {
    let w = Work::new();
    w.write("a/one.txt", b"1");
    w.sweep(&[]).assert_code(0);
    let state_dir = w.manifest.parent().unwrap();
    let before: Vec<_> = dir_contents(state_dir).into_keys().collect();
    w.sweep(&["--dry-run"]).assert_code(0);
    let after: Vec<_> = dir_contents(state_dir).into_keys().collect();
    assert_eq!(
        after, before,
        "a dry run created files next to the manifest"
    );
}

/// The manifest at the schema of the cutoverfs before the last migration (purge's column).
fn downgrade_to_the_previous_schema(db: &std::path::Path) {
    sqlite_exec(
        db,
        "DROP INDEX entries_purge_aside; \
         ALTER TABLE entries DROP COLUMN purge_aside; \
         ALTER TABLE entries DROP COLUMN leftover_until; \
         DELETE FROM _sqlx_migrations WHERE version = 7;",
    );
}

#[test]
fn a_manifest_of_an_earlier_cutoverfs_is_upgraded_by_sweep_and_a_newer_one_is_refused() {
    let w = Work::new();
    w.write("a.txt", b"alpha");
    w.sweep(&[]).assert_code(0);
    downgrade_to_the_previous_schema(&w.manifest);
    w.write("b.txt", b"beta");

    // Read-only commands change nothing and name the commands that upgrade.
    let status = w.cmd_manifest_only("status", &[]);
    assert_ne!(status.code, Some(0), "{status}");
    assert!(status.stderr.contains("older schema"), "{status}");
    assert!(status.stderr.contains("cutoverfs sweep"), "{status}");

    // A sweep upgrades it and goes on where the earlier one stopped.
    let run = w.sweep(&[]);
    run.assert_code(0);
    assert_eq!(run.count("Successfully copied"), 1, "{run}");
    assert!(run.elapsed < std::time::Duration::from_secs(8), "{run}");
    assert_file_states(&w.status(), &[("verified", 2)]);
    assert_eq!(fs::read(w.dest.join("b.txt")).unwrap(), b"beta");

    // A manifest a newer cutoverfs migrated is refused before anything is touched.
    sqlite_exec(
        &w.manifest,
        "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time) \
         VALUES (9999, 'from the future', CURRENT_TIMESTAMP, 1, x'00', 0)",
    );
    let before = fs::read(&w.manifest).unwrap();
    w.write("c.txt", b"gamma");
    for cmd in ["sweep", "status"] {
        let run = if cmd == "sweep" {
            w.sweep(&[])
        } else {
            w.cmd_manifest_only(cmd, &[])
        };
        assert_ne!(run.code, Some(0), "{cmd}: {run}");
        assert!(run.stderr.contains("newer cutoverfs"), "{cmd}: {run}");
    }
    assert_eq!(
        fs::read(&w.manifest).unwrap(),
        before,
        "the manifest changed"
    );
    assert!(!w.dest.join("c.txt").exists());
}
