//! The on-disk layout, version 4 (docs/FORMAT.md is the normative text).
//! Version 4 makes the page checksums verifiable a block at a time (a
//! table of block checksums ends PAGE_SUMS) and allows 0 regions; version
//! 3 added regions besides guest RAM (disks) to version 2; versions 1 to 3
//! are still read.
//!
//! Every integer is little-endian. Every file starts with a magic, a format
//! version and ends its header with an XXH3-64 checksum.

use crate::codec::Codec;
use crate::error::{Result, StoreError};
use std::path::Path;

/// Epoch format version this build writes (and the newest it reads).
pub const VERSION: u32 = 4;
/// Page checksums per PAGE_SUMS block (version 4): 4096 bytes of
/// checksums, covering 2 MiB of data pages, verified by one entry of the
/// block table.
pub const SUMS_PER_BLOCK: u64 = 512;

/// Bytes of the block table that ends a version 4 PAGE_SUMS section for
/// `pages` data pages: one checksum per block of [`SUMS_PER_BLOCK`].
pub fn sum_table_len(pages: u64) -> u64 {
    pages.div_ceil(SUMS_PER_BLOCK) * 8
}
/// Version of the STORE file this build writes (its layout never changed).
pub const STORE_VERSION: u32 = 2;
/// Bits of a unit address that number the unit inside its region; the
/// bits above number the region (0 is guest RAM, whose units are frames).
pub const REGION_SHIFT: u32 = 48;
/// Most regions besides RAM an epoch describes.
pub const MAX_REGIONS: usize = 64;
/// Largest region (a disk image), bytes: 2^48 units of a page.
pub const MAX_REGION_BYTES: u64 = 1 << (REGION_SHIFT + 12);
/// Region kinds.
pub mod region_kind {
    /// A disk image (virtio-blk).
    pub const DISK: u32 = 1;
}

/// The unit address of unit `unit` of region `region` (1-based; 0 is RAM).
pub fn unit_addr(region: usize, unit: u64) -> u64 {
    ((region as u64) << REGION_SHIFT) | unit
}

/// The region a unit address belongs to (0: guest RAM).
pub fn region_of(addr: u64) -> usize {
    (addr >> REGION_SHIFT) as usize
}

/// A region besides guest RAM that an epoch holds (version 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    /// [`region_kind`].
    pub kind: u32,
    /// The guest could not write it.
    pub readonly: bool,
    /// Its size in bytes; its units are the pages that hold them (the last
    /// one's bytes beyond the size are zero).
    pub bytes: u64,
}

impl RegionDesc {
    /// Units (pages) of the region.
    pub fn units(&self) -> u64 {
        self.bytes.div_ceil(PAGE as u64)
    }
}
/// The oldest format version this build reads.
pub const OLDEST_VERSION: u32 = 1;
/// Size of one FRAMES entry.
pub const FRAME_SIZE: usize = 24;
/// Most pages in one compressed frame (64 KiB of page data).
pub const FRAME_PAGES: u32 = 16;
/// Largest gap of zero bytes allowed between two sections (the padding
/// that aligns DATA).
pub const MAX_GAP: u64 = PAGE as u64 - 1;
/// Guest page size.
pub const PAGE: usize = 4096;
/// Epoch header size (one page, so the data section can be page aligned).
pub const HEADER_SIZE: usize = 4096;
/// Magic of epoch files.
pub const EPOCH_MAGIC: [u8; 8] = *b"CSNPEPOC";
/// Magic of the STORE file.
pub const STORE_MAGIC: [u8; 8] = *b"CSNPSTOR";
/// Size of the STORE file.
pub const STORE_SIZE: usize = 64;
/// Size of one index entry.
pub const EXTENT_SIZE: usize = 24;
/// Largest guest RAM an epoch may describe (1 TiB).
pub const MAX_RAM: u64 = 1 << 40;
/// Largest vCPU count an epoch may describe (the CONFIG record stores it in a byte).
pub const MAX_VCPUS: u32 = 255;
/// Guest-physical start of the x86 MMIO hole: RAM beyond this size continues at [`RAM_HIGH_START`].
pub const RAM_LOW_END: u64 = 0xC000_0000;
/// Guest-physical address where RAM above the MMIO hole starts.
pub const RAM_HIGH_START: u64 = 0x1_0000_0000;

