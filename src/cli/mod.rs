//! The command line (DESIGN §7): parsing, checking input, and printing what the engine reports.
//!
//! Owns: flags, exit codes, human and JSON output. All migration work is the engine's and all
//! state the manifest's; a command only wires them together. Bad input is refused here, before
//! anything is created or written (DESIGN §4.8).

mod audit_log;
mod config;
mod demo;
mod doctor;
mod logs;
mod mount;
mod purge;
mod reload;
mod report;
mod rollback;
mod sweep;
mod switch;
mod verify;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::manifest::{Manifest, ManifestUrl, Pair, DEFAULT_MANIFEST};
use crate::source::SourceTree;
use crate::store::{canonical_path, open_store, DestUrl, S3Flags, Store};

/// Exit codes, documented in docs/cli.md.
pub mod exit {
    pub const OK: u8 = 0;
    /// The run finished but some files are not migrated (failed, conflict, missing).
    pub const INCOMPLETE: u8 = 1;
    /// Bad input or an error that stopped the command before it could finish.
    pub const ERROR: u8 = 2;
    /// Stopped by SIGINT or SIGTERM; a re-run resumes.
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, Parser)]
#[command(
    name = "cutoverfs",
    version,
    about = "Move an application's uploaded files to new storage, every copy verified by SHA-256",
    long_about = None
)]
pub struct Cli {
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, global = true, env = "CUTOVERFS_LOG", default_value = "info")]
    pub log_level: String,

    /// Settings from a TOML file: keys are flag names (`concurrency = 64`); a `[sweep]` table
    /// applies to one command only; flags on the command line win.
    #[arg(long, global = true, value_name = "FILE", env = "CUTOVERFS_CONFIG")]
    pub config: Option<PathBuf>,

    /// Also write logs to this file (appended); rotated by size (see --log-max-size).
    #[arg(long, global = true, value_name = "PATH", env = "CUTOVERFS_LOG_FILE")]
    pub log_file: Option<PathBuf>,

    /// Log lines as text or as JSON objects (one per line), on stderr and in --log-file.
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        env = "CUTOVERFS_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: logs::LogFormat,

    /// Once --log-file passes this size it becomes PATH.1 (PATH.1 becomes PATH.2, ...).
    #[arg(long, global = true, value_name = "SIZE", default_value = "100MiB", value_parser = parse_size)]
    pub log_max_size: u64,

    /// Rotated log files kept besides --log-file; older ones are deleted.
    #[arg(long, global = true, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub log_max_files: u16,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scan the source and copy every file to the dest, verified, in recorded batches.
    Sweep(sweep::SweepArgs),
    /// Show what a sweep would do: files and bytes by state and top-level folder, time estimate.
    Plan(report::PlanArgs),
    /// Files and bytes per state, throughput, and the files that need attention (--watch: live).
    Status(report::StatusArgs),
    /// List sweep batches and their outcome.
    Batches(report::BatchesArgs),
    /// Show one batch and the files it handled.
    Batch(report::BatchArgs),
    /// Mount over the application's directory: serve every file from where it lives now, copy on
    /// read, and sweep the rest in the background.
    Mount(mount::MountArgs),
    /// Re-check every file at the dest against the manifest and its local copy (--deep re-reads).
    Verify(verify::VerifyArgs),
    /// Delete local copies of files verified at the dest (a dry run unless --confirm).
    Purge(purge::PurgeArgs),
    /// Take files back to their local copies, deleting the dest objects cutoverfs wrote for them
    /// (a dry run unless --confirm).
    Rollback(rollback::RollbackArgs),
    /// Run the whole migration on a generated sample tree in a temporary directory.
    Demo(demo::DemoArgs),
    /// The audit trail: every state change of every path, oldest first.
    Log(audit_log::LogArgs),
    /// Check that this machine can run cutoverfs (FUSE, privileges, passthrough, dest, manifest,
    /// free space) and say what to fix; changes nothing.
    Doctor(doctor::DoctorArgs),
    /// Print the settings that point the application at the dest after the cutover (Django:
    /// django-storages for an S3 dest); reads the manifest, changes nothing.
    SwitchSettings(switch::SwitchSettingsArgs),
}

