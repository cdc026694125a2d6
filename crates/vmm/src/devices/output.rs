//! Output commit: what the guest sends to the world (network frames,
//! console bytes) is held until the epoch that produced it is durable.
//!
//! Everything a device hands to the [`OutputGate`] belongs to the open
//! *generation*. A snapshot's pause seals it ([`OutputGate::seal`], with
//! every device quiesced, so nothing made available before the pause is
//! left out) and opens the next; once the epoch of that pause is durable,
//! [`OutputGate::release`] lets every generation up to the sealed one out,
//! in the order it came in. If an epoch fails, its generation waits for the
//! next durable epoch, which holds a later state and so covers it. The
//! gate's own thread writes released output to its sinks; nothing is ever
//! written twice or out of order by it.
//!
//! Bounded: at most `cap` bytes wait. A device whose output does not fit is
//! told so ([`Full`]) and stops taking the guest's buffers (backpressure);
//! the gate wakes it through its eventfd once space frees.
//!
//! Without output commit (`OutputGate::passthrough`), output is written at
//! once by the thread that submits it.
//!
//! Durable may mean on the object store (`--net-commit remote`): then a
//! locally committed epoch only records which generation it covers
//! ([`OutputGate::durable_locally`]), and the generation goes out once the
//! replication names that epoch, or a later one, in the remote store's
//! manifest ([`OutputGate::durable_remotely`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

/// Where released output goes: a TAP device, the console.
pub trait Sink: Send + Sync {
    /// A name for messages.
    fn name(&self) -> String;
    /// Write one unit (a frame, console bytes) whole.
    fn send(&self, data: &[u8]) -> std::io::Result<()>;
}

/// The output did not fit under the gate's cap; retry once woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// What the gate did, for reports and the API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputStats {
    /// Output commit is on.
    pub commit: bool,
    /// Units (frames, console writes) and bytes waiting now.
    pub held_units: u64,
    pub held_bytes: u64,
    /// Most bytes that waited at once.
    pub held_bytes_max: u64,
    /// Units and bytes written to their sinks.
    pub released_units: u64,
    pub released_bytes: u64,
    /// Times a device's output did not fit under the cap.
    pub at_cap: u64,
    /// Units a sink failed to take (the error was logged).
    pub send_errors: u64,
    /// Units dropped when the VMM ended before their epoch was durable.
    pub dropped_at_exit: u64,
    /// From submission to written, milliseconds: p50, p99, max.
    pub release_ms: Option<[f64; 3]>,
}

struct Held {
    generation: u64,
    sink: usize,
    data: Vec<u8>,
    at: Instant,
}

struct Inner {
    /// Generation new output joins.
    open: u64,
    /// Generations up to this one may go out (none when zero).
    released: u64,
    queue: VecDeque<Held>,
    held_bytes: u64,
    /// A device was told [`Full`] and waits for space.
    blocked: bool,
    /// With remote commit: (epoch, generation) committed locally, waiting
    /// for the object store.
    pending: VecDeque<(u64, u64)>,
    stopping: bool,
    /// Release latencies, nanoseconds (a bounded reservoir).
    latencies: Vec<u64>,
    stats: OutputStats,
}

/// A sink, and what wakes its device once space frees.
type Registered = (Arc<dyn Sink>, Option<Arc<EventFd>>);

/// Release latencies kept for the percentiles (the most recent ones).
const LATENCIES: usize = 1 << 16;

