//! Where boot structures live in guest-physical memory.
//!
//! Everything sits below 1 MiB except the kernel itself (loaded at 1 MiB or
//! at its ELF addresses) and the initrd (top of low RAM).

/// GDT used at entry (PVH and 64-bit Linux).
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map (after start_info).
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// PVH module list (initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6200;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity page tables for 64-bit Linux entry: PML4, PDPT, PD.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xA000;
/// Page directory (512 x 2 MiB = 1 GiB identity map).
pub const PD_ADDR: u64 = 0xB000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the EBDA; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Local APIC base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// I/O APIC base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Address KVM uses for the TSS of real-mode emulation (inside the MMIO hole).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Address of KVM's identity map page (just below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
