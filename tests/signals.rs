//! Every command stops within a few seconds on SIGTERM and on Ctrl-C (SIGINT), in the middle
//! of its work (held there at a named point, so the signal lands mid-work on any machine), and
//! leaves the manifest consistent: the same command run again finishes the job.

mod common;

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cutover::{files_below, Cutover};
use common::*;

/// The promise is "a few seconds"; the slack is for a loaded two-core test machine. A command
/// that waits for the held work instead of stopping would wait for `HOLD_TIMEOUT`.
const STOP_BOUND: Duration = Duration::from_secs(10);

const SIGNALS: [(libc::c_int, &str); 2] = [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")];

/// Starts `cmd` held at `hold`, signals it once it is there, and returns its run; `release`
/// lets the held work go on after the signal (a sweep finishes its copies in flight).
fn stop_while_held(
    c: &Cutover,
    cmd: &str,
    extra: &[&str],
    hold: &Hold,
    signal: libc::c_int,
    release: bool,
) -> Run {
    let mut command = c.command(cmd, extra);
    hold.apply(&mut command);
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    hold.wait_reached(|| child.try_wait().unwrap().is_none());
    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
    if release {
        hold.release();
    }
    let run = wait_capturing(child, signalled, STOP_BOUND + Duration::from_secs(20));
    assert!(
        run.elapsed < STOP_BOUND,
        "{cmd} took {:?} to stop\n{run}",
        run.elapsed
    );
    assert_eq!(run.code, Some(130), "{cmd}\n{run}");
    run
}

fn migrated(c: &Cutover) -> Vec<String> {
    small_tree(&c.w, 120, 4, 200, 4000, 8);
    c.run("sweep", &[]).assert_code(0);
    files_below(&c.w.src).into_keys().collect()
}

#[test]
fn sweep_stops_after_its_copies_in_flight() {
    for (signal, name) in SIGNALS {
        let c = Cutover::file();
        small_tree(&c.w, 120, 4, 200, 4000, 8);
        let few = ["--concurrency", "4", "--batch-size", "10"];
        let run = stop_while_held(&c, "sweep", &few, &Hold::at("copy:read"), signal, true);
        assert!(
            run.stdout.contains("MIGRATION INTERRUPTED"),
            "{name}: {run}"
        );
        let status = c.w.status();
        assert_eq!(
            state_count(&status, "files", "copying"),
            0,
            "{name}: {status:#}"
        );
        assert!(
            state_count(&status, "files", "verified") < 120,
            "{name}: nothing left to do"
        );
        c.run("sweep", &[]).assert_code(0);
        assert_trees_equal(&c.w.src, &c.w.dest);
    }
}

#[test]
fn verify_stops_at_once_and_a_rerun_checks_everything() {
    for (signal, name) in SIGNALS {
        let c = Cutover::file();
        let files = migrated(&c);
        let hold = Hold::at_subject("verify:check", &files[60]);
        stop_while_held(&c, "verify", &["--deep"], &hold, signal, false);
        let again = c.run("verify", &["--deep"]);
        again.assert_code(0);
        assert_eq!(
            again.count("Files checked"),
            files.len() as u64,
            "{name}: {again}"
        );
    }
}

#[test]
fn purge_stops_at_once_and_keeps_the_copy_it_had_set_aside() {
    for (signal, name) in SIGNALS {
        let c = Cutover::file();
        let files = migrated(&c);
        let truth = files_below(&c.w.src);
        let held = &files[60];
        let hold = Hold::at_subject("purge:set-aside", held);
        let run = stop_while_held(&c, "purge", &["--confirm"], &hold, signal, false);
        // The file it was on is back under its name, not purged; the ones before it are purged.
        assert_eq!(
            fs::read(c.w.src.join(held)).unwrap(),
            truth[held],
            "{name}: {run}"
        );
        let left = files_below(&c.w.src);
        assert!(
            left.keys().all(|rel| !rel.contains(".cutoverfs-")),
            "{name}: {left:?}"
        );
        assert!(
            left.len() < files.len(),
            "{name}: nothing was purged before the stop"
        );
        let again = c.run("purge", &["--confirm", "--paranoid"]);
        again.assert_code(0);
        assert!(files_below(&c.w.src).is_empty(), "{name}: {again}");
        c.run("verify", &["--deep"]).assert_code(0);
    }
}

#[test]
fn rollback_stops_at_once_and_a_rerun_finishes_it() {
    for (signal, name) in SIGNALS {
        let c = Cutover::file();
        let files = migrated(&c);
        let hold = Hold::at_subject("rollback:file", &files[60]);
        stop_while_held(
            &c,
            "rollback",
            &["--all", "--confirm"],
            &hold,
            signal,
            false,
        );
        let status = c.w.status();
        assert!(
            state_count(&status, "files", "verified") > 0,
            "{name}: all rolled back already"
        );
        c.run("rollback", &["--all", "--confirm"]).assert_code(0);
        let status = c.w.status();
        assert_eq!(
            state_count(&status, "files", "pending"),
            files.len() as u64,
            "{name}"
        );
        assert!(
            files_below(&c.w.dest).is_empty(),
            "{name}: dest objects left"
        );
        assert_eq!(
            files_below(&c.w.src).len(),
            files.len(),
            "{name}: a local copy was touched"
        );
    }
}

#[test]
fn plan_stops_at_once_and_leaves_nothing_beside_the_manifest() {
    for (signal, name) in SIGNALS {
        let c = Cutover::file();
        let files = migrated(&c);
        c.w.write("new/one.bin", b"not copied yet");
        let before = fs::read(&c.w.manifest).unwrap();
        let hold = Hold::at_subject("plan:dest", "new/one.bin");
        stop_while_held(&c, "plan", &[], &hold, signal, false);
        let beside: Vec<_> = fs::read_dir(c.w.manifest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            beside.len(),
            1,
            "{name}: files left beside the manifest: {beside:?}"
        );
        assert_eq!(
            fs::read(&c.w.manifest).unwrap(),
            before,
            "{name}: plan changed the manifest"
        );
        let plan = c.run("plan", &["--json"]);
        plan.assert_code(0);
        let json: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
        assert_eq!(
            json["files"]["files"],
            files.len() as u64 + 1,
            "{name}: {plan}"
        );
    }
}
