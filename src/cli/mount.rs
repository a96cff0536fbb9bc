//! `cutoverfs mount`: the daemon (DESIGN §7) — mounts over the application's directory, serves
//! it, queues copy-on-read and runs the sweeper until stopped. Also `mount.cutoverfs`, the
//! helper `mount(8)` calls for `-t fuse.cutoverfs`, fstab lines and systemd `.mount` units.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{exit, parse_size, stop_on_signals, with_manifest_to_upgrade, Scope, Target};
use crate::engine::scan::{scan_patiently, ScanError};
use crate::engine::sweep::{run_sweep, SweepOptions};
use crate::engine::{node_id, process_node, Limits, LiveLimits, Progress};
use crate::fuse::{MountSettings, Parts};
use crate::manifest::{Engine, Manifest};
use crate::metrics::{Metrics, Role};
use crate::store::{Preflight, TimedStore};

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// The directory to mount over; by default also the source, reached through a descriptor
    /// opened before mounting.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub scope: Scope,
    /// Stay in the foreground (systemd `Type=notify`, containers); otherwise the daemon goes to
    /// the background once the mount is live.
    #[arg(long)]
    pub foreground: bool,
    /// Serve and copy on read, but run no sweeper in this daemon.
    #[arg(long)]
    pub no_sweep: bool,
    /// Files the sweeper copies at once [default: 64].
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Average read rate of the sweeper from the source, per second (e.g. 20MiB); unlimited
    /// when not given. Reads by the application are never limited.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub bwlimit: Option<u64>,
    /// Write requests per second the sweeper sends to the dest, on average (S3 PUT class: 1 per
    /// file, 2 + parts for a multipart upload; 1 per file to a file:// dest); unlimited when not
    /// given.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_ops: Option<u64>,
    /// Retries of a failed copy before the file is left as failed.
    #[arg(long, default_value_t = 5)]
    pub max_retries: u32,
    /// First retry delay; each further retry waits twice as long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub retry_delay: Duration,
    /// How long a claimed file stays reserved to this daemon without renewal.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub lease_timeout: Duration,
    /// After SIGTERM or Ctrl-C, how long copies in flight may take to finish; then they are
    /// abandoned and redone by a later run (a dest that stalls cannot hold a stop up longer).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stop_timeout: Duration,
    /// How long the kernel may cache names and attributes. Default: 1h with a SQLite
    /// manifest (only this daemon changes the tree it serves, and it tells the kernel), 1s with
    /// PostgreSQL and on replicas (other nodes change it; see --manifest-cache).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub attr_timeout: Option<Duration>,
    /// Memory for the manifest rows the mount keeps at hand (the rest is read again with one
    /// indexed query), and as much again for SQLite's own page cache.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub cache_memory: u64,
    /// Threads answering FUSE requests.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub fuse_threads: u32,
    /// Memory for data fetched ahead of readers of remote files, across all open files.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub prefetch_memory: u64,
    /// How long a read from an S3 dest may wait for a file that still has its local copy;
    /// after that the local copy answers and the dest is probed in the background until it
    /// answers again (a dest that stalls never stalls the application).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub dest_read_timeout: Duration,
    /// Interval of progress lines of the sweeper in the log.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub progress_interval: Duration,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9464); see
    /// docs/metrics.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// A replica, on a machine without the local tree: the tree from the manifest, the data
    /// from the dest, read-only; files not migrated yet are requested from a node that has the
    /// source (see docs/multi-node.md).
    #[arg(long, conflicts_with = "source")]
    pub no_source: bool,
    /// How long an open on a replica waits for a requested file to be copied before it fails
    /// with EIO.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub remote_wait: Duration,
    /// How long the mount trusts a manifest row it read before reading it again: changes made
    /// on other nodes show here within this plus --attr-timeout.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub manifest_cache: Duration,
}

/// How long the kernel may cache names and attributes: `--attr-timeout`, else long where this
/// daemon is the only one changing the tree (a SQLite manifest), short where other nodes do.
fn kernel_ttls(args: &MountArgs, engine: Engine) -> crate::fuse::KernelTtls {
    let ttl = args.attr_timeout.unwrap_or(match engine {
        Engine::Sqlite if !args.no_source => Duration::from_secs(3600),
        _ => Duration::from_secs(1),
    });
    crate::fuse::KernelTtls {
        entry: ttl,
        attr: ttl,
    }
}

/// How often the daemon deletes dest objects that removals left behind.
const LEFTOVER_CHECK: Duration = Duration::from_secs(3);

/// The variable through which a daemon started in the background says it is mounted.
const READY_FD: &str = "CUTOVERFS_READY_FD";

