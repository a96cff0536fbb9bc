//! Putting one file at a key: a single PUT below the multipart threshold, a multipart upload
//! with parts in parallel above it. Either way the server checks a SHA-256 of every byte we
//! send, our whole-file SHA-256 rides along as metadata, and the key is only written when the
//! HEAD-based ownership decision allows it.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use base64::Engine as _;
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;

use super::failure::{RemoteError, RemoteKind};
use super::{decide, Decision, S3Store, Sse, META_MODE, META_MTIME, META_SHA256, META_WRITER};
use crate::source::{Attrs, OpenedSource};
use crate::store::{blocking, PutOutcome, PutRequest, SourceRef, StoreError, Stored, PACED_CHUNK};

/// A SHA-256 in the two spellings we need: hex for the manifest and metadata, base64 for the
/// `x-amz-checksum-sha256` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Sum {
    pub hex: String,
    pub base64: String,
}

impl Sha256Sum {
    pub fn of(bytes: &[u8]) -> Sha256Sum {
        Sha256Sum::from_hasher(Sha256::new_with_prefix(bytes))
    }

    fn from_hasher(hasher: Sha256) -> Sha256Sum {
        let digest = hasher.finalize();
        Sha256Sum {
            hex: hex::encode(digest),
            base64: base64::engine::general_purpose::STANDARD.encode(digest),
        }
    }
}

/// How the write at a key is made conditional.
#[derive(Debug, Clone)]
enum Condition {
    /// Only if nothing is there (`If-None-Match: *`).
    Create,
    /// Only if our older object is still the one there (`If-Match: etag`).
    Replace(Option<String>),
}

impl Condition {
    fn of(decision: &Decision) -> Option<Condition> {
        match decision {
            Decision::Create => Some(Condition::Create),
            Decision::Replace { etag } => Some(Condition::Replace(etag.clone())),
            _ => None,
        }
    }

    fn if_none_match(&self) -> Option<String> {
        matches!(self, Condition::Create).then(|| "*".to_string())
    }

    fn if_match(&self) -> Option<String> {
        match self {
            Condition::Replace(etag) => etag.clone(),
            Condition::Create => None,
        }
    }
}

/// The headers every object we write carries.
struct ObjectHeaders {
    content_type: String,
    cache_control: Option<String>,
    metadata: HashMap<String, String>,
    sse: Option<ServerSideEncryption>,
    sse_kms_key_id: Option<String>,
    storage_class: Option<StorageClass>,
}

/// Sets the object headers on a PutObject or CreateMultipartUpload request (the two builders
/// have the same setters but no common trait).
macro_rules! with_headers {
    ($request:expr, $headers:expr) => {{
        let headers = $headers;
        $request
            .content_type(headers.content_type)
            .set_cache_control(headers.cache_control)
            .set_metadata(Some(headers.metadata))
            .set_server_side_encryption(headers.sse)
            .set_ssekms_key_id(headers.sse_kms_key_id)
            .set_storage_class(headers.storage_class)
    }};
}

impl S3Store {
    /// `known_absent`: a listing just showed nothing at the key, so the HEAD is skipped (the
    /// write is still conditional).
    pub(super) async fn put_one(
        &self,
        request: PutRequest,
        writer: &str,
        known_absent: bool,
    ) -> Result<Stored, StoreError> {
        let opened = Arc::new(open_source(request.source.clone()).await?);
        let attrs = opened.before;
        let outcome = if attrs.size >= self.settings.multipart_threshold {
            self.put_large(&request, opened, writer, known_absent)
                .await?
        } else {
            self.put_small(&request, opened, writer, known_absent)
                .await?
        };
        Ok(Stored {
            outcome,
            source: attrs,
        })
    }

