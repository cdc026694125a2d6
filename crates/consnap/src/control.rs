//! The session's one controller task: the pause probe, the progress
//! sampler, the snapshot engine, and the commands of the control API, all
//! on the controller thread, publishing what others read on the board
//! (`api::board`).
//!
//! A VM the user paused stays paused: the pause probe does not run, and
//! snapshots go on (every interval, and on request), each pausing the
//! already stopped vCPUs to save their state and then holding them again
//! instead of resuming them ([`Held`]); such epochs are small, since a
//! paused guest dirties nothing.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, TryLockError};
use std::time::{Duration, Instant};

use snapshot::{Captured, SnapshotEngine, Target, TargetError};
use vmm::dirty::DirtySet;
use vmm::machine::Machine;
use vmm::memory::GuestRam;
use vmm::run::{PauseProbe, ProgressSampler, Task, TaskFlow};
use vmm::vcpu::PauseAction;

use crate::api::VmState;
use crate::api::board::{Answer, BoardCell, Command, Envelope, Refusal, Reply, snap_config};
use crate::report::EpochEntry;

/// How often the board is refreshed when nothing happens.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// How often the engine is polled while a snapshot request waits.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Commands handled per run of the task (the rest on the next, at once).
const COMMANDS_PER_RUN: usize = 16;
/// The guest's op rate is measured over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// A machine the user paused, as the engine sees it: its "resume" holds
/// the vCPUs again (they re-park without running guest code).
struct Held<'a>(&'a mut Machine);

impl Target for Held<'_> {
    fn ram(&self) -> &Arc<GuestRam> {
        Target::ram(&*self.0)
    }
    fn vcpus(&self) -> u32 {
        Target::vcpus(&*self.0)
    }
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), TargetError> {
        Target::set_dirty_logging(self.0, on)
    }
    fn set_manual_rearm(&mut self) -> Result<bool, TargetError> {
        Target::set_manual_rearm(self.0)
    }
    fn rearm_dirty(&mut self, pages: &DirtySet) -> Result<(), TargetError> {
        Target::rearm_dirty(self.0, pages)
    }
    fn pause_and_capture(&mut self) -> Result<Option<Captured>, TargetError> {
        Target::pause_and_capture(self.0)
    }
    fn resume(&mut self) -> Result<(), TargetError> {
        self.0.pause(PauseAction::Hold).map(drop).map_err(TargetError::from)
    }
    fn take_dirty(&mut self) -> Result<DirtySet, TargetError> {
        Target::take_dirty(self.0)
    }
    fn mark_dirty(&mut self, pages: &DirtySet) {
        Target::mark_dirty(self.0, pages);
    }
    fn progress(&self) -> Option<u64> {
        Target::progress(&*self.0)
    }
}

/// A `PUT /snapshots/take` waiting for its epoch.
struct Take {
    reply: tokio::sync::oneshot::Sender<Reply>,
    stage: Stage,
}

enum Stage {
    /// No epoch has started since the request.
    Queued,
    /// Epoch `id` started after the request; `errors` errors were known then.
    Saving { id: u64, errors: usize },
}

/// The controller task; see the module documentation.
pub struct Control {
    engine: Option<SnapshotEngine>,
    probe: PauseProbe,
    sampler: ProgressSampler,
    cell: Arc<BoardCell>,
    commands: Option<Receiver<Envelope>>,
    user_paused: bool,
    stopping: bool,
    takes: Vec<Take>,
    next_publish: Instant,
    poll_at: Option<Instant>,
    /// Snapshots are held back by replication (see `snapshots`).
    replica_hold: bool,
    ops: VecDeque<(Instant, u64)>,
    /// An instant in the past: when the task is due at once.
    created: Instant,
}

/// What the report needs from a finished [`Control`].
pub struct Finished {
    /// The engine, after its last epoch.
    pub engine: Option<SnapshotEngine>,
    /// Pause-probe latencies.
    pub probe_pauses: Vec<Duration>,
    /// Progress samples.
    pub samples: Vec<(u64, u64)>,
}

/// How often a snapshot held back by replication checks again.
const REPLICA_HOLD_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

impl Control {
    /// A controller over these tasks; `commands` come from the API server.
    pub fn new(
        engine: Option<SnapshotEngine>,
        probe: PauseProbe,
        sampler: ProgressSampler,
        cell: Arc<BoardCell>,
        commands: Option<Receiver<Envelope>>,
    ) -> Control {
        Control {
            engine,
            probe,
            sampler,
            cell,
            commands,
            user_paused: false,
            stopping: false,
            takes: Vec::new(),
            next_publish: Instant::now(),
            poll_at: None,
            replica_hold: false,
            ops: VecDeque::new(),
            created: Instant::now(),
        }
    }

    /// The run loop ended: refuse further commands, show `stopping`.
    pub fn stopping(&mut self, m: &Machine) {
        self.stopping = true;
        self.commands = None;
        self.publish(m, true);
    }

