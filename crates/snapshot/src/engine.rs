//! The stop-and-copy snapshot engine, run as a controller task.
//!
//! Every `interval` it pauses the VM and captures one epoch:
//! - **full** (`stop-copy-full`, and the first epoch of `stop-copy`): while
//!   paused, save the machine state and write every page of RAM to the epoch
//!   file (never-touched pages and zero pages only go in the index); resume;
//!   the writer thread fsyncs and commits.
//! - **incremental** (`stop-copy`): while paused, save the machine state,
//!   take the dirty set (KVM's dirty log, ORed with the pages the VMM itself
//!   wrote and with the pages of any epoch that failed to commit), copy those
//!   pages into a reused, pre-faulted staging buffer; resume; the writer
//!   thread writes, fsyncs and commits.
//!
//! An epoch counts only once its file is durable and renamed into place. A
//! failed epoch leaves nothing visible; its dirty pages carry over into the
//! next epoch (a failed full epoch makes the next one full), so no write is
//! ever lost from the chain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use store::{EpochMeta, Mode, Store, StoreError};
use vmm::machine::{Machine, MachineError};
use vmm::memory::RamRange;
use vmm::run::{Task, TaskFlow};
use vmm::vcpu::PauseAction;

use crate::pages::{self, PAGE};
use crate::writer::{Done, Job, Writer};

/// What to snapshot, where and how often.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Capture mode.
    pub mode: Mode,
    /// Time between the starts of two epochs.
    pub interval: Duration,
    /// Stop the VM when a snapshot fails (otherwise log it and keep running).
    pub stop_on_error: bool,
}

/// One committed epoch, for the report.
#[derive(Debug, Clone)]
pub struct EpochRecord {
    /// Epoch id.
    pub id: u64,
    /// Parent epoch.
    pub parent: Option<u64>,
    /// Full epoch.
    pub full: bool,
    /// Pages written with data.
    pub pages_data: u64,
    /// Pages recorded as zero.
    pub pages_zero: u64,
    /// Size of the epoch file.
    pub bytes: u64,
    /// Time the guest did not run (pause request to resume).
    pub pause: Duration,
    /// Of which: stopping the vCPUs.
    pub vcpu_pause: Duration,
    /// From the pause request to the epoch being durable and visible.
    pub durable: Duration,
}

/// What a capture produced while the VM was paused.
enum Captured {
    /// A full epoch with every page already written.
    Full(store::EpochWriter),
    /// Dirty pages copied to a staging buffer, in `gfns` order.
    Dirty {
        store: Arc<Store>,
        meta: EpochMeta,
        state: Vec<u8>,
        gfns: Vec<u64>,
        buf: Vec<u8>,
    },
}

/// Errors setting up the engine.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Arming dirty tracking failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The writer thread could not start.
    #[error("cannot start the snapshot writer thread: {0}")]
    Thread(std::io::Error),
}

struct InFlight {
    id: u64,
    parent: Option<u64>,
    full: bool,
    dirty: Vec<Vec<u64>>,
    started: Instant,
    pause: Duration,
    vcpu_pause: Duration,
}

/// The engine; see the module documentation.
pub struct SnapshotEngine {
    cfg: SnapshotConfig,
    store: Option<Arc<Store>>,
    parent: Option<u64>,
    need_full: bool,
    next_due: Instant,
    carry: Vec<Vec<u64>>,
    /// Free staging buffers (one: an epoch is captured only once the previous one is durable).
    staging: Vec<Vec<u8>>,
    writer: Option<Writer>,
    in_flight: Option<InFlight>,
    /// Committed epochs, in order.
    pub records: Vec<EpochRecord>,
    /// Errors, in order, each naming what failed.
    pub errors: Vec<String>,
    /// Times a snapshot waited for the previous one to become durable.
    pub delayed: u64,
    attempts: u64,
    fail_attempts: Vec<u64>,
}

impl std::fmt::Debug for SnapshotEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotEngine")
            .field("cfg", &self.cfg)
            .field("parent", &self.parent)
            .field("committed", &self.records.len())
            .finish_non_exhaustive()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn store_err(e: StoreError) -> String {
    e.to_string()
}

