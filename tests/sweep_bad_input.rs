//! Bad input (DESIGN §4.8): exit 2, one clear line on stderr naming the problem, and nothing
//! created or changed — no dest directory, no manifest, an existing manifest byte-identical.

mod common;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Asserts the shape of a refusal and returns the error line.
fn refused(run: &Run, names: &[&str]) -> String {
    assert_eq!(run.code, Some(2), "bad input must exit 2\n{run}");
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "stderr must be one line\n{run}");
    let line = lines[0];
    assert!(line.starts_with("cutoverfs: error: "), "{run}");
    for name in names {
        assert!(
            line.contains(name),
            "the error does not name {name:?}\n{run}"
        );
    }
    assert!(
        !run.stdout.contains("MIGRATION"),
        "a refused run printed a summary\n{run}"
    );
    line.to_string()
}

/// Nothing of the workspace was created by the refused run.
fn nothing_created(w: &Work) {
    assert!(!w.dest.exists(), "dest {} was created", w.dest.display());
    assert!(
        !w.manifest.exists(),
        "manifest {} was created",
        w.manifest.display()
    );
    assert!(
        !w.manifest.parent().unwrap().exists(),
        "manifest directory was created"
    );
}

fn sweep_with(source: &Path, dest: &str, manifest: &str, extra: &[&str]) -> Run {
    let mut args: Vec<OsString> = vec![
        "sweep".into(),
        "--source".into(),
        source.into(),
        "--dest".into(),
        dest.into(),
        "--manifest".into(),
        manifest.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args.push("--no-progress".into());
    run(args)
}

fn workspace_with_files() -> Work {
    let w = Work::new();
    w.write("a/one.txt", b"one");
    w.write("b/two.txt", b"two");
    w
}

#[test]
fn missing_source_is_refused() {
    let w = workspace_with_files();
    let missing = w.root.join("no-such-dir");
    for dry in [false, true] {
        let extra: &[&str] = if dry { &["--dry-run"] } else { &[] };
        let run = sweep_with(&missing, &w.dest_url(), &w.manifest_url(), extra);
        refused(&run, &[missing.to_str().unwrap(), "does not exist"]);
        nothing_created(&w);
    }
}

#[test]
fn source_that_is_a_file_is_refused() {
    let w = workspace_with_files();
    let file = w.src.join("a/one.txt");
    let run = sweep_with(&file, &w.dest_url(), &w.manifest_url(), &[]);
    refused(&run, &["one.txt", "not a directory"]);
    nothing_created(&w);
}

#[test]
fn dest_inside_or_equal_to_the_source_is_refused() {
    let w = workspace_with_files();
    let before = snapshot(&w.src);
    for (dest, says) in [
        (w.src.join("private"), "inside the source"),
        (w.src.join("a/deeper/still"), "inside the source"),
        (w.src.clone(), "source"),
    ] {
        let run = sweep_with(&w.src, &file_url(&dest), &w.manifest_url(), &[]);
        refused(&run, &[says]);
        assert_eq!(
            snapshot(&w.src),
            before,
            "the source changed after refusing dest {}",
            dest.display()
        );
        nothing_created(&w);
    }
}

#[test]
fn source_inside_the_dest_is_refused() {
    let w = Work::new();
    let outer = w.root.join("outer");
    let src = outer.join("media");
    write_file(&src.join("x.txt"), b"x");
    let run = sweep_with(&src, &file_url(&outer), &w.manifest_url(), &[]);
    refused(&run, &["inside the dest"]);
    assert!(!w.manifest.exists());
    assert_eq!(
        fs::read_dir(&outer).unwrap().count(),
        1,
        "something was created in the dest"
    );
}

#[test]
fn manifest_inside_the_source_is_refused() {
    let w = workspace_with_files();
    let inside = w.src.join("manifest.db");
    let run = sweep_with(
        &w.src,
        &w.dest_url(),
        &format!("sqlite://{}", inside.display()),
        &[],
    );
    refused(&run, &["manifest", "inside the source"]);
    assert!(
        !inside.exists(),
        "the manifest was created inside the source"
    );
    assert!(!w.dest.exists());
}

#[test]
fn malformed_dest_urls_are_refused_with_the_reason() {
    let w = workspace_with_files();
    let cases = [
        ("/no/scheme".to_string(), "file:///"),
        ("ftp://x/y".to_string(), "ftp"),
        ("file://host/x".to_string(), "host"),
        (format!("file://{}/../escape", w.root.display()), ".."),
        (format!("file://{}?opt=1", w.dest.display()), "query"),
        (
            "s3://Bad_Bucket/prefix".to_string(),
            "not a valid bucket name",
        ),
        (
            "s3://bucket/prefix?colour=red".to_string(),
            "unknown option",
        ),
        ("".to_string(), "dest"),
    ];
    for (url, says) in cases {
        for dry in [false, true] {
            let extra: &[&str] = if dry { &["--dry-run"] } else { &[] };
            let run = sweep_with(&w.src, &url, &w.manifest_url(), extra);
            let line = refused(&run, &[says]);
            if !url.is_empty() {
                assert!(
                    line.contains(&url),
                    "the error does not quote the URL {url:?}\n{run}"
                );
            }
            nothing_created(&w);
            assert!(!w.root.join("escape").exists());
        }
    }
}

#[test]
fn malformed_manifest_urls_are_refused() {
    let w = workspace_with_files();
    for (url, says) in [
        ("sqlite://relative/manifest.db", "absolute"),
        // A PostgreSQL manifest that cannot be reached: the error names it, nothing is created.
        (
            "postgres://db.example.invalid/cutover",
            "db.example.invalid",
        ),
        ("mysql://x/y", "sqlite"),
        ("relative.db", "sqlite"),
    ] {
        let run = sweep_with(&w.src, &w.dest_url(), url, &[]);
        refused(&run, &[says]);
        nothing_created(&w);
        assert!(!Path::new("relative.db").exists());
    }
}

#[test]
fn dest_that_is_a_regular_file_is_refused() {
    let w = workspace_with_files();
    let file = write_file(&w.root.join("a-file"), b"not a dir");
    let run = sweep_with(&w.src, &file_url(&file), &w.manifest_url(), &[]);
    refused(&run, &["a-file"]);
    assert_eq!(fs::read(&file).unwrap(), b"not a dir");
    assert!(!w.manifest.exists());
}

#[test]
fn manifest_of_another_pair_is_refused_and_left_unchanged() {
    let w = workspace_with_files();
    w.sweep(&[]).assert_code(0);
    let db_before = fs::read(&w.manifest).unwrap();
    let dest_before = dir_contents(&w.dest);

    // Same source, another dest.
    let other_dest = w.root.join("dest-c");
    let run = sweep_with(&w.src, &file_url(&other_dest), &w.manifest_url(), &[]);
    let line = refused(&run, &[]);
    for name in [
        w.src.to_str().unwrap(),
        &w.dest_url(),
        &file_url(&other_dest),
    ] {
        assert!(
            line.contains(name),
            "the error does not name {name:?}: {line}"
        );
    }
    assert!(!other_dest.exists(), "the other dest was created");
    assert_eq!(
        fs::read(&w.manifest).unwrap(),
        db_before,
        "the manifest changed"
    );
    assert_eq!(dir_contents(&w.dest), dest_before);

    // Another source, same dest; and both other.
    let other_src = w.root.join("src-b");
    write_file(&other_src.join("z.txt"), b"z");
    for (src, dest) in [
        (&other_src, w.dest_url()),
        (&other_src, file_url(&other_dest)),
    ] {
        let run = sweep_with(src, &dest, &w.manifest_url(), &[]);
        let line = refused(&run, &[]);
        assert!(
            line.contains(other_src.to_str().unwrap()) && line.contains(w.src.to_str().unwrap()),
            "{line}"
        );
        assert_eq!(
            fs::read(&w.manifest).unwrap(),
            db_before,
            "the manifest changed"
        );
        assert!(!other_dest.exists());
        assert!(!w.dest.join("z.txt").exists());
    }

    // Read-only commands refuse the other pair too.
    for cmd in ["plan", "status"] {
        let mut args: Vec<OsString> = vec![cmd.into()];
        args.extend([
            "--source".into(),
            w.src.clone().into(),
            "--dest".into(),
            file_url(&other_dest).into(),
        ]);
        args.extend(["--manifest".into(), w.manifest_url().into()]);
        let run = common::run(args);
        refused(&run, &[&file_url(&other_dest)]);
    }
    // The dry run too.
    let run = sweep_with(
        &w.src,
        &file_url(&other_dest),
        &w.manifest_url(),
        &["--dry-run"],
    );
    refused(&run, &[&file_url(&other_dest)]);
    assert_eq!(
        fs::read(&w.manifest).unwrap(),
        db_before,
        "the manifest changed"
    );
}

/// A read-only tmpfs mounted for one test and unmounted when dropped.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    fn new(dir: &Path) -> ReadOnlyMount {
        fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot mount a read-only tmpfs at {} (needs root)",
            dir.display()
        );
        ReadOnlyMount(dir.to_path_buf())
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn unwritable_dest_is_refused_before_anything_is_written() {
    let w = workspace_with_files();
    let ro = w.root.join("ro");
    let _mount = ReadOnlyMount::new(&ro);
    let dest = ro.join("sub");
    for dry in [false, true] {
        let extra: &[&str] = if dry { &["--dry-run"] } else { &[] };
        let run = sweep_with(&w.src, &file_url(&dest), &w.manifest_url(), extra);
        refused(&run, &[ro.to_str().unwrap()]);
        assert!(
            !w.manifest.exists(),
            "manifest created for an unusable dest\n{run}"
        );
        assert!(!w.manifest.parent().unwrap().exists());
        assert!(!dest.exists());
    }
    // With an existing manifest: unchanged.
    let ok = w.sweep(&[]);
    ok.assert_code(0);
    let db = fs::read(&w.manifest).unwrap();
    let run = sweep_with(&w.src, &file_url(&dest), &w.manifest_url(), &[]);
    assert_eq!(run.code, Some(2), "{run}");
    assert_eq!(fs::read(&w.manifest).unwrap(), db);
}

