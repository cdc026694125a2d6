//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), DSDT and MADT.
//!
//! Kernels built without MP-table parsing (Debian's cloud kernel, for one)
//! find their CPUs only in the MADT, and the FADT gives Linux a reset
//! register and an S5 sleep-control register so that `reboot` and
//! `poweroff` reach the VMM. Interrupt routing follows KVM's default GSI
//! routing (ISA IRQ n is IOAPIC pin n), so the MADT carries no overrides,
//! exactly like the MP table.
//!
//! Everything lives at 0xE0000, inside the e820-reserved BIOS area, where a
//! kernel that is not told the RSDP address scans for it.

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

/// Where the RSDP (and after it, the other tables) go.
pub const RSDP_ADDR: u64 = 0xE_0000;
/// I/O port of the sleep-control register (write SLP_EN|SLP_TYP to enter S5).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the sleep-status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// SLP_EN bit of the sleep-control register.
pub const SLP_EN: u8 = 1 << 5;

const OEM_ID: &[u8; 6] = b"CNSNAP";
const OEM_TABLE_ID: &[u8; 8] = b"CONSNAP ";

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |s, x| s.wrapping_add(*x)))
}

/// A table: standard 36-byte header followed by `body`, checksummed.
fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(sig);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"CNSP"); // creator id
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for a byte-wide I/O port.
fn gas_io(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let mut put = |off: usize, v: &[u8]| b[off - 36..off - 36 + v.len()].copy_from_slice(v);
    put(40, &(dsdt as u32).to_le_bytes());
    // IAPC_BOOT_ARCH: no VGA, no MSI, no CMOS RTC.
    put(109, &((1u16 << 2) | (1 << 3) | (1 << 5)).to_le_bytes());
    // Flags: RESET_REG_SUP, HW_REDUCED_ACPI.
    put(112, &((1u32 << 10) | (1 << 20)).to_le_bytes());
    put(116, &gas_io(0x64)); // reset: i8042 command port
    put(128, &[0xfe]);
    put(131, &[0]); // FADT minor version (ACPI 6.0)
    put(140, &dsdt.to_le_bytes()); // X_DSDT
    put(244, &gas_io(SLEEP_CONTROL_PORT));
    put(256, &gas_io(SLEEP_STATUS_PORT));
    put(268, b"CONSNAP\0"); // hypervisor vendor identity
    table(b"FACP", 6, &b)
}

fn dsdt() -> Vec<u8> {
    // Name (_S5, Package () { 5, 0, 0, 0 }): SLP_TYP 5 for soft-off.
    let aml = [
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00,
    ];
    table(b"DSDT", 2, &aml)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s
    for cpu in 0..vcpus {
        b.extend_from_slice(&[0, 8, cpu, cpu]); // processor local APIC: UID, APIC ID
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, vcpus, 0]); // I/O APIC, its ID after the CPUs'
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]); // local APIC NMI: all CPUs, LINT1
    table(b"APIC", 4, &b)
}

/// All tables, laid out from [`RSDP_ADDR`]: (address, bytes) pairs.
pub fn build(vcpus: u8) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64| a.next_multiple_of(16);
    let xsdt_at = RSDP_ADDR + 64;
    let fadt_at = align(xsdt_at + 36 + 16);
    let fadt = fadt(0); // placeholder to learn the size
    let dsdt_at = align(fadt_at + fadt.len() as u64);
    let fadt = self::fadt(dsdt_at);
    let dsdt = dsdt();
    let madt_at = align(dsdt_at + dsdt.len() as u64);
    let madt = madt(vcpus);
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_at.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = table(b"XSDT", 1, &xsdt_body);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_at.to_le_bytes());
    rsdp.extend_from_slice(&[0; 4]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    vec![
        (RSDP_ADDR, rsdp),
        (xsdt_at, xsdt),
        (fadt_at, fadt),
        (dsdt_at, dsdt),
        (madt_at, madt),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn tables_are_consistent() {
        let t = build(3);
        let (at, rsdp) = &t[0];
        assert_eq!(*at, RSDP_ADDR);
        assert_eq!((sum(&rsdp[..20]), sum(rsdp)), (0, 0));
        let find = |addr: u64| t.iter().find(|(a, _)| *a == addr).map(|(_, b)| b).unwrap();
        let xsdt = find(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut sigs = Vec::new();
        for (i, (_, b)) in t.iter().enumerate().skip(1) {
            assert_eq!(sum(b), 0, "table {i} checksum");
            assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize, b.len());
            sigs.push(b[..4].to_vec());
        }
        assert_eq!(
            sigs,
            [b"XSDT".to_vec(), b"FACP".to_vec(), b"DSDT".to_vec(), b"APIC".to_vec()]
        );
        let fadt = find(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        assert_eq!(fadt.len(), 276);
        let dsdt_at = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(&find(dsdt_at)[..4], b"DSDT");
        let madt = find(u64::from_le_bytes(xsdt[44..52].try_into().unwrap()));
        let cpus = madt[44..]
            .chunks(8)
            .take(3)
            .filter(|e| e[0] == 0 && e[4] & 1 == 1)
            .count();
        assert_eq!(cpus, 3);
        let end = t.last().map(|(a, b)| a + b.len() as u64).unwrap();
        assert!(end < 0xF_0000, "tables must stay in the reserved BIOS area");
    }
}
