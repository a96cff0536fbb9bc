//! A cutoverfs daemon for tests: started in the foreground, waited for until the kernel shows
//! the mount, stopped with SIGTERM (or killed) and always unmounted afterwards.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::command;

pub struct Daemon {
    child: Option<Child>,
    /// Set once this daemon's mount is live: only then may dropping it unmount.
    owns_mount: bool,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

/// Whether cutoverfs is mounted exactly at `path` (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|dash| fields.get(dash + 1));
        fields.get(4) == Some(&wanted.as_str()) && fstype == Some(&"fuse.cutoverfs")
    })
}

impl Daemon {
    /// `cutoverfs mount MOUNTPOINT <args> --foreground`; panics with the log if it fails.
    pub fn start(mountpoint: &Path, args: &[OsString]) -> Daemon {
        Daemon::try_start(mountpoint, args).unwrap_or_else(|log| panic!("mount failed:\n{log}"))
    }

    /// Like `start`, with extra environment variables (an S3 server's credentials).
    pub fn start_with_env(
        mountpoint: &Path,
        args: &[OsString],
        env: &[(String, String)],
    ) -> Daemon {
        Daemon::try_start_with_env(mountpoint, args, env)
            .unwrap_or_else(|log| panic!("mount failed:\n{log}"))
    }

    /// Like `start`; Err holds the daemon's output when it exits before the mount is live.
    pub fn try_start(mountpoint: &Path, args: &[OsString]) -> Result<Daemon, String> {
        Daemon::try_start_with_env(mountpoint, args, &[])
    }

    pub fn try_start_with_env(
        mountpoint: &Path,
        args: &[OsString],
        env: &[(String, String)],
    ) -> Result<Daemon, String> {
        let log = mountpoint.with_file_name(format!(
            "{}-{}.log",
            mountpoint.file_name().unwrap().to_string_lossy(),
            fastrand_suffix()
        ));
        let out = fs::File::create(&log).unwrap();
        let child = command()
            .arg("mount")
            .arg(mountpoint)
            .args(args)
            .args(["--foreground", "--retry-delay", "20ms"])
            .env("CUTOVERFS_LOG", "debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn cutoverfs mount");
        let mut daemon = Daemon {
            child: Some(child),
            owns_mount: false,
            mountpoint: mountpoint.to_path_buf(),
            log,
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if is_mounted(mountpoint) && daemon.log_text().contains("mount is live") {
                daemon.owns_mount = true;
                return Ok(daemon);
            }
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                daemon.child = None;
                return Err(format!("exited with {status}\n{}", daemon.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("not mounted after 30 s\n{}", daemon.log_text()))
    }

    /// Waits until the daemon's scan of the source is recorded (it runs after mounting).
    pub fn wait_for_scan(&self) {
        wait_until(Duration::from_secs(30), "the scan", || {
            self.log_text().contains("scan done")
        });
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM; waits for a clean exit and the mount to be gone; returns the log.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let status = wait_for(&mut child, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("daemon did not stop within 60 s\n{}", self.log_text()));
        let log = self.log_text();
        assert!(status.success(), "daemon exited with {status}\n{log}");
        assert!(
            !is_mounted(&self.mountpoint),
            "still mounted after stop\n{log}"
        );
        log
    }

    /// The exit status once the daemon has exited by itself.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// Whether the daemon has exited by itself (its status is kept for `crashed`).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| child.try_wait().unwrap().is_some())
    }

    /// kill -9: the mount stays behind, stale, as after a crash. The returned guard removes it
    /// when dropped, unless something cleaned it up first.
    pub fn kill9(mut self) -> StaleMount {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
        self.owns_mount = false;
        StaleMount(self.mountpoint.clone())
    }
}

impl Daemon {
    /// For a daemon that killed itself (a crash point): waits for it to be gone and returns
    /// the stale mount it left, cleaned up when dropped.
    pub fn crashed(mut self) -> StaleMount {
        let started = Instant::now();
        while self.child.is_some() && self.try_exit().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the daemon did not die\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.owns_mount = false;
        StaleMount(self.mountpoint.clone())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            if wait_for(&mut child, Duration::from_secs(20)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.owns_mount && is_mounted(&self.mountpoint) {
            lazy_unmount(&self.mountpoint);
        }
    }
}

pub struct StaleMount(PathBuf);

impl Drop for StaleMount {
    fn drop(&mut self) {
        let stale = fs::read_dir(&self.0)
            .err()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
        if stale {
            lazy_unmount(&self.0);
        }
    }
}

fn lazy_unmount(path: &Path) {
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(path)
        .status();
}

fn fastrand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: signalling a child we spawned.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn wait_for(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The last line of `log` that contains `marker` (a line the daemon logs at unmount).
fn last_line<'a>(log: &'a str, marker: &str) -> &'a str {
    log.lines()
        .rev()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no '{marker}' line in\n{log}"))
}

/// A counter from the "served by the mount" line the daemon logs at unmount.
pub fn served(log: &str, field: &str) -> u64 {
    let line = last_line(log, "served by the mount");
    let key = format!("{field}=");
    let at = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {field} in {line}"));
    line[at + key.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// How many `op` requests the daemon answered, from the "FUSE requests answered" line it logs at
/// unmount (`op=COUNT/MEANµs ...`); 0 when `op` is not in it.
pub fn answered(log: &str, op: &str) -> u64 {
    let line = last_line(log, "FUSE requests answered");
    let key = format!("{op}=");
    line.split([' ', '"'])
        .find_map(|word| word.strip_prefix(&key))
        .map_or(0, |rest| {
            let count = rest.split('/').next().unwrap();
            count
                .parse()
                .unwrap_or_else(|_| panic!("{op}: {count:?} is not a count in {line}"))
        })
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
