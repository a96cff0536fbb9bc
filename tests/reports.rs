//! Read-only reports: `plan`, `status`, `batches`, `batch`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use serde_json::Value;

use common::*;

/// Files in three top-level folders and at the root: (folder, files, bytes) expected by plan.
fn reports_tree(w: &Work) -> (BTreeMap<String, (u64, u64)>, u64, u64) {
    let mut by_folder: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut add = |rel: String, len: usize, seed: u64| {
        w.write(&rel, &pseudo_random(len, seed));
        let folder = rel
            .split_once('/')
            .map_or(".".to_string(), |(top, _)| top.to_string());
        let e = by_folder.entry(folder).or_default();
        e.0 += 1;
        e.1 += len as u64;
    };
    for i in 0..17u64 {
        add(
            format!("documents/2025/{:02}/invoice-{i}.pdf", i % 4),
            100 + i as usize * 31,
            i,
        );
    }
    for i in 0..9u64 {
        add(
            format!("contracts/R{}/C{i}/contract.pdf", i % 3),
            2000 + i as usize,
            100 + i,
        );
    }
    for i in 0..11u64 {
        add(
            format!("missions/expenses/receipt-{i}.jpg"),
            5000 + i as usize * 7,
            200 + i,
        );
    }
    for i in 0..3u64 {
        add(format!("root-{i}.txt"), 10 + i as usize, 300 + i);
    }
    let files = by_folder.values().map(|v| v.0).sum();
    let bytes = by_folder.values().map(|v| v.1).sum();
    (by_folder, files, bytes)
}

fn json(run: &Run) -> Value {
    run.assert_code(0);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{run}"))
}

#[test]
fn plan_before_any_sweep_counts_by_folder_and_state_and_writes_nothing() {
    let w = Work::new();
    let (by_folder, files, bytes) = reports_tree(&w);
    let plan = json(&w.cmd("plan", &["--json"]));
    assert!(!w.manifest.exists(), "plan created the manifest");
    assert!(!w.dest.exists(), "plan created the dest");

    assert_eq!(plan["files"]["files"], files, "{plan:#}");
    assert_eq!(plan["files"]["bytes"], bytes, "{plan:#}");
    let folders = plan["by_folder"]
        .as_object()
        .unwrap_or_else(|| panic!("no by_folder: {plan:#}"));
    assert_eq!(
        folders.keys().cloned().collect::<BTreeSet<_>>(),
        by_folder.keys().cloned().collect(),
        "{plan:#}"
    );
    for (folder, (n, b)) in &by_folder {
        assert_eq!(folders[folder]["files"], *n, "files of {folder}: {plan:#}");
        assert_eq!(folders[folder]["bytes"], *b, "bytes of {folder}: {plan:#}");
        assert_eq!(
            folders[folder]["copy_files"], *n,
            "to copy in {folder}: {plan:#}"
        );
    }
    assert_eq!(plan["by_state"]["pending"]["files"], files, "{plan:#}");
    assert_eq!(plan["by_state"].as_object().unwrap().len(), 1, "{plan:#}");
    assert!(plan["estimate_seconds"].as_f64().is_some(), "{plan:#}");

    // The human form names every folder.
    let human = w.cmd("plan", &[]);
    human.assert_code(0);
    for folder in by_folder.keys() {
        assert!(
            human.stdout.lines().any(|l| l.starts_with(folder.as_str())),
            "{folder} missing\n{human}"
        );
    }
    assert!(human.stdout.contains("Estimated duration"), "{human}");
    assert!(!w.manifest.exists());
}

#[test]
fn plan_after_a_sweep_uses_the_recorded_pair_and_sees_changes() {
    let w = Work::new();
    let (by_folder, files, _) = reports_tree(&w);
    w.sweep(&[]).assert_code(0);

    let plan = json(&w.cmd_manifest_only("plan", &["--json"]));
    assert_eq!(plan["source"], w.src.to_str().unwrap(), "{plan:#}");
    assert_eq!(
        plan["dest"].as_str().map(|d| d.trim_end_matches('/')),
        Some(w.dest_url().as_str()),
        "{plan:#}"
    );
    assert_eq!(plan["by_state"]["verified"]["files"], files, "{plan:#}");
    for (folder, (n, _)) in &by_folder {
        assert_eq!(plan["by_folder"][folder]["files"], *n, "{plan:#}");
        assert_eq!(plan["by_folder"][folder]["copy_files"], 0, "{plan:#}");
    }

    // A new file in a new folder, one deleted.
    w.write("newfolder/new.bin", b"new");
    fs::remove_file(w.src.join("root-0.txt")).unwrap();
    let db = fs::read(&w.manifest).unwrap();
    let plan = json(&w.cmd_manifest_only("plan", &["--json"]));
    assert_eq!(
        fs::read(&w.manifest).unwrap(),
        db,
        "plan changed the manifest"
    );
    assert_eq!(plan["by_state"]["pending"]["files"], 1, "{plan:#}");
    assert_eq!(plan["by_state"]["missing"]["files"], 1, "{plan:#}");
    assert_eq!(plan["by_state"]["verified"]["files"], files - 1, "{plan:#}");
    assert_eq!(plan["by_folder"]["newfolder"]["copy_files"], 1, "{plan:#}");

    // Scoped.
    let scoped = json(&w.cmd_manifest_only("plan", &["--json", "--include", "contracts/**"]));
    assert_eq!(
        scoped["files"]["files"], by_folder["contracts"].0,
        "{scoped:#}"
    );
    assert_eq!(
        scoped["by_folder"].as_object().unwrap().len(),
        1,
        "{scoped:#}"
    );
}

