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
use std::time::Duration;

use store::{EpochInfo, EpochMeta, EpochWriter, Mode, Store};
use vmm::dirty::DirtySet;
use vmm::memory::{GuestRam, PAGE_SIZE};

use crate::error::{EpochFailure, SnapshotError};
use crate::pages::{self, PageBuf};
use crate::target::Target;
use crate::worker::Health;

/// What a committed epoch cost, for the report.
#[derive(Debug, Clone, Default)]
pub struct EpochStats {
    /// Write-protect faults the guest took on this epoch's pages (cow).
    pub faults: u64,
    /// Pages copied aside by the fault handler before the guest wrote them (cow).
    pub pages_copied_aside: u64,
    /// Pages copied aside in all, on faults or ahead of the saver (cow).
    pub pages_captured: u64,
    /// Times the fault handler waited for copy-aside memory (cow overload).
    pub aside_waits: u64,
    /// write-protect calls made to arm this epoch (cow).
    pub protect_calls: u64,
    /// Pages whose hash was compared with the last epoch's (cow, `uffd` tracker).
    pub pages_examined: u64,
    /// Pages of hot blocks copied during the pause and left writable (cow, `uffd`).
    pub pages_in_pause: u64,
    /// Faults on blocks with nothing left to save: the guest's first write
    /// to a block since it was saved (how the `uffd` tracker learns of it).
    pub tracking_faults: u64,
    /// Time the fault handler spent serving this epoch's faults: what the
    /// writers waited, beyond the fault's own round trip (cow).
    pub fault_time: Duration,
    /// The longest single fault service (cow).
    pub fault_max: Duration,
    /// Of the pause: taking (and re-arming) the dirty set.
    pub dirty_time: Duration,
    /// Of the pause: copying pages (stop-copy) or write-protecting them (cow).
    pub capture_time: Duration,
    /// Time the background part took (writer or saver), resume to commit.
    pub save_time: Duration,
}

/// A committed epoch.
#[derive(Debug)]
pub struct Committed {
    /// Its file and header.
    pub info: EpochInfo,
    /// Costs.
    pub stats: EpochStats,
}

/// The background part of an epoch: gets the pause length in ns (for the
/// header) and commits the epoch.
pub type JobFn = Box<dyn FnOnce(u64) -> Result<Committed, EpochFailure> + Send>;

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
}

impl EpochCtx {
    /// Open the epoch's file and write its state.
    pub(crate) fn writer(&self) -> Result<EpochWriter, EpochFailure> {
        open_writer(&self.store, self.meta.clone(), &self.state, self.direct_io)
    }
}

/// Open an epoch file and write its state.
pub(crate) fn open_writer(
    store: &Store,
    meta: EpochMeta,
    state: &[u8],
    direct_io: bool,
) -> Result<EpochWriter, EpochFailure> {
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
    Ok(Box::new(move |pause_ns| {
        let started = std::time::Instant::now();
        let info = w.commit(pause_ns)?;
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
