//! Bringing a machine back from an epoch: read the chain, decode the
//! state, fill fresh guest RAM page by page from the newest epoch that has
//! each page (verifying every page's checksum), then rebuild the VM
//! ([`restore`]); or rebuild the VM at once and let its pages arrive on
//! demand ([`restore_lazy`], the pager in `lazy`).

pub(crate) mod fill;
pub(crate) mod lazy;

pub use lazy::{LazyLink, LazyPager, LazyStats, restore_lazy, restore_lazy_from};

use store::{Source, Store, StoreError};
use thiserror::Error;
use vmm::machine::{Attach, Machine, MachineError};
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
    /// Opening the chain elsewhere than in a local store (an object store).
    #[error("cannot open the chain of epoch {id}: {why}")]
    Chain {
        /// Epoch.
        id: u64,
        /// Why.
        why: String,
    },
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

/// Guest RAM of an epoch, filled and verified, and its decoded state.
#[derive(Debug)]
pub struct RestoredRam {
    /// The machine state.
    pub state: MachineState,
    /// Guest RAM as the epoch left it.
    pub ram: GuestRam,
    /// Epochs read (the chain length).
    pub chain: usize,
    /// Bytes of page data read.
    pub bytes_read: u64,
    /// The guest's op count read from live RAM when the epoch was captured
    /// (header `progress`), if the guest published one.
    pub progress: Option<u64>,
}

/// What a restore needs before any page is read: the chain, its decoded
/// state (checked against the header) and the plan of where each page
/// comes from.
pub(crate) struct Prepared {
    pub state: MachineState,
    pub chain: Vec<store::EpochReader>,
    pub runs: Vec<store::Run>,
    pub progress: Option<u64>,
}

/// Open epoch `id`'s chain, decode and check its state, plan its pages.
pub(crate) fn prepare(store: &Store, id: u64) -> Result<Prepared, RestoreError> {
    prepare_chain(store.chain(id)?, id)
}

/// [`prepare`] for a chain already open (epoch `id` first).
pub(crate) fn prepare_chain(chain: Vec<store::EpochReader>, id: u64) -> Result<Prepared, RestoreError> {
    let Some(head) = chain.first() else {
        return Err(RestoreError::Mismatch {
            id,
            why: "its chain is empty".into(),
        });
    };
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
    let progress = (h.progress != u64::MAX).then_some(h.progress);
    let runs = store::plan(&chain)?;
    Ok(Prepared {
        state,
        chain,
        runs,
        progress,
    })
}

/// Read epoch `id` of `store` into fresh guest RAM, verifying everything
/// read, without building a VM (needs no KVM). `on_read` receives bytes
/// read so far and the total.
pub fn restore_ram(store: &Store, id: u64, on_read: &mut dyn FnMut(u64, u64)) -> Result<RestoredRam, RestoreError> {
    let Prepared {
        state,
        chain,
        runs,
        progress,
    } = prepare(store, id)?;
    let total: u64 = runs
        .iter()
        .filter(|r| matches!(r.source, Source::Data { .. }))
        .map(|r| r.count * PAGE as u64)
        .sum();
    let ram = GuestRam::new(state.config.mem_size).map_err(MachineError::from)?;
    let read = crate::restore::fill::fill(&ram, &chain, &runs, &mut |b| on_read(b, total))?;
    Ok(RestoredRam {
        state,
        ram,
        chain: chain.len(),
        bytes_read: read,
        progress,
    })
}

/// Rebuild the VM of epoch `id` of `store`, with what `attach` gives for
/// its configuration. `on_read` receives bytes read so far.
pub fn restore(
    store: &Store,
    id: u64,
    attach: impl FnOnce(&vmm::state::MachineConfig) -> Attach,
    on_read: &mut dyn FnMut(u64, u64),
) -> Result<Restored, RestoreError> {
    let r = restore_ram(store, id, on_read)?;
    let machine = Machine::restore(&r.state, r.ram, attach(&r.state.config))?;
    Ok(Restored {
        machine,
        epoch: id,
        chain: r.chain,
        bytes_read: r.bytes_read,
    })
}
