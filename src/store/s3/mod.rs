//! The S3 dest: `s3://bucket/prefix` on AWS S3 or any S3-compatible server.
//!
//! Owns: the S3 client (credentials from the standard AWS chain, timeouts, retries), keys, the
//! ownership rule for objects, single and multipart uploads, and the preflight. It never touches
//! the manifest or the mount: what it knows of ownership comes in the `PutRequest` and the
//! `PublishGuard`, and it answers per file.
//!
//! Safety (DESIGN §4.2, §4.3): every object we write carries `x-amz-meta-cutoverfs-writer` (the
//! manifest id) and `x-amz-meta-cutoverfs-sha256`; a key is checked with a HEAD before it is
//! written and written with `If-None-Match: *` (or `If-Match` on the etag of our own older
//! version), because some servers ignore the header and others honour it. Uploads carry
//! `x-amz-checksum-sha256` (per part for multipart) so the server rejects corrupted bytes, and
//! a multipart upload that fails is aborted, so nothing partial is ever visible.

mod clock;
mod failure;
mod settings;
mod upload;

pub use failure::{RemoteError, RemoteKind};
pub use settings::{S3Flags, S3Location, S3Settings, Sse};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ChecksumMode;
use aws_sdk_s3::Client;
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::{
    ObjectFacts, Preflight, PublishGuard, PutOutcome, PutRequest, Removal, Store, StoreError,
    Stored,
};

/// User metadata names (sent as `x-amz-meta-<name>`).
pub const META_WRITER: &str = "cutoverfs-writer";
pub const META_SHA256: &str = "cutoverfs-sha256";
pub const META_MTIME: &str = "mtime";
pub const META_MODE: &str = "mode";

/// Longest key S3 accepts, in bytes.
const MAX_KEY_BYTES: usize = 1024;

pub struct S3Store {
    client: Client,
    settings: S3Settings,
    /// File bytes held in memory by uploads, in KiB permits, shared by all files in flight.
    memory: Arc<Semaphore>,
    part_buffers: upload::BufferPool,
}

impl S3Store {
    pub async fn connect(settings: S3Settings) -> Result<S3Store, StoreError> {
        let client = build_client(&settings).await?;
        let permits = (settings.upload_memory >> 10).min(Semaphore::MAX_PERMITS as u64) as usize;
        Ok(S3Store {
            client,
            memory: Arc::new(Semaphore::new(permits)),
            part_buffers: Default::default(),
            settings,
        })
    }

    /// The server, for messages.
    fn endpoint_display(&self) -> String {
        match (&self.settings.endpoint, &self.settings.region) {
            (Some(endpoint), _) => endpoint.clone(),
            (None, Some(region)) => format!("AWS S3 ({region})"),
            (None, None) => "AWS S3".to_string(),
        }
    }

    fn remote(&self, op: &'static str, key: &str, error: RemoteError) -> StoreError {
        StoreError::Remote {
            op,
            target: format!("s3://{}/{key}", self.settings.bucket),
            error,
        }
    }

    /// What is at `key` now, if anything.
    async fn head(&self, key: &str) -> Result<Option<Existing>, RemoteError> {
        let answer = self
            .client
            .head_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await;
        match answer {
            Ok(head) => Ok(Some(Existing {
                size: head.content_length().unwrap_or(0).max(0) as u64,
                etag: head.e_tag().map(str::to_string),
                metadata: head.metadata().cloned().unwrap_or_default(),
                checksum_sha256: head.checksum_sha256().map(str::to_string),
            })),
            Err(e) => {
                let error = RemoteError::classify(e);
                match error.kind {
                    RemoteKind::NotFound => Ok(None),
                    _ => Err(error),
                }
            }
        }
    }

