//! consnap's virtual machine monitor. It knows no particular guest: what
//! a program running one adds (port devices, a progress counter in guest
//! memory) comes in through [`machine::Attach`].
//!
//! - [`memory`]: private anonymous guest RAM and the VMM's own dirty bitmap;
//! - [`machine`]: the KVM VM, its build and restore order, pause/resume;
//! - [`vcpu`]: vCPU threads, exits, signal-kick pausing;
//! - [`devices`]: the port and MMIO buses, serial console, debug-exit, i8042 reset;
//! - [`boot`]: PVH and Linux boot protocols, MP table;
//! - [`state`]: complete machine state (vCPUs, KVM devices, VMM devices) and its encoding;
//! - [`run`]: the controller loop and its periodic tasks;
//! - [`testing`] (feature `testing`): support for the tests of consnap's crates.

mod attach;
pub mod boot;
pub mod cpuid;
pub mod cpuid_check;
pub mod devices;
pub mod dirty;
pub mod machine;
pub mod memory;
pub mod region;
pub mod run;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(any(test, feature = "testing"))]
pub mod tiny_guests;
pub mod vcpu;

pub use machine::{Machine, MachineError};