/// The guest frame ranges `[start, end)` that `mem_size` bytes of guest RAM
/// occupy: up to 3 GiB from frame 0, the rest from 4 GiB.
pub fn ram_frames(mem_size: u64) -> Vec<(u64, u64)> {
    let page = PAGE as u64;
    let low = mem_size.min(RAM_LOW_END);
    let mut v = vec![(0, low / page)];
    if mem_size > low {
        let start = RAM_HIGH_START / page;
        v.push((start, start + (mem_size - low) / page));
    }
    v
}

/// Regions as text for messages: `no disks`, `1 disk of 67108864 bytes`.
pub fn describe_regions(regions: &[RegionDesc]) -> String {
    match regions {
        [] => "no disks".into(),
        [r] => format!("1 disk of {} bytes", r.bytes),
        rs => format!(
            "{} disks of {} bytes",
            rs.len(),
            rs.iter().map(|r| r.bytes.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The region table of a version 3 or 4 header (version 3 has at least
/// one region: without, an epoch was written as version 2).
fn decode_regions(b: &[u8], version: u32) -> std::result::Result<Vec<RegionDesc>, String> {
    let n = le32(b, REGIONS_AT) as usize;
    let least = if version == 3 { 1 } else { 0 };
    if n < least || n > MAX_REGIONS {
        return Err(format!(
            "the header lists {n} regions (version {version} epochs have {least} to {MAX_REGIONS})"
        ));
    }
    (0..n)
        .map(|i| {
            let at = REGIONS_AT + 16 + i * REGION_SIZE;
            let (kind, flags, bytes) = (le32(b, at), le32(b, at + 4), le64(b, at + 8));
            if kind != region_kind::DISK {
                return Err(format!("region {} has unknown kind {kind} (known: 1 disk)", i + 1));
            }
            if flags & !REGION_READONLY != 0 {
                return Err(format!("region {} has unknown flags {flags:#x}", i + 1));
            }
            if bytes == 0 || bytes > MAX_REGION_BYTES {
                return Err(format!("region {} has {bytes} bytes (1 to 2^60)", i + 1));
            }
            Ok(RegionDesc {
                kind,
                readonly: flags & REGION_READONLY != 0,
                bytes,
            })
        })
        .collect()
}

/// `ram_frames` as text for messages: `frames 0..2048` or `frames 0..786432 and 1048576..1310720`.
pub fn describe_frames(mem_size: u64) -> String {
    let parts: Vec<String> = ram_frames(mem_size).iter().map(|(a, b)| format!("{a}..{b}")).collect();
    format!("frames {}", parts.join(" and "))
}

/// XXH3-64, the checksum of every header, section and page.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// How an epoch was captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Paused while all memory was written.
    StopCopyFull,
    /// Paused while the dirty pages were copied; written after resuming.
    StopCopy,
    /// Paused only to capture state and write-protect the dirty pages, which
    /// were saved copy-on-write while the VM ran.
    Cow,
}

impl Mode {
    /// Code in the header.
    pub fn code(self) -> u32 {
        match self {
            Mode::StopCopyFull => 1,
            Mode::StopCopy => 2,
            Mode::Cow => 3,
        }
    }

    /// From a header code.
    pub fn from_code(c: u32) -> Option<Mode> {
        match c {
            1 => Some(Mode::StopCopyFull),
            2 => Some(Mode::StopCopy),
            3 => Some(Mode::Cow),
            _ => None,
        }
    }

    /// Name on the command line and in listings.
    pub fn name(self) -> &'static str {
        match self {
            Mode::StopCopyFull => "stop-copy-full",
            Mode::StopCopy => "stop-copy",
            Mode::Cow => "cow",
        }
    }
}

/// Section kinds in the header's section table.
pub mod section {
    /// Encoded machine state.
    pub const STATE: u32 = 1;
    /// Page index (extents).
    pub const INDEX: u32 = 2;
    /// One XXH3-64 per data page.
    pub const PAGE_SUMS: u32 = 3;
    /// Page data, 4096-aligned.
    pub const DATA: u32 = 4;
    /// Compressed frames of DATA (version 2).
    pub const FRAMES: u32 = 5;
}

/// A section table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Section {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// XXH3-64 of the section (0 for DATA, covered by PAGE_SUMS and FRAMES;
    /// for PAGE_SUMS in version 4, of its block table only).
    pub sum: u64,
}

impl Section {
    /// The first byte after the section.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A compressed frame: consecutive DATA pages stored as one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Offset of its bytes inside DATA.
    pub offset: u64,
    /// Stored bytes; `pages * 4096` means stored uncompressed.
    pub len: u32,
    /// Pages it holds, 1 to [`FRAME_PAGES`].
    pub pages: u32,
    /// XXH3-64 of the stored bytes.
    pub sum: u64,
}

impl Frame {
    /// Serialize to 24 bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&self.sum.to_le_bytes());
    }

    /// Parse 24 bytes.
    pub fn decode(b: &[u8]) -> Frame {
        Frame {
            offset: le64(b, 0),
            len: le32(b, 8),
            pages: le32(b, 12),
            sum: le64(b, 16),
        }
    }

    /// True when the frame holds its pages uncompressed.
    pub fn is_raw(&self) -> bool {
        u64::from(self.len) == u64::from(self.pages) * PAGE as u64
    }
}

/// Flags in the epoch header.
pub mod flags {
    /// The index covers every page of guest RAM (a chain may end here).
    pub const FULL: u32 = 1;
    /// Every flag this version defines; a reader refuses any other bit.
    pub const KNOWN: u32 = FULL;
}

/// Kind of an index extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Pages stored in DATA starting at `data_page`.
    Data,
    /// Pages that are all zero; nothing stored.
    Zero,
}

