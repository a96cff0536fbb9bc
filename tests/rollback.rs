//! `cutoverfs rollback` (issue 6.2, DESIGN §1.8, §4, §7): a dry run changes nothing; a batch is
//! rolled back while a reader loops over its files through a real mount (file:// and S3) with
//! no read error and no wrong byte; purged and changed local copies are refused; objects
//! cutoverfs did not write stay; a kill -9 at any point is finished by the next run; the audit
//! trail names the command; rolled-back files stay out of sweeps until `cutoverfs sweep`.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::mount::{served, wait_until, Daemon};
use common::s3::S3Server;
use common::*;
use serde_json::Value;

/// The id of the newest sweep batch.
fn last_batch(w: &Work) -> i64 {
    let run = w.cmd_manifest_only("batches", &["--json"]);
    run.assert_code(0);
    let rows: Value = serde_json::from_str(&run.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .max()
        .expect("a batch")
}

fn rollback(w: &Work, extra: &[&str]) -> Run {
    w.cmd_manifest_only("rollback", extra)
}

/// Regular files below `dir`, relative, with their content.
fn files_in(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    dir_contents(dir)
        .into_iter()
        .map(|(p, bytes)| (p.strip_prefix(dir).unwrap().to_path_buf(), bytes))
        .collect()
}

/// How many regular files are below `dir` (without reading them).
fn count_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

/// `cutoverfs log --format json` of one path.
fn audit_of(w: &Work, path: &str) -> Vec<Value> {
    let run = w.cmd_manifest_only("log", &["--format", "json", "--path", path]);
    run.assert_code(0);
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Two sweeps: `old/` in the first batch, `new/` in the second. Returns the second's id.
fn two_batches(w: &Work, per_batch: usize) -> i64 {
    for i in 0..per_batch {
        w.write(&format!("old/o{i}.bin"), &pseudo_random(3000 + i, i as u64));
    }
    w.sweep(&[]).assert_code(0);
    for i in 0..per_batch {
        w.write(
            &format!("new/n{i}.bin"),
            &pseudo_random(4000 + i, 100 + i as u64),
        );
    }
    w.sweep(&[]).assert_code(0);
    last_batch(w)
}

both_engines! {
    fn a_dry_run_changes_nothing_and_a_batch_rolls_back_audited_and_held_until_the_next_sweep() {
        let w = Work::new();
        let batch = two_batches(&w, 3);
        let batch_arg = batch.to_string();
        let src_before = snapshot(&w.src);
        let dest_before = files_in(&w.dest);
        let status_before = w.status();

        let dry = rollback(&w, &["--batch", &batch_arg]);
        dry.assert_code(0);
        assert!(dry.stdout.contains("(dry run)"), "{dry}");
        assert_eq!(dry.count("Would roll back"), 3, "{dry}");
        assert_eq!(dry.count("Dest objects to delete"), 3, "{dry}");
        assert!(dry.stdout.contains("would delete     new/n0.bin"), "{dry}");
        assert!(!dry.stdout.contains("old/"), "{dry}");
        assert_eq!(files_in(&w.dest), dest_before, "a dry run deleted something");
        assert_eq!(w.status()["files"], status_before["files"]);
        assert!(audit_of(&w, "new/n0.bin").iter().all(|r| r["command"] != "rollback"));

        let done = rollback(&w, &["--batch", &batch_arg, "--confirm"]);
        done.assert_code(0);
        assert_eq!(done.count("Rolled back"), 3, "{done}");
        assert_eq!(done.count("Dest objects deleted"), 3, "{done}");
        let dest_now = files_in(&w.dest);
        assert!(dest_now.keys().all(|p| p.starts_with("old")), "{dest_now:?}");
        assert_eq!(dest_now.len(), 3);
        assert_eq!(snapshot(&w.src), src_before, "a local file was touched");
        let status = w.status();
        assert_file_states(&status, &[("verified", 3), ("pending", 3)]);
        assert_eq!(status["rolled_back_held"], 3, "{status}");
        let human = w.cmd_manifest_only("status", &[]);
        assert!(human.stdout.contains("Rolled back:  3 files held"), "{human}");

        let trail = audit_of(&w, "new/n1.bin");
        let last = trail.last().unwrap();
        assert_eq!(last["command"], "rollback", "{trail:?}");
        assert_eq!(last["from"], "verified");
        assert_eq!(last["to"], "pending");
        assert_eq!(
            last["why"].as_str().unwrap(),
            format!("rolled back (--batch {batch})"),
            "{trail:?}"
        );

        // Again: nothing left to do.
        let again = rollback(&w, &["--batch", &batch_arg, "--confirm"]);
        again.assert_code(0);
        assert_eq!(again.count("Rolled back"), 0, "{again}");
        assert_eq!(again.count("Already rolled back"), 3, "{again}");

        // An operator's sweep takes them back into the migration, and says so in the trail.
        w.sweep(&[]).assert_code(0);
        let status = w.status();
        assert_file_states(&status, &[("verified", 6)]);
        assert_eq!(status["rolled_back_held"], 0, "{status}");
        assert_eq!(files_in(&w.dest).len(), 6);
        let trail = audit_of(&w, "new/n1.bin");
        assert!(
            trail.iter().any(|r| r["command"] == "sweep"
                && r["why"] == "released from rollback by a new sweep"),
            "{trail:?}"
        );
    }

    fn purged_and_changed_local_copies_are_refused_and_foreign_objects_stay() {
        let w = Work::new();
        w.write("keep.txt", b"rolled back");
        w.write("purged.txt", b"only at the dest now");
        let changed = w.write("changed.txt", b"original content");
        w.write("grown.txt", b"grows later");
        // Already at the dest before cutoverfs came: not ours.
        w.write("foreign.txt", b"same bytes");
        write_file(&w.dest.join("foreign.txt"), b"same bytes");
        w.write("swapped.txt", b"ours at first");
        w.sweep(&[]).assert_code(0);
        w.cmd("purge", &["--confirm", "--path", "purged.txt"]).assert_code(0);
        // Same size and mtime, other bytes: only the re-hash can tell.
        let mtime = fs::metadata(&changed).unwrap().modified().unwrap();
        fs::write(&changed, b"ORIGINAL CONTENT").unwrap();
        set_times(&changed, SystemTime::now(), mtime);
        fs::write(w.src.join("grown.txt"), b"grows later, and more").unwrap();
        // Someone else's object replaced ours at the key.
        fs::remove_file(w.dest.join("swapped.txt")).unwrap();
        write_file(&w.dest.join("swapped.txt"), b"someone else's");

        let src_before = snapshot(&w.src);
        let run = rollback(&w, &["--all", "--confirm"]);
        run.assert_code(1);
        let line = |path: &str| {
            run.stdout
                .lines()
                .find(|l| l.contains(&format!(" {path}")))
                .unwrap_or_else(|| panic!("no line for {path}\n{run}"))
                .to_string()
        };
        assert!(line("purged.txt").contains("REFUSED") && line("purged.txt").contains("purged"), "{run}");
        assert!(line("changed.txt").contains("REFUSED") && line("changed.txt").contains("SHA-256"), "{run}");
        assert!(line("grown.txt").contains("REFUSED") && line("grown.txt").contains("changed"), "{run}");
        assert!(line("keep.txt").contains("deleted"), "{run}");
        assert!(line("foreign.txt").contains("reset"), "{run}");
        assert!(line("swapped.txt").contains("left (not ours)"), "{run}");
        assert_eq!(run.count("Refused"), 3, "{run}");
        assert_eq!(run.count("Rolled back"), 3, "{run}");
        assert_eq!(run.count("Dest objects deleted"), 1, "{run}");

        assert_eq!(snapshot(&w.src), src_before, "a local file was touched");
        let dest = files_in(&w.dest);
        assert!(!dest.contains_key(Path::new("keep.txt")));
        assert_eq!(dest[Path::new("foreign.txt")], b"same bytes");
        assert_eq!(dest[Path::new("swapped.txt")], b"someone else's");
        assert_eq!(dest[Path::new("purged.txt")], b"only at the dest now");
        assert_eq!(dest[Path::new("changed.txt")], b"original content");
        assert_eq!(dest[Path::new("grown.txt")], b"grows later");
        // The refused files keep their state: the purged one is still served from the dest.
        assert_file_states(&w.status(), &[("verified", 3), ("pending", 3)]);
    }

    fn a_rollback_killed_between_its_steps_is_finished_by_the_next_run() {
        let w = Work::new();
        for i in 0..4 {
            w.write(&format!("f{i}.txt"), format!("file {i}").as_bytes());
        }
        w.sweep(&[]).assert_code(0);
        for (point, path) in [("rollback:recorded", "f0.txt"), ("rollback:deleted", "f1.txt")] {
            let mut cmd = command();
            cmd.env("CUTOVERFS_CRASH_AT", point).args([
                "rollback",
                "--manifest",
                &w.manifest_url(),
                "--path",
                path,
                "--confirm",
            ]);
            let killed = run_command(&mut cmd);
            assert_eq!(killed.code, None, "not killed at {point}\n{killed}");
            // Served locally already; the object, if still there, is still known as ours.
            let status = w.status();
            assert_eq!(state_count(&status, "files", "pending"), 1, "{point}: {status}");
            let finish = rollback(&w, &["--path", "nothing-matches", "--confirm"]);
            finish.assert_code(0);
            assert_eq!(finish.count("Half-done ones finished"), 1, "{finish}");
            assert!(!w.dest.join(path).exists(), "{point}: object left behind");
            assert_eq!(state_count(&w.status(), "files", "pending"), 1);
            w.sweep(&[]).assert_code(0);
            assert!(w.dest.join(path).exists());
        }
    }
}

#[test]
fn kill_9_in_the_middle_of_a_large_rollback_then_a_rerun_finishes_it() {
    let w = Work::new();
    let n = 600;
    for i in 0..n {
        w.write(
            &format!("d{}/f{i}.txt", i % 10),
            format!("content {i}").as_bytes(),
        );
    }
    w.sweep(&[]).assert_code(0);
    // Killed -9 by its own crash point once half of the objects are gone, wherever the
    // machine's speed puts that moment (src/testhook.rs).
    let mut cmd = command();
    cmd.env("CUTOVERFS_CRASH_AT", format!("rollback:deleted#{}", n / 2))
        .args([
            "rollback",
            "--manifest",
            &w.manifest_url(),
            "--all",
            "--confirm",
        ]);
    let killed = run_command(&mut cmd);
    assert_eq!(killed.code, None, "not killed at its crash point\n{killed}");
    let left = count_files(&w.dest);
    assert!(left > 0 && left < n, "{left}");
    // Every file the manifest still calls verified has its object, intact.
    let check = w.cmd_manifest_only("verify", &["--no-progress", "--deep"]);
    check.assert_code(0);
    let status = w.status();
    assert!(
        state_count(&status, "files", "verified") as usize <= left,
        "{status}"
    );

    let rerun = rollback(&w, &["--all", "--confirm"]);
    rerun.assert_code(0);
    assert_eq!(files_in(&w.dest).len(), 0, "{rerun}");
    assert_file_states(&w.status(), &[("pending", n as u64)]);
    let third = rollback(&w, &["--all", "--confirm"]);
    assert_eq!(third.count("Already rolled back"), n as u64, "{third}");
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let w = Work::new();
    w.write("a.txt", b"a");
    w.sweep(&[]).assert_code(0);
    let manifest_before = fs::read(&w.manifest).unwrap();
    let dest_before = files_in(&w.dest);
    for (args, says) in [
        (&[][..], "needs one of"),
        (&["--all", "--failed-only"][..], "only one of"),
        (&["--batch", "1", "--path", "a*"][..], "only one of"),
        (&["--batch", "99"][..], "no batch 99"),
        (&["--batch", "x1"][..], "not a batch id"),
        (&["--path", "a[", "--confirm"][..], "a["),
    ] {
        let run = rollback(&w, args);
        assert_eq!(run.code, Some(2), "{args:?}\n{run}");
        let lines = run.stderr_lines();
        assert_eq!(lines.len(), 1, "{args:?}\n{run}");
        assert!(lines[0].starts_with("cutoverfs: error: "), "{run}");
        assert!(
            lines[0].contains(says),
            "{args:?} should say {says:?}\n{run}"
        );
        assert_eq!(files_in(&w.dest), dest_before);
    }
    let none = run([
        "rollback",
        "--manifest",
        &format!("sqlite://{}", w.root.join("none.db").display()),
        "--all",
    ]);
    assert_eq!(none.code, Some(2), "{none}");
    assert!(none.stderr.contains("no manifest"), "{none}");
    assert!(!w.root.join("none.db").exists());
    assert!(
        fs::read(&w.manifest).unwrap() == manifest_before,
        "the manifest changed"
    );
}

#[test]
fn failed_only_removes_what_cutoverfs_wrote_for_failed_files_and_holds_them() {
    let w = Work::new();
    w.write("a/blocked.txt", b"cannot be copied");
    w.write("ok.txt", b"fine");
    // A file at the dest where directory `a` is needed: a/blocked.txt fails.
    write_file(&w.dest.join("a"), b"not a directory");
    w.sweep(&["--max-retries", "0"]).assert_code(1);
    let run = rollback(&w, &["--failed-only", "--confirm"]);
    run.assert_code(0);
    assert_eq!(run.count("Rolled back"), 1, "{run}");
    assert!(
        run.stdout.contains("reset            a/blocked.txt"),
        "{run}"
    );
    assert_eq!(fs::read(w.dest.join("a")).unwrap(), b"not a directory");
    assert_eq!(fs::read(w.dest.join("ok.txt")).unwrap(), b"fine");
    assert_file_states(&w.status(), &[("verified", 1), ("pending", 1)]);
}

/// Reads every file through the mount in a loop until told to stop, comparing content.
struct Reader {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Reader {
    fn start(mnt: &Path, expected: BTreeMap<PathBuf, Vec<u8>>) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let (mnt, flag, count) = (mnt.to_path_buf(), stop.clone(), reads.clone());
        let thread = std::thread::spawn(move || {
            let mut problems = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for (rel, want) in &expected {
                    match fs::read(mnt.join(rel)) {
                        Ok(got) if &got == want => {}
                        Ok(got) => problems.push(format!(
                            "{}: wrong bytes ({} read)",
                            rel.display(),
                            got.len()
                        )),
                        Err(e) => problems.push(format!("{}: {e}", rel.display())),
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            problems
        });
        Reader {
            stop,
            reads,
            thread,
        }
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The batch's files are read through the mount before, during and after their rollback,
/// with zero errors; the daemon's own sweeper leaves them alone afterwards.
fn rollback_under_a_reader(
    w: &Work,
    dest: &str,
    env: &[(String, String)],
    objects: impl Fn() -> usize,
) {
    let batch = last_batch(w).to_string();
    let big = fs::read(w.src.join(BIG)).unwrap();
    let expected: BTreeMap<PathBuf, Vec<u8>> = files_in(&w.src)
        .into_iter()
        .filter(|(p, _)| p.starts_with("new") && p != Path::new(BIG))
        .collect();
    let before = objects();
    let mnt = w.root.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let args: Vec<OsString> = [
        "--source",
        w.src.to_str().unwrap(),
        "--dest",
        dest,
        "--manifest",
        &w.manifest_url(),
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let daemon = Daemon::start_with_env(&mnt, &args, env);
    daemon.wait_for_scan();
    // The big file's row is cached as verified by the daemon, but only its head is in the
    // kernel's page cache: read after the rollback, the rest must come from somewhere.
    let mut head = vec![0u8; 4096];
    std::io::Read::read_exact(&mut fs::File::open(mnt.join(BIG)).unwrap(), &mut head).unwrap();
    let reader = Reader::start(&mnt, expected.clone());
    wait_until(Duration::from_secs(20), "reads before the rollback", || {
        reader.reads() > 50
    });
    let mut cmd = command();
    cmd.envs(env.iter().map(|(k, v)| (k, v))).args([
        "rollback",
        "--manifest",
        &w.manifest_url(),
        "--batch",
        &batch,
        "--confirm",
    ]);
    let run = run_command(&mut cmd);
    run.assert_code(0);
    assert_eq!(
        run.count("Dest objects deleted"),
        expected.len() as u64 + 1,
        "{run}"
    );
    let read_back = fs::read(mnt.join(BIG)).expect("the big file after its rollback");
    assert!(
        read_back == big,
        "wrong bytes in the big file after its rollback"
    );
    let after_rollback = reader.reads();
    // Past the daemon's row cache (10 s): opens meet the deleted objects first, then the rows.
    std::thread::sleep(Duration::from_secs(11));
    assert!(reader.reads() > after_rollback + 50, "the reader got stuck");
    let problems = reader.finish();
    assert!(
        problems.is_empty(),
        "{} read errors: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
    assert_eq!(
        objects(),
        before - expected.len() - 1,
        "the sweeper copied rolled-back files again"
    );
    let status = w.status();
    assert_eq!(
        state_count(&status, "files", "pending"),
        expected.len() as u64 + 1,
        "{status}"
    );
    let log = daemon.stop();
    assert!(
        served(&log, "opens_dest") > 0,
        "nothing was read from the dest first\n{log}"
    );
    assert!(
        served(&log, "opens_local") > 0,
        "nothing was read locally afterwards\n{log}"
    );
    // A deleted object is no sign of a dest in trouble.
    assert!(!log.contains("dest read failed"), "{log}");
    eprintln!(
        "reads: {} opens from the dest, {} local, {} fallback reads, {} dest opens refused",
        served(&log, "opens_dest"),
        served(&log, "opens_local"),
        served(&log, "fallback_reads"),
        log.matches("dest copy unreadable").count()
    );
}

/// Larger than the kernel's read-ahead.
const BIG: &str = "new/big.bin";

#[test]
fn a_batch_rolls_back_on_a_file_dest_while_a_reader_loops_over_it_through_the_mount() {
    let w = Work::new();
    for i in 0..20 {
        w.write(&format!("old/o{i}.bin"), &pseudo_random(3000 + i, i as u64));
    }
    w.sweep(&[]).assert_code(0);
    for i in 0..20 {
        w.write(
            &format!("new/n{i}.bin"),
            &pseudo_random(70_000 + i, 50 + i as u64),
        );
    }
    w.write(BIG, &pseudo_random(6 << 20, 77));
    w.sweep(&[]).assert_code(0);
    let dest = w.dest_url();
    let dest_dir = w.dest.clone();
    rollback_under_a_reader(&w, &dest, &[], || files_in(&dest_dir).len());
}

#[test]
fn a_batch_rolls_back_on_s3_while_a_reader_loops_over_it_through_the_mount() {
    let server = S3Server::in_process();
    let w = Work::new();
    let dest = server.dest_url("media");
    let sweep = |w: &Work| {
        let mut cmd = command();
        server.apply_env(&mut cmd);
        run_command(cmd.arg("sweep").args([
            "--source",
            w.src.to_str().unwrap(),
            "--dest",
            &dest,
            "--manifest",
            &w.manifest_url(),
            "--no-progress",
        ]))
        .assert_code(0);
    };
    for i in 0..20 {
        w.write(&format!("old/o{i}.bin"), &pseudo_random(3000 + i, i as u64));
    }
    sweep(&w);
    for i in 0..20 {
        w.write(
            &format!("new/n{i}.bin"),
            &pseudo_random(70_000 + i, 50 + i as u64),
        );
    }
    w.write(BIG, &pseudo_random(6 << 20, 77));
    sweep(&w);
    rollback_under_a_reader(&w, &dest, &server.env(), || server.list("media/").len());
}
