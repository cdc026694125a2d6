//! The engine against a fake machine (no KVM): a "guest" thread writes
//! pseudo-random pages of real guest RAM through vm-memory (so the VMM
//! dirty bitmap tracks them, as KVM's log would) and sectors of a real
//! disk image through the device's `DiskImage` (as virtio-blk would), and
//! every pause takes a reference copy of all of RAM and of the disk. Every
//! committed epoch, restored through its chain, must equal the reference
//! copies of its own pause, page for page and block for block, in every
//! capture mode and whatever failures are injected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapshot::{Captured, CowOptions, CowTestHooks, Inject, Mode, SnapshotConfig, SnapshotEngine, Target, TargetError};
use store::{Access, Source, Store};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::disk::DiskImage;
use vmm::dirty::DirtySet;
use vmm::memory::GuestRam;
use vmm::region::Region;
use vmm::run::TaskFlow;

const RAM: u64 = 32 << 20;
const PAGE: u64 = 4096;
/// The guest writes within this many bytes of RAM (plus zeroing some pages).
const WSS: u64 = 12 << 20;
/// The fake disk: small, so that the guest rewrites its blocks often.
const DISK: u64 = 1 << 20;

#[derive(Default)]
struct GuestCtl {
    want_pause: bool,
    paused: bool,
    stop: bool,
}

struct Fake {
    ram: Arc<GuestRam>,
    _disk_dir: vmm::testing::TestDir,
    disk: Arc<DiskImage>,
    disk_refs: HashMap<u64, Vec<u8>>,
    ctl: Arc<(Mutex<GuestCtl>, Condvar)>,
    writes: Arc<AtomicU64>,
    guest: Option<JoinHandle<()>>,
    seq: u64,
    refs: HashMap<u64, Vec<u8>>,
    redirty: DirtySet,
    /// Emulates KVM's manual re-arm mode: reported pages stay reported
    /// until re-armed.
    manual: Option<DirtySet>,
}

impl Fake {
    fn new(huge: bool) -> Fake {
        let ram = Arc::new(GuestRam::with_huge_pages(RAM, huge).unwrap());
        let disk_dir = vmm::testing::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "fake-disk");
        let img = disk_dir.path().join("d.img");
        // Some data before snapshots start; the rest of the image is a hole.
        let mut start = vec![0u8; DISK as usize / 2];
        start[..8192].fill(3);
        std::fs::write(&img, &start).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(DISK)
            .unwrap();
        let disk = Arc::new(DiskImage::open(&img, false).unwrap());
        let ctl: Arc<(Mutex<GuestCtl>, Condvar)> = Arc::default();
        let writes = Arc::new(AtomicU64::new(0));
        let redirty = DirtySet::empty(ram.ranges());
        // Some memory is written before snapshots start, as a loader would.
        ram.memory()
            .write_slice(&[7u8; 3 * PAGE as usize], GuestAddress(5 * PAGE))
            .unwrap();
        Fake {
            ram,
            _disk_dir: disk_dir,
            disk,
            disk_refs: HashMap::new(),
            ctl,
            writes,
            guest: None,
            seq: 0,
            refs: HashMap::new(),
            redirty,
            manual: None,
        }
    }

    /// Start the guest, as vCPUs start: after the engine is prepared.
    fn start(&mut self) {
        let (r, d, c, w) = (
            self.ram.clone(),
            self.disk.clone(),
            self.ctl.clone(),
            self.writes.clone(),
        );
        self.guest = Some(std::thread::spawn(move || guest(&r, &d, &c, &w)));
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        self.ctl.0.lock().unwrap().stop = true;
        self.ctl.1.notify_all();
        if let Some(g) = self.guest.take() {
            g.join().unwrap();
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The fake guest: batches of writes of a counter, half at pseudo-random
/// places in a hot first MiB, half sweeping slowly through the working set
/// (so that a page is often written in one epoch only: an epoch that lost
/// its pages would show), now and then a whole page of zeros; it parks
/// whenever a pause is asked.
fn guest(ram: &GuestRam, disk: &DiskImage, ctl: &(Mutex<GuestCtl>, Condvar), writes: &AtomicU64) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut n: u64 = 0;
    loop {
        {
            let mut g = ctl.0.lock().unwrap();
            if g.stop {
                return;
            }
            if g.want_pause {
                g.paused = true;
                ctl.1.notify_all();
                while g.want_pause && !g.stop {
                    g = ctl.1.wait(g).unwrap();
                }
                g.paused = false;
                continue;
            }
        }
        for _ in 0..32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            n += 1;
            let at = if n.is_multiple_of(2) {
                (x % (1 << 20)) & !7
            } else {
                ((n / 64 * PAGE) % WSS + (x % PAGE)) & !7
            };
            if n.is_multiple_of(997) {
                let page = at & !(PAGE - 1);
                ram.memory()
                    .write_slice(&[0u8; PAGE as usize], GuestAddress(page))
                    .unwrap();
            } else {
                ram.memory().write_obj(n, GuestAddress(at)).unwrap();
            }
        }
        // The device writes a few sectors of the disk, now and then a
        // whole block of zeros.
        let sector = (x >> 20) % (DISK / 512 - 8);
        let data = if n.is_multiple_of(31) {
            [0u8; 2048]
        } else {
            [(n % 251) as u8 + 1; 2048]
        };
        disk.write_at(&data[..512 * (1 + (x % 4) as usize)], sector * 512)
            .unwrap();
        writes.fetch_add(32, Ordering::Relaxed);
    }
}