#[test]
fn bad_glob_is_refused() {
    let w = workspace_with_files();
    for flag in ["--include", "--exclude"] {
        for dry in [false, true] {
            let mut extra = vec![flag, "a/["];
            if dry {
                extra.push("--dry-run");
            }
            let run = sweep_with(&w.src, &w.dest_url(), &w.manifest_url(), &extra);
            refused(&run, &["a/["]);
            nothing_created(&w);
        }
    }
    // plan too.
    let run = w.cmd("plan", &["--include", "a/["]);
    refused(&run, &["a/["]);
    nothing_created(&w);
}

#[test]
fn report_commands_without_a_manifest_say_how_to_create_one() {
    let w = workspace_with_files();
    for cmd in [&["status"][..], &["batches"], &["batch", "1"], &["plan"]] {
        let mut args: Vec<OsString> = cmd.iter().map(OsString::from).collect();
        args.extend(["--manifest".into(), w.manifest_url().into()]);
        let run = run(args);
        refused(&run, &[]);
        nothing_created(&w);
    }
}

#[test]
fn out_of_range_numbers_are_refused_by_the_parser() {
    let w = workspace_with_files();
    for extra in [
        &["--concurrency", "0"][..],
        &["--batch-size", "0"],
        &["--retry-delay", "soon"],
        &["--max-retries=-1"],
    ] {
        let run = sweep_with(&w.src, &w.dest_url(), &w.manifest_url(), extra);
        assert_eq!(run.code, Some(2), "{extra:?}\n{run}");
        let flag = extra[0].split('=').next().unwrap();
        assert!(run.stderr.contains(flag), "the error names {flag}\n{run}");
        nothing_created(&w);
    }
}

#[test]
fn a_postgresql_manifest_that_cannot_be_reached_says_why() {
    let pg = common::pg::PgCluster::shared();
    let good = pg.create_database();
    let w = Work::new();
    w.write("a.txt", b"alpha");
    let wrong_password = good.replace(common::pg::PASSWORD, "not-the-password");
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("postgres://postgres:x@127.0.0.1:{port}/db")
    };
    for (url, cause) in [
        (&wrong_password, "password authentication failed"),
        (&closed_port, "refused"),
    ] {
        let run = run(["sweep", "--source"]
            .into_iter()
            .map(OsString::from)
            .chain([
                w.src.clone().into_os_string(),
                "--dest".into(),
                w.dest_url().into(),
                "--manifest".into(),
                url.into(),
            ]));
        assert_ne!(run.code, Some(0), "{run}");
        assert!(
            run.stderr.to_lowercase().contains(cause),
            "the cause ({cause}) is not named\n{run}"
        );
        assert!(!run.stderr.contains("not-the-password"), "{run}");
        assert!(!w.dest.exists());
    }
}
