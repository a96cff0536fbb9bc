//! cutoverfs: moves an application's uploaded files to new storage with every copy verified.
//!
//! Parts, one folder each (see docs/architecture.md):
//! - `source`: the legacy local tree, read through a directory descriptor;
//! - `beneath`: opening paths below a root without following symlinks;
//! - `store`: destinations (`file://` and S3), behind the `Store` trait;
//! - `manifest`: the SQL record of every path's state (SQLite or PostgreSQL);
//! - `engine`: scanning, planning, the sweeper that copies, verify, purge and rollback;
//! - `fuse`: the mount, a thin FUSE adapter over one core (it asks the store and the manifest,
//!   never S3 or SQL directly);
//! - `metrics`: Prometheus counters and histograms;
//! - `cli`: commands, input checks and output;
//! - `testhook`: crash and hold points, only in builds with the `test-hooks` feature.

pub mod beneath;
pub mod cli;
pub mod engine;
pub mod fuse;
pub mod manifest;
pub mod metrics;
pub mod source;
pub mod store;
pub mod testhook;
pub mod util;
