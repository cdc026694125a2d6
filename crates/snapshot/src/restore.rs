//! Bringing a machine back from an epoch: read the chain, decode the
//! state, fill fresh guest RAM page by page from the newest epoch that has
//! each page (verifying every page's checksum), then rebuild the VM.

use std::io::Write;

use store::{EpochReader, Source, Store, StoreError};
use thiserror::Error;
use vmm::machine::{Machine, MachineError};
use vmm::memory::GuestRam;
use vmm::state::{MachineState, StateError};

use crate::pages::PAGE;

/// Restore errors; each names the epoch or file.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The store or an epoch file.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The machine state in an epoch.
    #[error("epoch {id} ({path}): {source}")]
    State {
        /// Epoch.
        id: u64,
        /// Its file.
        path: String,
        /// Cause.
        source: StateError,
    },
    /// The state does not match the epoch header.
    #[error("epoch {id}: {why}")]
    Mismatch {
        /// Epoch.
        id: u64,
        /// What disagrees.
        why: String,
    },
    /// Building the VM.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// A restored, not yet started machine.
#[derive(Debug)]
pub struct Restored {
    /// The machine.
    pub machine: Machine,
    /// The epoch it came from.
    pub epoch: u64,
    /// Epochs read (the chain length).
    pub chain: usize,
    /// Bytes of page data read.
    pub bytes_read: u64,
}

/// Largest read, in pages (8 MiB).
const SPAN_PAGES: u64 = 2048;
/// Unneeded pages a read may skip over to merge two runs into one read.
const SPAN_GAP: u64 = 64;

/// Fill guest RAM from the plan. Each epoch's DATA is read in ascending
/// order, in reads of up to 8 MiB that merge nearby runs, into a reused
/// buffer; every page used is verified against its checksum before it is
/// copied into guest memory. Zero runs are left alone: fresh anonymous
/// memory is already zero.
fn fill(
    ram: &GuestRam,
    chain: &[EpochReader],
    runs: &[store::Run],
    progress: &mut dyn FnMut(u64),
) -> Result<u64, RestoreError> {
    let mut by_epoch: Vec<Vec<(u64, store::Run)>> = vec![Vec::new(); chain.len()];
    for run in runs {
        if let Source::Data { epoch, page } = run.source {
            // A run may be longer than one read; split it.
            let mut done = 0;
            while done < run.count {
                let n = (run.count - done).min(SPAN_PAGES);
                let part = store::Run {
                    gfn: run.gfn + done,
                    count: n,
                    source: run.source,
                };
                by_epoch[epoch].push((page + done, part));
                done += n;
            }
        }
    }
    let mut bytes = 0;
    let mut buf = crate::pages::prefaulted(SPAN_PAGES as usize * PAGE);
    for (epoch, mut list) in by_epoch.into_iter().enumerate() {
        let reader = &chain[epoch];
        list.sort_by_key(|(page, _)| *page);
        let mut i = 0;
        while i < list.len() {
            // Grow a span of runs that one read covers.
            let first = list[i].0;
            let mut end = first + list[i].1.count;
            let mut j = i + 1;
            while j < list.len() && list[j].0 <= end + SPAN_GAP && list[j].0 + list[j].1.count - first <= SPAN_PAGES {
                end = end.max(list[j].0 + list[j].1.count);
                j += 1;
            }
            let span = &mut buf[..(end - first) as usize * PAGE];
            reader.read_unverified(first, span)?;
            for (page, run) in &list[i..j] {
                let at = (page - first) as usize * PAGE;
                let src = &span[at..at + run.count as usize * PAGE];
                reader.verify(*page, src)?;
                let gpa = run.gfn * PAGE as u64;
                ram.write_from(gpa, src).map_err(|e| StoreError::Corrupt {
                    path: reader.path().to_path_buf(),
                    why: format!("pages at {gpa:#x}: {e}"),
                })?;
            }
            bytes += list[i..j].iter().map(|(_, r)| r.count * PAGE as u64).sum::<u64>();
            progress(bytes);
            i = j;
        }
    }
    Ok(bytes)
}

/// Rebuild the VM of epoch `id` of `store`. `progress` receives bytes read so far.
pub fn restore(
    store: &Store,
    id: u64,
    serial_out: Box<dyn Write + Send>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, RestoreError> {
    let chain = store.chain(id)?;
    let head = &chain[0];
    let state_err = |source| RestoreError::State {
        id,
        path: head.path().display().to_string(),
        source,
    };
    let state: MachineState = vmm::state::decode(&head.state()?).map_err(state_err)?;
    let h = head.header();
    if state.config.mem_size != h.mem_size || u32::from(state.config.vcpus) != h.vcpus {
        return Err(RestoreError::Mismatch {
            id,
            why: format!(
                "header says {} bytes and {} vCPUs, state says {} bytes and {} vCPUs",
                h.mem_size, h.vcpus, state.config.mem_size, state.config.vcpus
            ),
        });
    }
    let runs = store::plan(&chain)?;
    let total: u64 = runs
        .iter()
        .filter(|r| matches!(r.source, Source::Data { .. }))
        .map(|r| r.count * PAGE as u64)
        .sum();
    let ram = GuestRam::new(state.config.mem_size).map_err(MachineError::from)?;
    let read = fill(&ram, &chain, &runs, &mut |b| progress(b, total))?;
    let machine = Machine::restore(&state, ram, serial_out)?;
    Ok(Restored {
        machine,
        epoch: id,
        chain: chain.len(),
        bytes_read: read,
    })
}
