//! `stop-copy`, the paper's baseline: while paused, take the dirty set
//! (KVM's log, the VMM's writes, pages handed back by failed epochs) and
//! copy those pages into a reused staging buffer; resume; the writer writes
//! and commits. The first epoch (or the one after a failed full epoch) is
//! full and written while paused.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use store::{EpochInfo, Mode};
use vmm::memory::PAGE_SIZE;

use crate::capture::error::{EpochFailure, SnapshotError};
use crate::capture::job::{Committed, EpochStats, JobFn};
use crate::capture::strategy::{EpochCtx, EpochFile, Strategy, capture_full_paused};
use crate::capture::target::Target;
use crate::capture::worker::Health;
use crate::pages::{self, PAGE, PageBuf, is_zero};

/// The staging buffer starts at this size (pre-faulted) and grows when needed.
const STAGING_START: usize = 16 << 20;

/// The `stop-copy` strategy.
#[derive(Debug, Default)]
pub(crate) struct StopCopy {
    /// Free staging buffers (one: an epoch is captured only once the previous one is done).
    staging: Arc<Mutex<Vec<PageBuf>>>,
    chunk: PageBuf,
}

impl Strategy for StopCopy {
    fn mode(&self) -> Mode {
        Mode::StopCopy
    }

    fn prepare(&mut self, t: &mut dyn Target, _health: &Arc<Health>) -> Result<(), SnapshotError> {
        t.set_dirty_logging(true)?;
        let size = (t.ram().size() as usize / 8).clamp(PAGE, STAGING_START);
        self.staging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pages::prefaulted(size));
        Ok(())
    }

    fn paused(&mut self, t: &mut dyn Target, ctx: &mut EpochCtx) -> Result<JobFn, EpochFailure> {
        if ctx.meta.full {
            return capture_full_paused(t, ctx, &mut self.chunk);
        }
        let t0 = Instant::now();
        let dirty = t.take_dirty()?;
        let dirty_time = t0.elapsed();
        let total = dirty.count() as usize;
        let ram = t.ram().clone();
        ctx.taken = Some(dirty);
        let dirty = ctx.taken.as_ref().map_or(&[][..], |d| &d.ranges[..]);
        let mut buf = self
            .staging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        let need = total * PAGE;
        if buf.len() < need {
            // Grown once and reused afterwards; fresh host pages cost a fault each.
            buf = pages::prefaulted(need.next_power_of_two());
        }
        let mut gfns = Vec::with_capacity(total);
        let mut at = 0;
        for (r, bits) in ram.ranges().iter().zip(dirty) {
            let gfn0 = r.gpa / PAGE_SIZE;
            for (first, n) in bits.runs() {
                let len = n as usize * PAGE;
                let copied = ram.read_to(r.gpa + first * PAGE_SIZE, &mut buf[at..at + len]);
                if let Err(e) = copied {
                    self.give_back(buf);
                    return Err(e.into());
                }
                at += len;
                gfns.extend(gfn0 + first..gfn0 + first + n);
            }
        }
        if let Err(e) = ctx.regions.stage() {
            self.give_back(buf);
            return Err(e);
        }
        let capture_time = t0.elapsed() - dirty_time;
        let file = ctx.take_file();
        let pool = self.staging.clone();
        Ok(Box::new(move |pause_ns| {
            let started = Instant::now();
            let r = write_incremental(file, &gfns, &mut buf, pause_ns);
            if buf.len() < need * 3 / 2 && need > 0 {
                // Fault the pages in now, so that the next pause does not pay for them.
                buf = pages::prefaulted((need * 3 / 2).min(ram.size() as usize));
            }
            pool.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
            Ok(Committed {
                info: r?,
                stats: EpochStats {
                    save_time: started.elapsed(),
                    dirty_time,
                    capture_time,
                    ..EpochStats::default()
                },
            })
        }))
    }
}

impl StopCopy {
    fn give_back(&self, buf: PageBuf) {
        self.staging.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    }
}

/// Write an incremental epoch from a staging buffer holding `gfns` in order.
/// Zero pages are only indexed; the others are moved together (a 4 KiB
/// copy costs far less than a write of its own) and go out as one write.
fn write_incremental(file: EpochFile, gfns: &[u64], buf: &mut [u8], pause_ns: u64) -> Result<EpochInfo, EpochFailure> {
    let mut w = file.open()?;
    let mut data = Vec::with_capacity(gfns.len());
    let mut zeros = Vec::new();
    for (i, &gfn) in gfns.iter().enumerate() {
        if is_zero(&buf[i * PAGE..(i + 1) * PAGE]) {
            zeros.push(gfn);
        } else {
            let j = data.len();
            if j != i {
                buf.copy_within(i * PAGE..(i + 1) * PAGE, j * PAGE);
            }
            data.push(gfn);
        }
    }
    w.pages_with_zeros(&data, &buf[..data.len() * PAGE], &zeros)?;
    file.regions.commit(w, pause_ns)
}
