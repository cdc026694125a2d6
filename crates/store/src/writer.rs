//! Writing one epoch file: to a temporary name, fsync, rename, fsync the
//! directory. Until the rename nothing is visible; a crash at any point
//! leaves at most a `.tmp-*` file, which readers ignore and the next writer
//! removes. A rewrite (reclamation) commits the same way over the epoch's
//! existing file, which readers see either whole before or whole after.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::aligned::AlignedBuf;
use crate::background::BackgroundWriter;
use crate::codec::{Codec, Compressor};
use crate::durable::fsync_dir;
use crate::error::{Result, StoreError, io};
use crate::format::{
    self, EXTENT_SIZE, Extent, ExtentKind, FRAME_PAGES, Frame, HEADER_SIZE, Header, Mode, PAGE, Section, checksum,
};
use crate::sums;

/// A committed epoch as listed.
#[derive(Debug, Clone)]
pub struct EpochInfo {
    /// Its header.
    pub header: Header,
    /// Size of its file.
    pub file_bytes: u64,
    /// Its file.
    pub path: PathBuf,
}

/// What the caller knows about an epoch before writing it.
#[derive(Debug, Clone)]
pub struct EpochMeta {
    /// Epoch id, from [`crate::Store::next_id`].
    pub id: u64,
    /// Parent epoch, `None` for a full epoch.
    pub parent: Option<u64>,
    /// Capture mode.
    pub mode: Mode,
    /// True when every page of RAM will be recorded.
    pub full: bool,
    /// When the VM was paused (Unix ns).
    pub created_ns: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem_size: u64,
    /// The machine's progress counter, if it has one.
    pub progress: Option<u64>,
    /// Regions besides guest RAM (disks), in region order from 1.
    pub regions: Vec<crate::format::RegionDesc>,
}

impl EpochMeta {
    /// A new version of the epoch `head` describes (same id, capture time,
    /// mode, machine and progress) with `parent` as its parent (`None`:
    /// full): what a rewrite writes.
    pub fn rewrite_of(head: &Header, parent: Option<u64>) -> EpochMeta {
        EpochMeta {
            id: head.id,
            parent,
            mode: head.mode,
            full: parent.is_none(),
            created_ns: head.created_ns,
            vcpus: head.vcpus,
            mem_size: head.mem_size,
            progress: (head.progress != u64::MAX).then_some(head.progress),
            regions: head.regions.clone(),
        }
    }
}

/// Compressed DATA on its way to the file: frames are compressed as they
/// fill and staged in a page-aligned buffer that goes out in whole pages
/// (with O_DIRECT when enabled); the tail goes out at commit.
struct Packer {
    comp: Compressor,
    codec: Codec,
    /// Uncompressed pages of the frame being filled.
    frame: Vec<u8>,
    out: Vec<u8>,
    stage: AlignedBuf,
    staged: usize,
    /// File offset of `stage[0]` (page aligned).
    stage_at: u64,
    frames: Vec<Frame>,
    data_len: u64,
}

/// Staged compressed bytes written out at once.
const STAGE: usize = 1 << 20;

/// An epoch being written.
pub struct EpochWriter {
    epochs_dir: PathBuf,
    tmp: PathBuf,
    dest: PathBuf,
    file: File,
    /// The same file opened with O_DIRECT, for page-aligned DATA writes.
    direct: Option<File>,
    meta: EpochMeta,
    uuid: [u8; 16],
    state: Option<Section>,
    data_start: u64,
    pos: u64,
    extents: Vec<Extent>,
    sums: Vec<u64>,
    pages_zero: u64,
    /// Data pages of regions (disks) so far.
    region_pages_data: u64,
    next_gfn: u64,
    packer: Option<Packer>,
    /// Writes page data handed over by `pages_with_zeros_owned`.
    background: Option<BackgroundWriter>,
    merged: u64,
    committed: bool,
}

