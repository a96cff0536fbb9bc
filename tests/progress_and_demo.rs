//! Progress output (log lines without a terminal, a bar on one) and `cutoverfs demo`.

mod common;

use std::process::Command;

use common::*;

/// Enough data to keep a debug build busy for well over 200 ms.
fn busy_tree(w: &Work) {
    small_tree(w, 300, 6, 1024, 8 * 1024, 21);
    for i in 0..3 {
        w.write(&format!("big/b{i}.bin"), &pseudo_random(4 << 20, 900 + i));
    }
}

#[test]
fn without_a_terminal_progress_is_logged_at_the_interval() {
    let w = Work::new();
    busy_tree(&w);
    // One file at a time (two syncs each) keeps even a fast machine busy long enough.
    let run = w.cmd(
        "sweep",
        &[
            "--progress-interval",
            "20ms",
            "--concurrency",
            "1",
            "--batch-size",
            "10",
        ],
    );
    run.assert_code(0);
    assert!(
        run.elapsed.as_millis() > 200,
        "the sweep was too quick to show progress ({:?})",
        run.elapsed
    );
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("files") && l.contains("ETA"))
        .collect();
    assert!(
        !lines.is_empty(),
        "no progress line with files and ETA on stderr\n{run}"
    );
    assert!(lines.iter().any(|l| l.contains("Migrating")), "{lines:#?}");
    assert!(
        !run.stdout.contains("ETA"),
        "progress lines belong on stderr\n{run}"
    );
    // No terminal: no bar drawing codes either.
    assert!(
        !run.stderr.contains("\u{1b}[2K"),
        "a bar was drawn without a terminal\n{run}"
    );
}

#[test]
fn progress_interval_zero_logs_no_progress_lines() {
    let w = Work::new();
    busy_tree(&w);
    let run = w.cmd("sweep", &["--progress-interval", "0s"]);
    run.assert_code(0);
    assert!(
        !run.stderr.lines().any(|l| l.contains("ETA")),
        "progress lines with --progress-interval 0\n{run}"
    );
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn on_a_terminal_a_progress_bar_is_drawn() {
    let w = Work::new();
    busy_tree(&w);
    // One file at a time, so the bar has time to draw whatever the machine's speed.
    let mut cmd = vec![
        shell_quote(bin()),
        "sweep".into(),
        "--concurrency".into(),
        "1".into(),
    ];
    for arg in w.target() {
        cmd.push(shell_quote(arg.to_str().unwrap()));
    }
    let cmd = cmd.join(" ");
    let run = run_command(
        Command::new("script")
            .args(["-qfec", &cmd, "/dev/null"])
            .env_remove("CUTOVERFS_LOG")
            .env_remove("CUTOVERFS_MANIFEST")
            .env("TERM", "xterm"),
    );
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("MIGRATION COMPLETE"), "{run}");
    assert!(
        run.stdout.contains("Migrating"),
        "no progress bar on a terminal\n{run}"
    );
    assert_trees_equal(&w.src, &w.dest);

    // --no-progress: no bar even on a terminal.
    let w2 = Work::new();
    busy_tree(&w2);
    let mut cmd = vec![shell_quote(bin()), "sweep".into(), "--no-progress".into()];
    for arg in w2.target() {
        cmd.push(shell_quote(arg.to_str().unwrap()));
    }
    let run = run_command(
        Command::new("script")
            .args(["-qfec", &cmd.join(" "), "/dev/null"])
            .env("TERM", "xterm"),
    );
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        !run.stdout.contains("Migrating ["),
        "a bar was drawn with --no-progress\n{run}"
    );
}

#[test]
fn demo_runs_the_whole_cutover_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x");
    let run = run([
        std::ffi::OsStr::new("demo"),
        "--dir".as_ref(),
        dir.as_os_str(),
        "--files".as_ref(),
        "50".as_ref(),
    ]);
    run.assert_code(0);
    assert!(run.stdout.contains("files identical"), "{run}");
    let identical: u64 = run
        .stdout
        .lines()
        .find(|l| l.contains("files identical"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        identical, 57,
        "50 small + 3 fixed + 3 large files + 1 uploaded through the mount\n{run}"
    );
    assert!(run.stdout.contains("MIGRATION COMPLETE"), "{run}");
    assert!(
        run.stdout.contains("Successfully copied:      1"),
        "the second sweep copies only the upload\n{run}"
    );
    assert!(
        run.stdout.contains("Local copies deleted:     57"),
        "purge deletes every local copy\n{run}"
    );
    assert!(!run.stdout.contains("FAILED"), "{run}");
    assert!(
        !dir.join("media").exists() && !dir.join("private-media").exists(),
        "the demo did not clean up"
    );
}
