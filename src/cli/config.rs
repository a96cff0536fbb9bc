//! `--config FILE`: the same settings as the flags, in TOML, for systemd units and long-lived
//! setups (DESIGN §7). Keys are flag names without the dashes (`concurrency = 64`,
//! `s3-endpoint = "http://..."`, `include = ["a/**", "b/**"]`, `skip-missing = true`).
//! Top-level keys apply to every command that has that flag; a `[sweep]` (or `[plan]`, ...) table
//! applies to that command only. A flag on the command line beats the file.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;

use super::Cli;

/// Options that sit before the subcommand and take a value.
const GLOBAL_WITH_VALUE: [&str; 6] = [
    "--log-level",
    "--config",
    "--log-file",
    "--log-format",
    "--log-max-size",
    "--log-max-files",
];

/// The command line with the config file's settings put in front of the command's own flags,
/// so those win. Unchanged when no `--config` is given.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let Some(command_at) = subcommand_position(&args) else {
        return Ok(args);
    };
    let command = args[command_at].to_string_lossy().to_string();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    let settings = settings_for(&table, &command, &path)?;
    let mut expanded = args[..=command_at].to_vec();
    expanded.extend(settings);
    expanded.extend_from_slice(&args[command_at + 1..]);
    Ok(expanded)
}

pub(super) fn config_path(args: &[OsString]) -> Option<std::path::PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return iter.next().map(Into::into);
        }
        if let Some(value) = text.strip_prefix("--config=") {
            return Some(value.into());
        }
    }
    std::env::var_os("CUTOVERFS_CONFIG").map(Into::into)
}

fn subcommand_position(args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let text = args[i].to_string_lossy();
        if GLOBAL_WITH_VALUE.contains(&text.as_ref()) {
            i += 2;
        } else if text.starts_with('-') {
            i += 1;
        } else {
            return Some(i);
        }
    }
    None
}

/// The flags a command takes, by long name.
fn flags_of(command: &str) -> Option<Vec<(String, bool)>> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(command)?;
    Some(
        sub.get_arguments()
            .filter_map(|arg| {
                let takes_value = arg.get_action().takes_values();
                arg.get_long().map(|long| (long.to_string(), takes_value))
            })
            .collect(),
    )
}

fn all_flags() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .flat_map(|sub| {
            sub.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn settings_for(table: &toml::Table, command: &str, path: &Path) -> Result<Vec<OsString>> {
    let Some(flags) = flags_of(command) else {
        return Ok(Vec::new());
    };
    let known = all_flags();
    let commands: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut out = Vec::new();
    let mut add = |key: &str, value: &toml::Value, only_here: bool| -> Result<()> {
        let name = key.replace('_', "-");
        if name == "config" {
            bail!(
                "config file {}: `config` cannot name another file",
                path.display()
            );
        }
        let Some((_, takes_value)) = flags.iter().find(|(long, _)| *long == name) else {
            if only_here || !known.contains(&name) {
                bail!(
                    "config file {}: unknown key `{key}`{}",
                    path.display(),
                    if only_here {
                        format!(" for `{command}`")
                    } else {
                        String::new()
                    }
                );
            }
            return Ok(());
        };
        push_flag(&mut out, &name, *takes_value, value)
            .with_context(|| format!("config file {}: key `{key}`", path.display()))
    };
    for (key, value) in table {
        match value {
            toml::Value::Table(section) if commands.contains(key) => {
                if key == command {
                    for (key, value) in section {
                        add(key, value, true)?;
                    }
                }
            }
            _ => add(key, value, false)?,
        }
    }
    Ok(out)
}

fn push_flag(
    out: &mut Vec<OsString>,
    name: &str,
    takes_value: bool,
    value: &toml::Value,
) -> Result<()> {
    let flag = OsString::from(format!("--{name}"));
    match (value, takes_value) {
        (toml::Value::Boolean(on), false) => {
            if *on {
                out.push(flag);
            }
        }
        (toml::Value::Array(items), true) => {
            for item in items {
                out.push(flag.clone());
                out.push(scalar(item)?.into());
            }
        }
        (value, true) => {
            out.push(flag);
            out.push(scalar(value)?.into());
        }
        (_, false) => bail!("is a switch: give true or false"),
    }
    Ok(())
}

fn scalar(value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "expected a string, number or boolean, found {}",
            other.type_str()
        ),
    })
}