impl std::fmt::Debug for EpochWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochWriter")
            .field("tmp", &self.tmp)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl EpochWriter {
    pub(crate) fn new(
        epochs_dir: PathBuf,
        tmp: PathBuf,
        dest: PathBuf,
        file: File,
        meta: EpochMeta,
        uuid: [u8; 16],
    ) -> Self {
        Self {
            epochs_dir,
            tmp,
            dest,
            file,
            direct: None,
            meta,
            uuid,
            state: None,
            data_start: 0,
            pos: 0,
            extents: Vec::new(),
            sums: Vec::new(),
            pages_zero: 0,
            region_pages_data: 0,
            next_gfn: 0,
            packer: None,
            background: None,
            merged: 0,
            committed: false,
        }
    }

    /// Write page data with O_DIRECT from now on, where the buffer allows
    /// (page-aligned address and length): it bypasses the page cache, whose
    /// writeback would otherwise steal CPU from the running guest. Returns
    /// false if the file system refuses O_DIRECT (tmpfs); writes then stay
    /// buffered. Durability is unchanged: commit still fsyncs.
    pub fn use_direct_io(&mut self) -> bool {
        if self.direct.is_none() {
            self.direct = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&self.tmp)
                .ok();
        }
        self.direct.is_some()
    }

    /// Compress page data with `codec` (before any page is written).
    pub fn compress(&mut self, codec: Codec) -> Result<()> {
        if !self.sums.is_empty() {
            return Err(StoreError::Usage("compression chosen after pages were written"));
        }
        self.packer = (codec != Codec::None).then(|| Packer {
            comp: Compressor::new(codec),
            codec,
            frame: Vec::with_capacity(FRAME_PAGES as usize * PAGE),
            out: Vec::new(),
            stage: AlignedBuf::new(STAGE + FRAME_PAGES as usize * PAGE * 2),
            staged: 0,
            stage_at: 0,
            frames: Vec::new(),
            data_len: 0,
        });
        Ok(())
    }

    /// Record that this epoch stands for `n` epochs merged into it.
    pub fn set_merged(&mut self, n: u64) {
        self.merged = n;
    }

    fn pwrite(&self, bytes: &[u8], at: u64) -> Result<()> {
        self.file.write_all_at(bytes, at).map_err(io(&self.tmp, "write"))
    }

    /// Write the encoded machine state. Must come before any page.
    pub fn write_state(&mut self, state: &[u8]) -> Result<()> {
        if self.state.is_some() {
            return Err(StoreError::Usage("state written twice"));
        }
        let offset = HEADER_SIZE as u64;
        let end = offset + state.len() as u64;
        self.data_start = end.next_multiple_of(PAGE as u64);
        // The padding up to DATA is written as zeros: no holes, and every
        // byte of the file is either checksummed or required to be zero.
        let mut bytes = Vec::with_capacity((self.data_start - offset) as usize);
        bytes.extend_from_slice(state);
        bytes.resize((self.data_start - offset) as usize, 0);
        self.pwrite(&bytes, offset)?;
        self.state = Some(Section {
            offset,
            len: state.len() as u64,
            sum: checksum(state),
        });
        self.pos = self.data_start;
        if let Some(p) = &mut self.packer {
            p.stage_at = self.data_start;
        }
        Ok(())
    }

    fn check_order(&mut self, gfn: u64, count: u64) -> Result<()> {
        if self.state.is_none() {
            return Err(StoreError::Usage("pages before state"));
        }
        if gfn < self.next_gfn {
            return Err(StoreError::Usage("pages out of order"));
        }
        self.next_gfn = gfn + count;
        Ok(())
    }

    fn push(&mut self, gfn: u64, count: u32, kind: ExtentKind, data_page: u64) {
        if let Some(last) = self.extents.last_mut() {
            let contiguous = last.kind == kind
                && last.gfn + u64::from(last.count) == gfn
                && (kind == ExtentKind::Zero || last.data_page + u64::from(last.count) == data_page);
            if contiguous && u64::from(last.count) + u64::from(count) <= u64::from(u32::MAX) {
                last.count += count;
                return;
            }
        }
        self.extents.push(Extent {
            gfn,
            count,
            kind,
            data_page: if kind == ExtentKind::Data { data_page } else { 0 },
        });
    }

    /// Append consecutive pages starting at `gfn` (`bytes` is a multiple of 4096).
    pub fn data_pages(&mut self, gfn: u64, bytes: &[u8]) -> Result<()> {
        let n = (bytes.len() / PAGE) as u64;
        if !bytes.len().is_multiple_of(PAGE) {
            return Err(StoreError::Usage("partial page"));
        }
        self.check_order(gfn, n)?;
        self.append(gfn..gfn + n, bytes)
    }

    /// Append pages at the listed (ascending) frame numbers; `bytes` holds them in that order.
    pub fn scattered_pages(&mut self, gfns: &[u64], bytes: &[u8]) -> Result<()> {
        self.pages_with_zeros(gfns, bytes, &[])
    }

    /// Append pages at the ascending frame numbers `gfns` (`bytes` holds
    /// them in that order, in one write) and zero pages at the ascending
    /// `zeros`, interleaved with them in frame order: a saver whose dirty
    /// pages are partly zero writes them in one go instead of one write per
    /// run between two zero pages.
    pub fn pages_with_zeros(&mut self, gfns: &[u64], bytes: &[u8], zeros: &[u64]) -> Result<()> {
        if bytes.len() != gfns.len() * PAGE {
            return Err(StoreError::Usage("page list and buffer differ in size"));
        }
        if !self.order_merged(gfns, zeros)? {
            return Ok(());
        }
        self.write_data(bytes)?;
        self.index_merged(gfns, bytes, zeros);
        Ok(())
    }

    /// As [`EpochWriter::pages_with_zeros`], with the data pages at the
    /// start of a buffer handed over: with O_DIRECT its write goes to a
    /// thread of its own, and the caller fills another buffer meanwhile.
    /// Returns a buffer free to fill again: one of an earlier write, `buf`
    /// itself when it was written at once (compression, no O_DIRECT), or
    /// none while fewer writes than the writer's depth (2) are in flight.
    /// Commit waits for every write, and [`EpochWriter::settle`] gives
    /// their buffers back.
    pub fn pages_with_zeros_owned(
        &mut self,
        gfns: &[u64],
        buf: AlignedBuf,
        zeros: &[u64],
    ) -> Result<Option<AlignedBuf>> {
        let len = gfns.len() * PAGE;
        if buf.len() < len {
            return Err(StoreError::Usage("page list longer than its buffer"));
        }
        let background = self.packer.is_none() && self.pos.is_multiple_of(PAGE as u64) && len > 0;
        if !background || self.direct.is_none() {
            self.pages_with_zeros(gfns, &buf[..len], zeros)?;
            return Ok(Some(buf));
        }
        if !self.order_merged(gfns, zeros)? {
            return Ok(Some(buf));
        }
        if self.background.is_none()
            && let Some(direct) = &self.direct
        {
            let file = direct.try_clone().map_err(io(&self.tmp, "duplicate"))?;
            self.background = Some(BackgroundWriter::new(file).map_err(io(&self.tmp, "start the data writer"))?);
        }
        self.index_merged(gfns, &buf[..len], zeros);
        let at = self.pos;
        self.pos += len as u64;
        match self.background.as_mut() {
            Some(b) => b.submit(buf, len, at).map_err(io(&self.tmp, "write (O_DIRECT)")),
            None => Err(StoreError::Usage("no data writer")),
        }
    }

    /// Wait for every data write in flight (see
    /// [`EpochWriter::pages_with_zeros_owned`]); their buffers, free again.
    pub fn settle(&mut self) -> Result<Vec<AlignedBuf>> {
        let mut free = Vec::new();
        if let Some(b) = self.background.as_mut() {
            while let Some(buf) = b.wait().map_err(io(&self.tmp, "write (O_DIRECT)"))? {
                free.push(buf);
            }
        }
        Ok(free)
    }

    /// Check that the pages of `gfns` and `zeros` come after those written
    /// so far and are in order; false when there are none.
    fn order_merged(&mut self, gfns: &[u64], zeros: &[u64]) -> Result<bool> {
        let mut span: Option<(u64, u64)> = None;
        for (gfn, _) in merged(gfns, zeros) {
            span = match span {
                Some((_, last)) if last >= gfn => return Err(StoreError::Usage("pages out of order")),
                Some((first, _)) => Some((first, gfn)),
                None => Some((gfn, gfn)),
            };
        }
        let Some((first, last)) = span else {
            return Ok(false);
        };
        self.check_order(first, 1)?;
        self.next_gfn = last + 1;
        Ok(true)
    }

    /// Index data pages `bytes` at `gfns` and zero pages at `zeros`.
    fn index_merged(&mut self, gfns: &[u64], bytes: &[u8], zeros: &[u64]) {
        for (gfn, data) in merged(gfns, zeros) {
            match data {
                Some(i) => self.index_data(std::iter::once(gfn), &bytes[i * PAGE..(i + 1) * PAGE]),
                None => {
                    self.push(gfn, 1, ExtentKind::Zero, 0);
                    self.pages_zero += 1;
                }
            }
        }
    }

    /// Write checked, ordered pages to DATA and index them at `gfns`, one per page.
    fn append(&mut self, gfns: impl Iterator<Item = u64>, bytes: &[u8]) -> Result<()> {
        self.write_data(bytes)?;
        self.index_data(gfns, bytes);
        Ok(())
    }

    /// Write page data at the end of DATA (through the packer when compressing).
    fn write_data(&mut self, bytes: &[u8]) -> Result<()> {
        if self.packer.is_some() {
            self.pack(bytes)?;
        } else {
            let aligned = (bytes.as_ptr() as usize).is_multiple_of(PAGE) && self.pos.is_multiple_of(PAGE as u64);
            match &self.direct {
                Some(d) if aligned => d
                    .write_all_at(bytes, self.pos)
                    .map_err(io(&self.tmp, "write (O_DIRECT)"))?,
                _ => self.pwrite(bytes, self.pos)?,
            }
            self.pos += bytes.len() as u64;
        }
        Ok(())
    }

    /// Index pages just written to DATA at `gfns`, one per page.
    fn index_data(&mut self, gfns: impl Iterator<Item = u64>, bytes: &[u8]) {
        for (gfn, page) in gfns.zip(bytes.chunks_exact(PAGE)) {
            let data_page = self.sums.len() as u64;
            self.sums.push(checksum(page));
            if crate::format::region_of(gfn) != 0 {
                self.region_pages_data += 1;
            }
            self.push(gfn, 1, ExtentKind::Data, data_page);
        }
    }

    /// Add pages to the current frame, compressing each frame that fills.
    fn pack(&mut self, mut bytes: &[u8]) -> Result<()> {
        let frame_bytes = FRAME_PAGES as usize * PAGE;
        while !bytes.is_empty() {
            let Some(p) = self.packer.as_mut() else {
                return Ok(());
            };
            let take = (frame_bytes - p.frame.len()).min(bytes.len());
            p.frame.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if p.frame.len() == frame_bytes {
                self.emit_frame()?;
            }
        }
        Ok(())
    }

    /// Compress the current frame into the staging buffer; write out what
    /// fills whole pages once the stage is full.
    fn emit_frame(&mut self) -> Result<()> {
        let Some(p) = self.packer.as_mut() else {
            return Ok(());
        };
        if p.frame.is_empty() {
            return Ok(());
        }
        let compressed = p.comp.compress(&p.frame, &mut p.out);
        let stored: &[u8] = if compressed { &p.out } else { &p.frame };
        p.frames.push(Frame {
            offset: p.data_len,
            len: stored.len() as u32,
            pages: (p.frame.len() / PAGE) as u32,
            sum: checksum(stored),
        });
        p.stage[p.staged..p.staged + stored.len()].copy_from_slice(stored);
        p.staged += stored.len();
        p.data_len += stored.len() as u64;
        p.frame.clear();
        if p.staged >= STAGE {
            self.flush_stage(false)?;
        }
        Ok(())
    }

    /// Write the staged whole pages (all staged bytes when `all`).
    fn flush_stage(&mut self, all: bool) -> Result<()> {
        let Some(p) = self.packer.as_mut() else {
            return Ok(());
        };
        let n = if all { p.staged } else { p.staged / PAGE * PAGE };
        if n == 0 {
            return Ok(());
        }
        let whole = n / PAGE * PAGE;
        let r = match &self.direct {
            Some(d) if whole > 0 => d
                .write_all_at(&p.stage[..whole], p.stage_at)
                .map_err(io(&self.tmp, "write (O_DIRECT)")),
            _ => self
                .file
                .write_all_at(&p.stage[..whole], p.stage_at)
                .map_err(io(&self.tmp, "write")),
        };
        r?;
        if n > whole {
            self.file
                .write_all_at(&p.stage[whole..n], p.stage_at + whole as u64)
                .map_err(io(&self.tmp, "write"))?;
        }
        p.stage.copy_within(n..p.staged, 0);
        p.staged -= n;
        p.stage_at += n as u64;
        Ok(())
    }

    /// Record `count` zero pages from `gfn`.
    pub fn zero_pages(&mut self, gfn: u64, count: u64) -> Result<()> {
        self.check_order(gfn, count)?;
        let mut left = count;
        let mut at = gfn;
        while left > 0 {
            let n = left.min(u64::from(u32::MAX)) as u32;
            self.push(at, n, ExtentKind::Zero, 0);
            at += u64::from(n);
            left -= u64::from(n);
        }
        self.pages_zero += count;
        Ok(())
    }

    /// Pages with data so far.
    pub fn pages_data(&self) -> u64 {
        self.sums.len() as u64
    }

    /// Write index and header, make the file durable and visible.
    pub fn commit(mut self, pause_ns: u64) -> Result<EpochInfo> {
        let (header, end) = self.seal(pause_ns)?;
        self.file.sync_all().map_err(io(&self.tmp, "fsync"))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io(&self.dest, "rename into place"))?;
        self.committed = true;
        fsync_dir(&self.epochs_dir)?;
        Ok(EpochInfo {
            header,
            file_bytes: end,
            path: self.dest.clone(),
        })
    }

    /// Write index and header, and take the file out of the store: its
    /// temporary name is removed, so it is never visible there, and the
    /// open file is returned with the header and its length (an epoch
    /// made to be sent elsewhere; not made durable).
    pub fn finish_detached(mut self, pause_ns: u64) -> Result<(File, Header, u64)> {
        let (header, end) = self.seal(pause_ns)?;
        let file = self.file.try_clone().map_err(io(&self.tmp, "duplicate"))?;
        std::fs::remove_file(&self.tmp).map_err(io(&self.tmp, "remove"))?;
        self.committed = true;
        Ok((file, header, end))
    }

    /// Write index and header; the header and the file's length.
    fn seal(&mut self, pause_ns: u64) -> Result<(Header, u64)> {
        let state = self.state.ok_or(StoreError::Usage("no state written"))?;
        // Every data write is done before the index says the data is there.
        self.settle()?;
        self.emit_frame()?;
        self.flush_stage(true)?;
        let (codec, frames, data_len) = match &self.packer {
            Some(p) => (p.codec, p.frames.clone(), p.data_len),
            None => (Codec::None, Vec::new(), self.sums.len() as u64 * PAGE as u64),
        };
        let mut index = Vec::with_capacity(self.extents.len() * EXTENT_SIZE);
        for e in &self.extents {
            e.encode(&mut index);
        }
        // PAGE_SUMS (the checksums, then their block table), INDEX and
        // FRAMES end to end after DATA: a reader opening the epoch reads the
        // table, INDEX and FRAMES in one read, and the checksums a block at
        // a time when it needs them.
        let mut sums: Vec<u8> = self.sums.iter().flat_map(|s| s.to_le_bytes()).collect();
        let table = sums::block_table(&sums);
        sums.extend_from_slice(&table);
        let mut frame_bytes = Vec::with_capacity(frames.len() * format::FRAME_SIZE);
        for f in &frames {
            f.encode(&mut frame_bytes);
        }
        let sums_at = self.data_start + data_len;
        let index_at = sums_at + sums.len() as u64;
        let frames_at = index_at + index.len() as u64;
        let end = frames_at + frame_bytes.len() as u64;
        let tail = [sums.as_slice(), &index, &frame_bytes].concat();
        self.pwrite(&tail, sums_at)?;
        // Without data pages (an idle guest) the file may end at the padding
        // after the state: set its length to the end of the last section.
        self.file.set_len(end).map_err(io(&self.tmp, "set length"))?;
        let header = Header {
            version: format::VERSION,
            id: self.meta.id,
            parent: self.meta.parent.unwrap_or(0),
            store_uuid: self.uuid,
            created_ns: self.meta.created_ns,
            mode: self.meta.mode,
            flags: if self.meta.full { format::flags::FULL } else { 0 },
            vcpus: self.meta.vcpus,
            mem_size: self.meta.mem_size,
            progress: self.meta.progress.unwrap_or(u64::MAX),
            pages_data: self.sums.len() as u64,
            pages_zero: self.pages_zero,
            extents: self.extents.len() as u64,
            pause_ns,
            codec,
            frames: frames.len() as u64,
            merged: self.merged,
            regions: self.meta.regions.clone(),
            region_pages_data: self.region_pages_data,
            sections: [
                state,
                Section {
                    offset: index_at,
                    len: index.len() as u64,
                    sum: checksum(&index),
                },
                Section {
                    offset: sums_at,
                    len: sums.len() as u64,
                    sum: checksum(&table),
                },
                Section {
                    offset: self.data_start,
                    len: data_len,
                    sum: 0,
                },
                Section {
                    offset: frames_at,
                    len: frame_bytes.len() as u64,
                    sum: checksum(&frame_bytes),
                },
            ],
        };
        self.pwrite(&header.encode(), 0)?;
        Ok((header, end))
    }
}

impl Drop for EpochWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The pages of `gfns` (with their index in it) and of `zeros` (`None`),
/// merged in frame order; both lists ascending.
fn merged<'a>(gfns: &'a [u64], zeros: &'a [u64]) -> impl Iterator<Item = (u64, Option<usize>)> + 'a {
    let (mut d, mut z) = (0, 0);
    std::iter::from_fn(move || {
        let data_next = match (gfns.get(d), zeros.get(z)) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(g), Some(zg)) => g < zg,
        };
        if data_next {
            d += 1;
            Some((gfns[d - 1], Some(d - 1)))
        } else {
            z += 1;
            Some((zeros[z - 1], None))
        }
    })
}
