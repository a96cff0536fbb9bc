//! `cutoverfs sweep`: scan, then copy everything in scope, then the summary block of seed 000.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::{
    exit, stop_on_signals, with_manifest_to_upgrade, with_optional_manifest, Scope, Target,
};
use crate::engine::file_list::FileList;
use crate::engine::plan::{make_plan, Fate};
use crate::engine::scan::{scan_patiently, ScanError, ScanStats};
use crate::engine::sweep::{run_sweep, SweepOptions, SweepReport};
use crate::engine::{process_node, Limits, LiveLimits, PathFilter, Progress};
use crate::manifest::{Manifest, State};
use crate::store::Preflight;
use crate::util::{human_bytes, human_duration};

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub scope: Scope,
    #[command(flatten)]
    pub files_from: super::FilesFrom,
    /// Files in flight at once (reads, writes, syncs and requests overlap across them)
    /// [default: 256 to a file:// dest, 512 to S3, where each file waits on a round trip].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: Option<u32>,
    /// Average read rate from the source, per second (e.g. 20MiB); unlimited when not given.
    #[arg(long, value_name = "RATE", value_parser = super::parse_size)]
    pub bwlimit: Option<u64>,
    /// Write requests per second sent to the dest, on average (S3 PUT class: 1 per file, 2 +
    /// parts for a multipart upload; 1 per file to a file:// dest); unlimited when not given.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_ops: Option<u64>,
    /// Files per recorded batch.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Retries of a failed copy, with exponential backoff, before the file is left as failed.
    #[arg(long, default_value_t = 3)]
    pub max_retries: u32,
    /// First retry delay; each further retry waits twice as long.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_delay: Duration,
    /// How long a claimed file stays reserved to this run without renewal; a run that dies
    /// leaves its files to others after this.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub lease_timeout: Duration,
    /// After SIGTERM or Ctrl-C, how long copies in flight may take to finish; then they are
    /// abandoned and redone by a later run (a dest that stalls cannot hold a stop up longer).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stop_timeout: Duration,
    /// How long the dest may stay unreachable before the sweep stops (copies pause meanwhile;
    /// a re-run resumes).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub dest_timeout: Duration,
    /// Missing source files are reported but are not errors.
    #[arg(long)]
    pub skip_missing: bool,
    /// Show what would happen; write nothing (not even the manifest).
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// Interval of progress log lines when there is no terminal (0 for none).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub progress_interval: Duration,
    /// Serve Prometheus metrics on http://ADDR/metrics while the sweep runs (e.g.
    /// 127.0.0.1:9464); see docs/metrics.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

