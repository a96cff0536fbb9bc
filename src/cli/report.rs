//! Read-only commands: `plan`, `status`, `batches`, `batch`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use super::{exit, with_existing_manifest, with_optional_manifest, Scope, Target};
use crate::engine::plan::{make_plan, Fate, ListReport, Plan, Prices};
use crate::manifest::{BatchRow, Manifest, State};
use crate::util::{human_bytes, human_duration};

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub scope: Scope,
    #[command(flatten)]
    pub files_from: super::FilesFrom,
    /// With --files-from: how many orphan and dangling paths to name, each (the first in path
    /// order), or `all`.
    #[arg(long, value_name = "N", default_value = "20", value_parser = parse_count_or_all)]
    pub show_paths: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub prices: PriceArgs,
}

/// A number, or `all` for no limit.
fn parse_count_or_all(text: &str) -> Result<usize, String> {
    if text == "all" {
        return Ok(usize::MAX);
    }
    text.parse()
        .map_err(|_| format!("{text:?} is neither a number nor `all`"))
}

/// Object store prices for the cost estimate (default: AWS S3 Standard, as in seed 004).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cost estimate (S3 dests)")]
pub struct PriceArgs {
    /// Storage price per GB and month.
    #[arg(long, value_name = "USD", default_value_t = 0.023)]
    pub price_storage_gb_month: f64,
    /// Price per 1,000 PUT, COPY, POST or LIST requests.
    #[arg(long, value_name = "USD", default_value_t = 0.005)]
    pub price_put_per_1000: f64,
    /// Price per 1,000 GET or HEAD requests.
    #[arg(long, value_name = "USD", default_value_t = 0.0004)]
    pub price_get_per_1000: f64,
}

impl Default for PriceArgs {
    fn default() -> Self {
        PriceArgs {
            price_storage_gb_month: 0.023,
            price_put_per_1000: 0.005,
            price_get_per_1000: 0.0004,
        }
    }
}

impl PriceArgs {
    fn prices(&self) -> Prices {
        Prices {
            storage_gb_month: self.price_storage_gb_month,
            put_per_1000: self.price_put_per_1000,
            get_per_1000: self.price_get_per_1000,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print one JSON object: `files` and `bytes` map every state to a number.
    #[arg(long)]
    pub json: bool,
    /// How many problem files to list (with --watch: the most recent, 20 at most).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// A live view that redraws in place until `q` or Ctrl-C: files and bytes per state, copy
    /// rate and ETA over the last minute, copy-on-read queue, dest health, recent failures. When
    /// stdout is not a terminal, a plain text block per interval until SIGINT or SIGTERM.
    #[arg(long, conflicts_with = "json")]
    pub watch: bool,
    /// With --watch: how often to read the manifest and redraw (at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = super::watch::parse_interval, requires = "watch")]
    pub interval: std::time::Duration,
}

#[derive(Debug, Clone, Args)]
pub struct BatchesArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// The batch number, as `cutoverfs batches` lists it.
    pub id: i64,
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub json: bool,
}

pub async fn plan(args: PlanArgs) -> Result<u8> {
    let filter = args.scope.filter()?.with_list(args.files_from.load()?);
    let stop = super::stop_on_signals();
    let (plan, resolved) = with_optional_manifest(&args.target, async |existing| {
        let resolved = args.target.resolve(existing).await?;
        resolved
            .store
            .preflight(crate::store::Preflight::ReadOnly)
            .await?;
        let plan = make_plan(
            existing,
            resolved.source.clone(),
            resolved.store.clone(),
            &filter,
            args.show_paths,
        );
        // A plan changes nothing: stopped, it is simply not finished (the manifest is closed
        // on the way out all the same).
        let plan = match crate::engine::unless_stopped(&stop, plan).await {
            Some(plan) => Some(plan?),
            None => None,
        };
        Ok((plan, resolved))
    })
    .await?;
    let Some(plan) = plan else {
        eprintln!("cutoverfs plan: stopped before the plan was complete");
        return Ok(exit::INTERRUPTED);
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan_json(
                &plan,
                &resolved.pair.source,
                &resolved.pair.dest,
                &args.prices.prices(),
            ))?
        );
        return Ok(exit::OK);
    }
    println!("Plan: {} -> {}", resolved.pair.source, resolved.pair.dest);
    println!(
        "Scope: {}   ({} files, {}, {} directories)",
        filter.describe(),
        plan.files.files,
        human_bytes(plan.files.bytes),
        plan.dirs
    );
    println!();
    println!("{:<14} {:>10} {:>12}", "state", "files", "bytes");
    for (state, totals) in &plan.by_state {
        println!(
            "{:<14} {:>10} {:>12}",
            state.as_str(),
            totals.files,
            human_bytes(totals.bytes)
        );
    }
    println!();
    println!("{:<14} {:>10} {:>12}", "a sweep would", "files", "bytes");
    for (fate, totals) in &plan.by_fate {
        println!(
            "{:<14} {:>10} {:>12}",
            fate_label(*fate),
            totals.files,
            human_bytes(totals.bytes)
        );
    }
    println!();
    println!(
        "{:<30} {:>10} {:>12} {:>10} {:>12}",
        "top-level folder", "files", "bytes", "to copy", "copy bytes"
    );
    for (folder, (all, to_copy)) in &plan.by_folder {
        println!(
            "{:<30} {:>10} {:>12} {:>10} {:>12}",
            folder,
            all.files,
            human_bytes(all.bytes),
            to_copy.files,
            human_bytes(to_copy.bytes)
        );
    }
    if let Some(report) = &plan.files_from {
        print_list_report(report);
    }
    println!();
    println!(
        "Estimated duration: {} ({})",
        human_duration(plan.estimate()),
        plan.estimate_basis
    );
    if bills_requests(&resolved.pair.dest) {
        let prices = args.prices.prices();
        let cost = plan.cost(&prices);
        println!(
            "Estimated cost:     ${} once for {} write and {} read requests; ${} a month to store {} \
             (at ${}/GB-month, ${}/1k writes, ${}/1k reads; set with --price-*)",
            usd(cost.requests_once),
            plan.requests.put,
            plan.requests.get,
            usd(cost.storage_month),
            human_bytes(plan.files.bytes),
            prices.storage_gb_month,
            prices.put_per_1000,
            prices.get_per_1000,
        );
    }
    Ok(exit::OK)
}

