//! Reading and verifying one epoch file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::codec::{Codec, Decompressor};
use crate::error::{Result, StoreError, io};
use crate::format::{
    EXTENT_SIZE, Extent, ExtentKind, FRAME_PAGES, FRAME_SIZE, Frame, HEADER_SIZE, Header, PAGE, checksum,
    describe_frames, le32, le64,
};
use crate::sums::PageSums;

/// Bytes of an epoch that is not a local file, read by ranges: an object
/// in an object store, fetched with ranged requests as pages are needed.
pub trait RangeRead: Send + Sync {
    /// Fill `buf` with the bytes at `at`, or fail (a short object is an
    /// error).
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()>;
}

/// Where an epoch's bytes are read from.
enum Backing {
    File(File),
    Ranged(Arc<dyn RangeRead>),
}

impl Backing {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        match self {
            Backing::File(f) => f.read_exact_at(buf, at),
            Backing::Ranged(r) => r.read_exact_at(buf, at),
        }
    }
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::File(file) => file.fmt(f),
            Backing::Ranged(_) => f.write_str("ranged reads"),
        }
    }
}

/// An opened, verified epoch: header, index, page checksums and frame
/// table in memory.
#[derive(Debug)]
pub struct EpochReader {
    path: PathBuf,
    file: Backing,
    header: Header,
    index: Vec<Extent>,
    /// The page checksums (8 bytes per data page, little endian), decoded
    /// on use; from version 4 read a block at a time when first needed.
    sums: PageSums,
    frames: Vec<Frame>,
    /// First data page of each frame.
    frame_first: Vec<u64>,
    file_len: u64,
}

fn read_at(file: &Backing, path: &Path, len: u64, at: u64) -> Result<Vec<u8>> {
    // The length comes from the file: a sparse file may claim more than this
    // host can allocate, which must be an error, not an abort.
    let mut buf = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|n| buf.try_reserve_exact(n).ok())
        .ok_or_else(|| StoreError::Corrupt {
            path: path.to_path_buf(),
            why: format!("a section of {len} bytes does not fit in memory"),
        })?;
    buf.resize(len as usize, 0);
    file.read_exact_at(&mut buf, at).map_err(io(path, "read"))?;
    Ok(buf)
}

/// Read the byte ranges `(offset, len)` of `file`: in one read when they
/// lie end to end in some order, as consnap writes them (each cold read
/// is a round trip to the disk or the object store, and a lazy restore
/// opens every epoch of its chain before the guest's first instruction).
fn read_ranges<const N: usize>(file: &Backing, path: &Path, ranges: [(u64, u64); N]) -> Result<[Vec<u8>; N]> {
    let mut order: Vec<usize> = (0..N).filter(|&i| ranges[i].1 > 0).collect();
    order.sort_by_key(|&i| ranges[i].0);
    let end = |i: usize| ranges[i].0.saturating_add(ranges[i].1);
    let joined = order.windows(2).all(|w| end(w[0]) == ranges[w[1]].0);
    let mut out: [Vec<u8>; N] = std::array::from_fn(|_| Vec::new());
    match (joined, order.first(), order.last()) {
        (true, Some(&a), Some(&z)) if order.len() > 1 => {
            let all = read_at(file, path, end(z) - ranges[a].0, ranges[a].0)?;
            for &i in &order {
                let from = (ranges[i].0 - ranges[a].0) as usize;
                out[i] = all[from..from + ranges[i].1 as usize].to_vec();
            }
        }
        _ => {
            for &i in &order {
                out[i] = read_at(file, path, ranges[i].1, ranges[i].0)?;
            }
        }
    }
    Ok(out)
}

/// Open `path` for reading if it is a regular file (a FIFO planted under
/// the name would block the reader forever).
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io(path, "open"))?;
    if !file.metadata().map_err(io(path, "stat"))?.is_file() {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            why: "not a regular file".into(),
        });
    }
    Ok(file)
}

/// Read and verify only the header of `path` (for listings).
pub fn read_header(path: &Path) -> Result<(Header, u64)> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(io(path, "stat"))?.len();
    header_in(&Backing::File(file), path, len)
}

fn header_in(file: &Backing, path: &Path, len: u64) -> Result<(Header, u64)> {
    let mut b = vec![0u8; HEADER_SIZE.min(len as usize)];
    file.read_exact_at(&mut b, 0).map_err(io(path, "read header"))?;
    let h = Header::decode(&b, path)?;
    h.check_layout(len, path)?;
    Ok((h, len))
}

