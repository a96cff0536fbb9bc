//! `--metrics ADDR` (issue 6, point 6): a real mount and a real sweep serve Prometheus text over
//! HTTP; the scrape is parsed and its numbers match what was done. A bad address stops the
//! command before it copies anything.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::mount::{wait_until, Daemon};
use common::s3::S3Server;
use common::*;

/// `GET /metrics`, parsed into `name{labels}` → value; None while nothing listens.
fn scrape(addr: &str) -> Option<HashMap<String, f64>> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut samples = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        samples.insert(series.to_string(), value.parse().expect("number"));
    }
    Some(samples)
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[test]
fn a_mount_counts_the_files_its_sweeper_migrates() {
    let w = Work::new();
    let sizes = [10usize, 200, 3000];
    for (i, size) in sizes.iter().enumerate() {
        w.write(&format!("d/f{i}"), &vec![b'x'; *size]);
    }
    let addr = free_addr();
    let args = w.metrics_mount_args(&addr);
    let daemon = Daemon::start(&w.src, &args);
    let migrated = r#"cutoverfs_copied_files_total{outcome="migrated"}"#;
    wait_until(Duration::from_secs(30), "3 files migrated", || {
        scrape(&addr).is_some_and(|s| value(&s, migrated) == 3.0)
    });
    let s = scrape(&addr).unwrap();
    assert_eq!(
        value(&s, r#"cutoverfs_copied_bytes_total{outcome="migrated"}"#),
        3210.0
    );
    assert_eq!(
        value(
            &s,
            r#"cutoverfs_copied_files_total{outcome="already_there"}"#
        ),
        0.0
    );
    assert!(
        !s.keys().any(|k| k.starts_with("cutoverfs_copy_failures")),
        "{s:?}"
    );
    let version = format!(
        r#"cutoverfs_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&s, &version), 1.0, "{s:?}");
    // No path reaches a label.
    assert!(
        !s.keys().any(|k| k.contains("f0") || k.contains('/')),
        "{s:?}"
    );
    daemon.stop();
}

#[test]
fn a_sweep_serves_its_counts_while_it_runs() {
    let w = Work::new();
    for i in 0..4 {
        w.write(&format!("f{i}"), &vec![b'y'; 64 * 1024]);
    }
    // Already in the dest with the same content: counted as already there.
    write_file(&w.dest.join("f0"), &vec![b'y'; 64 * 1024]);
    let addr = free_addr();
    // The copy of f3 is held as it starts, so one scrape is sure to land while copies are still
    // under way, however fast or slow the machine is.
    let hold = Hold::at_subject("copy:read", "f3");
    let mut cmd = command();
    hold.apply(&mut cmd);
    cmd.arg("sweep").args(w.target()).args([
        "--no-progress",
        "--bwlimit",
        "96KiB",
        "--metrics",
        &addr,
    ]);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    hold.wait_reached(|| child.try_wait().unwrap().is_none());
    let mut seen: Vec<HashMap<String, f64>> = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "a scrape of the held sweep",
        || scrape(&addr).map(|s| seen.push(s)).is_some(),
    );
    hold.release();
    while started.elapsed() < Duration::from_secs(60) {
        if let Some(s) = scrape(&addr) {
            seen.push(s);
        } else if !seen.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = wait_capturing(child, started, Duration::from_secs(60));
    run.assert_code(0);
    assert!(!seen.is_empty(), "never scraped the running sweep");
    let migrated = r#"cutoverfs_copied_files_total{outcome="migrated"}"#;
    let counts: Vec<f64> = seen.iter().map(|s| value(s, migrated)).collect();
    assert!(counts.windows(2).all(|p| p[0] <= p[1]), "{counts:?}");
    assert!(counts.iter().all(|c| *c <= 3.0), "{counts:?}");
    // Scraped while the copies were still under way: a count below the end result was seen.
    assert!(counts[0] < 3.0, "{counts:?}");
    let last = seen.last().unwrap();
    assert!(
        value(last, migrated) * 65536.0
            == value(last, r#"cutoverfs_copied_bytes_total{outcome="migrated"}"#),
        "{last:?}"
    );
}

#[test]
fn a_bad_metrics_address_stops_the_sweep_before_anything_is_copied() {
    let w = Work::new();
    w.write("a", b"content");
    let run = w.sweep(&["--metrics", "not-an-address"]);
    run.assert_code(2);
    assert!(run.stderr.contains("not-an-address"), "{}", run.stderr);
    assert!(!w.dest.exists());

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let run = w.sweep(&["--metrics", &addr]);
    run.assert_code(2);
    assert!(run.stderr.contains(&addr), "{}", run.stderr);
    assert!(!w.dest.exists());
}

/// The sum over a histogram's `_count` series of one operation.
fn count_of(samples: &HashMap<String, f64>, histogram: &str, op: &str) -> f64 {
    value(
        samples,
        &format!(r#"cutoverfs_{histogram}_seconds_count{{op="{op}"}}"#),
    )
}

#[test]
fn a_mount_over_s3_counts_reads_by_origin_queues_and_latencies() {
    let server = S3Server::in_process();
    let w = Work::new();
    let dest = server.dest_url("media");
    let migrated: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("m/f{i}"), pseudo_random(1000 + i * 777, i as u64)))
        .collect();
    for (rel, content) in &migrated {
        w.write(rel, content);
    }
    let mut sweep = command();
    server.apply_env(&mut sweep);
    run_command(
        sweep
            .arg("sweep")
            .args(w.target_with_dest(&dest))
            .arg("--no-progress"),
    )
    .assert_code(0);
    // Written after the sweep: pending, served from the local copy and queued when opened.
    w.write("new/a", b"new a");
    w.write("new/b", b"new b");

    let addr = free_addr();
    let mut args = w.target_with_dest(&dest);
    args.extend(["--no-sweep".into(), "--metrics".into(), addr.clone().into()]);
    let mnt = w.root.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let daemon = Daemon::start_with_env(&mnt, &args, &server.env());
    daemon.wait_for_scan();

    // Four migrated files read through the mount: served by the dest.
    for (rel, content) in &migrated[..4] {
        assert_eq!(&std::fs::read(mnt.join(rel)).unwrap(), content, "{rel}");
    }
    for rel in ["new/a", "new/b"] {
        std::fs::read(mnt.join(rel)).unwrap();
    }
    let expected_bytes: usize = migrated[..4].iter().map(|(_, c)| c.len()).sum();
    let opens = |s: &HashMap<String, f64>, origin: &str| {
        value(s, &format!(r#"cutoverfs_opens_total{{origin="{origin}"}}"#))
    };
    wait_until(Duration::from_secs(20), "the manifest counted", || {
        scrape(&addr).is_some_and(|s| {
            value(&s, "cutoverfs_copy_on_read_waiting") == 2.0
                && value(&s, r#"cutoverfs_manifest_files{state="verified"}"#) == 6.0
        })
    });
    let s = scrape(&addr).unwrap();
    assert_eq!(opens(&s, "dest"), 4.0, "{s:?}");
    assert_eq!(opens(&s, "local"), 2.0, "{s:?}");
    assert_eq!(opens(&s, "fallback"), 0.0, "{s:?}");
    assert_eq!(
        value(&s, "cutoverfs_copy_on_read_queued_total"),
        2.0,
        "{s:?}"
    );
    assert_eq!(
        value(&s, "cutoverfs_dest_read_bytes_total"),
        expected_bytes as f64,
        "{s:?}"
    );
    assert_eq!(value(&s, "cutoverfs_queue_depth"), 2.0, "{s:?}");
    assert_eq!(
        value(&s, r#"cutoverfs_manifest_files{state="pending"}"#),
        2.0,
        "{s:?}"
    );
    assert!(
        value(&s, "cutoverfs_manifest_count_age_seconds") < 30.0,
        "{s:?}"
    );
    // Every open was timed to its reply, and the remote reads by the store.
    assert!(
        count_of(&s, "fuse_request_duration", "open") >= 6.0,
        "{s:?}"
    );
    assert!(
        count_of(&s, "fuse_request_duration", "lookup") >= 1.0,
        "{s:?}"
    );
    assert!(
        count_of(&s, "fuse_request_duration", "read") >= 4.0,
        "{s:?}"
    );
    assert!(
        count_of(&s, "store_request_duration", "read_range") >= 4.0,
        "{s:?}"
    );
    let slowest_bucket =
        r#"cutoverfs_store_request_duration_seconds_bucket{le="+Inf",op="read_range"}"#;
    assert_eq!(
        value(&s, slowest_bucket),
        count_of(&s, "store_request_duration", "read_range"),
        "{s:?}"
    );

    // The dest goes away: the next read of a migrated file falls back to its local copy,
    // and so are the opens after it.
    server.stop();
    for (rel, content) in &migrated[4..] {
        assert_eq!(&std::fs::read(mnt.join(rel)).unwrap(), content, "{rel}");
    }
    let s = scrape(&addr).unwrap();
    assert!(
        value(&s, "cutoverfs_fallback_reads_total") + opens(&s, "fallback") >= 2.0,
        "{s:?}"
    );
    assert!(opens(&s, "fallback") >= 1.0, "{s:?}");
    assert!(
        !s.keys().any(|k| k.contains("f0") || k.contains("new/")),
        "{s:?}"
    );
    daemon.stop();
}