impl Target for Fake {
    fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
    fn vcpus(&self) -> u32 {
        1
    }
    fn set_dirty_logging(&mut self, _on: bool) -> Result<(), TargetError> {
        Ok(())
    }
    fn pause_and_capture(&mut self) -> Result<Option<Captured>, TargetError> {
        let t = Instant::now();
        let mut g = self.ctl.0.lock().unwrap();
        g.want_pause = true;
        while !g.paused && !g.stop {
            g = self.ctl.1.wait(g).unwrap();
        }
        drop(g);
        self.seq += 1;
        let mut copy = vec![0u8; RAM as usize];
        self.ram.read_to(0, &mut copy).unwrap();
        self.refs.insert(self.seq, copy);
        let mut disk = vec![0u8; DISK as usize];
        self.disk.read_at(&mut disk, 0).unwrap();
        self.disk_refs.insert(self.seq, disk);
        let mut state = self.seq.to_le_bytes().to_vec();
        state.extend_from_slice(b"fake machine state");
        Ok(Some(Captured {
            state,
            vcpu_pause: t.elapsed(),
        }))
    }
    fn resume(&mut self) -> Result<(), TargetError> {
        self.ctl.0.lock().unwrap().want_pause = false;
        self.ctl.1.notify_all();
        Ok(())
    }
    fn set_manual_rearm(&mut self) -> Result<bool, TargetError> {
        self.manual = Some(DirtySet::empty(self.ram.ranges()));
        Ok(true)
    }
    fn rearm_dirty(&mut self, pages: &DirtySet) -> Result<(), TargetError> {
        if let Some(log) = &mut self.manual {
            log.remove(pages);
        }
        Ok(())
    }
    fn take_dirty(&mut self) -> Result<DirtySet, TargetError> {
        let mut d = DirtySet::empty(self.ram.ranges());
        for (r, bits) in self.ram.ranges().iter().zip(d.ranges.iter_mut()) {
            bits.or_words(&self.ram.take_vmm_dirty(r));
        }
        if let Some(log) = &mut self.manual {
            log.or(&d);
            d = log.clone();
        }
        d.or(&self.redirty);
        self.redirty = DirtySet::empty(self.ram.ranges());
        Ok(d)
    }
    fn regions(&self) -> Vec<Arc<dyn Region>> {
        vec![self.disk.clone()]
    }
    fn mark_dirty(&mut self, pages: &DirtySet) {
        self.redirty.or(pages);
    }
    fn progress(&self) -> Option<u64> {
        Some(self.writes())
    }
}

/// A directory removed when the test passes, kept (and named) when it fails.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn config(dir: &Path, mode: Mode, cow: CowOptions) -> SnapshotConfig {
    SnapshotConfig {
        dir: dir.to_path_buf(),
        mode,
        interval: Duration::from_millis(5),
        stop_after: None,
        cow,
        direct_io: true,
        max_lag: Some(Duration::from_secs(1)),
        max_store: None,
        max_chain: 0,
    }
}

