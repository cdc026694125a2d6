//! A whole virtual machine: KVM VM, guest RAM, devices and vCPUs.
//!
//! Build order for a fresh boot: VM → TSS/identity map → in-kernel irqchip
//! and PIT → RAM slots → devices (serial irqfd) → kernel and boot tables →
//! vCPUs (CPUID, boot registers on the BSP, LAPIC LINT0/1 on all).
//!
//! Restore order: VM → irqchip and PIT → RAM slots → memory contents →
//! devices from their state → VM-wide KVM state (PIT, PIC, IOAPIC, clock) →
//! vCPUs, each applying its own state on its own thread before it first runs.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::os::fd::AsRawFd;

use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1,
    kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::attach::build_devices;
pub use crate::attach::{Attach, DiskAttach, NetAttach, PortDevice, ProgressCounter};
use crate::boot::{self, BootConfig, BootError, layout};
use crate::devices::output::OutputGate;
use crate::devices::serial::COM1_IRQ;
use crate::devices::virtio;
use crate::devices::{DeviceError, Devices, SerialDevice};
use crate::dirty::{DirtySet, PageBits};
use crate::memory::{GuestRam, MemoryError, RamRange};
use crate::region::Region;
use crate::state::{self, DeviceStates, InKernelDevices, MachineConfig, MachineState, Persist, StateError};
use crate::vcpu::{PauseAction, Paused, Vcpu, VcpuError, VcpuEvent, Vcpus};
use crate::{cpuid, cpuid_check};

/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = (3 << 30) | (24 << 16) | (0xae << 8) | 0xc0;

/// Most vCPUs consnap runs.
pub const MAX_VCPUS: u8 = 4;
/// How long a pause may take before it is an error.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors building or driving a machine.
#[derive(Debug, Error)]
pub enum MachineError {
    /// /dev/kvm could not be opened.
    #[error("{0}")]
    NoKvm(String),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// A required KVM capability is missing.
    #[error("this host's KVM lacks {0}, which consnap needs")]
    MissingCap(&'static str),
    /// Bad vCPU count.
    #[error("--vcpus {0} is not supported: use 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    /// Memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Machine state.
    #[error(transparent)]
    State(#[from] StateError),
    /// The saved vCPUs need CPU features this host lacks.
    #[error(transparent)]
    Cpu(#[from] cpuid_check::CpuidError),
    /// Filling guest memory from a snapshot failed.
    #[error("cannot restore guest memory: {0}")]
    RestoreMemory(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The machine was used in the wrong phase.
    #[error("machine is {0}")]
    Phase(&'static str),
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { op, source }
}

/// Open /dev/kvm with a message a user can act on.
pub fn open_kvm() -> Result<Kvm, MachineError> {
    Kvm::new().map_err(|e| {
        MachineError::NoKvm(match e.errno() {
            libc::ENOENT => "/dev/kvm does not exist: this host has no KVM (enable virtualization or load kvm)".into(),
            libc::EACCES | libc::EPERM => {
                "permission denied opening /dev/kvm: run as root or add your user to the kvm group".into()
            }
            _ => format!("cannot open /dev/kvm: {e}"),
        })
    })
}

/// Ends the controller's wait for vCPU events early, from any thread, so
/// that a request need not wait for the next tick.
#[derive(Debug, Clone)]
pub struct Waker(Sender<VcpuEvent>);

impl Waker {
    /// Wake the controller (harmless when it is not waiting, or gone).
    pub fn wake(&self) {
        let _ = self.0.send(VcpuEvent::Wake);
    }
}

/// A VM with its RAM, devices and vCPUs.
pub struct Machine {
    kvm: Kvm,
    vm: VmFd,
    ram: Arc<GuestRam>,
    devices: Arc<Devices>,
    config: MachineConfig,
    progress: Option<Arc<dyn ProgressCounter>>,
    pending: Vec<Vcpu>,
    restore: Option<Vec<state::VcpuState>>,
    vcpus: Option<Vcpus>,
    events_tx: Sender<VcpuEvent>,
    events_rx: Receiver<VcpuEvent>,
    dirty_logging: bool,
    /// KVM_GET_DIRTY_LOG does not re-protect; [`Machine::rearm_dirty`] does.
    manual_rearm: bool,
    /// Pages handed back by [`Machine::mark_dirty`], reported by the next [`Machine::take_dirty`].
    redirty: Mutex<DirtySet>,
    /// What the vCPU threads used, once stopped.
    vcpu_times: Vec<crate::vcpu::VcpuTimes>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A VM with its memory but without vCPUs or device state yet: see
/// [`Machine::prepare`].
pub struct PreparedVm {
    parts: Parts,
    serial_evt: EventFd,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("mem_size", &self.parts.ram.size())
            .finish()
    }
}

struct Parts {
    kvm: Kvm,
    vm: VmFd,
    ram: Arc<GuestRam>,
}

/// VM with irqchip, PIT and RAM slots (over `ram`, or fresh RAM of
/// `mem_size` bytes), plus the serial interrupt event.
fn create_vm(mem_size: u64, vcpus: u8, ram: Option<GuestRam>) -> Result<(Parts, EventFd), MachineError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MachineError::Vcpus(vcpus));
    }
    let kvm = open_kvm()?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(MachineError::MissingCap(name));
        }
    }
    let ram = match ram {
        Some(r) if r.size() == mem_size => r,
        Some(r) => {
            return Err(MachineError::Phase(if r.size() < mem_size {
                "given less RAM than its state describes"
            } else {
                "given more RAM than its state describes"
            }));
        }
        None => GuestRam::new(mem_size)?,
    };
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
        what: "serial interrupt",
        source,
    })?;
    vm.register_irqfd(&serial_evt, COM1_IRQ).map_err(kvm_err("KVM_IRQFD"))?;
    for r in ram.ranges() {
        set_slot(&vm, &ram, r, false)?;
    }
    Ok((
        Parts {
            kvm,
            vm,
            ram: Arc::new(ram),
        },
        serial_evt,
    ))
}