fn machine_err(e: MachineError) -> String {
    e.to_string()
}

/// Test hook: `CONSNAP_FAIL_EPOCHS=3,4` makes the 3rd and 4th capture
/// attempts of this process fail after the VM resumed, as a failed write
/// would, so tests can check that no dirty page is lost.
fn fault_injection() -> Vec<u64> {
    std::env::var("CONSNAP_FAIL_EPOCHS")
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The staging buffer starts at this size (pre-faulted) and grows when needed.
const STAGING_START: usize = 16 << 20;

impl SnapshotEngine {
    /// An engine writing to `cfg.dir`. `parent` is the epoch of that store
    /// the VM was restored from (the first epoch may then be incremental).
    pub fn new(cfg: SnapshotConfig, parent: Option<u64>) -> SnapshotEngine {
        let mut e = SnapshotEngine {
            next_due: Instant::now() + cfg.interval,
            cfg,
            store: None,
            parent,
            need_full: parent.is_none(),
            carry: Vec::new(),
            staging: Vec::new(),
            writer: None,
            in_flight: None,
            records: Vec::new(),
            errors: Vec::new(),
            delayed: 0,
            attempts: 0,
            fail_attempts: fault_injection(),
        };
        if let Err(msg) = e.open_store() {
            e.fail(msg);
        }
        e
    }

    fn open_store(&mut self) -> Result<Arc<Store>, String> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let s = Arc::new(
            Store::open_or_create(&self.cfg.dir)
                .map_err(|e| format!("snapshot directory unusable, VM keeps running without snapshots: {e}"))?,
        );
        self.store = Some(s.clone());
        Ok(s)
    }

    /// Record a failure and tell the user once, on stderr (the VM keeps running).
    fn fail(&mut self, msg: String) {
        tracing::debug!(error = %msg, "snapshot failed");
        eprintln!("consnap: snapshot error: {msg}");
        self.errors.push(msg);
    }

    /// Arm dirty tracking before the vCPUs start, so that an incremental
    /// epoch after a restore misses no write, and pre-fault staging memory.
    pub fn prepare(&mut self, m: &mut Machine) -> Result<(), SnapshotError> {
        if self.cfg.mode == Mode::StopCopy {
            m.set_dirty_logging(true)?;
            // One buffer: an epoch is captured only after the previous one is durable.
            let size = (m.config().mem_size as usize / 8).clamp(PAGE, STAGING_START);
            self.staging = vec![pages::prefaulted(size)];
        }
        self.writer = Some(Writer::start().map_err(SnapshotError::Thread)?);
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &SnapshotConfig {
        &self.cfg
    }

    /// Wait for the epoch being written, if any. Returns an error message if it failed.
    pub fn finish(&mut self) -> Option<String> {
        self.collect(true)
    }

    /// Process finished writes; returns the first failure message.
    fn collect(&mut self, block: bool) -> Option<String> {
        let mut failure = None;
        while self.in_flight.is_some() {
            let Some(done) = self.writer.as_ref().and_then(|w| w.done(block)) else {
                break;
            };
            if let Some(msg) = self.complete(done) {
                failure.get_or_insert(msg);
            }
        }
        failure
    }

    fn complete(&mut self, done: Done) -> Option<String> {
        let f = self.in_flight.take()?;
        if let Some(buf) = done.buf {
            self.staging.push(buf);
        }
        match done.result {
            Ok(info) => {
                self.parent = Some(f.id);
                let h = &info.header;
                self.records.push(EpochRecord {
                    id: f.id,
                    parent: f.parent,
                    full: f.full,
                    pages_data: h.pages_data,
                    pages_zero: h.pages_zero,
                    bytes: info.file_bytes,
                    pause: f.pause,
                    vcpu_pause: f.vcpu_pause,
                    durable: done.finished.duration_since(f.started),
                });
                tracing::info!(epoch = f.id, pages = h.pages_data, "epoch committed");
                None
            }
            Err(e) => {
                self.lost(f.full, f.dirty);
                let msg = format!("epoch {} was not committed: {}", f.id, store_err(e));
                self.fail(msg.clone());
                Some(msg)
            }
        }
    }

    /// An epoch did not make it: keep its pages for the next one.
    fn lost(&mut self, full: bool, dirty: Vec<Vec<u64>>) {
        if full {
            self.need_full = true;
        }
        for (i, d) in dirty.into_iter().enumerate() {
            if self.carry.len() <= i {
                self.carry.resize(i + 1, Vec::new());
            }
            pages::or_into(&mut self.carry[i], &d);
        }
    }

    fn meta(&self, m: &Machine, id: u64, full: bool, created_ns: u64) -> EpochMeta {
        EpochMeta {
            id,
            parent: if full { None } else { self.parent },
            mode: self.cfg.mode,
            full,
            created_ns,
            vcpus: u32::from(m.config().vcpus),
            mem_size: m.config().mem_size,
            guest_ops: vmm::guest_status::read(m.ram()).map(|s| s.ops_done),
        }
    }

    /// Take one epoch now (the previous one must be finished). Errors are
    /// returned, not yet recorded.
    fn snapshot(&mut self, m: &mut Machine) -> Result<(), String> {
        let store = self.open_store()?;
        let id = store.next_id().map_err(store_err)?;
        let full = self.need_full || self.cfg.mode == Mode::StopCopyFull;
        let ranges = m.ram().ranges().to_vec();
        let started = Instant::now();
        let created_ns = now_ns();
        let paused = match m.pause(PauseAction::SaveState) {
            Ok(p) => p,
            // The guest is powering off: there is nothing left to protect.
            Err(MachineError::Vcpu(vmm::vcpu::VcpuError::Stopping)) => return Ok(()),
            Err(e) => return Err(machine_err(e)),
        };
        let vcpu_pause = paused.latency;
        let captured = match m.save_state(paused) {
            Ok(state) => {
                let state = vmm::state::encode(&state);
                let meta = self.meta(m, id, full, created_ns);
                if full {
                    self.capture_full(m, &store, meta, &state, &ranges)
                } else {
                    self.capture_dirty(m, &store, meta, state, &ranges)
                }
            }
            Err(e) => Err(machine_err(e)),
        };
        m.resume().map_err(machine_err)?;
        let pause = started.elapsed();
        let (job, dirty) = match captured {
            Ok(v) => v,
            Err(e) => {
                // Dirty logs may already have been read and cleared: only a
                // full epoch is safe next.
                self.need_full = true;
                return Err(format!("epoch {id}: {e}"));
            }
        };
        self.attempts += 1;
        if self.fail_attempts.contains(&self.attempts) {
            if let Captured::Dirty { buf, .. } = job {
                self.staging.push(buf);
            }
            self.lost(full, dirty);
            return Err(format!("epoch {id}: injected failure (CONSNAP_FAIL_EPOCHS)"));
        }
        let pause_ns = pause.as_nanos() as u64;
        let job = match job {
            Captured::Full(writer) => Job::Commit { writer, pause_ns },
            Captured::Dirty {
                store,
                meta,
                state,
                gfns,
                buf,
            } => Job::Write {
                reserve: (gfns.len() * PAGE * 3 / 2).min(m.config().mem_size as usize),
                store,
                meta,
                state,
                gfns,
                buf,
                pause_ns,
            },
        };
        if !self.writer.as_ref().is_some_and(|w| w.submit(job)) {
            self.lost(full, dirty);
            return Err(format!("epoch {id}: the writer thread is gone"));
        }
        if full {
            self.need_full = false;
        }
        self.in_flight = Some(InFlight {
            id,
            parent: if full { None } else { self.parent },
            full,
            dirty,
            started,
            pause,
            vcpu_pause,
        });
        Ok(())
    }

    /// While paused: reset dirty tracking and write every page of RAM.
    fn capture_full(
        &mut self,
        m: &Machine,
        store: &Arc<Store>,
        meta: EpochMeta,
        state: &[u8],
        ranges: &[RamRange],
    ) -> Result<(Captured, Vec<Vec<u64>>), String> {
        for r in ranges {
            if m.dirty_logging() {
                m.take_dirty_log(r).map_err(machine_err)?;
            }
            m.ram().take_vmm_dirty(r);
        }
        self.carry.clear();
        let mut w = store.writer(meta).map_err(store_err)?;
        w.write_state(state).map_err(store_err)?;
        for r in ranges {
            // SAFETY: every vCPU is paused and nothing else writes guest RAM.
            let mem = unsafe { m.ram().range_bytes(r) };
            let present = pages::populated(mem.as_ptr(), r.pages());
            let gfn0 = r.gpa / PAGE as u64;
            let mut p = 0u64;
            while p < r.pages() {
                let data = |p: u64| {
                    present[(p / 64) as usize] & (1 << (p % 64)) != 0
                        && !pages::is_zero(&mem[p as usize * PAGE..(p as usize + 1) * PAGE])
                };
                let kind = data(p);
                let mut end = p + 1;
                while end < r.pages() && data(end) == kind {
                    end += 1;
                }
                if kind {
                    w.data_pages(gfn0 + p, &mem[p as usize * PAGE..end as usize * PAGE])
                        .map_err(store_err)?;
                } else {
                    w.zero_pages(gfn0 + p, end - p).map_err(store_err)?;
                }
                p = end;
            }
        }
        Ok((Captured::Full(w), Vec::new()))
    }

    /// While paused: take the dirty set and copy those pages to a staging buffer.
    fn capture_dirty(
        &mut self,
        m: &Machine,
        store: &Arc<Store>,
        meta: EpochMeta,
        state: Vec<u8>,
        ranges: &[RamRange],
    ) -> Result<(Captured, Vec<Vec<u64>>), String> {
        let mut dirty = Vec::with_capacity(ranges.len());
        for (i, r) in ranges.iter().enumerate() {
            let mut bits = m.take_dirty_log(r).map_err(machine_err)?;
            pages::or_into(&mut bits, &m.ram().take_vmm_dirty(r));
            if let Some(c) = self.carry.get_mut(i) {
                pages::or_into(&mut bits, c);
                c.clear();
            }
            dirty.push(bits);
        }
        let total: u64 = dirty.iter().map(|d| pages::count(d)).sum();
        let mut buf = self.staging.pop().unwrap_or_default();
        let need = total as usize * PAGE;
        if buf.len() < need {
            // Grown once and reused afterwards; fresh host pages cost a fault each.
            buf = pages::prefaulted(need.next_power_of_two());
        }
        let mut gfns = Vec::with_capacity(total as usize);
        let mut at = 0;
        for (r, bits) in ranges.iter().zip(&dirty) {
            // SAFETY: every vCPU is paused and nothing else writes guest RAM.
            let mem = unsafe { m.ram().range_bytes(r) };
            let gfn0 = r.gpa / PAGE as u64;
            for p in pages::set_bits(bits, r.pages()) {
                let src = &mem[p as usize * PAGE..(p as usize + 1) * PAGE];
                buf[at..at + PAGE].copy_from_slice(src);
                at += PAGE;
                gfns.push(gfn0 + p);
            }
        }
        let job = Captured::Dirty {
            store: store.clone(),
            meta,
            state,
            gfns,
            buf,
        };
        Ok((job, dirty))
    }
}

impl Task for SnapshotEngine {
    fn due(&self) -> Option<Instant> {
        Some(self.next_due)
    }

    fn run(&mut self, m: &mut Machine) -> TaskFlow {
        let started = Instant::now();
        // Failures of earlier epochs are recorded as their writes finish.
        let mut failure = self.collect(false);
        if self.in_flight.is_some() {
            // The previous epoch is still being written: its successor needs it as parent.
            self.delayed += 1;
            if let Some(f) = self.collect(true) {
                failure.get_or_insert(f);
            }
        }
        if (failure.is_none() || !self.cfg.stop_on_error)
            && let Err(e) = self.snapshot(m)
        {
            self.fail(e.clone());
            failure.get_or_insert(e);
        }
        self.next_due = (started + self.cfg.interval).max(Instant::now());
        match failure {
            Some(msg) if self.cfg.stop_on_error => TaskFlow::Stop(format!("stopping on snapshot failure: {msg}")),
            _ => TaskFlow::Continue,
        }
    }
}
