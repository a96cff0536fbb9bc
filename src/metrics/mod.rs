//! `--metrics ADDR`: Prometheus metrics of a daemon, a replica or a sweep (DESIGN §8). Owns the
//! metric registry, the metrics' names and help, and the small HTTP server answering
//! `GET /metrics`; the rest of the program only counts and times through the handles here
//! ([`Metrics`], [`ReadStats`], [`RequestTimes`]: atomics, and a short lock per histogram
//! sample) and hands in the manifest's counts. It reads no manifest and no store itself.
//! Labels are fixed words, never paths, keys or secrets.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// One fixed label, e.g. `[("op", "read")]`: no allocation per sample.
type Label = [(&'static str, &'static str); 1];

/// How one file's copy ended, as the sweeper records it.
#[derive(Debug, Clone, Copy)]
pub enum CopyOutcome {
    /// Copied and verified by SHA-256.
    Migrated,
    /// The dest already held the same content.
    AlreadyThere,
    /// Not copied; the word is the kind of failure (a label value).
    Failed(&'static str),
}

/// Which command serves the metrics: each registers only what it can count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `cutoverfs sweep`: copies, store calls, the manifest's counts.
    Sweep,
    /// The daemon: all of the sweep's, plus what the mount served and its FUSE requests.
    Mount,
    /// `mount --no-source`: what the mount served, its FUSE requests, store reads, the manifest.
    Replica,
}

/// What a mount served, logged at unmount and exported by `--metrics`. Bumped by the FUSE
/// layer on every open and remote read (atomics only, no label lookups).
#[derive(Debug)]
pub struct ReadStats {
    opens: Family<Label, Counter>,
    /// Opens served by the dest's verified copy.
    pub opens_dest: Counter,
    /// Opens served by the local copy: not migrated yet, or written through the mount.
    pub opens_local: Counter,
    /// Opens of files verified at the dest served by the local copy because the dest was down
    /// or its copy unreadable (DESIGN §4.5).
    pub opens_fallback: Counter,
    /// Opens the kernel serves directly from a file (FUSE passthrough): no READ reaches us.
    pub passthrough_opens: Counter,
    /// READ requests the daemon itself answered (passthrough files send none).
    pub read_requests: Counter,
    pub bytes_dest: Counter,
    /// READs of a remote object answered from the local copy after the dest failed mid-file.
    pub fallback_reads: Counter,
    pub copy_on_read_queued: Counter,
}

impl Default for ReadStats {
    fn default() -> Self {
        let opens = Family::<Label, Counter>::default();
        // The family's series are these very counters.
        let origin = |o| opens.get_or_create_owned(&[("origin", o)]);
        ReadStats {
            opens_dest: origin("dest"),
            opens_local: origin("local"),
            opens_fallback: origin("fallback"),
            opens,
            passthrough_opens: Counter::default(),
            read_requests: Counter::default(),
            bytes_dest: Counter::default(),
            fallback_reads: Counter::default(),
            copy_on_read_queued: Counter::default(),
        }
    }
}

impl ReadStats {
    pub fn log(&self) {
        tracing::info!(
            opens_local = self.opens_local.get(),
            opens_dest = self.opens_dest.get(),
            opens_fallback = self.opens_fallback.get(),
            passthrough_opens = self.passthrough_opens.get(),
            read_requests = self.read_requests.get(),
            bytes_from_dest = self.bytes_dest.get(),
            fallback_reads = self.fallback_reads.get(),
            copy_on_read_queued = self.copy_on_read_queued.get(),
            "served by the mount"
        );
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "opens",
            "Opens of files for reading, by where they were served from (dest: the verified copy at the dest; local: the local copy, not migrated yet or written through the mount; fallback: the local copy of a file verified at the dest, because the dest was down or its copy unreadable)",
            self.opens.clone(),
        );
        registry.register(
            "passthrough_opens",
            "Opens the kernel serves straight from a file (FUSE passthrough); their reads never reach the daemon",
            self.passthrough_opens.clone(),
        );
        registry.register(
            "read_requests",
            "READ requests the daemon answered itself (files not in passthrough)",
            self.read_requests.clone(),
        );
        registry.register_with_unit(
            "dest_read",
            "Bytes the daemon read from a remote dest (S3) to answer reads",
            Unit::Bytes,
            self.bytes_dest.clone(),
        );
        registry.register(
            "fallback_reads",
            "READs of a remote object answered from the local copy because the dest failed mid-file",
            self.fallback_reads.clone(),
        );
        registry.register(
            "copy_on_read_queued",
            "Files queued ahead of the sweep because they were opened before being copied",
            self.copy_on_read_queued.clone(),
        );
    }
}