fn set_slot(vm: &VmFd, ram: &GuestRam, r: &RamRange, log_dirty: bool) -> Result<(), MachineError> {
    let region = kvm_userspace_memory_region {
        slot: r.slot,
        flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: r.gpa,
        memory_size: r.len,
        userspace_addr: ram.host_ptr(r) as u64,
    };
    // SAFETY: the host range is a live mapping owned by `ram`, and slots do
    // not overlap. KVM reaches a slot's memory only on behalf of a vCPU
    // (KVM_RUN and the ioctls on its thread), and every vCPU thread holds
    // an `Arc<GuestRam>` until it ends, so the mapping outlives every
    // access; the kernel's VM may outlive the VmFd (vCPU fds and irqfds
    // keep it), but no vCPU can run once its thread has ended.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

/// The CPUID a new machine gets on this host: what KVM supports, less what
/// the host itself cannot run.
fn host_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, MachineError> {
    let mut base = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    cpuid::filter_to_host(&mut base);
    cpuid::filter_host_quirks(&mut base);
    Ok(base)
}

/// Refuse saved vCPUs that need CPU features this host's vCPUs lack. Each
/// is compared with what a fresh vCPU here presents (KVM_GET_CPUID2 after
/// [`create_vcpus`] set this host's CPUID), the same view the state was
/// saved from: kvm_pvm reports host bits there that its
/// KVM_GET_SUPPORTED_CPUID does not list.
fn check_cpus(fresh: &[Vcpu], saved: &[state::VcpuState]) -> Result<(), MachineError> {
    for s in saved {
        let Some(v) = fresh.iter().find(|v| v.id == s.id) else {
            continue;
        };
        let offered =
            v.fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("KVM_GET_CPUID2"))?;
        cpuid_check::check_vcpu(s, offered.as_slice())?;
    }
    Ok(())
}

fn create_vcpus(kvm: &Kvm, vm: &VmFd, n: u8, base: &kvm_bindings::CpuId) -> Result<Vec<Vcpu>, MachineError> {
    let xsave_size = (kvm.check_extension_int(Cap::Xsave2).max(0) as usize).max(4096);
    let mut vcpus = Vec::with_capacity(n as usize);
    for id in 0..n {
        let fd = vm.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpuid::for_vcpu(base, id, n))
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        vcpus.push(Vcpu {
            id,
            fd,
            msr_list: Arc::new(Vec::new()),
            xsave_size,
        });
    }
    let msrs = Arc::new(state::saveable_msrs(kvm, &vcpus[0])?);
    for v in &mut vcpus {
        v.msr_list = msrs.clone();
    }
    Ok(vcpus)
}