/// A run of guest pages in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest frame number (guest-physical address / 4096).
    pub gfn: u64,
    /// Number of pages.
    pub count: u32,
    /// Data or zero.
    pub kind: ExtentKind,
    /// For data extents: index of the first page in DATA.
    pub data_page: u64,
}

impl Extent {
    /// Serialize to 24 bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.gfn.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&(if self.kind == ExtentKind::Data { 0u32 } else { 1u32 }).to_le_bytes());
        out.extend_from_slice(&self.data_page.to_le_bytes());
    }

    /// Parse 24 bytes.
    pub fn decode(b: &[u8]) -> Option<Extent> {
        let kind = match le32(b, 12) {
            0 => ExtentKind::Data,
            1 => ExtentKind::Zero,
            _ => return None,
        };
        Some(Extent {
            gfn: le64(b, 0),
            count: le32(b, 8),
            kind,
            data_page: le64(b, 16),
        })
    }
}

/// The epoch file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version of the file (1 to 4).
    pub version: u32,
    /// Epoch id (unique in the store, increasing).
    pub id: u64,
    /// Parent epoch id, 0 for none.
    pub parent: u64,
    /// Store this epoch belongs to.
    pub store_uuid: [u8; 16],
    /// When the VM was paused for it (Unix ns).
    pub created_ns: u64,
    /// Capture mode.
    pub mode: Mode,
    /// [`flags`].
    pub flags: u32,
    /// vCPU count of the VM.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem_size: u64,
    /// The machine's progress counter at capture (u64::MAX if none).
    pub progress: u64,
    /// Pages stored with data.
    pub pages_data: u64,
    /// Pages recorded as zero.
    pub pages_zero: u64,
    /// Index entries.
    pub extents: u64,
    /// How long the VM was paused for this epoch (ns).
    pub pause_ns: u64,
    /// How DATA is stored (version 2; version 1 is always uncompressed).
    pub codec: Codec,
    /// FRAMES entries (0 without compression).
    pub frames: u64,
    /// Epochs merged into this one by reclamation, in all.
    pub merged: u64,
    /// STATE, INDEX, PAGE_SUMS, DATA, FRAMES.
    pub sections: [Section; 5],
    /// Regions besides guest RAM (version 3), in region order from 1.
    pub regions: Vec<RegionDesc>,
    /// Of the data pages, those of the regions (version 3; 0 otherwise).
    pub region_pages_data: u64,
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

