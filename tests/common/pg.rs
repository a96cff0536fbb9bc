//! A throwaway PostgreSQL cluster for the tests, run from the machine's own binaries.
//!
//! One cluster per test binary (`PgCluster::shared`), a fresh database per test
//! (`create_database`); tests that stop and start PostgreSQL start their own
//! (`PgCluster::start`). The cluster listens on 127.0.0.1 (a free port) and on a socket in its
//! temp dir, with a password for TCP, so URLs in tests carry one (and output can be checked for
//! it). As root, initdb and postgres run as the `postgres` user (initdb refuses root) in a temp
//! dir that user owns.
//!
//! Nothing outlives the test process: a watchdog process (its own session) polls the test's pid
//! and, once it is gone (normal end, panic, kill -9), shuts the server down immediately and
//! removes the temp dir. `Drop` does the same for clusters that are dropped.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The password of the `postgres` role on TCP; tests check it never appears in output.
pub const PASSWORD: &str = "pg-Secret-7f3a";

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    server: Mutex<Option<Child>>,
    watchdog: Mutex<Option<Child>>,
    databases: AtomicUsize,
    /// Commits wait for their WAL to be written (synchronous_commit on): an immediate stop
    /// loses none, as in production. Off elsewhere, for speed.
    durable: bool,
}

/// The directory holding initdb, postgres and psql: PATH first, then Debian's layout.
fn bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().map(|d| d.path().join("bin")).collect())
        .unwrap_or_default();
    // Newest major version first.
    debian.sort_by_key(|d| {
        std::cmp::Reverse(
            d.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    for dir in on_path.into_iter().chain(debian) {
        let initdb = dir.join("initdb");
        if let Ok(real) = std::fs::canonicalize(&initdb) {
            let real_dir = real.parent().unwrap().to_path_buf();
            if ["postgres", "psql"]
                .iter()
                .all(|b| real_dir.join(b).is_file())
            {
                return real_dir;
            }
        }
    }
    panic!(
        "no PostgreSQL server binaries (initdb, postgres, psql) found on PATH or in \
         /usr/lib/postgresql/*/bin: the PostgreSQL manifest tests need them. Install Debian's \
         `postgresql` package (apt-get install postgresql), as .ci/run does."
    );
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the fields are copied out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root and there is no `postgres` user to run initdb as (initdb refuses root); \
         install Debian's `postgresql` package or create the user"
    );
    // SAFETY: pw is non-null and points to getpwnam's static record.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A command run as the postgres user when we are root.
fn as_postgres(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = postgres_user() {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.env_remove("PGDATA")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGPASSWORD");
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

impl PgCluster {
    /// The cluster this test binary shares (started on first use).
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(PgCluster::start)
    }

    /// A new cluster of our own, running.
    pub fn start() -> PgCluster {
        PgCluster::start_with(false)
    }

    /// A new cluster of our own whose commits survive `stop_server_immediately`.
    pub fn start_durable() -> PgCluster {
        PgCluster::start_with(true)
    }

    fn start_with(durable: bool) -> PgCluster {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("cutoverfs-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        if let Some((uid, gid)) = postgres_user() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown pg dir");
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if let Some((uid, gid)) = postgres_user() {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let out = as_postgres(bin.join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = PgCluster {
            dir,
            bin,
            port: free_port(),
            server: Mutex::new(None),
            watchdog: Mutex::new(None),
            databases: AtomicUsize::new(0),
            durable,
        };
        cluster.start_server();
        cluster.start_watchdog();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (again, after `stop`) on the same port and data, and waits until it
    /// accepts connections.
    pub fn start_server(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        if let Some((uid, gid)) = postgres_user() {
            let _ =
                std::os::unix::fs::chown(self.dir.path().join("server.log"), Some(uid), Some(gid));
        }
        let child = as_postgres(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                if self.durable {
                    "synchronous_commit=on"
                } else {
                    "synchronous_commit=off"
                },
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=32MB",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start postgres");
        *self.server.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.psql("postgres", "SELECT 1").is_ok() {
                return;
            }
            if let Some(status) = self
                .server
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
            {
                panic!("postgres exited at start ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections within 60 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: open connections are ended) and waits for it to exit.
    pub fn stop_server(&self) {
        if let Some(mut child) = self.server.lock().unwrap().take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }

    /// Stops the server the way a crash would (immediate shutdown: connections are cut, no
    /// checkpoint) and waits for it to exit; `start_server` brings it back with recovery.
    pub fn stop_server_immediately(&self) {
        if let Some(mut child) = self.server.lock().unwrap().take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Ends the server and removes the temp dir once this process is gone, however it ends.
    fn start_watchdog(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             p=$(head -n1 '{data}/postmaster.pid' 2>/dev/null); \
             [ -n \"$p\" ] && kill -QUIT \"$p\" 2>/dev/null; sleep 1; rm -rf '{dir}'",
            pid = std::process::id(),
            data = self.data().display(),
            dir = self.dir.path().display(),
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe; the watchdog must not share our process group
        // (a ^C to the tests must not end it before it has cleaned up).
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        *self.watchdog.lock().unwrap() = Some(cmd.spawn().expect("start the pg watchdog"));
    }

    /// Runs one statement as `postgres` over the socket.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
            ])
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A fresh, empty database; returns its URL (TCP, with the password).
    pub fn create_database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            self.databases.fetch_add(1, Ordering::SeqCst)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop_server();
        if let Some(mut watchdog) = self.watchdog.lock().unwrap().take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}