    /// SHA-256 of the object at `key`, read in full (for objects cutoverfs did not write and
    /// whose size matches: the only way to know they hold the same content).
    async fn hash_object(&self, key: &str) -> Result<String, RemoteError> {
        use sha2::Digest;
        let object = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(RemoteError::classify)?;
        let mut body = object.body;
        let mut hasher = sha2::Sha256::new();
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| RemoteError::other(format!("reading {key}: {e}")))?
        {
            hasher.update(&chunk);
        }
        Ok(hex::encode(hasher.finalize()))
    }

    async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        self.client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(RemoteError::classify)
    }

    /// Says what to do about an existing object whose content is unknown but size matches.
    async fn settle_unmarked(
        &self,
        key: &str,
        sha256: &str,
        size: u64,
        etag: Option<String>,
    ) -> Result<PutOutcome, StoreError> {
        let theirs = self
            .hash_object(key)
            .await
            .map_err(|e| self.remote("read", key, e))?;
        Ok(if theirs == sha256 {
            PutOutcome::AlreadyThere {
                sha256: sha256.to_string(),
                size,
                ours: false,
                etag,
            }
        } else {
            PutOutcome::Conflict {
                reason: format!(
                    "the dest holds a different object of the same size ({size} bytes, SHA-256 {theirs}) that cutoverfs did not write"
                ),
            }
        })
    }

    /// Probe object round trip: written, read back, compared and deleted.
    async fn probe(&self) -> Result<(), StoreError> {
        let key = format!(
            "{}{PROBE_PREFIX}{:016x}",
            self.settings.prefix,
            rand::random::<u64>()
        );
        let body = format!("cutoverfs preflight probe {key}\n").into_bytes();
        let sha = upload::Sha256Sum::of(&body);
        let unusable = |what: &str, e: RemoteError| {
            StoreError::Unusable(format!(
                "{what} a probe object at s3://{}/{key} on {}: {}",
                self.settings.bucket,
                self.endpoint_display(),
                explain(&e)
            ))
        };
        self.client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(&key)
            .checksum_sha256(&sha.base64)
            .if_none_match("*")
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .map_err(|e| unusable("cannot write", RemoteError::classify(e)))?;
        let read_back = async {
            let object = self
                .client
                .get_object()
                .bucket(&self.settings.bucket)
                .key(&key)
                .send()
                .await
                .map_err(RemoteError::classify)?;
            let bytes = object
                .body
                .collect()
                .await
                .map_err(|e| RemoteError::other(e.to_string()))?
                .into_bytes();
            Ok::<_, RemoteError>(bytes)
        }
        .await;
        let deleted = self.delete(&key).await;
        self.remove_stale_probes().await;
        let bytes = read_back.map_err(|e| unusable("cannot read back", e))?;
        if bytes.as_ref() != body.as_slice() {
            return Err(StoreError::Unusable(format!(
                "the probe object read back from s3://{}/{key} differs from what was written",
                self.settings.bucket
            )));
        }
        deleted.map_err(|e| unusable("cannot delete", e))
    }
}

/// Groups smaller than this HEAD each key: a listing would not save a request.
const LIST_FOR_GROUPS_OF: usize = 4;
/// Pages of a key-range listing before it is not worth it (other objects between the keys).
const LIST_PAGES_AT_MOST: usize = 2;

impl S3Store {
    /// The keys of a group that are not at the dest, from one listing of the group's key range
    /// instead of a HEAD per key (the sweep hands over groups in path order, so their keys are
    /// close together). Empty, and every key is HEADed, when the listing fails or the range
    /// holds too many other objects.
    async fn absent_keys(&self, requests: &[PutRequest]) -> std::collections::HashSet<String> {
        let mut absent: std::collections::HashSet<String> =
            requests.iter().map(|r| r.key.clone()).collect();
        if requests.len() < LIST_FOR_GROUPS_OF {
            return Default::default();
        }
        let (Some(first), Some(last)) =
            (absent.iter().min().cloned(), absent.iter().max().cloned())
        else {
            return Default::default();
        };
        let common = common_prefix(&first, &last);
        // Keys after `first` minus its last character: `first` itself and all after it.
        let mut start_after = first.clone();
        start_after.pop();
        let mut token: Option<String> = None;
        for _ in 0..LIST_PAGES_AT_MOST {
            let listed = self
                .client
                .list_objects_v2()
                .bucket(&self.settings.bucket)
                .prefix(common)
                .set_start_after(
                    (token.is_none() && !start_after.is_empty()).then(|| start_after.clone()),
                )
                .set_continuation_token(token.take())
                .send()
                .await;
            let Ok(listed) = listed else {
                return Default::default();
            };
            for key in listed.contents().iter().filter_map(|o| o.key()) {
                if key > last.as_str() {
                    return absent;
                }
                absent.remove(key);
            }
            match listed.next_continuation_token() {
                Some(next) if listed.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => return absent,
            }
        }
        Default::default()
    }