    /// After the vCPUs stopped: wait for the epoch in flight, answer the
    /// snapshot requests still waiting, publish the last figures.
    pub fn finish(&mut self, m: &mut Machine) {
        if let Some(e) = self.engine.as_mut() {
            e.finish(m);
        }
        let takes = std::mem::take(&mut self.takes);
        for t in takes {
            let reply = match (&t.stage, &self.engine) {
                (Stage::Saving { id, errors }, Some(e)) => settle(e, *id, *errors),
                _ => None,
            };
            let reply =
                reply.unwrap_or_else(|| Err(Refusal::Conflict("the VM stopped before the snapshot was taken".into())));
            let _ = t.reply.send(reply);
        }
        self.publish(m, true);
    }

    /// The parts the report is made of.
    pub fn into_finished(self) -> Finished {
        Finished {
            engine: self.engine,
            probe_pauses: self.probe.pauses,
            samples: self.sampler.samples,
        }
    }

    /// Handle the commands waiting in the queue; returns the replies to
    /// send once the board shows their effect.
    fn serve(&mut self, m: &mut Machine) -> Vec<(tokio::sync::oneshot::Sender<Reply>, Reply)> {
        self.cell.pending.store(false, Ordering::SeqCst);
        let mut replies = Vec::new();
        for _ in 0..COMMANDS_PER_RUN {
            let Some(env) = self.commands.as_ref().and_then(|rx| rx.try_recv().ok()) else {
                return replies;
            };
            if env.reply.is_closed() {
                // The client gave up: do not pause a VM nobody waits for.
                continue;
            }
            let reply = match env.cmd {
                Command::Pause => self.pause(m),
                Command::Resume => self.resume(m),
                Command::Configure { interval, mode } => self.configure(interval, mode),
                Command::Take => {
                    if self.engine.is_none() {
                        Err(snapshots_off())
                    } else {
                        self.takes.push(Take {
                            reply: env.reply,
                            stage: Stage::Queued,
                        });
                        continue;
                    }
                }
            };
            replies.push((env.reply, reply));
        }
        // More may wait: come back at once.
        self.cell.pending.store(true, Ordering::SeqCst);
        replies
    }

    fn pause(&mut self, m: &mut Machine) -> Reply {
        if !self.user_paused {
            m.pause(PauseAction::Hold)
                .map_err(|e| Refusal::Failed(format!("cannot pause the VM: {e}")))?;
            self.user_paused = true;
            tracing::info!("VM paused through the API");
        }
        Ok(Answer::State(VmState::Paused))
    }

    fn resume(&mut self, m: &mut Machine) -> Reply {
        if self.user_paused {
            m.resume()
                .map_err(|e| Refusal::Failed(format!("cannot resume the VM: {e}")))?;
            self.user_paused = false;
            tracing::info!("VM resumed through the API");
        }
        Ok(Answer::State(VmState::Running))
    }

    fn configure(&mut self, interval: Option<Duration>, mode: Option<snapshot::Mode>) -> Reply {
        let Some(e) = self.engine.as_mut() else {
            return Err(snapshots_off());
        };
        if let Some(mode) = mode {
            e.set_mode(mode).map_err(|err| Refusal::Conflict(err.to_string()))?;
        }
        if let Some(interval) = interval {
            e.set_interval(interval);
        }
        let c = e.config();
        tracing::info!(mode = c.mode.name(), interval = ?c.interval, "snapshot configuration changed through the API");
        Ok(Answer::Config(snap_config(&c.dir, c.mode, c.interval)))
    }

    /// Run the engine if due or asked to, and move snapshot requests along.
    fn snapshots(&mut self, m: &mut Machine) -> TaskFlow {
        let Some(engine) = self.engine.as_mut() else {
            return TaskFlow::Continue;
        };
        let queued = self.takes.iter().any(|t| matches!(t.stage, Stage::Queued));
        let before = engine.in_flight();
        let errors_before = engine.errors.len();
        let asked = queued && before.is_none() && engine.request_now();
        let due = engine.due().is_some_and(|d| d <= Instant::now());
        // Replication is too far behind and its policy is to throttle:
        // epochs wait (the interval stretches), finished ones still commit.
        let hold = due
            && !asked
            && self
                .cell
                .lock()
                .replica
                .as_ref()
                .is_some_and(remote::ReplicaWatch::hold);
        self.replica_hold = hold;
        let ticked = asked || (due && !hold);
        let flow = if ticked {
            if self.user_paused {
                engine.tick(&mut Held(m))
            } else {
                engine.tick(m)
            }
        } else if !self.takes.is_empty() || hold {
            engine.poll(m)
        } else {
            TaskFlow::Continue
        };
        let started = engine.in_flight().filter(|id| Some(*id) != before);
        if let Some(id) = started {
            for t in &mut self.takes {
                if matches!(t.stage, Stage::Queued) {
                    t.stage = Stage::Saving {
                        id,
                        errors: errors_before,
                    };
                }
            }
        } else if asked {
            // The epoch asked for did not start: it failed, or the guest is stopping.
            let refusal = engine.errors.get(errors_before..).and_then(|e| e.last()).map_or_else(
                || Refusal::Conflict("the VM is stopping: there is nothing left to snapshot".into()),
                |e| Refusal::Failed(e.clone()),
            );
            for t in std::mem::take(&mut self.takes) {
                match t.stage {
                    Stage::Queued => drop(t.reply.send(Err(refusal.clone()))),
                    Stage::Saving { .. } => self.takes.push(t),
                }
            }
        }
        let mut waiting = Vec::new();
        for t in std::mem::take(&mut self.takes) {
            let done = match t.stage {
                Stage::Saving { id, errors } => settle(engine, id, errors),
                Stage::Queued => None,
            };
            match done {
                Some(reply) => drop(t.reply.send(reply)),
                None => waiting.push(t),
            }
        }
        self.takes = waiting;
        self.poll_at = if hold {
            Some(Instant::now() + REPLICA_HOLD_RECHECK)
        } else {
            (!self.takes.is_empty()).then(|| Instant::now() + POLL_EVERY)
        };
        flow
    }

