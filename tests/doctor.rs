//! `cutoverfs doctor` (issue 8): every check on this machine as it is (all well), then each
//! failure made for real — a read-only dest, wrong S3 credentials, a manifest of a newer
//! schema, a damaged manifest, a nearly full source file system, no /dev/fuse — and each time
//! the line that names it, the exit code, and nothing created.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::s3::S3Server;
use common::*;

fn doctor(args: &[&str]) -> Run {
    let mut all = vec!["doctor"];
    all.extend_from_slice(args);
    run(all)
}

/// The JSON report: each check's status by name.
fn statuses(run: &Run) -> std::collections::BTreeMap<String, (String, String)> {
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("doctor --format json printed no JSON ({e}):\n{run}"));
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_string(),
                (
                    c["status"].as_str().unwrap().to_string(),
                    c["detail"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

fn status_of(run: &Run, check: &str) -> (String, String) {
    statuses(run)
        .remove(check)
        .unwrap_or_else(|| panic!("no {check} check:\n{run}"))
}

fn mount_tmpfs(dir: &Path, options: &str) {
    fs::create_dir_all(dir).unwrap();
    let done = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs-of-a-doctor-test"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(done.success(), "mount tmpfs on {}", dir.display());
}

/// Unmounts a tmpfs the test mounted, also when the test fails.
struct Tmpfs<'a>(&'a Path);

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

/// Probe mounts (`$TMPDIR/cutoverfs-doctor-PID`) whose doctor process has ended. Other tests'
/// doctors may be probing right now: their mounts are not leftovers.
fn probe_mounts_of_ended_processes() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter_map(|point| {
            let pid = point.rsplit_once("cutoverfs-doctor-")?.1;
            let ended = !Path::new("/proc").join(pid).exists();
            ended.then(|| point.to_string())
        })
        .collect()
}

#[test]
fn all_is_well_here_and_nothing_is_created() {
    let w = Work::new();
    // The source on a file system of its own, so that a nearly full /tmp on the
    // machine running the tests does not turn the free-space check into a warning.
    mount_tmpfs(&w.src, "size=64m");
    let _src = Tmpfs(&w.src);
    w.write("a.txt", b"alpha");
    let manifest = w.manifest_url();
    let dest = w.dest_url();
    let report = doctor(&[
        w.src.to_str().unwrap(),
        "--dest",
        &dest,
        "--manifest",
        &manifest,
        "--min-free",
        "1MiB",
    ]);
    report.assert_code(0);
    for check in [
        "fuse device",
        "privileges",
        "passthrough",
        "manifest",
        "dest",
        "free space",
    ] {
        let line = report
            .stdout
            .lines()
            .find(|l| l.contains(check))
            .unwrap_or_else(|| panic!("no {check} line:\n{report}"));
        assert!(line.starts_with("ok"), "{check}: {line}\n{report}");
    }
    assert!(report.stdout.contains("All is well"), "{report}");
    assert!(report.stdout.contains("none yet"), "{report}");
    assert!(!w.dest.exists(), "doctor created the dest");
    assert!(!w.manifest.exists(), "doctor created the manifest");
    assert!(
        !w.manifest.parent().unwrap().exists(),
        "doctor created the manifest's directory"
    );
    let left = probe_mounts_of_ended_processes();
    assert!(
        left.is_empty(),
        "the passthrough probe left mounts: {left:?}"
    );

    // With a manifest: its schema, integrity and pair; the source and dest come from it.
    w.sweep(&[]).assert_code(0);
    let before = fs::read(&w.manifest).unwrap();
    // Several rounds: SQLite removes its WAL files only when the last connection closes
    // alone, which a pool of connections closing together missed now and then.
    for _ in 0..ROUNDS_WITH_A_MANIFEST {
        doctor_leaves_the_manifest_as_it_was(&w, &before);
    }
}

const ROUNDS_WITH_A_MANIFEST: usize = 8;

fn doctor_leaves_the_manifest_as_it_was(w: &Work, before: &[u8]) {
    let manifest = w.manifest_url();
    let report = doctor(&[
        "--manifest",
        &manifest,
        "--format",
        "json",
        "--min-free",
        "1MiB",
    ]);
    report.assert_code(0);
    let (status, detail) = status_of(&report, "manifest");
    assert_eq!(status, "ok", "{report}");
    assert!(detail.contains("integrity ok"), "{detail}");
    let known = fs::read_dir("src/manifest/migrations/sqlite")
        .unwrap()
        .count();
    assert!(
        detail.contains(&format!("schema {known} of {known}")),
        "{detail}"
    );
    assert_eq!(status_of(&report, "dest").0, "ok", "{report}");
    assert_eq!(status_of(&report, "free space").0, "ok", "{report}");
    assert_eq!(
        fs::read(&w.manifest).unwrap(),
        before,
        "doctor changed the manifest"
    );
    let siblings: Vec<_> = fs::read_dir(w.manifest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        siblings.len(),
        1,
        "files left beside the manifest: {siblings:?}"
    );
}

