//! `cutoverfs demo`: the whole migration on a generated sample tree, in a temporary directory.
//!
//! The tree looks like seed 000's MEDIA_ROOT. The demo runs plan → sweep → status → a second
//! sweep that copies nothing → a byte-for-byte comparison of both trees, then cleans up.

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
        json: false,
        prices: Default::default(),
    })
    .await?;

    step("3. cutoverfs sweep");
    let sweep_args = SweepArgs {
        target: target.clone(),
        scope: Scope::default(),
        concurrency: None,
        batch_size: 100,
        max_retries: 3,
        retry_delay: Duration::from_secs(1),
        lease_timeout: Duration::from_secs(60),
        dest_timeout: Duration::from_secs(600),
        skip_missing: false,
        dry_run: false,
        no_progress: false,
        progress_interval: Duration::from_secs(10),
    };
    let first = sweep::run(sweep_args.clone()).await?;

    step("4. cutoverfs status");
    report::status(StatusArgs {
        target: target.clone(),
        json: false,
        limit: 20,
    })
    .await?;

    step("5. cutoverfs sweep again: nothing left to copy");
    let second = sweep::run(sweep_args).await?;

    step("6. Every file compared byte for byte with its copy");
    let compared = compare_trees(&media, &private)?;
    println!("   {compared} files identical in {}", private.display());

    if args.keep {
        println!(
            "\nKept {} (media, private-media, manifest.db)",
            base.display()
        );
    } else {
        std::fs::remove_dir_all(&base)
            .with_context(|| format!("cannot clean up {}", base.display()))?;
    }
    let ok = first == exit::OK && second == exit::OK;
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
