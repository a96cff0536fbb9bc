//! A throwaway FUSE mount that asks the kernel what it offers, for `cutoverfs doctor`: it
//! mounts an empty file system on a temporary directory, reads the kernel's answer to INIT,
//! and unmounts. It serves nothing and touches nothing else.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use fuser::{Filesystem, InitFlags, KernelConfig, Request};

/// What the kernel offered when a FUSE file system was mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOffer {
    /// FUSE passthrough: the kernel reads local files directly.
    pub passthrough: bool,
}

struct Probe {
    answer: mpsc::Sender<KernelOffer>,
}

impl Filesystem for Probe {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        let _ = self.answer.send(KernelOffer { passthrough });
        Ok(())
    }
}

/// Removes the probe's mountpoint however the probe ends.
struct TempMountpoint(PathBuf);

impl Drop for TempMountpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Mounts an empty FUSE file system on a temporary directory and returns what the kernel
/// offered; an error says why no FUSE file system could be mounted.
pub fn probe_kernel() -> Result<KernelOffer, String> {
    let dir = std::env::temp_dir().join(format!("cutoverfs-doctor-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let dir = TempMountpoint(dir);
    let (answer, offered) = mpsc::channel();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("cutoverfs-doctor".into()),
        fuser::MountOption::RO,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    let session = fuser::Session::new(Probe { answer }, &dir.0, &config)
        .map_err(|e| format!("cannot mount a FUSE file system: {e}"))?;
    let serving = std::thread::spawn(move || session.run());
    let offer = offered.recv_timeout(Duration::from_secs(10));
    let unmounted = detach(&dir.0);
    let _ = serving.join();
    unmounted.map_err(|e| format!("cannot unmount the probe at {}: {e}", dir.0.display()))?;
    offer.map_err(|_| "the kernel did not answer the FUSE handshake within 10 s".to_string())
}

fn detach(path: &Path) -> std::io::Result<()> {
    super::umount2(path, libc::MNT_DETACH)
}
