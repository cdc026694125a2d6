//! Bringing a machine back from an epoch: read the chain, decode the
//! state, fill fresh guest RAM page by page from the newest epoch that has
//! each page (verifying every page's checksum), then rebuild the VM
//! ([`restore`]); or rebuild the VM at once and let its pages arrive on
//! demand ([`restore_lazy`], the pager in `lazy`).

pub(crate) mod disk;
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
    /// A disk image cannot be written.
    #[error("disk image {path}: {why}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
    /// The disks given do not match the epoch's.
    #[error(
        "epoch {id} has {has} disk(s) but {given} new image path(s) were given: give --disk PATH for each of its disks, in order (a restore writes each disk as it was into a new image)"
    )]
    Disks {
        /// Epoch.
        id: u64,
        /// Its disks.
        has: usize,
        /// Paths given.
        given: usize,
    },
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
    /// Guest RAM's runs.
    pub runs: Vec<store::Run>,
    /// The disks' runs (unit addresses of regions 1 and up).
    pub region_runs: Vec<store::Run>,
    /// The disks.
    pub regions: Vec<store::format::RegionDesc>,
    pub progress: Option<u64>,
}

impl Prepared {
    /// Check that `disks` are as many as the epoch's, and write each
    /// region into its new image. Returns the bytes read.
    pub(crate) fn materialize_disks(
        &self,
        id: u64,
        disks: &[vmm::machine::DiskAttach],
        on_read: &mut dyn FnMut(u64),
    ) -> Result<u64, RestoreError> {
        if disks.len() != self.regions.len() {
            return Err(RestoreError::Disks {
                id,
                has: self.regions.len(),
                given: disks.len(),
            });
        }
        let mut read = 0;
        for (i, (desc, d)) in self.regions.iter().zip(disks).enumerate() {
            read += disk::materialize(&self.chain, &self.region_runs, i + 1, desc, &d.path, on_read)?;
        }
        Ok(read)
    }

    /// Bytes of page data to read for RAM and for the disks.
    fn data_bytes(&self) -> u64 {
        self.runs
            .iter()
            .chain(&self.region_runs)
            .filter(|r| matches!(r.source, Source::Data { .. }))
            .map(|r| r.count * PAGE as u64)
            .sum()
    }
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
    // Each disk is a region; networks have none.
    let disks = state
        .devices
        .virtio
        .iter()
        .filter(|v| matches!(v.device, vmm::state::VirtioDeviceState::Block(_)))
        .count();
    if disks != h.regions.len() {
        return Err(RestoreError::Mismatch {
            id,
            why: format!(
                "header lists {}, state has {disks} virtio disk(s)",
                store::format::describe_regions(&h.regions),
            ),
        });
    }
    let progress = (h.progress != u64::MAX).then_some(h.progress);
    let regions = h.regions.clone();
    let (runs, region_runs) = store::plan(&chain)?
        .into_iter()
        .partition(|r| store::format::region_of(r.gfn) == 0);
    Ok(Prepared {
        state,
        chain,
        runs,
        region_runs,
        regions,
        progress,
    })
}

/// Read epoch `id` of `store` into fresh guest RAM, verifying everything
/// read, without building a VM (needs no KVM). `on_read` receives bytes
/// read so far and the total.
pub fn restore_ram(store: &Store, id: u64, on_read: &mut dyn FnMut(u64, u64)) -> Result<RestoredRam, RestoreError> {
    let prep = prepare(store, id)?;
    let total = prep.data_bytes();
    fill_ram(prep, &mut |b| on_read(b, total))
}

fn fill_ram(prep: Prepared, on_read: &mut dyn FnMut(u64)) -> Result<RestoredRam, RestoreError> {
    let ram = GuestRam::new(prep.state.config.mem_size).map_err(MachineError::from)?;
    let read = crate::restore::fill::fill(&ram, &prep.chain, &prep.runs, on_read)?;
    Ok(RestoredRam {
        state: prep.state,
        ram,
        chain: prep.chain.len(),
        bytes_read: read,
        progress: prep.progress,
    })
}

/// Write the disks of epoch `id` of `store` into new images at `paths`
/// (one per disk of the epoch, in order), without restoring the VM.
/// Returns the bytes of block data read; `on_read` receives bytes read so
/// far and the total.
pub fn export_disks(
    store: &Store,
    id: u64,
    paths: &[std::path::PathBuf],
    on_read: &mut dyn FnMut(u64, u64),
) -> Result<u64, RestoreError> {
    let prep = prepare(store, id)?;
    let total: u64 = prep
        .region_runs
        .iter()
        .filter(|r| matches!(r.source, Source::Data { .. }))
        .map(|r| r.count * PAGE as u64)
        .sum();
    let disks: Vec<vmm::machine::DiskAttach> = paths.iter().map(|p| vmm::machine::DiskAttach::new(p.clone())).collect();
    let mut done = 0;
    prep.materialize_disks(id, &disks, &mut |b| {
        done += b;
        on_read(done, total)
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
    let prep = prepare(store, id)?;
    let attach = attach(&prep.state.config);
    let total = prep.data_bytes();
    let mut disk_done = 0;
    let disk_read = prep.materialize_disks(id, &attach.disks, &mut |b| {
        disk_done += b;
        on_read(disk_done, total)
    })?;
    let r = fill_ram(prep, &mut |b| on_read(disk_read + b, total))?;
    let machine = Machine::restore(&r.state, r.ram, attach)?;
    Ok(Restored {
        machine,
        epoch: id,
        chain: r.chain,
        bytes_read: r.bytes_read + disk_read,
    })
}