/// Tick the engine until `epochs` epochs are committed (or a tick says stop).
fn run_epochs(engine: &mut SnapshotEngine, fake: &mut Fake, epochs: usize) -> TaskFlow {
    let deadline = Instant::now() + Duration::from_secs(120);
    while engine.records.len() < epochs {
        assert!(Instant::now() < deadline, "timed out: {:?}", engine.errors);
        // Let the guest write between epochs.
        let before = fake.writes();
        while fake.writes() < before + 2000 {
            assert!(
                Instant::now() < deadline,
                "timed out: the fake guest does not write (not started?)"
            );
            std::thread::yield_now();
        }
        if let TaskFlow::Stop(why) = engine.tick(fake) {
            return TaskFlow::Stop(why);
        }
    }
    TaskFlow::Continue
}

/// Rebuild RAM and the disk as epoch `id` restores them, and the pause
/// it belongs to.
fn image(store: &Store, id: u64) -> (u64, Vec<u8>, Vec<u8>) {
    let chain = store.chain(id).unwrap();
    let state = chain[0].state().unwrap();
    let seq = u64::from_le_bytes(state[..8].try_into().unwrap());
    let mut img = vec![0u8; RAM as usize];
    let mut disk = vec![0u8; DISK as usize];
    let disk_base = store::format::unit_addr(1, 0);
    for run in store::plan(&chain).unwrap() {
        if let Source::Data { epoch, page } = run.source {
            let (buf, first) = if run.gfn >= disk_base {
                (&mut disk, run.gfn - disk_base)
            } else {
                (&mut img, run.gfn)
            };
            let at = (first * PAGE) as usize;
            chain[epoch]
                .read_pages(page, &mut buf[at..at + (run.count * PAGE) as usize])
                .unwrap();
        }
    }
    (seq, img, disk)
}

/// Every committed epoch restores to its reference copy; returns how many.
fn check_all(dir: &Path, fake: &Fake) -> usize {
    let store = Store::open(dir, Access::Read).unwrap();
    let ids = store.ids().unwrap();
    for &id in &ids {
        let (seq, img, disk) = image(&store, id);
        let want = &fake.refs[&seq];
        if let Some(p) = (0..RAM / PAGE).find(|p| {
            let r = (p * PAGE) as usize..((p + 1) * PAGE) as usize;
            img[r.clone()] != want[r]
        }) {
            panic!("epoch {id} (pause {seq}) differs from guest memory at its pause, first at page {p}");
        }
        let want = &fake.disk_refs[&seq];
        if let Some(b) = (0..DISK / PAGE).find(|b| {
            let r = (b * PAGE) as usize..((b + 1) * PAGE) as usize;
            disk[r.clone()] != want[r]
        }) {
            panic!("epoch {id} (pause {seq}) differs from the disk at its pause, first at block {b}");
        }
    }
    ids.len()
}

/// Run 12 epochs of `mode` and check each; returns their figures.
fn exact(name: &str, mode: Mode, cow: CowOptions, huge: bool) -> Vec<snapshot::EpochStats> {
    let dir = Dir::new(name);
    let mut fake = Fake::new(huge);
    let mut engine = SnapshotEngine::new(config(&dir.0, mode, cow), None).unwrap();
    engine.prepare(&mut fake).unwrap();
    fake.start();
    assert!(matches!(run_epochs(&mut engine, &mut fake, 12), TaskFlow::Continue));
    assert!(engine.finish(&mut fake).is_none(), "{:?}", engine.errors);
    fake.stop();
    assert!(engine.errors.is_empty(), "{:?}", engine.errors);
    assert_eq!(check_all(&dir.0, &fake), engine.records.len());
    if mode == Mode::Cow {
        let faults: u64 = engine.records.iter().map(|r| r.stats.faults).sum();
        assert!(faults > 0, "the guest never raced the saver: the test proves nothing");
    }
    engine.records.iter().map(|r| r.stats.clone()).collect()
}

#[test]
fn stop_copy_epochs_are_exact() {
    exact("stop-copy", Mode::StopCopy, CowOptions::default(), true);
}

#[test]
fn stop_copy_full_epochs_are_exact() {
    exact("full", Mode::StopCopyFull, CowOptions::default(), true);
}

#[test]
fn cow_epochs_are_exact_with_huge_blocks() {
    exact("cow-2m", Mode::Cow, CowOptions::default(), true);
}

#[test]
fn cow_epochs_are_exact_with_small_blocks() {
    let cow = CowOptions {
        block_pages: 1,
        ..CowOptions::default()
    };
    exact("cow-4k", Mode::Cow, cow, false);
}