/// What the file list and the tree disagree on, with the first paths of each side.
fn print_list_report(report: &ListReport) {
    println!();
    println!(
        "File list {}: {} paths; the list and the tree disagree on:",
        report.list, report.listed
    );
    println!(
        "  Orphans (in the tree, not listed):    {:>10} files {:>12}",
        report.orphans.files,
        human_bytes(report.orphans.bytes)
    );
    println!(
        "  Dangling (listed, no file):           {:>10} files {:>12}  (bytes as last recorded; --skip-missing skips them)",
        report.dangling.files,
        human_bytes(report.dangling.bytes)
    );
    for (label, named) in [("orphan", &report.orphans), ("dangling", &report.dangling)] {
        for path in &named.paths {
            println!("  [{label}] {path}");
        }
        let unnamed = named.files - named.paths.len() as u64;
        if unnamed > 0 {
            println!("  ... and {unnamed} more {label} paths (--show-paths N or all)");
        }
    }
}

/// Cents for real sums, more digits for the small ones a test migration costs.
fn usd(amount: f64) -> String {
    if amount >= 1.0 || amount == 0.0 {
        format!("{amount:.2}")
    } else {
        format!("{amount:.4}")
    }
}

fn bills_requests(dest: &str) -> bool {
    dest.starts_with("s3://")
}

fn fate_label(fate: Fate) -> &'static str {
    match fate {
        Fate::Copy => "copy",
        Fate::Verified => "done already",
        Fate::AlreadyThere => "find it there",
        Fate::Conflict => "conflict",
        Fate::Missing => "find missing",
        Fate::Unsupported => "skip",
        Fate::Other => "other",
    }
}

fn plan_json(plan: &Plan, source: &str, dest: &str, prices: &Prices) -> serde_json::Value {
    let mut value = serde_json::to_value(plan).unwrap_or_default();
    value["source"] = json!(source);
    value["dest"] = json!(dest);
    if bills_requests(dest) {
        value["cost"] = json!({"prices": prices, "estimate_usd": plan.cost(prices)});
    }
    value["by_folder"] = plan
        .by_folder
        .iter()
        .map(|(folder, (all, to_copy))| (folder.clone(), json!({"files": all.files, "bytes": all.bytes, "copy_files": to_copy.files, "copy_bytes": to_copy.bytes})))
        .collect::<serde_json::Map<_, _>>()
        .into();
    value
}

pub async fn status(args: StatusArgs) -> Result<u8> {
    with_existing_manifest(&args.target, async |manifest| {
        // A source or dest given must be the manifest's own, or the report would mislead.
        if args.target.source.is_some() || args.target.dest.is_some() {
            args.target.resolve(Some(manifest)).await?;
        }
        if args.watch {
            return super::watch::run(manifest, &args).await;
        }
        status_of(manifest, &args).await
    })
    .await
}