pub async fn run(args: MountArgs) -> Result<u8> {
    if !args.foreground {
        return start_in_background().await;
    }
    if args.no_source {
        return run_replica(args).await;
    }
    let metrics_listener = args
        .metrics
        .as_deref()
        .map(crate::metrics::bind)
        .transpose()?;
    let mountpoint = crate::fuse::prepare_mountpoint(&args.mountpoint)?;
    let mut target = args.target.clone();
    if target.source.is_none() {
        target.source = Some(mountpoint.clone());
    }
    let limits = LiveLimits::new(live_limits(&args)?);
    // Everything is checked before anything is created or mounted.
    let mut resolved = with_manifest_to_upgrade(&target, async |existing| {
        let resolved = target.resolve(existing).await?;
        let mode = if args.no_sweep {
            Preflight::ReadOnly
        } else {
            Preflight::ReadWrite
        };
        resolved.store.preflight(mode).await?;
        Ok(resolved)
    })
    .await?;
    let metrics = Metrics::new(Role::Mount);
    if metrics_listener.is_some() {
        resolved.store = TimedStore::wrap(resolved.store, metrics.store_calls.clone());
    }
    // The daemon runs for weeks: SQLite's page cache is held to --cache-memory across its
    // connections (the kernel's page cache keeps the file's pages anyway).
    crate::manifest::limit_sqlite_cache(args.cache_memory);
    let manifest = Manifest::open(&resolved.manifest_url).await?;
    manifest.check_pair(&resolved.pair, true).await?;
    if !args.no_sweep {
        resolved.store.prepare().await?;
    }
    // Removals and purges a crash interrupted are finished (or undone) before anything can change.
    crate::engine::repair::repair_removals(&manifest, &resolved.source, &resolved.store).await?;
    crate::engine::purge::finish_interrupted(&manifest, &resolved.source).await?;
    let wake = Arc::new(tokio::sync::Notify::new());
    let settings = MountSettings {
        mountpoint: mountpoint.clone(),
        fsname: format!("cutoverfs:{}", resolved.pair.source),
        ttl: kernel_ttls(&args, manifest.engine()),
        row_ttl: args.manifest_cache,
        cache_memory: args.cache_memory,
        threads: args.fuse_threads as usize,
        prefetch_memory: args.prefetch_memory,
        node: node_id(),
        hold_for: args.lease_timeout,
        dest_read_deadline: args.dest_read_timeout,
    };
    let parts = Parts {
        source: resolved.source.clone(),
        manifest: manifest.clone(),
        store: resolved.store.clone(),
        wake_sweeper: wake.clone(),
        metrics: metrics.clone(),
    };
    // From here a stop must unmount; a signal during mounting is acted on right after.
    let mut signals = stop_on_signals();
    super::reload::on_sighup(
        limits.clone(),
        other_settings(&args),
        |command| match command {
            super::Command::Mount(args) => Ok(super::reload::Reread {
                limits: live_limits(&args)?,
                others: other_settings(&args),
            }),
            _ => bail!("the config file no longer starts a mount"),
        },
    );
    let mount_now = tokio::task::block_in_place(|| crate::fuse::mount(parts, &settings));
    let (mut mounted, on_verified) = mount_now?;
    tracing::info!(
        mountpoint = %mountpoint.display(),
        source = %resolved.pair.source,
        dest = %super::logs::redact_url(&resolved.pair.dest),
        manifest = %super::logs::redact_url(manifest.location()),
        "mount is live"
    );
    let reach = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        resolved.source.dir_fd()
    );
    if let Err(e) = manifest.record_mounted_source(Some(&reach)).await {
        tracing::warn!(error = %e, "cannot record where the local tree is reachable; purge and sweep will refuse this source while it is mounted");
    }
    if let Some(listener) = metrics_listener {
        crate::metrics::serve(listener, metrics.clone())?;
        super::count_for_metrics(manifest.clone(), metrics.clone());
    }
    say_ready();

    let (stop_all, stop) = tokio::sync::watch::channel(false);
    let stop_all = Arc::new(stop_all);
    {
        let stop_all = stop_all.clone();
        tokio::spawn(async move {
            if signals.wait_for(|s| *s).await.is_ok() {
                let _ = stop_all.send(true);
            }
        });
    }
    let node = process_node();
    let opts = SweepOptions {
        limits,
        batch_size: 200,
        max_retries: args.max_retries,
        retry_delay: args.retry_delay,
        lease: args.lease_timeout,
        node,
        command: "mount".into(),
        // The daemon never gives up on the dest: copies pause while it is away.
        dest_timeout: Duration::from_secs(100 * 365 * 24 * 3600),
        keep_running: Some(wake.clone()),
        on_verified: Some(on_verified),
        requests_only: args.no_sweep,
        stop_grace: args.stop_timeout,
    };
    // Replicas' requests wake the sweeper (with --no-sweep: the copier of requests only).
    let requests = manifest.watch_requests(wake);
    let cleaner = {
        let (manifest, source, store) = (
            manifest.clone(),
            resolved.source.clone(),
            resolved.store.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEFTOVER_CHECK).await;
                if let Err(e) =
                    crate::engine::repair::clean_leftovers_live(&manifest, &source, &store).await
                {
                    tracing::warn!(error = %e, "cannot check for dest objects of removed files");
                }
            }
        })
    };
    let background = {
        let (manifest, source, store, stop) = (
            manifest.clone(),
            resolved.source.clone(),
            resolved.store.clone(),
            stop.clone(),
        );
        let sweep = !args.no_sweep;
        let interval = args.progress_interval;
        let progress = move || {
            let progress = Progress::start("Migrating", true, interval);
            progress.attach_metrics(metrics);
            progress
        };
        tokio::spawn(async move {
            copy_in_background(&manifest, source, store, &opts, sweep, progress, &stop).await
        })
    };

    let ended = mounted.ended.clone();
    let mut stopped = stop.clone();
    let unmounted_outside = tokio::select! {
        _ = stopped.wait_for(|s| *s) => false,
        _ = ended.notified() => true,
    };
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    if unmounted_outside {
        tracing::info!("unmounted from outside; stopping");
    }
    // The sweeper stops after the copies in flight, while the mount goes away.
    let _ = stop_all.send(true);
    let result = tokio::task::block_in_place(|| mounted.unmount());
    let copied = match tokio::time::timeout(Duration::from_secs(120), background).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Err(anyhow::anyhow!("sweeper task failed: {e}")),
        Err(_) => Err(anyhow::anyhow!("the sweeper did not stop within 2 minutes")),
    };
    cleaner.abort();
    requests.abort();
    let _ = manifest.record_mounted_source(None).await;
    manifest.close().await;
    result?;
    copied?;
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
    Ok(exit::OK)
}