    /// Probe objects of runs killed between writing and deleting their probe. Only old ones: a
    /// young probe may belong to another node's preflight in progress.
    async fn remove_stale_probes(&self) {
        let listed = self
            .client
            .list_objects_v2()
            .bucket(&self.settings.bucket)
            .prefix(format!("{}{PROBE_PREFIX}", self.settings.prefix))
            .send()
            .await;
        let Ok(listed) = listed else { return };
        let stale_before = std::time::SystemTime::now() - STALE_PROBE_AGE;
        for object in listed.contents() {
            let old = object
                .last_modified()
                .and_then(|at| std::time::SystemTime::try_from(*at).ok())
                .is_some_and(|at| at < stale_before);
            if let (true, Some(key)) = (old, object.key()) {
                if let Err(e) = self.delete(key).await {
                    tracing::debug!(key, error = %e, "cannot remove a stale probe object");
                }
            }
        }
    }
}

const PROBE_PREFIX: &str = ".cutoverfs-probe-";
const STALE_PROBE_AGE: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::upload::Sha256Sum;
    use super::*;

    fn object(size: u64, meta: &[(&str, &str)]) -> Existing {
        Existing {
            size,
            etag: Some("\"e\"".into()),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            checksum_sha256: None,
        }
    }

    #[test]
    fn the_ownership_rule() {
        let sum = Sha256Sum::of(b"content");
        let other = Sha256Sum::of(b"other!!");
        let owned = vec![sum.hex.clone()];
        let ours_done = object(7, &[(META_WRITER, "m1"), (META_SHA256, &sum.hex)]);
        let done = |o: &Existing, owned: &[String]| decide(Some(o), "m1", owned, &sum, 7);
        assert_eq!(decide(None, "m1", &[], &sum, 7), Decision::Create);
        assert!(matches!(
            done(&ours_done, &owned),
            Decision::Done(PutOutcome::AlreadyThere { ours: true, .. })
        ));
        // Marked ours but never recorded as done (a failed write the server kept): rewritten.
        assert!(matches!(done(&ours_done, &[]), Decision::Replace { .. }));
        // An older version of ours: replaced.
        let older = object(7, &[(META_WRITER, "m1"), (META_SHA256, &other.hex)]);
        assert!(matches!(done(&older, &owned), Decision::Replace { .. }));
        // Someone else's: a conflict unless identical.
        let theirs = object(9, &[(META_WRITER, "m2")]);
        assert!(matches!(
            done(&theirs, &owned),
            Decision::Done(PutOutcome::Conflict { .. })
        ));
        let same_size = object(7, &[]);
        assert_eq!(done(&same_size, &owned), Decision::CompareContent);
        let mut with_checksum = object(7, &[]);
        with_checksum.checksum_sha256 = Some(sum.base64.clone());
        assert!(matches!(
            done(&with_checksum, &[]),
            Decision::Done(PutOutcome::AlreadyThere { ours: false, .. })
        ));
        with_checksum.checksum_sha256 = Some(other.base64.clone());
        assert!(matches!(
            done(&with_checksum, &[]),
            Decision::Done(PutOutcome::Conflict { .. })
        ));
    }

    #[test]
    fn common_prefixes_stop_at_characters() {
        assert_eq!(common_prefix("media/a/1", "media/b/2"), "media/");
        assert_eq!(common_prefix("m/\u{e9}1", "m/\u{e8}2"), "m/");
        assert_eq!(common_prefix("x", "y"), "");
    }
}

/// The longest common prefix of two keys, cut at a character boundary.
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let mut end = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(end) {
        end -= 1;
    }
    &a[..end]
}

/// What a HEAD said about a key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Existing {
    size: u64,
    etag: Option<String>,
    metadata: HashMap<String, String>,
    /// Base64 SHA-256 of the whole object, when the server keeps one (single-part uploads).
    checksum_sha256: Option<String>,
}

/// What to do at a key, decided from its HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nothing there: create, only if still nothing there.
    Create,
    /// An older object of ours: replace it, only if it is still that one.
    Replace {
        etag: Option<String>,
    },
    Done(PutOutcome),
    /// Someone else's object of the same size and unknown content: read it to decide.
    CompareContent,
}

/// Whether cutoverfs wrote this object: it carries this manifest's mark, or its recorded hash
/// is one cutoverfs wrote at this key before.
fn is_ours(existing: &Existing, writer: &str, owned_sha256: &[String]) -> bool {
    existing.metadata.get(META_WRITER).map(String::as_str) == Some(writer)
        || existing
            .metadata
            .get(META_SHA256)
            .is_some_and(|hash| owned_sha256.contains(hash))
}

