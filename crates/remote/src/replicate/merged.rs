//! Shipping when behind: the epochs replication merges into one upload
//! when it has fallen behind, and the MANIFEST writes that publish what a
//! pass uploaded.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;

use store::format::HEADER_SIZE;

use super::{BEHIND_EPOCHS, COARSE, Kept, LAG_BOUND, Mailbox, Worker};
use crate::error::{Result, io};
use crate::manifest::{Entry, Manifest, object_name};

impl Worker {
    /// Whether the `fresh` epochs (newer than any the remote store keeps,
    /// in id order) are a backlog to ship merged; see [`COARSE`].
    pub(super) fn behind(&self, fresh: &[&Entry]) -> bool {
        let (Some(a), Some(b)) = (fresh.first(), fresh.last()) else {
            return false;
        };
        let span = b.created_ns.saturating_sub(a.created_ns);
        if fresh.len() < BEHIND_EPOCHS || span < COARSE.as_nanos() as u64 {
            return false;
        }
        if store::now_ns().saturating_sub(a.created_ns) >= LAG_BOUND.as_nanos() as u64 {
            return true;
        }
        let (bytes, secs) = self.recent.iter().fold((0u64, 0f64), |(b, s), &(x, t)| (b + x, s + t));
        if bytes == 0 || secs <= 0.0 {
            return true; // no upload to judge by yet
        }
        let backlog: u64 = fresh.iter().map(|e| e.bytes).sum();
        let upload_s = backlog as f64 * secs / bytes as f64;
        upload_s > span as f64 / 2e9
    }

    /// The covered epochs of `next` (the local epochs whose chain is
    /// whole) that the retention policy keeps past its finest tier.
    pub(super) fn settled_covered(&self, next: &[Entry]) -> Vec<Entry> {
        if self.covered.is_empty() {
            return Vec::new();
        }
        let times: Vec<(u64, u64)> = next.iter().map(|e| (e.id, e.created_ns)).collect();
        let newest = times.iter().map(|&(_, t)| t).max().unwrap_or(0);
        let keep = self.policy.retained(&times);
        let settle = self.policy.settle_ns();
        next.iter()
            .filter(|e| {
                self.covered.contains_key(&e.id)
                    && keep.contains(&e.id)
                    && newest.saturating_sub(e.created_ns) >= settle
            })
            .cloned()
            .collect()
    }

    /// Ship epoch `id` merged with its local ancestors down to the newest
    /// one whose parent the remote store keeps (in `kept`) with a chain of
    /// at most `room` objects, compressed: one
    /// object that restores to what epoch `id` restores to. The epochs
    /// merged into it become covered (local only). Returns its entry.
    pub(super) fn ship_merged(&mut self, id: u64, kept: &Kept, room: usize, shared: &Mailbox) -> Result<Entry> {
        let onto = |p: u64| kept.get(&p).is_some_and(|&(_, d)| d <= room);
        let d = store::merged_onto(&self.store, id, onto, store::Codec::Zstd).map_err(Box::new)?;
        let mut head = vec![0u8; HEADER_SIZE];
        let what = self
            .dir
            .join("epochs")
            .join(format!("{} (merged to ship)", store::epoch_file_name(id)));
        d.file
            .read_exact_at(&mut head, 0)
            .map_err(io("read the header of", &what))?;
        let object = object_name(id, xxhash_rust::xxh3::xxh3_64(&head));
        self.unnamed.insert(object.clone());
        self.client.put_file(&object, &d.file, d.len, &what)?;
        tracing::debug!(
            epoch = id,
            merged = d.merged.len(),
            bytes = d.len,
            "replication behind: shipped a merged epoch"
        );
        // Epochs named remotely stay named: only the others are stood for.
        for m in d.merged.iter().filter(|m| !kept.contains_key(m)) {
            if let Some(l) = self.listed.get(m) {
                self.covered.insert(*m, l.object.clone());
            }
        }
        shared
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .merged_uploads += 1;
        Ok(Entry {
            id,
            parent: (!d.header.is_full()).then_some(d.header.parent),
            created_ns: d.header.created_ns,
            bytes: d.len,
            object,
        })
    }

    /// Write the next MANIFEST, naming `epochs`; the objects the current
    /// one names and it does not become strays, deleted by the pass once
    /// no manifest names them.
    pub(super) fn publish(&mut self, epochs: Vec<Entry>, shared: &Mailbox) -> Result<()> {
        let m = Manifest {
            store_uuid: self.uuid,
            generation: self.manifest.generation + 1,
            key_id: self.manifest.key_id,
            epochs,
        };
        self.client.put("MANIFEST", m.encode().into_bytes())?;
        let named: BTreeSet<&str> = m.epochs.iter().map(|e| e.object.as_str()).collect();
        let gone: Vec<String> = self
            .manifest
            .epochs
            .iter()
            .map(|e| e.object.clone())
            .filter(|o| !named.contains(o.as_str()))
            .collect();
        self.strays.extend(gone);
        self.manifest = m;
        shared
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .manifests += 1;
        Ok(())
    }

    /// Write a manifest naming what the current one names plus the epochs
    /// `uploaded` so far in this pass (an uploaded version of an id
    /// replaces the named one). Every version of an id holds the same
    /// guest state (reclamation merges away other epochs and folds chains,
    /// it never changes what an id restores to), and the uploads go in id
    /// order, so every epoch named has its chain named: the remote store
    /// is restorable at its newest uploaded epoch. Nothing it named before
    /// is deleted until the pass's final manifest.
    pub(super) fn publish_interim(&mut self, uploaded: &[Entry], shared: &Mailbox) -> Result<()> {
        let mut by_id: BTreeMap<u64, Entry> = self.manifest.epochs.iter().map(|e| (e.id, e.clone())).collect();
        for e in uploaded {
            by_id.insert(e.id, e.clone());
        }
        self.publish(by_id.into_values().collect(), shared)?;
        self.note_backlog(shared);
        Ok(())
    }
}
