//! Test hooks: named points where a test can kill the process (`crash_point`) or hold it until
//! released (`hold_point`), so a test makes the moment it needs happen instead of hoping a
//! sleep lands there.
//!
//! Owns nothing else, and touches nothing but the environment and the hold directory. The hooks
//! exist only in builds with the `test-hooks` feature, which the test command turns on
//! (`cargo test --features test-hooks`, README); in every other build, `cargo build --release`
//! included, they are empty functions and the environment variables mean nothing.
//!
//! - `CUTOVERFS_CRASH_AT=POINT[#N]`: the process kills itself with SIGKILL the first (or Nth)
//!   time it passes that point, exactly as `kill -9` between two steps would.
//! - `CUTOVERFS_HOLD_AT=POINT[@SUBJECT]` and `CUTOVERFS_HOLD_DIR=DIR`: the first time the point
//!   is reached (for that subject, e.g. a file's path), the process writes the subject to
//!   `DIR/POINT.reached` and waits until `DIR/POINT.release` exists. Points are named
//!   `step:moment` (`copy:read`, `purge:set-aside`); in file names `:` becomes `-`.

/// Kills the process here when `CUTOVERFS_CRASH_AT` names this point (`POINT`, or `POINT#N`
/// for its Nth passage).
#[cfg(feature = "test-hooks")]
pub fn crash_point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WANTED: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    static PASSED: AtomicU64 = AtomicU64::new(0);
    let wanted = WANTED.get_or_init(|| {
        let at = std::env::var("CUTOVERFS_CRASH_AT").ok()?;
        Some(match at.split_once('#') {
            Some((point, nth)) => (point.to_string(), nth.parse().unwrap_or(1)),
            None => (at, 1),
        })
    });
    let Some((point, nth)) = wanted else { return };
    if point == name && PASSED.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        tracing::warn!(
            point = name,
            passage = nth,
            "crash point reached: killing this process"
        );
        // SAFETY: signalling our own process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn crash_point(_name: &str) {}

/// Holds the calling thread here while a test wants it held (see the module comment). Blocks:
/// call it on a thread that may block (a copy's I/O thread), or use `hold_point_async`.
#[cfg(feature = "test-hooks")]
pub fn hold_point(name: &str, subject: &str) {
    if let Some(release) = hold::reached(name, subject) {
        while !release.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        tracing::info!(point = name, subject, "hold point released");
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn hold_point(_name: &str, _subject: &str) {}

/// `hold_point` for async code: waits without taking a runtime thread.
#[cfg(feature = "test-hooks")]
pub async fn hold_point_async(name: &str, subject: &str) {
    if let Some(release) = hold::reached(name, subject) {
        while !release.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::info!(point = name, subject, "hold point released");
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub async fn hold_point_async(_name: &str, _subject: &str) {}

#[cfg(feature = "test-hooks")]
mod hold {
    use std::path::PathBuf;
    use std::sync::Mutex;

    struct Wanted {
        point: String,
        subject: Option<String>,
        dir: PathBuf,
        /// Set once the hold was taken: a point holds once per process.
        taken: bool,
    }

    static WANTED: Mutex<Option<Option<Wanted>>> = Mutex::new(None);

    fn from_env() -> Option<Wanted> {
        let at = std::env::var("CUTOVERFS_HOLD_AT").ok()?;
        let dir = PathBuf::from(std::env::var_os("CUTOVERFS_HOLD_DIR")?);
        let (point, subject) = match at.split_once('@') {
            Some((point, subject)) => (point.to_string(), Some(subject.to_string())),
            None => (at, None),
        };
        Some(Wanted {
            point,
            subject,
            dir,
            taken: false,
        })
    }

    /// Whether this call takes the hold; if so, the file whose existence releases it.
    pub(super) fn reached(name: &str, subject: &str) -> Option<PathBuf> {
        let mut wanted = WANTED.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = wanted.get_or_insert_with(from_env).as_mut()?;
        let matches = wanted.point == name
            && !wanted.taken
            && wanted.subject.as_deref().is_none_or(|s| s == subject);
        if !matches {
            return None;
        }
        wanted.taken = true;
        let file = name.replace(':', "-");
        let reached = wanted.dir.join(format!("{file}.reached"));
        let release = wanted.dir.join(format!("{file}.release"));
        tracing::warn!(
            point = name,
            subject,
            "hold point reached: waiting for the test to release it"
        );
        // Written under a temporary name and renamed, so the test never reads half of it.
        let temp = wanted.dir.join(format!(".{file}.reached.tmp"));
        if let Err(e) =
            std::fs::write(&temp, subject).and_then(|()| std::fs::rename(&temp, &reached))
        {
            tracing::error!(error = %e, "cannot signal the hold point; holding anyway");
        }
        Some(release)
    }
}