/// The output gate of one machine (see the module documentation).
pub struct OutputGate {
    commit: bool,
    remote: bool,
    cap: u64,
    inner: Mutex<Inner>,
    changed: Condvar,
    sinks: Mutex<Vec<Registered>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for OutputGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputGate")
            .field("commit", &self.commit)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl OutputGate {
    /// Output goes out at once (no snapshots, or `--net-commit none`).
    pub fn passthrough() -> Arc<OutputGate> {
        Arc::new(Self::make(false, false, u64::MAX))
    }

    /// Output waits for its epoch to be durable (`remote`: on the object
    /// store); at most `cap` bytes wait at once.
    pub fn committed(cap: u64, remote: bool) -> Result<Arc<OutputGate>, std::io::Error> {
        let gate = Arc::new(Self::make(true, remote, cap.max(1)));
        let g = gate.clone();
        let h = std::thread::Builder::new()
            .name("output".into())
            .spawn(move || g.release_loop())?;
        *gate.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(gate)
    }

    fn make(commit: bool, remote: bool, cap: u64) -> OutputGate {
        OutputGate {
            commit,
            remote,
            cap,
            inner: Mutex::new(Inner {
                open: 1,
                released: 0,
                queue: VecDeque::new(),
                held_bytes: 0,
                blocked: false,
                pending: VecDeque::new(),
                stopping: false,
                latencies: Vec::new(),
                stats: OutputStats {
                    commit,
                    ..OutputStats::default()
                },
            }),
            changed: Condvar::new(),
            sinks: Mutex::new(Vec::new()),
            thread: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether output waits for its epoch.
    pub fn commits(&self) -> bool {
        self.commit
    }

    /// Register `sink`; `wake` is signalled when space frees after a
    /// [`Full`]. Returns the sink's number for [`OutputGate::submit`].
    pub fn add_sink(&self, sink: Arc<dyn Sink>, wake: Option<Arc<EventFd>>) -> usize {
        let mut s = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        s.push((sink, wake));
        s.len() - 1
    }

    fn sink(&self, i: usize) -> Option<Arc<dyn Sink>> {
        self.sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .map(|s| s.0.clone())
    }

    /// Hand `data` to sink `sink`: written now without commit, held until
    /// its epoch is durable with it. [`Full`] when it does not fit.
    pub fn submit(&self, sink: usize, data: &[u8]) -> Result<(), Full> {
        if !self.commit {
            self.write_now(sink, data);
            return Ok(());
        }
        let mut g = self.lock();
        let len = data.len() as u64;
        if g.held_bytes > 0 && g.held_bytes + len > self.cap || len > self.cap {
            g.stats.at_cap += 1;
            g.blocked = true;
            return Err(Full);
        }
        let generation = g.open;
        g.queue.push_back(Held {
            generation,
            sink,
            data: data.to_vec(),
            at: Instant::now(),
        });
        g.held_bytes += len;
        g.stats.held_bytes_max = g.stats.held_bytes_max.max(g.held_bytes);
        Ok(())
    }

    fn write_now(&self, sink: usize, data: &[u8]) {
        drop(self.send_counted(sink, data));
    }

    /// Write `data` to sink `sink` (no lock held meanwhile), then count
    /// the outcome; returns the lock, taken for that.
    fn send_counted(&self, sink: usize, data: &[u8]) -> MutexGuard<'_, Inner> {
        let s = self.sink(sink);
        let r = s.as_ref().map(|s| s.send(data));
        if let (Some(s), Some(Err(e))) = (&s, &r) {
            tracing::debug!(sink = %s.name(), "output not sent: {e}");
        }
        let mut g = self.lock();
        if let Some(Ok(())) = r {
            g.stats.released_units += 1;
            g.stats.released_bytes += data.len() as u64;
        } else {
            g.stats.send_errors += 1;
        }
        g
    }

    /// At a snapshot's pause (devices quiesced): close the open generation
    /// and return it; what comes later belongs to the next one.
    pub fn seal(&self) -> u64 {
        let mut g = self.lock();
        let sealed = g.open;
        g.open += 1;
        sealed
    }

    /// The epoch whose pause sealed `generation` is durable: let it (and
    /// every earlier one) out.
    pub fn release(&self, generation: u64) {
        let mut g = self.lock();
        if generation > g.released {
            g.released = generation;
            self.changed.notify_all();
        }
    }

    /// Epoch `epoch`, whose pause sealed `generation`, is committed
    /// locally: with local commit that is durable; with remote commit it
    /// waits for [`OutputGate::durable_remotely`].
    pub fn durable_locally(&self, generation: u64, epoch: u64) {
        if self.remote {
            self.lock().pending.push_back((epoch, generation));
        } else {
            self.release(generation);
        }
    }

    /// The object store holds epoch `epoch` (or a later one): what every
    /// epoch up to it covers may leave.
    pub fn durable_remotely(&self, epoch: u64) {
        let mut g = self.lock();
        let mut newest = None;
        while g.pending.front().is_some_and(|&(e, _)| e <= epoch) {
            newest = g.pending.pop_front().map(|(_, generation)| generation);
        }
        drop(g);
        if let Some(generation) = newest {
            self.release(generation);
        }
    }

    /// The newest epoch committed locally whose output waits for the
    /// object store.
    pub fn newest_pending(&self) -> Option<u64> {
        self.lock().pending.back().map(|&(e, _)| e)
    }

    /// Whether output waits for the object store.
    pub fn remote(&self) -> bool {
        self.remote
    }

    /// The guest ended by itself (nothing will roll it back): let all out.
    pub fn release_all(&self) {
        let mut g = self.lock();
        g.released = u64::MAX;
        self.changed.notify_all();
    }

    /// What it did so far.
    pub fn stats(&self) -> OutputStats {
        let g = self.lock();
        let mut s = g.stats.clone();
        s.held_units = g.queue.len() as u64;
        s.held_bytes = g.held_bytes;
        if !g.latencies.is_empty() {
            let mut v = g.latencies.clone();
            v.sort_unstable();
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1e6;
            s.release_ms = Some([at(0.5), at(0.99), at(1.0)]);
        }
        s
    }

    /// Write what was released, then stop the gate's thread; what is still
    /// held (its epoch never became durable) is dropped and counted.
    pub fn shut(&self) {
        self.lock().stopping = true;
        self.changed.notify_all();
        let h = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h
            && h.join().is_err()
        {
            tracing::error!("the output thread panicked");
        }
        let mut g = self.lock();
        let dropped = g.queue.len() as u64;
        g.queue.clear();
        g.held_bytes = 0;
        g.stats.dropped_at_exit += dropped;
        if dropped > 0 {
            tracing::info!(
                units = dropped,
                "output of epochs that never became durable was not sent"
            );
        }
    }

    fn release_loop(&self) {
        let mut g = self.lock();
        loop {
            let ready = g.queue.front().is_some_and(|h| h.generation <= g.released);
            if !ready {
                if g.stopping {
                    return;
                }
                g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let Some(h) = g.queue.pop_front() else { continue };
            drop(g);
            g = self.send_counted(h.sink, &h.data);
            let waited = h.at.elapsed().as_nanos() as u64;
            let was_full = std::mem::take(&mut g.blocked);
            g.held_bytes -= h.data.len() as u64;
            if g.latencies.len() == LATENCIES {
                let i = (g.stats.released_units as usize) % LATENCIES;
                g.latencies[i] = waited;
            } else {
                g.latencies.push(waited);
            }
            if was_full {
                self.wake_all();
            }
        }
    }

    fn wake_all(&self) {
        for (_, wake) in self.sinks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(w) = wake {
                let _ = w.write(1);
            }
        }
    }
}

/// The console through the gate: bytes written to it are held like frames.
pub struct GatedWriter {
    gate: Arc<OutputGate>,
    sink: usize,
    /// Bytes dropped because the gate was full (the vCPU cannot wait).
    dropped: u64,
}

impl GatedWriter {
    /// Console output to `out`, through `gate`.
    pub fn new(gate: Arc<OutputGate>, out: Box<dyn Write + Send>) -> GatedWriter {
        let sink = gate.add_sink(Arc::new(ConsoleSink(Mutex::new(out))), None);
        GatedWriter { gate, sink, dropped: 0 }
    }
}

impl Write for GatedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The vCPU writing this cannot wait for an epoch (the epoch waits
        // for the vCPU): bytes over the cap are dropped and counted.
        if self.gate.submit(self.sink, buf).is_err() {
            self.dropped += buf.len() as u64;
            if self.dropped == buf.len() as u64 {
                tracing::warn!("console output held for its epoch reached the cap: bytes are dropped");
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct ConsoleSink(Mutex<Box<dyn Write + Send>>);

impl Sink for ConsoleSink {
    fn name(&self) -> String {
        "console".into()
    }

    fn send(&self, data: &[u8]) -> std::io::Result<()> {
        let mut out = self.0.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(data)?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Default)]
    struct Record(Mutex<Vec<Vec<u8>>>);

    impl Sink for Record {
        fn name(&self) -> String {
            "record".into()
        }
        fn send(&self, data: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(data.to_vec());
            Ok(())
        }
    }

    fn sent(r: &Record) -> Vec<Vec<u8>> {
        r.0.lock().unwrap().clone()
    }

    fn settle(gate: &OutputGate, units: u64) {
        let until = Instant::now() + Duration::from_secs(10);
        while gate.stats().released_units < units && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn nothing_leaves_before_its_epoch_is_durable_and_all_in_order() {
        let gate = OutputGate::committed(1 << 20, false).unwrap();
        let rec = Arc::new(Record::default());
        let s = gate.add_sink(rec.clone(), None);
        gate.submit(s, b"a").unwrap();
        gate.submit(s, b"b").unwrap();
        let first = gate.seal();
        gate.submit(s, b"c").unwrap();
        let second = gate.seal();
        gate.submit(s, b"d").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(sent(&rec).is_empty());
        // The first epoch failed; the second is durable and covers both.
        gate.release(second);
        settle(&gate, 3);
        assert_eq!(sent(&rec), [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        // An older release changes nothing, and nothing goes out twice.
        gate.release(first);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(sent(&rec).len(), 3);
        gate.shut();
        let st = gate.stats();
        assert_eq!((st.released_units, st.dropped_at_exit, st.held_units), (3, 1, 0));
        assert!(st.release_ms.is_some());
    }

    #[test]
    fn the_cap_pushes_back_and_space_wakes_the_device() {
        let gate = OutputGate::committed(10, false).unwrap();
        let rec = Arc::new(Record::default());
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let s = gate.add_sink(rec.clone(), Some(wake.clone()));
        gate.submit(s, &[1; 6]).unwrap();
        assert_eq!(gate.submit(s, &[2; 6]), Err(Full));
        assert_eq!(gate.stats().at_cap, 1);
        assert!(wake.read().is_err(), "no wake-up before space frees");
        let g = gate.seal();
        gate.release(g);
        settle(&gate, 1);
        let until = Instant::now() + Duration::from_secs(10);
        while wake.read().is_err() {
            assert!(Instant::now() < until, "the device was never woken");
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.submit(s, &[2; 6]).unwrap();
        gate.release_all();
        settle(&gate, 2);
        assert_eq!(sent(&rec), [vec![1; 6], vec![2; 6]]);
        gate.shut();
    }

    #[test]
    fn with_remote_commit_output_waits_for_the_object_store() {
        let gate = OutputGate::committed(1 << 20, true).unwrap();
        let rec = Arc::new(Record::default());
        let s = gate.add_sink(rec.clone(), None);
        gate.submit(s, b"a").unwrap();
        let g1 = gate.seal();
        gate.submit(s, b"b").unwrap();
        let g2 = gate.seal();
        gate.durable_locally(g1, 7);
        gate.durable_locally(g2, 8);
        std::thread::sleep(Duration::from_millis(20));
        assert!(sent(&rec).is_empty(), "committed locally is not enough");
        gate.durable_remotely(7);
        settle(&gate, 1);
        assert_eq!(sent(&rec), [b"a".to_vec()]);
        // A merged upload past both covers what is left.
        gate.durable_remotely(9);
        settle(&gate, 2);
        assert_eq!(sent(&rec), [b"a".to_vec(), b"b".to_vec()]);
        gate.shut();
    }

    #[test]
    fn without_commit_output_goes_out_at_once() {
        let gate = OutputGate::passthrough();
        let rec = Arc::new(Record::default());
        let s = gate.add_sink(rec.clone(), None);
        gate.submit(s, b"now").unwrap();
        assert_eq!(sent(&rec), [b"now".to_vec()]);
        assert_eq!(gate.seal(), 1);
        assert!(!gate.stats().commit);
    }
}