/// The ownership rule (DESIGN §4.2): an object is ours if it carries our manifest id, or its
/// recorded hash is one we wrote at this key before. Ours may be replaced; anything else only
/// counts as done when it holds exactly the same bytes.
pub(crate) fn decide(
    existing: Option<&Existing>,
    writer: &str,
    owned_sha256: &[String],
    sha256: &upload::Sha256Sum,
    size: u64,
) -> Decision {
    let Some(existing) = existing else {
        return Decision::Create;
    };
    let recorded = existing.metadata.get(META_SHA256);
    let ours = is_ours(existing, writer, owned_sha256);
    let already = |ours| {
        Decision::Done(PutOutcome::AlreadyThere {
            sha256: sha256.hex.clone(),
            size,
            ours,
            etag: existing.etag.clone(),
        })
    };
    if ours {
        // Our mark and hash are only what we asked for: the bytes are known good when the
        // manifest recorded that write as done. A write that failed after the server kept the
        // body, or a crash before the record, is written again.
        let recorded_done =
            recorded.is_some_and(|hash| *hash == sha256.hex) && owned_sha256.contains(&sha256.hex);
        return if existing.size == size && recorded_done {
            already(true)
        } else {
            Decision::Replace {
                etag: existing.etag.clone(),
            }
        };
    }
    if existing.size != size {
        return Decision::Done(PutOutcome::Conflict {
            reason: format!(
                "the dest holds a different object ({} bytes, not {size}) that cutoverfs did not write",
                existing.size
            ),
        });
    }
    match &existing.checksum_sha256 {
        Some(theirs) if !theirs.contains('-') => {
            if *theirs == sha256.base64 {
                already(false)
            } else {
                Decision::Done(PutOutcome::Conflict {
                    reason: "the dest holds a different object of the same size that cutoverfs did not write".into(),
                })
            }
        }
        _ => Decision::CompareContent,
    }
}

#[async_trait]
impl Store for S3Store {
    fn canonical_url(&self) -> String {
        self.settings.canonical_url()
    }

