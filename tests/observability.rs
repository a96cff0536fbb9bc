//! Logs, metrics and live control (DESIGN §8): JSON and rotated log files that hold no secret
//! and no file content, Prometheus metrics scraped over HTTP from a live mount and a sweep, and
//! settings changed on SIGHUP.

mod common;

use std::ffi::OsString;
use std::fs;
use std::path::Path;

use common::s3::S3Server;
use common::*;

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Every line of `path`, parsed as one JSON object.
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"))
        })
        .collect()
}

#[test]
fn json_logs_go_to_the_log_file_one_object_per_line() {
    let w = Work::new();
    small_tree(&w, 20, 3, 10, 2000, 7);
    let log = w.root.join("sweep.log");
    let log_arg = log.display().to_string();
    let mut args: Vec<OsString> = os(&["--log-format", "json", "--log-file", &log_arg, "sweep"]);
    args.extend(w.target());
    args.extend(os(&["--no-progress", "--log-level", "debug"]));
    let run = run(args);
    run.assert_code(0);
    let events = json_lines(&log);
    assert!(events.len() > 3, "too few log lines: {events:?}");
    for event in &events {
        assert!(event["timestamp"].is_string(), "{event}");
        assert!(event["level"].is_string(), "{event}");
        assert!(event["message"].is_string(), "{event}");
    }
    // The same events reach stderr, in the same format.
    let stderr_json = run
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count();
    assert_eq!(stderr_json, events.len(), "{run}");
}

#[test]
fn the_log_file_is_rotated_by_size_and_old_files_are_deleted() {
    let w = Work::new();
    small_tree(&w, 60, 4, 10, 500, 8);
    let log = w.root.join("logs").join("cutoverfs.log");
    fs::create_dir(log.parent().unwrap()).unwrap();
    let log_arg = log.display().to_string();
    let mut args: Vec<OsString> = os(&[
        "--log-file",
        &log_arg,
        "--log-max-size",
        "2KiB",
        "--log-max-files",
        "2",
        "--log-level",
        "debug",
        "sweep",
    ]);
    args.extend(w.target());
    args.push("--no-progress".into());
    run(args).assert_code(0);
    let mut names: Vec<String> = fs::read_dir(log.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["cutoverfs.log", "cutoverfs.log.1", "cutoverfs.log.2"],
        "expected the live file and two rotated ones"
    );
    for name in &names[1..] {
        let size = fs::metadata(log.with_file_name(name)).unwrap().len();
        // Rotated once past the limit, so a file holds a little more than 2 KiB at most.
        assert!((2048..2048 + 4096).contains(&size), "{name}: {size} bytes");
    }
}

#[test]
fn a_log_file_that_cannot_be_opened_is_a_clear_error() {
    let w = Work::new();
    w.write("a", b"a");
    let mut args: Vec<OsString> = os(&["--log-file", "/proc/no/such/dir/x.log", "sweep"]);
    args.extend(w.target());
    let run = run(args);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("cannot open log file /proc/no/such/dir/x.log"),
        "{run}"
    );
    assert!(!w.manifest.exists(), "nothing may be created");
}

/// Secrets given through the environment and a URL, and the content of the files moved, never
/// reach the logs, even at the most detailed level.
#[test]
fn logs_hold_no_secret_and_no_file_content() {
    let s3 = S3Server::in_process();
    let w = Work::new();
    let marker = "CONTENT-MARKER-4f1d9c";
    for i in 0..5 {
        w.write(&format!("doc{i}.txt"), format!("{marker} {i}").as_bytes());
    }
    let log = w.root.join("s3.log");
    let log_arg = log.display().to_string();
    let mut sweep = command();
    s3.apply_env(&mut sweep)
        .args(["--log-file", &log_arg, "--log-level", "trace", "sweep"])
        .arg("--source")
        .arg(&w.src)
        .args([
            "--dest",
            &s3.dest_url("media"),
            "--manifest",
            &w.manifest_url(),
        ])
        .arg("--no-progress");
    let ok = run_command(&mut sweep);
    ok.assert_code(0);
    // A password in the endpoint URL: refused, without repeating it.
    let password = "URLPASSWORD-77ab";
    let endpoint = format!("http://user:{password}@127.0.0.1:{}", s3.port());
    let mut refused = command();
    s3.apply_env(&mut refused)
        .args(["--log-file", &log_arg, "--log-level", "trace", "sweep"])
        .arg("--source")
        .arg(&w.src)
        .args(["--dest", "s3://other-bucket/x", "--s3-endpoint", &endpoint])
        .args([
            "--manifest",
            &format!("sqlite://{}", w.root.join("m2.db").display()),
        ]);
    let refused = run_command(&mut refused);
    refused.assert_code(2);
    let logged = fs::read_to_string(&log).unwrap();
    assert!(logged.lines().count() > 5, "{logged}");
    for (what, text) in [
        ("log file", logged.as_str()),
        ("stderr", &ok.stderr),
        ("stderr", &refused.stderr),
    ] {
        for secret in [s3.secret_key().as_str(), password, marker] {
            assert!(!text.contains(secret), "{what} holds {secret:?}:\n{text}");
        }
    }
}

/// `--help` names the environment variables it reads, but never their values: the manifest URL
/// of a PostgreSQL manifest holds a password.
#[test]
fn help_never_shows_the_manifest_password_from_the_environment() {
    let password = "HELPPASSWORD-3c9e";
    for args in [&["--help"][..], &["sweep", "--help"], &["mount", "--help"]] {
        let mut help = command();
        help.env(
            "CUTOVERFS_MANIFEST",
            format!("postgres://cutover:{password}@db.example.invalid/cutover"),
        )
        .args(args);
        let shown = run_command(&mut help);
        shown.assert_code(0);
        let text = format!("{}{}", shown.stdout, shown.stderr);
        assert!(
            !text.contains(password),
            "{args:?} shows the password:\n{text}"
        );
        if args.len() > 1 {
            assert!(
                text.contains("CUTOVERFS_MANIFEST"),
                "{args:?} no longer names the variable:\n{text}"
            );
        }
    }
}
