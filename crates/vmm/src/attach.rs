//! What the program running a machine attaches to it (console, port
//! devices, progress counter, disks, networks, the output gate), and the
//! devices built from it on a boot or a restore.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use crate::devices::output::OutputGate;
use crate::devices::virtio::net::{Net, random_mac};
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::{self, VirtioSlot, block::Block, disk::DiskImage};
use crate::devices::{BusDevice, DeviceError, Devices, SerialDevice};
use crate::memory::GuestRam;
use crate::state::{VirtioDeviceState, VirtioState};

/// A counter the guest keeps in its own memory (ops done, requests
/// served...), read by the VMM without a VM exit: what the machine reports
/// as its progress ([`Machine::progress`]), samples over a run and records
/// in each snapshot. The VMM knows no guest: the program that runs one
/// says where its counter is.
pub trait ProgressCounter: Send + Sync {
    /// The counter now, or `None` while the guest has not published it.
    fn read(&self, ram: &GuestRam) -> Option<u64>;
}

/// A port device the embedding program adds: `len` ports from `base`.
pub struct PortDevice {
    /// First port.
    pub base: u16,
    /// Number of ports.
    pub len: u16,
    /// The device.
    pub device: Arc<dyn BusDevice>,
}

/// A disk image to attach as a virtio-blk device.
#[derive(Clone)]
pub struct DiskAttach {
    /// The raw image.
    pub path: PathBuf,
    /// The guest may only read it (on a boot; a restore keeps the saved
    /// device's setting).
    pub readonly: bool,
    /// A lazily restored disk: where its units come from until the image
    /// is whole (see `devices::virtio::disk`).
    pub source: Option<Arc<dyn virtio::disk::UnitSource>>,
}

impl DiskAttach {
    /// An image the guest reads and writes.
    pub fn new(path: PathBuf) -> DiskAttach {
        DiskAttach {
            path,
            readonly: false,
            source: None,
        }
    }
}

impl std::fmt::Debug for DiskAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskAttach")
            .field("path", &self.path)
            .field("readonly", &self.readonly)
            .field("lazy", &self.source.is_some())
            .finish()
    }
}

/// A network to attach as a virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetAttach {
    /// The TAP device (opened, or created when absent). On a restore,
    /// `None` reattaches to the saved device's TAP.
    pub tap: Option<String>,
    /// The guest's MAC address (random when absent; a restore keeps the
    /// saved one).
    pub mac: Option<[u8; 6]>,
}

/// What the program running a machine attaches to it, on a boot as on a
/// restore: files and hooks, nothing of which is part of the machine's
/// saved state (a restore checks that the disks fit the saved devices).
pub struct Attach {
    /// Where the guest's console output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Port devices of the program's own (they hold no state).
    pub ports: Vec<PortDevice>,
    /// The guest's progress counter, if the program knows one.
    pub progress: Option<Arc<dyn ProgressCounter>>,
    /// Disk images, one virtio-blk device each, in slot order.
    pub disks: Vec<DiskAttach>,
    /// Networks, one virtio-net device each, in the slots after the disks.
    /// On a restore, the saved machine's networks reattach to the TAPs they
    /// had unless these name others (in order; fewer is fine).
    pub nets: Vec<NetAttach>,
    /// Where the guest's output waits for its epoch (or not): the network
    /// devices' frames, and the console when the program wraps it too.
    pub output: Arc<OutputGate>,
}

impl Attach {
    /// The console alone.
    pub fn console(serial_out: Box<dyn Write + Send>) -> Attach {
        Attach {
            serial_out,
            ports: Vec::new(),
            progress: None,
            disks: Vec::new(),
            nets: Vec::new(),
            output: OutputGate::passthrough(),
        }
    }
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach")
            .field("ports", &self.ports.iter().map(|p| p.device.name()).collect::<Vec<_>>())
            .field("progress", &self.progress.is_some())
            .field("disks", &self.disks)
            .field("nets", &self.nets)
            .finish_non_exhaustive()
    }
}