#[test]
fn a_read_only_dest_and_a_nearly_full_source_are_problems_to_fix() {
    let w = Work::new();
    let ro = w.root.join("ro");
    mount_tmpfs(&ro, "size=4m,ro");
    let _ro = Tmpfs(&ro);
    let full = w.root.join("full");
    mount_tmpfs(&full, "size=2m");
    let _full = Tmpfs(&full);
    fs::write(full.join("big"), vec![7u8; 1900 * 1024]).unwrap();
    let dest = file_url(&ro.join("media"));
    let manifest = w.manifest_url();
    let report = doctor(&[
        full.to_str().unwrap(),
        "--dest",
        &dest,
        "--manifest",
        &manifest,
        "--format",
        "json",
    ]);
    report.assert_code(1);
    let (status, detail) = status_of(&report, "dest");
    assert_eq!(status, "fail", "{report}");
    assert!(detail.contains("not writable"), "{detail}");
    let (status, detail) = status_of(&report, "free space");
    assert_eq!(status, "fail", "{report}");
    assert!(detail.contains("nearly full"), "{detail}");
    let human = doctor(&[
        full.to_str().unwrap(),
        "--dest",
        &dest,
        "--manifest",
        &manifest,
    ]);
    human.assert_code(1);
    assert!(human.stdout.contains("fix: "), "{human}");
    assert!(human.stdout.contains("2 problem(s) to fix"), "{human}");
}

#[test]
fn a_manifest_of_a_newer_schema_or_a_damaged_one_fails() {
    let w = Work::new();
    w.write("a.txt", b"alpha");
    w.sweep(&[]).assert_code(0);
    let manifest = w.manifest_url();
    let sql = "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time) \
               VALUES (9999, 'from the future', CURRENT_TIMESTAMP, 1, x'00', 0)";
    sqlite_exec(&w.manifest, sql);
    let report = doctor(&["--manifest", &manifest, "--format", "json"]);
    report.assert_code(1);
    let (status, detail) = status_of(&report, "manifest");
    assert_eq!(status, "fail", "{report}");
    assert!(detail.contains("newer cutoverfs"), "{detail}");

    let damaged = w.root.join("damaged.db");
    fs::write(&damaged, vec![0x5au8; 64 * 1024]).unwrap();
    let before = fs::read(&damaged).unwrap();
    let report = doctor(&[
        "--manifest",
        &format!("sqlite://{}", damaged.display()),
        "--format",
        "json",
    ]);
    report.assert_code(1);
    let (status, detail) = status_of(&report, "manifest");
    assert_eq!(status, "fail", "{report}");
    assert!(detail.contains("damaged.db"), "{detail}");
    assert_eq!(
        fs::read(&damaged).unwrap(),
        before,
        "doctor changed the damaged file"
    );
}

#[test]
fn wrong_s3_credentials_fail_the_dest_check() {
    let s3 = S3Server::in_process();
    let w = Work::new();
    let dest = s3.dest_url("doctor");
    let manifest = w.manifest_url();
    let mut good = command();
    s3.apply_env(&mut good).args([
        "doctor",
        "--dest",
        &dest,
        "--manifest",
        &manifest,
        "--format",
        "json",
    ]);
    let good = run_command(&mut good);
    assert_eq!(status_of(&good, "dest").0, "ok", "{good}");
    let mut bad = command();
    s3.apply_env(&mut bad)
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789abcdef")
        .args([
            "doctor",
            "--dest",
            &dest,
            "--manifest",
            &manifest,
            "--format",
            "json",
        ]);
    let bad = run_command(&mut bad);
    bad.assert_code(1);
    let (status, detail) = status_of(&bad, "dest");
    assert_eq!(status, "fail", "{bad}");
    assert!(detail.contains("access denied"), "{detail}");
    assert!(
        !bad.stdout.contains("wrong-secret"),
        "the secret was printed"
    );
}

#[test]
fn no_fuse_device_fails_and_says_how_to_get_one() {
    let w = Work::new();
    // A mount namespace of its own where /dev is an empty tmpfs: no /dev/fuse.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} doctor {} --manifest sqlite://{} --format json",
        bin(),
        w.src.display(),
        w.root.join("m.db").display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let report = run_command(&mut cmd);
    report.assert_code(1);
    let (status, detail) = status_of(&report, "fuse device");
    assert_eq!(status, "fail", "{report}");
    assert!(detail.contains("/dev/fuse"), "{detail}");
    let (status, _) = status_of(&report, "passthrough");
    assert_eq!(status, "warning", "{report}");
    assert!(report.stdout.contains("modprobe fuse"), "{report}");
}

#[test]
fn a_malformed_url_is_bad_input() {
    let report = doctor(&["--dest", "ftp://nowhere/x"]);
    report.assert_code(2);
    assert!(report.stderr.contains("ftp://nowhere/x"), "{report}");
}
