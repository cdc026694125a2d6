//! virtio 1.x devices over the MMIO transport ("Version 2").
//!
//! Each device sits in a 4 KiB window of the MMIO bus at
//! [`slot_base`]`(i)` with interrupt [`slot_irq`]`(i)`, announced to the
//! guest as Linux expects it: `virtio_mmio.device=4K@0x...:IRQ` on the
//! kernel command line. The guest's queue notifications reach the device
//! through an ioeventfd (no exit to the VMM), and the device's interrupts
//! reach the guest through an irqfd; a device serves its requests on a
//! thread of its own ([`worker`]), never on a vCPU thread.
//!
//! - [`mmio`]: the transport's registers and state ([`mmio::MmioTransport`]);
//! - [`block`]: virtio-blk over a [`disk::DiskImage`];
//! - [`net`]: virtio-net over a [`tap::Tap`], its output through the
//!   machine's output gate (`devices::output`).

pub mod block;
pub(crate) mod chain;
pub mod disk;
pub mod mmio;
pub mod net;
pub(crate) mod pause;
pub mod tap;
pub(crate) mod worker;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Guest-physical base of the first device window (in the MMIO hole
/// between 3 and 4 GiB, below the IOAPIC and LAPIC).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of a device window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Interrupt of the first device (COM1 has 4).
pub const FIRST_IRQ: u32 = 5;
/// Most virtio devices a machine has (IOAPIC pins 5 to 20).
pub const MAX_DEVICES: usize = 16;

/// Guest-physical base of device slot `i`'s window.
pub fn slot_base(i: usize) -> u64 {
    MMIO_BASE + i as u64 * MMIO_WINDOW
}

/// Interrupt (GSI) of device slot `i`.
pub fn slot_irq(i: usize) -> u32 {
    FIRST_IRQ + i as u32
}

/// The kernel command-line word that announces slot `i` to Linux.
pub fn cmdline_word(i: usize) -> String {
    format!("virtio_mmio.device=4K@{:#x}:{}", slot_base(i), slot_irq(i))
}

/// Bit of the interrupt status register: the device used buffers.
pub const INT_USED: u32 = 1;
/// Bit of the interrupt status register: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the status register the driver reads and
/// acknowledges, and the irqfd that raises the guest interrupt.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd` (registered with KVM for the
    /// device's GSI), with `status` as saved.
    pub fn new(irqfd: EventFd, status: u32) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(status),
            irqfd,
        }
    }

    /// Set `bits` in the status register and interrupt the guest.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio interrupt not delivered: {e}");
        }
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset.
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a device behind the MMIO transport does; the transport owns the
/// registers, the queues and the interrupt.
pub trait VirtioDevice: Send + Sync {
    /// virtio device id (2 for a block device).
    fn device_type(&self) -> u32;
    /// A name for messages.
    fn name(&self) -> String;
    /// Largest size of each queue; their number is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// The driver reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serve what queue `index` holds, until it is empty or `stop()` says
    /// to stop between two requests (a pause). Returns whether buffers were
    /// used (the transport then decides whether to interrupt).
    fn process(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, virtio_queue::Error>;
    /// At a snapshot's pause, once no request is in flight: whatever the
    /// device must find true of its backend for the epoch to be right.
    fn check(&self) -> Result<(), crate::devices::DeviceError> {
        Ok(())
    }
    /// File descriptors of the device's backend and the queue to serve
    /// when one becomes readable (edge-triggered): a TAP's frames, a
    /// wake-up after backpressure.
    fn backend_events(&self) -> Vec<(std::os::fd::RawFd, usize)> {
        Vec::new()
    }
    /// How long the device's thread polls its queues (the driver's
    /// notifications off) after it used buffers; zero: it sleeps at once.
    fn poll_window(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// What a device did with one descriptor chain ([`serve_chains`]).
pub(crate) enum Step {
    /// Done: put it in the used ring with this many bytes written.
    Used(u32),
    /// Leave it in the ring and take it again at once (what it was for
    /// went elsewhere: a received frame too large for it).
    Again,
    /// Leave it in the ring and stop until woken (no frame to receive, no
    /// room for output).
    Wait,
}

/// Serve `queue`'s chains with `f` until the ring is empty (guest
/// notifications are off meanwhile and on again at the end, checked for a
/// chain that came in between), `f` says wait, or `stop()` (a pause) after
/// a chain; returns whether any was used.
pub(crate) fn serve_chains(
    queue: &mut Queue,
    mem: &GuestMemory,
    stop: &dyn Fn() -> bool,
    mut f: impl FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> Step,
) -> Result<bool, virtio_queue::Error> {
    use virtio_queue::{QueueOwnedT, QueueT};
    let mut used = false;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match f(chain) {
                Step::Used(len) => {
                    queue.add_used(mem, head, len)?;
                    used = true;
                    if stop() {
                        return Ok(used);
                    }
                }
                Step::Again => queue.go_to_previous_position(),
                Step::Wait => {
                    queue.go_to_previous_position();
                    return Ok(used);
                }
            }
        }
        if !queue.enable_notification(mem)? {
            return Ok(used);
        }
    }
}

/// The driver reads `data.len()` bytes at `offset` of configuration space
/// `config`; bytes past its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(usize::try_from(o).ok()?).copied())
            .unwrap_or(0);
    }
}