    fn key_for(&self, rel: &str) -> Result<String, String> {
        if rel.chars().any(char::is_control) {
            return Err(
                "the name holds a control character, which S3 listings cannot return".into(),
            );
        }
        let key = format!("{}{rel}", self.settings.prefix);
        if key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "the key would be {} bytes long; S3 keys hold at most {MAX_KEY_BYTES}",
                key.len()
            ));
        }
        Ok(key)
    }

    async fn preflight(&self, mode: Preflight) -> Result<(), StoreError> {
        let server_date = clock::ServerDate::default();
        let listed = self
            .client
            .list_objects_v2()
            .bucket(&self.settings.bucket)
            .prefix(&self.settings.prefix)
            .max_keys(1)
            .customize()
            .interceptor(server_date.clone())
            .send()
            .await;
        if let Some((theirs, ours, off)) = server_date.skew() {
            return Err(StoreError::Unusable(format!(
                "clock skew: this machine's clock is {} off the server's ({ours} here, {theirs} at {}); S3 refuses requests more than 15 minutes off: fix the time (NTP) and retry",
                humantime::format_duration(Duration::from_secs(off.as_secs())),
                self.endpoint_display()
            )));
        }
        if let Err(e) = listed {
            let error = RemoteError::classify(e);
            return Err(StoreError::Unusable(format!(
                "cannot use s3://{}/{} on {}: {}",
                self.settings.bucket,
                self.settings.prefix,
                self.endpoint_display(),
                explain(&error)
            )));
        }
        match mode {
            Preflight::ReadWrite => self.probe().await,
            Preflight::ReadOnly => Ok(()),
        }
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn put_many(
        &self,
        requests: Vec<PutRequest>,
        guard: &dyn PublishGuard,
    ) -> Vec<Result<Stored, StoreError>> {
        let writer = guard.writer_id();
        let absent = self.absent_keys(&requests).await;
        let puts = requests.into_iter().map(|request| {
            let span = tracing::info_span!("put", key = %request.key);
            let known_absent = absent.contains(&request.key);
            self.put_one(request, &writer, known_absent)
                .instrument(span)
        });
        futures_util::future::join_all(puts).await
    }

    fn put_requests(&self, size: u64) -> u64 {
        if size < self.settings.multipart_threshold {
            1
        } else {
            // create + parts + complete
            2 + size.div_ceil(self.settings.part_size_for(size))
        }
    }

    async fn existing_size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.head(key)
            .await
            .map(|found| found.map(|e| e.size))
            .map_err(|e| self.remote("head", key, e))
    }

    async fn read_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, StoreError> {
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        let answer = async {
            let object = self
                .client
                .get_object()
                .bucket(&self.settings.bucket)
                .key(key)
                .range(format!("bytes={offset}-{}", offset + len - 1))
                .send()
                .await
                .map_err(RemoteError::classify)?;
            object
                .body
                .collect()
                .await
                .map(|data| data.into_bytes())
                .map_err(|e| RemoteError::other(format!("reading {key}: {e}")))
        }
        .await;
        answer.map_err(|e| self.remote("get", key, e))
    }

    async fn inspect(&self, key: &str, deep: bool) -> Result<Option<ObjectFacts>, StoreError> {
        let Some(existing) = self
            .head(key)
            .await
            .map_err(|e| self.remote("head", key, e))?
        else {
            return Ok(None);
        };
        let read_sha256 = if deep {
            Some(
                self.hash_object(key)
                    .await
                    .map_err(|e| self.remote("read", key, e))?,
            )
        } else {
            None
        };
        Ok(Some(ObjectFacts {
            size: existing.size,
            recorded_sha256: existing.metadata.get(META_SHA256).cloned(),
            read_sha256,
            etag: existing.etag,
        }))
    }

    async fn delete_owned(
        &self,
        key: &str,
        owned_sha256: &[String],
        writer: &str,
    ) -> Result<Removal, StoreError> {
        let existing = self
            .head(key)
            .await
            .map_err(|e| self.remote("head", key, e))?;
        let Some(existing) = existing else {
            return Ok(Removal::Absent);
        };
        if !is_ours(&existing, writer, owned_sha256) {
            return Ok(Removal::NotOurs);
        }
        self.delete(key)
            .await
            .map_err(|e| self.remote("delete", key, e))?;
        Ok(Removal::Deleted)
    }

    /// S3 has no directories; the manifest keeps them.
    async fn ensure_dir(&self, _rel: &str, _mode: u32) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The operator-facing sentence for a failure of the first requests to a dest.
fn explain(error: &RemoteError) -> String {
    let hint = match error.kind {
        RemoteKind::Unreachable => "endpoint unreachable (is the server up, the URL right?)",
        RemoteKind::Timeout => "the endpoint did not answer in time",
        RemoteKind::Tls => "TLS handshake failed (https to a plain-http port, or an untrusted certificate?)",
        RemoteKind::AccessDenied => {
            "access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile) and the bucket policy"
        }
        RemoteKind::NoCredentials => {
            // The SDK's own words list every provider it tried; the hint says it all.
            return "no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile (--s3-profile), or run where instance credentials exist".to_string();
        }
        RemoteKind::NoSuchBucket | RemoteKind::NotFound => "no such bucket",
        RemoteKind::ClockSkew => {
            "clock skew: the server says this machine's clock is off; fix the time (NTP) and retry"
        }
        _ => error.kind.describe(),
    };
    format!("{hint} [{}]", error.detail)
}

async fn build_client(settings: &S3Settings) -> Result<Client, StoreError> {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    let t = settings.timeouts;
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(t.connect)
                .read_timeout(t.read)
                .operation_attempt_timeout(t.attempt)
                .build(),
        )
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(t.max_attempts)
                .with_initial_backoff(Duration::from_millis(200))
                .with_max_backoff(Duration::from_secs(5)),
        );
    if let Some(profile) = &settings.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &settings.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let shared = loader.load().await;
    let mut config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(settings.path_style)
        // We send SHA-256 ourselves; the SDK's default CRC32 on top would cost a second pass.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if shared.region().is_none() {
        if settings.endpoint.is_none() {
            return Err(StoreError::Unusable(
                "no AWS region: give ?region= in the dest URL, --s3-region, or AWS_REGION".into(),
            ));
        }
        // S3-compatible servers mostly accept any region; this is what they expect by default.
        config = config.region(Region::new("us-east-1"));
    }
    Ok(Client::from_conf(config.build()))
}
