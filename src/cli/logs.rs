//! Logging (DESIGN §8): tracing to stderr and, with `--log-file`, to a size-rotated file, as
//! text or JSON lines. What is logged names files, sizes, hashes and errors; never file content
//! and never a credential (URLs pass through `redact_url` before they are logged).

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::ValueEnum;
use file_rotate::{compression::Compression, suffix::AppendCount, ContentLimit, FileRotate};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, fields, spans).
    Json,
}

/// Where and how logs go.
pub struct LogSettings<'a> {
    pub level: &'a str,
    pub format: LogFormat,
    pub file: Option<&'a Path>,
    /// The file is rotated once it passes this size: PATH becomes PATH.1, PATH.1 PATH.2, ...
    pub max_size: u64,
    /// Rotated files kept besides PATH; older ones are deleted.
    pub max_files: usize,
}

pub fn init(settings: &LogSettings) -> Result<()> {
    let filter = filter_for(settings.level);
    let stderr_is_tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, ansi) = match settings.file {
        Some(path) => (
            BoxMakeWriter::new(Mutex::new(rotating_file(settings, path)?).and(std::io::stderr)),
            false,
        ),
        None => (BoxMakeWriter::new(std::io::stderr), stderr_is_tty),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(writer);
    let layer = match settings.format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .context("cannot start logging")
}

fn filter_for(level: &str) -> EnvFilter {
    if level.contains('=') || level.contains(',') {
        EnvFilter::try_new(level)
    } else {
        // The AWS credential chain warns about every provider it tries and skips (IMDS on a
        // machine that is not EC2); what matters reaches us as an error.
        EnvFilter::try_new(format!(
            "warn,aws_config=error,fuser=error,cutoverfs={level}"
        ))
    }
    .unwrap_or_else(|_| EnvFilter::new("warn,aws_config=error,fuser=error,cutoverfs=info"))
}

/// The log file, appended to; checked here so a bad path is a clear error at start (the
/// rotating writer itself panics on one).
fn rotating_file(settings: &LogSettings, path: &Path) -> Result<FileRotate<AppendCount>> {
    let path = std::path::absolute(path)
        .with_context(|| format!("cannot open log file {}", path.display()))?;
    let mut probe = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open log file {}", path.display()))?;
    probe.flush()?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true).create(true).append(true);
    Ok(FileRotate::new(
        &path,
        AppendCount::new(settings.max_files.max(1)),
        ContentLimit::BytesSurpassed(settings.max_size.max(1) as usize),
        Compression::None,
        Some(options),
    ))
}

/// `text` with the password of every `scheme://user:password@host` in it replaced by `***`
/// (dest endpoints and database URLs may carry one).
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', '?', '#', '&', ' ']).unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let user = &authority[..at];
                match user.split_once(':') {
                    Some((name, _)) => out.push_str(&format!("{name}:***")),
                    None => out.push_str(user),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(
            redact_url("s3://b/p?endpoint=http://key:secret@h:9000/x"),
            "s3://b/p?endpoint=http://key:***@h:9000/x"
        );
        assert_eq!(
            redact_url("postgres://app:pw@db/m and sqlite:///var/m.db"),
            "postgres://app:***@db/m and sqlite:///var/m.db"
        );
        assert_eq!(redact_url("file:///srv/media"), "file:///srv/media");
    }
}
