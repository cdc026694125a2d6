//! Reading the data pages of one epoch forward, in order, through a
//! window buffer: what merging and verifying need. Every page handed out
//! has been checked against its checksum (and its frame's, if compressed).

use crate::codec::{Codec, Decompressor};
use crate::error::{Result, StoreError};
use crate::format::PAGE;
use crate::reader::EpochReader;

/// A forward reader of one epoch's data pages.
#[derive(Debug)]
pub struct PageCursor<'a> {
    r: &'a EpochReader,
    buf: Vec<u8>,
    /// Data pages in `buf`: [first, first + count).
    first: u64,
    count: u64,
    window: u64,
    raw: Vec<u8>,
    dec: Decompressor,
    /// Bytes read from the file so far.
    pub bytes_read: u64,
}

impl<'a> PageCursor<'a> {
    /// A cursor over `r` reading `window` pages (at least 16) at a time.
    pub fn new(r: &'a EpochReader, window: u64) -> PageCursor<'a> {
        let window = window.max(16);
        PageCursor {
            r,
            buf: Vec::new(),
            first: 0,
            count: 0,
            window,
            raw: Vec::new(),
            dec: Decompressor::default(),
            bytes_read: 0,
        }
    }

    /// The most pages one call of [`PageCursor::pages`] returns.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Data pages `[page, page + n)`, verified; `n` at most the window.
    pub fn pages(&mut self, page: u64, n: u64) -> Result<&[u8]> {
        let h = self.r.header();
        if n == 0 || n > self.window || page.checked_add(n).is_none_or(|e| e > h.pages_data) {
            return Err(StoreError::Usage("cursor read outside the DATA section or window"));
        }
        if page < self.first || page + n > self.first + self.count {
            self.refill(page, n)?;
        }
        let at = ((page - self.first) as usize) * PAGE;
        let bytes = &self.buf[at..at + n as usize * PAGE];
        self.r.verify(page, bytes)?;
        Ok(bytes)
    }

    fn refill(&mut self, page: u64, n: u64) -> Result<()> {
        let h = self.r.header();
        if h.codec == Codec::None {
            let count = self.window.min(h.pages_data - page).max(n);
            self.buf.resize(count as usize * PAGE, 0);
            let at = h.sections[3].offset + page * PAGE as u64;
            self.r.read_raw(&mut self.buf, at)?;
            self.bytes_read += count * PAGE as u64;
            self.first = page;
            self.count = count;
            return Ok(());
        }
        // The frames holding [page, page + n), and no others: a frame is
        // only decoded (and its checksum checked) when a page of it is used.
        let Some((mut fi, f0)) = self.r.frame_of(page) else {
            return Err(StoreError::Usage("page outside every frame"));
        };
        self.first = f0;
        self.count = 0;
        self.buf.clear();
        let frames = self.r.frames();
        while fi < frames.len() && self.first + self.count < page + n {
            let f = frames[fi];
            let at = self.buf.len();
            self.buf.resize(at + f.pages as usize * PAGE, 0);
            self.r
                .read_frame(fi, &mut self.raw, &mut self.buf[at..], &mut self.dec)?;
            self.bytes_read += u64::from(f.len);
            self.count += u64::from(f.pages);
            fi += 1;
        }
        if self.first + self.count < page + n {
            return Err(StoreError::Usage("cursor window too small for the request"));
        }
        Ok(())
    }
}