impl crate::devices::Quiesce for mmio::MmioTransport {
    fn quiesce(&self) -> Result<(), crate::devices::DeviceError> {
        let name = crate::devices::BusDevice::name(self);
        self.pauser.pause(&name)?;
        if let Err(e) = self.device.check() {
            self.pauser.resume();
            return Err(e);
        }
        Ok(())
    }

    fn resume(&self) {
        self.pauser.resume();
    }
}

/// The device in a slot.
#[derive(Debug, Clone)]
pub enum SlotDevice {
    Block(std::sync::Arc<block::Block>),
    Net(std::sync::Arc<net::Net>),
}

/// A virtio device in its slot, with the thread that serves it.
pub struct VirtioSlot {
    /// The transport (on the MMIO bus).
    pub transport: std::sync::Arc<mmio::MmioTransport>,
    /// The device.
    pub device: SlotDevice,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// A lazily restored disk's fill thread, and what stops it.
    filler: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    stop_fill: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for VirtioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSlot")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// Niceness of a lazily restored disk's fill thread: below the vCPUs and
/// the device, which fetch what the guest needs now.
const FILL_NICE: i32 = 5;
/// Units a fill step brings in.
const FILL_UNITS: u64 = 256;

/// Bring in every missing unit of `disk`, a step at a time, until it is
/// whole or `stop` is set.
fn spawn_filler(
    disk: std::sync::Arc<disk::DiskImage>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, crate::devices::DeviceError> {
    std::thread::Builder::new()
        .name("disk-fill".into())
        .spawn(move || {
            // SAFETY: setpriority on the calling thread; failure is harmless.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, FILL_NICE) };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match disk.fill(FILL_UNITS) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        // The guest gets an I/O error where it reads such a
                        // unit; the fill cannot go on.
                        tracing::error!(disk = %disk.path().display(), "lazily restored disk: {e}");
                        return;
                    }
                }
            }
        })
        .map_err(|source| crate::devices::DeviceError::Quiesce {
            device: "disk fill".into(),
            why: format!("cannot start its thread: {source}"),
        })
}

impl VirtioSlot {
    /// Wire block device `block` to the VM in slot `slot` (its irqfd and
    /// its queues' ioeventfds), from `saved` transport state on a restore,
    /// and start the thread that serves it (and a lazily restored disk's
    /// fill thread).
    pub fn block(
        vm: &kvm_ioctls::VmFd,
        ram: &std::sync::Arc<crate::memory::GuestRam>,
        slot: usize,
        block: std::sync::Arc<block::Block>,
        saved: Option<&mmio::TransportState>,
    ) -> Result<VirtioSlot, crate::devices::DeviceError> {
        let mut s = Self::wire(vm, ram, slot, SlotDevice::Block(block.clone()), saved)?;
        if block.disk().missing() > 0 {
            s.filler = std::sync::Mutex::new(Some(spawn_filler(block.disk().clone(), s.stop_fill.clone())?));
        }
        Ok(s)
    }

