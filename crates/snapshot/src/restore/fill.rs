//! Filling guest RAM from a restore plan, fast: each epoch of the chain is
//! read once, in file order, in large reads; uncompressed pages are read
//! with O_DIRECT straight into guest memory (no copy, no page cache), and
//! compressed frames into a few reused buffers. An I/O thread reads while
//! this thread verifies every page against its checksum (and decompresses),
//! so reading and checking overlap.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;

use store::{AlignedBuf, Codec, Decompressor, EpochReader, Source, StoreError};
use vmm::memory::GuestRam;

use crate::pages::PAGE;

/// Largest read (16 MiB).
const SPAN: u64 = 16 << 20;
/// Unneeded pages a read may skip over to merge two pieces into one read.
const SPAN_GAP: u64 = 64;
/// At most this many iovecs per `preadv`.
const MAX_IOV: usize = 1024;
/// Read buffers in flight for compressed epochs.
const BUFFERS: usize = 3;

/// Pages of one epoch going to one place in RAM.
#[derive(Debug, Clone, Copy)]
struct Piece {
    page: u64,
    gfn: u64,
    count: u64,
}

/// A read the I/O thread finished.
enum Done {
    /// Pages read straight into guest memory.
    Direct {
        epoch: usize,
        pieces: Vec<Piece>,
    },
    /// Compressed frames `frames` of `epoch`, in `buf`, which starts at file offset `at`.
    Frames {
        epoch: usize,
        buf: AlignedBuf,
        at: u64,
        frames: std::ops::Range<usize>,
        pieces: Vec<Piece>,
    },
    Failed(StoreError),
}

fn io_err<'a>(r: &'a EpochReader, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: r.path().to_path_buf(),
        op,
        source,
    }
}

/// The epoch's file again, with O_DIRECT where the file system allows.
/// Reopened through /proc so that it is the very file the reader opened,
/// even if reclamation has since replaced or removed its name.
fn direct_file(r: &EpochReader) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", r.file()?.as_raw_fd()))
        .ok()
}

/// `preadv` until `total` bytes arrived or the file ended; returns bytes read.
fn preadv_all(file: &File, iov: &mut [libc::iovec], mut at: u64, total: u64) -> std::io::Result<u64> {
    let mut done = 0u64;
    let mut first = 0;
    while done < total && first < iov.len() {
        // SAFETY: every iovec points into memory that stays valid and that no
        // Rust reference aliases for the duration of the call (guest RAM not
        // yet running, or a buffer this thread owns); the kernel writes into
        // it like a DMA engine.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov[first..].as_ptr(),
                (iov.len() - first).min(MAX_IOV) as libc::c_int,
                at as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        let mut n = n as usize;
        done += n as u64;
        at += n as u64;
        while first < iov.len() && n >= iov[first].iov_len {
            n -= iov[first].iov_len;
            first += 1;
        }
        if n > 0 {
            // A short read inside one iovec: continue from there.
            let v = &mut iov[first];
            // SAFETY: n < iov_len, so the new base is inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
        }
    }
    Ok(done)
}

