//! A few bytes of guest code drive the virtio-blk device through its MMIO
//! registers: the queue notification goes through KVM's ioeventfd to the
//! device's thread, the interrupt through the irqfd, and the device writes
//! the sector into guest memory (kvm-ioctls style: real KVM, real exits).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm::boot::{BootConfig, KernelSource};
use vmm::devices::GuestStop;
use vmm::machine::{Attach, DiskAttach, Machine};
use vmm::run::RunEnd;
use vmm::testing::{TestDir, kvm_ready};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const BASE: u32 = 0xd000_0000;
const DESC: u32 = 0x20_0000;
const AVAIL: u32 = 0x20_0100;
const USED: u32 = 0x20_0200;
const HDR: u32 = 0x20_1000;
const BUF: u32 = 0x20_2000;
const STATUS: u32 = 0x20_3000;

/// `movl $v, addr`.
fn store(code: &mut Vec<u8>, addr: u32, v: u32) {
    code.extend_from_slice(&[0xc7, 0x05]);
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&v.to_le_bytes());
}

fn driver_code() -> Vec<u8> {
    let mut c = Vec::new();
    for (reg, v) in [
        (0x70, 1),
        (0x70, 3),
        (0x24, 1),
        (0x20, 1), // VIRTIO_F_VERSION_1 (bit 32)
        (0x70, 11),
        (0x30, 0),
        (0x38, 16),
        (0x80, DESC),
        (0x84, 0),
        (0x90, AVAIL),
        (0x94, 0),
        (0xa0, USED),
        (0xa4, 0),
        (0x44, 1),
        (0x70, 15),
        (0x50, 0), // QueueNotify: the ioeventfd
    ] {
        store(&mut c, BASE + reg, v);
    }
    // spin: cmpw $0, USED+2; je spin
    c.extend_from_slice(&[0x66, 0x83, 0x3d]);
    c.extend_from_slice(&(USED + 2).to_le_bytes());
    c.extend_from_slice(&[0x00, 0x74, 0xf6]);
    // Print the interrupt status register and the first data byte on COM1.
    c.push(0xa1); // mov BASE+0x60, %eax
    c.extend_from_slice(&(BASE + 0x60).to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]); // mov $0x3f8,%dx; out %al,(%dx)
    c.push(0xa1);
    c.extend_from_slice(&BUF.to_le_bytes());
    c.push(0xee);
    // Exit with the request's status byte.
    c.extend_from_slice(&[0x0f, 0xb6, 0x05]); // movzbl STATUS, %eax
    c.extend_from_slice(&STATUS.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba, 0x01, 0x05, 0xee, 0xf4, 0xeb, 0xfd]);
    c
}

#[test]
fn a_guest_reads_a_sector_through_ioeventfd_and_irqfd() {
    if !kvm_ready() {
        return;
    }
    let dir = TestDir::new(env!("CARGO_TARGET_TMPDIR"), "tiny-virtio");
    let img = dir.path().join("d.img");
    let mut sector = vec![0u8; 1 << 20];
    sector[0] = 0x5a;
    std::fs::write(&img, &sector).unwrap();
    let boot = BootConfig {
        kernel: KernelSource::Bytes {
            name: "tiny".into(),
            image: vmm::testing::pvh_elf(&driver_code()),
        },
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
    };
    let out = Capture::default();
    let attach = Attach {
        disks: vec![DiskAttach {
            path: img.clone(),
            readonly: false,
        }],
        ..Attach::console(Box::new(out.clone()))
    };
    let mut m = Machine::boot(32 << 20, &boot, attach).unwrap();
    let ram = m.ram().clone();
    // The rings and one IN request for sector 0, as a driver lays them out.
    let desc = |i: u32, addr: u32, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&u64::from(addr).to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        ram.write_from(u64::from(DESC + 16 * i), &d).unwrap();
    };
    desc(0, HDR, 16, 1, 1);
    desc(1, BUF, 512, 3, 2);
    desc(2, STATUS, 1, 2, 0);
    ram.write_from(u64::from(HDR), &[0u8; 16]).unwrap();
    ram.write_from(u64::from(STATUS), &[0xff]).unwrap();
    ram.write_from(u64::from(AVAIL), &[0, 0, 1, 0, 0, 0]).unwrap();
    // The command line announces the device as Linux expects.
    assert!(
        m.config()
            .cmdline
            .as_deref()
            .unwrap()
            .contains("virtio_mmio.device=4K@0xd0000000:5")
    );
    let end = vmm::run::run(&mut m, &mut []).unwrap();
    assert!(matches!(end, RunEnd::Guest(GuestStop::PowerOff { code: 0 })), "{end:?}");
    assert_eq!(
        out.0.lock().unwrap().as_slice(),
        [1, 0x5a],
        "interrupt status, first byte read"
    );
    m.stop();
    drop(m);
    // The device let go of the image: another VM may take it.
    vmm::devices::virtio::disk::DiskImage::open(&img, false).unwrap();
}