    /// Reads the whole file into memory (hashing it) while the key is HEADed, then one PUT.
    async fn put_small(
        &self,
        request: &PutRequest,
        opened: Arc<OpenedSource>,
        writer: &str,
        known_absent: bool,
    ) -> Result<PutOutcome, StoreError> {
        let key = &request.key;
        let permit = self.hold_memory(opened.before.size).await?;
        let reader = opened.clone();
        let source = request.source.clone();
        let read = blocking(move || {
            let mut bytes = Vec::with_capacity(reader.before.size as usize);
            read_all(&reader, &source, &mut bytes)
                .map_err(|e| StoreError::SourceRead(Arc::new(e)))?;
            let sum = Sha256Sum::of(&bytes);
            crate::testhook::hold_point("copy:read", &source.rel);
            reader.confirm_unchanged()?;
            Ok((bytes, sum))
        });
        let (read, existing) = tokio::join!(read, self.head_unless(known_absent, key));
        let (bytes, sum) = read?;
        let size = bytes.len() as u64;
        let condition = match self
            .write_needed(request, writer, &sum, size, existing)
            .await?
        {
            Ok(condition) => condition,
            Err(settled) => return Ok(settled),
        };
        let headers = self.object_headers(key, &sum, &opened.before, writer);
        let answer = with_headers!(self.client.put_object(), headers)
            .bucket(&self.settings.bucket)
            .key(key)
            .checksum_sha256(&sum.base64)
            .set_if_none_match(condition.if_none_match())
            .set_if_match(condition.if_match())
            .body(ByteStream::from(bytes))
            .customize()
            // The server checks x-amz-checksum-sha256; signing the payload too would hash
            // every byte a second time.
            .disable_payload_signing()
            .send()
            .await;
        drop(permit);
        match answer {
            Ok(put) => {
                if let Some(echoed) = put.checksum_sha256().filter(|e| *e != sum.base64) {
                    return Err(self.remote(
                        "put",
                        key,
                        RemoteError {
                            kind: RemoteKind::ChecksumMismatch,
                            status: None,
                            code: None,
                            detail: format!(
                                "the server stored SHA-256 {echoed}, we sent {}",
                                sum.base64
                            ),
                        },
                    ));
                }
                Ok(PutOutcome::Written {
                    sha256: sum.hex,
                    size,
                    etag: put.e_tag().map(str::to_string),
                })
            }
            Err(e) => {
                self.after_refused_put(key, RemoteError::classify(e), request, writer, &sum, size)
                    .await
            }
        }
    }

