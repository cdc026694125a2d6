//! Reading the workload guest's status page (see `workload::abi`).

use workload::abi::{self, off};

use vmm::memory::GuestRam;

/// A snapshot of the guest's published status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestStatus {
    /// `workload::abi::state` value.
    pub state: u32,
    /// vCPUs running the workload.
    pub ncpus: u32,
    /// Ops done so far, summed over vCPUs.
    pub ops_done: u64,
    /// Final ops (valid when DONE).
    pub ops: u64,
    /// Final checksum (valid when DONE).
    pub checksum: u64,
    /// Integrity errors the guest found.
    pub errors: u64,
    /// Exit code the guest reported.
    pub exit_code: u32,
}

impl GuestStatus {
    /// True once the guest has published final results.
    pub fn done(&self) -> bool {
        self.state == abi::state::DONE
    }
}

/// Read the status page; `None` if the guest has not initialised it.
pub fn read(ram: &GuestRam) -> Option<GuestStatus> {
    let base = abi::STATUS_GPA;
    if ram.read_u64(base + off::MAGIC)? != abi::STATUS_MAGIC {
        return None;
    }
    let ops_done = (0..abi::MAX_CPUS as u64)
        .filter_map(|i| ram.read_u64(base + off::OPS_DONE + i * 8))
        .sum();
    Some(GuestStatus {
        state: ram.read_u32(base + off::STATE)?,
        ncpus: ram.read_u32(base + off::NCPUS)?,
        ops_done,
        ops: ram.read_u64(base + off::OPS)?,
        checksum: ram.read_u64(base + off::CHECKSUM)?,
        errors: ram.read_u64(base + off::ERRORS)?,
        exit_code: ram.read_u32(base + off::EXIT_CODE)?,
    })
}
