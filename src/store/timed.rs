//! A store that times every call to the store it wraps, for `--metrics`
//! (`cutoverfs_store_request_duration_seconds`). It changes nothing else: every call, the
//! default ones included, goes to the wrapped store as it is.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ObjectFacts, Preflight, PublishGuard, PutRequest, Removal, Store, StoreError, Stored};
use crate::metrics::RequestTimes;

pub struct TimedStore {
    inner: Arc<dyn Store>,
    times: RequestTimes,
}

impl TimedStore {
    pub fn wrap(inner: Arc<dyn Store>, times: RequestTimes) -> Arc<dyn Store> {
        Arc::new(TimedStore { inner, times })
    }
}

#[async_trait]
impl Store for TimedStore {
    fn canonical_url(&self) -> String {
        self.inner.canonical_url()
    }

    fn key_for(&self, rel: &str) -> Result<String, String> {
        self.inner.key_for(rel)
    }

    async fn preflight(&self, mode: Preflight) -> Result<(), StoreError> {
        let _timer = self.times.start("preflight");
        self.inner.preflight(mode).await
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        self.inner.prepare().await
    }

    async fn put_many(
        &self,
        requests: Vec<PutRequest>,
        guard: &dyn PublishGuard,
    ) -> Vec<Result<Stored, StoreError>> {
        let _timer = self.times.start("put_many");
        self.inner.put_many(requests, guard).await
    }

    fn put_requests(&self, size: u64) -> u64 {
        self.inner.put_requests(size)
    }

    async fn existing_size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let _timer = self.times.start("exists");
        self.inner.existing_size(key).await
    }

    async fn ensure_dir(&self, rel: &str, mode: u32) -> Result<(), StoreError> {
        let _timer = self.times.start("mkdir");
        self.inner.ensure_dir(rel, mode).await
    }

    fn open_local_file(&self, key: &str) -> Option<std::io::Result<std::fs::File>> {
        self.inner.open_local_file(key)
    }

    async fn delete_owned(
        &self,
        key: &str,
        owned_sha256: &[String],
        writer: &str,
    ) -> Result<Removal, StoreError> {
        let _timer = self.times.start("delete");
        self.inner.delete_owned(key, owned_sha256, writer).await
    }

    async fn inspect(&self, key: &str, deep: bool) -> Result<Option<ObjectFacts>, StoreError> {
        let _timer = self.times.start("inspect");
        self.inner.inspect(key, deep).await
    }

    async fn read_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, StoreError> {
        let _timer = self.times.start("read_range");
        self.inner.read_range(key, offset, len).await
    }
}