async fn status_of(manifest: &Manifest, args: &StatusArgs) -> Result<u8> {
    let pair = manifest.pair().await?;
    let files: BTreeMap<State, (u64, u64)> = manifest
        .count_by_state()
        .await?
        .into_iter()
        .map(|(state, count, bytes)| (state, (count, bytes)))
        .collect();
    let dirs = manifest.count_dirs().await?;
    let queued = manifest.count_prioritized().await?;
    let held = manifest.count_rolled_back().await?;
    let problems = manifest.problems(args.limit).await?;
    let throughput = manifest.observed_throughput().await?;
    let left: (u64, u64) = [State::Pending, State::Copying, State::Failed]
        .iter()
        .map(|s| files[s])
        .fold((0, 0), |acc, (f, b)| (acc.0 + f, acc.1 + b));
    let eta = throughput.map(|(f, b, secs)| {
        left.0 as f64 / (f as f64 / secs) + left.1 as f64 / (b as f64 / secs).max(1.0)
    });

    if args.json {
        let map = |pick: fn(&(u64, u64)) -> u64| -> serde_json::Map<String, serde_json::Value> {
            files
                .iter()
                .map(|(s, v)| (s.as_str().to_string(), json!(pick(v))))
                .collect()
        };
        let value = json!({
            "manifest": manifest.location(),
            "source": pair.as_ref().map(|p| p.source.clone()),
            "dest": pair.as_ref().map(|p| p.dest.clone()),
            "files": map(|v| v.0),
            "bytes": map(|v| v.1),
            "directories": dirs,
            "copy_on_read_queued": queued,
            "rolled_back_held": held,
            "throughput": throughput.map(|(f, b, secs)| json!({"files_per_second": f as f64 / secs, "bytes_per_second": b as f64 / secs})),
            "eta_seconds": eta,
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(exit::OK);
    }
    println!("Manifest:     {}", manifest.location());
    if let Some(pair) = &pair {
        println!("Source:       {}", pair.source);
        println!("Destination:  {}", pair.dest);
    }
    println!();
    println!("{:<12} {:>10} {:>12}", "state", "files", "bytes");
    for (state, (count, bytes)) in &files {
        println!(
            "{:<12} {:>10} {:>12}",
            state.as_str(),
            count,
            human_bytes(*bytes)
        );
    }
    println!("{:<12} {:>10}", "directories", dirs);
    if queued > 0 {
        println!("Copy-on-read: {queued} files opened before their copy, queued first");
    }
    if held > 0 {
        println!("Rolled back:  {held} files held out of sweeps until the next `cutoverfs sweep`");
    }
    println!();
    match throughput {
        Some((f, b, secs)) => println!(
            "Throughput:   {:.0} files/s, {}/s (finished batches)",
            f as f64 / secs,
            human_bytes((b as f64 / secs) as u64)
        ),
        None => println!("Throughput:   no finished batch yet"),
    }
    if let Some(eta) = eta.filter(|_| left.0 > 0) {
        println!(
            "ETA:          {} for {} files left",
            human_duration(std::time::Duration::from_secs_f64(eta)),
            left.0
        );
    }
    if !problems.is_empty() {
        println!();
        println!("Files that need attention (first {}):", args.limit);
        for p in &problems {
            println!(
                "  {:<11} {}  ({} attempts) {}",
                p.state.as_str(),
                p.path,
                p.attempts,
                p.reason.as_deref().unwrap_or("")
            );
        }
    }
    Ok(exit::OK)
}

pub async fn batches(args: BatchesArgs) -> Result<u8> {
    let rows = with_existing_manifest(&args.target, async |manifest| {
        Ok(manifest.batches().await?)
    })
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(exit::OK);
    }
    println!(
        "{:>6} {:<12} {:<20} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>11}",
        "batch",
        "status",
        "started (UTC)",
        "duration",
        "files",
        "copied",
        "already",
        "missing",
        "conflict",
        "failed",
        "bytes"
    );
    for row in &rows {
        print_batch_line(row);
    }
    if rows.is_empty() {
        println!("(no batches yet)");
    }
    Ok(exit::OK)
}

fn print_batch_line(row: &BatchRow) {
    let t = &row.tally;
    let duration = row
        .finished_at
        .map(|end| {
            human_duration(std::time::Duration::from_millis(
                (end - row.started_at).max(0) as u64,
            ))
        })
        .unwrap_or_else(|| "-".into());
    println!(
        "{:>6} {:<12} {:<20} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>11}",
        row.id,
        row.status,
        utc(row.started_at),
        duration,
        t.files,
        t.copied,
        t.already,
        t.missing,
        t.conflicts,
        t.failed,
        human_bytes(t.bytes)
    );
}

fn utc(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

pub async fn batch(args: BatchArgs) -> Result<u8> {
    let (row, files) = with_existing_manifest(&args.target, async |manifest| {
        let Some(row) = manifest.batch(args.id).await? else {
            bail!(
                "no batch {} in manifest {}; `cutoverfs batches` lists them",
                args.id,
                manifest.location()
            );
        };
        Ok((row, manifest.batch_files(args.id).await?))
    })
    .await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"batch": row, "files": files}))?
        );
        return Ok(exit::OK);
    }
    println!(
        "Batch {} ({}), node {}, {}",
        row.id, row.status, row.node, row.command
    );
    println!("Started:  {} UTC", utc(row.started_at));
    if let Some(end) = row.finished_at {
        println!("Finished: {} UTC", utc(end));
    }
    let t = &row.tally;
    println!(
        "Files: {}  copied: {}  already there: {}  missing: {}  conflicts: {}  failed: {}  bytes: {}",
        t.files,
        t.copied,
        t.already,
        t.missing,
        t.conflicts,
        t.failed,
        human_bytes(t.bytes)
    );
    println!();
    println!("Files last handled in this batch, with their state now:");
    for f in &files {
        println!(
            "  {:<11} {}  {}",
            f.state.as_str(),
            f.path,
            f.reason.as_deref().unwrap_or("")
        );
    }
    Ok(exit::OK)
}
