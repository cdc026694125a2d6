//! Loading a guest kernel and the structures it boots with.
//!
//! Two boot protocols:
//! - **PVH** for ELF kernels with a `XEN_ELFNOTE_PHYS32_ENTRY` note: the
//!   guests of consnap's tests, and Linux's uncompressed `vmlinux`. Entry in 32-bit
//!   protected mode with EBX pointing at `hvm_start_info`.
//! - **Linux 64-bit boot protocol** for bzImage: `boot_params` at the zero
//!   page, entry at `startup_64` in long mode on identity page tables.
//!
//! Both get an e820/PVH memory map, the command line, an optional initrd,
//! an MP table and ACPI tables.

pub mod acpi;
pub mod layout;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

use crate::memory::{GuestRam, PAGE_SIZE};
use layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Boot errors. Each names the file or value at fault.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Neither a PVH ELF nor a bzImage.
    #[error("{path} is neither an ELF kernel with a PVH entry note nor a Linux bzImage")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// An ELF without the PVH note.
    #[error(
        "{path} is an ELF file without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); consnap boots ELF kernels only through PVH"
    )]
    NoPvhNote {
        /// The file.
        path: PathBuf,
    },
    /// The loader rejected the image.
    #[error("cannot load kernel {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What linux-loader said.
        reason: String,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM above the kernel; raise --mem")]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is too long or contains NUL.
    #[error("kernel command line is {len} bytes; the limit is {max} and it may not contain NUL")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing into guest memory failed (RAM too small for the layout).
    #[error("guest RAM too small for the boot layout: cannot write {what} at {addr:#x}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
    },
}

/// Where the kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// An image held in memory (an embedded kernel), with a name for messages.
    Bytes {
        /// Name used in errors.
        name: String,
        /// The ELF image.
        image: &'static [u8],
    },
    /// A file on the host.
    File(PathBuf),
}

/// Everything needed to boot.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// Kernel image.
    pub kernel: KernelSource,
    /// Optional initrd file.
    pub initrd: Option<PathBuf>,
    /// Command line.
    pub cmdline: String,
    /// Number of vCPUs (for the MP table).
    pub vcpus: u8,
}

/// How the boot CPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode at `entry`, EBX = `start_info`.
    Pvh {
        /// Entry address.
        entry: u64,
        /// hvm_start_info address.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode at `entry`, RSI = `boot_params`.
    Linux64 {
        /// startup_64 address.
        entry: u64,
        /// boot_params address.
        boot_params: u64,
    },
}

/// Load the kernel, initrd, command line and boot tables into `ram`.
pub fn load(ram: &GuestRam, cfg: &BootConfig) -> Result<Entry, BootError> {
    match &cfg.kernel {
        KernelSource::Bytes { name, image } => load_image(ram, cfg, PathBuf::from(name), &mut Cursor::new(*image)),
        KernelSource::File(p) => {
            let mut f = File::open(p).map_err(|source| BootError::KernelRead {
                path: p.clone(),
                source,
            })?;
            load_image(ram, cfg, p.clone(), &mut f)
        }
    }
}

