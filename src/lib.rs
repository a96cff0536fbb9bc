//! cutoverfs: moves an application's uploaded files to new storage with every copy verified.
//!
//! Parts, one folder each (see docs/architecture.md):
//! - `source`: the legacy local tree, read through a directory descriptor;
//! - `store`: destinations (`file://` today), behind the `Store` trait;
//! - `manifest`: the SQL record of every path's state;
//! - `engine`: scanning, planning and the sweeper that copies;
//! - `cli`: commands, input checks and output.

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