/// Check that the padding between sections holds zeros.
fn check_gaps(file: &Backing, path: &Path, h: &Header, file_len: u64) -> Result<()> {
    for (at, to) in h.gaps(file_len) {
        let b = read_at(file, path, to - at, at)?;
        if let Some(i) = b.iter().position(|&x| x != 0) {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                why: format!(
                    "byte {} is {:#04x} in the padding [{at}, {to}) between sections, which must be zero",
                    at + i as u64,
                    b[i]
                ),
            });
        }
    }
    Ok(())
}

/// Decode the FRAMES table and check it: frames of 1 to 16 pages covering
/// the DATA pages in order, stored back to back from the start of DATA,
/// each no longer than its pages uncompressed.
fn check_frames(header: &Header, bytes: &[u8]) -> std::result::Result<Vec<Frame>, String> {
    let mut frames = Vec::with_capacity(bytes.len() / FRAME_SIZE);
    let (mut pages, mut offset) = (0u64, 0u64);
    for (i, b) in bytes.chunks_exact(FRAME_SIZE).enumerate() {
        let f = Frame::decode(b);
        if f.pages == 0 || f.pages > FRAME_PAGES {
            return Err(format!("frame {i} holds {} pages (1 to {FRAME_PAGES})", f.pages));
        }
        if f.offset != offset {
            return Err(format!(
                "frame {i} starts at DATA offset {}, expected {offset} (frames are stored back to back)",
                f.offset
            ));
        }
        if f.len == 0 || u64::from(f.len) > u64::from(f.pages) * PAGE as u64 {
            return Err(format!(
                "frame {i} is {} bytes for {} pages (1 to {} bytes)",
                f.len,
                f.pages,
                u64::from(f.pages) * PAGE as u64
            ));
        }
        pages += u64::from(f.pages);
        offset += u64::from(f.len);
        frames.push(f);
    }
    let data = header.sections[3].len;
    if pages != header.pages_data || offset != data {
        return Err(format!(
            "frames hold {pages} pages in {offset} bytes, the header says {} data pages in a DATA section of {data} bytes",
            header.pages_data
        ));
    }
    Ok(frames)
}

/// Decode the INDEX and check every rule of docs/FORMAT.md about it:
/// known kinds, no empty extent, ascending and non-overlapping, inside
/// guest RAM, zero extents with data page 0, data extents covering DATA
/// pages 0, 1, 2, ... in order, and page counts equal to the header's.
/// (With the header's checks this also makes a FULL epoch list every page
/// of guest RAM exactly once.)
fn check_index(header: &Header, bytes: &[u8]) -> std::result::Result<Vec<Extent>, String> {
    let ranges = header.unit_ranges();
    let mut index = Vec::with_capacity(bytes.len() / EXTENT_SIZE);
    let (mut next_gfn, mut next_data, mut zero, mut region_data) = (0u64, 0u64, 0u64, 0u64);
    for (i, b) in bytes.chunks_exact(EXTENT_SIZE).enumerate() {
        let e = Extent::decode(b).ok_or_else(|| format!("index entry {i} has unknown kind {}", le32(b, 12)))?;
        if e.count == 0 {
            return Err(format!("index entry {i} is empty (page count 0)"));
        }
        let end = e
            .gfn
            .checked_add(u64::from(e.count))
            .ok_or_else(|| format!("index entry {i} (frame {} + {} pages) overflows", e.gfn, e.count))?;
        if i > 0 && e.gfn < next_gfn {
            return Err(format!(
                "index entry {i} starts at frame {}, before the end of entry {} (frame {next_gfn}): the index must be ascending and non-overlapping",
                e.gfn,
                i - 1
            ));
        }
        if !ranges.iter().any(|&(lo, hi)| lo <= e.gfn && end <= hi) {
            let disks = match header.regions.len() {
                0 => String::new(),
                n => format!(
                    " and its {n} disk(s): {}",
                    crate::format::describe_regions(&header.regions)
                ),
            };
            return Err(format!(
                "index entry {i} (frames {}..{end}) lies outside guest RAM of {} bytes ({}){disks}",
                e.gfn,
                header.mem_size,
                describe_frames(header.mem_size)
            ));
        }
        next_gfn = end;
        match e.kind {
            ExtentKind::Data if e.data_page != next_data => {
                return Err(format!(
                    "index entry {i} points at data page {}, expected {next_data} (data extents cover DATA in order)",
                    e.data_page
                ));
            }
            ExtentKind::Data => {
                next_data += u64::from(e.count);
                if crate::format::region_of(e.gfn) != 0 {
                    region_data += u64::from(e.count);
                }
            }
            ExtentKind::Zero if e.data_page != 0 => {
                return Err(format!(
                    "index entry {i} is a zero extent with data page {} (must be 0)",
                    e.data_page
                ));
            }
            ExtentKind::Zero => zero += u64::from(e.count),
        }
        index.push(e);
    }
    if next_data != header.pages_data || zero != header.pages_zero {
        return Err(format!(
            "index lists {next_data} data and {zero} zero pages, the header says {} and {}",
            header.pages_data, header.pages_zero
        ));
    }
    if region_data != header.region_pages_data {
        return Err(format!(
            "index lists {region_data} data pages of disks, the header says {}",
            header.region_pages_data
        ));
    }
    Ok(index)
}

