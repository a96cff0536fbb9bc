//! S3 servers for the integration tests: an in-process s3s-fs server over real HTTP (the default
//! suite) or a single-node Garage process (`CUTOVERFS_TEST_GARAGE=/path/to/garage`, ignored tests),
//! behind one blocking API, plus a TCP proxy that corrupts a marker on its way to the server.
//!
//! Each `S3Server` owns a temp dir (data, logs, config) and a tokio runtime whose worker threads
//! serve the in-process server; the helper methods block on that runtime, so tests stay plain
//! `#[test]` functions. `s3_tests!` runs one test body against both servers.
//!
//! Known differences (see tests/s3_harness.rs, which pins them down):
//! * A body corrupted on the wire, SDK default (signed payload, `x-amz-content-sha256`): s3s-fs
//!   answers 500 InternalError (retryable!), Garage 400 InvalidDigest; neither stores it.
//! * With an unsigned payload only `x-amz-checksum-sha256` catches it: s3s-fs 400 BadDigest but
//!   the corrupted object IS stored (renamed into place before the comparison); Garage 400
//!   InvalidDigest, nothing stored.
//! * s3s-fs 0.14 has no ListMultipartUploads (501 NotImplemented): `multipart_uploads` then reads
//!   the in-progress uploads from s3s-fs's files in the data dir.
//! * s3s-fs 0.14 accepts a PutObject into a missing bucket (it creates the bucket directory);
//!   HeadBucket / ListObjectsV2 / GetObject do report the bucket missing.
//!
//! `CUTOVERFS_TEST_VERBOSE=1` prints how long Garage took to answer.

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle as ThreadHandle;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The bucket every server starts with.
pub const BUCKET: &str = "media";
/// Environment variable naming the Garage binary for `S3Server::garage()`.
pub const GARAGE_ENV: &str = "CUTOVERFS_TEST_GARAGE";
/// How long Garage may take to answer S3 requests after it is started.
pub const GARAGE_START_TIMEOUT: Duration = Duration::from_secs(20);

const IN_PROCESS_ACCESS_KEY: &str = "AKIACUTOVERFSTEST";
const IN_PROCESS_SECRET_KEY: &str = "cutoverfs-test-secret-0123456789abcdef";
const IN_PROCESS_REGION: &str = "us-east-1";
// Garage wants "GK" + 24 hex digits and a 64-hex-digit secret.
const GARAGE_ACCESS_KEY: &str = "GK0123456789abcdef01234567";
const GARAGE_SECRET_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const GARAGE_REGION: &str = "garage";

/// AWS variables that would otherwise leak host settings into a child process.
const AWS_VARS_TO_CLEAR: &[&str] = &[
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_S3_USE_ARN_REGION",
    "AWS_S3_DISABLE_MULTIREGION_ACCESS_POINTS",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InProcess,
    Garage,
}

/// One S3 server with bucket `media`. Stops the server (kills Garage) on drop.
pub struct S3Server {
    kind: Kind,
    port: u16,
    region: &'static str,
    access_key: &'static str,
    secret_key: &'static str,
    client: Client,
    backend: Mutex<Backend>,
    rt: Option<tokio::runtime::Runtime>,
    // Last: removed after the server is down.
    tmp: tempfile::TempDir,
}

enum Backend {
    InProcess {
        root: PathBuf,
        running: Option<Running>,
    },
    Garage {
        bin: PathBuf,
        config: PathBuf,
        log: PathBuf,
        child: Option<Child>,
    },
}

struct Running {
    stop_tx: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    pub fn start(kind: Kind) -> S3Server {
        match kind {
            Kind::InProcess => S3Server::in_process(),
            Kind::Garage => S3Server::garage(),
        }
    }

