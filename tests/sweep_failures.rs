//! Copy failures: retries with backoff, the failed state with its reason, and recovery on the
//! next run; a source that changes while it is copied.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

/// Source `a/b.txt` while the dest holds a regular file at `a`: the directory cannot be made.
fn blocked_workspace() -> Work {
    let w = Work::new();
    w.write("a/b.txt", b"blocked file");
    w.write("c/d.txt", b"fine file");
    write_file(
        &w.dest.join("a"),
        b"i am a file where a directory is needed",
    );
    w
}

both_engines! {
    fn failing_copy_is_retried_then_left_failed_and_succeeds_once_fixed() {
        let w = blocked_workspace();
        let run = w.sweep(&["--max-retries", "2", "--retry-delay", "10ms"]);
        run.assert_code(1);
        assert!(run.stdout.contains("MIGRATION INCOMPLETE"), "{run}");
        assert_eq!(run.count("Failed"), 1, "{run}");
        assert_eq!(run.count("Errors"), 1, "{run}");
        assert_eq!(run.count("Successfully copied"), 1, "{run}");
        assert_eq!(
            fs::read(w.dest.join("a")).unwrap(),
            b"i am a file where a directory is needed"
        );

        let status = w.status();
        assert_file_states(&status, &[("verified", 1), ("failed", 1)]);
        let p = problem(&status, "a/b.txt")
            .unwrap_or_else(|| panic!("a/b.txt not in problems: {status:#}"));
        assert_eq!(p["state"], "failed");
        assert_eq!(p["attempts"], 3, "1 attempt + 2 retries: {p}");
        let reason = p["reason"].as_str().unwrap_or_default();
        let blocker = w.dest.join("a");
        assert!(
            reason.contains(blocker.to_str().unwrap()),
            "the reason names the directory {}: {reason}",
            blocker.display()
        );
        assert!(
            reason.contains("mkdir"),
            "the reason says what failed: {reason}"
        );

        // The human status lists it too.
        let human = w.cmd_manifest_only("status", &[]);
        human.assert_code(0);
        assert!(
            human.stdout.contains("a/b.txt") && human.stdout.contains("failed"),
            "{human}"
        );

        fs::remove_file(w.dest.join("a")).unwrap();
        let fixed = w.sweep(&["--max-retries", "2"]);
        fixed.assert_code(0);
        assert_eq!(fixed.count("Successfully copied"), 1, "{fixed}");
        assert_file_states(&w.status(), &[("verified", 2)]);
        assert_trees_equal(&w.src, &w.dest);
    }
}

both_engines! {
    fn retries_back_off_exponentially() {
        let w = blocked_workspace();
        // 150 ms, then 300 ms, then 600 ms: at least 1.05 s before the file is given up.
        let started = Instant::now();
        let run = w.sweep(&["--max-retries", "3", "--retry-delay", "150ms"]);
        let elapsed = started.elapsed();
        run.assert_code(1);
        let status = w.status();
        assert_eq!(
            problem(&status, "a/b.txt").unwrap()["attempts"],
            4,
            "{status:#}"
        );
        assert!(
            elapsed >= Duration::from_millis(1050),
            "4 attempts with backoff took only {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(20),
            "backoff far too long: {elapsed:?}"
        );
    }
}

both_engines! {
    fn zero_retries_means_one_attempt() {
        let w = blocked_workspace();
        let run = w.sweep(&["--max-retries", "0"]);
        run.assert_code(1);
        let status = w.status();
        assert_eq!(
            problem(&status, "a/b.txt").unwrap()["attempts"],
            1,
            "{status:#}"
        );
    }
}

both_engines! {
    /// Invariant 4: a copy whose source changed while it ran is never marked verified with stale
    /// content. A file grows while sweeps run; once it stops, a last sweep leaves dest == source.
    fn a_source_that_changes_during_the_copy_ends_up_identical() {
        let w = Work::new();
        let growing = w.write("g/growing.bin", &pseudo_random(4 << 20, 1));
        small_tree(&w, 50, 2, 100, 2000, 5);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let path = growing.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
                    f.write_all(&pseudo_random(4096, 1000 + n)).unwrap();
                    n += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        };
        let during = w.sweep(&["--max-retries", "2", "--retry-delay", "10ms"]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(matches!(during.code, Some(0) | Some(1)), "{during}");
        let status = w.status();
        if let Some(p) = problem(&status, "g/growing.bin") {
            assert_eq!(p["state"], "failed", "{p}");
            assert!(
                p["reason"].as_str().unwrap_or_default().contains("changed"),
                "{p}"
            );
        }

        let last = w.sweep(&[]);
        last.assert_code(0);
        assert_file_states(&w.status(), &[("verified", 51)]);
        assert_trees_equal(&w.src, &w.dest);
    }
}
