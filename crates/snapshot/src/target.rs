//! What the engine needs from a machine, as a trait, so that the engine can
//! be tested against a fake machine (no KVM) as well as run on a
//! [`vmm::machine::Machine`].

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use vmm::dirty::DirtySet;
use vmm::machine::{Machine, MachineError};
use vmm::memory::GuestRam;
use vmm::vcpu::VcpuError;

/// A machine operation failed.
#[derive(Debug, Error)]
#[error(transparent)]
pub struct TargetError(pub Box<dyn std::error::Error + Send + Sync>);

impl From<MachineError> for TargetError {
    fn from(e: MachineError) -> Self {
        TargetError(Box::new(e))
    }
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
    /// Pause every vCPU: returns, with the time it took, once none is in
    /// the guest (guest memory no longer changes), while the vCPUs may
    /// still be saving their own state; [`Target::capture`] finishes the
    /// pause's capture. `Ok(None)`: the guest is stopping and there is
    /// nothing left to capture (not paused).
    fn begin_pause(&mut self) -> Result<Option<Duration>, TargetError>;
    /// The encoded machine state (everything but memory; docs/FORMAT.md) at
    /// the pause begun by [`Target::begin_pause`]; the machine stays paused.
    fn capture(&mut self) -> Result<Vec<u8>, TargetError>;
    /// Let the vCPUs run again.
    fn resume(&mut self) -> Result<(), TargetError>;
    /// Pages written since the last call (see [`Machine::take_dirty`]).
    fn take_dirty(&mut self) -> Result<DirtySet, TargetError>;
    /// Hand pages back to dirty tracking.
    fn mark_dirty(&mut self, pages: &DirtySet);
    /// Ops the workload guest has published, if it is the workload guest.
    fn guest_ops(&self) -> Option<u64>;
}

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

    fn begin_pause(&mut self) -> Result<Option<Duration>, TargetError> {
        match self.stop_guest() {
            Ok(d) => Ok(Some(d)),
            Err(MachineError::Vcpu(VcpuError::Stopping)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn capture(&mut self) -> Result<Vec<u8>, TargetError> {
        match self.capture_state() {
            Ok(st) => Ok(vmm::state::encode(&st)),
            Err(e) => {
                let _ = Machine::resume(self);
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

    fn guest_ops(&self) -> Option<u64> {
        vmm::guest_status::read(Machine::ram(self)).map(|s| s.ops_done)
    }
}
