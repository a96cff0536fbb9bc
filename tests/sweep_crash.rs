//! Crash safety (DESIGN §4.3, §4.7): a sweep killed at any point resumes cleanly, and a sweep
//! stopped by SIGINT/SIGTERM gives its leases back.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const CRASH_FLAGS: [&str; 7] = [
    "--lease-timeout",
    "2s",
    "--concurrency",
    "8",
    "--batch-size",
    "50",
    "--no-progress",
];

/// A running sweep whose stdout is read line by line as it comes.
struct Live {
    child: Child,
    started: Instant,
    stdout: Arc<Mutex<String>>,
    scanned: mpsc::Receiver<()>,
    reader: std::thread::JoinHandle<()>,
    stderr_path: std::path::PathBuf,
}

impl Live {
    fn start(w: &Work, extra: &[&str], stderr_path: &Path) -> Live {
        let mut args = vec!["sweep".into()];
        args.extend(w.target());
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let stderr = std::fs::File::create(stderr_path).unwrap();
        let started = Instant::now();
        let mut child = command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start sweep");
        let out = child.stdout.take().unwrap();
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, scanned) = mpsc::channel();
        let sink = stdout.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("Scanned ") {
                    let _ = tx.send(());
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Live {
            child,
            started,
            stdout,
            scanned,
            reader,
            stderr_path: stderr_path.to_path_buf(),
        }
    }