const SECTIONS_AT: usize = 128;
/// Section names in table order.
pub const SECTION_NAMES: [&str; 5] = ["STATE", "INDEX", "PAGE_SUMS", "DATA", "FRAMES"];
const KINDS: [u32; 5] = [
    section::STATE,
    section::INDEX,
    section::PAGE_SUMS,
    section::DATA,
    section::FRAMES,
];
const CODEC_AT: usize = 120;
const FRAMES_AT: usize = 288;
const MERGED_AT: usize = 296;
const REGIONS_AT: usize = 304;
const REGION_SIZE: usize = 24;
const REGION_READONLY: u32 = 1;
const SUM_AT: usize = HEADER_SIZE - 8;

impl Header {
    /// True when this epoch's index covers all of RAM.
    pub fn is_full(&self) -> bool {
        self.flags & flags::FULL != 0
    }

    /// Why `parent` cannot be this epoch's parent in a chain, if it cannot:
    /// a chain describes one machine.
    pub fn parent_mismatch(&self, parent: &Header) -> Option<String> {
        if parent.mem_size != self.mem_size || parent.vcpus != self.vcpus {
            return Some(format!(
                "epoch {} has {} bytes of RAM and {} vCPUs but its parent epoch {} has {} bytes and {}: a chain describes one machine",
                self.id, self.mem_size, self.vcpus, parent.id, parent.mem_size, parent.vcpus
            ));
        }
        if parent.regions != self.regions {
            return Some(format!(
                "epoch {} has {} but its parent epoch {} has {}: a chain describes one machine",
                self.id,
                describe_regions(&self.regions),
                parent.id,
                describe_regions(&parent.regions)
            ));
        }
        None
    }

