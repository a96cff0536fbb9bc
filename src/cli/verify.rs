//! `cutoverfs verify`: re-checks the dest against the manifest and the local copies, records
//! what is wrong, and exits non-zero when anything is.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use super::{exit, stop_on_signals, with_manifest_to_upgrade, Target};
use crate::engine::verify::{verify, VerifyOptions, VerifyReport};
use crate::engine::{PathFilter, Progress};
use crate::manifest::Manifest;
use crate::util::human_bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
    Csv,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub target: Target,
    /// Read every dest object back and re-hash it (and re-hash local copies).
    #[arg(long)]
    pub deep: bool,
    /// Only files matching this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub path: Vec<String>,
    #[command(flatten)]
    pub files_from: super::FilesFrom,
    /// Output format of the report.
    #[arg(long, value_enum, default_value = "human")]
    pub format: Format,
    /// Write the report to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Files checked at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

pub async fn run(args: VerifyArgs) -> Result<u8> {
    let filter = PathFilter::new(&args.path, &[])?.with_list(args.files_from.load()?);
    let resolved = with_manifest_to_upgrade(&args.target, async |existing| {
        if existing.is_none() {
            anyhow::bail!(
                "no manifest at {}: nothing was migrated there, so nothing can be verified",
                args.target.manifest
            );
        }
        args.target.resolve(existing).await
    })
    .await?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let manifest = Manifest::open(&resolved.manifest_url).await?;
    manifest.check_pair(&resolved.pair, false).await?;
    let opts = VerifyOptions {
        filter,
        deep: args.deep,
        concurrency: args.concurrency as usize,
    };
    let stop = stop_on_signals();
    let progress = Progress::start("Verifying", args.no_progress, Duration::from_secs(10));
    let report = verify(
        &manifest,
        &resolved.store,
        &resolved.source,
        &opts,
        &progress,
        &stop,
    )
    .await;
    progress.finish();
    manifest.close().await;
    let report = report?;
    match args.format {
        Format::Human => write_human(&mut out, &report)?,
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Format::Csv => write_csv(&mut out, &report)?,
    }
    out.flush()?;
    if report.data_at_risk() > 0 {
        eprintln!(
            "cutoverfs verify: DATA AT RISK: {} purged file(s) have no good copy at the dest",
            report.data_at_risk()
        );
    }
    if *stop.borrow() {
        return Ok(exit::INTERRUPTED);
    }
    Ok(if report.findings.is_empty() {
        exit::OK
    } else {
        exit::INCOMPLETE
    })
}

fn write_human(out: &mut dyn Write, report: &VerifyReport) -> Result<()> {
    writeln!(
        out,
        "=== cutoverfs verify{} ===",
        if report.deep { " --deep" } else { "" }
    )?;
    writeln!(
        out,
        "Files checked:            {} ({})",
        report.checked,
        human_bytes(report.checked_bytes)
    )?;
    writeln!(out, "OK:                       {}", report.ok)?;
    writeln!(out, "Only at the dest (purged): {}", report.dest_only)?;
    writeln!(out, "Problems:                 {}", report.findings.len())?;
    writeln!(out, "Data at risk:             {}", report.data_at_risk())?;
    for finding in report.findings.iter().take(50) {
        writeln!(
            out,
            "  {}{} [{}]: {}",
            if finding.data_at_risk {
                "DATA AT RISK "
            } else {
                ""
            },
            finding.path,
            finding.problem.as_str(),
            finding.detail
        )?;
    }
    if report.findings.len() > 50 {
        writeln!(out, "  ... and {} more", report.findings.len() - 50)?;
    }
    if report
        .findings
        .iter()
        .any(|f| f.recorded && !f.data_at_risk)
    {
        writeln!(
            out,
            "Files with a local copy are pending again: the next sweep copies them."
        )?;
    }
    Ok(())
}

fn write_csv(out: &mut dyn Write, report: &VerifyReport) -> Result<()> {
    writeln!(out, "path,problem,data_at_risk,recorded,detail")?;
    for f in &report.findings {
        writeln!(
            out,
            "{},{},{},{},{}",
            csv_field(&f.path),
            f.problem.as_str(),
            f.data_at_risk,
            f.recorded,
            csv_field(&f.detail)
        )?;
    }
    Ok(())
}

/// RFC 4180 quoting.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}