    /// Waits for the "Scanned ..." line; false if the process ended or the wait timed out.
    fn wait_scanned(&self, timeout: Duration) -> bool {
        self.scanned.recv_timeout(timeout).is_ok()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: a plain kill(2) on our own child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    fn finish(mut self, timeout: Duration) -> Run {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "sweep did not end in {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.reader.join().unwrap();
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        Run {
            code: status.code(),
            stdout,
            stderr,
            elapsed: self.started.elapsed(),
        }
    }
}

/// ~1500 small files (1-20 KiB) and 6 large ones (4-16 MiB).
fn crash_tree(w: &Work) -> usize {
    small_tree(w, 1500, 30, 1024, 20 * 1024, 7);
    let mut rng = XorShift::new(99);
    for i in 0..6 {
        let len = rng.range(4 << 20, 16 << 20) as usize;
        w.write(&format!("big/scan-{i}.tiff"), &pseudo_random(len, 500 + i));
    }
    1506
}

both_engines! {
    fn sweep_killed_at_random_points_resumes_to_a_verified_identical_copy() {
        let w = Work::new();
        let total = crash_tree(&w);
        let started = Instant::now();
        let log = w.root.join("round.stderr");
        let (mut killed_early, mut killed_copying, mut finished) = (0, 0, 0);
        const ROUNDS: u64 = 24;
        for round in 0..ROUNDS {
            let mut rng = XorShift::new(round + 1);
            let delay = Duration::from_millis(rng.range(0, 400));
            // Even rounds: the delay counts from the start (kills land in start-up, manifest creation
            // and the scan). Odd rounds: from the end of the scan (kills land among the copies).
            let after_scan = round % 2 == 1;
            let live = Live::start(&w, &CRASH_FLAGS, &log);
            if after_scan && !live.wait_scanned(Duration::from_secs(60)) {
                let run = live.finish(Duration::from_secs(60));
                panic!("round {round}: the sweep ended before its scan finished\n{run}");
            }
            std::thread::sleep(delay);
            let mut live = live;
            if live.child.try_wait().unwrap().is_some() {
                finished += 1;
            } else {
                live.child.kill().unwrap(); // SIGKILL
                if after_scan {
                    killed_copying += 1
                } else {
                    killed_early += 1
                }
            }
            let run = live.finish(Duration::from_secs(60));
            // Whatever happened, a round that ended by itself must not have hit an error.
            if let Some(code) = run.code {
                assert!(
                    code == 0 || code == 1,
                    "round {round} ended with {code}\n{run}"
                );
            }
        }
        eprintln!(
            "{ROUNDS} rounds in {:.1?}: {killed_early} killed early, {killed_copying} killed while copying, {finished} finished",
            started.elapsed()
        );
        // A debug build copies this tree in seconds, so odd rounds die mid-copy; an optimised build
        // may finish first, which is fine too.
        if cfg!(debug_assertions) {
            assert!(
                killed_copying >= 5,
                "too few rounds were killed while copying"
            );
        }
        assert!(
            leftover_temp_files(&w.dest).is_empty(),
            "temporaries after kills: {:?}",
            leftover_temp_files(&w.dest)
        );

        let mut flags = CRASH_FLAGS.to_vec();
        flags.extend(["--retry-delay", "10ms"]);
        let last = w.cmd("sweep", &flags);
        last.assert_code(0);
        assert!(last.stdout.contains("MIGRATION COMPLETE"), "{last}");
        assert_eq!(last.count("Total files processed"), total as u64, "{last}");
        assert_eq!(last.count("Errors"), 0, "{last}");

        let status = w.status();
        assert_file_states(&status, &[("verified", total as u64)]);
        assert_trees_equal(&w.src, &w.dest);
        assert!(
            leftover_temp_files(&w.dest).is_empty(),
            "temporaries left: {:?}",
            leftover_temp_files(&w.dest)
        );

        eprintln!("crash test took {:.1?}", started.elapsed());
    }
}

both_engines! {
    /// A sweep killed -9 while copying leaves its batch "running"; once a later sweep took its files
    /// over (after the lease expired) and finished, `batches` must not show a dead process's batch as
    /// still running.
    fn batch_of_a_killed_sweep_is_not_left_running_after_a_later_sweep_finished() {
        let w = Work::new();
        small_tree(&w, 200, 4, 1024, 8 * 1024, 11);
        for i in 0..3 {
            w.write(&format!("big/b{i}.bin"), &pseudo_random(6 << 20, 40 + i));
        }
        let log = w.root.join("killed.stderr");
        let mut live = Live::start(&w, &CRASH_FLAGS, &log);
        assert!(live.wait_scanned(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            live.child.try_wait().unwrap().is_none(),
            "the sweep finished before it could be killed"
        );
        live.child.kill().unwrap();
        let killed = live.finish(Duration::from_secs(30));
        assert_eq!(killed.code, None, "{killed}");

        // Right away: the killed sweep's leases are still valid, this one waits them out.
        let last = w.cmd("sweep", &CRASH_FLAGS);
        last.assert_code(0);
        assert_file_states(&w.status(), &[("verified", 203)]);

        let batches = w.cmd_manifest_only("batches", &["--json"]);
        batches.assert_code(0);
        let rows: serde_json::Value = serde_json::from_str(&batches.stdout).unwrap();
        let running: Vec<_> = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["status"] == "running")
            .collect();
        assert!(
            running.is_empty(),
            "batches of a dead sweep still shown as running: {running:#?}"
        );
    }
}

/// A crash right after the manifest file was created and before its schema was written leaves
/// an empty file; the next sweep must carry on, not refuse forever.
#[test]
fn sweep_recovers_when_a_crash_left_an_empty_manifest_file() {
    let w = Work::new();
    w.write("a/x.txt", b"x");
    std::fs::create_dir_all(w.manifest.parent().unwrap()).unwrap();
    std::fs::File::create(&w.manifest).unwrap();
    set_mode(&w.manifest, 0o600);
    let run = w.sweep(&[]);
    run.assert_code(0);
    assert_file_states(&w.status(), &[("verified", 1)]);
}

both_engines! {
    /// SIGINT, then SIGTERM, each after the scan and ~300 ms of copying, then a double SIGINT that
    /// ends the process at once; every stop leaves no file "copying" behind and a re-run finishes.
    fn sigint_and_sigterm_stop_cleanly_and_a_rerun_completes() {
        let w = Work::new();
        small_tree(&w, 600, 10, 1024, 16 * 1024, 3);
        for i in 0..4 {
            w.write(&format!("big/b{i}.bin"), &pseudo_random(6 << 20, 70 + i));
        }
        let log = w.root.join("sig.stderr");
        let flags = [
            "--no-progress",
            "--concurrency",
            "4",
            "--batch-size",
            "20",
            "--lease-timeout",
            "2s",
        ];
        let mut interrupted = 0;
        for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
            let live = Live::start(&w, &flags, &log);
            assert!(
                live.wait_scanned(Duration::from_secs(60)),
                "no scan line before {name}"
            );
            std::thread::sleep(Duration::from_millis(if cfg!(debug_assertions) {
                300
            } else {
                30
            }));
            live.signal(sig);
            let run = live.finish(Duration::from_secs(60));
            match run.code {
                Some(130) => {
                    interrupted += 1;
                    assert!(
                        run.stdout.contains("MIGRATION INTERRUPTED"),
                        "{name}\n{run}"
                    );
                    assert!(!run.stdout.contains("MIGRATION COMPLETE"), "{name}\n{run}");
                }
                Some(0) => assert!(run.stdout.contains("MIGRATION COMPLETE"), "{run}"),
                other => {
                    panic!("{name}: exit {other:?}, expected 130 (or 0 if it finished first)\n{run}")
                }
            }
            let status = w.status();
            assert_eq!(
                state_count(&status, "files", "copying"),
                0,
                "{name} left leases behind: {status:#}"
            );
            assert_eq!(
                state_count(&status, "files", "failed"),
                0,
                "{name}: {status:#}"
            );
            assert!(leftover_temp_files(&w.dest).is_empty());
        }
        if cfg!(debug_assertions) {
            assert!(
                interrupted > 0,
                "the tree was copied before any signal arrived; make it bigger"
            );
        }

        // Twice: the second signal ends the process at once (leases then expire after 2 s).
        let live = Live::start(&w, &flags, &log);
        assert!(live.wait_scanned(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(200));
        live.signal(libc::SIGINT);
        std::thread::sleep(Duration::from_millis(20));
        let ended_already = {
            // The first signal may have let it finish already.
            let mut probe = live;
            let done = probe.child.try_wait().unwrap().is_some();
            if !done {
                probe.signal(libc::SIGINT);
            }
            probe
        };
        let run = ended_already.finish(Duration::from_secs(60));
        assert!(
            matches!(run.code, Some(130) | Some(0)),
            "double SIGINT: {run}"
        );

        let last = w.cmd("sweep", &flags);
        last.assert_code(0);
        assert_file_states(&w.status(), &[("verified", 604)]);
        assert_trees_equal(&w.src, &w.dest);
        assert!(leftover_temp_files(&w.dest).is_empty());
    }
}
