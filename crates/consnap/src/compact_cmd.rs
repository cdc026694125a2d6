//! `consnap compact`: reclaim space in a store no process is writing.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use clap::Args;
use store::{Access, Ledger, Policy, PolicyError, ReclaimOptions, Store};
use thiserror::Error;

use crate::ls_cmd::human;
use crate::progress::Bar;
use crate::store_args::CompressArg;

/// Why a store cannot be compacted.
#[derive(Debug, Error)]
pub enum CompactError {
    /// The store cannot be opened, read or reclaimed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// No `--retain`, and the policy in RECLAIM does not parse.
    #[error("the policy recorded in {dir}/RECLAIM is invalid ({source}): give --retain")]
    RecordedPolicy {
        /// The store.
        dir: PathBuf,
        /// Why the policy is refused.
        #[source]
        source: PolicyError,
    },
}

/// Options of `consnap compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Retention policy (default: the one the store was last reclaimed
    /// with, else the default policy); see `consnap run --help`.
    #[arg(long, value_parser = Policy::parse)]
    pub retain: Option<Policy>,
    /// Most files a restore of any retained epoch reads (default: the
    /// store's last setting, else the default).
    #[arg(long)]
    pub max_chain: Option<usize>,
    /// Compression of the epochs it rewrites (default: keep each one's).
    #[arg(long, value_enum)]
    pub compress: Option<CompressArg>,
    /// Bound the store's size: the oldest epochs the policy keeps go too
    /// while they take more (never the newest).
    #[arg(long, value_parser = crate::args::size, value_name = "SIZE")]
    pub max_store: Option<u64>,
}

/// Compact a store; prints what it did.
pub fn compact(a: CompactArgs) -> Result<i32, CompactError> {
    let store = Store::open(&a.dir, Access::Write)?;
    let last = Ledger::load(&a.dir).ok().flatten();
    let policy = match (a.retain, &last) {
        (Some(p), _) => p,
        (None, Some(l)) if !l.policy.is_empty() => {
            Policy::parse(&l.policy).map_err(|source| CompactError::RecordedPolicy {
                dir: a.dir.clone(),
                source,
            })?
        }
        _ => Policy::default(),
    };
    let max_chain = a
        .max_chain
        .or(last.as_ref().map(|l| l.max_chain as usize))
        .unwrap_or(store::DEFAULT_MAX_CHAIN);
    let opts = ReclaimOptions {
        policy,
        max_chain,
        rate: None,
        codec: a.compress.map(CompressArg::codec),
        batch_merges: false,
        max_store: a.max_store.filter(|m| *m > 0),
        headroom: store::Headroom::default(),
    };
    let before: u64 = store
        .list()?
        .iter()
        .filter_map(|(_, i)| i.as_ref().ok().map(|i| i.file_bytes))
        .sum();
    let bar = Bar::new("compacting", true);
    let pass = store::reclaim(&store, &opts, &[], &AtomicBool::new(false), &mut |d, t| {
        bar.update(d, t)
    })?;
    bar.finish();
    let ids = store.ids()?;
    let after: u64 = store
        .list()?
        .iter()
        .filter_map(|(_, i)| i.as_ref().ok().map(|i| i.file_bytes))
        .sum();
    let line = format!(
        "{}: --retain {} --max-chain {}: {} epochs merged, {} dropped, {} rewritten ({} folds); {} in {:.2}s; {} epochs, {} -> {}",
        a.dir.display(),
        opts.policy.text(),
        opts.max_chain,
        pass.merged,
        pass.dropped,
        pass.rewrites,
        pass.folds,
        crate::ls_cmd::net_reclaimed(pass.bytes_freed, pass.bytes_written),
        pass.time_ns as f64 / 1e9,
        ids.len(),
        human(before),
        human(after),
    );
    let _ = writeln!(std::io::stdout(), "{line}");
    Ok(0)
}
