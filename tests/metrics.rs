//! `--metrics ADDR` (issue 6, point 6): a real mount and a real sweep serve Prometheus text over
//! HTTP; the scrape is parsed and its numbers match what was done. A bad address stops the
//! command before it copies anything.

mod common;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::mount::{wait_until, Daemon};
use common::*;

fn free_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

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
    let args: Vec<OsString> = vec![
        "--dest".into(),
        w.dest_url().into(),
        "--manifest".into(),
        w.manifest_url().into(),
        "--metrics".into(),
        addr.clone().into(),
    ];
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
    let mut cmd = command();
    cmd.arg("sweep").args(w.target()).args([
        "--no-progress",
        "--bwlimit",
        "96KiB",
        "--metrics",
        &addr,
    ]);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut seen: Vec<HashMap<String, f64>> = Vec::new();
    while started.elapsed() < Duration::from_secs(30) {
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