/// Latency of one kind of request, by operation: FUSE requests or calls to the store.
#[derive(Clone)]
pub struct RequestTimes {
    family: Family<Label, Histogram, fn() -> Histogram>,
    /// Count and total time by operation, for the summary logged at unmount (the histograms do
    /// not give their sums back).
    tallies: Arc<Mutex<BTreeMap<&'static str, Arc<Tally>>>>,
}

/// How many requests of one kind were answered, and their time in all.
#[derive(Debug, Default)]
pub struct Tally {
    count: AtomicU64,
    nanos: AtomicU64,
}

/// Where one kind of request is timed: its histogram and its tally.
#[derive(Clone)]
pub struct OpTimer {
    histogram: Histogram,
    tally: Arc<Tally>,
}

impl OpTimer {
    /// Starts timing one request.
    pub fn start(&self) -> Timer {
        Timer {
            on: self.clone(),
            started: Instant::now(),
        }
    }
}

impl RequestTimes {
    fn new(buckets: fn() -> Histogram) -> RequestTimes {
        RequestTimes {
            family: Family::new_with_constructor(buckets),
            tallies: Arc::default(),
        }
    }

    /// FUSE requests: from 25 µs (a cached getattr) to about 1.6 s (an open waiting on S3).
    fn fuse() -> RequestTimes {
        RequestTimes::new(|| Histogram::new(exponential_buckets(0.000_025, 2.0, 17)))
    }

    /// Store calls: from 0.5 ms (a local file) to about 33 s (a large multipart upload).
    fn store() -> RequestTimes {
        RequestTimes::new(|| Histogram::new(exponential_buckets(0.000_5, 2.0, 17)))
    }

    /// Starts timing `op`; the time is recorded when the timer is dropped, so a reply sent
    /// later (from another thread) is timed by moving the timer along with it.
    pub fn start(&self, op: &'static str) -> Timer {
        self.of(op).start()
    }

    /// The timer of `op`, to time many requests without looking it up each time.
    pub fn of(&self, op: &'static str) -> OpTimer {
        let tally = self
            .tallies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(op)
            .or_default()
            .clone();
        OpTimer {
            histogram: self.family.get_or_create_owned(&[("op", op)]),
            tally,
        }
    }

