//! `cutoverfs demo`: the whole migration on a generated sample tree, in a temporary directory.
//!
//! The tree looks like seed 000's MEDIA_ROOT. The demo runs plan → mount over the tree → reads
//! through the mount (copy-on-read) → status → sweep → status → a second sweep that copies
//! nothing → a byte-for-byte comparison of the mounted view with the dest → unmount → clean up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::report::{self, PlanArgs, StatusArgs};
use super::sweep::{self, SweepArgs};
use super::{exit, Scope, Target};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Where to build the sample tree (default: a new temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Number of small files in the sample tree.
    #[arg(long, default_value_t = 400)]
    pub files: u32,
    /// Keep the sample tree, dest and manifest afterwards.
    #[arg(long)]
    pub keep: bool,
}

pub async fn run(args: DemoArgs) -> Result<u8> {
    let base = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => std::env::temp_dir().join(format!("cutoverfs-demo-{}", std::process::id())),
    };
    let media = base.join("media");
    let private = base.join("private-media");
    if media.exists() || private.exists() {
        bail!(
            "{} already holds a demo; remove it or pick another --dir",
            base.display()
        );
    }
    let target = Target {
        source: Some(media.clone()),
        dest: Some(format!("file://{}", private.display())),
        manifest: format!("sqlite://{}", base.join("manifest.db").display()),
        s3: Default::default(),
    };
    step(&format!("1. A sample MEDIA_ROOT at {}", media.display()));
    let (files, bytes) = build_sample_tree(&media, args.files)?;
    println!("   {files} files, {}", crate::util::human_bytes(bytes));

    step("2. cutoverfs plan");
    report::plan(PlanArgs {
        target: target.clone(),
        scope: Scope::default(),
        files_from: Default::default(),
        show_paths: 20,
        json: false,
        prices: Default::default(),
    })
    .await?;

    step("3. cutoverfs mount: the application's directory, served through cutoverfs");
    let mut daemon = Daemon::start(&media, &target, &base.join("mount.log"))?;
    println!(
        "   mounted over {} (local fallback, copy-on-read; no sweeper in the daemon here)",
        media.display()
    );
    let read_back = read_some(&media)?;
    println!("   the application read {read_back} files through the mount, served from their local copies");

    step("4. cutoverfs status: the files just read are queued first (copy-on-read)");
    let status_args = StatusArgs {
        target: target.clone(),
        json: false,
        limit: 20,
        watch: false,
        interval: std::time::Duration::from_secs(2),
    };
    report::status(status_args.clone()).await?;

    step("5. cutoverfs sweep: everything else, while the mount keeps serving");
    let sweep_args = SweepArgs {
        target: target.clone(),
        scope: Scope::default(),
        files_from: Default::default(),
        concurrency: None,
        bwlimit: None,
        max_ops: None,
        batch_size: 100,
        max_retries: 3,
        retry_delay: Duration::from_secs(1),
        lease_timeout: Duration::from_secs(60),
        stop_timeout: Duration::from_secs(30),
        dest_timeout: Duration::from_secs(600),
        skip_missing: false,
        dry_run: false,
        no_progress: false,
        progress_interval: Duration::from_secs(10),
        metrics: None,
    };
    let first = sweep::run(sweep_args.clone()).await?;

    step("6. cutoverfs status");
    report::status(status_args).await?;

    step("7. The application keeps working: an upload, a rename and a delete through the mount");
    let upload = media.join("uploads/demo-upload.bin");
    std::fs::create_dir_all(media.join("uploads")).context("mkdir through the mount")?;
    std::fs::write(&upload, pseudo_random(256 * 1024, 77)).context("upload through the mount")?;
    let renamed = media.join("uploads/demo-upload-renamed.bin");
    std::fs::rename(&upload, &renamed).context("rename through the mount")?;
    let doomed = media.join("uploads/demo-deleted.txt");
    std::fs::write(&doomed, b"short-lived").context("write through the mount")?;
    std::fs::remove_file(&doomed).context("unlink through the mount")?;
    println!(
        "   wrote, renamed and deleted files under {}: the data landed in the local tree first",
        media.join("uploads").display()
    );

    step("8. cutoverfs sweep again: only what changed is copied");
    let second = sweep::run(sweep_args).await?;

    step("9. cutoverfs purge --confirm: the local copies of verified files are deleted");
    let before_purge = compare_trees(&media, &private)?;
    let purged = super::purge::run(super::purge::PurgeArgs {
        target: target.clone(),
        path: Vec::new(),
        files_from: Default::default(),
        paranoid: false,
        confirm: true,
    })
    .await?;

    step("10. Every file, as the application sees it, compared byte for byte with its copy");
    let compared = compare_trees(&media, &private)?;
    println!(
        "   {compared} files identical in {} (the same {before_purge} before the purge), now served from there",
        private.display()
    );

    step("11. Unmount");
    let served = daemon.stop()?;
    println!("   {served}");

    if args.keep {
        println!(
            "\nKept {} (media, private-media, manifest.db)",
            base.display()
        );
    } else {
        std::fs::remove_dir_all(&base)
            .with_context(|| format!("cannot clean up {}", base.display()))?;
    }
    let ok =
        first == exit::OK && second == exit::OK && purged == exit::OK && compared == before_purge;
    println!(
        "\nDemo {}",
        if ok {
            "finished: the cutover is complete and verified."
        } else {
            "FAILED"
        }
    );
    Ok(if ok { exit::OK } else { exit::INCOMPLETE })
}