/// Files and the gate behind the virtio devices: disks, networks, output.
pub(crate) type VirtioAttach<'a> = (&'a [DiskAttach], &'a [NetAttach], &'a Arc<OutputGate>);

/// The devices of a machine: COM1 (from its saved state on a restore),
/// the legacy stubs, the program's own port devices, a virtio-blk device
/// per disk and a virtio-net device per network after them (from their
/// saved state on a restore).
pub(crate) fn build_devices(
    (vm, ram): (&kvm_ioctls::VmFd, &Arc<GuestRam>),
    serial: SerialDevice,
    ports: Vec<PortDevice>,
    (disks, nets, output): VirtioAttach<'_>,
    saved: Option<&[VirtioState]>,
) -> Result<Devices, DeviceError> {
    let mut d = Devices::new(serial)?;
    d.output = output.clone();
    for p in ports {
        d.pio.insert(u64::from(p.base), u64::from(p.len), p.device)?;
    }
    if disks.len() + nets.len() > virtio::MAX_DEVICES {
        return Err(DeviceError::Mismatch(format!(
            "{} disks and {} networks given: consnap attaches at most {} devices",
            disks.len(),
            nets.len(),
            virtio::MAX_DEVICES
        )));
    }
    if let Some(s) = saved {
        let count = |net: bool| {
            s.iter()
                .filter(|v| matches!(v.device, VirtioDeviceState::Net(_)) == net)
                .count()
        };
        if count(false) != disks.len() || count(true) < nets.len() {
            return Err(DeviceError::Mismatch(format!(
                "the saved machine has {} disk(s) and {} network(s), {} and {} given",
                count(false),
                count(true),
                disks.len(),
                nets.len()
            )));
        }
    }
    let nets: Vec<NetAttach> = match saved {
        Some(s) => (0..s.len() - disks.len())
            .map(|k| nets.get(k).cloned().unwrap_or(NetAttach { tap: None, mac: None }))
            .collect(),
        None => nets.to_vec(),
    };
    for (i, disk) in disks.iter().enumerate() {
        let saved = saved.map(|s| &s[i]);
        let block = match saved.map(|s| &s.device) {
            Some(VirtioDeviceState::Block(b)) => {
                let image = match &disk.source {
                    Some(src) => DiskImage::open_lazy(&disk.path, b.readonly, src.clone())?,
                    None => DiskImage::open(&disk.path, b.readonly)?,
                };
                Block::restore(Arc::new(image), b)?
            }
            Some(VirtioDeviceState::Net(_)) => {
                return Err(DeviceError::Mismatch(format!(
                    "virtio slot {i} holds a network in the saved machine, not a disk"
                )));
            }
            None => {
                let image = Arc::new(DiskImage::open(&disk.path, disk.readonly)?);
                let id = disk
                    .path
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned());
                Block::new(image, &id)
            }
        };
        let slot = VirtioSlot::block(vm, ram, i, Arc::new(block), saved.map(|s| &s.transport))?;
        d.add_virtio(slot)?;
    }
    for (k, net) in nets.iter().enumerate() {
        let i = disks.len() + k;
        let saved = saved.map(|s| &s[i]);
        let (tap, mac) = match saved.map(|s| &s.device) {
            // A restore keeps the saved MAC: the guest knows it.
            Some(VirtioDeviceState::Net(n)) => (net.tap.clone().unwrap_or_else(|| n.tap.clone()), n.mac),
            Some(VirtioDeviceState::Block(_)) => {
                return Err(DeviceError::Mismatch(format!(
                    "virtio slot {i} holds a disk in the saved machine, not a network"
                )));
            }
            None => {
                let tap = net
                    .tap
                    .clone()
                    .ok_or_else(|| DeviceError::Mismatch("a network needs a TAP name".into()))?;
                (tap, net.mac.unwrap_or_else(random_mac))
            }
        };
        let tap = Tap::open(&tap)?;
        let dev = Arc::new(Net::new(tap, mac, output.clone())?);
        let slot = VirtioSlot::net(vm, ram, i, dev, saved.map(|s| &s.transport))?;
        d.add_virtio(slot)?;
    }
    Ok(d)
}
