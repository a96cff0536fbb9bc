//! Deployment (DESIGN §9, issue 8): the systemd units pass `systemd-analyze verify`; the daemon
//! started exactly as `cutoverfs@.service` starts it talks the notify protocol (READY=1 only
//! once the mount answers, STOPPING=1 and a clean unmount on SIGTERM, even right after READY);
//! a FUSE mount under a shared mount reaches a process in another mount namespace, as it reaches
//! a container through an `rshared` bind mount.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::{is_mounted, wait_until};
use common::*;

const UNITS: [&str; 6] = [
    "cutoverfs@.service",
    "cutoverfs-sweep@.service",
    "cutoverfs-sweep@.timer",
    "cutoverfs-verify@.service",
    "cutoverfs-verify@.timer",
    "srv-app-media.mount",
];

const SYSTEMD_ANALYZE: &str = "/usr/bin/systemd-analyze";

/// Every unit in systemd/ is listed here (a new unit must be checked too).
#[test]
fn the_units_listed_are_the_units_shipped() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let mut shipped: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    shipped.sort();
    let mut listed: Vec<String> = UNITS.iter().map(|u| u.to_string()).collect();
    listed.sort();
    assert_eq!(shipped, listed);
}

/// The units as shipped, with ExecStart pointing at the binary under test (verify checks that
/// the executable exists), verified with an instance name. Any warning fails: systemd-analyze
/// exits 0 on many mistakes (an unknown Type=, a misspelt key) and only prints them.
#[test]
fn every_unit_passes_systemd_analyze_verify() {
    assert!(
        Path::new(SYSTEMD_ANALYZE).exists(),
        "{SYSTEMD_ANALYZE} is missing: install the `systemd` package (.ci/run does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    for unit in UNITS {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("systemd")
                .join(unit),
        )
        .unwrap();
        assert!(
            text.contains("/usr/local/bin/cutoverfs")
                || unit.ends_with(".timer")
                || unit.ends_with(".mount"),
            "{unit} does not run /usr/local/bin/cutoverfs"
        );
        std::fs::write(
            tmp.path().join(unit),
            text.replace("/usr/local/bin/cutoverfs", bin()),
        )
        .unwrap();
    }
    let instances: Vec<String> = UNITS.iter().map(|u| u.replace("@.", "@media.")).collect();
    let out = Command::new(SYSTEMD_ANALYZE)
        .args(["verify", "--man=no"])
        .args(&instances)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {instances:?}: {}\n{stderr}",
        out.status
    );
}

/// The ExecStart of cutoverfs@.service with %i and ${MOUNTPOINT} filled in.
fn unit_command(config: &Path, mountpoint: &Path) -> Vec<String> {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/cutoverfs@.service"),
    )
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    line.split_whitespace()
        .map(|word| {
            word.replace("/usr/local/bin/cutoverfs", bin())
                .replace("/etc/cutoverfs/%i.toml", config.to_str().unwrap())
                .replace("${MOUNTPOINT}", mountpoint.to_str().unwrap())
        })
        .collect()
}

struct Notified {
    socket: UnixDatagram,
    messages: Vec<String>,
}

impl Notified {
    fn bind(path: &Path) -> Notified {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        Notified {
            socket,
            messages: Vec::new(),
        }
    }

    /// Messages received so far (one datagram may carry several `KEY=VALUE` lines).
    fn poll(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.messages.extend(text.lines().map(str::to_string));
                true
            }
            Err(_) => false,
        }
    }

    fn has(&self, message: &str) -> bool {
        self.messages.iter().any(|m| m == message)
    }
}

fn setup(w: &Work) -> (PathBuf, PathBuf) {
    let mountpoint = w.src.clone();
    w.write("photos/cat.jpg", b"meow");
    let config = w.root.join("media.toml");
    std::fs::write(
        &config,
        format!(
            "dest = {:?}\nmanifest = {:?}\n\n[mount]\nconcurrency = 4\n",
            w.dest_url(),
            w.manifest_url()
        ),
    )
    .unwrap();
    (config, mountpoint)
}

