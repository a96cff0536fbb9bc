//! Access control as the application sees it (DESIGN §4.6): the mount is `allow_other` and
//! `default_permissions`, so a user other than root reads, lists, creates and writes exactly
//! where it could on the plain directory and gets EACCES where it could not, before and after
//! the files moved to the dest. And the manifest is root's alone, whoever's umask created it.

mod common;

use std::fs;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::cutover::Cutover;
use common::*;

const NOBODY: u32 = 65534;

/// The tree: files and directories of each kind of permission a media tree has.
fn build(root: &Path) {
    let file = |rel: &str, mode: u32, owner: Option<(u32, u32)>| {
        let path = write_file(&root.join(rel), format!("content of {rel}\n").as_bytes());
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        if let Some((uid, gid)) = owner {
            chown(&path, Some(uid), Some(gid)).unwrap();
        }
    };
    let dir = |rel: &str, mode: u32, owner: Option<(u32, u32)>| {
        let path = root.join(rel);
        fs::create_dir_all(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        if let Some((uid, gid)) = owner {
            chown(&path, Some(uid), Some(gid)).unwrap();
        }
    };
    dir("pub", 0o755, None);
    file("pub/readable.txt", 0o644, None);
    file("pub/secret.txt", 0o600, None);
    file("pub/group.txt", 0o640, Some((0, NOBODY)));
    file("pub/theirs.txt", 0o600, Some((NOBODY, NOBODY)));
    file("pub/writable.txt", 0o666, None);
    dir("private", 0o700, None);
    file("private/inside.txt", 0o644, None);
    dir("traverse-only", 0o711, None);
    file("traverse-only/known.txt", 0o644, None);
    dir("nobodys", 0o755, Some((NOBODY, NOBODY)));
    file("nobodys/mine.txt", 0o644, Some((NOBODY, NOBODY)));
    dir("roots", 0o755, None);
}

/// What `nobody` may do, as a list of (operation, path, outcome) lines.
fn as_nobody(root: &Path, with_writes: bool) -> Vec<String> {
    let mut ops: Vec<(&str, String)> = Vec::new();
    for rel in [
        "pub/readable.txt",
        "pub/secret.txt",
        "pub/group.txt",
        "pub/theirs.txt",
        "private/inside.txt",
        "traverse-only/known.txt",
        "nobodys/mine.txt",
    ] {
        ops.push(("read", format!("cat -- '{rel}'")));
    }
    for rel in ["pub", "private", "traverse-only", "nobodys", "roots"] {
        ops.push(("list", format!("ls -- '{rel}'")));
    }
    if with_writes {
        for rel in ["pub/writable.txt", "pub/readable.txt", "nobodys/mine.txt"] {
            ops.push(("append", format!("echo more >> '{rel}'")));
        }
        for rel in ["nobodys/new.txt", "roots/new.txt", "private/new.txt"] {
            ops.push(("create", format!("echo new > '{rel}'")));
        }
        ops.push(("mkdir", "mkdir roots/sub".into()));
        ops.push(("mkdir", "mkdir nobodys/sub".into()));
        ops.push(("unlink", "rm -f pub/readable.txt".into()));
        ops.push(("unlink", "rm -f nobodys/mine.txt".into()));
    }
    ops.iter()
        .map(|(op, script)| {
            let out = Command::new("setpriv")
                .args([
                    "--reuid",
                    "65534",
                    "--regid",
                    "65534",
                    "--clear-groups",
                    "--",
                ])
                .args(["sh", "-c", script])
                .current_dir(root)
                .output()
                .expect("setpriv (util-linux)");
            let said = String::from_utf8_lossy(&out.stderr);
            let outcome = if out.status.success() {
                "ok"
            } else if said.contains("Permission denied") {
                "EACCES"
            } else {
                panic!("{op} `{script}` in {}: {said}", root.display())
            };
            format!("{op} {script}: {outcome}")
        })
        .collect()
}

/// Lets `nobody` reach the test's directories (temp dirs are private to root).
fn open_up(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_user_other_than_root_may_do_through_the_mount_what_it_may_on_the_plain_directory() {
    let c = Cutover::file();
    open_up(&c.w.root);
    let plain = c.w.root.join("plain");
    build(&plain);
    build(&c.w.src);
    open_up(&c.w.src);
    let expected = as_nobody(&plain, true);
    assert!(
        expected.iter().any(|l| l.ends_with("EACCES"))
            && expected.iter().any(|l| l.ends_with(": ok"))
    );

    let (mnt, daemon) = c.mount(&["--no-sweep"]);
    open_up(&mnt);
    assert_eq!(as_nobody(&mnt, true), expected, "local copies");
    daemon.stop();

    // Moved to the dest and purged: the modes and owners the manifest recorded decide.
    let (c2, expected_reads) = {
        let c2 = Cutover::file();
        open_up(&c2.w.root);
        let plain = c2.w.root.join("plain");
        build(&plain);
        build(&c2.w.src);
        open_up(&c2.w.src);
        (c2, as_nobody(&plain, false))
    };
    c2.run("sweep", &[]).assert_code(0);
    c2.run("purge", &["--confirm"]).assert_code(0);
    let (mnt, daemon) = c2.mount(&["--no-sweep"]);
    open_up(&mnt);
    assert_eq!(as_nobody(&mnt, false), expected_reads, "dest copies");
    daemon.stop();
}

/// The manifest, its directory and its -wal/-shm files are root's alone (0700/0600), whichever
/// command created them and whatever the umask.
#[test]
fn the_manifest_is_private_to_root_whatever_the_umask() {
    for creator in ["sweep", "mount"] {
        let c = Cutover::file();
        c.w.write("a.txt", b"alpha");
        let bin = bin();
        let target: Vec<String> = c
            .target()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let daemon = if creator == "sweep" {
            let script = format!(
                "umask 000; exec '{bin}' sweep {} --no-progress",
                target.join(" ")
            );
            let out = Command::new("sh").args(["-c", &script]).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // A daemon on it afterwards keeps its WAL files open while it runs.
            None
        } else {
            let mnt = c.w.root.join("mnt");
            fs::create_dir_all(&mnt).unwrap();
            let script = format!(
                "umask 000; exec '{bin}' mount '{}' {} --foreground",
                mnt.display(),
                target.join(" ")
            );
            let mut child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
            common::mount::wait_until(
                std::time::Duration::from_secs(30),
                "the mount's WAL",
                || c.w.manifest.with_extension("db-wal").exists(),
            );
            let _ = &mut child;
            Some((child, mnt))
        };
        let dir = c.w.manifest.parent().unwrap();
        assert_eq!(
            fs::metadata(dir).unwrap().mode() & 0o7777,
            0o700,
            "{creator}: the directory"
        );
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            assert_eq!(
                meta.mode() & 0o7777,
                0o600,
                "{creator}: {}",
                entry.file_name().to_string_lossy()
            );
            assert_eq!(meta.uid(), 0);
        }
        if let Some((mut child, mnt)) = daemon {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            assert!(child.wait().unwrap().success());
            assert!(!common::mount::is_mounted(&mnt));
        }
    }
}
