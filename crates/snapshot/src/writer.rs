//! The background writer: turns captured epochs into durable files while
//! the VM runs, one at a time, and hands staging buffers back for reuse.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;

use store::{EpochInfo, EpochMeta, EpochWriter, Store, StoreError};

use crate::pages::{PAGE, is_zero};

/// Work for the writer thread.
pub(crate) enum Job {
    /// Pages are already written (full epochs are written while paused); finish and commit.
    Commit { writer: EpochWriter, pause_ns: u64 },
    /// Write an incremental epoch from a staging buffer holding `gfns` in order.
    Write {
        store: Arc<Store>,
        meta: EpochMeta,
        state: Vec<u8>,
        gfns: Vec<u64>,
        buf: Vec<u8>,
        pause_ns: u64,
        /// Grow `buf` to this many bytes afterwards, off the pause path.
        reserve: usize,
    },
}

/// What the writer reports back.
pub(crate) struct Done {
    pub result: Result<EpochInfo, StoreError>,
    pub buf: Option<Vec<u8>>,
    pub finished: Instant,
}

pub(crate) struct Writer {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

fn write_incremental(
    store: &Store,
    meta: EpochMeta,
    state: &[u8],
    gfns: &[u64],
    buf: &[u8],
    pause_ns: u64,
) -> Result<EpochInfo, StoreError> {
    let mut w = store.writer(meta)?;
    w.write_state(state)?;
    // Consecutive non-zero pages go out as one write; zero pages are only indexed.
    let mut batch_start = 0;
    for i in 0..=gfns.len() {
        let zero = i < gfns.len() && is_zero(&buf[i * PAGE..(i + 1) * PAGE]);
        if i == gfns.len() || zero {
            if batch_start < i {
                w.scattered_pages(&gfns[batch_start..i], &buf[batch_start * PAGE..i * PAGE])?;
            }
            if zero {
                w.zero_pages(gfns[i], 1)?;
            }
            batch_start = i + 1;
        }
    }
    w.commit(pause_ns)
}

impl Writer {
    pub(crate) fn start() -> std::io::Result<Writer> {
        let (jobs, rx) = channel::<Job>();
        let (tx, done) = channel::<Done>();
        let thread = std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || {
                for job in rx {
                    let (result, buf) = match job {
                        Job::Commit { writer, pause_ns } => (writer.commit(pause_ns), None),
                        Job::Write {
                            store,
                            meta,
                            state,
                            gfns,
                            mut buf,
                            pause_ns,
                            reserve,
                        } => {
                            let r = write_incremental(&store, meta, &state, &gfns, &buf, pause_ns);
                            if buf.len() < reserve {
                                // Fault the pages in now, so that the next pause does not pay for them.
                                buf = crate::pages::prefaulted(reserve);
                            }
                            (r, Some(buf))
                        }
                    };
                    if tx
                        .send(Done {
                            result,
                            buf,
                            finished: Instant::now(),
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
        Ok(Writer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }

    pub(crate) fn submit(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }

    /// The next finished job: waits when `block`, else returns `None` if none is ready.
    pub(crate) fn done(&self, block: bool) -> Option<Done> {
        if block {
            return self.done.recv().ok();
        }
        self.done.try_recv().ok()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