impl Command {
    /// The name the audit trail records for changes this command makes.
    fn name(&self) -> &'static str {
        match self {
            Command::Sweep(_) => "sweep",
            Command::Plan(_) => "plan",
            Command::Status(_) => "status",
            Command::Batches(_) => "batches",
            Command::Batch(_) => "batch",
            Command::Mount(_) => "mount",
            Command::Purge(_) => "purge",
            Command::Rollback(_) => "rollback",
            Command::Verify(_) => "verify",
            Command::Demo(_) => "demo",
            Command::Log(_) => "log",
            Command::Doctor(_) => "doctor",
            Command::SwitchSettings(_) => "switch-settings",
        }
    }
}

/// Where the migration is: every command that reads or changes it takes these.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The legacy local tree (default: the one recorded in the manifest).
    #[arg(long, value_name = "DIR")]
    pub source: Option<PathBuf>,
    /// Where files go: file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX[?endpoint=URL&region=R&path_style=true]
    /// (default: the one recorded in the manifest).
    #[arg(long, value_name = "URL")]
    pub dest: Option<String>,
    /// The manifest database: sqlite:///PATH, or postgres://USER:PASSWORD@HOST:PORT/DB for a
    /// manifest shared by several nodes.
    // The value from the environment is never shown in --help: it may hold a password.
    #[arg(long, value_name = "URL", env = "CUTOVERFS_MANIFEST", hide_env_values = true, default_value = DEFAULT_MANIFEST)]
    pub manifest: String,
    #[command(flatten)]
    pub s3: S3Args,
}

/// Settings of an s3:// dest. A flag beats the same setting in the URL, and the URL beats the
/// AWS environment (AWS_ENDPOINT_URL, AWS_REGION). Credentials come from the standard AWS chain.
#[derive(Debug, Clone, Args, Default)]
#[command(next_help_heading = "S3 dest")]
pub struct S3Args {
    /// S3 endpoint URL, for servers other than AWS (MinIO, R2, Garage, Spaces...).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: from the URL, AWS_REGION or the profile; us-east-1 with an endpoint).
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Address buckets by path (http://host/bucket/key); the default with --s3-endpoint.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub s3_path_style: Option<bool>,
    /// Profile of ~/.aws/config and ~/.aws/credentials to take credentials and settings from.
    #[arg(long, value_name = "NAME")]
    pub s3_profile: Option<String>,
    /// Cache-Control of uploaded objects ("" for none).
    #[arg(long, value_name = "VALUE", default_value = "max-age=86400")]
    pub s3_cache_control: String,
    /// Server-side encryption: AES256, aws:kms or none.
    #[arg(long, value_name = "MODE")]
    pub s3_sse: Option<String>,
    /// KMS key id for --s3-sse aws:kms (default: the bucket's key).
    #[arg(long, value_name = "ID")]
    pub s3_sse_kms_key_id: Option<String>,
    /// Storage class of uploaded objects (STANDARD, STANDARD_IA, ...; default: the bucket's).
    #[arg(long, value_name = "CLASS")]
    pub s3_storage_class: Option<String>,
    /// Files this large or larger are uploaded in parts, in parallel.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub s3_multipart_threshold: u64,
    /// Size of each part of a multipart upload (grown when a file needs more than 10,000).
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub s3_part_size: u64,
    /// File data held in memory for uploads at once, across all files in flight.
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    pub s3_upload_memory: u64,
}

impl S3Args {
    pub fn flags(&self) -> S3Flags {
        S3Flags {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            profile: self.s3_profile.clone(),
            cache_control: Some(self.s3_cache_control.clone()),
            sse: self.s3_sse.clone(),
            sse_kms_key_id: self.s3_sse_kms_key_id.clone(),
            storage_class: self.s3_storage_class.clone(),
            part_size: Some(self.s3_part_size),
            multipart_threshold: Some(self.s3_multipart_threshold),
            upload_memory: Some(self.s3_upload_memory),
        }
    }
}

/// Sizes such as 4096, 16MiB, 1.5GB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("{text:?} is not a size (e.g. 16MiB): {e}"))
}

