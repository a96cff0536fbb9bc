//! The alerting rules and the Grafana dashboard in deploy/ (docs/monitoring.md, issue 18.4) name
//! only metrics the daemon serves: every `cutoverfs_*` name in them is looked up, exactly as
//! written, among the sample names of a real scrape of a live mount that has migrated files,
//! hit a conflict and served reads. (The rules' other metric, Prometheus' own `up`, has no
//! `cutoverfs_` prefix and is not looked up.) deploy/check-monitoring checks the files with
//! promtool.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mount::{wait_until, Daemon};
use common::*;

const MONITORING_FILES: [&str; 2] = [
    "deploy/prometheus/cutoverfs-alerts.yml",
    "deploy/grafana/cutoverfs-dashboard.json",
];

/// The body of `GET /metrics`; None while nothing listens.
fn scrape(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Some(body.to_string())
}

/// The value of one sample line (`name{labels}` as written), 0 when absent.
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(s, _)| *s == series)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// The names of the samples of a scrape, as Prometheus stores them: `x_total` for a counter,
/// `x_bucket`, `x_sum` and `x_count` for a histogram, `x_info` for an info metric.
fn sample_names(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            line[..end].to_string()
        })
        .collect()
}

/// Every `cutoverfs_[a-z0-9_]+` identifier in `text` that is not the tail of a longer one.
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("cutoverfs_") {
        if at > 0 && ident(bytes[at - 1]) {
            continue;
        }
        let len = bytes[at..]
            .iter()
            .position(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_'))
            .unwrap_or(bytes.len() - at);
        names.insert(text[at..at + len].to_string());
    }
    names
}

#[test]
fn every_metric_named_by_the_alerts_and_the_dashboard_is_in_a_live_daemons_scrape() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut used = BTreeSet::new();
    for file in MONITORING_FILES {
        let text =
            std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file} names only {names:?}");
        used.extend(names);
    }
    // The scan finds plain, counter and histogram names.
    for name in [
        "cutoverfs_queue_depth",
        "cutoverfs_copy_failures_total",
        "cutoverfs_fuse_request_duration_seconds_bucket",
    ] {
        assert!(used.contains(name), "{name} not found in {used:?}");
    }

    let w = Work::new();
    for i in 0..3 {
        w.write(&format!("d/f{i}"), format!("file {i}").as_bytes());
    }
    // Another object already under this file's key at the dest: a conflict, so the copy
    // failures counter and the conflict state have series.
    w.write("d/taken", b"ours");
    write_file(&w.dest.join("d/taken"), b"someone else's");
    let addr = free_addr();
    let args = w.metrics_mount_args(&addr);
    let daemon = Daemon::start(&w.src, &args);
    wait_until(
        Duration::from_secs(30),
        "3 files migrated, 1 conflict, both counted in the manifest",
        || {
            scrape(&addr).is_some_and(|s| {
                value(&s, r#"cutoverfs_copied_files_total{outcome="migrated"}"#) == 3.0
                    && value(&s, r#"cutoverfs_copy_failures_total{kind="conflict"}"#) >= 1.0
                    && value(&s, r#"cutoverfs_manifest_files{state="verified"}"#) == 3.0
                    && value(&s, r#"cutoverfs_manifest_files{state="conflict"}"#) == 1.0
            })
        },
    );
    // Reads through the mount: opens, FUSE requests.
    for i in 0..3 {
        let content = std::fs::read(w.src.join(format!("d/f{i}"))).unwrap();
        assert_eq!(content, format!("file {i}").as_bytes());
    }

    // A histogram's sample is recorded as its request ends: scrape until all are there.
    let started = Instant::now();
    let (missing, body) = loop {
        let body = scrape(&addr).expect("the daemon's /metrics answers");
        let served = sample_names(&body);
        let missing: Vec<&String> = used
            .iter()
            .filter(|name| !served.contains(name.as_str()))
            .collect();
        if missing.is_empty() || started.elapsed() > Duration::from_secs(30) {
            break (missing, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        missing.is_empty(),
        "named in {MONITORING_FILES:?} but not served by the daemon: {missing:?}\n\nscrape:\n{body}"
    );
    daemon.stop();
}