    /// s3s-fs on 127.0.0.1:<random port>, bucket `media`, static credentials, region us-east-1.
    pub fn in_process() -> S3Server {
        let tmp = temp_dir("cutoverfs-s3-");
        let rt = runtime();
        let root = tmp.path().join("data");
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let (addr, running) = rt.block_on(serve_s3s_fs(
            "127.0.0.1:0".parse().unwrap(),
            &root,
            IN_PROCESS_ACCESS_KEY,
            IN_PROCESS_SECRET_KEY,
        ));
        let endpoint = format!("http://{addr}");
        let client = {
            let _guard = rt.enter();
            make_client(
                &endpoint,
                IN_PROCESS_REGION,
                IN_PROCESS_ACCESS_KEY,
                IN_PROCESS_SECRET_KEY,
                3,
            )
        };
        S3Server {
            kind: Kind::InProcess,
            port: addr.port(),
            region: IN_PROCESS_REGION,
            access_key: IN_PROCESS_ACCESS_KEY,
            secret_key: IN_PROCESS_SECRET_KEY,
            client,
            backend: Mutex::new(Backend::InProcess {
                root,
                running: Some(running),
            }),
            rt: Some(rt),
            tmp,
        }
    }

    /// A single-node Garage (binary from `$CUTOVERFS_TEST_GARAGE`) on loopback with bucket
    /// `media`. Panics with the reason when the variable is unset or Garage does not answer S3
    /// requests within `GARAGE_START_TIMEOUT`.
    pub fn garage() -> S3Server {
        let bin = match std::env::var_os(GARAGE_ENV) {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => panic!(
                "{GARAGE_ENV} is not set: these tests need a Garage 2.x binary, e.g. \
                 {GARAGE_ENV}=/work/tools/bin/garage cargo test -- --ignored \
                 (install: cargo install garage --version 2.5.0 --locked)"
            ),
        };
        assert!(
            bin.is_file(),
            "{GARAGE_ENV}={} is not a file: it must be the path of a Garage 2.x binary",
            bin.display()
        );
        // A free port can be taken by someone else between our probe and Garage's bind: try
        // again with new ports (and a fresh dir) when Garage does not come up.
        let mut errors = Vec::new();
        for _ in 0..3 {
            let tmp = temp_dir("cutoverfs-garage-");
            let rt = runtime();
            let (s3_port, rpc_port) = {
                let a = StdListener::bind("127.0.0.1:0").unwrap();
                let b = StdListener::bind("127.0.0.1:0").unwrap();
                (
                    a.local_addr().unwrap().port(),
                    b.local_addr().unwrap().port(),
                )
            };
            let config = write_garage_config(tmp.path(), s3_port, rpc_port);
            let client = {
                let _guard = rt.enter();
                make_client(
                    &format!("http://127.0.0.1:{s3_port}"),
                    GARAGE_REGION,
                    GARAGE_ACCESS_KEY,
                    GARAGE_SECRET_KEY,
                    3,
                )
            };
            let server = S3Server {
                kind: Kind::Garage,
                port: s3_port,
                region: GARAGE_REGION,
                access_key: GARAGE_ACCESS_KEY,
                secret_key: GARAGE_SECRET_KEY,
                client,
                backend: Mutex::new(Backend::Garage {
                    bin: bin.clone(),
                    config,
                    log: tmp.path().join("garage.log"),
                    child: None,
                }),
                rt: Some(rt),
                tmp,
            };
            match server.spawn_garage() {
                Ok(()) => return server,
                // Dropping the server kills what is left of Garage.
                Err(e) => errors.push(e),
            }
        }
        panic!(
            "garage ({}) did not start, 3 tries:\n{}",
            bin.display(),
            errors.join("\n---\n")
        );
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> String {
        BUCKET.to_string()
    }

    /// The region clients must sign with (Garage checks it; s3s-fs accepts any).
    pub fn region(&self) -> String {
        self.region.to_string()
    }

    pub fn access_key(&self) -> String {
        self.access_key.to_string()
    }

    pub fn secret_key(&self) -> String {
        self.secret_key.to_string()
    }

    /// The test's temp dir (server data, logs, the nonexistent AWS config files).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `s3://media/<prefix>?endpoint=…&region=…&path_style=true`
    pub fn dest_url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{}?endpoint={}&region={}&path_style=true",
            BUCKET,
            prefix,
            self.endpoint(),
            self.region
        )
    }

    /// Credentials for a child process, and AWS config/credentials files that do not exist, so
    /// nothing from the host's ~/.aws or instance metadata is used.
    pub fn env(&self) -> Vec<(String, String)> {
        let dir = self.tmp.path();
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            (
                "AWS_CONFIG_FILE".into(),
                dir.join("no-aws-config").display().to_string(),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                dir.join("no-aws-credentials").display().to_string(),
            ),
        ]
    }

    /// `env()` applied to a command, after removing the other AWS_* settings a host may have
    /// (session token, profile, region, endpoint, …).
    pub fn apply_env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        for var in AWS_VARS_TO_CLEAR {
            cmd.env_remove(var);
        }
        cmd.envs(self.env())
    }

    /// Server down: the port refuses connections and open (keep-alive) connections are cut.
    /// Garage is killed (SIGKILL). Idempotent.
    pub fn stop(&self) {
        let mut backend = self.backend.lock().unwrap();
        match &mut *backend {
            Backend::InProcess { running, .. } => {
                if let Some(r) = running.take() {
                    let _ = r.stop_tx.send(());
                    let _ = self.rt().block_on(r.task);
                }
            }
            Backend::Garage { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }

    /// The server again, on the same port with the same data. No-op when it is running.
    pub fn start_again(&self) {
        let in_process_root = {
            let backend = self.backend.lock().unwrap();
            match &*backend {
                Backend::InProcess {
                    running: None,
                    root,
                } => Some(root.clone()),
                Backend::InProcess { .. } => return,
                Backend::Garage { child: Some(_), .. } => return,
                Backend::Garage { .. } => None,
            }
        };
        match in_process_root {
            Some(root) => {
                let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
                let (bound, running) =
                    self.rt()
                        .block_on(serve_s3s_fs(addr, &root, self.access_key, self.secret_key));
                assert_eq!(bound, addr);
                if let Backend::InProcess { running: slot, .. } = &mut *self.backend.lock().unwrap()
                {
                    *slot = Some(running);
                }
            }
            None => {
                if let Err(e) = self.spawn_garage() {
                    panic!("garage did not start again on port {}: {e}", self.port);
                }
            }
        }
    }

    /// Whether something accepts TCP connections on the server's port.
    pub fn is_listening(&self) -> bool {
        TcpStream::connect_timeout(
            &format!("127.0.0.1:{}", self.port).parse().unwrap(),
            Duration::from_secs(1),
        )
        .is_ok()
    }

    /// A new bucket the server's key can read and write.
    pub fn create_bucket(&self, name: &str) {
        match self.kind {
            Kind::InProcess => {
                let r = self.block_on(self.client.create_bucket().bucket(name).send());
                if let Err(e) = r {
                    panic!("create bucket {name}: {}", S3Failure::from(&e));
                }
            }
            Kind::Garage => {
                // The default key may not create buckets over S3: use the admin CLI.
                self.garage_cli(&["bucket", "create", name]);
                self.garage_cli(&[
                    "bucket",
                    "allow",
                    "--read",
                    "--write",
                    "--owner",
                    name,
                    "--key",
                    GARAGE_ACCESS_KEY,
                ]);
            }
        }
    }

    // ----- direct access for assertions -----

    /// The server's own client (path style, static credentials, timeouts, 3 attempts).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A client like `client()` for another endpoint (e.g. a proxy) or other keys, with one
    /// attempt (no retries).
    pub fn client_with(&self, endpoint: &str, access_key: &str, secret_key: &str) -> Client {
        let _guard = self.rt().enter();
        make_client(endpoint, self.region, access_key, secret_key, 1)
    }

    /// Runs a future on the server's runtime (for direct SDK calls in tests).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt().block_on(f)
    }

    /// PutObject with `x-amz-checksum-sha256` through `client`, into the server's bucket.
    pub fn try_put_with(&self, client: &Client, key: &str, body: &[u8]) -> Result<(), S3Failure> {
        self.block_on(
            client
                .put_object()
                .bucket(BUCKET)
                .key(key)
                .checksum_sha256(sha256_b64(body))
                .body(ByteStream::from(body.to_vec()))
                .send(),
        )
        .map(|_| ())
        .map_err(|e| S3Failure::from(&e))
    }

    /// HeadBucket through `client`.
    pub fn try_head_bucket_with(&self, client: &Client, bucket: &str) -> Result<(), S3Failure> {
        self.block_on(client.head_bucket().bucket(bucket).send())
            .map(|_| ())
            .map_err(|e| S3Failure::from(&e))
    }

    pub fn try_put(&self, key: &str, body: &[u8]) -> Result<(), S3Failure> {
        self.try_put_with(&self.client, key, body)
    }

    /// Stores `body` at `key` (with its SHA-256 checksum); panics on failure.
    pub fn put(&self, key: &str, body: &[u8]) {
        if let Err(e) = self.try_put(key, body) {
            panic!("put {key}: {e}");
        }
    }

    /// The object's bytes, None when there is no such key.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let r = self.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await?;
            Ok::<_, SdkError<_, HttpResponse>>(out.body.collect().await.map(|b| b.to_vec()))
        });
        match r {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(e)) => panic!("get {key}: reading the body: {e}"),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => None,
            Err(e) => panic!("get {key}: {}", S3Failure::from(&e)),
        }
    }

    /// User metadata (`x-amz-meta-*`, names lower-cased, without the prefix) plus
    /// `content-type` and `cache-control` when the object has them. None when there is no such
    /// key.
    pub fn head_metadata(&self, key: &str) -> Option<HashMap<String, String>> {
        let r = self.block_on(self.client.head_object().bucket(BUCKET).key(key).send());
        match r {
            Ok(out) => {
                let mut map: HashMap<String, String> = out
                    .metadata()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(v) = out.content_type() {
                    map.insert("content-type".into(), v.into());
                }
                if let Some(v) = out.cache_control() {
                    map.insert("cache-control".into(), v.into());
                }
                Some(map)
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => None,
            Err(e) => panic!("head {key}: {}", S3Failure::from(&e)),
        }
    }

    /// Keys under `prefix` with their sizes, all pages, in key order.
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let r = self.block_on(
                self.client
                    .list_objects_v2()
                    .bucket(BUCKET)
                    .prefix(prefix)
                    .set_continuation_token(token.take())
                    .send(),
            );
            let page = r.unwrap_or_else(|e| panic!("list {prefix:?}: {}", S3Failure::from(&e)));
            for obj in page.contents() {
                out.push((
                    obj.key().unwrap_or_default().to_string(),
                    obj.size().unwrap_or(0) as u64,
                ));
            }
            match (page.is_truncated(), page.next_continuation_token()) {
                (Some(true), Some(next)) => token = Some(next.to_string()),
                _ => break,
            }
        }
        out.sort();
        out
    }

    pub fn delete(&self, key: &str) {
        let r = self.block_on(self.client.delete_object().bucket(BUCKET).key(key).send());
        if let Err(e) = r {
            panic!("delete {key}: {}", S3Failure::from(&e));
        }
    }

    /// Keys of the multipart uploads in progress in the bucket (one entry per upload), sorted.
    /// s3s-fs 0.14 has no ListMultipartUploads (501): its uploads are then read from the data
    /// dir (`.upload-<id>.json` + `.bucket-<b64>.object-<b64>.upload-<id>.metadata.json`).
    pub fn multipart_uploads(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let r = self.block_on(
                self.client
                    .list_multipart_uploads()
                    .bucket(BUCKET)
                    .set_key_marker(key_marker.take())
                    .set_upload_id_marker(id_marker.take())
                    .send(),
            );
            let page = match r {
                Ok(page) => page,
                Err(e) if self.kind == Kind::InProcess && e.code() == Some("NotImplemented") => {
                    return self.s3s_fs_uploads();
                }
                Err(e) => panic!("list multipart uploads: {}", S3Failure::from(&e)),
            };
            for u in page.uploads() {
                keys.push(u.key().unwrap_or_default().to_string());
            }
            match (
                page.is_truncated(),
                page.next_key_marker(),
                page.next_upload_id_marker(),
            ) {
                (Some(true), Some(k), id) => {
                    key_marker = Some(k.to_string());
                    id_marker = id.map(str::to_string);
                }
                _ => break,
            }
        }
        keys.sort();
        keys
    }

    fn s3s_fs_uploads(&self) -> Vec<String> {
        let Backend::InProcess { root, .. } = &*self.backend.lock().unwrap() else {
            unreachable!()
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        let bucket_part = format!(".bucket-{}.object-", b64.encode(BUCKET));
        let mut keys = Vec::new();
        for name in &names {
            let Some(rest) = name.strip_prefix(&bucket_part) else {
                continue;
            };
            let Some(rest) = rest.strip_suffix(".metadata.json") else {
                continue;
            };
            let Some((key_b64, upload_id)) = rest.split_once(".upload-") else {
                continue;
            };
            if !names.contains(&format!(".upload-{upload_id}.json")) {
                continue;
            }
            if let Some(key) = b64
                .decode(key_b64)
                .ok()
                .and_then(|k| String::from_utf8(k).ok())
            {
                keys.push(key);
            }
        }
        keys.sort();
        keys
    }

    // ----- internals -----

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime")
    }

    /// Starts the Garage process and waits until HeadBucket on the default bucket succeeds.
    fn spawn_garage(&self) -> Result<(), String> {
        let started = Instant::now();
        {
            let mut backend = self.backend.lock().unwrap();
            let Backend::Garage {
                bin,
                config,
                log,
                child,
            } = &mut *backend
            else {
                unreachable!()
            };
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&*log)
                .unwrap();
            let mut cmd = Command::new(&*bin);
            cmd.arg("-c")
                .arg(&*config)
                .args(["server", "--single-node", "--default-bucket"])
                .env("GARAGE_DEFAULT_ACCESS_KEY", GARAGE_ACCESS_KEY)
                .env("GARAGE_DEFAULT_SECRET_KEY", GARAGE_SECRET_KEY)
                .env("GARAGE_DEFAULT_BUCKET", BUCKET)
                .env("RUST_LOG", "garage=warn")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file);
            // Garage dies with the thread that started it (PR_SET_PDEATHSIG), so an interrupted
            // test run leaves no server behind. That thread is one of the runtime's workers,
            // which live as long as this S3Server (not the test thread, which may be short-lived).
            // SAFETY: prctl is async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let spawned = self
                .rt()
                .block_on(self.rt().spawn(async move { cmd.spawn() }))
                .expect("spawn task")
                .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
            *child = Some(spawned);
        }
        let probe = {
            let _guard = self.rt().enter();
            make_client(
                &self.endpoint(),
                self.region,
                self.access_key,
                self.secret_key,
                1,
            )
        };
        let mut last = String::from("no answer");
        while started.elapsed() < GARAGE_START_TIMEOUT {
            if let Some(status) = self.garage_exit_status() {
                return Err(format!(
                    "garage exited with {status} after {:.1?}\n{}",
                    started.elapsed(),
                    self.garage_log_tail()
                ));
            }
            match self.try_head_bucket_with(&probe, BUCKET) {
                Ok(()) => {
                    if std::env::var_os("CUTOVERFS_TEST_VERBOSE").is_some() {
                        eprintln!("garage answered after {:.2?}", started.elapsed());
                    }
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_garage();
        Err(format!(
            "garage did not answer HeadBucket {BUCKET} on {} within {GARAGE_START_TIMEOUT:?} \
             (last: {last})\n{}",
            self.endpoint(),
            self.garage_log_tail()
        ))
    }

    fn garage_exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut backend = self.backend.lock().unwrap();
        match &mut *backend {
            Backend::Garage { child: Some(c), .. } => c.try_wait().ok().flatten(),
            _ => None,
        }
    }

    fn kill_garage(&self) {
        if let Backend::Garage { child, .. } = &mut *self.backend.lock().unwrap() {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn garage_log_tail(&self) -> String {
        let backend = self.backend.lock().unwrap();
        let Backend::Garage { log, .. } = &*backend else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("--- garage log ({}):\n{tail}", log.display())
    }

    fn garage_cli(&self, args: &[&str]) {
        let (bin, config) = match &*self.backend.lock().unwrap() {
            Backend::Garage { bin, config, .. } => (bin.clone(), config.clone()),
            _ => unreachable!(),
        };
        let out = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        assert!(
            out.status.success(),
            "garage {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn write_garage_config(dir: &Path, s3_port: u16, rpc_port: u16) -> PathBuf {
    let meta = dir.join("garage-meta");
    let data = dir.join("garage-data");
    std::fs::create_dir_all(&meta).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .unwrap();
    let config = dir.join("garage.toml");
    std::fs::write(
        &config,
        format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{GARAGE_REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
"#,
            meta = meta.display(),
            data = data.display(),
            secret = hex::encode(secret),
        ),
    )
    .unwrap();
    config
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("s3-test-server")
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Serves s3s-fs on `addr` until `Running::stop_tx` fires; then the listener is closed and every
/// open connection aborted (otherwise pooled keep-alive connections would still be served).
async fn serve_s3s_fs(
    addr: SocketAddr,
    root: &Path,
    access_key: &str,
    secret_key: &str,
) -> (SocketAddr, Running) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs root");
    let service = {
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(
            access_key.to_string(),
            secret_key.to_string(),
        ));
        // No set_host(): path-style requests only.
        b.build()
    };
    // tokio sets SO_REUSEADDR on Unix listeners: rebinding the port right after stop() works.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let local = listener.local_addr().unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                res = listener.accept() => {
                    let Ok((sock, _)) = res else { continue };
                    let _ = sock.set_nodelay(true);
                    // Each request is handled on a task of its own, as a real S3 server does: a
                    // client that goes away after sending a PUT does not cut the server's write
                    // of that object in half (s3s-fs writes the bytes and the metadata apart).
                    let svc = service.clone();
                    let detached = hyper::service::service_fn(move |req| {
                        let svc = svc.clone();
                        async move {
                            tokio::spawn(async move { hyper::service::Service::call(&svc, req).await })
                                .await
                                .expect("the S3 handler panicked")
                        }
                    });
                    conns.spawn(async move {
                        let _ = ConnBuilder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(sock), detached)
                            .await;
                    });
                }
                // Reap finished connections so the set does not grow.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    });
    (local, Running { stop_tx, task })
}

fn make_client(
    endpoint: &str,
    region: &str,
    access_key: &str,
    secret_key: &str,
    max_attempts: u32,
) -> Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(20))
        .operation_attempt_timeout(Duration::from_secs(30))
        .operation_timeout(Duration::from_secs(60))
        .build();
    let retry = RetryConfig::standard()
        .with_max_attempts(max_attempts)
        .with_initial_backoff(Duration::from_millis(20))
        .with_max_backoff(Duration::from_millis(200));
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(region.to_string()))
        .credentials_provider(Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "cutoverfs-test",
        ))
        .force_path_style(true)
        .timeout_config(timeouts)
        .retry_config(retry)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(conf)
}