fn load_image<F: Read + Seek + ReadVolatile>(
    ram: &GuestRam,
    cfg: &BootConfig,
    path: PathBuf,
    image: &mut F,
) -> Result<Entry, BootError> {
    let mut head = [0u8; 0x210];
    let n = read_head(image, &mut head).map_err(|source| BootError::KernelRead {
        path: path.clone(),
        source,
    })?;
    let mem = ram.memory();
    let load_err = |e: linux_loader::loader::Error| BootError::Load {
        path: path.clone(),
        reason: e.to_string(),
    };
    let cmdline_len = write_cmdline(ram, &cfg.cmdline)?;
    write(ram, EBDA_START, &mptable::build(cfg.vcpus), "MP table")?;
    for (addr, bytes) in acpi::build(cfg.vcpus) {
        write(ram, addr, &bytes, "ACPI tables")?;
    }

    if n >= 4 && head[..4] == *b"\x7fELF" {
        // No high-memory check: an ELF without the note must reach the NoPvhNote error below.
        let res = Elf::load(mem, None, image, None).map_err(load_err)?;
        let entry = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => a.0,
            _ => return Err(BootError::NoPvhNote { path }),
        };
        let initrd = load_initrd(ram, cfg.initrd.as_deref(), res.kernel_end, u64::MAX)?;
        write_pvh_info(ram, initrd)?;
        Ok(Entry::Pvh {
            entry,
            start_info: PVH_INFO_ADDR,
        })
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        let res = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        let Some(hdr) = res.setup_header else {
            return Err(BootError::NotAKernel { path });
        };
        let max = if hdr.initrd_addr_max == 0 {
            0x37ff_ffff
        } else {
            u64::from(hdr.initrd_addr_max)
        };
        let initrd = load_initrd(ram, cfg.initrd.as_deref(), res.kernel_end, max)?;
        let mut params = boot_params {
            hdr,
            ..Default::default()
        };
        params.hdr.type_of_loader = 0xff;
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448;
        params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
        params.hdr.cmdline_size = cmdline_len as u32;
        params.hdr.kernel_alignment = 0x0100_0000;
        params.acpi_rsdp_addr = acpi::RSDP_ADDR;
        if let Some((addr, size)) = initrd {
            params.hdr.ramdisk_image = addr as u32;
            params.hdr.ramdisk_size = size as u32;
        }
        let e820 = e820_map(ram);
        for (i, (addr, size, kind)) in e820.iter().enumerate().take(params.e820_table.len()) {
            params.e820_table[i] = boot_e820_entry {
                addr: *addr,
                size: *size,
                r#type: *kind,
            };
        }
        params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
        LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)), mem).map_err(
            |_| BootError::GuestWrite {
                what: "boot_params",
                addr: ZERO_PAGE_ADDR,
            },
        )?;
        regs::write_identity_page_tables(ram)?;
        Ok(Entry::Linux64 {
            entry: res.kernel_load.0 + 0x200,
            boot_params: ZERO_PAGE_ADDR,
        })
    } else {
        Err(BootError::NotAKernel { path })
    }
}

fn read_head<F: Read + Seek>(image: &mut F, head: &mut [u8]) -> std::io::Result<usize> {
    image.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        match image.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    image.seek(SeekFrom::Start(0))?;
    Ok(n)
}

pub(crate) fn write(ram: &GuestRam, addr: u64, bytes: &[u8], what: &'static str) -> Result<(), BootError> {
    ram.memory()
        .write_slice(bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite { what, addr })
}

fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<usize, BootError> {
    let len = cmdline.len();
    if len >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline {
            len,
            max: CMDLINE_MAX - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    write(ram, CMDLINE_ADDR, &bytes, "command line")?;
    Ok(len)
}

/// The memory map: RAM below the EBDA, a reserved BIOS area, then RAM.
pub fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in ram.ranges() {
        let start = r.gpa.max(HIMEM_START);
        if r.end() > start {
            map.push((start, r.end() - start, E820_RAM));
        }
    }
    map
}

fn load_initrd(
    ram: &GuestRam,
    path: Option<&Path>,
    kernel_end: u64,
    max_addr: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(path) = path else { return Ok(None) };
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let low_end = ram.ranges()[0].end().min(max_addr.saturating_add(1));
    let addr = low_end.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let Some(addr) = addr.filter(|a| *a >= kernel_end.max(HIMEM_START)) else {
        return Err(BootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
        });
    };
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(Some((addr, size)))
}

fn write_pvh_info(ram: &GuestRam, initrd: Option<(u64, u64)>) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(ram)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        rsdp_paddr: acpi::RSDP_ADDR,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { PVH_MODLIST_ADDR } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, ram.memory()).map_err(|_| BootError::GuestWrite {
        what: "PVH start_info",
        addr: PVH_INFO_ADDR,
    })
}