pub async fn run(args: SweepArgs) -> Result<u8> {
    // Read once: a reload (SIGHUP) keeps it, and stdin can be read only once.
    let list = args.files_from.load()?;
    let filter = args.scope.filter()?.with_list(list.clone());
    if args.dry_run {
        return dry_run(&args, &filter).await;
    }
    // Everything is checked before anything is created.
    let metrics_listener = args
        .metrics
        .as_deref()
        .map(crate::metrics::bind)
        .transpose()?;
    let mut resolved = with_manifest_to_upgrade(&args.target, async |existing| {
        let resolved = args.target.resolve(existing).await?;
        resolved.store.preflight(Preflight::ReadWrite).await?;
        Ok(resolved)
    })
    .await?;
    let metrics = crate::metrics::Metrics::new(crate::metrics::Role::Sweep);
    if metrics_listener.is_some() {
        resolved.store =
            crate::store::TimedStore::wrap(resolved.store, metrics.store_calls.clone());
    }
    let manifest = Manifest::open(&resolved.manifest_url).await?;
    manifest.check_pair(&resolved.pair, true).await?;
    resolved.store.prepare().await?;

    print_header(
        &args,
        &resolved.pair.source,
        &resolved.pair.dest,
        manifest.location(),
        &filter,
    );
    let stop = stop_on_signals();
    let dest = resolved.pair.dest.clone();
    let limits = LiveLimits::new(live_limits(&args, &dest, &list)?);
    super::reload::on_sighup(
        limits.clone(),
        other_settings(&args),
        move |command| match command {
            super::Command::Sweep(args) => Ok(super::reload::Reread {
                limits: live_limits(&args, &dest, &list)?,
                others: other_settings(&args),
            }),
            _ => anyhow::bail!("the config file no longer starts a sweep"),
        },
    );
    let node = process_node();
    manifest.close_abandoned_batches(&node).await?;
    crate::engine::repair::repair_removals(&manifest, &resolved.source, &resolved.store).await?;
    crate::engine::purge::finish_interrupted(&manifest, &resolved.source).await?;
    let scan = match scan_patiently(
        &manifest,
        resolved.source.clone(),
        resolved.store.clone(),
        &stop,
    )
    .await
    {
        Ok(stats) => stats,
        Err(ScanError::Interrupted) => {
            println!("Interrupted during the scan; nothing was copied. Run the same command again to resume.");
            return Ok(exit::INTERRUPTED);
        }
        Err(ScanError::Manifest(e)) => return Err(e.into()),
    };
    print_scan(&scan);
    let requeued = manifest.requeue_for_new_sweep().await?;
    release_rollbacks(&manifest, &filter).await?;
    if requeued > 0 {
        tracing::info!(
            files = requeued,
            "failed and conflicting files get a fresh set of attempts"
        );
    }

    let progress = Progress::start("Migrating", args.no_progress, args.progress_interval);
    let (todo_files, todo_bytes) = to_do(&manifest, &filter).await?;
    progress.set_totals(todo_files, todo_bytes);
    if let Some(listener) = metrics_listener {
        crate::metrics::serve(listener, metrics.clone())?;
        super::count_for_metrics(manifest.clone(), metrics.clone());
        progress.attach_metrics(metrics);
    }
    let opts = SweepOptions {
        limits,
        batch_size: args.batch_size as usize,
        max_retries: args.max_retries,
        retry_delay: args.retry_delay,
        lease: args.lease_timeout,
        node,
        command: "sweep".into(),
        dest_timeout: args.dest_timeout,
        keep_running: None,
        on_verified: None,
        requests_only: false,
        stop_grace: args.stop_timeout,
    };
    let report = run_sweep(
        &manifest,
        resolved.source.clone(),
        resolved.store.clone(),
        &opts,
        progress.clone(),
        &stop,
    )
    .await?;
    progress.finish();
    // The scope in force at the end (SIGHUP may have changed it).
    let filter = opts.limits.get().filter.clone();
    let code = print_summary(&manifest, &filter, &report, &scan, args.skip_missing).await?;
    manifest.close().await;
    Ok(code)
}

/// The settings SIGHUP re-reads (see `reload`); the file list is the one read at start.
fn live_limits(args: &SweepArgs, dest: &str, list: &Option<Arc<FileList>>) -> Result<Limits> {
    Ok(Limits {
        concurrency: args.concurrency.unwrap_or(default_concurrency(dest)) as usize,
        bwlimit: args.bwlimit,
        max_ops: args.max_ops,
        filter: args.scope.filter()?.with_list(list.clone()),
    })
}

/// The other settings, to tell when a reload sees them changed (they need a restart).
fn other_settings(args: &SweepArgs) -> String {
    let mut rest = args.clone();
    rest.concurrency = None;
    rest.bwlimit = None;
    rest.max_ops = None;
    rest.scope = super::Scope::default();
    format!("{rest:?}")
}

fn default_concurrency(dest: &str) -> u32 {
    if dest.starts_with("s3://") {
        512
    } else {
        256
    }
}

async fn to_do(manifest: &Manifest, filter: &PathFilter) -> Result<(u64, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    for file in manifest.files().await? {
        if matches!(file.state, State::Pending | State::Failed | State::Copying)
            && filter.matches(&file.path)
        {
            files += 1;
            bytes += file.size;
        }
    }
    Ok((files, bytes))
}

