//! Reading and verifying one epoch file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError, io};
use crate::format::{
    EXTENT_SIZE, Extent, ExtentKind, HEADER_SIZE, Header, PAGE, checksum, describe_frames, le32, le64, ram_frames,
};

/// An opened, verified epoch: header, index and page checksums in memory.
#[derive(Debug)]
pub struct EpochReader {
    path: PathBuf,
    file: File,
    header: Header,
    index: Vec<Extent>,
    sums: Vec<u64>,
}

fn read_at(file: &File, path: &Path, len: u64, at: u64) -> Result<Vec<u8>> {
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
    header_of(&file, path)
}

fn header_of(file: &File, path: &Path) -> Result<(Header, u64)> {
    let len = file.metadata().map_err(io(path, "stat"))?.len();
    let mut b = vec![0u8; HEADER_SIZE.min(len as usize)];
    file.read_exact_at(&mut b, 0).map_err(io(path, "read header"))?;
    let h = Header::decode(&b, path)?;
    h.check_layout(len, path)?;
    Ok((h, len))
}

/// Decode the INDEX and check every rule of docs/FORMAT.md about it:
/// known kinds, no empty extent, ascending and non-overlapping, inside
/// guest RAM, zero extents with data page 0, data extents covering DATA
/// pages 0, 1, 2, ... in order, and page counts equal to the header's.
/// (With the header's checks this also makes a FULL epoch list every page
/// of guest RAM exactly once.)
fn check_index(header: &Header, bytes: &[u8]) -> std::result::Result<Vec<Extent>, String> {
    let ram = ram_frames(header.mem_size);
    let mut index = Vec::with_capacity(bytes.len() / EXTENT_SIZE);
    let (mut next_gfn, mut next_data, mut zero) = (0u64, 0u64, 0u64);
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
        if !ram.iter().any(|&(lo, hi)| lo <= e.gfn && end <= hi) {
            return Err(format!(
                "index entry {i} (frames {}..{end}) lies outside guest RAM of {} bytes ({})",
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
            ExtentKind::Data => next_data += u64::from(e.count),
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
    Ok(index)
}

impl EpochReader {
    /// Open `path`, verifying the header, the section layout, the index and
    /// the page-checksum table.
    pub fn open(path: &Path) -> Result<EpochReader> {
        let corrupt = |why: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let file = open_regular(path)?;
        let (header, _) = header_of(&file, path)?;
        let [_, isec, ssec, _] = header.sections;
        let index_bytes = read_at(&file, path, isec.len, isec.offset)?;
        if checksum(&index_bytes) != isec.sum {
            return Err(corrupt("INDEX section checksum mismatch".into()));
        }
        let sum_bytes = read_at(&file, path, ssec.len, ssec.offset)?;
        if checksum(&sum_bytes) != ssec.sum {
            return Err(corrupt("PAGE_SUMS section checksum mismatch".into()));
        }
        let index = check_index(&header, &index_bytes).map_err(corrupt)?;
        let sums = sum_bytes.chunks_exact(8).map(|c| le64(c, 0)).collect();
        Ok(EpochReader {
            path: path.to_path_buf(),
            file,
            header,
            index,
            sums,
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

    /// The page index.
    pub fn index(&self) -> &[Extent] {
        &self.index
    }

    /// The encoded machine state, verified.
    pub fn state(&self) -> Result<Vec<u8>> {
        let s = self.header.sections[0];
        let b = read_at(&self.file, &self.path, s.len, s.offset)?;
        if checksum(&b) != s.sum {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                why: "STATE section checksum mismatch".into(),
            });
        }
        Ok(b)
    }

    /// Read `dst.len() / 4096` data pages starting at data page `first`,
    /// verifying each against its checksum.
    pub fn read_pages(&self, first: u64, dst: &mut [u8]) -> Result<()> {
        self.read_unverified(first, dst)?;
        self.verify(first, dst)
    }

    /// Read data pages without checking them; call [`EpochReader::verify`]
    /// on every page that is used.
    pub fn read_unverified(&self, first: u64, dst: &mut [u8]) -> Result<()> {
        let n = (dst.len() / PAGE) as u64;
        if !dst.len().is_multiple_of(PAGE) || first.checked_add(n).is_none_or(|end| end > self.header.pages_data) {
            return Err(StoreError::Usage("page read outside the DATA section"));
        }
        let at = self.header.sections[3].offset + first * PAGE as u64;
        self.file.read_exact_at(dst, at).map_err(io(&self.path, "read pages"))
    }

    /// Check `pages` (consecutive data pages from `first`) against their checksums.
    pub fn verify(&self, first: u64, pages: &[u8]) -> Result<()> {
        for (i, page) in pages.chunks_exact(PAGE).enumerate() {
            let p = first + i as u64;
            if self.sums.get(p as usize) != Some(&checksum(page)) {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    why: format!("data page {p} fails its checksum"),
                });
            }
        }
        Ok(())
    }
}
