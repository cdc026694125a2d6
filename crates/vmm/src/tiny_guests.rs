//! Guests of a few bytes for the tests of consnap's crates (feature
//! `testing`), in the style of kvm-ioctls' tests: 32-bit code entered
//! through a minimal PVH ELF ([`crate::testing::pvh_elf`]).

use crate::memory::GuestRam;

/// The first virtio device's window.
pub const VIRTIO_BASE: u32 = 0xd000_0000;
/// Where [`virtio_read`] lays out its queue and request.
pub const DESC: u32 = 0x20_0000;
/// The available ring.
pub const AVAIL: u32 = 0x20_0100;
/// The used ring.
pub const USED: u32 = 0x20_0200;
/// The request header.
pub const HDR: u32 = 0x20_1000;
/// The 512-byte buffer the device reads sector 0 into (a page of its own,
/// the first 2 MiB block past the guest's code that nothing else writes
/// but the device).
pub const BUF: u32 = 0x40_0000;
/// The status byte.
pub const STATUS: u32 = 0x20_3000;
/// The word the guest waits on before it notifies the device (with `wait`).
pub const GO: u32 = 0x20_4000;

/// `movl $v, addr`.
fn store(code: &mut Vec<u8>, addr: u32, v: u32) {
    code.extend_from_slice(&[0xc7, 0x05]);
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&v.to_le_bytes());
}

/// `cmpl $0, addr; je .` (spin while the dword at `addr` is 0).
fn spin_while_zero(code: &mut Vec<u8>, addr: u32, word: bool) {
    if word {
        code.push(0x66);
    }
    code.extend_from_slice(&[0x83, 0x3d]);
    code.extend_from_slice(&addr.to_le_bytes());
    let back = if word { 0xf6 } else { 0xf7 };
    code.extend_from_slice(&[0x00, 0x74, back]);
}

/// Code that sets up the virtio-blk device in slot 0 through its MMIO
/// registers, as a driver does, and makes the request [`virtio_read`]
/// laid out available (the notification goes through the ioeventfd). With
/// `wait`, it first spins until the host writes a non-zero word at [`GO`],
/// and after the request completes it spins for ever; without, it prints
/// the interrupt status register and the first byte read on COM1 and
/// powers off with the request's status as exit code.
pub fn virtio_read(wait: bool) -> Vec<u8> {
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
    ] {
        store(&mut c, VIRTIO_BASE + reg, v);
    }
    if wait {
        spin_while_zero(&mut c, GO, false);
    }
    store(&mut c, VIRTIO_BASE + 0x50, 0); // QueueNotify: the ioeventfd
    spin_while_zero(&mut c, USED + 2, true);
    if wait {
        c.extend_from_slice(&[0xeb, 0xfe]); // jmp .
        return c;
    }
    c.push(0xa1); // mov VIRTIO_BASE+0x60, %eax
    c.extend_from_slice(&(VIRTIO_BASE + 0x60).to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]); // mov $0x3f8,%dx; out %al,(%dx)
    c.push(0xa1);
    c.extend_from_slice(&BUF.to_le_bytes());
    c.push(0xee);
    c.extend_from_slice(&[0x0f, 0xb6, 0x05]); // movzbl STATUS, %eax
    c.extend_from_slice(&STATUS.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba, 0x01, 0x05, 0xee, 0xf4, 0xeb, 0xfd]);
    c
}

/// Lay out, in `ram`, the rings and one IN request of sector 0 into
/// [`BUF`], as a driver does, for [`virtio_read`].
pub fn virtio_read_request(ram: &GuestRam) -> Result<(), crate::memory::MemoryError> {
    let desc = |i: u32, addr: u32, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&u64::from(addr).to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        ram.write_from(u64::from(DESC + 16 * i), &d)
    };
    desc(0, HDR, 16, 1, 1)?;
    desc(1, BUF, 512, 3, 2)?;
    desc(2, STATUS, 1, 2, 0)?;
    ram.write_from(u64::from(HDR), &[0u8; 16])?;
    ram.write_from(u64::from(STATUS), &[0xff])?;
    ram.write_from(u64::from(AVAIL), &[0, 0, 1, 0, 0, 0])
}

/// The used ring's index: 1 once the device completed the request.
pub fn virtio_used(ram: &GuestRam) -> u16 {
    let mut b = [0u8; 2];
    let _ = ram.read_to(u64::from(USED) + 2, &mut b);
    u16::from_le_bytes(b)
}
