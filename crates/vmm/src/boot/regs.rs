//! Initial vCPU register state for each boot protocol.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{GDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR};
use super::{BootError, Entry};
use crate::memory::GuestRam;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT at entry: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18), TSS (0x20).
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_9b00_0000_ffff,
    0x0080_8b00_0000_0000,
];

fn segment(index: u16, entry: u64) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// 1 GiB identity map with 2 MiB pages for the 64-bit Linux entry.
pub fn write_identity_page_tables(ram: &GuestRam) -> Result<(), BootError> {
    let mem = ram.memory();
    let w = |addr: u64, v: u64, what| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|_| BootError::GuestWrite { what, addr })
    };
    w(PML4_ADDR, PDPT_ADDR | 0x3, "PML4")?;
    w(PDPT_ADDR, PD_ADDR | 0x3, "PDPT")?;
    for i in 0..512u64 {
        w(PD_ADDR + i * 8, (i << 21) | 0x83, "page directory")?;
    }
    Ok(())
}

/// Registers and segments the boot CPU starts with.
pub fn boot_cpu_state(ram: &GuestRam, entry: &Entry, mut sregs: kvm_sregs) -> Result<(kvm_regs, kvm_sregs), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        super::write(ram, GDT_ADDR + i as u64 * 8, &e.to_le_bytes(), "GDT")?;
    }
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let data = segment(2, GDT[2]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(4, GDT[4]);
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match *entry {
        Entry::Pvh { entry, start_info } => {
            sregs.cs = segment(3, GDT[3]);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        Entry::Linux64 { entry, boot_params } => {
            sregs.cs = segment(1, GDT[1]);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
        }
    }
    Ok((regs, sregs))
}

/// FPU state after reset (x87 control word, MXCSR).
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment(1, GDT[1]);
        assert_eq!((code64.l, code64.db, code64.base, code64.limit), (1, 0, 0, 0xffff_ffff));
        let code32 = segment(3, GDT[3]);
        assert_eq!((code32.l, code32.db, code32.type_, code32.selector), (0, 1, 0xb, 0x18));
        let tss = segment(4, GDT[4]);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
    }
}
