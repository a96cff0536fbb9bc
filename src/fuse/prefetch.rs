//! Reads of files served from a remote dest: ranged GETs through the `Store`, with a
//! sequential prefetcher.
//!
//! A reader that keeps asking for the next bytes gets a window of parts fetched ahead of it,
//! in parallel, doubling from one part up to `MAX_WINDOW`; a reader that jumps around gets
//! exactly the bytes it asked for and nothing more. Parts behind the reader are dropped, and
//! parts fetched ahead hold permits of one budget shared by every open file, so memory stays
//! bounded however many files are open. Nothing here blocks a thread: callers await.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::{Store, StoreError};

pub const PART: u64 = 8 << 20;
const MAX_WINDOW_PARTS: u64 = 8;

type Fetch = Shared<BoxFuture<'static, Result<Bytes, Arc<StoreError>>>>;

struct Part {
    data: Fetch,
    _budget: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct Window {
    parts: BTreeMap<u64, Part>,
    /// Where the next sequential read would start.
    next_offset: u64,
    /// Parts to keep ahead of the reader (0: random access, no prefetch).
    ahead: u64,
}

pub struct RemoteFile {
    store: Arc<dyn Store>,
    key: String,
    size: u64,
    budget: Arc<Semaphore>,
    window: Mutex<Window>,
}

/// Bytes of prefetched parts all open files may hold at once, as semaphore permits of 1 MiB.
pub fn prefetch_budget(bytes: u64) -> Arc<Semaphore> {
    Arc::new(Semaphore::new((bytes >> 20).max(1) as usize))
}

impl RemoteFile {
    pub fn new(store: Arc<dyn Store>, key: String, size: u64, budget: Arc<Semaphore>) -> Self {
        RemoteFile {
            store,
            key,
            size,
            budget,
            window: Mutex::new(Window::default()),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// `len` bytes from `offset` (fewer at the end of the file).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, Arc<StoreError>> {
        if offset >= self.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + len).min(self.size);
        let needed = match self.plan(offset, end) {
            Some(parts) => parts,
            None => {
                // Random access: just these bytes.
                return self
                    .store
                    .read_range(&self.key, offset, end - offset)
                    .await
                    .map_err(Arc::new);
            }
        };
        if needed.len() == 1 {
            let (start, fetch) = &needed[0];
            let data = fetch.clone().await?;
            return Ok(slice(&data, offset - start, end - start));
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (start, fetch) in needed {
            let data = fetch.await?;
            let from = offset.saturating_sub(start);
            let to = (end - start).min(data.len() as u64);
            out.extend_from_slice(&slice(&data, from, to));
        }
        Ok(out.freeze())
    }

    /// Decides between sequential and random access, starts the fetches the window needs and
    /// returns the parts covering `[offset, end)`; None for a random read.
    fn plan(&self, offset: u64, end: u64) -> Option<Vec<(u64, Fetch)>> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        // The kernel may send a few reads out of order: "near the last one" counts as sequential.
        let sequential =
            offset == 0 || (offset + PART >= w.next_offset && offset <= w.next_offset + PART);
        w.next_offset = end;
        if !sequential {
            w.ahead = 0;
            w.parts.clear();
            return None;
        }
        w.ahead = (w.ahead * 2).clamp(1, MAX_WINDOW_PARTS);
        let first = offset / PART;
        let last = (end - 1) / PART;
        let ahead_to = (last + w.ahead).min((self.size - 1) / PART);
        // Drop what lies more than a part behind.
        let keep_from = first.saturating_sub(1) * PART;
        w.parts = w.parts.split_off(&keep_from);
        for index in first..=ahead_to {
            let start = index * PART;
            if w.parts.contains_key(&start) {
                continue;
            }
            let budget = if index <= last {
                None
            } else {
                match self
                    .budget
                    .clone()
                    .try_acquire_many_owned((PART >> 20) as u32)
                {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                }
            };
            let data = self.fetch(start, (self.size - start).min(PART));
            w.parts.insert(
                start,
                Part {
                    data,
                    _budget: budget,
                },
            );
        }
        Some(
            (first..=last)
                .filter_map(|i| w.parts.get(&(i * PART)).map(|p| (i * PART, p.data.clone())))
                .collect(),
        )
    }

    fn fetch(&self, start: u64, len: u64) -> Fetch {
        let store = self.store.clone();
        let key = self.key.clone();
        let task = tokio::spawn(async move { store.read_range(&key, start, len).await });
        async move {
            match task.await {
                Ok(result) => result.map_err(Arc::new),
                Err(e) => Err(Arc::new(StoreError::Unusable(format!(
                    "read task failed: {e}"
                )))),
            }
        }
        .boxed()
        .shared()
    }
}

fn slice(data: &Bytes, from: u64, to: u64) -> Bytes {
    let to = (to as usize).min(data.len());
    let from = (from as usize).min(to);
    data.slice(from..to)
}