/// `mount --no-source`: a replica of the migration on a machine without the local tree. It
/// changes nothing but the request flags of files it waits for.
async fn run_replica(args: MountArgs) -> Result<u8> {
    let metrics_listener = args
        .metrics
        .as_deref()
        .map(crate::metrics::bind)
        .transpose()?;
    let mountpoint = crate::fuse::prepare_mountpoint(&args.mountpoint)?;
    let url = args.target.manifest_url()?;
    crate::manifest::limit_sqlite_cache(args.cache_memory);
    let Some(manifest) = Manifest::open_existing(&url).await? else {
        bail!(
            "no manifest at {url}: a replica serves a migration that a node with the source has \
             started (`cutoverfs mount` or `cutoverfs sweep` there first)"
        );
    };
    let checked = replica_store(&args, &manifest, &mountpoint).await;
    let store = match checked {
        Ok(store) => store,
        Err(e) => {
            manifest.close().await;
            return Err(e);
        }
    };
    let root = std::fs::metadata(&mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    let settings = crate::fuse::ReplicaSettings {
        mountpoint: mountpoint.clone(),
        fsname: "cutoverfs:replica".into(),
        ttl: kernel_ttls(&args, Engine::Postgres),
        row_ttl: args.manifest_cache,
        cache_memory: args.cache_memory,
        threads: args.fuse_threads as usize,
        prefetch_memory: args.prefetch_memory,
        wait: args.remote_wait,
        root: crate::fuse::root_attr(&root),
    };
    let mut signals = stop_on_signals();
    ignore_hangups();
    let metrics = Metrics::new(Role::Replica);
    let store = match metrics_listener {
        Some(_) => TimedStore::wrap(store, metrics.store_calls.clone()),
        None => store,
    };
    let mount_now = tokio::task::block_in_place(|| {
        crate::fuse::mount_replica(manifest.clone(), store, &settings, &metrics)
    });
    let mut mounted = mount_now?;
    tracing::info!(
        mountpoint = %mountpoint.display(),
        manifest = %super::logs::redact_url(manifest.location()),
        remote_wait = %humantime::format_duration(args.remote_wait),
        "mount is live (replica: read-only, no source)"
    );
    if let Some(listener) = metrics_listener {
        crate::metrics::serve(listener, metrics.clone())?;
        super::count_for_metrics(manifest.clone(), metrics);
    }
    say_ready();
    let ended = mounted.ended.clone();
    let unmounted_outside = tokio::select! {
        _ = signals.wait_for(|s| *s) => false,
        _ = ended.notified() => true,
    };
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    if unmounted_outside {
        tracing::info!("unmounted from outside; stopping");
    }
    let result = tokio::task::block_in_place(|| mounted.unmount());
    manifest.close().await;
    result?;
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
    Ok(exit::OK)
}

/// A replica has no live settings to reload; SIGHUP (`systemctl reload`) must not end it.
fn ignore_hangups() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::info!("SIGHUP: a replica has no settings to reload; nothing changed");
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; it would end the process, so do not send it")
        }
    }
}