    /// Refresh the board; `force` waits for the lock (only at the end).
    fn publish(&mut self, m: &Machine, force: bool) {
        let now = Instant::now();
        let ops = m.progress();
        if let Some(ops) = ops {
            self.ops.push_back((now, ops));
            while self.ops.len() > 2 && self.ops.get(1).is_some_and(|(t, _)| now - *t >= RATE_WINDOW) {
                self.ops.pop_front();
            }
        }
        let rate = match (self.ops.front(), self.ops.back()) {
            (Some((t0, o0)), Some((t1, o1))) if *t1 - *t0 >= RATE_WINDOW / 4 => {
                Some(o1.saturating_sub(*o0) as f64 / (*t1 - *t0).as_secs_f64())
            }
            _ => None,
        };
        let mut board = match self.cell.board.try_lock() {
            Ok(b) => b,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if force => self.cell.lock(),
            Err(TryLockError::WouldBlock) => {
                // A reader holds it: try again soon, never wait.
                self.next_publish = now + POLL_EVERY;
                return;
            }
        };
        board.state = if self.stopping {
            VmState::Stopping
        } else if self.user_paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        board.ops = ops;
        board.ops_per_s = rate;
        if let Some(new) = self.probe.pauses.get(board.probe.len()..) {
            board.probe.extend_from_slice(new);
        }
        if let (Some(e), Some(f)) = (&self.engine, board.snap.as_mut()) {
            f.update(e);
        }
        drop(board);
        self.next_publish = now + PUBLISH_EVERY;
    }
}

fn snapshots_off() -> Refusal {
    Refusal::Conflict(crate::api::board::SNAPSHOTS_OFF.into())
}

/// The reply to a request waiting for epoch `id`, once there is one.
fn settle(engine: &SnapshotEngine, id: u64, errors: usize) -> Option<Reply> {
    if let Some(r) = engine
        .records
        .iter()
        .rev()
        .take_while(|r| r.id >= id)
        .find(|r| r.id == id)
    {
        return Some(Ok(Answer::Epoch(EpochEntry::from(r))));
    }
    if engine.in_flight() == Some(id) {
        return None;
    }
    let prefix = format!("epoch {id}:");
    let new = engine.errors.get(errors..).unwrap_or_default();
    let why = new
        .iter()
        .find(|e| e.starts_with(&prefix))
        .or(new.last())
        .cloned()
        .unwrap_or_else(|| format!("epoch {id} was not committed"));
    Some(Err(Refusal::Failed(why)))
}

impl Task for Control {
    fn due(&self) -> Option<Instant> {
        if self.cell.pending.load(Ordering::SeqCst) {
            return Some(self.created);
        }
        let mut due = self.next_publish;
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                due = due.min(d);
            }
        };
        if !self.user_paused {
            consider(self.probe.due());
        }
        consider(self.sampler.due());
        if !self.replica_hold {
            consider(self.engine.as_ref().and_then(Task::due));
        }
        consider(self.poll_at);
        Some(due)
    }

    fn run(&mut self, m: &mut Machine) -> TaskFlow {
        let now = Instant::now();
        let replies = self.serve(m);
        if !self.user_paused && self.probe.due().is_some_and(|d| d <= now) {
            self.probe.run(m);
        }
        if self.sampler.due().is_some_and(|d| d <= now) {
            self.sampler.run(m);
        }
        let flow = self.snapshots(m);
        if !replies.is_empty() || now >= self.next_publish || matches!(flow, TaskFlow::Stop(_)) {
            self.publish(m, false);
        }
        for (to, reply) in replies {
            let _ = to.send(reply);
        }
        flow
    }
}
