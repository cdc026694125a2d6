//! Intel MultiProcessor Specification 1.4 tables.
//!
//! Linux finds its CPUs, the I/O APIC and the ISA interrupt routing here when
//! there are no ACPI tables, and guests that read no ACPI count CPUs from it. The
//! floating pointer sits at the start of the EBDA, where both look.

use super::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// Build the floating pointer plus configuration table for `vcpus` CPUs;
/// the result is to be written at [`EBDA_START`].
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, BSP
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus irq -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 ExtINT, LINT1 NMI, to all local APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = EBDA_START as u32 + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"CONSNAP ");
    table.extend_from_slice(b"VM          ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1, rev 1.4, checksum, features
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_valid() {
        let t = build(3);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let cpus = table[44..]
            .chunks(20)
            .take(3)
            .filter(|e| e[0] == 0 && e[3] & 1 == 1)
            .count();
        assert_eq!(cpus, 3);
        assert!(t.len() <= 1024, "must fit in the scanned KiB");
    }
}
