//! `cutoverfs log`: the audit trail, oldest first, and pruning it.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use super::{exit, with_existing_manifest, Target};
use crate::engine::PathFilter;
use crate::manifest::{now_ms, AuditQuery, AuditRow};

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only this path: an exact path, or a glob (`photos/**`, `*.pdf`).
    #[arg(long, value_name = "PATH")]
    pub path: Option<String>,
    /// Only changes since this time: RFC 3339 (2026-11-22T08:00:00Z) or an age (2h, 3days).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<i64>,
    /// human: aligned columns; json: one JSON object per line.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub format: Format,
    /// Delete the changes recorded before this time (RFC 3339 or an age such as 90days); a dry
    /// run that only counts them unless --confirm.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub prune_before: Option<i64>,
    /// With --prune-before: delete.
    #[arg(long, requires = "prune_before")]
    pub confirm: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// Rows read from the manifest at a time: the trail may hold millions.
const PAGE: usize = 5000;

pub async fn run(args: LogArgs) -> Result<u8> {
    if let Some(before) = args.prune_before {
        return prune(&args, before).await;
    }
    let (query, glob) = match &args.path {
        Some(path) if is_glob(path) => (
            AuditQuery {
                path: None,
                since: args.since,
            },
            Some(PathFilter::new(std::slice::from_ref(path), &[])?),
        ),
        path => (
            AuditQuery {
                path: path.as_ref().map(|p| p.trim_start_matches('/').to_string()),
                since: args.since,
            },
            None,
        ),
    };
    let format = args.format;
    let shown = with_existing_manifest(&args.target, async |manifest| {
        let mut after = 0;
        let mut shown = 0u64;
        loop {
            let page = manifest.audit(&query, after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            let page: Vec<&AuditRow> = page
                .iter()
                .filter(|row| glob.as_ref().is_none_or(|g| g.matches(&row.path)))
                .collect();
            print_page(&page, format, shown == 0)?;
            shown += page.len() as u64;
        }
        Ok(shown)
    })
    .await?;
    if shown == 0 && format == Format::Human {
        println!(
            "(no changes recorded{})",
            if args.path.is_some() || args.since.is_some() {
                " that match"
            } else {
                ""
            }
        );
    }
    Ok(exit::OK)
}

async fn prune(args: &LogArgs, before: i64) -> Result<u8> {
    if args.path.is_some() || args.since.is_some() {
        bail!("--prune-before prunes the whole trail; it takes neither --path nor --since");
    }
    let count = with_existing_manifest(&args.target, async |manifest| {
        Ok(manifest.prune_audit(before, args.confirm).await?)
    })
    .await?;
    if args.confirm {
        println!(
            "Deleted {count} audit rows recorded before {}.",
            utc_ms(before)
        );
    } else {
        println!(
            "Dry run: {count} audit rows were recorded before {}; add --confirm to delete them.",
            utc_ms(before)
        );
    }
    Ok(exit::OK)
}

fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '[', '{'])
}

/// An RFC 3339 time or an age, as ms since the epoch.
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .map_err(|_| format!("{text:?} is before 1970"))?;
        return Ok(ms.as_millis() as i64);
    }
    match humantime::parse_duration(text) {
        Ok(age) => Ok(now_ms() - age.as_millis().min(i64::MAX as u128) as i64),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2026-11-22T08:00:00Z) nor an age (2h, 3days)"
        )),
    }
}

fn utc_ms(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

fn print_page(rows: &[&AuditRow], format: Format, first: bool) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if format == Format::Json {
        for row in rows {
            writeln!(out, "{}", serde_json::to_string(row)?)?;
        }
        return Ok(());
    }
    if first {
        writeln!(
            out,
            "{:<24}  {:<8}  {:<11} {:<11}  {:<30}  PATH  (WHY)",
            "AT (UTC)", "COMMAND", "FROM", "TO", "NODE"
        )?;
    }
    for row in rows {
        let mut line = format!(
            "{:<24}  {:<8}  {:<11} {:<11}  {:<30}  {}",
            utc_ms(row.at),
            row.command,
            row.from.as_deref().unwrap_or("-"),
            row.to,
            row.node,
            row.path
        );
        if let Some(why) = &row.why {
            line.push_str(&format!("  ({why})"));
        }
        if let Some(lease) = row.lease.as_ref().filter(|l| **l != row.node) {
            line.push_str(&format!("  [lease {lease}]"));
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_age() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        let two_hours_ago = parse_time("2h").unwrap();
        let expected = now_ms() - 7_200_000;
        assert!((two_hours_ago - expected).abs() < 5_000);
        assert!(parse_time("yesterday-ish").is_err());
    }
}