#[test]
fn cow_with_the_dirty_log_tracker_is_exact() {
    let cow = CowOptions {
        tracker: snapshot::Tracker::DirtyLog,
        // This tracker protects only the pages just written, and the saver
        // can be done before the guest writes one again; a late saver makes
        // the guest meet protected pages even on a loaded machine.
        test: CowTestHooks {
            saver_delay: Duration::from_millis(20),
            ..CowTestHooks::default()
        },
        ..CowOptions::default()
    };
    exact("cow-dirty-log", Mode::Cow, cow, true);
}

#[test]
fn cow_with_the_dirty_log_tracker_and_small_blocks_is_exact() {
    let cow = CowOptions {
        tracker: snapshot::Tracker::DirtyLog,
        block_pages: 1,
        ..CowOptions::default()
    };
    exact("cow-dirty-log-4k", Mode::Cow, cow, false);
}

#[test]
fn cow_with_little_aside_memory_waits_but_stays_exact() {
    let cow = CowOptions {
        block_pages: 1,
        aside_bytes: 16 * 4096,
        // The saver, which frees copy-aside memory, starts late: the guest
        // fills the 16 pages meanwhile, and its next fault must wait.
        test: CowTestHooks {
            saver_delay: Duration::from_millis(20),
            ..CowTestHooks::default()
        },
        ..CowOptions::default()
    };
    let stats = exact("cow-small-aside", Mode::Cow, cow, false);
    let waits: u64 = stats.iter().map(|s| s.aside_waits).sum();
    assert!(
        waits > 0,
        "no fault waited for copy-aside memory: the test proves nothing ({stats:?})"
    );
}

/// Mutation check: a disk that overwrites blocks of the epoch being saved
/// without copying them aside first must make some epoch differ from the
/// disk at its pause.
#[test]
fn a_disk_without_copy_aside_is_caught() {
    let dir = Dir::new("disk-mutant");
    let mut fake = Fake::new(true);
    fake.disk.test_skip_copy_aside(true);
    // The saver starts late: the guest rewrites frozen blocks meanwhile.
    let cow = CowOptions {
        test: CowTestHooks {
            saver_delay: Duration::from_millis(20),
            ..CowTestHooks::default()
        },
        ..CowOptions::default()
    };
    let mut engine = SnapshotEngine::new(config(&dir.0, Mode::Cow, cow), None).unwrap();
    engine.prepare(&mut fake).unwrap();
    fake.start();
    run_epochs(&mut engine, &mut fake, 8);
    engine.finish(&mut fake);
    fake.stop();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_all(&dir.0, &fake)));
    let msg = caught
        .err()
        .map(|e| e.downcast_ref::<String>().cloned().unwrap_or_default());
    assert!(
        msg.as_deref().is_some_and(|m| m.contains("differs from the disk")),
        "a disk that does not copy aside went unnoticed: {msg:?}"
    );
}

/// Mutation check: a fault handler that lifts protection without copying
/// the page first must make some epoch differ from its pause.
#[test]
fn cow_without_copy_on_fault_is_caught() {
    let dir = Dir::new("mutant");
    let mut fake = Fake::new(true);
    let cow = CowOptions {
        test: CowTestHooks {
            skip_copy: true,
            ..CowTestHooks::default()
        },
        ..CowOptions::default()
    };
    let mut engine = SnapshotEngine::new(config(&dir.0, Mode::Cow, cow), None).unwrap();
    engine.prepare(&mut fake).unwrap();
    fake.start();
    run_epochs(&mut engine, &mut fake, 12);
    engine.finish(&mut fake);
    fake.stop();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_all(&dir.0, &fake)));
    assert!(caught.is_err(), "a handler that does not copy went unnoticed");
}

fn with_failures(mode: Mode, fail: &[u64]) {
    with_failures_cow(mode, fail, CowOptions::default());
}