pub fn sha256_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

/// What a failed SDK call amounts to: HTTP status and S3 error code when the server answered.
#[derive(Debug, Clone)]
pub struct S3Failure {
    /// `ServiceError`, `DispatchFailure` (connection refused/reset), `TimeoutError`, …
    pub kind: &'static str,
    pub status: Option<u16>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub detail: String,
}

impl S3Failure {
    /// `(status, code)` for compact assertions.
    pub fn status_code(&self) -> (Option<u16>, Option<&str>) {
        (self.status, self.code.as_deref())
    }
}

impl<E> From<&SdkError<E, HttpResponse>> for S3Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    fn from(e: &SdkError<E, HttpResponse>) -> S3Failure {
        let kind = match e {
            SdkError::ConstructionFailure(_) => "ConstructionFailure",
            SdkError::TimeoutError(_) => "TimeoutError",
            SdkError::DispatchFailure(_) => "DispatchFailure",
            SdkError::ResponseError(_) => "ResponseError",
            SdkError::ServiceError(_) => "ServiceError",
            _ => "other",
        };
        S3Failure {
            kind,
            status: e.raw_response().map(|r| r.status().as_u16()),
            code: e.code().map(str::to_string),
            message: e.message().map(str::to_string),
            detail: DisplayErrorContext(e).to_string(),
        }
    }
}