fn print_header(args: &SweepArgs, source: &str, dest: &str, manifest: &str, filter: &PathFilter) {
    println!("=== cutoverfs sweep ===");
    println!();
    println!("Source:                   {source}");
    println!("Destination:              {dest}");
    println!("Manifest:                 {manifest}");
    println!(
        "Dry run:                  {}",
        if args.dry_run { "True" } else { "False" }
    );
    println!(
        "Skip missing:             {}",
        if args.skip_missing { "True" } else { "False" }
    );
    println!("Filter:                   {}", filter.describe());
    println!();
}

fn print_scan(scan: &ScanStats) {
    println!(
        "Scanned {} files ({}) and {} directories in {} ({:.0} entries/s): {} new, {} changed, {} missing, {} unsupported",
        scan.files,
        human_bytes(scan.bytes),
        scan.dirs,
        human_duration(scan.elapsed),
        scan.rate(),
        scan.new,
        scan.changed,
        scan.missing,
        scan.unsupported
    );
    if scan.unreadable_dirs > 0 {
        println!(
            "  [WARN] {} directories could not be read; see the log",
            scan.unreadable_dirs
        );
    }
    println!();
}

/// Counts in scope, from the manifest, after the run.
#[derive(Default)]
struct InScope {
    files: u64,
    verified: u64,
    missing: Vec<String>,
    unsupported: u64,
    conflicts: u64,
    failed: u64,
    unfinished: u64,
}

async fn in_scope(manifest: &Manifest, filter: &PathFilter) -> Result<InScope> {
    let mut counts = InScope::default();
    let files = manifest.files().await?;
    let mut present = std::collections::HashSet::new();
    for file in files.iter().filter(|f| filter.matches(&f.path)) {
        counts.files += 1;
        if file.state != State::Deleted {
            present.insert(file.path.as_str());
        }
        match file.state {
            State::Verified => counts.verified += 1,
            State::Missing => counts.missing.push(file.path.clone()),
            State::Unsupported => counts.unsupported += 1,
            State::Conflict => counts.conflicts += 1,
            State::Failed => counts.failed += 1,
            State::Pending | State::Copying | State::Copied => counts.unfinished += 1,
            State::Deleted => counts.files -= 1,
        }
    }
    let dangling = dangling(filter, &present);
    counts.files += dangling.len() as u64;
    counts.missing.extend(dangling);
    counts.missing.sort_unstable();
    Ok(counts)
}

/// Listed paths in the globs' scope that no file of the manifest has (the scan found no file
/// there, now or before): what the application references but the tree lacks.
fn dangling(filter: &PathFilter, present: &std::collections::HashSet<&str>) -> Vec<String> {
    let Some(list) = filter.list() else {
        return Vec::new();
    };
    list.paths()
        .filter(|p| !present.contains(p) && filter.matches_globs(p))
        .map(str::to_string)
        .collect()
}

async fn print_summary(
    manifest: &Manifest,
    filter: &PathFilter,
    report: &SweepReport,
    _scan: &ScanStats,
    skip_missing: bool,
) -> Result<u8> {
    let counts = in_scope(manifest, filter).await?;
    for path in counts.missing.iter().take(20) {
        let tag = if skip_missing { "SKIP" } else { "MISSING" };
        println!("  [{tag}] Source file does not exist: {path}");
    }
    if counts.missing.len() > 20 {
        let lister = if filter.list().is_some() {
            "cutoverfs plan --files-from ... --show-paths all"
        } else {
            "cutoverfs status"
        };
        println!(
            "  ... and {} more ({lister} lists them)",
            counts.missing.len() - 20
        );
    }
    let missing = counts.missing.len() as u64;
    let errors = counts.failed + counts.conflicts + if skip_missing { 0 } else { missing };
    let rate = report.copied_bytes as f64 / report.elapsed.as_secs_f64().max(1e-3);
    println!();
    println!("=== Migration Summary ===");
    println!("Total files processed:    {}", counts.files);
    println!("Successfully copied:      {}", report.copied);
    println!(
        "Already exist:            {}",
        counts.verified.saturating_sub(report.copied)
    );
    println!(
        "Skipped (missing):        {}",
        if skip_missing { missing } else { 0 }
    );
    println!("Skipped (unsupported):    {}", counts.unsupported);
    if !skip_missing {
        println!("Missing:                  {missing}");
    }
    println!("Conflicts:                {}", counts.conflicts);
    println!("Failed:                   {}", counts.failed);
    if counts.unfinished > 0 {
        println!("Not finished:             {}", counts.unfinished);
    }
    println!("Errors:                   {errors}");
    println!(
        "Bytes copied:             {}",
        human_bytes(report.copied_bytes)
    );
    println!(
        "Duration:                 {} ({}/s, {} batches)",
        human_duration(report.elapsed),
        human_bytes(rate as u64),
        report.batches
    );
    println!();
    if report.interrupted {
        println!("MIGRATION INTERRUPTED - run the same command again to resume");
        return Ok(exit::INTERRUPTED);
    }
    if let Some(why) = &report.dest_unavailable {
        println!(
            "MIGRATION STOPPED - {why}; nothing is lost: run the same command again to resume"
        );
        eprintln!("cutoverfs: error: {why}");
        return Ok(exit::INCOMPLETE);
    }
    if errors > 0 || counts.unfinished > 0 {
        println!("MIGRATION INCOMPLETE - `cutoverfs status` lists the files and reasons");
        return Ok(exit::INCOMPLETE);
    }
    println!("MIGRATION COMPLETE");
    Ok(exit::OK)
}

