//! `cutoverfs verify` on a file:// dest and on S3 over HTTP: a flipped byte, a deleted object,
//! a changed local copy and a purged file whose dest copy broke are found, recorded, reported
//! in every format, and the next sweep repairs what has a local copy.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::s3::S3Server;
use common::{command, problem, run_command, state_count, Work};

fn flip_byte(path: &Path, at: u64) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
}

fn seed(work: &Work) {
    for i in 0..6 {
        work.write(
            &format!("docs/f{i}.bin"),
            &common::pseudo_random(5000 + i, i as u64),
        );
    }
}

#[test]
fn file_dest_flipped_byte_deleted_object_and_changed_local_copy_are_found_and_repaired() {
    let work = Work::new();
    seed(&work);
    work.sweep(&[]).assert_code(0);
    work.cmd("verify", &["--no-progress"]).assert_code(0);

    flip_byte(&work.dest.join("docs/f1.bin"), 100);
    fs::remove_file(work.dest.join("docs/f2.bin")).unwrap();
    work.write("docs/f3.bin", b"changed locally");
    // A flipped byte whose writer put the mtime back: the file's stamp is what was recorded.
    let f4 = work.dest.join("docs/f4.bin");
    let mtime = fs::metadata(&f4).unwrap().modified().unwrap();
    flip_byte(&f4, 7);
    fs::File::options()
        .write(true)
        .open(&f4)
        .unwrap()
        .set_modified(mtime)
        .unwrap();

    // Without --deep: a dest file whose stamp moved (f1) is read back and found broken; the
    // deleted object and the changed local copy are found; f4 looks as verified.
    let shallow = work.cmd("verify", &["--no-progress", "--format", "json"]);
    shallow.assert_code(1);
    let report: serde_json::Value = serde_json::from_str(&shallow.stdout).unwrap();
    let problems: Vec<(String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["problem"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("docs/f1.bin", "dest_hash"),
        ("docs/f2.bin", "dest_missing"),
        ("docs/f3.bin", "local_changed"),
    ]
    .map(|(p, k)| (p.to_string(), k.to_string()));
    assert_eq!(problems, expected, "{shallow}");
    assert_eq!(report["checked"], 6);

    // --deep reads every object back; the others already left `verified`.
    let deep = work.cmd("verify", &["--no-progress", "--deep"]);
    deep.assert_code(1);
    assert_eq!(deep.count("Files checked"), 3, "{deep}");
    assert_eq!(deep.count("Problems"), 1, "{deep}");
    assert!(deep.stdout.contains("docs/f4.bin [dest_hash]"), "{deep}");

    let status = work.status();
    assert_eq!(state_count(&status, "files", "pending"), 4, "{status}");
    assert_eq!(state_count(&status, "files", "verified"), 2, "{status}");

    // Every broken or missing copy is written again from its local copy, the broken objects
    // of ours included.
    work.sweep(&[]).assert_code(0);
    work.cmd("verify", &["--no-progress", "--deep"])
        .assert_code(0);
    assert_eq!(
        fs::read(work.dest.join("docs/f3.bin")).unwrap(),
        b"changed locally"
    );
    for i in [0u64, 1, 2, 4, 5] {
        assert_eq!(
            fs::read(work.dest.join(format!("docs/f{i}.bin"))).unwrap(),
            common::pseudo_random(5000 + i as usize, i),
            "docs/f{i}.bin"
        );
    }
}

#[test]
fn a_purged_file_with_a_broken_dest_copy_is_data_at_risk_and_csv_parses() {
    let work = Work::new();
    seed(&work);
    work.write("docs/a,b \"q\".bin", b"odd name");
    work.sweep(&[]).assert_code(0);
    work.cmd(
        "purge",
        &["--confirm", "--path", "docs/f4.bin", "--path", "docs/a*"],
    )
    .assert_code(0);
    fs::remove_file(work.dest.join("docs/f4.bin")).unwrap();
    flip_byte(&work.dest.join("docs/a,b \"q\".bin"), 0);
    let out = work.root.join("report.csv");
    let run = work.cmd(
        "verify",
        &[
            "--no-progress",
            "--deep",
            "--format",
            "csv",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    run.assert_code(1);
    assert!(run.stderr.contains("DATA AT RISK"), "{run}");
    let text = fs::read_to_string(&out).unwrap();
    let rows = parse_csv(&text);
    assert_eq!(
        rows[0],
        ["path", "problem", "data_at_risk", "recorded", "detail"]
    );
    assert_eq!(rows.len(), 3, "{text}");
    assert_eq!(
        rows[1][..4],
        ["docs/a,b \"q\".bin", "dest_hash", "true", "true"]
    );
    assert_eq!(
        rows[2][..4],
        ["docs/f4.bin", "dest_missing", "true", "true"]
    );

    // Recorded apart from ordinary trouble, and no sweep takes them.
    let status = work.status();
    let at_risk = problem(&status, "docs/f4.bin").expect("listed");
    assert!(at_risk.to_string().contains("DATA AT RISK"), "{at_risk}");
    work.sweep(&[]).assert_code(1);
    let status = work.status();
    assert!(problem(&status, "docs/f4.bin")
        .unwrap()
        .to_string()
        .contains("DATA AT RISK"));
}

/// Minimal RFC 4180 reader, so the test checks the quoting rather than trusting it.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = vec![];
    let (mut row, mut field, mut quoted, mut chars) =
        (vec![], String::new(), false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (_, c) => field.push(c),
        }
    }
    rows
}

#[test]
fn s3_dest_deep_finds_a_flipped_byte_and_shallow_a_deleted_object() {
    let server = S3Server::in_process();
    let work = Work::new();
    seed(&work);
    let dest = server.dest_url("v");
    let run = |cmd: &str, extra: &[&str]| {
        let mut c = command();
        server.apply_env(&mut c);
        c.arg(cmd)
            .args(["--source", work.src.to_str().unwrap(), "--dest", &dest])
            .args(["--manifest", &work.manifest_url()])
            .args(extra);
        run_command(&mut c)
    };
    run("sweep", &["--no-progress"]).assert_code(0);
    run("verify", &["--no-progress", "--deep"]).assert_code(0);

    let object = server.dir().join("data/media/v/docs/f1.bin");
    flip_byte(&object, 4000);
    server.delete("v/docs/f2.bin");

    let shallow = run("verify", &["--no-progress"]);
    shallow.assert_code(1);
    assert_eq!(shallow.count("Problems"), 1, "{shallow}");
    assert!(
        shallow.stdout.contains("docs/f2.bin [dest_missing]"),
        "{shallow}"
    );

    let deep = run("verify", &["--no-progress", "--deep"]);
    deep.assert_code(1);
    assert_eq!(deep.count("Problems"), 1, "{deep}");
    assert!(deep.stdout.contains("docs/f1.bin [dest_hash]"), "{deep}");

    run("sweep", &["--no-progress"]);
    run(
        "verify",
        &["--no-progress", "--deep", "--path", "docs/f[02-5].bin"],
    )
    .assert_code(0);
    assert!(server.get("v/docs/f2.bin").is_some());
}

/// verify --deep reports every broken file of a large tree and exits 1, however many there are
/// and wherever they are in the order (the first, the last, a run in the middle, every 37th):
/// it once stopped for good after its first finding, holding every dest I/O slot.
#[test]
fn deep_verify_reports_every_broken_file_of_a_large_tree_and_finishes() {
    use common::cutover::{files_below, flip_byte_keeping_mtime, Cutover};
    let c = Cutover::file();
    common::small_tree(&c.w, 2000, 13, 100, 3000, 21);
    c.run("sweep", &[]).assert_code(0);
    let files: Vec<String> = files_below(&c.w.src).into_keys().collect();
    let mut broken: Vec<&String> = vec![&files[0], &files[files.len() - 1]];
    broken.extend(&files[990..1010]);
    broken.extend(files.iter().step_by(37));
    broken.sort();
    broken.dedup();
    for rel in &broken {
        // mtime put back: only reading the bytes finds these.
        flip_byte_keeping_mtime(&c.dest_file(rel), 0);
    }
    let shallow = c.run("verify", &[]);
    shallow.assert_code(0);
    let deep = c.run("verify", &["--deep", "--format", "json"]);
    deep.assert_code(1);
    let report: serde_json::Value = serde_json::from_str(&deep.stdout).unwrap();
    let found: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert_eq!(f["problem"], "dest_hash", "{f}");
            f["path"].as_str().unwrap()
        })
        .collect();
    let wanted: Vec<&str> = broken.iter().map(|s| s.as_str()).collect();
    assert_eq!(found, wanted);
    assert_eq!(report["checked"], files.len() as u64);
    // Every broken one is copied again, from its good local copy.
    c.run("sweep", &[]).assert_code(0);
    c.run("verify", &["--deep"]).assert_code(0);
}
