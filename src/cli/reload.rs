//! SIGHUP (`systemctl reload`): re-read the config file and apply what a running sweep can
//! change — `concurrency`, `bwlimit`, `max-ops`, `include`, `exclude` — without remounting or
//! stopping the copies in flight.
//!
//! The command line is expanded again exactly as at start (the file's settings first, then the
//! flags given on the command line, which win), so a setting given as a flag keeps its value
//! across reloads, and `include` / `exclude` globs given as flags stay while the file's are
//! replaced. A file that cannot be read or parsed, or a bad value, is logged as an error and
//! changes nothing: the settings apply as a whole or not at all.

use std::sync::Arc;

use anyhow::{anyhow, Result};

use super::{config, effective_args, Command};
use crate::engine::{Limits, LiveLimits};

/// The live settings of a command re-parsed from the config file, and a digest of its other
/// settings (a change there needs a restart, which the log says).
pub struct Reread {
    pub limits: Limits,
    pub others: String,
}

/// Flags whose value the file cannot change once given on the command line.
const LIVE_FLAGS: [&str; 3] = ["--concurrency", "--bwlimit", "--max-ops"];

/// Installs the SIGHUP handler now (a daemon calls this before it reports ready: the default
/// action of SIGHUP would end the process) and applies each reload to `live`.
pub fn on_sighup(
    live: Arc<LiveLimits>,
    others_at_start: String,
    reread: impl Fn(Command) -> Result<Reread> + Send + 'static,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; it would end the process, so do not send it");
            return;
        }
    };
    let pinned = pinned_on_command_line();
    tokio::spawn(async move {
        let mut others = others_at_start;
        while hangups.recv().await.is_some() {
            if config::config_path(&effective_args()).is_none() {
                tracing::warn!("SIGHUP: started without --config (or CUTOVERFS_CONFIG), so there is no file to re-read; nothing changed");
                continue;
            }
            match read_again().and_then(&reread) {
                Ok(new) => {
                    apply(&live, new.limits, &pinned);
                    if new.others != others {
                        tracing::warn!("settings other than concurrency, bwlimit, max-ops, include and exclude changed in the config file; they apply at the next restart");
                        others = new.others;
                    }
                }
                Err(e) => tracing::error!(
                    error = %super::logs::redact_url(&format!("{e:#}")),
                    "config reload failed; the settings in force are kept"
                ),
            }
        }
    });
}

fn apply(live: &LiveLimits, limits: Limits, pinned: &[&str]) {
    let changes = live.set(limits);
    let pinned = if pinned.is_empty() {
        String::new()
    } else {
        format!(
            " (given on the command line, so not taken from the file: {})",
            pinned.join(", ")
        )
    };
    if changes.is_empty() {
        tracing::info!("config reloaded: nothing changed{pinned}");
    } else {
        tracing::info!("config reloaded: {}{pinned}", changes.join("; "));
    }
}

/// The command as the process was started, with the config file read again.
fn read_again() -> Result<Command> {
    let args = config::expand(effective_args())?;
    let cli = super::try_parse_letting_later_flags_win(args).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        anyhow!("{}", first.trim_start_matches("error: "))
    })?;
    Ok(cli.command)
}

fn pinned_on_command_line() -> Vec<&'static str> {
    let args = effective_args();
    LIVE_FLAGS
        .iter()
        .filter(|flag| {
            args.iter().any(|arg| {
                let arg = arg.to_string_lossy();
                arg == **flag || arg.starts_with(&format!("{flag}="))
            })
        })
        .map(|flag| flag.trim_start_matches("--"))
        .collect()
}
