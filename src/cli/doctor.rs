//! `cutoverfs doctor`: checks that this machine can run the daemon and the sweeper — the FUSE
//! device, privileges, passthrough, the dest, the manifest and the free space local-first
//! writes need — and says what to fix. It changes nothing: no manifest, dest directory or file
//! is created (an S3 dest gets a probe object that is deleted at once, as every command's
//! preflight does).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{exit, parse_size, Target};
use crate::manifest::{Health, Manifest, ManifestUrl, Pair};
use crate::store::{open_store, DestUrl, Preflight};
use crate::util::human_bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// The directory the daemon will mount over (its legacy files are the source).
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: Option<PathBuf>,
    #[command(flatten)]
    pub target: Target,
    /// Free space the source's file system must keep for uploads that land locally first.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub min_free: u64,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warning,
    Fail,
}

/// One check's verdict, and what to do about it when it is not ok.
#[derive(Debug, Clone, Serialize)]
struct Check {
    check: &'static str,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

impl Check {
    fn ok(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warning(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check,
            status: Status::Warning,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

pub async fn run(args: DoctorArgs) -> Result<u8> {
    // Bad input (a malformed URL) is an error of its own, before any check.
    let manifest_url = args.target.manifest_url()?;
    if let Some(dest) = &args.target.dest {
        DestUrl::parse(dest)?;
    }
    let mut checks = vec![check_fuse_device()];
    let privileged = check_privileges();
    let may_mount = privileged.status == Status::Ok;
    checks.push(privileged);
    checks.push(if checks[0].status == Status::Ok && may_mount {
        tokio::task::spawn_blocking(check_passthrough).await?
    } else {
        Check::warning(
            "passthrough",
            "not checked: no FUSE file system can be mounted here",
            "fix the FUSE device and privileges first",
        )
    });
    let (manifest_check, recorded) = check_manifest(&manifest_url).await;
    checks.push(manifest_check);
    checks.push(check_dest(&args.target, recorded.as_ref()).await);
    let source = args
        .mountpoint
        .clone()
        .or_else(|| args.target.source.clone())
        .or_else(|| recorded.map(|pair| PathBuf::from(pair.source)));
    checks.push(check_free_space(source.as_deref(), args.min_free));
    print(&checks, args.format)?;
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    Ok(if failed { exit::INCOMPLETE } else { exit::OK })
}

fn check_fuse_device() -> Check {
    const NAME: &str = "fuse device";
    let device = Path::new("/dev/fuse");
    let meta = match std::fs::metadata(device) {
        Ok(meta) => meta,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("/dev/fuse: {e}"),
                "load the fuse module (modprobe fuse); in a container, pass the device \
                 (--device /dev/fuse) and the SYS_ADMIN capability",
            )
        }
    };
    if !meta.file_type().is_char_device() {
        return Check::fail(
            NAME,
            "/dev/fuse is not a character device",
            "remove it and load the fuse module (modprobe fuse), or pass the host's device into the container",
        );
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
    {
        Ok(_) => Check::ok(NAME, "/dev/fuse opens read-write"),
        Err(e) => Check::fail(
            NAME,
            format!("/dev/fuse cannot be opened read-write: {e}"),
            "run as root, or give this user access to /dev/fuse (group fuse, mode 0666 is usual); \
             in a container, allow the device in its cgroup (--device /dev/fuse)",
        ),
    }
}

fn check_privileges() -> Check {
    const NAME: &str = "privileges";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && has_sys_admin() {
        return Check::ok(
            NAME,
            "root with CAP_SYS_ADMIN: mounts directly, with allow_other",
        );
    }
    if has_sys_admin() {
        return Check::ok(NAME, "CAP_SYS_ADMIN: mounts directly, with allow_other");
    }
    let fusermount = find_on_path("fusermount3");
    let allow_other = std::fs::read_to_string("/etc/fuse.conf")
        .map(|conf| {
            conf.lines()
                .any(|line| line.trim_start().starts_with("user_allow_other"))
        })
        .unwrap_or(false);
    match (fusermount, allow_other) {
        (Some(path), true) => Check::warning(
            NAME,
            format!("not root: mounts go through {}", path.display()),
            "run the daemon as root (the systemd unit does) so the kernel checks permissions as on the original directory",
        ),
        (Some(path), false) => Check::fail(
            NAME,
            format!(
                "not root: {} can mount, but /etc/fuse.conf lacks user_allow_other, and the \
                 application (another user) could not see the mount",
                path.display()
            ),
            "run the daemon as root, or add user_allow_other to /etc/fuse.conf",
        ),
        (None, _) => Check::fail(
            NAME,
            "not root, no CAP_SYS_ADMIN and no fusermount3 on PATH: cannot mount",
            "run the daemon as root (or with CAP_SYS_ADMIN), or install fuse3 for fusermount3",
        ),
    }
}

/// Whether this process has CAP_SYS_ADMIN in its effective set.
fn has_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn check_passthrough() -> Check {
    const NAME: &str = "passthrough";
    match crate::fuse::probe_kernel() {
        Ok(offer) if offer.passthrough => Check::ok(
            NAME,
            "offered by this kernel: local files are read by the kernel directly",
        ),
        Ok(_) => Check::warning(
            NAME,
            "not offered by this kernel: the daemon serves reads of local files itself (slower)",
            "a kernel of 6.9 or later with FUSE passthrough (CONFIG_FUSE_PASSTHROUGH) reads local files at native speed",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("a test mount failed: {e}"),
            "check the FUSE device and privileges above; in a container, add the SYS_ADMIN capability",
        ),
    }
}

/// The manifest's health, and the source and dest it records (to check those when no flag
/// names them).
async fn check_manifest(url: &ManifestUrl) -> (Check, Option<Pair>) {
    const NAME: &str = "manifest";
    let health = match Manifest::health(url).await {
        Ok(health) => health,
        Err(e) => {
            return (
                Check::fail(
                    NAME,
                    format!("{url}: {e}"),
                    "check the URL, that the database answers, and its credentials; a damaged \
                     SQLite file can be restored from a backup",
                ),
                None,
            )
        }
    };
    let Some(health) = health else {
        return (manifest_to_create(url), None);
    };
    let check = judge_manifest(url, &health);
    (check, health.pair)
}

fn manifest_to_create(url: &ManifestUrl) -> Check {
    const NAME: &str = "manifest";
    let ManifestUrl::Sqlite(path) = url else {
        return Check::ok(
            NAME,
            format!("{url}: reachable, no schema yet (the first command creates it)"),
        );
    };
    let mut dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    while !dir.exists() {
        if !dir.pop() {
            break;
        }
    }
    if writable_dir(&dir) {
        Check::ok(
            NAME,
            format!("{url}: none yet; the first command creates it"),
        )
    } else {
        Check::fail(
            NAME,
            format!("{url}: none yet, and {} is not writable", dir.display()),
            "give --manifest a path in a writable directory (the default is under /var/lib/cutoverfs)",
        )
    }
}

fn judge_manifest(url: &ManifestUrl, health: &Health) -> Check {
    const NAME: &str = "manifest";
    if let Some(said) = health.integrity.as_deref().filter(|said| *said != "ok") {
        return Check::fail(
            NAME,
            format!("{url}: SQLite integrity check failed: {said}"),
            "stop every cutoverfs process on it and restore the manifest from a backup",
        );
    }
    if health.schema > health.known_schema {
        return Check::fail(
            NAME,
            format!(
                "{url}: schema version {} was made by a newer cutoverfs (this one knows {})",
                health.schema, health.known_schema
            ),
            "run the cutoverfs version that wrote this manifest, or a newer one",
        );
    }
    if let ManifestUrl::Sqlite(path) = url {
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Check::warning(
                    NAME,
                    format!("{url}: readable by others (mode {mode:o})"),
                    format!("chmod 600 {}", path.display()),
                );
            }
        }
    }
    let mut detail = format!("{url}: schema {} of {}", health.schema, health.known_schema);
    if health.integrity.is_some() {
        detail.push_str(", integrity ok");
    }
    if health.schema < health.known_schema {
        detail.push_str(" (upgraded at the next start)");
    }
    if let Some(pair) = &health.pair {
        detail.push_str(&format!(", source {} → dest {}", pair.source, pair.dest));
    }
    Check::ok(NAME, detail)
}

async fn check_dest(target: &Target, recorded: Option<&Pair>) -> Check {
    const NAME: &str = "dest";
    let text = match (&target.dest, recorded) {
        (Some(dest), _) => dest.clone(),
        (None, Some(pair)) => pair.dest.clone(),
        (None, None) => {
            return Check::warning(
                NAME,
                "not checked: no --dest given and no manifest records one",
                "give --dest URL",
            )
        }
    };
    let url = match DestUrl::parse(&text) {
        Ok(url) => url,
        Err(e) => return Check::fail(NAME, e.to_string(), "correct the dest URL"),
    };
    let store = match open_store(&url, &target.s3.flags()).await {
        Ok(store) => store,
        Err(e) => return Check::fail(NAME, format!("{text}: {e}"), dest_fix(&url)),
    };
    if let Err(e) = store.preflight(Preflight::ReadWrite).await {
        return Check::fail(NAME, format!("{text}: {e}"), dest_fix(&url));
    }
    match &url {
        DestUrl::Local(path) => match free_space(&nearest_existing(path)) {
            Ok(space) => Check::ok(
                NAME,
                format!(
                    "{text}: writable, {} free",
                    human_bytes(space.available_bytes)
                ),
            ),
            Err(e) => Check::fail(NAME, format!("{text}: {e}"), dest_fix(&url)),
        },
        DestUrl::S3(_) => Check::ok(
            NAME,
            format!("{text}: reachable; a probe object was written, read back and deleted"),
        ),
    }
}

fn dest_fix(url: &DestUrl) -> &'static str {
    match url {
        DestUrl::Local(_) => {
            "make the directory (or its nearest existing parent) writable by the daemon's user, \
             on a read-write file system"
        }
        DestUrl::S3(_) => {
            "check the endpoint, region, bucket and credentials (AWS_ACCESS_KEY_ID/\
             AWS_SECRET_ACCESS_KEY or the profile), and the machine's clock"
        }
    }
}

