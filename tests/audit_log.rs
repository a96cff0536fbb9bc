//! The audit trail (issue 6.4): every state change recorded with when, node, command, from, to
//! and why, by a sweep, by writes through a real FUSE mount and by purge; `cutoverfs log` and
//! its filters; pruning.

mod common;

use std::ffi::OsString;
use std::fs;
use std::time::Duration;

use common::mount::{wait_until, Daemon};
use common::*;
use serde_json::Value;

/// `cutoverfs log --format json` with these flags, one object per change.
fn log(w: &Work, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["--format", "json"];
    args.extend_from_slice(extra);
    let run = w.cmd_manifest_only("log", &args);
    run.assert_code(0);
    run.stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}\n{run}")))
        .collect()
}

fn of<'a>(rows: &'a [Value], path: &str) -> Vec<&'a Value> {
    rows.iter().filter(|r| r["path"] == path).collect()
}

/// (from, to) of each change, oldest first.
fn transitions(rows: &[&Value]) -> Vec<(String, String)> {
    rows.iter()
        .map(|r| {
            (
                r["from"].as_str().unwrap_or("-").to_string(),
                r["to"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn a_sweep_records_each_change_with_its_node_and_the_failure_with_its_reason() {
    let w = Work::new();
    w.write("a/b.txt", b"blocked file");
    w.write("c/d.txt", b"fine file");
    // A file at the dest where directory `a` is needed: a/b.txt fails.
    write_file(&w.dest.join("a"), b"not a directory");
    w.sweep(&["--max-retries", "0"]).assert_code(1);

    let rows = log(&w, &[]);
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "newest last: {ids:?}");
    let fine = of(&rows, "c/d.txt");
    assert_eq!(
        transitions(&fine),
        pairs(&[
            ("-", "pending"),
            ("pending", "copying"),
            ("copying", "verified")
        ])
    );
    let node = fine[0]["node"].as_str().unwrap();
    for row in &rows {
        assert_eq!(row["command"], "sweep", "{row}");
        assert_eq!(row["node"], node, "one process did it all: {row}");
    }
    // The copy's lease holder is the node that recorded the change.
    assert_eq!(fine[1]["lease"], node);
    assert_eq!(fine[2]["lease"], node);
    assert!(fine[2]["why"].as_str().unwrap().contains("sha256"));

    let failed = of(&rows, "a/b.txt");
    assert_eq!(
        transitions(&failed),
        pairs(&[
            ("-", "pending"),
            ("pending", "copying"),
            ("copying", "failed")
        ])
    );
    let why = failed[2]["why"].as_str().unwrap_or_default();
    assert!(!why.is_empty(), "a failure says why: {}", failed[2]);
    let status = w.status();
    let reason = problem(&status, "a/b.txt").unwrap()["reason"].clone();
    assert_eq!(why, reason.as_str().unwrap(), "the manifest's own reason");

    // Filters: an exact path, a glob, a time.
    assert_eq!(
        transitions(&of(&log(&w, &["--path", "c/d.txt"]), "c/d.txt")).len(),
        3
    );
    assert!(log(&w, &["--path", "c/d.txt"])
        .iter()
        .all(|r| r["path"] == "c/d.txt"));
    let globbed = log(&w, &["--path", "c/**"]);
    assert!(
        !globbed.is_empty()
            && globbed
                .iter()
                .all(|r| r["path"].as_str().unwrap().starts_with("c/"))
    );
    assert_eq!(log(&w, &["--since", "1h"]).len(), rows.len());
    assert!(log(&w, &["--since", "2100-01-01T00:00:00Z"]).is_empty());
    let bad = w.cmd_manifest_only("log", &["--since", "soon"]);
    assert_eq!(bad.code, Some(2), "{bad}");

    // Human output: a header and one line per change.
    let human = w.cmd_manifest_only("log", &["--path", "a/b.txt"]);
    human.assert_code(0);
    assert!(human.stdout.starts_with("AT (UTC)"), "{human}");
    assert_eq!(human.stdout.lines().count(), 4, "{human}");
    assert!(human.stdout.contains(why), "{human}");

    // Pruning: a dry run counts, --confirm deletes.
    let dry = w.cmd_manifest_only("log", &["--prune-before", "0s"]);
    dry.assert_code(0);
    assert!(
        dry.stdout.contains(&format!("{} audit rows", rows.len())),
        "{dry}"
    );
    assert_eq!(log(&w, &[]).len(), rows.len());
    w.cmd_manifest_only("log", &["--prune-before", "0s", "--confirm"])
        .assert_code(0);
    assert!(log(&w, &[]).is_empty());
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

#[test]
fn writes_through_the_mount_and_purge_are_recorded() {
    let w = Work::new();
    w.write("keep.txt", b"kept");
    w.write("gone.txt", b"to unlink");
    w.write("old.txt", b"to rename");
    let mnt = w.root.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let args = os(&[
        "--source",
        w.src.to_str().unwrap(),
        "--dest",
        &w.dest_url(),
        "--manifest",
        &w.manifest_url(),
    ]);
    let daemon = Daemon::start(&mnt, &args);
    daemon.wait_for_scan();
    fs::write(mnt.join("new.txt"), b"written through the mount").unwrap();
    fs::remove_file(mnt.join("gone.txt")).unwrap();
    fs::rename(mnt.join("old.txt"), mnt.join("renamed.txt")).unwrap();
    let settled = || {
        let rows = log(&w, &[]);
        ["keep.txt", "new.txt", "renamed.txt"]
            .iter()
            .all(|p| of(&rows, p).last().is_some_and(|r| r["to"] == "verified"))
    };
    wait_until(Duration::from_secs(60), "every file verified", settled);
    daemon.stop();
    w.cmd_manifest_only("purge", &["--confirm"]).assert_code(0);

    let rows = log(&w, &[]);
    for row in rows.iter().filter(|r| r["command"] == "mount") {
        if row["to"] == "copying" || row["from"] == "copying" {
            assert_eq!(
                row["lease"], row["node"],
                "the daemon's sweeper holds the lease: {row}"
            );
        }
    }
    let new = of(&rows, "new.txt");
    assert_eq!(new[0]["from"], Value::Null, "{new:?}");
    assert_eq!(new[0]["command"], "mount");
    let copied: Vec<_> = new
        .iter()
        .filter(|r| r["from"] == "copying" && r["to"] == "verified")
        .collect();
    assert_eq!(copied.len(), 1, "{new:?}");
    assert_eq!(copied[0]["command"], "mount");

    let gone = of(&rows, "gone.txt");
    let removed = gone
        .iter()
        .find(|r| r["to"] == "deleted")
        .expect("unlink recorded");
    assert_eq!(removed["command"], "mount");
    assert_eq!(removed["why"], "removed through the mount");

    let old = of(&rows, "old.txt");
    let renamed = old
        .iter()
        .find(|r| r["to"] == "deleted")
        .expect("rename recorded");
    assert_eq!(renamed["why"], "renamed through the mount");
    assert_eq!(of(&rows, "renamed.txt")[0]["from"], Value::Null);

    for path in ["keep.txt", "new.txt", "renamed.txt"] {
        let purged = of(&rows, path).last().copied().unwrap().clone();
        assert_eq!(purged["command"], "purge", "{path}: {purged}");
        assert_eq!(purged["from"], "verified");
        assert_eq!(purged["to"], "verified");
        assert_eq!(purged["why"], "local copy purged");
    }
}