impl std::fmt::Display for S3Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} status={:?} code={:?} message={:?}",
            self.kind, self.status, self.code, self.message
        )?;
        // Without an HTTP response, the chain of causes is what tells what happened.
        if self.status.is_none() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// A TCP proxy in front of a server that flips one byte (the middle one) of `marker` each time
/// the marker passes from client to server, `times` times in all (over all connections); then
/// passes traffic unchanged. The marker should not overlap itself and must not occur in request
/// heads (keys, headers), only in bodies.
pub struct CorruptingProxy {
    addr: SocketAddr,
    corrupted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<ThreadHandle<()>>,
}

impl CorruptingProxy {
    pub fn start(upstream_endpoint: &str, marker: &[u8], times: usize) -> CorruptingProxy {
        assert!(!marker.is_empty(), "empty marker");
        let upstream: SocketAddr = upstream_endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap_or_else(|e| panic!("upstream {upstream_endpoint:?}: {e}"));
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let corrupted = Arc::new(AtomicUsize::new(0));
        let remaining = Arc::new(AtomicUsize::new(times));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let marker = marker.to_vec();
        let acceptor = {
            let (corrupted, stop, sockets) = (corrupted.clone(), stop.clone(), sockets.clone());
            std::thread::Builder::new()
                .name("corrupting-proxy".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let client = match listener.accept() {
                            Ok((s, _)) => s,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(2));
                                continue;
                            }
                            Err(_) => continue,
                        };
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(upstream) else {
                            // Upstream down: the client sees its connection closed.
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        {
                            let mut list = sockets.lock().unwrap();
                            list.push(client.try_clone().unwrap());
                            list.push(server.try_clone().unwrap());
                        }
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let (marker, remaining, corrupted) =
                            (marker.clone(), remaining.clone(), corrupted.clone());
                        std::thread::spawn(move || {
                            pump_corrupting(client, server, &marker, &remaining, &corrupted)
                        });
                        std::thread::spawn(move || pump_plain(s2, c2));
                    }
                })
                .unwrap()
        };
        CorruptingProxy {
            addr,
            corrupted,
            stop,
            sockets,
            acceptor: Some(acceptor),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many times a marker was flipped so far.
    pub fn corrupted(&self) -> usize {
        self.corrupted.load(Ordering::SeqCst)
    }
}

