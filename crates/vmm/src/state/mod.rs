//! Complete machine state: what a snapshot must hold besides memory.
//!
//! Each component's state sits next to the code that saves and restores it
//! (`kvm` for vCPUs and VM-wide KVM devices, `devices` for the VMM's own
//! devices) behind the [`Persist`] trait; this module gathers them into a
//! [`MachineState`] and gives it a stable binary encoding (docs/FORMAT.md,
//! "Machine state records"): a flat list of tagged records, each KVM
//! structure kept as its Linux x86-64 UAPI bytes.

mod codec;
mod kvm;
mod records;
mod virtio_codec;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use thiserror::Error;
use vm_superio::serial::SerialState;

pub use codec::{decode, encode};
pub use kvm::{restore_vcpu, restore_vm, save_vcpu, save_vm, saveable_msrs};

/// Save/restore for one component, implemented next to the component with
/// its state type: [`crate::devices::SerialDevice`], [`crate::vcpu::Vcpu`],
/// [`InKernelDevices`].
pub trait Persist: Sized {
    /// The saved form.
    type State;
    /// What restoring needs besides the state (fds, writers, a fresh vCPU...).
    type Args;
    /// The error type.
    type Error;
    /// Capture the state. Called with the VM paused.
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Rebuild the component from `state`.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// The VM-wide devices KVM emulates in the kernel: PIC, IOAPIC, PIT, kvmclock.
#[derive(Debug)]
pub struct InKernelDevices<'a>(pub &'a kvm_ioctls::VmFd);

impl<'a> Persist for InKernelDevices<'a> {
    type State = VmState;
    type Args = &'a kvm_ioctls::VmFd;
    type Error = StateError;

    fn save(&self) -> Result<VmState, StateError> {
        save_vm(self.0)
    }

    fn restore(vm: &'a kvm_ioctls::VmFd, state: &VmState) -> Result<Self, StateError> {
        restore_vm(vm, state)?;
        Ok(InKernelDevices(vm))
    }
}

/// State errors.
#[derive(Debug, Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("vCPU/VM {vcpu}: {op} failed: {source}")]
    Kvm {
        /// vCPU index (0 for VM-wide ioctls).
        vcpu: u8,
        /// The ioctl.
        op: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// An MSR could not be read or written.
    #[error("vCPU {vcpu}: cannot {op} MSR {index:#x}")]
    Msr {
        /// vCPU index.
        vcpu: u8,
        /// MSR index.
        index: u32,
        /// "read" or "restore".
        op: &'static str,
    },
    /// A vCPU's saved XSAVE area does not fit this host's vCPUs.
    #[error(
        "vCPU {vcpu}: the saved XSAVE area is {saved} bytes, this host's vCPUs take {host} \
         (KVM_CAP_XSAVE2; at least 4096): saved on a host with more extended state"
    )]
    XsaveSize {
        /// vCPU index.
        vcpu: u8,
        /// Bytes saved.
        saved: usize,
        /// Bytes this host's KVM takes.
        host: usize,
    },
    /// Encoded state is malformed.
    #[error("machine state is corrupt: {0}")]
    Corrupt(String),
    /// State does not fit this machine.
    #[error("machine state does not fit: {0}")]
    Invalid(String),
}

/// Static description of the machine, enough to rebuild it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The kernel command line the machine booted with (`None` in states
    /// saved before consnap recorded it for every kernel).
    pub cmdline: Option<String>,
    /// What was booted, for humans (a path, or the name of an embedded image).
    pub kernel: String,
}

/// One vCPU's architectural and KVM state.
#[derive(Clone)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// KVM_GET_MP_STATE.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// XSAVE area as 32-bit words (4096 bytes, more with XSAVE2).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Guest TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
    /// CPUID table.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, SIPI vector.
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// VM-wide in-kernel device state.
#[derive(Clone)]
pub struct VmState {
    /// 8259 master.
    pub pic_master: kvm_irqchip,
    /// 8259 slave.
    pub pic_slave: kvm_irqchip,
    /// I/O APIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

/// State of the VMM's own devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStates {
    /// COM1 registers and pending input.
    pub serial: SerialState,
    /// virtio devices, by slot (see `devices::virtio`).
    pub virtio: Vec<VirtioState>,
}

/// One virtio device: its transport (registers, queues) and its own state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioState {
    /// The MMIO transport.
    pub transport: crate::devices::virtio::mmio::TransportState,
    /// The device.
    pub device: VirtioDeviceState,
}

/// The state of a virtio device behind its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioDeviceState {
    /// virtio-blk.
    Block(crate::devices::virtio::block::BlockState),
    /// virtio-net.
    Net(crate::devices::virtio::net::NetState),
}

/// Everything but memory.
#[derive(Debug, Clone)]
pub struct MachineState {
    /// Static configuration.
    pub config: MachineConfig,
    /// In-kernel VM devices and clock.
    pub vm: VmState,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// VMM devices.
    pub devices: DeviceStates,
}