async fn dry_run(args: &SweepArgs, filter: &PathFilter) -> Result<u8> {
    let url = args.target.manifest_url()?;
    let (plan, resolved, location) = with_optional_manifest(&args.target, async |existing| {
        let resolved = args.target.resolve(existing).await?;
        resolved.store.preflight(Preflight::ReadOnly).await?;
        let location = existing.map_or_else(
            || format!("{url} (not created by a dry run)"),
            |m| m.location().to_string(),
        );
        let plan = make_plan(
            existing,
            resolved.source.clone(),
            resolved.store.clone(),
            filter,
            0,
        )
        .await?;
        Ok((plan, resolved, location))
    })
    .await?;
    print_header(
        args,
        &resolved.pair.source,
        &resolved.pair.dest,
        &location,
        filter,
    );
    println!("DRY RUN MODE - No files will be modified");
    println!();
    let missing = plan.count(Fate::Missing).files;
    let errors = plan.count(Fate::Conflict).files + if args.skip_missing { 0 } else { missing };
    println!("=== Migration Summary ===");
    println!("Total files processed:    {}", plan.files.files);
    println!("Successfully copied:      {}", plan.count(Fate::Copy).files);
    println!(
        "Already exist:            {}",
        plan.count(Fate::Verified).files + plan.count(Fate::AlreadyThere).files
    );
    println!(
        "Skipped (missing):        {}",
        if args.skip_missing { missing } else { 0 }
    );
    println!(
        "Skipped (unsupported):    {}",
        plan.count(Fate::Unsupported).files
    );
    if !args.skip_missing {
        println!("Missing:                  {missing}");
    }
    println!(
        "Conflicts:                {}",
        plan.count(Fate::Conflict).files
    );
    println!("Errors:                   {errors}");
    println!(
        "Bytes to copy:            {}",
        human_bytes(plan.count(Fate::Copy).bytes)
    );
    println!(
        "Estimated duration:       {} ({})",
        human_duration(plan.estimate()),
        plan.estimate_basis
    );
    println!();
    println!("DRY RUN COMPLETE - No files were actually modified");
    Ok(exit::OK)
}

/// An operator's sweep takes rolled-back files in its scope into the migration again (the
/// daemon's own sweeper never does: a rollback holds until someone sweeps on purpose).
async fn release_rollbacks(manifest: &Manifest, filter: &PathFilter) -> Result<()> {
    let held: Vec<String> = manifest
        .rolled_back_paths()
        .await?
        .into_iter()
        .filter(|path| filter.matches(path))
        .collect();
    let released = manifest.release_rollbacks(&held).await?;
    if released > 0 {
        tracing::info!(files = released, "rolled-back files are migrated again");
    }
    Ok(())
}
