//! Off-host epochs: a local store replicated to an S3-compatible object
//! store, and restored from it on any host (docs/DESIGN.md, "Replication";
//! the remote layout is in docs/FORMAT.md, "Remote stores").
//!
//! - [`Client`]: a blocking client for `s3://BUCKET/PREFIX`, configured
//!   from the environment as S3 tools are.
//! - [`Replicator`]: a thread that ships every committed epoch after its
//!   local commit, in order, and mirrors reclamation.
//! - [`fetch_chain`]: a local copy of one epoch's chain, for the ordinary
//!   restore to read.

mod client;
mod error;
mod fetch;
pub mod manifest;
mod profile;
mod replicate;
pub mod seal;
mod url;

pub use client::Client;
pub use error::{RemoteError, Result};
pub use fetch::{Fetched, fetch_all, fetch_chain, headers, manifest};
pub use manifest::{Entry, Manifest};
pub use replicate::{BacklogLimit, ReplicaStatus, ReplicaWatch, Replicator};
pub use seal::SealKey;
pub use url::RemoteUrl;