/// Group sorted pieces into reads of at most [`SPAN`] bytes whose holes
/// are at most [`SPAN_GAP`] pages.
fn spans(pieces: &[Piece], page_bytes: impl Fn(u64) -> u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        let first = pieces[i].page;
        let mut end = first + pieces[i].count;
        let mut j = i + 1;
        while j < pieces.len()
            && pieces[j].page <= end + SPAN_GAP
            && page_bytes(pieces[j].page + pieces[j].count) - page_bytes(first) <= SPAN
            && j - i < MAX_IOV / 2
        {
            end = end.max(pieces[j].page + pieces[j].count);
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// Split `pieces` so that none is longer than a span.
fn split(pieces: Vec<Piece>) -> Vec<Piece> {
    let most = SPAN / PAGE as u64;
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        let mut done = 0;
        while done < p.count {
            let n = (p.count - done).min(most);
            out.push(Piece {
                page: p.page + done,
                gfn: p.gfn + done,
                count: n,
            });
            done += n;
        }
    }
    out
}

/// The I/O thread: read every epoch's pieces in file order.
fn read_all(
    ram: &GuestRam,
    chain: &[EpochReader],
    by_epoch: Vec<Vec<Piece>>,
    tx: mpsc::SyncSender<Done>,
    pool: mpsc::Receiver<AlignedBuf>,
) {
    let mut scratch = AlignedBuf::new(SPAN_GAP as usize * PAGE);
    for (epoch, pieces) in by_epoch.into_iter().enumerate() {
        if pieces.is_empty() {
            continue;
        }
        let r = &chain[epoch];
        let direct = direct_file(r);
        let Some(file) = direct.as_ref().or(r.file()) else {
            // Epochs read by ranges (a remote store) are restored lazily, or
            // fetched into a local store first.
            let _ = tx.send(Done::Failed(StoreError::Usage(
                "an eager restore reads local epoch files",
            )));
            return;
        };
        let data_at = r.header().sections[3].offset;
        let result = if r.header().codec == Codec::None {
            read_direct(ram, r, file, data_at, epoch, split(pieces), &mut scratch, &tx)
        } else {
            read_frames(r, file, data_at, epoch, pieces, &tx, &pool)
        };
        if let Err(e) = result {
            let _ = tx.send(Done::Failed(e));
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn read_direct(
    ram: &GuestRam,
    r: &EpochReader,
    file: &File,
    data_at: u64,
    epoch: usize,
    pieces: Vec<Piece>,
    scratch: &mut AlignedBuf,
    tx: &mpsc::SyncSender<Done>,
) -> Result<(), StoreError> {
    for span in spans(&pieces, |p| p * PAGE as u64) {
        let group = &pieces[span];
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(group.len() * 2);
        let mut next = group[0].page;
        for p in group {
            if p.page > next {
                iov.push(libc::iovec {
                    iov_base: scratch.as_mut_ptr().cast(),
                    iov_len: (p.page - next) as usize * PAGE,
                });
            }
            let len = p.count * PAGE as u64;
            let (_, host) = ram
                .host_addr(p.gfn * PAGE as u64, len)
                .ok_or_else(|| StoreError::Corrupt {
                    path: r.path().to_path_buf(),
                    why: format!("pages at guest frame {:#x} are not guest RAM", p.gfn),
                })?;
            iov.push(libc::iovec {
                iov_base: host as *mut libc::c_void,
                iov_len: len as usize,
            });
            next = p.page + p.count;
        }
        let total = (next - group[0].page) * PAGE as u64;
        let got = preadv_all(file, &mut iov, data_at + group[0].page * PAGE as u64, total)
            .map_err(io_err(r, "read pages"))?;
        if got != total {
            return Err(StoreError::Corrupt {
                path: r.path().to_path_buf(),
                why: "DATA section ends early: truncated?".into(),
            });
        }
        if tx
            .send(Done::Direct {
                epoch,
                pieces: group.to_vec(),
            })
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

fn read_frames(
    r: &EpochReader,
    file: &File,
    data_at: u64,
    epoch: usize,
    pieces: Vec<Piece>,
    tx: &mpsc::SyncSender<Done>,
    pool: &mpsc::Receiver<AlignedBuf>,
) -> Result<(), StoreError> {
    let frames = r.frames();
    // Frames holding needed pages, and the pieces in each run of frames.
    let mut i = 0;
    while i < pieces.len() {
        let Some((f0, _)) = r.frame_of(pieces[i].page) else {
            return Err(StoreError::Usage("page outside every frame"));
        };
        let start = data_at + frames[f0].offset;
        let mut f1 = f0;
        let mut j = i;
        while j < pieces.len() {
            let last = pieces[j].page + pieces[j].count - 1;
            let Some((fl, _)) = r.frame_of(last) else {
                return Err(StoreError::Usage("page outside every frame"));
            };
            let end = data_at + frames[fl].offset + u64::from(frames[fl].len);
            if end - start > SPAN - PAGE as u64 && j > i {
                break;
            }
            f1 = f1.max(fl);
            j += 1;
        }
        let end = data_at + frames[f1].offset + u64::from(frames[f1].len);
        let at = start / PAGE as u64 * PAGE as u64;
        let len = (end - at).next_multiple_of(PAGE as u64);
        let Ok(mut buf) = pool.recv() else {
            return Ok(());
        };
        if (buf.len() as u64) < len {
            buf = AlignedBuf::new(len as usize);
        }
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len as usize,
        }];
        let got = preadv_all(file, &mut iov, at, len).map_err(io_err(r, "read frames"))?;
        if got < end - at {
            return Err(StoreError::Corrupt {
                path: r.path().to_path_buf(),
                why: "DATA section ends early: truncated?".into(),
            });
        }
        let sent = tx.send(Done::Frames {
            epoch,
            buf,
            at,
            frames: f0..f1 + 1,
            pieces: pieces[i..j].to_vec(),
        });
        if sent.is_err() {
            return Ok(());
        }
        i = j;
    }
    Ok(())
}

/// Verify pages that were read straight into guest memory.
fn check_direct(ram: &GuestRam, r: &EpochReader, pieces: &[Piece]) -> Result<u64, StoreError> {
    let mut bytes = 0;
    for p in pieces {
        let len = p.count * PAGE as u64;
        let Some((_, host)) = ram.host_addr(p.gfn * PAGE as u64, len) else {
            return Err(StoreError::Usage("piece outside guest RAM"));
        };
        // SAFETY: [host, host + len) is guest RAM that the I/O thread has
        // finished reading into (the channel orders it before this), that no
        // vCPU runs on yet and that nothing else writes while we read.
        let pages = unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) };
        r.verify(p.page, pages)?;
        bytes += len;
    }
    Ok(bytes)
}

/// Check, decompress and verify the frames of one read; copy the needed
/// pages into guest memory.
fn check_frames(
    ram: &GuestRam,
    r: &EpochReader,
    done: (&[u8], u64, std::ops::Range<usize>, &[Piece]),
    out: &mut Vec<u8>,
    dec: &mut Decompressor,
) -> Result<u64, StoreError> {
    let (buf, at, frames, pieces) = done;
    let data_at = r.header().sections[3].offset;
    let mut bytes = 0;
    let mut pi = 0;
    let mut first_page = r.frame_of(pieces[0].page).map_or(0, |(_, f)| f);
    for fi in frames {
        let f = r.frames()[fi];
        let from = (data_at + f.offset - at) as usize;
        let stored = &buf[from..from + f.len as usize];
        let frame_end = first_page + u64::from(f.pages);
        // Only frames holding needed pages are decoded.
        while pi < pieces.len() && pieces[pi].page + pieces[pi].count <= first_page {
            pi += 1;
        }
        if pi < pieces.len() && pieces[pi].page < frame_end {
            out.resize(f.pages as usize * PAGE, 0);
            r.decode_frame(fi, stored, out, dec)?;
            let mut k = pi;
            while k < pieces.len() && pieces[k].page < frame_end {
                let p = pieces[k];
                let a = p.page.max(first_page);
                let b = (p.page + p.count).min(frame_end);
                let src = &out[(a - first_page) as usize * PAGE..(b - first_page) as usize * PAGE];
                r.verify(a, src)?;
                let gpa = (p.gfn + (a - p.page)) * PAGE as u64;
                ram.write_from(gpa, src).map_err(|e| StoreError::Corrupt {
                    path: r.path().to_path_buf(),
                    why: format!("pages at {gpa:#x}: {e}"),
                })?;
                bytes += b - a;
                k += 1;
            }
        }
        first_page = frame_end;
    }
    Ok(bytes * PAGE as u64)
}

/// Fill guest RAM from the plan of `chain`; `progress` receives the bytes
/// of page data done so far. Zero runs are left alone: fresh anonymous
/// memory is already zero. Returns the bytes of page data restored.
pub(crate) fn fill(
    ram: &GuestRam,
    chain: &[EpochReader],
    runs: &[store::Run],
    progress: &mut dyn FnMut(u64),
) -> Result<u64, StoreError> {
    let mut by_epoch: Vec<Vec<Piece>> = vec![Vec::new(); chain.len()];
    for run in runs {
        if let Source::Data { epoch, page } = run.source {
            by_epoch[epoch].push(Piece {
                page,
                gfn: run.gfn,
                count: run.count,
            });
        }
    }
    for list in &mut by_epoch {
        list.sort_by_key(|p| p.page);
    }
    let compressed = chain.iter().any(|r| r.header().codec != Codec::None);
    std::thread::scope(|s| {
        // Both channels live in this closure: returning early (a damaged
        // page) drops the receiver and the buffer pool's sender, which
        // wakes the I/O thread wherever it waits, before the scope joins it.
        let (tx, rx) = mpsc::sync_channel::<Done>(4);
        let (give, pool) = mpsc::sync_channel::<AlignedBuf>(BUFFERS);
        if compressed {
            for _ in 0..BUFFERS {
                let _ = give.send(AlignedBuf::new(SPAN as usize));
            }
        }
        let reader = std::thread::Builder::new()
            .name("restore-io".into())
            .spawn_scoped(s, move || read_all(ram, chain, by_epoch, tx, pool));
        if let Err(e) = reader {
            return Err(StoreError::Io {
                path: chain[0].path().to_path_buf(),
                op: "start the restore I/O thread",
                source: e,
            });
        }
        let mut bytes = 0;
        let mut out = Vec::new();
        let mut dec = Decompressor::default();
        // Dropping `rx` on an error stops the I/O thread at its next send.
        for done in rx {
            match done {
                Done::Direct { epoch, pieces } => bytes += check_direct(ram, &chain[epoch], &pieces)?,
                Done::Frames {
                    epoch,
                    buf,
                    at,
                    frames,
                    pieces,
                } => {
                    bytes += check_frames(ram, &chain[epoch], (&buf, at, frames, &pieces), &mut out, &mut dec)?;
                    let _ = give.send(buf);
                }
                Done::Failed(e) => return Err(e),
            }
            progress(bytes);
        }
        Ok(bytes)
    })
}