    /// Hashes the file in one pass while the key is HEADed, then uploads it in parts in
    /// parallel. The hash comes first because it is the object's metadata, which S3 takes when
    /// the upload starts.
    async fn put_large(
        &self,
        request: &PutRequest,
        opened: Arc<OpenedSource>,
        writer: &str,
        known_absent: bool,
    ) -> Result<PutOutcome, StoreError> {
        let key = &request.key;
        let size = opened.before.size;
        let reader = opened.clone();
        let hashed = blocking(move || hash_file(&reader));
        let (hashed, existing) = tokio::join!(hashed, self.head_unless(known_absent, key));
        let sum = hashed?;
        let condition = match self
            .write_needed(request, writer, &sum, size, existing)
            .await?
        {
            Ok(condition) => condition,
            Err(settled) => return Ok(settled),
        };
        let headers = self.object_headers(key, &sum, &opened.before, writer);
        let created = with_headers!(self.client.create_multipart_upload(), headers)
            .bucket(&self.settings.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| self.remote("create multipart upload", key, RemoteError::classify(e)))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                self.remote(
                    "create multipart upload",
                    key,
                    RemoteError::other("the server returned no upload id"),
                )
            })?
            .to_string();
        let uploaded = self
            .upload_parts_and_complete(key, &upload_id, &opened, &request.source, &condition)
            .await;
        match uploaded {
            Ok(etag) => {
                self.check_size(key, size).await?;
                Ok(PutOutcome::Written {
                    sha256: sum.hex,
                    size,
                    etag,
                })
            }
            Err(error) => {
                self.abort_upload(key, &upload_id).await;
                match error {
                    StoreError::Remote { error, .. }
                        if error.kind == RemoteKind::PreconditionFailed =>
                    {
                        self.after_refused_put(key, error, request, writer, &sum, size)
                            .await
                    }
                    other => Err(other),
                }
            }
        }
    }

    async fn upload_parts_and_complete(
        &self,
        key: &str,
        upload_id: &str,
        opened: &Arc<OpenedSource>,
        source: &SourceRef,
        condition: &Condition,
    ) -> Result<Option<String>, StoreError> {
        let size = opened.before.size;
        let part_size = self.settings.part_size_for(size);
        let count = size.div_ceil(part_size).max(1);
        let parallel = (self.settings.upload_memory / part_size).clamp(1, 16) as usize;
        let mut parts: Vec<CompletedPart> = futures_util::stream::iter(0..count)
            .map(|index| {
                let offset = index * part_size;
                let len = part_size.min(size - offset);
                self.upload_part(
                    key,
                    upload_id,
                    opened,
                    source,
                    index as i32 + 1,
                    (offset, len),
                )
            })
            .buffer_unordered(parallel)
            .try_collect()
            .await?;
        parts.sort_by_key(|part| part.part_number());
        let checker = opened.clone();
        let rel = source.rel.clone();
        blocking(move || {
            crate::testhook::hold_point("copy:read", &rel);
            checker.confirm_unchanged().map_err(StoreError::from)
        })
        .await?;
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .set_if_none_match(condition.if_none_match())
            .set_if_match(condition.if_match())
            .send()
            .await
            .map_err(|e| self.remote("complete multipart upload", key, RemoteError::classify(e)))?;
        Ok(completed.e_tag().map(str::to_string))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        opened: &Arc<OpenedSource>,
        source: &SourceRef,
        number: i32,
        (offset, len): (u64, u64),
    ) -> Result<CompletedPart, StoreError> {
        let _permit = self.hold_memory(len).await?;
        let reader = opened.clone();
        let source = source.clone();
        let mut buffer = self.part_buffers.take(len as usize);
        let (buffer, sum) = blocking(move || {
            let mut at = offset;
            for chunk in buffer.bytes.chunks_mut(PACED_CHUNK as usize) {
                source.paced(chunk.len() as u64);
                reader
                    .file
                    .read_exact_at(chunk, at)
                    .map_err(|e| StoreError::SourceRead(Arc::new(e)))?;
                at += chunk.len() as u64;
            }
            let sum = Sha256Sum::of(&buffer.bytes);
            Ok((buffer, sum))
        })
        .await?;
        let bytes = bytes::Bytes::from_owner(buffer);
        let uploaded = self
            .client
            .upload_part()
            .bucket(&self.settings.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .checksum_sha256(&sum.base64)
            .body(ByteStream::from(bytes))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.remote("upload part", key, RemoteError::classify(e)))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(uploaded.e_tag().map(str::to_string))
            .checksum_sha256(sum.base64)
            .build())
    }

    /// Best effort: a server that is down keeps the parts until it is back and a lifecycle rule
    /// for incomplete uploads removes them; they are never visible at the key either way.
    async fn abort_upload(&self, key: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!(key, upload_id, error = %RemoteError::classify(e), "cannot abort a failed multipart upload; its parts stay invisible until a lifecycle rule removes them");
        }
    }

    /// A completed multipart object must have the file's size.
    async fn check_size(&self, key: &str, size: u64) -> Result<(), StoreError> {
        let found = self
            .head(key)
            .await
            .map_err(|e| self.remote("head", key, e))?;
        match found {
            Some(object) if object.size == size => Ok(()),
            other => Err(self.remote(
                "verify",
                key,
                RemoteError::other(format!(
                    "after the upload the object holds {} bytes, expected {size}",
                    other.map_or("no".to_string(), |o| o.size.to_string())
                )),
            )),
        }
    }

    /// From what the HEAD found: the condition to write under, or the outcome when nothing
    /// needs writing.
    async fn write_needed(
        &self,
        request: &PutRequest,
        writer: &str,
        sum: &Sha256Sum,
        size: u64,
        existing: Result<Option<super::Existing>, RemoteError>,
    ) -> Result<Result<Condition, PutOutcome>, StoreError> {
        let key = &request.key;
        let existing = existing.map_err(|e| self.remote("head", key, e))?;
        let decision = decide(existing.as_ref(), writer, &request.owned_sha256, sum, size);
        let etag = existing.and_then(|e| e.etag);
        match Condition::of(&decision) {
            Some(condition) => Ok(Ok(condition)),
            None => Ok(Err(self
                .finish_without_writing(key, decision, sum, size, etag)
                .await?)),
        }
    }

    /// The outcome when the HEAD showed nothing needs writing.
    async fn finish_without_writing(
        &self,
        key: &str,
        decision: Decision,
        sum: &Sha256Sum,
        size: u64,
        etag: Option<String>,
    ) -> Result<PutOutcome, StoreError> {
        match decision {
            Decision::Done(outcome) => Ok(outcome),
            Decision::CompareContent => self.settle_unmarked(key, &sum.hex, size, etag).await,
            Decision::Create | Decision::Replace { .. } => {
                unreachable!("writes are handled by the caller")
            }
        }
    }

    /// A conditional write was refused: someone wrote the key since our HEAD. Decide again from
    /// what is there now; never write a second time in this attempt.
    async fn after_refused_put(
        &self,
        key: &str,
        error: RemoteError,
        request: &PutRequest,
        writer: &str,
        sum: &Sha256Sum,
        size: u64,
    ) -> Result<PutOutcome, StoreError> {
        if error.kind != RemoteKind::PreconditionFailed {
            return Err(self.remote("put", key, error));
        }
        let existing = self
            .head(key)
            .await
            .map_err(|e| self.remote("head", key, e))?;
        let decision = decide(existing.as_ref(), writer, &request.owned_sha256, sum, size);
        let etag = existing.and_then(|e| e.etag);
        match decision {
            decision @ (Decision::Done(_) | Decision::CompareContent) => {
                self.finish_without_writing(key, decision, sum, size, etag)
                    .await
            }
            _ => Err(self.remote(
                "put",
                key,
                RemoteError {
                    detail: "the object at the key changed while it was written; will retry".into(),
                    ..error
                },
            )),
        }
    }

    fn object_headers(
        &self,
        key: &str,
        sum: &Sha256Sum,
        attrs: &Attrs,
        writer: &str,
    ) -> ObjectHeaders {
        let settings = &self.settings;
        let metadata = HashMap::from([
            (META_WRITER.to_string(), writer.to_string()),
            (META_SHA256.to_string(), sum.hex.clone()),
            (
                META_MTIME.to_string(),
                format!(
                    "{}.{:09}",
                    attrs.mtime_ns.div_euclid(1_000_000_000),
                    attrs.mtime_ns.rem_euclid(1_000_000_000)
                ),
            ),
            (META_MODE.to_string(), format!("{:o}", attrs.mode & 0o7777)),
        ]);
        let (sse, sse_kms_key_id) = match &settings.sse {
            None => (None, None),
            Some(Sse::Aes256) => (Some(ServerSideEncryption::Aes256), None),
            Some(Sse::Kms { key_id }) => (Some(ServerSideEncryption::AwsKms), key_id.clone()),
        };
        ObjectHeaders {
            content_type: mime_guess::from_path(key)
                .first_raw()
                .unwrap_or("application/octet-stream")
                .to_string(),
            cache_control: settings.cache_control.clone(),
            metadata,
            sse,
            sse_kms_key_id,
            storage_class: settings.storage_class.as_deref().map(StorageClass::from),
        }
    }

    async fn head_unless(
        &self,
        known_absent: bool,
        key: &str,
    ) -> Result<Option<super::Existing>, RemoteError> {
        if known_absent {
            Ok(None)
        } else {
            self.head(key).await
        }
    }

    /// Waits until `bytes` more file data may be held in memory.
    async fn hold_memory(&self, bytes: u64) -> Result<OwnedSemaphorePermit, StoreError> {
        let total = (self.settings.upload_memory >> 10) as u32;
        let wanted = ((bytes >> 10) as u32).saturating_add(1).min(total.max(1));
        self.memory
            .clone()
            .acquire_many_owned(wanted)
            .await
            .map_err(|_| StoreError::Unusable("upload memory pool closed".into()))
    }
}