/// Which paths a command acts on.
#[derive(Debug, Clone, Args, Default)]
pub struct Scope {
    /// Only paths matching this glob (relative to the source; repeatable; `*` crosses `/`).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Leave out paths matching this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
}

impl Scope {
    pub fn filter(&self) -> Result<crate::engine::PathFilter> {
        Ok(crate::engine::PathFilter::new(
            &self.include,
            &self.exclude,
        )?)
    }
}

/// The application's own list of files (the paths its database references): `plan`, `sweep`,
/// `verify` and `purge` act on those paths only.
#[derive(Debug, Clone, Args, Default)]
pub struct FilesFrom {
    /// Only the paths listed in FILE (`-`: stdin), one per line relative to the source; empty
    /// lines and lines starting with # or ; are skipped. With --include/--exclude, both must
    /// take a path.
    #[arg(long, value_name = "FILE", conflicts_with = "files_from0")]
    pub files_from: Option<PathBuf>,
    /// Like --files-from, with the paths separated by NUL bytes (find -print0); no comments.
    #[arg(long, value_name = "FILE")]
    pub files_from0: Option<PathBuf>,
}

impl FilesFrom {
    /// The list, read and checked whole, or None without one. Called before anything is
    /// created: a bad line refuses the command.
    pub fn load(&self) -> Result<Option<Arc<crate::engine::file_list::FileList>>> {
        use crate::engine::file_list::{list_source, FileList};
        let Some((path, separator)) =
            list_source(self.files_from.as_ref(), self.files_from0.as_ref())
        else {
            return Ok(None);
        };
        let list = FileList::read(&path, separator)?;
        if list.is_empty() {
            tracing::warn!(list = %list.origin(), "the file list names no path: nothing is in scope");
        }
        Ok(Some(Arc::new(list)))
    }
}

