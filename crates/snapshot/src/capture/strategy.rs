//! Capture modes as strategies behind one small interface:
//! - `prepare`, before the vCPUs start (arm dirty logging, register memory,
//!   start threads);
//! - `paused`, while every vCPU is stopped and the machine state has been
//!   captured: take what the epoch must take now and return the job that
//!   finishes it;
//! - the job, which the writer thread runs after the VM resumed, and which
//!   commits the epoch.
//!
//! `stop-copy-full`, `stop-copy` and `cow` are three implementations.

use std::sync::Arc;

use store::{EpochMeta, EpochWriter, Mode, Store};
use vmm::dirty::DirtySet;
use vmm::memory::{GuestRam, PAGE_SIZE};

use crate::capture::error::{EpochFailure, SnapshotError};
use crate::capture::job::{Committed, EpochStats, JobFn};
use crate::capture::regions::RegionCapture;
use crate::capture::target::Target;
use crate::capture::worker::Health;
use crate::pages::{self, PageBuf};

/// One epoch being captured.
pub struct EpochCtx {
    /// The store it goes to.
    pub store: Arc<Store>,
    /// Its header fields.
    pub meta: EpochMeta,
    /// Encoded machine state.
    pub state: Vec<u8>,
    /// The dirty set the strategy took from the machine, so that a failure
    /// can hand it back.
    pub taken: Option<DirtySet>,
    /// Write page data with O_DIRECT.
    pub direct_io: bool,
    /// The epoch's regions besides RAM (disks), taken and frozen.
    pub regions: RegionCapture,
    /// The interval asked for (epochs may come later when saving lags).
    pub interval: std::time::Duration,
}

impl EpochCtx {
    /// Open the epoch's file and write its state.
    pub(crate) fn writer(&self) -> Result<EpochWriter, EpochFailure> {
        open_writer(&self.store, self.meta.clone(), &self.state, self.direct_io)
    }

    /// What the background job needs to write and commit the epoch (the
    /// state and the regions move into it).
    pub(crate) fn take_file(&mut self) -> EpochFile {
        EpochFile {
            store: self.store.clone(),
            meta: self.meta.clone(),
            state: std::mem::take(&mut self.state),
            direct_io: self.direct_io,
            regions: std::mem::take(&mut self.regions),
        }
    }
}

/// An epoch's file as its background job writes it: where it goes, its
/// header fields and state, and its regions, written after RAM's pages.
pub(crate) struct EpochFile {
    pub store: Arc<Store>,
    pub meta: EpochMeta,
    pub state: Vec<u8>,
    pub direct_io: bool,
    pub regions: RegionCapture,
}

impl EpochFile {
    /// Open the file and write the state; RAM's pages come next.
    pub(crate) fn open(&self) -> Result<EpochWriter, EpochFailure> {
        open_writer(&self.store, self.meta.clone(), &self.state, self.direct_io)
    }
}

/// Open an epoch file and write its state.
fn open_writer(store: &Store, meta: EpochMeta, state: &[u8], direct_io: bool) -> Result<EpochWriter, EpochFailure> {
    let mut w = store.writer(meta)?;
    if direct_io {
        w.use_direct_io();
    }
    w.write_state(state)?;
    Ok(w)
}

/// A capture mode.
pub(crate) trait Strategy: Send {
    /// The mode recorded in epoch headers.
    fn mode(&self) -> Mode;
    /// True when every epoch is full.
    fn always_full(&self) -> bool {
        false
    }
    /// Before the vCPUs start.
    fn prepare(&mut self, t: &mut dyn Target, health: &Arc<Health>) -> Result<(), SnapshotError>;
    /// While paused, after the state was captured. Fills `ctx.taken` with
    /// any dirty set it takes.
    fn paused(&mut self, t: &mut dyn Target, ctx: &mut EpochCtx) -> Result<JobFn, EpochFailure>;
    /// The epoch in flight was committed (`ok`) or failed, as the engine
    /// learned from its job.
    fn finished(&mut self, _ok: bool) {}
    /// Give up on the epoch in flight (its job will not run or must not
    /// commit): release whatever it holds, such as write protection.
    fn abort(&mut self) {}
    /// Stop background threads at the end of the run.
    fn shutdown(&mut self) {}
}