/// The dest a replica reads: the one recorded in the manifest (a --dest must name it), checked
/// readable. Refuses to hide the recorded source tree under a replica.
async fn replica_store(
    args: &MountArgs,
    manifest: &Manifest,
    mountpoint: &std::path::Path,
) -> Result<Arc<dyn crate::store::Store>> {
    let Some(pair) = manifest.pair().await? else {
        bail!(
            "manifest {} records no source and dest yet: start the migration on a node with the \
             source first",
            super::logs::redact_url(manifest.location())
        );
    };
    if std::path::Path::new(&pair.source) == mountpoint
        && std::fs::read_dir(mountpoint)?.next().is_some()
    {
        bail!(
            "{} is the source tree of this migration and holds files: a replica (--no-source) \
             would hide them; mount it without --no-source here",
            mountpoint.display()
        );
    }
    let dest_text = args
        .target
        .dest
        .clone()
        .unwrap_or_else(|| pair.dest.clone());
    let dest = crate::store::DestUrl::parse(&dest_text)?;
    let store = crate::store::open_store(&dest, &args.target.s3.flags()).await?;
    if store.canonical_url() != pair.dest {
        bail!(
            "dest {} is not the dest of this migration ({} in manifest {})",
            store.canonical_url(),
            pair.dest,
            super::logs::redact_url(manifest.location())
        );
    }
    store.preflight(Preflight::ReadOnly).await?;
    Ok(store)
}

/// The settings SIGHUP re-reads (see `reload`).
fn live_limits(args: &MountArgs) -> Result<Limits> {
    Ok(Limits {
        concurrency: args.concurrency as usize,
        bwlimit: args.bwlimit,
        max_ops: args.max_ops,
        filter: args.scope.filter()?,
    })
}

/// The other settings, to tell when a reload sees them changed (they need a restart).
fn other_settings(args: &MountArgs) -> String {
    let mut rest = args.clone();
    rest.concurrency = 0;
    rest.bwlimit = None;
    rest.max_ops = None;
    rest.scope = Scope::default();
    format!("{rest:?}")
}

/// Scans the source into the manifest (the mount is already live), then sweeps until stopped.
async fn copy_in_background(
    manifest: &Manifest,
    source: Arc<crate::source::SourceTree>,
    store: Arc<dyn crate::store::Store>,
    opts: &SweepOptions,
    sweep: bool,
    progress: impl FnOnce() -> Arc<Progress>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    manifest.close_abandoned_batches(&opts.node).await?;
    match scan_patiently(manifest, source.clone(), store.clone(), stop).await {
        Ok(stats) => tracing::info!(files = stats.files, dirs = stats.dirs, "scan done"),
        Err(ScanError::Interrupted) => return Ok(()),
        Err(ScanError::Manifest(e)) => return Err(e.into()),
    }
    if !sweep {
        // Only what replicas request is copied; the dest may not have been made ready.
        if let Err(e) = store.prepare().await {
            tracing::warn!(error = %e, "cannot prepare the dest for files replicas request");
        }
    }
    let progress = progress();
    let report = run_sweep(manifest, source, store, opts, progress, stop).await?;
    tracing::info!(
        copied = report.copied,
        already_there = report.already_there,
        failed_attempts = report.failed_attempts,
        "sweeper stopped"
    );
    Ok(())
}

fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Tells systemd (`Type=notify`) and a parent waiting in `start_in_background` that the mount
/// is live.
fn say_ready() {
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    if let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: the parent handed this descriptor down for exactly this message.
        let pipe = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut pipe = std::fs::File::from(pipe);
        let _ = std::io::Write::write_all(&mut pipe, b"ready\n");
        // The starter exits now and its end of our stderr pipe with it: further writes there
        // would fail (and `eprintln!` would panic), so stderr becomes /dev/null; logs go on to
        // --log-file.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            // SAFETY: duplicating a descriptor we own onto stderr.
            unsafe {
                libc::dup2(null.as_raw_fd(), libc::STDERR_FILENO);
            }
        }
    }
}