/// Part buffers come back here once the SDK has sent a part, so a large upload does not map,
/// fault in and zero fresh memory for every part.
#[derive(Debug, Clone, Default)]
pub(super) struct BufferPool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// Buffers kept for reuse at most.
const POOLED_BUFFERS: usize = 32;

impl BufferPool {
    fn take(&self, len: usize) -> PooledBuffer {
        let reused = {
            let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let found = free.iter().position(|b| b.capacity() >= len);
            found.map(|i| free.swap_remove(i))
        };
        let mut bytes = reused.unwrap_or_default();
        bytes.resize(len, 0);
        PooledBuffer {
            bytes,
            pool: self.clone(),
        }
    }
}

/// A part's bytes; back to the pool when the last reference (the SDK's body) is dropped.
pub(super) struct PooledBuffer {
    bytes: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let mut free = self.pool.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOLED_BUFFERS {
            free.push(std::mem::take(&mut self.bytes));
        }
    }
}

/// The whole file into `bytes`; a paced copy reads it in chunks, each paced.
fn read_all(opened: &OpenedSource, source: &SourceRef, bytes: &mut Vec<u8>) -> std::io::Result<()> {
    let mut file = &opened.file;
    if source.pace.is_none() {
        file.read_to_end(bytes)?;
        return Ok(());
    }
    loop {
        source.paced(PACED_CHUNK.min(opened.before.size.saturating_sub(bytes.len() as u64)));
        if Read::by_ref(&mut file)
            .take(PACED_CHUNK)
            .read_to_end(bytes)?
            == 0
        {
            return Ok(());
        }
    }
}

async fn open_source(source: SourceRef) -> Result<OpenedSource, StoreError> {
    blocking(move || {
        source
            .tree
            .open_file(&source.rel)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StoreError::SourceMissing,
                _ => StoreError::SourceRead(Arc::new(e)),
            })
    })
    .await
}

/// SHA-256 of the whole file, read sequentially. (Not through a mapping: a source file that an
/// application truncates meanwhile would kill the process with SIGBUS.)
fn hash_file(opened: &OpenedSource) -> Result<Sha256Sum, StoreError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; HASH_BUFFER];
    let mut offset = 0u64;
    loop {
        let read = opened
            .file
            .read_at(&mut buffer, offset)
            .map_err(|e| StoreError::SourceRead(Arc::new(e)))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        offset += read as u64;
    }
    if offset != opened.before.size {
        return Err(crate::source::SourceChanged("size moved while hashing").into());
    }
    Ok(Sha256Sum::from_hasher(hasher))
}

const HASH_BUFFER: usize = 256 << 10;
