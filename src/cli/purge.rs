//! `cutoverfs purge`: removes local copies of files verified at the dest. A dry run unless
//! `--confirm`.

use anyhow::Result;
use clap::Args;

use super::{exit, stop_on_signals, with_manifest_to_upgrade, Target};
use crate::engine::purge::{purge, PurgeOptions};
use crate::engine::PathFilter;
use crate::manifest::Manifest;
use crate::util::human_bytes;

#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only files matching this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub path: Vec<String>,
    #[command(flatten)]
    pub files_from: super::FilesFrom,
    /// Also re-hash each local copy and compare it with the verified SHA-256.
    #[arg(long)]
    pub paranoid: bool,
    /// Really delete; without it, only show what would be deleted.
    #[arg(long)]
    pub confirm: bool,
}

pub async fn run(args: PurgeArgs) -> Result<u8> {
    let filter = PathFilter::new(&args.path, &[])?.with_list(args.files_from.load()?);
    let resolved = with_manifest_to_upgrade(&args.target, async |existing| {
        if existing.is_none() {
            anyhow::bail!(
                "no manifest at {}: nothing was migrated there, so nothing can be purged",
                args.target.manifest
            );
        }
        args.target.resolve(existing).await
    })
    .await?;
    let manifest = Manifest::open(&resolved.manifest_url).await?;
    manifest.check_pair(&resolved.pair, false).await?;
    let opts = PurgeOptions {
        filter,
        paranoid: args.paranoid,
        confirm: args.confirm,
    };
    let stop = stop_on_signals();
    let report = purge(
        &manifest,
        resolved.store.as_ref(),
        &resolved.source,
        &opts,
        &stop,
    )
    .await?;
    manifest.close().await;
    println!(
        "=== cutoverfs purge{} ===",
        if args.confirm { "" } else { " (dry run)" }
    );
    println!("Verified files checked:   {}", report.checked);
    println!(
        "{}{} ({})",
        if args.confirm {
            "Local copies deleted:     "
        } else {
            "Would delete:             "
        },
        report.purged,
        human_bytes(report.purged_bytes)
    );
    println!("Already without a local copy: {}", report.already_gone);
    println!("Refused:                  {}", report.refused.len());
    for (path, reason) in report.refused.iter().take(20) {
        println!("  {path}: {reason}");
    }
    if report.refused.len() > 20 {
        println!("  ... and {} more", report.refused.len() - 20);
    }
    if !args.confirm {
        println!("Nothing was deleted. Run again with --confirm to delete.");
    }
    if *stop.borrow() {
        return Ok(exit::INTERRUPTED);
    }
    Ok(if report.refused.is_empty() {
        exit::OK
    } else {
        exit::INCOMPLETE
    })
}
