//! Invariant 5 (DESIGN §4.5) with a dest that stalls rather than stops: one that accepts
//! connections and never answers, and one that answers at one byte per second. Every file with
//! a local copy still opens and reads through the mount within a bound a user accepts, copies
//! pause instead of failing, and the daemon unmounts without hanging; once the dest is back,
//! the copies finish.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::cutover::files_below;
use common::mount::{wait_until, Daemon};
use common::s3::{S3Server, Stall, StallingProxy};
use common::*;

/// A read waits `--dest-read-timeout` (3 s by default) for a stalled dest at most, once: then
/// the dest is taken for down and local copies answer at once. 10 s leaves room for a loaded
/// machine and still fails a read that waits for the S3 client's own timeouts (a minute).
const ONE_READ_BOUND: Duration = Duration::from_secs(10);
/// All reads of the tree together: a few slow ones at most, never one per file.
const ALL_READS_BOUND: Duration = Duration::from_secs(30);
/// The stop waits `--stop-timeout 5s` for copies stuck at the dest, then unmounts.
const STOP_BOUND: Duration = Duration::from_secs(30);

fn dest_url(server: &S3Server, proxy: &StallingProxy) -> String {
    format!(
        "s3://{}/stall?endpoint={}&region={}&path_style=true",
        server.bucket(),
        proxy.endpoint(),
        server.region()
    )
}

fn target(w: &Work, dest: &str) -> Vec<std::ffi::OsString> {
    w.target_with_dest(dest)
}

#[test]
fn a_stalled_dest_never_stalls_reads_of_files_with_a_local_copy() {
    let server = S3Server::in_process();
    let proxy = StallingProxy::start(&server.endpoint());
    let dest = dest_url(&server, &proxy);
    let w = Work::new();
    small_tree(&w, 30, 3, 100, 20_000, 4);
    w.write("big/scan.tiff", &pseudo_random(3 << 20, 9));
    let mut sweep = command();
    server.apply_env(&mut sweep);
    run_command(
        sweep
            .arg("sweep")
            .args(target(&w, &dest))
            .arg("--no-progress"),
    )
    .assert_code(0);
    // Written after the sweep: the daemon's sweeper has copies to make.
    for i in 0..20 {
        w.write(
            &format!("new/upload-{i}.jpg"),
            &pseudo_random(5_000, 100 + i),
        );
    }
    let truth = files_below(&w.src);

    for stall in [Stall::Silent, Stall::Trickle] {
        let mnt = w.root.join(format!("mnt-{stall:?}"));
        fs::create_dir_all(&mnt).unwrap();
        let mut args = target(&w, &dest);
        args.extend(["--stop-timeout", "5s"].map(std::ffi::OsString::from));
        let daemon = Daemon::start_with_env(&mnt, &args, &server.env());
        proxy.set(stall);

        let started = Instant::now();
        for (rel, bytes) in &truth {
            let one = Instant::now();
            let served = fs::read(mnt.join(rel)).unwrap_or_else(|e| panic!("{stall:?} {rel}: {e}"));
            assert!(served == *bytes, "{stall:?} {rel}: wrong bytes");
            assert!(
                one.elapsed() < ONE_READ_BOUND,
                "{stall:?} {rel}: one read took {:?}",
                one.elapsed()
            );
        }
        assert!(
            started.elapsed() < ALL_READS_BOUND,
            "{stall:?}: reading the tree took {:?}",
            started.elapsed()
        );
        // Copies pause: none is given up as failed while the dest stalls.
        let status = w.status();
        assert_eq!(
            state_count(&status, "files", "failed"),
            0,
            "{stall:?}: {status:#}"
        );
        assert!(
            state_count(&status, "files", "verified") < truth.len() as u64,
            "{stall:?}"
        );

        let stopping = Instant::now();
        let log = daemon.stop();
        assert!(
            stopping.elapsed() < STOP_BOUND,
            "{stall:?}: the unmount took {:?}\n{log}",
            stopping.elapsed()
        );
        assert!(log.contains("serving local copies"), "{stall:?}: {log}");
        proxy.set(Stall::None);
    }

    // The dest answers again: a daemon copies what waited, and serves it all.
    let mnt = w.root.join("mnt-back");
    fs::create_dir_all(&mnt).unwrap();
    let daemon = Daemon::start_with_env(&mnt, &target(&w, &dest), &server.env());
    wait_until(Duration::from_secs(120), "every file verified", || {
        state_count(&w.status(), "files", "verified") == truth.len() as u64
    });
    for (rel, bytes) in &truth {
        assert!(fs::read(mnt.join(rel)).unwrap() == *bytes, "{rel}");
    }
    daemon.stop();
}
