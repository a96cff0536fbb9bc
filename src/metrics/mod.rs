//! `--metrics ADDR`: Prometheus metrics of a daemon or a sweep (DESIGN §8). Owns the metric
//! registry and the small HTTP server answering `GET /metrics`; the rest of the program only
//! bumps counters through a [`Metrics`] handle (atomics, no locks). Labels are fixed words,
//! never paths, keys or secrets.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(&'static str, &'static str)>;

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

/// The counters; cheap to clone (every metric is an `Arc` of atomics).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    files: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cutoverfs");
        let files = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        registry.register(
            "build",
            "The running cutoverfs version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
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
        Metrics {
            registry: Arc::new(registry),
            files,
            bytes,
            failures,
        }
    }

    pub fn copy_done(&self, outcome: CopyOutcome, bytes: u64) {
        let outcome = match outcome {
            CopyOutcome::Migrated => "migrated",
            CopyOutcome::AlreadyThere => "already_there",
            CopyOutcome::Failed(kind) => {
                self.failures.get_or_create(&vec![("kind", kind)]).inc();
                return;
            }
        };
        let labels = vec![("outcome", outcome)];
        self.files.get_or_create(&labels).inc();
        self.bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
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