    /// `op=COUNT/MEANµs` for every operation timed at least once, most frequent first: what
    /// the daemon answered and what each kind cost it (logged at unmount; bench/ reports it
    /// beside each mount case's figures).
    pub fn summary(&self) -> String {
        let tallies = self
            .tallies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut seen: Vec<(&str, u64, u64)> = tallies
            .iter()
            .map(|(op, t)| {
                let count = t.count.load(Ordering::Relaxed);
                (*op, count, t.nanos.load(Ordering::Relaxed))
            })
            .filter(|(_, count, _)| *count > 0)
            .collect();
        seen.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        seen.iter()
            .map(|(op, count, nanos)| {
                format!("{op}={count}/{:.0}µs", *nanos as f64 / *count as f64 / 1e3)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Records its lifetime when dropped.
pub struct Timer {
    on: OpTimer,
    started: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.on.histogram.observe(elapsed.as_secs_f64());
        self.on.tally.count.fetch_add(1, Ordering::Relaxed);
        self.on
            .tally
            .nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Files and bytes per manifest state, refreshed from the manifest now and then (counting is
/// a scan of the manifest, so it is not done per scrape).
#[derive(Clone, Default)]
struct ManifestGauges {
    files: Family<Label, Gauge>,
    bytes: Family<Label, Gauge>,
    queue_depth: Gauge,
    copy_on_read_waiting: Gauge,
    age: Gauge<f64, std::sync::atomic::AtomicU64>,
    refreshed: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// The counts `Metrics::set_manifest_counts` takes.
#[derive(Debug, Clone, Default)]
pub struct ManifestCounts {
    /// (state, files, bytes) for every state.
    pub by_state: Vec<(&'static str, u64, u64)>,
    /// Files waiting to be copied (pending, or being copied right now).
    pub queued: u64,
    /// Of those, files opened or requested before being copied (copied first).
    pub copy_on_read: u64,
}

/// The counters; cheap to clone (every metric is an `Arc` of atomics).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    files: Family<Label, Counter>,
    bytes: Family<Label, Counter>,
    failures: Family<Label, Counter>,
    /// What a mount served (zero and not exported for a sweep).
    pub served: Arc<ReadStats>,
    /// FUSE requests by operation.
    pub fuse_requests: RequestTimes,
    /// Calls to the store (the dest) by operation.
    pub store_calls: RequestTimes,
    manifest: ManifestGauges,
}

impl Metrics {
    pub fn new(role: Role) -> Metrics {
        let mut registry = Registry::with_prefix("cutoverfs");
        let files = Family::<Label, Counter>::default();
        let bytes = Family::<Label, Counter>::default();
        let failures = Family::<Label, Counter>::default();
        let served = Arc::new(ReadStats::default());
        let fuse_requests = RequestTimes::fuse();
        let store_calls = RequestTimes::store();
        let manifest = ManifestGauges::default();
        registry.register(
            "build",
            "The running cutoverfs version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        if role != Role::Replica {
            registry.register(
                "copied_files",
                "Files the sweeper finished, by outcome (migrated: copied and verified; already_there: the dest held the same content)",
                files.clone(),
            );
            registry.register_with_unit(
                "copied",
                "Bytes of the files the sweeper finished, by outcome",
                Unit::Bytes,
                bytes.clone(),
            );
            registry.register(
                "copy_failures",
                "Copies that did not end verified, by kind",
                failures.clone(),
            );
        }
        if role != Role::Sweep {
            served.register(&mut registry);
            registry.register_with_unit(
                "fuse_request_duration",
                "Time from a FUSE request's arrival to its reply, by operation",
                Unit::Seconds,
                fuse_requests.family.clone(),
            );
        }
        registry.register_with_unit(
            "store_request_duration",
            "Time of each call to the dest, by operation (put_many: one batch of files; read_range: one ranged read; inspect, exists, delete, mkdir)",
            Unit::Seconds,
            store_calls.family.clone(),
        );
        manifest.register(&mut registry);
        Metrics {
            registry: Arc::new(registry),
            files,
            bytes,
            failures,
            served,
            fuse_requests,
            store_calls,
            manifest,
        }
    }

    pub fn copy_done(&self, outcome: CopyOutcome, bytes: u64) {
        let outcome = match outcome {
            CopyOutcome::Migrated => "migrated",
            CopyOutcome::AlreadyThere => "already_there",
            CopyOutcome::Failed(kind) => {
                self.failures.get_or_create(&[("kind", kind)]).inc();
                return;
            }
        };
        let labels = [("outcome", outcome)];
        self.files.get_or_create(&labels).inc();
        self.bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// The manifest's counts, as last read.
    pub fn set_manifest_counts(&self, counts: &ManifestCounts) {
        self.manifest.set(counts);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.manifest.update_age();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl ManifestGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "manifest_files",
            "Files in the manifest by state (all nodes' work), as of the last count",
            self.files.clone(),
        );
        registry.register_with_unit(
            "manifest",
            "Bytes of the files in the manifest by state, as of the last count",
            Unit::Bytes,
            self.bytes.clone(),
        );
        registry.register(
            "queue_depth",
            "Files waiting to be copied (pending or being copied), as of the last count",
            self.queue_depth.clone(),
        );
        registry.register(
            "copy_on_read_waiting",
            "Files opened or requested before being copied that are still waiting, as of the last count",
            self.copy_on_read_waiting.clone(),
        );
        registry.register_with_unit(
            "manifest_count_age",
            "How old the manifest counts above are (NaN before the first count)",
            Unit::Seconds,
            self.age.clone(),
        );
    }

    fn set(&self, counts: &ManifestCounts) {
        for (state, files, bytes) in &counts.by_state {
            let label = [("state", *state)];
            self.files.get_or_create(&label).set(*files as i64);
            self.bytes.get_or_create(&label).set(*bytes as i64);
        }
        self.queue_depth.set(counts.queued as i64);
        self.copy_on_read_waiting.set(counts.copy_on_read as i64);
        *self.refreshed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn update_age(&self) {
        let refreshed = *self.refreshed.lock().unwrap_or_else(|e| e.into_inner());
        self.age
            .set(refreshed.map_or(f64::NAN, |at| at.elapsed().as_secs_f64()));
    }
}

/// How often the manifest is counted for the gauges: every 5 s, or less often when counting
/// takes long (a large manifest), so that counting never takes more than 5% of the time.
pub fn next_count_after(took: Duration) -> Duration {
    (took * 20).max(Duration::from_secs(5))
}

/// Binds `addr` at once, so a bad address stops the command before it mounts or copies.
pub fn bind(addr: &str) -> Result<TcpListener> {
    let parsed: SocketAddr = addr
        .parse()
        .with_context(|| format!("--metrics {addr}: not an address like 127.0.0.1:9464"))?;
    let listener = TcpListener::bind(parsed)
        .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("--metrics {addr}"))?;
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` until the runtime stops.
pub fn serve(listener: TcpListener, metrics: Metrics) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &metrics)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok(())
}

fn answer<B>(
    req: &hyper::Request<B>,
    metrics: &Metrics,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, ctype, body) =
        if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
            (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(),
            )
        } else {
            (
                404,
                "text/plain",
                "only GET /metrics is served\n".to_string(),
            )
        };
    hyper::Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap_or_default()
}
