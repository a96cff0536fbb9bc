//! One migration under test with its dest, `file://` or S3 (the in-process server): running
//! commands with the right flags and credentials, reaching and damaging dest copies from
//! outside cutoverfs, and mounting the tree.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use super::mount::Daemon;
use super::s3::S3Server;
use super::{command, run_command, Run, Work};

pub enum Dest {
    File,
    S3(Box<S3Server>),
}

pub struct Cutover {
    pub w: Work,
    pub dest: Dest,
}

/// The key prefix of S3 dests here.
const PREFIX: &str = "media";

impl Cutover {
    pub fn file() -> Cutover {
        Cutover {
            w: Work::new(),
            dest: Dest::File,
        }
    }

    pub fn s3() -> Cutover {
        Cutover {
            w: Work::new(),
            dest: Dest::S3(Box::new(S3Server::in_process())),
        }
    }

    pub fn name(&self) -> &'static str {
        match self.dest {
            Dest::File => "file://",
            Dest::S3(_) => "s3://",
        }
    }

    pub fn dest_url(&self) -> String {
        match &self.dest {
            Dest::File => self.w.dest_url(),
            Dest::S3(server) => server.dest_url(PREFIX),
        }
    }

    /// Credentials a process needs for the dest.
    pub fn env(&self) -> Vec<(String, String)> {
        match &self.dest {
            Dest::File => Vec::new(),
            Dest::S3(server) => server.env(),
        }
    }

    /// `--source --dest --manifest` of this migration.
    pub fn target(&self) -> Vec<OsString> {
        self.w.target_with_dest(&self.dest_url())
    }

    /// A command of the binary with this migration's flags (`--no-progress` where it has it).
    pub fn command(&self, cmd: &str, extra: &[&str]) -> std::process::Command {
        let mut c = command();
        if let Dest::S3(server) = &self.dest {
            server.apply_env(&mut c);
        }
        c.arg(cmd).args(self.target());
        if matches!(cmd, "sweep" | "verify") {
            c.arg("--no-progress");
        }
        c.args(extra);
        c
    }

    pub fn run(&self, cmd: &str, extra: &[&str]) -> Run {
        run_command(&mut self.command(cmd, extra))
    }

    /// The file holding the dest copy of `rel`: in the `file://` dest, or where the in-process
    /// S3 server keeps the object's bytes (to damage it from outside cutoverfs).
    pub fn dest_file(&self, rel: &str) -> PathBuf {
        match &self.dest {
            Dest::File => self.w.dest.join(rel),
            Dest::S3(server) => server.dir().join("data/media").join(PREFIX).join(rel),
        }
    }

    pub fn read_dest(&self, rel: &str) -> Option<Vec<u8>> {
        match &self.dest {
            Dest::File => fs::read(self.w.dest.join(rel)).ok(),
            Dest::S3(server) => server.get(&format!("{PREFIX}/{rel}")),
        }
    }

    /// The relative path of every object at the dest (temporary names of a `file://` dest
    /// included: none may be left).
    pub fn dest_paths(&self) -> Vec<String> {
        match &self.dest {
            Dest::File if !self.w.dest.exists() => Vec::new(),
            Dest::File => files_below(&self.w.dest).into_keys().collect(),
            Dest::S3(server) => server
                .list(&format!("{PREFIX}/"))
                .into_iter()
                .map(|(key, _)| key[PREFIX.len() + 1..].to_string())
                .collect(),
        }
    }

    /// Deletes the dest copy of `rel` behind cutoverfs's back.
    pub fn delete_dest(&self, rel: &str) {
        match &self.dest {
            Dest::File => fs::remove_file(self.w.dest.join(rel)).unwrap(),
            Dest::S3(server) => server.delete(&format!("{PREFIX}/{rel}")),
        }
    }

    /// Mounts the daemon on `<root>/mnt` over this migration (extra flags after the target).
    pub fn mount(&self, extra: &[&str]) -> (PathBuf, Daemon) {
        let mnt = self.w.root.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let mut args = self.target();
        args.extend(extra.iter().map(OsString::from));
        let daemon = Daemon::start_with_env(&mnt, &args, &self.env());
        (mnt, daemon)
    }
}

/// Flips one byte of a file in place (its mtime moves, as any writer's would).
pub fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
}

/// Flips one byte and puts the file's mtime back: only reading it shows the change.
pub fn flip_byte_keeping_mtime(path: &Path, at: u64) {
    let mtime = fs::metadata(path).unwrap().modified().unwrap();
    flip_byte(path, at);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// Every regular file below `root` by relative path, with its bytes.
pub fn files_below(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    fs::read(entry.path()).unwrap(),
                );
            }
        }
    }
    out
}