fn with_failures_cow(mode: Mode, fail: &[u64], cow: CowOptions) {
    let dir = Dir::new(&format!("fail-{mode:?}-{}-{}", fail.len(), cow.test.flip_tracker_every));
    let mut fake = Fake::new(true);
    let inject = Inject {
        fail_attempts: fail.to_vec(),
        ..Inject::default()
    };
    let mut engine = SnapshotEngine::new(config(&dir.0, mode, cow), None).unwrap();
    engine.set_inject(inject);
    engine.prepare(&mut fake).unwrap();
    fake.start();
    run_epochs(&mut engine, &mut fake, 10);
    engine.finish(&mut fake);
    fake.stop();
    assert_eq!(engine.errors.len(), fail.len(), "{:?}", engine.errors);
    assert!(
        engine.errors.iter().all(|e| e.contains("injected")),
        "{:?}",
        engine.errors
    );
    // Pages of failed epochs were carried into later ones: every epoch is exact.
    assert_eq!(check_all(&dir.0, &fake), engine.records.len());
    let store = Store::open(&dir.0, Access::Read).unwrap();
    let first = store.open_epoch(store.ids().unwrap()[0]).unwrap();
    assert!(first.header().is_full(), "the first committed epoch must be full");
    if fail.contains(&1) {
        // The full epoch failed: the next one is full again, and only that one.
        let fulls = store
            .ids()
            .unwrap()
            .iter()
            .filter(|id| store.open_epoch(**id).unwrap().header().is_full())
            .count();
        assert_eq!(
            fulls,
            if mode == Mode::StopCopyFull {
                engine.records.len()
            } else {
                1
            }
        );
    }
}

#[test]
fn failed_incremental_epochs_carry_their_pages_stop_copy() {
    with_failures(Mode::StopCopy, &[3, 4, 7]);
}

#[test]
fn failed_incremental_epochs_carry_their_pages_cow() {
    with_failures(Mode::Cow, &[3, 4, 7]);
}

/// Tracker switches forced every other epoch (`--cow-tracker auto`'s two
/// trackers in turn), with and without failed epochs among them, the
/// switching epochs included.
#[test]
fn adaptive_tracker_switches_keep_epochs_exact() {
    let flip = |n| CowOptions {
        test: CowTestHooks {
            flip_tracker_every: n,
            ..CowTestHooks::default()
        },
        ..CowOptions::default()
    };
    let stats = exact("cow-flip", Mode::Cow, flip(2), true);
    let switched = stats.iter().filter(|s| s.choice.is_some_and(|c| c.switched)).count();
    assert!(switched >= 4, "{switched} switches");
    with_failures_cow(Mode::Cow, &[3, 4, 7], flip(1));
    with_failures_cow(Mode::Cow, &[5, 8], flip(2));
}

#[test]
fn a_failed_full_epoch_forces_a_full_one() {
    with_failures(Mode::StopCopy, &[1]);
    with_failures(Mode::Cow, &[1, 2]);
}

#[test]
fn stop_on_error_stops_at_the_first_failure() {
    let dir = Dir::new("stop");
    let mut fake = Fake::new(true);
    let inject = Inject {
        fail_attempts: vec![3],
        ..Inject::default()
    };
    let mut cfg = config(&dir.0, Mode::Cow, CowOptions::default());
    cfg.stop_after = Some(1);
    let mut engine = SnapshotEngine::new(cfg, None).unwrap();
    engine.set_inject(inject);
    engine.prepare(&mut fake).unwrap();
    fake.start();
    match run_epochs(&mut engine, &mut fake, 10) {
        TaskFlow::Stop(why) => assert!(
            why.contains("stopping on snapshot failure") && why.contains("injected"),
            "{why}"
        ),
        TaskFlow::Continue => panic!("kept going after a failure"),
    }
    engine.finish(&mut fake);
    assert_eq!(engine.records.len(), 2);
    // The guest is not left waiting on a protected page.
    let w = fake.writes();
    let t = Instant::now();
    while fake.writes() < w + 10_000 {
        assert!(t.elapsed() < Duration::from_secs(30), "the guest is stuck");
        std::thread::yield_now();
    }
    fake.stop();
    check_all(&dir.0, &fake);
}

/// `stop_after`: failures in a row count; a committed epoch starts the
/// count again; the run stops at the N-th in a row and says so.
#[test]
fn stop_after_counts_failures_in_a_row() {
    let dir = Dir::new("stop-after");
    let mut fake = Fake::new(true);
    let inject = Inject {
        // 2 and 3 fail, 4 commits (the count starts again), 6, 7, 8 fail.
        fail_attempts: vec![2, 3, 6, 7, 8],
        ..Inject::default()
    };
    let mut cfg = config(&dir.0, Mode::StopCopy, CowOptions::default());
    cfg.stop_after = Some(3);
    let mut engine = SnapshotEngine::new(cfg, None).unwrap();
    engine.set_inject(inject);
    engine.prepare(&mut fake).unwrap();
    fake.start();
    match run_epochs(&mut engine, &mut fake, 20) {
        TaskFlow::Stop(why) => assert!(
            why.contains("stopping after 3 failed snapshots in a row") && why.contains("injected"),
            "{why}"
        ),
        TaskFlow::Continue => panic!("kept going after 3 failures in a row"),
    }
    engine.finish(&mut fake);
    assert_eq!(engine.records.len(), 3, "attempts 1, 4 and 5 commit");
    assert_eq!(engine.errors.len(), 5);
    fake.stop();
    check_all(&dir.0, &fake);
}

