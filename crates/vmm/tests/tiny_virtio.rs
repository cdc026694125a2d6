//! A few bytes of guest code drive the virtio-blk device through its MMIO
//! registers: the queue notification goes through KVM's ioeventfd to the
//! device's thread, the interrupt through the irqfd, and the device writes
//! the sector into guest memory (kvm-ioctls style: real KVM, real exits).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use vmm::boot::{BootConfig, KernelSource};
use vmm::devices::GuestStop;
use vmm::machine::{Attach, DiskAttach, Machine};
use vmm::run::RunEnd;
use vmm::testing::{Capture, TestDir, kvm_ready};
use vmm::tiny_guests;

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
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
            image: vmm::testing::pvh_elf(&tiny_guests::virtio_read(false)),
        },
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
    };
    let out = Capture::default();
    let attach = Attach {
        disks: vec![DiskAttach::new(img.clone())],
        ..Attach::console(Box::new(out.clone()))
    };
    let mut m = Machine::boot(32 << 20, &boot, attach).unwrap();
    tiny_guests::virtio_read_request(m.ram()).unwrap();
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