fn check_free_space(source: Option<&Path>, min_free: u64) -> Check {
    const NAME: &str = "free space";
    let Some(source) = source else {
        return Check::warning(
            NAME,
            "not checked: no mountpoint or --source given and no manifest records one",
            "give the MOUNTPOINT or --source DIR",
        );
    };
    let space = match free_space(source) {
        Ok(space) => space,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("{}: {e}", source.display()),
                "give the directory the application writes its uploads to",
            )
        }
    };
    let detail = format!(
        "{}: {} free of {} ({}%), {} inodes free",
        source.display(),
        human_bytes(space.available_bytes),
        human_bytes(space.total_bytes),
        space.percent_free(),
        space.available_inodes
    );
    let fix = "free space on that file system: uploads land there first, before they are copied";
    if space.available_bytes < min_free || space.percent_free() < 2 {
        return Check::fail(NAME, format!("{detail}; nearly full"), fix);
    }
    if space.inodes_tracked() && space.available_inodes < 10_000 {
        return Check::fail(NAME, format!("{detail}; nearly out of inodes"), fix);
    }
    if space.percent_free() < 10 {
        return Check::warning(NAME, detail, fix);
    }
    Check::ok(NAME, detail)
}

struct Space {
    available_bytes: u64,
    total_bytes: u64,
    available_inodes: u64,
    total_inodes: u64,
}

