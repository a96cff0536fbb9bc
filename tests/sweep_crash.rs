//! Crash safety (DESIGN §4.3, §4.7): a sweep killed at any point resumes cleanly, and a sweep
//! stopped by SIGINT/SIGTERM gives its leases back.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
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
    reader: std::thread::JoinHandle<()>,
    stderr_path: std::path::PathBuf,
}

impl Live {
    fn start(w: &Work, extra: &[&str], stderr_path: &Path) -> Live {
        Live::start_with_env(w, extra, stderr_path, &[])
    }

    fn start_with_env(
        w: &Work,
        extra: &[&str],
        stderr_path: &Path,
        env: &[(String, String)],
    ) -> Live {
        let mut args = vec!["sweep".into()];
        args.extend(w.target());
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let stderr = std::fs::File::create(stderr_path).unwrap();
        let started = Instant::now();
        let mut child = command()
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start sweep");
        let out = child.stdout.take().unwrap();
        let stdout = Arc::new(Mutex::new(String::new()));
        let sink = stdout.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Live {
            child,
            started,
            stdout,
            reader,
            stderr_path: stderr_path.to_path_buf(),
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
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
        let mut odd_rounds_with_work = 0;
        const ROUNDS: u64 = 24;
        for round in 0..ROUNDS {
            let mut rng = XorShift::new(round + 1);
            // Even rounds: killed after a random delay from the start (in start-up, manifest
            // creation, the scan or the first copies; where it lands does not matter). Odd rounds:
            // killed at a random group's copy, published but not recorded or just recorded, so
            // every odd round with work left dies among the copies on any machine.
            let odd = round % 2 == 1;
            if odd {
                // An even round killed early on a busy machine may have left no manifest yet.
                let verified = w
                    .status_if_any()
                    .map_or(0, |status| state_count(&status, "files", "verified"));
                let left = total as u64 - verified;
                let point = if rng.range(0, 2) == 0 { "sweep:copied" } else { "sweep:recorded" };
                let nth = rng.range(1, 4);
                let crash = vec![("CUTOVERFS_CRASH_AT".to_string(), format!("{point}#{nth}"))];
                let run = Live::start_with_env(&w, &CRASH_FLAGS, &log, &crash)
                    .finish(Duration::from_secs(120));
                // Groups hold at most --concurrency files: with this many left, the point is reached.
                let certain = left > 4 * 8;
                odd_rounds_with_work += u64::from(certain);
                match run.code {
                    None => killed_copying += 1,
                    Some(code) => {
                        assert!(!certain, "round {round}: {left} files left and not killed at {point}#{nth}\n{run}");
                        assert!(code == 0 || code == 1, "round {round} ended with {code}\n{run}");
                        finished += 1;
                    }
                }
                continue;
            }
            let delay = Duration::from_millis(rng.range(0, 400));
            let mut live = Live::start(&w, &CRASH_FLAGS, &log);
            std::thread::sleep(delay);
            if live.child.try_wait().unwrap().is_some() {
                finished += 1;
            } else {
                live.child.kill().unwrap(); // SIGKILL
                killed_early += 1;
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
        assert!(
            odd_rounds_with_work >= 5,
            "only {odd_rounds_with_work} rounds were killed among the copies: the tree is too small"
        );
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
        // Killed right after its second group of copies was published, before it was recorded:
        // its batch is open and its leases are held.
        let crash = vec![("CUTOVERFS_CRASH_AT".to_string(), "sweep:copied#2".to_string())];
        let killed = Live::start_with_env(&w, &CRASH_FLAGS, &log, &crash)
            .finish(Duration::from_secs(120));
        assert_eq!(killed.code, None, "not killed at its crash point: {killed}");

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

/// Waits until the log file at `path` holds `text`.
fn wait_until_stderr(path: &Path, text: &str) {
    let started = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            started.elapsed() < HOLD_TIMEOUT,
            "no {text:?} in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
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
    /// SIGINT, then SIGTERM, each while a copy is held in the middle, then a double SIGINT that
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
        for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
            // The signal arrives while a copy is held in the middle: the sweep must finish the
            // copies in flight, record them and stop.
            let hold = Hold::at("copy:read");
            let mut live = Live::start_with_env(&w, &flags, &log, &hold.env());
            hold.wait_reached(|| live.alive());
            live.signal(sig);
            hold.release();
            let run = live.finish(Duration::from_secs(60));
            assert_eq!(run.code, Some(130), "{name}\n{run}");
            assert!(
                run.stdout.contains("MIGRATION INTERRUPTED"),
                "{name}\n{run}"
            );
            assert!(!run.stdout.contains("MIGRATION COMPLETE"), "{name}\n{run}");
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

        // Twice: the second signal ends the process at once, with a copy still held (its lease
        // then expires after 2 s).
        let hold = Hold::at("copy:read");
        let mut live = Live::start_with_env(&w, &flags, &log, &hold.env());
        hold.wait_reached(|| live.alive());
        live.signal(libc::SIGINT);
        // The first signal is seen once the stop message is out; only then is the second one a
        // second one.
        wait_until_stderr(&log, "stopping after the copies in flight");
        live.signal(libc::SIGINT);
        let run = live.finish(Duration::from_secs(60));
        assert_eq!(run.code, Some(130), "double SIGINT: {run}");

        let last = w.cmd("sweep", &flags);
        last.assert_code(0);
        assert_file_states(&w.status(), &[("verified", 604)]);
        assert_trees_equal(&w.src, &w.dest);
        assert!(leftover_temp_files(&w.dest).is_empty());
    }
}
