//! `cutoverfs rollback`: takes files back to their local copies, deleting the dest objects
//! cutoverfs wrote for them. A dry run unless `--confirm`.

use anyhow::{bail, Result};
use clap::Args;

use super::{exit, stop_on_signals, with_existing_manifest_upgraded, Target};
use crate::engine::rollback::{rollback, Action, RollbackOptions, RollbackReport};
use crate::engine::PathFilter;
use crate::manifest::RollbackSelector;
use crate::util::human_bytes;

#[derive(Debug, Clone, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub target: Target,
    /// Roll back the files whose last copy ran in this sweep batch (`cutoverfs batches`).
    #[arg(long, value_name = "ID")]
    pub batch: Option<String>,
    /// Roll back the files in `failed` or `conflict`: delete what cutoverfs wrote for them.
    #[arg(long)]
    pub failed_only: bool,
    /// Roll back the files matching this glob (repeatable; `*` crosses `/`).
    #[arg(long, value_name = "GLOB")]
    pub path: Vec<String>,
    /// Roll back every file.
    #[arg(long)]
    pub all: bool,
    /// Really roll back; without it, only show what would be done.
    #[arg(long)]
    pub confirm: bool,
}

/// The one selector given, checked before anything is opened.
fn selection(args: &RollbackArgs) -> Result<(RollbackSelector, PathFilter, String)> {
    let given = [
        args.batch.is_some(),
        args.failed_only,
        !args.path.is_empty(),
        args.all,
    ];
    match given.iter().filter(|g| **g).count() {
        0 => bail!("rollback needs one of --batch ID, --failed-only, --path GLOB or --all"),
        1 => {}
        _ => bail!("rollback takes only one of --batch ID, --failed-only, --path GLOB or --all"),
    }
    if let Some(text) = &args.batch {
        let id: i64 = match text.parse() {
            Ok(id) if id > 0 => id,
            _ => {
                bail!("--batch {text:?} is not a batch id (a number shown by `cutoverfs batches`)")
            }
        };
        return Ok((
            RollbackSelector::Batch(id),
            PathFilter::default(),
            format!("--batch {id}"),
        ));
    }
    if args.failed_only {
        return Ok((
            RollbackSelector::FailedOnly,
            PathFilter::default(),
            "--failed-only".into(),
        ));
    }
    if !args.path.is_empty() {
        let filter = PathFilter::new(&args.path, &[])?;
        let label = args
            .path
            .iter()
            .map(|g| format!("--path {g}"))
            .collect::<Vec<_>>()
            .join(" ");
        return Ok((RollbackSelector::All, filter, label));
    }
    Ok((RollbackSelector::All, PathFilter::default(), "--all".into()))
}

pub async fn run(args: RollbackArgs) -> Result<u8> {
    let (selector, filter, label) = selection(&args)?;
    let opts = RollbackOptions {
        selector,
        filter,
        label,
        confirm: args.confirm,
    };
    let stop = stop_on_signals();
    // Only a rollback that acts upgrades an older manifest: a dry run changes nothing.
    let report = with_existing_manifest_upgraded(&args.target, args.confirm, async |manifest| {
        if let RollbackSelector::Batch(id) = opts.selector {
            if manifest.batch(id).await?.is_none() {
                bail!(
                    "no batch {id} in manifest {}; `cutoverfs batches` lists them",
                    manifest.location()
                );
            }
        }
        let resolved = args.target.resolve(Some(manifest)).await?;
        rollback(manifest, &resolved.source, &resolved.store, &opts, &stop).await
    })
    .await?;
    print_report(&report, &opts);
    if *stop.borrow() {
        return Ok(exit::INTERRUPTED);
    }
    let troubles = report.count(&Action::Refused) + report.count(&Action::Unfinished);
    Ok(if troubles == 0 {
        exit::OK
    } else {
        exit::INCOMPLETE
    })
}

fn print_report(report: &RollbackReport, opts: &RollbackOptions) {
    let dry = !opts.confirm;
    println!(
        "=== cutoverfs rollback{} ===",
        if dry { " (dry run)" } else { "" }
    );
    println!("Selection:                {}", opts.label);
    for file in &report.files {
        let verb = match (&file.action, dry) {
            (Action::Deleted, true) => "would delete",
            (Action::Deleted, false) => "deleted",
            (Action::Reset, true) => "would reset",
            (Action::Reset, false) => "reset",
            (Action::LeftNotOurs, _) => "left (not ours)",
            (Action::Refused, _) => "REFUSED",
            (Action::Unfinished, _) => "UNFINISHED",
        };
        match file.action {
            Action::Refused | Action::Unfinished => {
                println!("  {verb:<16} {}: {}", file.path, file.detail)
            }
            _ if file.detail.is_empty() => println!("  {verb:<16} {}", file.path),
            _ => println!("  {verb:<16} {}  (dest object {})", file.path, file.detail),
        }
    }
    println!("Files selected:           {}", report.selected);
    println!(
        "{}{} ({})",
        if dry {
            "Would roll back:          "
        } else {
            "Rolled back:              "
        },
        report.rolled_back,
        human_bytes(report.rolled_back_bytes)
    );
    println!(
        "{}{}",
        if dry {
            "Dest objects to delete:   "
        } else {
            "Dest objects deleted:     "
        },
        report.objects_deleted
    );
    println!(
        "Objects left (not ours):  {}",
        report.count(&Action::LeftNotOurs)
    );
    println!("Half-done ones finished:  {}", report.resumed);
    println!("Already rolled back:      {}", report.already);
    println!("Nothing to roll back:     {}", report.nothing_to_do);
    println!(
        "Refused:                  {}",
        report.count(&Action::Refused)
    );
    println!(
        "Unfinished (run again):   {}",
        report.count(&Action::Unfinished)
    );
    if dry {
        println!("Nothing was changed. Run again with --confirm to roll back.");
    } else if report.rolled_back > 0 {
        println!(
            "Rolled-back files are served from their local copies and left out of sweeps until the next `cutoverfs sweep`."
        );
    }
}