/// A directory that cannot be a store is refused when the engine is made,
/// before any VM runs: a file, a directory of other files.
#[test]
fn an_unusable_directory_is_refused_up_front() {
    let dir = Dir::new("unusable");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let junk = dir.0.join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("notes.txt"), b"mine").unwrap();
    for bad in [file.join("snaps"), junk.clone()] {
        let e = SnapshotEngine::new(config(&bad, Mode::StopCopy, CowOptions::default()), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("snapshot directory unusable") && msg.contains(&*bad.to_string_lossy()),
            "{msg}"
        );
    }
    assert_eq!(std::fs::read(junk.join("notes.txt")).unwrap(), b"mine");
    assert_eq!(
        std::fs::read_dir(&junk).unwrap().count(),
        1,
        "nothing was written into junk"
    );
}

#[test]
fn a_dying_writer_stops_the_run_and_releases_the_guest() {
    for mode in [Mode::StopCopy, Mode::Cow] {
        let dir = Dir::new(&format!("panic-{mode:?}"));
        let mut fake = Fake::new(true);
        let inject = Inject {
            panic_attempts: vec![3],
            ..Inject::default()
        };
        let mut engine = SnapshotEngine::new(config(&dir.0, mode, CowOptions::default()), None).unwrap();
        engine.set_inject(inject);
        engine.prepare(&mut fake).unwrap();
        fake.start();
        match run_epochs(&mut engine, &mut fake, 10) {
            TaskFlow::Stop(why) => assert!(why.contains("panicked") && why.contains("writer"), "{why}"),
            TaskFlow::Continue => panic!("{mode:?}: a dead writer went unnoticed"),
        }
        assert_eq!(engine.records.len(), 2, "{mode:?}");
        let w = fake.writes();
        let t = Instant::now();
        while fake.writes() < w + 10_000 {
            assert!(t.elapsed() < Duration::from_secs(30), "{mode:?}: the guest is stuck");
            std::thread::yield_now();
        }
        engine.finish(&mut fake);
        fake.stop();
        check_all(&dir.0, &fake);
    }
}

#[test]
fn a_vanished_store_directory_fails_epochs_then_recovers() {
    // A real I/O failure: the epochs directory disappears under the writer.
    let dir = Dir::new("vanish");
    let mut fake = Fake::new(true);
    let mut engine = SnapshotEngine::new(config(&dir.0, Mode::Cow, CowOptions::default()), None).unwrap();
    engine.prepare(&mut fake).unwrap();
    fake.start();
    run_epochs(&mut engine, &mut fake, 3);
    engine.wait(&mut fake);
    let epochs = dir.0.join("epochs");
    let moved = dir.0.join("moved");
    std::fs::rename(&epochs, &moved).unwrap();
    for _ in 0..3 {
        let before = fake.writes();
        while fake.writes() < before + 2000 {
            std::thread::yield_now();
        }
        engine.tick(&mut fake);
        engine.wait(&mut fake);
    }
    assert!(!engine.errors.is_empty(), "writing into a missing directory must fail");
    std::fs::rename(&moved, &epochs).unwrap();
    let committed = engine.records.len();
    run_epochs(&mut engine, &mut fake, committed + 3);
    engine.finish(&mut fake);
    fake.stop();
    assert_eq!(check_all(&dir.0, &fake), engine.records.len());
}