impl EpochReader {
    /// Open `path`, verifying the header, the section layout and padding,
    /// the index, the page-checksum table and the frame table.
    pub fn open(path: &Path) -> Result<EpochReader> {
        let file = open_regular(path)?;
        let len = file.metadata().map_err(io(path, "stat"))?.len();
        Self::open_backing(path, Backing::File(file), len)
    }

    /// Open an epoch of `len` bytes read through `src` (an object of a
    /// remote store, named `name` in messages), verifying what
    /// [`EpochReader::open`] verifies. Its pages are read, and verified,
    /// as they are asked for.
    pub fn open_ranged(name: &Path, src: Arc<dyn RangeRead>, len: u64) -> Result<EpochReader> {
        Self::open_backing(name, Backing::Ranged(src), len)
    }

    fn open_backing(path: &Path, file: Backing, len: u64) -> Result<EpochReader> {
        let corrupt = |why: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let (header, file_len) = header_in(&file, path, len)?;
        check_gaps(&file, path, &header, file_len)?;
        let [_, isec, ssec, _, fsec] = header.sections;
        // Of PAGE_SUMS only the block table is read now (version 4; older
        // versions: all of it).
        let (sums_at, table_at, table_len) = header.sum_layout();
        let (read_from, read_len) = if header.version >= 4 {
            (table_at, table_len)
        } else {
            (ssec.offset, ssec.len)
        };
        let [index_bytes, sum_bytes, frame_bytes] = read_ranges(
            &file,
            path,
            [(isec.offset, isec.len), (read_from, read_len), (fsec.offset, fsec.len)],
        )?;
        if checksum(&index_bytes) != isec.sum {
            return Err(corrupt(format!(
                "INDEX section checksum mismatch (bytes {}..{})",
                isec.offset,
                isec.end()
            )));
        }
        if checksum(&sum_bytes) != ssec.sum {
            let what = if header.version >= 4 { " (its block table)" } else { "" };
            return Err(corrupt(format!(
                "PAGE_SUMS section checksum mismatch{what} (bytes {read_from}..{})",
                read_from + read_len
            )));
        }
        if checksum(&frame_bytes) != fsec.sum {
            return Err(corrupt(format!(
                "FRAMES section checksum mismatch (bytes {}..{})",
                fsec.offset,
                fsec.end()
            )));
        }
        let index = check_index(&header, &index_bytes).map_err(&corrupt)?;
        let frames = if header.codec == Codec::None {
            Vec::new()
        } else {
            check_frames(&header, &frame_bytes).map_err(&corrupt)?
        };
        let mut frame_first = Vec::with_capacity(frames.len());
        let mut first = 0;
        for f in &frames {
            frame_first.push(first);
            first += u64::from(f.pages);
        }
        let sums = if header.version >= 4 {
            PageSums::blocks(sums_at, header.pages_data, &sum_bytes)
        } else {
            PageSums::Whole(sum_bytes)
        };
        Ok(EpochReader {
            path: path.to_path_buf(),
            file,
            header,
            index,
            sums,
            frames,
            frame_first,
            file_len,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for large direct reads of DATA), if the epoch is a
    /// local file.
    pub fn file(&self) -> Option<&File> {
        match &self.file {
            Backing::File(f) => Some(f),
            Backing::Ranged(_) => None,
        }
    }

    /// Read raw bytes of the epoch at `at` (unverified).
    pub fn read_raw(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.file.read_exact_at(buf, at).map_err(io(&self.path, "read"))
    }

    /// The file's length when it was opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The page index.
    pub fn index(&self) -> &[Extent] {
        &self.index
    }

    /// The compressed frames (empty without compression).
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// The frame holding data page `page` and that frame's first page.
    pub fn frame_of(&self, page: u64) -> Option<(usize, u64)> {
        let i = self.frame_first.partition_point(|&f| f <= page).checked_sub(1)?;
        Some((i, self.frame_first[i]))
    }

    /// The encoded machine state, verified.
    pub fn state(&self) -> Result<Vec<u8>> {
        let s = self.header.sections[0];
        let b = read_at(&self.file, &self.path, s.len, s.offset)?;
        if checksum(&b) != s.sum {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                why: format!("STATE section checksum mismatch (bytes {}..{})", s.offset, s.end()),
            });
        }
        Ok(b)
    }