/// Pages per copy while writing a full epoch.
const FULL_CHUNK_PAGES: u64 = 2048;

/// While paused: reset dirty tracking and write every page of RAM to a new
/// epoch (never-touched and zero pages only in the index); the job commits it.
pub(crate) fn capture_full_paused(
    t: &mut dyn Target,
    ctx: &mut EpochCtx,
    chunk: &mut PageBuf,
) -> Result<JobFn, EpochFailure> {
    // Everything written so far is in this epoch.
    drop(t.take_dirty()?);
    let ram = t.ram().clone();
    let mut w = ctx.writer()?;
    write_all_pages(&ram, &mut w, chunk)?;
    ctx.regions.write(&mut w)?;
    let regions = std::mem::take(&mut ctx.regions);
    Ok(Box::new(move |pause_ns| {
        let started = std::time::Instant::now();
        let info = regions.commit(w, pause_ns)?;
        Ok(Committed {
            info,
            stats: EpochStats {
                save_time: started.elapsed(),
                ..EpochStats::default()
            },
        })
    }))
}

/// Write every page of `ram` in order, reading populated pages through a
/// reused chunk buffer. The caller guarantees nothing writes RAM meanwhile.
fn write_all_pages(ram: &GuestRam, w: &mut EpochWriter, chunk: &mut PageBuf) -> Result<(), EpochFailure> {
    let want = (FULL_CHUNK_PAGES * PAGE_SIZE) as usize;
    if chunk.len() < want {
        *chunk = pages::prefaulted(want);
    }
    for r in ram.ranges() {
        let present = pages::may_hold_data(ram, r);
        let gfn0 = r.gpa / PAGE_SIZE;
        let mut p = 0;
        while p < r.pages() {
            let n = (r.pages() - p).min(FULL_CHUNK_PAGES);
            let buf = &mut chunk[..(n * PAGE_SIZE) as usize];
            let any = (p..p + n).any(|q| present.get(q));
            if any {
                ram.read_to(r.gpa + p * PAGE_SIZE, buf)?;
            }
            let is_data = |q: u64| {
                present.get(q) && !pages::is_zero(&buf[((q - p) * PAGE_SIZE) as usize..][..PAGE_SIZE as usize])
            };
            let mut q = p;
            while q < p + n {
                let kind = is_data(q);
                let mut end = q + 1;
                while end < p + n && is_data(end) == kind {
                    end += 1;
                }
                if kind {
                    let a = ((q - p) * PAGE_SIZE) as usize;
                    let b = ((end - p) * PAGE_SIZE) as usize;
                    w.data_pages(gfn0 + q, &buf[a..b])?;
                } else {
                    w.zero_pages(gfn0 + q, end - q)?;
                }
                q = end;
            }
            p += n;
        }
    }
    Ok(())
}

/// `stop-copy-full`: pause, write all memory and state, resume.
#[derive(Debug, Default)]
pub(crate) struct StopCopyFull {
    chunk: PageBuf,
}

impl Strategy for StopCopyFull {
    fn mode(&self) -> Mode {
        Mode::StopCopyFull
    }

    fn always_full(&self) -> bool {
        true
    }

    fn prepare(&mut self, _t: &mut dyn Target, _health: &Arc<Health>) -> Result<(), SnapshotError> {
        Ok(())
    }

    fn paused(&mut self, t: &mut dyn Target, ctx: &mut EpochCtx) -> Result<JobFn, EpochFailure> {
        capture_full_paused(t, ctx, &mut self.chunk)
    }
}