/// What the control API changes at run time: the mode between stop-copy
/// and stop-copy-full (each switch makes the next epoch full; cow is
/// refused both ways), the interval, and an epoch taken now. Every epoch
/// still restores to its pause.
#[test]
fn run_time_mode_interval_and_epoch_now_keep_epochs_exact() {
    use vmm::run::Task;
    let dir = Dir::new("runtime");
    let mut fake = Fake::new(true);
    let cfg = config(&dir.0, Mode::StopCopy, CowOptions::default());
    let mut engine = SnapshotEngine::new(cfg, None).unwrap();
    engine.prepare(&mut fake).unwrap();
    fake.start();
    assert!(matches!(run_epochs(&mut engine, &mut fake, 3), TaskFlow::Continue));
    assert!(engine.wait(&mut fake).is_none());
    let a = engine.records.len();
    let e = engine.set_mode(Mode::Cow).unwrap_err().to_string();
    assert!(e.contains("cannot switch from stop-copy to cow"), "{e}");
    engine.set_mode(Mode::StopCopyFull).unwrap();
    assert_eq!(engine.config().mode, Mode::StopCopyFull);
    assert!(matches!(run_epochs(&mut engine, &mut fake, a + 2), TaskFlow::Continue));
    assert!(engine.wait(&mut fake).is_none());
    let b = engine.records.len();
    engine.set_mode(Mode::StopCopy).unwrap();
    assert!(matches!(run_epochs(&mut engine, &mut fake, b + 3), TaskFlow::Continue));
    assert!(engine.wait(&mut fake).is_none());

    engine.set_interval(Duration::from_secs(3600));
    let due = engine.due().unwrap();
    assert!(
        due > Instant::now() + Duration::from_secs(3500),
        "the new interval counts"
    );
    assert!(engine.request_now());
    assert!(engine.due().unwrap() <= Instant::now());
    let before = engine.records.len();
    assert!(matches!(engine.tick(&mut fake), TaskFlow::Continue));
    let id = engine.in_flight().expect("an epoch is being saved");
    assert!(!engine.request_now(), "no epoch starts before its parent is durable");
    while engine.in_flight().is_some() {
        assert!(matches!(engine.poll(&mut fake), TaskFlow::Continue));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(engine.records.len(), before + 1);
    assert_eq!(engine.records[before].id, id);
    assert!(engine.due().unwrap() > Instant::now() + Duration::from_secs(3500));

    assert!(engine.finish(&mut fake).is_none(), "{:?}", engine.errors);
    fake.stop();
    assert!(engine.errors.is_empty(), "{:?}", engine.errors);
    assert_eq!(check_all(&dir.0, &fake), engine.records.len());
    let store = Store::open(&dir.0, Access::Read).unwrap();
    let kinds: Vec<(Mode, bool)> = engine
        .records
        .iter()
        .map(|r| {
            let h = store.open_epoch(r.id).unwrap().header().clone();
            (h.mode, h.is_full())
        })
        .collect();
    let (sc, full) = (Mode::StopCopy, Mode::StopCopyFull);
    assert!(
        kinds[..a].iter().enumerate().all(|(i, &k)| k == (sc, i == 0)),
        "{kinds:?}"
    );
    assert!(kinds[a..b].iter().all(|&k| k == (full, true)), "{kinds:?}");
    assert_eq!(kinds[b], (sc, true), "the first stop-copy epoch after a switch is full");
    assert!(kinds[b + 1..].iter().all(|&k| k == (sc, false)), "{kinds:?}");
}

/// An epoch whose save keeps the next one waiting over `max_lag` (1 s)
/// makes the writer urgent once per such wait, where this process may
/// raise a thread's priority; the epochs stay exact.
#[test]
fn a_late_epoch_makes_the_writer_urgent() {
    let dir = Dir::new("urgent");
    let mut fake = Fake::new(true);
    let cow = CowOptions {
        test: CowTestHooks {
            saver_delay: Duration::from_millis(1300),
            ..CowTestHooks::default()
        },
        ..CowOptions::default()
    };
    let mut engine = SnapshotEngine::new(config(&dir.0, Mode::Cow, cow), None).unwrap();
    engine.prepare(&mut fake).unwrap();
    fake.start();
    assert!(matches!(run_epochs(&mut engine, &mut fake, 2), TaskFlow::Continue));
    assert!(engine.finish(&mut fake).is_none(), "{:?}", engine.errors);
    fake.stop();
    assert_eq!(check_all(&dir.0, &fake), engine.records.len());
    assert!(engine.overloads >= 1);
    if vmm::testing::may_lower_niceness() {
        assert!((1..=2).contains(&engine.urgent), "urgent {} times", engine.urgent);
    } else {
        assert_eq!(engine.urgent, 0);
    }
}
