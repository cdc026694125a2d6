//! Options of the snapshot store: retention, folding, reclamation rate,
//! compression. Shared by `run`, `restore` (with `--snapshot-dir`) and
//! `compact`.

use clap::{Args, ValueEnum};
use store::{Codec, DEFAULT_MAX_CHAIN, DEFAULT_POLICY, Policy, ReclaimOptions};
use thiserror::Error;

use crate::args;

/// Compression of page data on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    /// Store pages as they are.
    None,
    /// LZ4: fast, saves less.
    Lz4,
    /// zstd level 1: saves more, costs more CPU.
    Zstd,
}

impl CompressArg {
    /// The store's codec.
    pub fn codec(self) -> Codec {
        match self {
            CompressArg::None => Codec::None,
            CompressArg::Lz4 => Codec::Lz4,
            CompressArg::Zstd => Codec::Zstd,
        }
    }
}

/// Why a store option is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreArgsError {
    /// `--reclaim-rate` that is not a rate.
    #[error("'{text}' is not a rate in bytes per second (examples: 50M, 200M/s, 0 for no limit)")]
    NotARate {
        /// As given.
        text: String,
        /// Why its size is refused.
        #[source]
        source: args::ArgError,
    },
}

fn rate(s: &str) -> Result<u64, StoreArgsError> {
    let t = s.strip_suffix("/s").unwrap_or(s);
    args::size(t).map_err(|source| StoreArgsError::NotARate {
        text: s.to_string(),
        source,
    })
}

/// Retention and reclamation.
#[derive(Debug, Clone, Args)]
pub struct ReclaimArgs {
    /// Retention policy: tiers SPAN:EVERY from young to old, EVERY `all` or
    /// a duration that is a multiple of the previous tier's; older epochs
    /// are merged into younger ones. `all` keeps every epoch.
    #[arg(long, default_value = DEFAULT_POLICY, value_parser = Policy::parse)]
    pub retain: Policy,
    /// Fold chains so that restoring any retained epoch reads at most this
    /// many files (0: never fold).
    #[arg(long, default_value_t = DEFAULT_MAX_CHAIN)]
    pub max_chain: usize,
    /// Limit the reclaimer's reads plus writes to this many bytes per second (0: no limit).
    #[arg(long, default_value = "0", value_parser = rate)]
    pub reclaim_rate: u64,
    /// Bound the store's size: while the epochs the policy keeps take more,
    /// the oldest of them go too (never the newest). Over this bound, or
    /// with a chain longer than --max-chain, the reclaimer runs at the
    /// vCPUs' priority until it is back under (0: no bound but the policy).
    #[arg(long, default_value = "0", value_parser = crate::args::size, value_name = "SIZE")]
    pub max_store: u64,
}

impl ReclaimArgs {
    /// The library's options.
    pub fn options(&self) -> ReclaimOptions {
        ReclaimOptions {
            policy: self.retain.clone(),
            max_chain: self.max_chain,
            rate: (self.reclaim_rate > 0).then_some(self.reclaim_rate),
            codec: None,
            batch_merges: false,
            max_store: (self.max_store > 0).then_some(self.max_store),
            headroom: store::Headroom::default(),
        }
    }
}