/// Reads every tenth file through the mount, as the application would.
fn read_some(root: &Path) -> Result<u64> {
    let mut read = 0;
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0u64;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                seen += 1;
                if seen % 10 == 0 {
                    std::fs::read(entry.path())?;
                    read += 1;
                }
            }
        }
    }
    Ok(read)
}

/// The daemon, run as `cutoverfs mount ... --foreground` in a child process.
struct Daemon {
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(mountpoint: &Path, target: &Target, log: &Path) -> Result<Daemon> {
        let exe = std::env::current_exe().context("cannot find the cutoverfs executable")?;
        let log_file = std::fs::File::create(log)?;
        let child = std::process::Command::new(exe)
            .arg("mount")
            .arg(mountpoint)
            .arg("--dest")
            .arg(target.dest.as_deref().unwrap_or_default())
            .arg("--manifest")
            .arg(&target.manifest)
            .args(["--no-sweep", "--foreground"])
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("cannot start cutoverfs mount")?;
        let mut daemon = Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        };
        let canonical = std::fs::canonicalize(mountpoint)?;
        let started = std::time::Instant::now();
        loop {
            let live = crate::fuse::mounted_type(&canonical)?
                .is_some_and(|t| t == format!("fuse.{}", crate::fuse::SUBTYPE));
            if live && daemon.log_text().contains("scan done") {
                return Ok(daemon);
            }
            if let Some(child) = daemon.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    daemon.child = None;
                    bail!(
                        "cutoverfs mount exited with {status}:\n{}",
                        daemon.log_text()
                    );
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the mount did not come up within 60 s:\n{}",
                    daemon.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as systemd would send; returns the daemon's closing line.
    fn stop(&mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok(String::new());
        };
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("cutoverfs mount exited with {status}:\n{}", self.log_text());
        }
        Ok(self
            .log_text()
            .lines()
            .find(|l| l.contains("served by the mount"))
            .map(|l| {
                l.split_once("served by the mount")
                    .map_or(l, |(_, rest)| rest)
                    .trim()
                    .to_string()
            })
            .map(|counts| format!("the mount served: {counts}"))
            .unwrap_or_else(|| "unmounted".to_string()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m\n");
    let _ = std::io::stdout().flush();
}

/// Seed 000's layout: expense receipts, contracts and dated documents, plus a few large files.
fn build_sample_tree(root: &Path, small_files: u32) -> Result<(u64, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    let mut write = |rel: String, len: usize, seed: u64| -> Result<()> {
        let path = root.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap_or(root))?;
        std::fs::write(&path, pseudo_random(len, seed))
            .with_context(|| format!("cannot write {}", path.display()))?;
        files += 1;
        bytes += len as u64;
        Ok(())
    };
    write("missions/expenses/R1/M2/receipt.jpg".into(), 48 * 1024, 1)?;
    write(
        "contracts/documents/R5/C10/contract.pdf".into(),
        180 * 1024,
        2,
    )?;
    write("documents/2025/01/19/invoice.pdf".into(), 64 * 1024, 3)?;
    for i in 0..small_files as u64 {
        let rel = match i % 3 {
            0 => format!("missions/expenses/R{}/M{}/receipt-{i}.jpg", i % 7, i % 11),
            1 => format!(
                "contracts/documents/R{}/C{}/contract-{i}.pdf",
                i % 5,
                i % 13
            ),
            _ => format!(
                "documents/2025/{:02}/{:02}/invoice-{i}.pdf",
                1 + i % 12,
                1 + i % 28
            ),
        };
        write(rel, 1024 + (i as usize * 7919) % (96 * 1024), 100 + i)?;
    }
    for (i, mib) in [(0u64, 24usize), (1, 40), (2, 64)] {
        write(
            format!("documents/archive/scan-{i}.tiff"),
            mib << 20,
            10_000 + i,
        )?;
    }
    Ok((files, bytes))
}

/// Cheap, deterministic, incompressible-looking bytes.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn compare_trees(source: &Path, dest: &Path) -> Result<u64> {
    let mut compared = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(source.join(&rel))? {
            let entry = entry?;
            let rel_child = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(rel_child);
                continue;
            }
            let original = crate::util::sha256_of(std::fs::File::open(source.join(&rel_child))?)?;
            let copy = crate::util::sha256_of(
                std::fs::File::open(dest.join(&rel_child))
                    .with_context(|| format!("{} has no copy", rel_child.display()))?,
            )?;
            if original != copy {
                bail!("{} differs from its copy", rel_child.display());
            }
            compared += 1;
        }
    }
    Ok(compared)
}