impl Space {
    fn percent_free(&self) -> u64 {
        (self.available_bytes * 100)
            .checked_div(self.total_bytes)
            .unwrap_or(100)
    }

    /// Some file systems (btrfs, some FUSE ones) report no inode counts.
    fn inodes_tracked(&self) -> bool {
        self.total_inodes > 0
    }
}

fn free_space(path: &Path) -> std::io::Result<Space> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a statvfs buffer.
    if unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded and filled the buffer.
    let st = unsafe { st.assume_init() };
    let block = st.f_frsize;
    Ok(Space {
        available_bytes: st.f_bavail * block,
        total_bytes: st.f_blocks * block,
        available_inodes: st.f_favail,
        total_inodes: st.f_files,
    })
}

fn nearest_existing(path: &Path) -> PathBuf {
    let mut dir = path.to_path_buf();
    while !dir.exists() {
        if !dir.pop() {
            break;
        }
    }
    dir
}

fn writable_dir(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path.
    unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        ) == 0
    }
}

fn print(checks: &[Check], format: Format) -> Result<()> {
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks
        .iter()
        .filter(|c| c.status == Status::Warning)
        .count();
    match format {
        Format::Json => {
            let report = serde_json::json!({
                "ok": failed == 0,
                "failed": failed,
                "warnings": warned,
                "checks": checks,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Format::Human => {
            for check in checks {
                let status = match check.status {
                    Status::Ok => "ok",
                    Status::Warning => "WARNING",
                    Status::Fail => "FAIL",
                };
                println!("{status:<8} {:<12} {}", check.check, check.detail);
                if let Some(fix) = &check.fix {
                    println!("{:<8} {:<12} fix: {fix}", "", "");
                }
            }
            println!();
            match (failed, warned) {
                (0, 0) => println!("All is well."),
                (0, n) => println!("All is well, with {n} warning(s)."),
                (n, _) => println!("{n} problem(s) to fix before running cutoverfs here."),
            }
        }
    }
    Ok(())
}