    /// The unit address ranges `[start, end)` this epoch's index may list:
    /// guest RAM's frames, then each region's units.
    pub fn unit_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = ram_frames(self.mem_size);
        for (i, r) in self.regions.iter().enumerate() {
            v.push((unit_addr(i + 1, 0), unit_addr(i + 1, r.units())));
        }
        v
    }

    /// Units of RAM and every region: what a FULL epoch lists.
    pub fn units(&self) -> u64 {
        self.mem_size / PAGE as u64 + self.regions.iter().map(RegionDesc::units).sum::<u64>()
    }

    /// Where the page checksums and, in version 4, the block table that
    /// verifies them lie: `(sums_at, table_at, table_len)`. Before version
    /// 4 the table is empty and the section checksum covers the sums.
    pub fn sum_layout(&self) -> (u64, u64, u64) {
        let s = self.sections[2];
        let table = if self.version >= 4 {
            sum_table_len(self.pages_data)
        } else {
            0
        };
        (s.offset, s.end().saturating_sub(table), table)
    }

    /// Section table entries this version has (4 in version 1, 5 in 2).
    fn table_len(version: u32) -> usize {
        if version >= 2 { 5 } else { 4 }
    }

    /// Serialize to [`HEADER_SIZE`] bytes with the checksum filled in, in
    /// the header's version (version 1 only without compression).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, &EPOCH_MAGIC);
        put(8, &self.version.to_le_bytes());
        put(12, &(HEADER_SIZE as u32).to_le_bytes());
        put(16, &self.id.to_le_bytes());
        put(24, &self.parent.to_le_bytes());
        put(32, &self.store_uuid);
        put(48, &self.created_ns.to_le_bytes());
        put(56, &self.mode.code().to_le_bytes());
        put(60, &self.flags.to_le_bytes());
        put(64, &(PAGE as u32).to_le_bytes());
        put(68, &self.vcpus.to_le_bytes());
        put(72, &self.mem_size.to_le_bytes());
        put(80, &self.progress.to_le_bytes());
        put(88, &self.pages_data.to_le_bytes());
        put(96, &self.pages_zero.to_le_bytes());
        put(104, &self.extents.to_le_bytes());
        put(112, &self.pause_ns.to_le_bytes());
        let n = Self::table_len(self.version);
        for (i, (s, kind)) in self.sections.iter().zip(KINDS).take(n).enumerate() {
            let at = SECTIONS_AT + i * 32;
            put(at, &kind.to_le_bytes());
            put(at + 8, &s.offset.to_le_bytes());
            put(at + 16, &s.len.to_le_bytes());
            put(at + 24, &s.sum.to_le_bytes());
        }
        if self.version >= 2 {
            put(CODEC_AT, &self.codec.code().to_le_bytes());
            put(FRAMES_AT, &self.frames.to_le_bytes());
            put(MERGED_AT, &self.merged.to_le_bytes());
        }
        if self.version >= 3 {
            put(REGIONS_AT, &(self.regions.len() as u32).to_le_bytes());
            put(REGIONS_AT + 8, &self.region_pages_data.to_le_bytes());
            for (i, r) in self.regions.iter().enumerate() {
                let at = REGIONS_AT + 16 + i * REGION_SIZE;
                put(at, &r.kind.to_le_bytes());
                put(at + 4, &(if r.readonly { REGION_READONLY } else { 0 }).to_le_bytes());
                put(at + 8, &r.bytes.to_le_bytes());
            }
        }
        let sum = checksum(&b[..SUM_AT]);
        b[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parse and verify a header read from `path`.
    pub fn decode(b: &[u8], path: &Path) -> Result<Header> {
        let corrupt = |why: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        if b.len() < HEADER_SIZE {
            return Err(corrupt(format!(
                "truncated header ({} of {HEADER_SIZE} bytes)",
                b.len()
            )));
        }
        if b[..8] != EPOCH_MAGIC {
            return Err(corrupt("not a consnap epoch file (bad magic)".into()));
        }
        let version = le32(b, 8);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(StoreError::Version {
                path: path.to_path_buf(),
                found: version,
                supported: VERSION,
            });
        }
        if checksum(&b[..SUM_AT]) != le64(b, SUM_AT) {
            return Err(corrupt("header checksum mismatch (bytes 0..4096)".into()));
        }
        let header_size = le32(b, 12);
        if header_size as usize != HEADER_SIZE {
            return Err(corrupt(format!("header size is {header_size}, not {HEADER_SIZE}")));
        }
        let page_size = le32(b, 64);
        if page_size as usize != PAGE {
            return Err(corrupt(format!("page size is {page_size}, not {PAGE}")));
        }
        let id = le64(b, 16);
        if id == 0 {
            return Err(corrupt("epoch id is 0 (epoch ids start at 1)".into()));
        }
        let code = le32(b, 56);
        let mode = Mode::from_code(code).ok_or_else(|| {
            corrupt(format!(
                "epoch {id} has unknown mode {code} (known: 1 stop-copy-full, 2 stop-copy, 3 cow)"
            ))
        })?;
        let flags = le32(b, 60);
        if flags & !flags::KNOWN != 0 {
            return Err(corrupt(format!(
                "epoch {id} has unknown flags {:#x} (only bit 0, FULL, is defined)",
                flags & !flags::KNOWN
            )));
        }
        let full = flags & flags::FULL != 0;
        let parent = le64(b, 24);
        if full && parent != 0 {
            return Err(corrupt(format!(
                "epoch {id} has the FULL flag and parent {parent}: a FULL epoch has parent 0"
            )));
        }
        if !full && parent == 0 {
            return Err(corrupt(format!(
                "epoch {id} is incremental (FULL flag clear) but has no parent"
            )));
        }
        if !full && parent >= id {
            return Err(corrupt(format!(
                "epoch {id} has parent {parent}: a parent's id must be smaller"
            )));
        }
        let vcpus = le32(b, 68);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(corrupt(format!(
                "epoch {id} has vCPU count {vcpus} (must be 1 to {MAX_VCPUS})"
            )));
        }
        let mem_size = le64(b, 72);
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE as u64) || mem_size > MAX_RAM {
            return Err(corrupt(format!(
                "epoch {id} has guest RAM size {mem_size} bytes (must be a non-zero multiple of {PAGE} up to 1 TiB)"
            )));
        }
        let regions = if version >= 3 {
            decode_regions(b, version).map_err(|why| corrupt(format!("epoch {id}: {why}")))?
        } else {
            Vec::new()
        };
        let region_pages_data = if version >= 3 { le64(b, REGIONS_AT + 8) } else { 0 };
        let (pages_data, pages_zero) = (le64(b, 88), le64(b, 96));
        let ram_pages = mem_size / PAGE as u64;
        let all = ram_pages + regions.iter().map(RegionDesc::units).sum::<u64>();
        let of = if regions.is_empty() {
            "its guest RAM".to_string()
        } else {
            format!("its guest RAM and {}", describe_regions(&regions))
        };
        let listed = pages_data.checked_add(pages_zero);
        if listed.is_none_or(|n| n > all) {
            return Err(corrupt(format!(
                "epoch {id} lists {pages_data} data and {pages_zero} zero pages, more than the {all} pages of {of}"
            )));
        }
        if full && listed != Some(all) {
            return Err(corrupt(format!(
                "FULL epoch {id} lists {pages_data} data and {pages_zero} zero pages, but {of} has {all} pages"
            )));
        }
        let extents = le64(b, 104);
        if listed.is_some_and(|n| extents > n) {
            return Err(corrupt(format!(
                "epoch {id} has {extents} index extents for {pages_data} data and {pages_zero} zero pages (extents are never empty)"
            )));
        }
        let (codec, frames, merged) = if version >= 2 {
            let c = le32(b, CODEC_AT);
            let codec = Codec::from_code(c).ok_or_else(|| {
                corrupt(format!(
                    "epoch {id} has unknown compression {c} (known: 0 none, 1 zstd, 2 lz4)"
                ))
            })?;
            (codec, le64(b, FRAMES_AT), le64(b, MERGED_AT))
        } else {
            (Codec::None, 0, 0)
        };
        if region_pages_data > pages_data {
            return Err(corrupt(format!(
                "epoch {id} says {region_pages_data} of its {pages_data} data pages are disk blocks"
            )));
        }
        if codec == Codec::None && frames != 0 {
            return Err(corrupt(format!("epoch {id} is not compressed but has {frames} frames")));
        }
        if codec != Codec::None && (frames > pages_data || (pages_data > 0 && frames == 0)) {
            return Err(corrupt(format!(
                "epoch {id} has {frames} compressed frames for {pages_data} data pages (frames are never empty)"
            )));
        }
        let mut store_uuid = [0u8; 16];
        store_uuid.copy_from_slice(&b[32..48]);
        let mut sections = [Section::default(); 5];
        for (i, kind) in KINDS.into_iter().take(Self::table_len(version)).enumerate() {
            let at = SECTIONS_AT + i * 32;
            if le32(b, at) != kind {
                return Err(corrupt(format!(
                    "section table entry {i} has kind {} (expected {kind}: {})",
                    le32(b, at),
                    SECTION_NAMES[i]
                )));
            }
            sections[i] = Section {
                offset: le64(b, at + 8),
                len: le64(b, at + 16),
                sum: le64(b, at + 24),
            };
        }
        if version < 2 {
            // Version 1 has no FRAMES section: an empty one right after
            // PAGE_SUMS, with the checksum of nothing.
            sections[4].offset = sections[2].end();
            sections[4].len = 0;
            sections[4].sum = checksum(&[]);
        }
        if sections[3].sum != 0 {
            return Err(corrupt(format!(
                "the DATA section entry has checksum {:#x} (must be 0: PAGE_SUMS covers the pages)",
                sections[3].sum
            )));
        }
        Ok(Header {
            version,
            id,
            parent,
            store_uuid,
            created_ns: le64(b, 48),
            mode,
            flags,
            vcpus,
            mem_size,
            progress: le64(b, 80),
            pages_data,
            pages_zero,
            extents,
            pause_ns: le64(b, 112),
            codec,
            frames,
            merged,
            sections,
            regions,
            region_pages_data,
        })
    }

    /// Check the section table against the counts and the file length:
    /// lengths match the counts, DATA is page aligned, every section lies
    /// after the header and inside the file, no two overlap, the gaps
    /// between them are shorter than a page, and the file ends where the
    /// last section ends. (That the gaps hold zeros is checked by the reader.)
    pub fn check_layout(&self, file_len: u64, path: &Path) -> Result<()> {
        let corrupt = |why: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let [state, index, sums, data, frames] = self.sections;
        let data_per_page = if self.codec == Codec::None { PAGE as u64 } else { 0 };
        // Per section: its length, the header's count it follows, and the
        // bytes per counted item (and fixed bytes besides).
        let table = if self.version >= 4 {
            sum_table_len(self.pages_data)
        } else {
            0
        };
        let mut expect = vec![
            ("INDEX", index.len, self.extents, EXTENT_SIZE as u64, 0, "index extents"),
            ("PAGE_SUMS", sums.len, self.pages_data, 8, table, "data pages"),
            ("FRAMES", frames.len, self.frames, FRAME_SIZE as u64, 0, "frames"),
        ];
        if data_per_page != 0 {
            expect.push(("DATA", data.len, self.pages_data, PAGE as u64, 0, "data pages"));
        }
        for (name, got, count, each, more, what) in expect {
            match count.checked_mul(each).and_then(|n| n.checked_add(more)) {
                Some(want) if want == got => {}
                Some(want) => {
                    return Err(corrupt(format!(
                        "{name} section is {got} bytes, but the header's {count} {what} need {want}"
                    )));
                }
                None => {
                    return Err(corrupt(format!(
                        "{name} section would need more than 2^64 bytes for the header's {count} {what}"
                    )));
                }
            }
        }
        if data_per_page == 0 && (data.len < self.frames || data.len / PAGE as u64 > self.pages_data) {
            return Err(corrupt(format!(
                "compressed DATA section is {} bytes for {} frames of {} pages",
                data.len, self.frames, self.pages_data
            )));
        }
        if !data.offset.is_multiple_of(PAGE as u64) {
            return Err(corrupt(format!(
                "DATA section starts at {}, which is not a multiple of {PAGE}",
                data.offset
            )));
        }
        let named = [
            ("STATE", state),
            ("INDEX", index),
            ("PAGE_SUMS", sums),
            ("DATA", data),
            ("FRAMES", frames),
        ];
        for (name, s) in named {
            let end = s.offset.checked_add(s.len);
            if s.offset < HEADER_SIZE as u64 {
                return Err(corrupt(format!(
                    "{name} section [{}, +{}) starts inside the {HEADER_SIZE}-byte header",
                    s.offset, s.len
                )));
            }
            if end.is_none_or(|e| e > file_len) {
                return Err(corrupt(format!(
                    "{name} section [{}, +{}) lies outside the file ({file_len} bytes): truncated?",
                    s.offset, s.len
                )));
            }
        }
        let mut placed: Vec<(&str, Section)> = named.into_iter().filter(|(_, s)| s.len > 0).collect();
        placed.sort_by_key(|(_, s)| s.offset);
        for w in placed.windows(2) {
            let ((a, sa), (b, sb)) = (w[0], w[1]);
            if sa.end() > sb.offset {
                return Err(corrupt(format!(
                    "{a} section [{}, +{}) overlaps {b} section [{}, +{})",
                    sa.offset, sa.len, sb.offset, sb.len
                )));
            }
        }
        for (at, to) in self.gaps(file_len) {
            if to - at > MAX_GAP {
                return Err(corrupt(format!(
                    "bytes [{at}, {to}) belong to no section (gaps between sections are shorter than {PAGE} bytes)"
                )));
            }
        }
        // Empty sections count too: a file without pages ends at its
        // (empty) DATA, after the padding that follows the state.
        let end = self
            .sections
            .iter()
            .map(Section::end)
            .max()
            .unwrap_or(0)
            .max(HEADER_SIZE as u64);
        if file_len != end {
            return Err(corrupt(format!(
                "the file is {file_len} bytes but its last section ends at {end}: bytes after it belong to no section"
            )));
        }
        Ok(())
    }

    /// The byte ranges of the file that belong to no section: padding, which
    /// must hold zeros. Only meaningful after [`Header::check_layout`].
    pub fn gaps(&self, file_len: u64) -> Vec<(u64, u64)> {
        let mut placed: Vec<Section> = self.sections.to_vec();
        placed.sort_by_key(|s| s.offset);
        let mut gaps = Vec::new();
        let mut at = HEADER_SIZE as u64;
        for s in placed {
            if s.offset > at {
                gaps.push((at, s.offset));
            }
            at = at.max(s.end());
        }
        if file_len > at {
            gaps.push((at, file_len));
        }
        gaps
    }
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
