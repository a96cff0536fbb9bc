//! `cutoverfs status --watch` (issue 18, point 1): the live view in a real pseudo-terminal, its
//! screen read back through a terminal emulator (vt100): the per-state counts of the manifest,
//! counts that go up while a sweep runs, a failure with its reason; `q` and Ctrl-C quit with 0
//! and give the terminal back. Without a terminal: plain text blocks until SIGTERM. Bad
//! intervals are refused before anything is opened.

mod common;

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// How long a test waits for something to show on the screen: it guards against a view that
/// never shows it, not against a slow machine.
const SCREEN_TIMEOUT: Duration = Duration::from_secs(60);

const ROWS: u16 = 50;
const COLS: u16 = 160;

/// Leaves the alternate screen (xterm's private mode 1049 reset).
const LEAVE_ALTERNATE_SCREEN: &[u8] = b"\x1b[?1049l";
const ENTER_ALTERNATE_SCREEN: &[u8] = b"\x1b[?1049h";

/// `cutoverfs ARGS` on a pseudo-terminal that is its controlling terminal, as in a shell;
/// everything it writes is fed to a vt100 screen.
struct Pty {
    child: Child,
    master: File,
    screen: Arc<Mutex<vt100::Parser>>,
    /// Every byte the program wrote, for the escape sequences themselves.
    written: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    fn spawn(args: &[OsString]) -> Pty {
        let (master, slave) = open_pty();
        let mut cmd = command();
        cmd.args(args)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start cutoverfs on a pty");
        // The parent's copies of the terminal's end go with `cmd`: once the child ends, reads
        // of the master end with EIO instead of waiting forever.
        drop(cmd);
        let size = |n| std::num::NonZeroU16::new(n).unwrap();
        let screen = Arc::new(Mutex::new(vt100::Parser::new(size(ROWS), size(COLS), 0)));
        let written = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let mut master = master.try_clone().unwrap();
            let (screen, written) = (screen.clone(), written.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                // EIO (the child and its terminal are gone) or EOF ends it.
                while let Ok(n @ 1..) = master.read(&mut buf) {
                    screen.lock().unwrap().process(&buf[..n]);
                    written.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        Pty {
            child,
            master,
            screen,
            written,
            reader: Some(reader),
        }
    }

    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Waits until the screen satisfies `ready`; returns what `ready` made of it. Panics with
    /// the screen after `SCREEN_TIMEOUT` or when the program ends first.
    fn wait_for<T>(&mut self, what: &str, mut ready: impl FnMut(&str) -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            let screen = self.contents();
            if let Some(found) = ready(&screen) {
                return found;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("cutoverfs ended ({status}) before the screen showed {what}:\n{screen}");
            }
            assert!(
                started.elapsed() < SCREEN_TIMEOUT,
                "the screen did not show {what} in {SCREEN_TIMEOUT:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `keys` as a user would.
    fn press(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }

    /// Waits for the program to end (bounded) and for its last output; returns the exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > SCREEN_TIMEOUT {
                let _ = self.child.kill();
                panic!(
                    "cutoverfs did not end in {SCREEN_TIMEOUT:?} after it was told to quit:\n{}",
                    self.contents()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        status.code()
    }

    /// The terminal as the program left it: the normal screen, line editing and echo back on.
    fn assert_restored(&self) {
        let written = self.written.lock().unwrap();
        let entered = find_last(&written, ENTER_ALTERNATE_SCREEN)
            .expect("the view never entered the alternate screen");
        let left = find_last(&written, LEAVE_ALTERNATE_SCREEN)
            .expect("the view never left the alternate screen");
        assert!(
            left > entered,
            "the alternate screen was entered again last"
        );
        assert!(
            !self.screen.lock().unwrap().screen().alternate_screen(),
            "still on the alternate screen"
        );
        // The master's termios are the terminal's (Linux hands them to the other end).
        let mut modes: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a termios to fill, on a descriptor we own.
        assert_eq!(
            unsafe { libc::tcgetattr(self.master.as_raw_fd(), &mut modes) },
            0
        );
        assert!(
            modes.c_lflag & libc::ICANON != 0 && modes.c_lflag & libc::ECHO != 0,
            "raw mode was left on (lflag {:o})",
            modes.c_lflag
        );
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pseudo-terminal pair of `ROWS`×`COLS`, close-on-exec: no other test's child may keep this
/// terminal open (its master would never see the end of ours).
fn open_pty() -> (File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: ROWS,
        ws_col: COLS,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out-pointers to two ints and a winsize that outlive the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [master, slave] {
        // SAFETY: fcntl on descriptors just opened.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: both descriptors are ours alone from here.
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// The files count on the first line that starts with `state` (borders and blanks aside): the
/// row of the states table, on the screen and in the plain text alike.
fn files_in(text: &str, state: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line
            .trim_start_matches(|c: char| c == '│' || c.is_whitespace())
            .split_whitespace();
        (words.next()? == state).then(|| words.next()?.parse().ok())?
    })
}

/// Every state's files count as the screen shows it, once all nine are there.
fn counts_in(text: &str) -> Option<Vec<(String, u64)>> {
    STATES
        .iter()
        .map(|state| Some((state.to_string(), files_in(text, state)?)))
        .collect()
}

/// The counts of `status --json`, the same shape.
fn counts_of(status: &serde_json::Value) -> Vec<(String, u64)> {
    STATES
        .iter()
        .map(|state| (state.to_string(), state_count(status, "files", state)))
        .collect()
}

/// A tree of `files` small files under f*/ and `a/b.txt`, which cannot be copied: the dest
/// holds a regular file where its directory must be (tests/sweep_failures.rs).
fn tree_with_a_failure(files: usize) -> Work {
    let w = Work::new();
    small_tree(&w, files, 4, 100, 2000, 18);
    w.write("a/b.txt", b"blocked file");
    write_file(&w.dest.join("a"), b"a file where a directory is needed");
    w
}

fn watch_args(w: &Work, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "status".into(),
        "--watch".into(),
        "--manifest".into(),
        w.manifest_url().into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

#[test]
fn the_screen_shows_the_manifests_counts_and_q_quits_restoring_the_terminal() {
    let w = tree_with_a_failure(30);
    w.sweep(&["--max-retries", "0"]).assert_code(1);
    let expected = counts_of(&w.status());

    let mut pty = Pty::spawn(&watch_args(&w, &["--interval", "200ms"]));
    let shown = pty.wait_for("the count of every state", counts_in);
    assert_eq!(shown, expected, "screen:\n{}", pty.contents());
    let screen = pty.wait_for("the dest probed", |s| {
        s.contains("reachable").then(|| s.to_string())
    });
    for expected in [
        "verified 30 of 31 files",
        "a/b.txt",
        "mkdir",
        "nothing queued; 1 file failed",
        "no sweep or sweeper batch running",
    ] {
        assert!(
            screen.contains(expected),
            "{expected:?} not on the screen:\n{screen}"
        );
    }

    pty.press(b"q");
    assert_eq!(pty.wait_exit(), Some(0), "screen:\n{}", pty.contents());
    pty.assert_restored();
}

#[test]
fn while_a_sweep_runs_the_verified_count_goes_up_and_a_failure_shows_with_its_reason() {
    const FILES: u64 = 60;
    let w = tree_with_a_failure(FILES as usize);
    // The sweep waits at its first copy until the view is up, then copies at 10 files a second
    // (one at a time), for several seconds of redraws.
    let hold = Hold::at("copy:start");
    let mut sweep = command();
    hold.apply(&mut sweep);
    let mut sweep = sweep
        .arg("sweep")
        .args(w.target())
        .args(["--no-progress", "--concurrency", "1", "--max-ops", "10"])
        .args(["--max-retries", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sweep");
    hold.wait_reached(|| sweep.try_wait().unwrap().is_none());

    let mut pty = Pty::spawn(&watch_args(&w, &["--interval", "200ms"]));
    let before = pty.wait_for("the verified count", |s| files_in(s, "verified"));
    assert!(
        before < FILES,
        "nothing was copied yet, but {before} shows verified"
    );
    pty.wait_for("the running sweep", |s| {
        s.contains("sweep on").then_some(())
    });
    hold.release();

    // Each redraw's verified count, until the last file is copied.
    let mut seen = vec![before];
    pty.wait_for("every file verified", |s| {
        let now = files_in(s, "verified")?;
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        (now == FILES).then_some(())
    });
    eprintln!("verified counts seen on the screen: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "the verified count went down: {seen:?}"
    );
    assert!(
        seen.iter().any(|n| *n > before && *n < FILES),
        "the count jumped to the end without a redraw between: {seen:?}"
    );
    let failure = pty.wait_for("the failure of a/b.txt with its reason", |s| {
        let at = s.find("a/b.txt")?;
        s[at..].contains("mkdir").then(|| s.to_string())
    });
    assert!(
        failure.contains(w.dest.join("a").to_str().unwrap()),
        "the reason names the directory that cannot be made:\n{failure}"
    );
    assert!(
        failure.contains("files/s"),
        "no copy rate shown:\n{failure}"
    );

    // Ctrl-C, which raw mode delivers as a key.
    pty.press(b"\x03");
    assert_eq!(pty.wait_exit(), Some(0), "screen:\n{}", pty.contents());
    pty.assert_restored();
    let sweep = wait_capturing(sweep, Instant::now(), COMMAND_TIMEOUT);
    sweep.assert_code(1);
}

#[test]
fn without_a_terminal_it_prints_plain_blocks_until_sigterm() {
    let w = tree_with_a_failure(10);
    w.sweep(&["--max-retries", "0"]).assert_code(1);
    let expected = counts_of(&w.status());

    let mut child = command()
        .args(watch_args(&w, &["--interval", "200ms"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cutoverfs");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Two whole blocks (three headers): one per interval, not one and done.
    let mut text = String::new();
    let started = Instant::now();
    while text.matches("== cutoverfs status --watch").count() < 3 {
        let line = rx
            .recv_timeout(SCREEN_TIMEOUT.saturating_sub(started.elapsed()))
            .unwrap_or_else(|_| panic!("not three blocks in {SCREEN_TIMEOUT:?}:\n{text}"));
        text.push_str(&line);
        text.push('\n');
    }
    let first_block = text.split("\n\n").next().unwrap();
    assert_eq!(counts_in(first_block), Some(expected), "{text}");
    assert!(text.contains("a/b.txt"), "{text}");

    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let run = wait_capturing(child, Instant::now(), SCREEN_TIMEOUT);
    reader.join().unwrap();
    text.extend(rx.try_iter().map(|line| line + "\n"));
    run.assert_code(0);
    assert!(
        !text.contains('\x1b'),
        "escape codes in plain output:\n{text:?}"
    );
    assert!(
        run.stderr.trim().is_empty(),
        "a watch has nothing to say on stderr: {run}"
    );
}

#[test]
fn bad_intervals_are_refused_and_nothing_changes() {
    let w = tree_with_a_failure(3);
    w.sweep(&["--max-retries", "0"]).assert_code(1);
    let state = w.manifest.parent().unwrap().to_path_buf();
    let before = dir_contents(&state);

    for (extra, says) in [
        (&["--watch", "--interval", "0"][..], "at least 100ms"),
        (&["--watch", "--interval", "50ms"], "at least 100ms"),
        (&["--watch", "--interval", "nonsense"], "not a duration"),
        (&["--interval", "1s"], "--watch"),
        (&["--watch", "--json"], "--json"),
    ] {
        let run = w.cmd_manifest_only("status", extra);
        run.assert_code(2);
        assert!(
            run.stderr.contains(says),
            "{extra:?} should say {says:?}: {run}"
        );
        assert!(run.stdout.is_empty(), "{run}");
    }
    assert_eq!(dir_contents(&state), before, "the manifest changed");

    // Refused before a manifest is looked for: none is created.
    let fresh = Work::new();
    let run = fresh.cmd_manifest_only("status", &["--watch", "--interval", "0"]);
    run.assert_code(2);
    assert!(!fresh.manifest.parent().unwrap().exists(), "{run}");
}