/// Runs this same command again with `--foreground` as a detached daemon and returns once it
/// reports the mount live, or fails with its exit status if it dies first.
async fn start_in_background() -> Result<u8> {
    use std::os::unix::process::CommandExt;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are ours.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut args: Vec<OsString> = super::effective_args().into_iter().skip(1).collect();
    args.push("--foreground".into());
    let exe = std::env::current_exe().context("cannot find the cutoverfs executable")?;
    let child_fd = write_end.as_raw_fd();
    let mut command = std::process::Command::new(exe);
    command
        .args(args)
        .env(READY_FD, child_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            let flags = libc::fcntl(child_fd, libc::F_GETFD);
            libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = command.spawn().context("cannot start the daemon")?;
    drop(write_end);
    // Until the mount is live, the daemon's messages are ours; afterwards only --log-file
    // (or the journal, with --foreground under systemd) gets them.
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
    }
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = BufReader::new(std::fs::File::from(read_end)).read_line(&mut line);
        line
    })
    .await?;
    if line.trim() == "ready" {
        return Ok(exit::OK);
    }
    let status = child.wait()?;
    bail!("the daemon stopped before the mount was live ({status})")
}

/// `mount.cutoverfs SOURCE MOUNTPOINT [-o OPTIONS]` → `cutoverfs mount MOUNTPOINT ...`.
///
/// OPTIONS carry the flags as `key=value` or bare `key` (`dest=s3://b/p,manifest=sqlite:///…,
/// no_sweep`); `_` and `-` are the same. Generic mount options (`rw`, `nofail`, `_netdev`,
/// `x-systemd.*`...) are for mount(8) and systemd and are skipped. SOURCE is the legacy tree;
/// `cutoverfs` or the mountpoint itself means the mountpoint's own directory.
pub fn helper_args(argv: &[OsString]) -> Result<Vec<OsString>> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut rest = argv.iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.to_str() {
            Some("-o") => options.push(
                rest.next()
                    .and_then(|o| o.to_str())
                    .context("-o needs an option list")?
                    .to_string(),
            ),
            Some(flag) if flag.starts_with("-o") => options.push(flag[2..].to_string()),
            // -n (no mtab), -s (sloppy), -v (verbose) change nothing here.
            Some("-n") | Some("-s") | Some("-v") => {}
            Some(flag) if flag.starts_with('-') && flag.len() > 1 => {
                bail!("mount.cutoverfs: unknown flag {flag}")
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        bail!("usage: mount.cutoverfs SOURCE MOUNTPOINT [-o dest=URL,manifest=URL,...]");
    };
    let mut args: Vec<OsString> = vec!["cutoverfs".into(), "mount".into(), mountpoint.clone()];
    if source != "cutoverfs" && source != mountpoint {
        args.push("--source".into());
        args.push(source.clone());
    }
    for option in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (key, value) = match option.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (option, None),
        };
        if is_generic_mount_option(key) {
            continue;
        }
        args.push(format!("--{}", key.replace('_', "-")).into());
        if let Some(value) = value {
            args.push(value.into());
        }
    }
    Ok(args)
}

fn is_generic_mount_option(key: &str) -> bool {
    const GENERIC: [&str; 18] = [
        "defaults", "rw", "ro", "auto", "noauto", "user", "nouser", "users", "nofail", "_netdev",
        "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime",
    ];
    GENERIC.contains(&key) || key.starts_with("x-") || key.starts_with("comment")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn helper_options_become_flags() {
        let argv: Vec<OsString> = [
            "mount.cutoverfs",
            "cutoverfs",
            "/srv/media",
            "-o",
            "rw,nofail,x-systemd.requires=network.target,dest=s3://b/p?region=x,manifest=sqlite:///var/m.db,no_sweep,bwlimit=10MiB",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(
            strings(&helper_args(&argv).unwrap()),
            [
                "cutoverfs",
                "mount",
                "/srv/media",
                "--dest",
                "s3://b/p?region=x",
                "--manifest",
                "sqlite:///var/m.db",
                "--no-sweep",
                "--bwlimit",
                "10MiB"
            ]
        );
    }

    #[test]
    fn helper_source_other_than_the_mountpoint_is_passed_on() {
        let argv: Vec<OsString> = [
            "mount.cutoverfs",
            "/old/media",
            "/srv/media",
            "-odest=file:///x",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let args = strings(&helper_args(&argv).unwrap());
        assert_eq!(args[3..5], ["--source", "/old/media"]);
        assert!(helper_args(&argv[..2]).is_err());
    }
}
