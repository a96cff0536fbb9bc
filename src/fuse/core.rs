//! The mount's file system logic, one core for both kinds of mount: the daemon's over the local
//! tree and a replica's over the manifest alone, which differ only in their namespace
//! (`namespace/`) and in that a replica has no write path.
//!
//! Owns: what every request means — numbers to paths, lookups, attributes, listings — and the
//! state shared by the handlers (`Core`). Opens and reads are in `open.rs`, changes in
//! `writes.rs`. Handlers return `Result<T, Errno>` and know nothing of FUSE replies; the adapter
//! (`adapter.rs`) turns requests into calls and results into replies, so the core can be driven
//! in-process by tests (`model.rs`). It reads the dest only through the `Store` and the
//! manifest only through `Rows` and the write path's records.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuser::Errno;
use tokio::sync::Semaphore;

use super::handles::Handles;
use super::health::DestHealth;
use super::inode::{Inodes, ROOT};
use super::namespace::replica::CopyWaits;
use super::namespace::Namespace;
use super::namespace::{attr_from_metadata, child_path, found, is_bad_name, Found, Listed};
use super::queue::CopyOnRead;
use super::readahead::ReadAhead;
use super::records::{Holds, WriteRecords};
use super::rows::Rows;
use super::ReadStats;
use crate::manifest::Entry;
use crate::store::Store;

/// A directory listing as readdir serves it: sorted by offset, each entry's offset a hash of
/// its name, so a reader resumes after the last name it got even if the listing was built
/// again in between (names added or removed meanwhile may or may not show, as POSIX allows).
pub type Listing = Vec<(u64, Listed)>;

/// A listing and the change epoch it was built at.
type Built = (u64, Arc<Listing>);

type ListingFlights = dashmap::DashMap<
    u64,
    Arc<std::sync::OnceLock<Result<Built, Errno>>>,
    foldhash::fast::RandomState,
>;

/// How long the kernel may cache what it is told.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    /// Names (a lookup's answer).
    pub entry: Duration,
    /// Attributes.
    pub attr: Duration,
}

/// What the write path needs beyond the namespace: the daemon's mount only.
pub struct WritePath {
    pub records: Arc<WriteRecords>,
    pub holds: Holds,
    /// Other names of local files with several.
    pub links: Arc<super::namespace::source::HardLinks>,
    /// Renames and removals (write) against the recording of a closed file under its path
    /// (read): a close that read the old name of a file being renamed must queue its record
    /// before the rename moves the rows, or see the new name. Taken only there, never on a
    /// lookup, open, read or write.
    pub rename_gate: std::sync::RwLock<()>,
}

/// Tells the kernel to drop what it cached, for changes it did not make itself. Sent from
/// another thread than the request's (the kernel may hold locks the request waits on).
pub trait Invalidate: Send + Sync {
    fn inode(&self, ino: u64);
}

/// Everything the handlers share.
pub struct Core {
    pub(super) ns: Box<dyn Namespace>,
    /// The manifest's rows, as the namespace reads them.
    pub(super) rows: Arc<Rows>,
    pub(super) inodes: Arc<Inodes>,
    pub(super) handles: Handles,
    pub(super) store: Arc<dyn Store>,
    /// The dest is reached over the network (asked once: the question opens a file).
    store_is_remote: bool,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) ttls: Ttls,
    pub(super) dest_health: Arc<DestHealth>,
    pub(super) dest_read_deadline: Duration,
    pub(super) stats: Arc<ReadStats>,
    pub(super) prefetch_budget: Arc<Semaphore>,
    pub(super) passthrough: AtomicBool,
    /// The daemon's mount: copies asked for by first reads.
    pub(super) copy_on_read: Option<CopyOnRead>,
    /// The daemon's mount: the write path. None on a replica (every change is EROFS).
    pub(super) writes: Option<WritePath>,
    /// A replica: opens of files not copied yet wait here.
    pub(super) copy_waits: Option<CopyWaits>,
    /// The content (SHA-256) each inode was last opened from the dest with: the kernel may keep
    /// its cached pages only for the same content. Bounded: forgetting one costs a re-read.
    pub(super) opened_content: moka::sync::Cache<u64, Arc<str>, foldhash::fast::RandomState>,
    /// Listings built, with the change epoch they were built at (see `changed`).
    listings: moka::sync::Cache<u64, Built, foldhash::fast::RandomState>,
    /// Bumped by every change made through this mount. A listing carries the attributes of its
    /// entries, and the kernel takes them over its own: one built before a change (ahead, or
    /// for an earlier call) must not be served after it, or a chmod or a write would seem undone.
    epoch: std::sync::atomic::AtomicU64,
    /// Directories listed ahead of the kernel's readdir.
    pub(super) readahead: Arc<ReadAhead>,
    /// Listings being built, so that a request and the read-ahead never build one twice.
    listing_flights: ListingFlights,
    invalidate: OnceLock<Box<dyn Invalidate>>,
}

