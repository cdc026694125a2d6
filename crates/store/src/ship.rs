//! Merged epochs made to be sent elsewhere: replication that has fallen
//! behind ships one epoch that stands for a run of local ones, instead of
//! each of them (docs/REPLICATION.md).

use std::fs::File;

use crate::codec::Codec;
use crate::error::{Result, StoreError};
use crate::format::Header;
use crate::plan::{claims, plan};
use crate::reclaim::copy_runs;
use crate::store::Store;
use crate::writer::EpochMeta;

/// A merged epoch, out of the store (its file has no name).
#[derive(Debug)]
pub struct Detached {
    /// The open file, to be read from.
    pub file: File,
    pub header: Header,
    /// Its length.
    pub len: u64,
    /// The epochs merged into it besides epoch `header.id`, newest first.
    pub merged: Vec<u64>,
    /// Page data read to write it.
    pub bytes_read: u64,
}

/// Epoch `id` merged with its ancestors down to the newest one whose
/// parent `onto` accepts (or down to the full epoch of its chain, which
/// makes a full epoch): a file that restores to exactly what epoch `id`
/// restores to, with that parent, written with `codec` outside the store.
/// Reclamation may rewrite the chain meanwhile: whatever version is read,
/// every version of an epoch restores to the same state.
pub fn merged_onto(store: &Store, id: u64, onto: impl Fn(u64) -> bool, codec: Codec) -> Result<Detached> {
    let chain = store.chain(id)?;
    let cut = chain
        .iter()
        .position(|e| e.header().is_full() || onto(e.header().parent))
        .ok_or_else(|| StoreError::Corrupt {
            path: store.epoch_path(id),
            why: "its chain does not end at a full epoch".into(),
        })?;
    let sub = &chain[..=cut];
    let base = sub[cut].header();
    let full = base.is_full();
    let parent = (!full).then_some(base.parent);
    let runs = if full { plan(sub)? } else { claims(sub) };
    let head = sub[0].header().clone();
    let meta = EpochMeta::rewrite_of(&head, parent);
    let mut w = store.detached_writer(meta)?;
    w.compress(codec)?;
    w.set_merged(sub.iter().map(|e| e.header().merged).sum::<u64>() + cut as u64);
    w.write_state(&sub[0].state()?)?;
    let read = copy_runs(&mut w, sub, runs, |_| true)?.unwrap_or(0);
    let (file, header, len) = w.finish_detached(head.pause_ns)?;
    Ok(Detached {
        file,
        header,
        len,
        merged: sub[1..].iter().map(|e| e.header().id).collect(),
        bytes_read: read,
    })
}