/// LAPIC LVT LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, like a PC.
fn set_lint(v: &Vcpu) -> Result<(), MachineError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let mut lapic = v.fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (off, mode) in [(LVT_LINT0, 0x7u32), (LVT_LINT1, 0x4u32)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in val.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    v.fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

impl Machine {
    /// Create a VM and boot `boot` in it (vCPUs not started yet).
    pub fn boot(mem_size: u64, boot: &BootConfig, attach: Attach) -> Result<Machine, MachineError> {
        let (parts, serial_evt) = create_vm(mem_size, boot.vcpus, None)?;
        // Linux finds virtio-mmio devices on its command line.
        let mut boot = boot.clone();
        for i in 0..attach.disks.len() + attach.nets.len() {
            if !boot.cmdline.is_empty() {
                boot.cmdline.push(' ');
            }
            boot.cmdline += &virtio::cmdline_word(i);
        }
        let boot = &boot;
        let entry = boot::load(&parts.ram, boot)?;
        let vcpus = create_vcpus(&parts.kvm, &parts.vm, boot.vcpus, &host_cpuid(&parts.kvm)?)?;
        for v in &vcpus {
            set_lint(v)?;
            v.fd.set_fpu(&boot::regs::initial_fpu())
                .map_err(kvm_err("KVM_SET_FPU"))?;
        }
        let sregs = vcpus[0].fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let (regs, sregs) = boot::regs::boot_cpu_state(&parts.ram, &entry, sregs)?;
        vcpus[0].fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpus[0].fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let kernel = match &boot.kernel {
            boot::KernelSource::Bytes { name, .. } => name.clone(),
            boot::KernelSource::File(p) => p.display().to_string(),
        };
        tracing::debug!(?entry, "kernel loaded");
        let Attach {
            serial_out,
            ports,
            progress,
            disks,
            nets,
            output,
        } = attach;
        let devices = build_devices(
            (&parts.vm, &parts.ram),
            SerialDevice::new(serial_evt, serial_out),
            ports,
            (&disks, &nets, &output),
            None,
        )?;
        let config = MachineConfig {
            mem_size,
            vcpus: boot.vcpus,
            cmdline: Some(boot.cmdline.clone()),
            kernel,
        };
        Ok(Self::assemble(parts, devices, config, progress, vcpus, None))
    }

    /// Recreate a VM from `state` over `ram`, which already holds the
    /// guest's memory (vCPUs not started).
    pub fn restore(state: &MachineState, ram: GuestRam, attach: Attach) -> Result<Machine, MachineError> {
        let vm = Self::prepare(state.config.mem_size, state.config.vcpus, ram)?;
        Self::restore_prepared(vm, state, attach)
    }

    /// The part of a restore that needs only the RAM size and vCPU count:
    /// the VM, its in-kernel devices and its memory slots. Registering a
    /// slot costs KVM time that grows with the RAM (about 2 ms a GiB under
    /// kvm_pvm's shadow paging), so a lazy restore does it while it reads
    /// the store's indexes.
    pub fn prepare(mem_size: u64, vcpus: u8, ram: GuestRam) -> Result<PreparedVm, MachineError> {
        let (parts, serial_evt) = create_vm(mem_size, vcpus, Some(ram))?;
        Ok(PreparedVm { parts, serial_evt })
    }

    /// Finish [`Machine::prepare`]'s VM from `state` (its RAM size and
    /// vCPU count must be the ones it was prepared with).
    pub fn restore_prepared(vm: PreparedVm, state: &MachineState, attach: Attach) -> Result<Machine, MachineError> {
        let cfg = &state.config;
        let PreparedVm { parts, serial_evt } = vm;
        if parts.ram.size() != cfg.mem_size {
            return Err(MachineError::Phase(
                "prepared with another RAM size than its state describes",
            ));
        }
        // Before the devices: a state saved on another host may need CPU
        // features this one lacks.
        let vcpus = create_vcpus(&parts.kvm, &parts.vm, cfg.vcpus, &host_cpuid(&parts.kvm)?)?;
        check_cpus(&vcpus, &state.vcpus)?;
        parts.ram.clear_vmm_dirty();
        let Attach {
            serial_out,
            ports,
            progress,
            disks,
            nets,
            output,
        } = attach;
        let serial = SerialDevice::restore((serial_evt, serial_out), &state.devices.serial)?;
        let devices = build_devices(
            (&parts.vm, &parts.ram),
            serial,
            ports,
            (&disks, &nets, &output),
            Some(&state.devices.virtio),
        )?;
        InKernelDevices::restore(&parts.vm, &state.vm)?;
        Ok(Self::assemble(
            parts,
            devices,
            cfg.clone(),
            progress,
            vcpus,
            Some(state.vcpus.clone()),
        ))
    }

    fn assemble(
        parts: Parts,
        devices: Devices,
        config: MachineConfig,
        progress: Option<Arc<dyn ProgressCounter>>,
        vcpus: Vec<Vcpu>,
        restore: Option<Vec<state::VcpuState>>,
    ) -> Machine {
        let (events_tx, events_rx) = channel();
        let redirty = Mutex::new(DirtySet::empty(parts.ram.ranges()));
        Machine {
            kvm: parts.kvm,
            vm: parts.vm,
            ram: parts.ram,
            devices: Arc::new(devices),
            config,
            progress,
            pending: vcpus,
            restore,
            vcpus: None,
            events_tx,
            events_rx,
            dirty_logging: false,
            manual_rearm: false,
            redirty,
            vcpu_times: Vec::new(),
        }
    }

    /// Start the vCPU threads.
    pub fn start(&mut self) -> Result<(), MachineError> {
        if self.vcpus.is_some() {
            return Err(MachineError::Phase("already running"));
        }
        let vcpus = std::mem::take(&mut self.pending);
        let running = Vcpus::start(
            vcpus,
            self.restore.take(),
            self.ram.clone(),
            self.devices.clone(),
            self.events_tx.clone(),
        )?;
        self.vcpus = Some(running);
        Ok(())
    }

    fn running(&self) -> Result<&Vcpus, MachineError> {
        self.vcpus.as_ref().ok_or(MachineError::Phase("not started"))
    }

    /// Pause all vCPUs. A [`PauseAction::SaveState`] pause (a snapshot's)
    /// then quiesces the devices that work beside the vCPUs, so that
    /// nothing touches guest memory or a device's files until
    /// [`Machine::resume`].
    pub fn pause(&self, action: PauseAction) -> Result<Paused, MachineError> {
        let vcpus = self.running()?;
        let paused = vcpus.pause(action, PAUSE_TIMEOUT)?;
        if action == PauseAction::SaveState
            && let Err(e) = self.devices.quiesce()
        {
            vcpus.resume();
            return Err(e.into());
        }
        Ok(paused)
    }

    /// Resume after [`Machine::pause`]: the devices, then the vCPUs.
    pub fn resume(&self) -> Result<(), MachineError> {
        let vcpus = self.running()?;
        self.devices.resume();
        vcpus.resume();
        Ok(())
    }

    /// Capture everything but memory. Call with vCPU states from a
    /// [`PauseAction::SaveState`] pause, while still paused. Devices are
    /// saved before the VM-wide KVM state, so an interrupt a device raises
    /// meanwhile is caught in the irqchip state rather than lost.
    pub fn save_state(&self, paused: Paused) -> Result<MachineState, MachineError> {
        if paused.states.len() != usize::from(self.config.vcpus) {
            return Err(MachineError::Phase("paused without saving every vCPU"));
        }
        let devices = DeviceStates {
            serial: self.devices.serial.save()?,
            virtio: self.devices.virtio.iter().map(virtio::VirtioSlot::save).collect(),
        };
        let vm = InKernelDevices(&self.vm).save()?;
        Ok(MachineState {
            config: self.config.clone(),
            vm,
            vcpus: paused.states,
            devices,
        })
    }

    /// Turn KVM dirty logging on or off for all RAM.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), MachineError> {
        if self.dirty_logging == on {
            return Ok(());
        }
        for r in self.ram.ranges().to_vec() {
            set_slot(&self.vm, &self.ram, &r, on)?;
        }
        self.dirty_logging = on;
        Ok(())
    }

    /// Ask KVM to stop re-protecting the pages it reports dirty
    /// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): [`Machine::take_dirty`] then
    /// keeps reporting a page until [`Machine::rearm_dirty`] re-protects it,
    /// so that pages written in most epochs can stay unprotected (a page
    /// that stays dirty costs no fault). Call before dirty logging is on.
    /// Returns false when the host's KVM cannot.
    pub fn set_manual_rearm(&mut self) -> Result<bool, MachineError> {
        const MANUAL_PROTECT_ENABLE: u64 = 1;
        if self.dirty_logging {
            return Err(MachineError::Phase("already logging dirty pages"));
        }
        let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
        let have = self.vm.check_extension_raw(libc::c_ulong::from(cap));
        if have <= 0 || have as u64 & MANUAL_PROTECT_ENABLE == 0 {
            return Ok(false);
        }
        let mut c = kvm_bindings::kvm_enable_cap {
            cap,
            ..Default::default()
        };
        c.args[0] = MANUAL_PROTECT_ENABLE;
        self.vm
            .enable_cap(&c)
            .map_err(kvm_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
        self.manual_rearm = true;
        Ok(true)
    }

    /// Re-protect `pages` in KVM's dirty log, so that their next write is
    /// logged again (manual mode only; a no-op otherwise).
    pub fn rearm_dirty(&self, pages: &DirtySet) -> Result<(), MachineError> {
        if !self.manual_rearm || !self.dirty_logging {
            return Ok(());
        }
        for (r, bits) in self.ram.ranges().iter().zip(&pages.ranges) {
            if bits.is_empty() {
                continue;
            }
            let mut words = bits.words().to_vec();
            let arg = kvm_clear_dirty_log {
                slot: r.slot,
                num_pages: r.pages() as u32,
                first_page: 0,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: words.as_mut_ptr().cast(),
                },
            };
            // SAFETY: KVM_CLEAR_DIRTY_LOG reads the struct and `num_pages`
            // bits of the bitmap, which `words` holds for the whole slot.
            let rc = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
            if rc != 0 {
                return Err(MachineError::Kvm {
                    op: "KVM_CLEAR_DIRTY_LOG",
                    source: kvm_ioctls::Error::last(),
                });
            }
        }
        Ok(())
    }

    /// True while KVM logs dirty pages.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// The pages written since the last call, over all RAM: KVM's dirty
    /// log (while logging), ORed with the pages the VMM itself wrote and the
    /// pages handed back by [`Machine::mark_dirty`]. Clears all three, so
    /// each write is reported once. KVM re-protects the pages it reports.
    pub fn take_dirty(&self) -> Result<DirtySet, MachineError> {
        let ranges = self.ram.ranges();
        let mut out = DirtySet::empty(ranges);
        for (r, bits) in ranges.iter().zip(out.ranges.iter_mut()) {
            if self.dirty_logging {
                let log = self
                    .vm
                    .get_dirty_log(r.slot, r.len as usize)
                    .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
                bits.or_words(&log);
            }
            bits.or_words(&self.ram.take_vmm_dirty(r));
        }
        let mut carried = self.redirty.lock().unwrap_or_else(|p| p.into_inner());
        out.or(&carried);
        carried.ranges.iter_mut().for_each(PageBits::clear);
        Ok(out)
    }

    /// Hand pages back to dirty tracking: the next [`Machine::take_dirty`]
    /// reports them again (an epoch that failed to save them does this, so
    /// that no write is ever lost from the chain).
    pub fn mark_dirty(&self, pages: &DirtySet) {
        self.redirty.lock().unwrap_or_else(|p| p.into_inner()).or(pages);
    }

    /// CPU time and run-queue wait of each vCPU thread, after [`Machine::stop`].
    pub fn vcpu_times(&self) -> &[crate::vcpu::VcpuTimes] {
        &self.vcpu_times
    }

    /// Wait up to `timeout` for a vCPU event; a [`Waker`] cuts the wait
    /// short (and returns `None`).
    pub fn next_event(&self, timeout: Duration) -> Option<VcpuEvent> {
        match self.events_rx.recv_timeout(timeout) {
            Ok(VcpuEvent::Wake) | Err(_) => None,
            Ok(ev) => Some(ev),
        }
    }

    /// A handle other threads use to end the controller's current wait in
    /// [`Machine::next_event`] early.
    pub fn waker(&self) -> Waker {
        Waker(self.events_tx.clone())
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Devices.
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// Static configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// The gate the machine's output (network frames, and the console when
    /// attached through it) waits in for its epoch.
    pub fn output(&self) -> &Arc<OutputGate> {
        &self.devices.output
    }

    /// The captured state besides guest RAM: each disk's blocks, in slot order.
    pub fn regions(&self) -> Vec<Arc<dyn Region>> {
        self.devices
            .virtio
            .iter()
            .filter_map(|s| s.as_block().map(|b| b.disk().clone() as Arc<dyn Region>))
            .collect()
    }

    /// The network devices, in slot order.
    pub fn nets(&self) -> Vec<Arc<virtio::net::Net>> {
        self.devices.virtio.iter().filter_map(|s| s.as_net().cloned()).collect()
    }

    /// The guest's progress counter now, when the program running the
    /// machine attached one ([`Attach::progress`]) and the guest has
    /// published it.
    pub fn progress(&self) -> Option<u64> {
        self.progress.as_ref().and_then(|p| p.read(&self.ram))
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Stop the vCPU threads.
    pub fn stop(&mut self) {
        self.stop_then(&mut || {});
    }

    /// Stop the vCPU threads, calling `between` once they were told to
    /// stop and before waiting for them (see [`crate::vcpu::Vcpus::stop_then`]).
    pub fn stop_then(&mut self, between: &mut dyn FnMut()) {
        if let Some(v) = self.vcpus.take() {
            self.vcpu_times = v.stop_then(between);
        }
        self.devices.stop_workers();
        self.devices.serial.flush();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop();
    }
}
