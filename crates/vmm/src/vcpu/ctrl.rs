//! The pause bookkeeping the controller and the vCPU threads share, under
//! one lock: what is wanted, which vCPUs parked and what they saved.
//!
//! Each pause has a generation, and every record a vCPU leaves is tagged
//! with the generation it was made for: a vCPU late from a pause that timed
//! out (still saving when the controller gave up and resumed, or parking as
//! the next pause begins) counts for nothing in the next one, whose
//! controller would otherwise see one vCPU twice and another not at all.

use super::{PauseAction, VcpuError, VcpuTimes};
use crate::state::VcpuState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    Run,
    Pause(PauseAction),
    Stop,
}

#[derive(Debug)]
pub(super) struct Ctrl {
    /// Bumped by every pause and stop.
    pub generation: u64,
    pub want: Want,
    /// The generation each vCPU last parked for.
    parked: Vec<Option<u64>>,
    pub finished: usize,
    /// What each vCPU saved, and for which generation.
    saved: Vec<Option<(u64, Result<VcpuState, VcpuError>)>>,
    /// CPU use of each vCPU thread that has ended.
    pub times: Vec<VcpuTimes>,
}

impl Ctrl {
    /// Bookkeeping for `n` vCPUs, running.
    pub fn new(n: usize) -> Ctrl {
        Ctrl {
            generation: 0,
            want: Want::Run,
            parked: vec![None; n],
            finished: 0,
            saved: (0..n).map(|_| None).collect(),
            times: Vec::new(),
        }
    }

    /// Begin a pause: a new generation, nobody parked for it yet.
    pub fn begin_pause(&mut self, action: PauseAction) {
        self.generation += 1;
        self.want = Want::Pause(action);
    }

    /// vCPUs parked for the current generation.
    pub fn parked(&self) -> usize {
        self.parked.iter().filter(|g| **g == Some(self.generation)).count()
    }

    /// vCPU `vcpu` parks for the pause of `generation`, with what it saved.
    /// False, recording nothing, when that pause is over (resumed after a
    /// timeout, or another one begun): the vCPU then looks at what is
    /// wanted now instead.
    pub fn park(&mut self, vcpu: usize, generation: u64, saved: Option<Result<VcpuState, VcpuError>>) -> bool {
        if generation != self.generation || !matches!(self.want, Want::Pause(_)) {
            return false;
        }
        let Some(p) = self.parked.get_mut(vcpu) else {
            return false;
        };
        *p = Some(generation);
        if let (Some(s), Some(slot)) = (saved, self.saved.get_mut(vcpu)) {
            *slot = Some((generation, s));
        }
        true
    }

    /// Take what the vCPUs saved for the current generation, in vCPU order;
    /// older records are dropped.
    pub fn take_saved(&mut self) -> Vec<Result<VcpuState, VcpuError>> {
        let now = self.generation;
        self.saved
            .iter_mut()
            .filter_map(Option::take)
            .filter_map(|(g, s)| (g == now).then_some(s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saved state for the test: only its id is looked at.
    fn state(id: u8) -> Result<VcpuState, VcpuError> {
        Err(VcpuError::UnexpectedExit {
            vcpu: id,
            what: "a test record".into(),
        })
    }

    fn ids(v: &[Result<VcpuState, VcpuError>]) -> Vec<u8> {
        v.iter()
            .map(|r| match r {
                Err(VcpuError::UnexpectedExit { vcpu, .. }) => *vcpu,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_vcpu_late_from_a_timed_out_pause_does_not_count_toward_the_next() {
        let mut c = Ctrl::new(2);
        // Pause 1: vCPU 0 parks, vCPU 1 is still saving when it times out.
        c.begin_pause(PauseAction::SaveState);
        let first = c.generation;
        assert!(c.park(0, first, Some(state(0))));
        assert_eq!(c.parked(), 1);
        c.want = Want::Run;
        // Pause 2 begins before vCPU 1 is done with pause 1.
        c.begin_pause(PauseAction::SaveState);
        assert_eq!(c.parked(), 0, "parking for pause 1 is not parking for pause 2");
        assert!(!c.park(1, first, Some(state(1))), "late: recorded nothing");
        assert_eq!(c.parked(), 0);
        // vCPU 0 (woken by the new generation) parks again; vCPU 1, back
        // in its loop, parks for pause 2 now.
        assert!(c.park(0, c.generation, Some(state(0))));
        assert_eq!(c.parked(), 1, "one vCPU is not all");
        assert!(c.park(1, c.generation, Some(state(1))));
        assert_eq!(c.parked(), 2);
        assert_eq!(ids(&c.take_saved()), [0, 1]);
    }

    #[test]
    fn a_save_finished_after_the_resume_is_dropped() {
        let mut c = Ctrl::new(2);
        c.begin_pause(PauseAction::SaveState);
        let g = c.generation;
        assert!(c.park(0, g, Some(state(0))));
        c.want = Want::Run; // timed out
        assert!(!c.park(1, g, Some(state(1))));
        // The next pause holds only; nothing saved for it.
        c.begin_pause(PauseAction::Hold);
        assert!(c.park(0, c.generation, None));
        assert!(c.park(1, c.generation, None));
        assert!(c.take_saved().is_empty(), "pause 1's saves are not pause 2's");
    }
}