/// The parts a `Core` is made of.
pub struct CoreParts {
    pub ns: Box<dyn Namespace>,
    pub rows: Arc<Rows>,
    pub inodes: Arc<Inodes>,
    pub store: Arc<dyn Store>,
    pub rt: tokio::runtime::Handle,
    pub ttls: Ttls,
    pub dest_health: Arc<DestHealth>,
    pub dest_read_deadline: Duration,
    pub stats: Arc<ReadStats>,
    pub prefetch_budget: Arc<Semaphore>,
    pub copy_on_read: Option<CopyOnRead>,
    pub writes: Option<WritePath>,
    pub copy_waits: Option<CopyWaits>,
}

/// Listings kept for readdir calls that continue one (the kernel caches whole directories
/// itself; this only spares building one listing once per call).
const LISTINGS_KEPT: u64 = 8 << 20;
const LISTING_ENTRY_BYTES: u32 = 256;

impl Core {
    pub fn new(parts: CoreParts) -> Core {
        Core {
            ns: parts.ns,
            rows: parts.rows,
            inodes: parts.inodes,
            handles: Handles::default(),
            store_is_remote: parts.store.open_local_file("").is_none(),
            store: parts.store,
            rt: parts.rt,
            ttls: parts.ttls,
            dest_health: parts.dest_health,
            dest_read_deadline: parts.dest_read_deadline,
            stats: parts.stats,
            prefetch_budget: parts.prefetch_budget,
            passthrough: AtomicBool::new(false),
            copy_on_read: parts.copy_on_read,
            writes: parts.writes,
            copy_waits: parts.copy_waits,
            opened_content: moka::sync::Cache::builder()
                .max_capacity(16_384)
                .build_with_hasher(Default::default()),
            listings: moka::sync::Cache::builder()
                .max_capacity(LISTINGS_KEPT)
                // Plain LRU: the default admission policy turns away entries seen once, which
                // every listing is, and a listing built ahead or continued must be found.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .weigher(|_: &u64, built: &Built| {
                    (built.1.len() as u32 + 1).saturating_mul(LISTING_ENTRY_BYTES)
                })
                .time_to_live(Duration::from_secs(1))
                .build_with_hasher(Default::default()),
            invalidate: OnceLock::new(),
            readahead: Arc::default(),
            listing_flights: Default::default(),
            epoch: Default::default(),
        }
    }

    /// The core, shared, with its helpers started (the thread that lists directories ahead).
    pub fn start(parts: CoreParts) -> Arc<Core> {
        let core = Arc::new(Core::new(parts));
        ReadAhead::start(&core);
        core
    }

    /// The session ended: what the write path and the copy-on-read queue still hold for the
    /// manifest goes there now.
    pub fn finish(&self) {
        if let Some(writes) = &self.writes {
            writes.records.flush();
        }
        if let Some(queue) = &self.copy_on_read {
            queue.flush(&self.rt);
        }
    }

    /// How the kernel is told to drop what it cached (set once the session exists).
    pub fn set_invalidate(&self, invalidate: Box<dyn Invalidate>) {
        let _ = self.invalidate.set(invalidate);
    }

    /// Asks the kernel to drop the attributes and pages it cached of `ino`; it has done so
    /// before this returns (a second at most), so the reply that follows cannot be answered
    /// from what it drops.
    pub(super) fn invalidate_inode_before_reply(self: &Arc<Self>, ino: u64) {
        if self.invalidate.get().is_none() {
            return;
        }
        let (done, told) = std::sync::mpsc::channel();
        let core = self.clone();
        // Still off this thread: the kernel may need a FUSE thread (writeback) to finish it.
        self.rt.spawn_blocking(move || {
            if let Some(invalidate) = core.invalidate.get() {
                invalidate.inode(ino);
            }
            let _ = done.send(());
        });
        let _ = told.recv_timeout(std::time::Duration::from_secs(1));
    }

    /// Whether handlers that read the manifest must leave the FUSE threads: it is PostgreSQL,
    /// reached over the network.
    pub fn manifest_is_remote(&self) -> bool {
        self.rows.manifest().engine() == crate::manifest::Engine::Postgres
    }

    /// Whether the dest is reached over the network (copy-up reads it).
    pub fn store_is_remote(&self) -> bool {
        self.store_is_remote
    }

    /// The path of `ino` below the root: from its record, else from the manifest's row.
    pub fn path(&self, ino: u64) -> Result<Arc<Path>, Errno> {
        self.resolve(ino).map(|(path, _)| path)
    }

    /// `path`, with the row it was found by when it took one (an open routes by it).
    pub fn resolve(&self, ino: u64) -> Result<(Arc<Path>, Option<Arc<Entry>>), Errno> {
        if ino == ROOT {
            return Ok((Arc::from(Path::new("")), None));
        }
        match self.inodes.path_of(ino) {
            Some(Some(path)) => return Ok((path, None)),
            // Unlinked while open: reachable through its handles only.
            Some(None) => return Err(Errno::ENOENT),
            None => {}
        }
        if let Some(dir) = self.rows.dir_path(ino) {
            return Ok((Arc::from(Path::new(&*dir)), None));
        }
        match self.rows.by_ino(ino) {
            Ok(Some(row)) => Ok((Arc::from(Path::new(&row.path)), Some(row))),
            Ok(None) => Err(Errno::ENOENT),
            // The manifest does not answer: the path it gave last, to serve the local copy.
            Err(e) => match self.rows.known_path(ino) {
                Some(path) if self.rows.manifest_down() => Ok((Arc::from(Path::new(&*path)), None)),
                _ => Err(Errno::from(e)),
            },
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Found, Errno> {
        if is_bad_name(name) {
            return Err(Errno::ENOENT);
        }
        let dir = self.path(parent)?;
        let found = self.ns.lookup(&dir, name)?;
        self.inodes.looked_up(found.ino());
        Ok(found)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    /// Attributes of `ino`; through the open handle `fh` when the kernel gives one (fstat),
    /// and through the local copy its record keeps when it was unlinked while open.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Found, Errno> {
        if let Some(file) = fh
            .and_then(|fh| self.handles.get(fh))
            .filter(|h| h.inode.ino == ino)
            .and_then(|h| h.file().map(|f| f.metadata()))
        {
            return Ok(found(attr_from_metadata(&file.map_err(Errno::from)?, ino)));
        }
        if let Some(inode) = self.inodes.get(ino) {
            let local = {
                let state = inode.lock();
                state.unlinked().then(|| state.local.clone())
            };
            if let Some(local) = local {
                let file = local.ok_or(Errno::ENOENT)?;
                return Ok(found(attr_from_metadata(
                    &file.metadata().map_err(Errno::from)?,
                    ino,
                )));
            }
        }
        let path = self.path(ino)?;
        self.ns.attr(&path, ino)
    }

    pub fn readlink(&self, ino: u64) -> Result<OsString, Errno> {
        let path = self.path(ino)?;
        self.ns.read_link(&path)
    }

    /// With default_permissions the kernel checks modes itself; this only says it exists.
    pub fn access(&self, ino: u64) -> Result<(), Errno> {
        self.getattr(ino, None).map(|_| ())
    }

    pub fn statfs(&self) -> Result<libc::statvfs, Errno> {
        self.ns.statfs()
    }

    /// The listing of the directory `ino`, for a readdir at `offset`: a stream going on gets
    /// the listing its start got, a new one a listing built now (or just ahead of it:
    /// `readahead.rs`) — one directory read and one query — and never one built before the
    /// latest change made through this mount (`changed`).
    pub fn listing(&self, ino: u64, offset: u64) -> Result<Arc<Listing>, Errno> {
        let now = self.epoch();
        let cached = (offset > 0 || self.readahead.take(ino))
            .then(|| self.listings.get(&ino))
            .flatten()
            .filter(|(built_at, _)| *built_at == now);
        let listing = match cached {
            Some((_, listing)) => listing,
            None => self.build_listing(ino, now)?,
        };
        if offset == 0 {
            self.readahead.listed(
                listing
                    .iter()
                    .filter(|(_, item)| item.found.attr.kind == fuser::FileType::Directory)
                    .map(|(_, item)| item.found.ino()),
            );
        }
        Ok(listing)
    }

    /// Lists the directory `ino` and keeps the listing for the calls that continue it; a
    /// request that comes while the same listing is being built (ahead) waits for it, unless
    /// that build began before the change epoch `since`.
    fn build_listing(&self, ino: u64, since: u64) -> Result<Arc<Listing>, Errno> {
        loop {
            let flight = self.listing_flights.entry(ino).or_default().clone();
            let built = flight.get_or_init(|| self.list_now(ino)).clone();
            self.listing_flights
                .remove_if(&ino, |_, f| Arc::ptr_eq(f, &flight));
            match built {
                Ok((built_at, listing)) if built_at >= since => return Ok(listing),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn list_now(&self, ino: u64) -> Result<Built, Errno> {
        let built_at = self.epoch();
        let dir = self.path(ino)?;
        let listed = self.ns.list(&dir)?;
        // Sorted by offset through a small key each: moving the entries themselves (a name and
        // attributes, ~150 bytes) in a sort cost more than building them.
        let mut order: Vec<(u64, u32)> = listed
            .iter()
            .enumerate()
            .map(|(i, item)| (name_offset(&item.name), i as u32))
            .collect();
        order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| listed[a.1 as usize].name.cmp(&listed[b.1 as usize].name))
        });
        let mut slots: Vec<Option<Listed>> = listed.into_iter().map(Some).collect();
        let listing: Listing = order
            .into_iter()
            .filter_map(|(offset, i)| slots[i as usize].take().map(|item| (offset, item)))
            .collect();
        let built = (built_at, Arc::new(listing));
        self.listings.insert(ino, built.clone());
        Ok(built)
    }

    /// Lists `ino` ahead of the kernel (`readahead.rs`), unless a listing of it is at hand.
    pub(super) fn build_ahead(&self, ino: u64) -> bool {
        let now = self.epoch();
        let at_hand = self
            .listings
            .get(&ino)
            .is_some_and(|(built_at, _)| built_at == now);
        !at_hand && self.build_listing(ino, now).is_ok()
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Something changed through this mount (a name, attributes, content): no listing built
    /// before is served from now on.
    pub(super) fn changed(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// `changed`, for a change in the directory `ino`.
    pub(super) fn dir_changed(&self, ino: u64) {
        self.readahead.forget(ino);
        self.changed();
    }

    /// `item`'s attributes as a reply to `dir`'s listing serves them: a file open for writing
    /// changes under the listing (writes through passthrough never reach the daemon), so its
    /// attributes are read again now.
    pub fn served(&self, dir: u64, item: &Listed) -> Found {
        let ino = item.found.ino();
        let writing = self
            .inodes
            .get(ino)
            .is_some_and(|inode| inode.lock().writers > 0);
        if !writing {
            return item.found.clone();
        }
        self.path(dir)
            .and_then(|dir| self.ns.attr(&child_path(&dir, &item.name), ino))
            .unwrap_or_else(|_| item.found.clone())
    }

    /// The entries of a listing after `offset`, for readdir.
    pub fn entries_after(listing: &Listing, offset: u64) -> &[(u64, Listed)] {
        let start = listing.partition_point(|(o, _)| *o <= offset);
        &listing[start..]
    }

    /// The kernel was given `found` in a readdirplus reply.
    pub fn listed(&self, found: &Found) {
        self.inodes.looked_up(found.ino());
    }

    /// A child's path, refusing names that must never reach a path join.
    pub(super) fn child(&self, parent: u64, name: &OsStr) -> Result<std::path::PathBuf, Errno> {
        if is_bad_name(name) {
            return Err(Errno::EINVAL);
        }
        Ok(child_path(&self.path(parent)?, name))
    }
}

/// A name's readdir offset: a 63-bit hash, never 0 (0 asks for the start).
fn name_offset(name: &OsStr) -> u64 {
    use std::hash::BuildHasher;
    // A fixed seed: a listing built again must give every name the same offset.
    let hash = foldhash::fast::FixedState::with_seed(0x6375_746f_7665_7266).hash_one(name);
    (hash >> 1).max(1)
}
