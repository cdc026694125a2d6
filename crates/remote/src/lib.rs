//! Off-host epochs: a local store replicated to an S3-compatible object
//! store, and restored from it on any host (docs/REPLICATION.md;
//! the remote layout is in docs/FORMAT.md, "Remote stores").
//!
//! - [`Client`]: a blocking client for `s3://BUCKET/PREFIX`, configured
//!   from the environment as S3 tools are.
//! - [`Replicator`]: a thread that ships every committed epoch after its
//!   local commit, in order, and mirrors reclamation.
//! - [`fetch_chain`]: a local copy of one epoch's chain, for the ordinary
//!   restore to read.
//! - [`open_chain`]: one epoch's chain read in place by ranged GETs, for a
//!   lazy restore that keeps nothing locally.

mod client;
mod error;
mod fetch;
pub mod manifest;
mod profile;
mod ranged;
mod replicate;
pub mod seal;
mod url;

pub use client::Client;
pub use error::{RemoteError, Result};
pub use fetch::{Fetched, check_key, fetch_all, fetch_chain, header, headers, hex as uuid_hex, manifest};
pub use manifest::{Entry, Manifest, ManifestError};
pub use ranged::{RangeStats, RemoteChain, open_chain};
pub use replicate::{BacklogLimit, ReplicaStatus, ReplicaWatch, Replicator};
pub use seal::{SealError, SealKey};
pub use url::RemoteUrl;
