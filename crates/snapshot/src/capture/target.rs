//! What the engine needs from a machine, as a trait, so that the engine can
//! be tested against a fake machine (no KVM) as well as run on a
//! [`vmm::machine::Machine`].

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use vmm::dirty::DirtySet;
use vmm::machine::{Machine, MachineError};
use vmm::memory::GuestRam;
use vmm::region::Region;
use vmm::vcpu::{PauseAction, VcpuError};

/// A machine operation failed.
#[derive(Debug, Error)]
pub enum TargetError {
    /// The KVM machine.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// A machine without KVM (the tests' fake machine) failed.
    #[error("{0}")]
    Other(String),
}

/// The machine's state, captured while paused.
#[derive(Debug)]
pub struct Captured {
    /// Encoded machine state (everything but memory; docs/FORMAT.md).
    pub state: Vec<u8>,
    /// Time the vCPUs took to stop.
    pub vcpu_pause: Duration,
}

/// A machine the engine snapshots.
pub trait Target {
    /// Guest RAM.
    fn ram(&self) -> &Arc<GuestRam>;
    /// Number of vCPUs.
    fn vcpus(&self) -> u32;
    /// Turn dirty-page logging on (before the vCPUs start).
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), TargetError>;
    /// Stop re-protecting reported pages automatically: [`Target::take_dirty`]
    /// then keeps reporting a page until [`Target::rearm_dirty`] is called
    /// for it. Before dirty logging is on; false if unsupported.
    fn set_manual_rearm(&mut self) -> Result<bool, TargetError> {
        Ok(false)
    }
    /// Track `pages` again (manual mode).
    fn rearm_dirty(&mut self, _pages: &DirtySet) -> Result<(), TargetError> {
        Ok(())
    }
    /// Pause every vCPU and capture the machine state. `Ok(None)`: the
    /// guest is stopping and there is nothing left to capture (not paused).
    fn pause_and_capture(&mut self) -> Result<Option<Captured>, TargetError>;
    /// Let the vCPUs run again.
    fn resume(&mut self) -> Result<(), TargetError>;
    /// Pages written since the last call (see [`Machine::take_dirty`]).
    fn take_dirty(&mut self) -> Result<DirtySet, TargetError>;
    /// Hand pages back to dirty tracking.
    fn mark_dirty(&mut self, pages: &DirtySet);
    /// The guest's progress counter, if the machine has one (recorded in
    /// each epoch's header).
    fn progress(&self) -> Option<u64>;
    /// The captured state besides guest RAM (each disk's blocks), in
    /// region order; the same for the machine's whole life.
    fn regions(&self) -> Vec<Arc<dyn Region>> {
        Vec::new()
    }
    /// While paused for an epoch: close the guest's output so far into a
    /// generation (output commit, `vmm::devices::output`); the returned
    /// call lets it out, once the epoch is durable.
    fn seal_output(&mut self) -> Option<OutputRelease> {
        None
    }
}

/// Tells the output gate that the epoch (its id given) is committed
/// (called by the writer right after the epoch's commit).
pub type OutputRelease = Box<dyn FnOnce(u64) + Send>;

impl Target for Machine {
    fn ram(&self) -> &Arc<GuestRam> {
        Machine::ram(self)
    }

    fn vcpus(&self) -> u32 {
        u32::from(self.config().vcpus)
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), TargetError> {
        Ok(Machine::set_dirty_logging(self, on)?)
    }

    fn set_manual_rearm(&mut self) -> Result<bool, TargetError> {
        Ok(Machine::set_manual_rearm(self)?)
    }

    fn rearm_dirty(&mut self, pages: &DirtySet) -> Result<(), TargetError> {
        Ok(Machine::rearm_dirty(self, pages)?)
    }

    fn pause_and_capture(&mut self) -> Result<Option<Captured>, TargetError> {
        let paused = match self.pause(PauseAction::SaveState) {
            Ok(p) => p,
            Err(MachineError::Vcpu(VcpuError::Stopping)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let vcpu_pause = paused.latency;
        match self.save_state(paused) {
            Ok(st) => Ok(Some(Captured {
                state: vmm::state::encode(&st),
                vcpu_pause,
            })),
            Err(e) => {
                let _ = self.resume();
                Err(e.into())
            }
        }
    }

    fn resume(&mut self) -> Result<(), TargetError> {
        Ok(Machine::resume(self)?)
    }

    fn take_dirty(&mut self) -> Result<DirtySet, TargetError> {
        Ok(Machine::take_dirty(self)?)
    }

    fn mark_dirty(&mut self, pages: &DirtySet) {
        Machine::mark_dirty(self, pages);
    }

    fn progress(&self) -> Option<u64> {
        Machine::progress(self)
    }

    fn regions(&self) -> Vec<Arc<dyn Region>> {
        Machine::regions(self)
    }

    fn seal_output(&mut self) -> Option<OutputRelease> {
        let gate = self.output().clone();
        if !gate.commits() {
            return None;
        }
        let generation = gate.seal();
        Some(Box::new(move |epoch| gate.durable_locally(generation, epoch)))
    }
}
