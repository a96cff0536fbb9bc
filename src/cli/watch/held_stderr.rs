//! Stderr held back while `status --watch` owns the terminal: a log line written there (sqlx
//! warns about every query slower than a second, which a large manifest under a sweep makes)
//! would scribble over the view until the next full redraw. What is written meanwhile is kept
//! and written to the real stderr once the terminal is given back, so nothing is lost.
//!
//! Owns: file descriptor 2 while held, nothing else. It may not touch stdout or the terminal's
//! modes (the view does).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// At most this much held output is kept (a flood of warnings must not grow without bound);
/// the rest is counted.
const KEPT: usize = 256 * 1024;

pub struct HeldStderr {
    /// The real stderr, put back on release.
    saved: OwnedFd,
    collector: Option<std::thread::JoinHandle<(Vec<u8>, u64)>>,
}

impl HeldStderr {
    /// Puts a pipe in place of stderr, drained by a thread.
    pub fn hold() -> std::io::Result<HeldStderr> {
        let mut ends = [-1; 2];
        // SAFETY: pipe2 fills two descriptors we then own; dup and dup2 on descriptors we hold.
        let (read_end, saved) = unsafe {
            if libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (read_end, write_end) =
                (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1]));
            let saved = libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 0);
            if saved < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let saved = OwnedFd::from_raw_fd(saved);
            if libc::dup2(write_end.as_raw_fd(), libc::STDERR_FILENO) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            (read_end, saved)
        };
        let collector = std::thread::Builder::new()
            .name("watch-stderr".into())
            .spawn(move || collect(std::fs::File::from(read_end)))?;
        Ok(HeldStderr {
            saved,
            collector: Some(collector),
        })
    }
}

/// Everything read until the last writer closes (the first `KEPT` bytes), and what was dropped.
fn collect(mut pipe: std::fs::File) -> (Vec<u8>, u64) {
    let (mut kept, mut dropped) = (Vec::new(), 0u64);
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = pipe.read(&mut buf) {
        let room = KEPT.saturating_sub(kept.len()).min(n);
        kept.extend_from_slice(&buf[..room]);
        dropped += (n - room) as u64;
    }
    (kept, dropped)
}

impl Drop for HeldStderr {
    /// The real stderr back (which closes the pipe's last writer), then what was held.
    fn drop(&mut self) {
        // SAFETY: dup2 of a descriptor we own onto stderr.
        unsafe { libc::dup2(self.saved.as_raw_fd(), libc::STDERR_FILENO) };
        let Some((kept, dropped)) = self.collector.take().and_then(|c| c.join().ok()) else {
            return;
        };
        let mut stderr = std::io::stderr();
        let _ = stderr.write_all(&kept);
        if dropped > 0 {
            let _ = writeln!(
                stderr,
                "cutoverfs: ... and {dropped} more bytes of log output while the view was up"
            );
        }
    }
}