impl Drop for CorruptingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Client → server, flipping markers. A tail that could be the start of a marker is held back
/// until more bytes come (or 20 ms pass), so markers split over reads are still seen.
fn pump_corrupting(
    mut from: TcpStream,
    mut to: TcpStream,
    marker: &[u8],
    remaining: &AtomicUsize,
    corrupted: &AtomicUsize,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let timeout = (!pending.is_empty()).then(|| Duration::from_millis(20));
        if from.set_read_timeout(timeout).is_err() {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if to.write_all(&pending).is_err() {
                    break;
                }
                pending.clear();
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        let mut from_pos = 0;
        while let Some(found) = find(&pending[from_pos..], marker) {
            let at = from_pos + found;
            let take =
                remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if take.is_ok() {
                pending[at + marker.len() / 2] ^= 0x01;
                corrupted.fetch_add(1, Ordering::SeqCst);
            }
            from_pos = at + marker.len();
        }
        let keep = partial_marker_suffix(&pending, marker);
        let send = pending.len() - keep;
        if to.write_all(&pending[..send]).is_err() {
            break;
        }
        pending.drain(..send);
    }
    let _ = to.write_all(&pending);
    let _ = to.shutdown(Shutdown::Write);
}

fn pump_plain(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `data` that is a proper prefix of `marker`.
fn partial_marker_suffix(data: &[u8], marker: &[u8]) -> usize {
    (1..marker.len().min(data.len() + 1))
        .rev()
        .find(|&k| data.ends_with(&marker[..k]))
        .unwrap_or(0)
}

/// Runs each test body against the in-process server and (ignored unless `--ignored`) Garage:
///
/// ```ignore
/// s3_tests! {
///     /// docs and attributes go on the body function
///     fn round_trip(server: &S3Server) { server.put("a", b"x"); }
/// }
/// ```
/// expands to `fn round_trip(server: &S3Server) {..}`, `mod in_process { #[test] fn round_trip() }`
/// and `mod garage { #[test] #[ignore = ".."] fn round_trip() }`. The crate must have `mod common;`
/// at its root.
#[macro_export]
macro_rules! s3_tests {
    ($( $(#[$meta:meta])* fn $name:ident ($server:ident : $ty:ty) $body:block )*) => {
        $(
            $(#[$meta])*
            fn $name($server: $ty) $body
        )*

        mod in_process {
            $(
                #[test]
                fn $name() {
                    let server = $crate::common::s3::S3Server::start(
                        $crate::common::s3::Kind::InProcess,
                    );
                    super::$name(&server)
                }
            )*
        }

        mod garage {
            $(
                #[test]
                #[ignore = "needs Garage: .ci/run sets CUTOVERFS_TEST_GARAGE and runs these with --ignored"]
                fn $name() {
                    let server = $crate::common::s3::S3Server::start(
                        $crate::common::s3::Kind::Garage,
                    );
                    super::$name(&server)
                }
            )*
        }
    };
}

/// How a `StallingProxy` treats the connections it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Bytes pass both ways.
    None,
    /// Connections are accepted and read, and never answered.
    Silent,
    /// Requests pass; answers come back at one byte per second.
    Trickle,
}

/// A TCP proxy in front of a server that can start stalling at any moment: a dest that accepts
/// connections and never answers, or answers at 1 byte/s. Changing the mode cuts every open
/// connection, so pooled keep-alive connections meet the new behaviour too.
pub struct StallingProxy {
    addr: SocketAddr,
    mode: Arc<Mutex<(Stall, u64)>>,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<ThreadHandle<()>>,
}

impl StallingProxy {
    pub fn start(upstream_endpoint: &str) -> StallingProxy {
        let upstream: SocketAddr = upstream_endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap_or_else(|e| panic!("upstream {upstream_endpoint:?}: {e}"));
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new((Stall::None, 0u64)));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let acceptor = {
            let (mode, stop, sockets) = (mode.clone(), stop.clone(), sockets.clone());
            std::thread::Builder::new()
                .name("stalling-proxy".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let client = match listener.accept() {
                            Ok((s, _)) => s,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(2));
                                continue;
                            }
                            Err(_) => continue,
                        };
                        let _ = client.set_nonblocking(false);
                        sockets.lock().unwrap().push(client.try_clone().unwrap());
                        let (stall, _) = *mode.lock().unwrap();
                        if stall == Stall::Silent {
                            std::thread::spawn(move || swallow(client));
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        sockets.lock().unwrap().push(server.try_clone().unwrap());
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        std::thread::spawn(move || pump_plain(client, server));
                        match stall {
                            Stall::Trickle => std::thread::spawn(move || trickle(s2, c2)),
                            _ => std::thread::spawn(move || pump_plain(s2, c2)),
                        };
                    }
                })
                .unwrap()
        };
        StallingProxy {
            addr,
            mode,
            stop,
            sockets,
            acceptor: Some(acceptor),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, every connection (open ones are cut) behaves as `stall` says.
    pub fn set(&self, stall: Stall) {
        let mut mode = self.mode.lock().unwrap();
        mode.0 = stall;
        mode.1 += 1;
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Reads a connection until it is closed, answering nothing.
fn swallow(mut from: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while matches!(from.read(&mut buf), Ok(n) if n > 0) {}
}

/// Server → client at one byte per second.
fn trickle(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                for byte in &buf[..n] {
                    if to.write_all(std::slice::from_ref(byte)).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