#[test]
fn status_json_maps_all_nine_states_in_files_and_bytes() {
    let w = Work::new();
    let (_, files, bytes) = reports_tree(&w);
    std::os::unix::fs::symlink("x", w.src.join("documents/link")).unwrap();
    w.sweep(&[]).assert_code(0);
    let status = w.status();
    for section in ["files", "bytes"] {
        let map = status[section]
            .as_object()
            .unwrap_or_else(|| panic!("no {section} object: {status:#}"));
        assert_eq!(
            map.len(),
            9,
            "{section} must map exactly the 9 states: {status:#}"
        );
        for state in STATES {
            assert!(
                map.get(state).is_some_and(Value::is_u64),
                "{section}.{state} missing or not a number: {status:#}"
            );
        }
    }
    assert_file_states(&status, &[("verified", files), ("unsupported", 1)]);
    assert_eq!(state_count(&status, "bytes", "verified"), bytes);
    let problems = status["problems"].as_array().expect("problems is an array");
    assert_eq!(problems.len(), 1, "{status:#}");
    for key in ["path", "state", "attempts", "reason"] {
        assert!(
            problems[0].get(key).is_some(),
            "problem without {key}: {status:#}"
        );
    }

    // The human form shows every state.
    let human = w.cmd_manifest_only("status", &[]);
    human.assert_code(0);
    for state in STATES {
        assert!(
            human.stdout.lines().any(|l| l.starts_with(state)),
            "{state} missing\n{human}"
        );
    }
}

#[test]
fn batches_account_for_every_file_and_batch_shows_them() {
    let w = Work::new();
    let (_, files, bytes) = reports_tree(&w);
    let run = w.sweep(&["--batch-size", "7", "--concurrency", "3"]);
    run.assert_code(0);

    let rows = json(&w.cmd_manifest_only("batches", &["--json"]));
    let rows = rows.as_array().expect("batches --json is an array");
    assert!(
        rows.len() as u64 >= files.div_ceil(7),
        "{} batches for {files} files of 7",
        rows.len()
    );
    let sum = |key: &str| rows.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("copied"), files, "{rows:#?}");
    assert_eq!(sum("files"), files, "{rows:#?}");
    assert_eq!(sum("bytes"), bytes, "{rows:#?}");
    assert_eq!(sum("failed") + sum("conflicts") + sum("missing"), 0);
    for r in rows {
        assert_eq!(r["status"], "completed", "{r:#}");
        assert!(
            r["files"].as_u64().unwrap() <= 7,
            "batch over --batch-size: {r:#}"
        );
        assert!(
            r["finished_at"].as_i64() >= r["started_at"].as_i64(),
            "{r:#}"
        );
    }
    let human = w.cmd_manifest_only("batches", &[]);
    human.assert_code(0);
    assert_eq!(
        human
            .stdout
            .lines()
            .filter(|l| l.contains("completed"))
            .count(),
        rows.len(),
        "{human}"
    );

    // Every file was last handled in exactly one batch.
    let mut seen = BTreeSet::new();
    for r in rows {
        let id = r["id"].as_i64().unwrap().to_string();
        let one = json(&w.cmd_manifest_only("batch", &[&id, "--json"]));
        assert_eq!(one["batch"]["id"], r["id"]);
        let listed = one["files"].as_array().unwrap();
        assert_eq!(listed.len() as u64, r["files"].as_u64().unwrap(), "{one:#}");
        for f in listed {
            assert_eq!(f["state"], "verified", "{f}");
            assert!(
                seen.insert(f["path"].as_str().unwrap().to_string()),
                "{f} in two batches"
            );
        }
    }
    assert_eq!(seen.len() as u64, files);

    let first = rows[0]["id"].as_i64().unwrap().to_string();
    let human = w.cmd_manifest_only("batch", &[&first]);
    human.assert_code(0);
    assert!(human.stdout.contains(&format!("Batch {first}")), "{human}");
    let some_file = json(&w.cmd_manifest_only("batch", &[&first, "--json"]))["files"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(human.stdout.contains(&some_file), "{human}");

    let missing = w.cmd_manifest_only("batch", &["99999"]);
    assert_eq!(missing.code, Some(2), "{missing}");
    let lines = missing.stderr_lines();
    assert_eq!(lines.len(), 1, "{missing}");
    assert!(
        lines[0].starts_with("cutoverfs: error: ") && lines[0].contains("99999"),
        "{missing}"
    );
}

#[test]
fn batches_record_failures_and_conflicts() {
    let w = Work::new();
    w.write("a/b.txt", b"blocked");
    w.write("c/clash.txt", b"mine");
    w.write("d/ok.txt", b"ok");
    write_file(&w.dest.join("a"), b"blocker");
    write_file(&w.dest.join("c/clash.txt"), b"theirs");
    w.sweep(&["--max-retries", "0"]).assert_code(1);
    let rows = json(&w.cmd_manifest_only("batches", &["--json"]));
    let rows = rows.as_array().unwrap();
    let sum = |key: &str| rows.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("copied"), 1, "{rows:#?}");
    assert_eq!(sum("conflicts"), 1, "{rows:#?}");
    assert_eq!(sum("failed"), 1, "{rows:#?}");
    assert!(rows.iter().any(|r| r["status"] == "partial"), "{rows:#?}");
}