pub fn main() -> ExitCode {
    end_quietly_when_stdout_closes();
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if invoked_as_mount_helper(&argv) {
        argv = match mount::helper_args(&argv) {
            Ok(args) => args,
            Err(e) => {
                eprintln!("{e:#}");
                return ExitCode::from(exit::ERROR);
            }
        };
    }
    let _ = EFFECTIVE_ARGS.set(argv.clone());
    let cli = match config::expand(argv) {
        Ok(args) => parse_letting_later_flags_win(args),
        Err(e) => {
            eprintln!("cutoverfs: error: {e:#}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let log_settings = logs::LogSettings {
        level: &cli.log_level,
        format: cli.log_format,
        file: cli.log_file.as_deref(),
        max_size: cli.log_max_size,
        max_files: cli.log_max_files as usize,
    };
    if let Err(e) = logs::init(&log_settings) {
        eprintln!("cutoverfs: error: {e:#}");
        return ExitCode::from(exit::ERROR);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cutoverfs: error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    crate::manifest::set_actor(&crate::engine::process_node(), cli.command.name());
    let result = runtime.block_on(async {
        match cli.command {
            Command::Sweep(args) => sweep::run(args).await,
            Command::Plan(args) => report::plan(args).await,
            Command::Status(args) => report::status(args).await,
            Command::Batches(args) => report::batches(args).await,
            Command::Batch(args) => report::batch(args).await,
            Command::Mount(args) => mount::run(args).await,
            Command::Purge(args) => purge::run(args).await,
            Command::Rollback(args) => rollback::run(args).await,
            Command::Verify(args) => verify::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Log(args) => audit_log::run(args).await,
            Command::Doctor(args) => doctor::run(args).await,
            Command::SwitchSettings(args) => switch::run(args).await,
        }
    });
    // A command stopped by a signal may leave blocking work behind (a deep verify hashing a
    // large file, a copy in flight): the manifest is consistent already, so the process does
    // not wait for it longer than this.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cutoverfs: error: {}", logs::redact_url(&describe(&e)));
            ExitCode::from(exit::ERROR)
        }
    }
}

/// How long the end of a command waits for blocking work it no longer needs.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// An error and its causes on one line, each cause once: many of our error types already name
/// their cause in their own message, and printing the chain would repeat it.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

static EFFECTIVE_ARGS: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();

/// The command line as cutoverfs understood it (a mount helper's call already translated), for
/// starting the same command again.
pub fn effective_args() -> Vec<std::ffi::OsString> {
    EFFECTIVE_ARGS
        .get()
        .cloned()
        .unwrap_or_else(|| std::env::args_os().collect())
}

/// `mount -t fuse.cutoverfs` runs `mount.fuse.cutoverfs` (or `mount.cutoverfs`): a link to this
/// binary under that name.
fn invoked_as_mount_helper(argv: &[std::ffi::OsString]) -> bool {
    let name = argv
        .first()
        .map(Path::new)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    name == "mount.cutoverfs" || name == "mount.fuse.cutoverfs"
}

/// Parses the command line; a flag given twice takes its last value, so a flag on the command
/// line beats the same setting from `--config` (put in front of it).
fn parse_letting_later_flags_win(args: Vec<std::ffi::OsString>) -> Cli {
    try_parse_letting_later_flags_win(args).unwrap_or_else(|e| e.exit())
}

/// The same, with an error instead of an exit (a reload must not end the daemon).
fn try_parse_letting_later_flags_win(args: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let command = Cli::command()
        .args_override_self(true)
        .mut_subcommands(|sub| sub.args_override_self(true));
    let matches = command.try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

/// Like other command-line tools, end quietly when the reader of stdout goes away
/// (`cutoverfs status | head`) instead of panicking on a broken pipe. SIGPIPE cannot simply get
/// its default action back: a write to a network connection the server reset raises it too,
/// and that must stay an error the S3 client handles, not the end of the process. So the handler
/// ends the process only when it is stdout that has no reader any more.
fn end_quietly_when_stdout_closes() {
    extern "C" fn on_sigpipe(_: libc::c_int) {
        let mut stdout = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll and _exit are async-signal-safe; the pollfd lives on this stack.
        unsafe {
            if libc::poll(&mut stdout, 1, 0) == 1 && stdout.revents & libc::POLLERR != 0 {
                libc::_exit(128 + libc::SIGPIPE);
            }
        }
    }
    // SAFETY: installing a handler that only calls async-signal-safe functions, before any
    // thread starts.
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            on_sigpipe as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// A checked source, dest and manifest location, ready to use.
pub struct Resolved {
    pub source: Arc<SourceTree>,
    pub store: Arc<dyn Store>,
    pub pair: Pair,
    pub manifest_url: ManifestUrl,
}

impl Target {
    pub fn manifest_url(&self) -> Result<ManifestUrl> {
        Ok(self.manifest.parse()?)
    }

    /// Source and dest from the flags, else from the manifest; every check that can be made
    /// without writing is made here.
    pub async fn resolve(&self, existing: Option<&Manifest>) -> Result<Resolved> {
        let manifest_url = self.manifest_url()?;
        let recorded = match existing {
            Some(m) => m.pair().await?,
            None => None,
        };
        let dest_text = match (&self.dest, &recorded) {
            (Some(dest), _) => dest.clone(),
            (None, Some(pair)) => pair.dest.clone(),
            (None, None) => {
                bail!("no dest given and none recorded in manifest {manifest_url}: give --dest URL")
            }
        };
        let source_path = match (&self.source, &recorded) {
            (Some(source), _) => source.clone(),
            (None, Some(pair)) => PathBuf::from(&pair.source),
            (None, None) => bail!(
                "no source given and none recorded in manifest {manifest_url}: give --source DIR"
            ),
        };
        let dest = DestUrl::parse(&dest_text)?;
        let source_dir = check_source(&source_path)?;
        let dest_dir = match &dest {
            DestUrl::Local(dest_path) => Some(
                canonical_path(dest_path)
                    .with_context(|| format!("dest {}", dest_path.display()))?,
            ),
            DestUrl::S3(_) => None,
        };
        refuse_nesting(&source_dir, dest_dir.as_deref(), &manifest_url)?;
        let store = open_store(&dest, &self.s3.flags()).await?;
        let pair = Pair {
            source: source_dir.display().to_string(),
            dest: store.canonical_url(),
        };
        if let Some(manifest) = existing {
            manifest.check_pair(&pair, false).await?;
        }
        let source = Arc::new(open_source(&source_dir, existing).await?);
        Ok(Resolved {
            source,
            store,
            pair,
            manifest_url,
        })
    }
}

/// Opens the source tree. When a cutoverfs daemon is mounted over it, the tree under the mount
/// is reached through the daemon's own descriptor (recorded in the manifest): going through
/// the mount would see the dest's files as local and change them as the application does.
async fn open_source(source_dir: &Path, manifest: Option<&Manifest>) -> Result<SourceTree> {
    let mounted = crate::fuse::mounted_type(source_dir)?
        .is_some_and(|t| t == format!("fuse.{}", crate::fuse::SUBTYPE));
    if !mounted {
        return SourceTree::open(source_dir)
            .with_context(|| format!("cannot open source {}", source_dir.display()));
    }
    let reach = match manifest {
        Some(m) => m.mounted_source().await?,
        None => None,
    };
    let usable = reach.as_deref().map(Path::new).filter(|p| p.is_dir());
    let Some(reach) = usable else {
        bail!(
            "source {} is a cutoverfs mount, and the local tree under it cannot be reached from here \
             (run this as root on the machine where the daemon runs, with the daemon's manifest)",
            source_dir.display()
        );
    };
    SourceTree::open_as(reach, source_dir).with_context(|| {
        format!(
            "cannot open the local tree under the mount on {}",
            source_dir.display()
        )
    })
}

fn check_source(path: &Path) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!("source {} is not a directory", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("source {} does not exist", path.display())
        }
        Err(e) => bail!("source {}: {e}", path.display()),
    }
    std::fs::canonicalize(path).with_context(|| format!("source {}", path.display()))
}

/// The dest may not be inside the source (the sweep would copy its own output) nor contain it,
/// and the manifest may not live in the source (it would be migrated while it changes).
fn refuse_nesting(source: &Path, dest: Option<&Path>, manifest: &ManifestUrl) -> Result<()> {
    if let Some(dest) = dest {
        if dest == source {
            bail!("dest {} is the source itself", dest.display());
        }
        if dest.starts_with(source) {
            bail!(
                "dest {} is inside the source {}",
                dest.display(),
                source.display()
            );
        }
        if source.starts_with(dest) {
            bail!(
                "source {} is inside the dest {}",
                source.display(),
                dest.display()
            );
        }
    }
    let ManifestUrl::Sqlite(db) = manifest else {
        return Ok(());
    };
    let db = canonical_path(db).unwrap_or_else(|_| db.clone());
    if db.starts_with(source) {
        bail!(
            "manifest {} is inside the source {}; keep it outside the migrated tree",
            db.display(),
            source.display()
        );
    }
    Ok(())
}

/// Runs a read-only command on an existing manifest (or says how to create one), closing it
/// afterwards so SQLite leaves no WAL files behind.
pub async fn with_existing_manifest<T>(
    target: &Target,
    work: impl AsyncFnOnce(&Manifest) -> Result<T>,
) -> Result<T> {
    with_existing_manifest_upgraded(target, false, work).await
}

/// Like `with_existing_manifest`; with `upgrade`, for a command that changes the manifest
/// anyway, a manifest of an older schema is upgraded first instead of refused.
pub async fn with_existing_manifest_upgraded<T>(
    target: &Target,
    upgrade: bool,
    work: impl AsyncFnOnce(&Manifest) -> Result<T>,
) -> Result<T> {
    let url = target.manifest_url()?;
    let Some(manifest) = open_manifest(&url, upgrade).await? else {
        bail!("no manifest at {url}; run `cutoverfs sweep --source DIR --dest URL` first, or give --manifest");
    };
    let result = work(&manifest).await;
    manifest.close().await;
    result
}

/// Like `with_existing_manifest`, for commands that also work before any manifest exists.
pub async fn with_optional_manifest<T>(
    target: &Target,
    work: impl AsyncFnOnce(Option<&Manifest>) -> Result<T>,
) -> Result<T> {
    with_optional_manifest_upgraded(target, false, work).await
}

/// Like `with_optional_manifest`, for the commands that change the manifest anyway (sweep,
/// mount, verify, purge): a manifest of an older schema is upgraded first instead of refused.
pub async fn with_manifest_to_upgrade<T>(
    target: &Target,
    work: impl AsyncFnOnce(Option<&Manifest>) -> Result<T>,
) -> Result<T> {
    with_optional_manifest_upgraded(target, true, work).await
}

async fn with_optional_manifest_upgraded<T>(
    target: &Target,
    upgrade: bool,
    work: impl AsyncFnOnce(Option<&Manifest>) -> Result<T>,
) -> Result<T> {
    let manifest = open_manifest(&target.manifest_url()?, upgrade).await?;
    let result = work(manifest.as_ref()).await;
    if let Some(manifest) = manifest {
        manifest.close().await;
    }
    result
}

/// An existing manifest, unchanged; with `upgrade`, one left by an earlier cutoverfs is
/// brought to this binary's schema (its rows stay as they are).
async fn open_manifest(url: &ManifestUrl, upgrade: bool) -> Result<Option<Manifest>> {
    match Manifest::open_existing(url).await {
        Err(crate::manifest::ManifestError::OlderSchema {
            applied, expected, ..
        }) if upgrade => {
            tracing::info!(manifest = %url, applied, expected, "upgrading the manifest's schema");
            Ok(Some(Manifest::open(url).await?))
        }
        opened => Ok(opened?),
    }
}

/// Keeps the manifest gauges of `--metrics` current: counts the manifest now and then, in
/// the background, for as long as the process runs. A manifest that does not answer leaves the
/// last counts (their age says how old they are).
pub fn count_for_metrics(manifest: Manifest, metrics: crate::metrics::Metrics) {
    use crate::manifest::State;
    tokio::spawn(async move {
        loop {
            let started = std::time::Instant::now();
            let counted = async {
                let by_state = manifest.count_by_state().await?;
                let copy_on_read = manifest.count_prioritized().await?;
                anyhow::Ok((by_state, copy_on_read))
            }
            .await;
            let took = started.elapsed();
            match counted {
                Ok((by_state, copy_on_read)) => {
                    let queued = by_state
                        .iter()
                        .filter(|(s, _, _)| matches!(s, State::Pending | State::Copying))
                        .map(|(_, files, _)| files)
                        .sum();
                    metrics.set_manifest_counts(&crate::metrics::ManifestCounts {
                        by_state: by_state
                            .iter()
                            .map(|(s, files, bytes)| (s.as_str(), *files, *bytes))
                            .collect(),
                        queued,
                        copy_on_read,
                    });
                }
                Err(e) => tracing::debug!(error = %e, "cannot count the manifest for metrics"),
            }
            tokio::time::sleep(crate::metrics::next_count_after(took)).await;
        }
    });
}

/// SIGINT/SIGTERM set the flag once; a second signal ends the process at once.
///
/// The handlers are in place when this returns (not later, in the spawned task): a daemon
/// calls it before it reports ready, so a stop that follows READY=1 at once still unmounts
/// instead of killing the process and leaving a stale mount.
pub fn stop_on_signals() -> tokio::sync::watch::Receiver<bool> {
    stop_on_signals_saying(
        b"cutoverfs: stopping after the copies in flight (again to quit at once)\n",
    )
}

/// `stop_on_signals`, with what the first signal prints on stderr (nothing when empty): a
/// command with no copies in flight has nothing to finish and says nothing.
pub fn stop_on_signals_saying(note: &'static [u8]) -> tokio::sync::watch::Receiver<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot handle SIGTERM/SIGINT; they will end the process at once");
            return rx;
        }
    };
    tokio::spawn(async move {
        for round in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if round == 0 {
                // Not eprintln!: a daemon's stderr may be gone, and the stop must still happen.
                if !note.is_empty() {
                    let _ = std::io::Write::write_all(&mut std::io::stderr(), note);
                }
                let _ = tx.send(true);
            } else {
                std::process::exit(exit::INTERRUPTED as i32);
            }
        }
    });
    rx
}
