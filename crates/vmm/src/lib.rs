//! consnap's virtual machine monitor.
//!
//! - [`memory`]: private anonymous guest RAM and the VMM's own dirty bitmap;
//! - [`machine`]: the KVM VM, its build and restore order, pause/resume;
//! - [`vcpu`]: vCPU threads, exits, signal-kick pausing;
//! - [`devices`]: serial console, debug-exit, i8042 reset;
//! - [`boot`]: PVH and Linux boot protocols, MP table;
//! - [`state`]: complete machine state (vCPUs, KVM devices, VMM devices) and its encoding;
//! - [`run`]: the controller loop and its periodic tasks;
//! - [`workload_check`]: the workload guest's memory against the host's reference.

pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod guest_status;
pub mod machine;
pub mod memory;
pub mod run;
pub mod state;
pub mod testing;
pub mod vcpu;
pub mod workload_check;

pub use machine::{Machine, MachineError};