    /// Read `dst.len() / 4096` data pages starting at data page `first`,
    /// verifying each against its checksum (and each compressed frame
    /// against its own).
    pub fn read_pages(&self, first: u64, dst: &mut [u8]) -> Result<()> {
        let n = (dst.len() / PAGE) as u64;
        if !dst.len().is_multiple_of(PAGE) || first.checked_add(n).is_none_or(|end| end > self.header.pages_data) {
            return Err(StoreError::Usage("page read outside the DATA section"));
        }
        if self.header.codec == Codec::None {
            let at = self.header.sections[3].offset + first * PAGE as u64;
            self.file.read_exact_at(dst, at).map_err(io(&self.path, "read pages"))?;
            return self.verify(first, dst);
        }
        let mut dec = Decompressor::default();
        let mut raw = Vec::new();
        let mut page = first;
        while page < first + n {
            let (fi, f0) = self
                .frame_of(page)
                .ok_or(StoreError::Usage("page outside every frame"))?;
            let f = self.frames[fi];
            let mut out = vec![0u8; f.pages as usize * PAGE];
            self.read_frame(fi, &mut raw, &mut out, &mut dec)?;
            let from = page - f0;
            let take = (u64::from(f.pages) - from).min(first + n - page);
            let at = ((page - first) as usize) * PAGE;
            dst[at..at + take as usize * PAGE]
                .copy_from_slice(&out[from as usize * PAGE..(from + take) as usize * PAGE]);
            page += take;
        }
        self.verify(first, dst)
    }

    /// Read frame `fi` (checking its checksum) and decompress it into
    /// `out` (its pages × 4096 bytes). Page checksums are not checked.
    pub fn read_frame(&self, fi: usize, raw: &mut Vec<u8>, out: &mut [u8], dec: &mut Decompressor) -> Result<()> {
        let f = self.frames[fi];
        raw.resize(f.len as usize, 0);
        let at = self.header.sections[3].offset + f.offset;
        self.file.read_exact_at(raw, at).map_err(io(&self.path, "read frame"))?;
        self.decode_frame(fi, raw, out, dec)
    }

    /// Check frame `fi`'s stored bytes against its checksum and decompress
    /// them into `out` (its pages × 4096 bytes).
    pub fn decode_frame(&self, fi: usize, stored: &[u8], out: &mut [u8], dec: &mut Decompressor) -> Result<()> {
        let f = self.frames[fi];
        let corrupt = |why: String| StoreError::Corrupt {
            path: self.path.clone(),
            why,
        };
        if checksum(stored) != f.sum {
            return Err(corrupt(format!(
                "compressed frame {fi} (data pages {}..{}, bytes {}..{} of the file) fails its checksum",
                self.frame_first[fi],
                self.frame_first[fi] + u64::from(f.pages),
                self.header.sections[3].offset + f.offset,
                self.header.sections[3].offset + f.offset + u64::from(f.len)
            )));
        }
        if f.is_raw() {
            out.copy_from_slice(stored);
            return Ok(());
        }
        dec.decompress(self.header.codec, stored, out)
            .map_err(|e| corrupt(format!("compressed frame {fi} does not decompress: {e}")))
    }

    /// Check `pages` (consecutive data pages from `first`) against their
    /// checksums (reading the blocks of checksums they need, version 4).
    pub fn verify(&self, first: u64, pages: &[u8]) -> Result<()> {
        let n = (pages.len() / PAGE) as u64;
        let read = |buf: &mut [u8], at: u64| self.file.read_exact_at(buf, at);
        self.sums.for_range(first, n, &self.path, &read, &mut |from, sums| {
            let at = ((from - first) as usize) * PAGE;
            let mine = &pages[at..at + sums.len() / 8 * PAGE];
            for (i, (page, sum)) in mine.chunks_exact(PAGE).zip(sums.chunks_exact(8)).enumerate() {
                if le64(sum, 0) != checksum(page) {
                    let p = from + i as u64;
                    return Err(StoreError::Corrupt {
                        path: self.path.clone(),
                        why: format!("data page {p}{} fails its checksum", self.describe_page(p)),
                    });
                }
            }
            Ok(())
        })
    }

    /// ` (guest frame F, file offset O)` for data page `p`, for messages.
    pub fn describe_page(&self, p: u64) -> String {
        let gfn = self
            .index
            .iter()
            .find(|e| e.kind == ExtentKind::Data && e.data_page <= p && p < e.data_page + u64::from(e.count))
            .map(|e| e.gfn + (p - e.data_page));
        let gfn = gfn.map_or(String::new(), |g| format!("guest frame {g:#x}"));
        if self.header.codec == Codec::None {
            let off = self.header.sections[3].offset + p * PAGE as u64;
            format!(" ({gfn}, file offset {off})")
        } else {
            format!(" ({gfn})")
        }
    }
}