    /// Wire network device `net` as [`VirtioSlot::block`] does a disk.
    pub fn net(
        vm: &kvm_ioctls::VmFd,
        ram: &std::sync::Arc<crate::memory::GuestRam>,
        slot: usize,
        net: std::sync::Arc<net::Net>,
        saved: Option<&mmio::TransportState>,
    ) -> Result<VirtioSlot, crate::devices::DeviceError> {
        Self::wire(vm, ram, slot, SlotDevice::Net(net), saved)
    }

    fn wire(
        vm: &kvm_ioctls::VmFd,
        ram: &std::sync::Arc<crate::memory::GuestRam>,
        slot: usize,
        device: SlotDevice,
        saved: Option<&mmio::TransportState>,
    ) -> Result<VirtioSlot, crate::devices::DeviceError> {
        use crate::devices::DeviceError;
        let dev: std::sync::Arc<dyn VirtioDevice> = match &device {
            SlotDevice::Block(b) => b.clone(),
            SlotDevice::Net(n) => n.clone(),
        };
        let name = dev.name();
        let kvm = |op: &'static str| {
            let device = name.clone();
            move |source| DeviceError::Kvm { device, op, source }
        };
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            what: "virtio interrupt",
            source,
        })?;
        vm.register_irqfd(&irqfd, slot_irq(slot)).map_err(kvm("KVM_IRQFD"))?;
        let t = std::sync::Arc::new(match saved {
            Some(s) => mmio::MmioTransport::restore(slot, dev, ram.clone(), irqfd, s)?,
            None => mmio::MmioTransport::new(slot, dev, ram.clone(), irqfd)?,
        });
        let notify = kvm_ioctls::IoEventAddress::Mmio(slot_base(slot) + mmio::NOTIFY_OFFSET);
        for (q, evt) in t.queue_evts.iter().enumerate() {
            vm.register_ioevent(evt, &notify, q as u32)
                .map_err(kvm("KVM_IOEVENTFD"))?;
        }
        let thread = worker::spawn(t.clone())?;
        Ok(VirtioSlot {
            transport: t,
            device,
            thread: std::sync::Mutex::new(Some(thread)),
            filler: std::sync::Mutex::new(None),
            stop_fill: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// Stop its threads (once).
    pub(crate) fn stop(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = thread {
            worker::stop(&self.transport, h);
        }
        self.stop_fill.store(true, std::sync::atomic::Ordering::Relaxed);
        let filler = self.filler.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = filler
            && h.join().is_err()
        {
            tracing::error!("the disk fill thread panicked");
        }
    }

    /// The block device, if the slot holds one.
    pub fn as_block(&self) -> Option<&std::sync::Arc<block::Block>> {
        match &self.device {
            SlotDevice::Block(b) => Some(b),
            SlotDevice::Net(_) => None,
        }
    }

    /// The network device, if the slot holds one.
    pub fn as_net(&self) -> Option<&std::sync::Arc<net::Net>> {
        match &self.device {
            SlotDevice::Net(n) => Some(n),
            SlotDevice::Block(_) => None,
        }
    }

    /// The slot's saved state.
    pub fn save(&self) -> crate::state::VirtioState {
        crate::state::VirtioState {
            transport: self.transport.save(),
            device: match &self.device {
                SlotDevice::Block(b) => crate::state::VirtioDeviceState::Block(b.save()),
                SlotDevice::Net(n) => crate::state::VirtioDeviceState::Net(n.save()),
            },
        }
    }
}

#[cfg(test)]
mod tests;