#[test]
fn the_daemon_started_as_the_unit_says_ready_once_mounted_and_unmounts_on_an_immediate_sigterm() {
    let w = Work::new();
    let (config, mountpoint) = setup(&w);
    let socket_path = w.root.join("notify.sock");
    let mut notify = Notified::bind(&socket_path);
    let words = unit_command(&config, &mountpoint);
    let log = std::fs::File::create(w.root.join("daemon.log")).unwrap();
    let mut child = Command::new(&words[0])
        .args(&words[1..])
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("CUTOVERFS_LOG")
        .env_remove("CUTOVERFS_MANIFEST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(w.root.join("daemon.log")).unwrap_or_default();
    let started = Instant::now();
    while !notify.has("READY=1") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no READY=1 within 30 s; got {:?}\n{}",
            notify.messages,
            log_text()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon exited before READY=1\n{}",
            log_text()
        );
        notify.poll();
    }
    // READY=1 means the mount answers now, not soon.
    assert!(
        is_mounted(&mountpoint),
        "READY=1 before the mount\n{}",
        log_text()
    );
    assert_eq!(
        std::fs::read(mountpoint.join("photos/cat.jpg")).unwrap(),
        b"meow"
    );
    // A stop right after READY (systemctl restart) must unmount, not kill.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        notify.poll();
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no exit within 60 s of SIGTERM\n{}",
            log_text()
        );
    };
    while notify.poll() {}
    assert!(status.success(), "exit {status}\n{}", log_text());
    assert!(
        notify.has("STOPPING=1"),
        "no STOPPING=1: {:?}",
        notify.messages
    );
    assert!(!is_mounted(&mountpoint), "still mounted\n{}", log_text());
    assert_eq!(
        std::fs::read(mountpoint.join("photos/cat.jpg")).unwrap(),
        b"meow"
    );
}

/// What `docker run -v /srv/media:/media:rshared` relies on: a mount made on the host under a
/// shared mount appears in a mount namespace created before it (the container's), and that
/// namespace reads files through it; the unmount reaches it too.
#[test]
fn a_mount_under_a_shared_mount_reaches_another_mount_namespace() {
    let w = Work::new();
    let shared = w.root.join("shared");
    std::fs::create_dir_all(shared.join("media")).unwrap();
    let sh = |script: &str| {
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = shared.to_str().unwrap();
    sh(&format!("mount --bind {s} {s} && mount --make-shared {s}"));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _bind = Unmount(shared.clone());
    // The "container": a process in its own mount namespace, a copy of ours taken now.
    let mut container = Command::new("unshare")
        .args(["-m", "--propagation", "unchanged", "sleep", "120"])
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let ns = format!("/proc/{}/ns/mnt", container.id());
    wait_until(Duration::from_secs(10), "the new namespace", || {
        std::fs::read_link(&ns).ok() != std::fs::read_link("/proc/self/ns/mnt").ok()
    });
    assert!(container.try_wait().unwrap().is_none());
    let container = Kill(container);
    let inside = |script: &str| {
        Command::new("nsenter")
            .arg(format!("--mount={ns}"))
            .args(["sh", "-c", script])
            .output()
            .unwrap()
    };

    let media = shared.join("media");
    std::fs::write(media.join("cat.jpg"), b"meow").unwrap();
    let daemon = common::mount::Daemon::start(
        &media,
        &[
            "--dest".into(),
            w.dest_url().into(),
            "--manifest".into(),
            w.manifest_url().into(),
        ],
    );
    let m = media.to_str().unwrap();
    let seen = inside(&format!(
        "grep ' {m} fuse.cutoverfs ' /proc/self/mounts && cat {m}/cat.jpg"
    ));
    let stdout = String::from_utf8_lossy(&seen.stdout);
    assert!(
        seen.status.success() && stdout.ends_with("meow"),
        "the other namespace does not read through the mount: {stdout}{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    daemon.stop();
    let after = inside(&format!("grep -c ' {m} fuse.cutoverfs ' /proc/self/mounts"));
    assert_eq!(
        String::from_utf8_lossy(&after.stdout).trim(),
        "0",
        "the unmount did not reach the other namespace"
    );
    drop(container);
}
