//! The live status line of a run that takes snapshots: epochs, the last
//! pause, pause p99, the saver's MB/s and what it is doing (the epoch it
//! writes, epochs that started late waiting for it) and the guest's op
//! rate (not while paused), on
//! stderr; redrawn in place every second on a terminal, a plain line every
//! five seconds otherwise (or every `--status-interval`). It runs on a thread of its own and reads the
//! board the controller publishes.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::api::VmState;
use crate::api::board::{Board, BoardCell, snap_stats};

/// The status line's thread.
pub struct Live {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// `1.23M`, `45.6k`, `789`.
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Milliseconds from microseconds, to two or three significant digits.
fn ms(us: f64) -> String {
    if us < 10_000.0 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.0}ms", us / 1e3)
    }
}

/// What the saver is doing, in words: the epoch it writes now, if any,
/// and how many epochs started late because it was still busy with the
/// one before (and by how long in all); "keeping up" when nothing of that.
pub fn saver_words(in_flight: Option<u64>, late: u64, late_ms: f64) -> String {
    let mut out = match in_flight {
        Some(id) => format!("writing epoch {id}"),
        None if late == 0 => return "keeping up".to_string(),
        None => "idle".to_string(),
    };
    if late > 0 {
        let total = if late_ms < 10_000.0 {
            format!("{late_ms:.0}ms")
        } else {
            format!("{:.1}s", late_ms / 1e3)
        };
        out += &format!(
            "; {late} epoch{} started late waiting for it ({total} in all)",
            if late == 1 { "" } else { "s" }
        );
    }
    out
}

/// The line for `board` (`None` without snapshots).
pub fn line(board: &Board) -> Option<String> {
    let f = board.snap.as_ref()?;
    let s = snap_stats(f);
    let mut out = String::from("consnap: ");
    if board.state == VmState::Paused {
        out += "[paused] ";
    }
    out += &format!("{} epochs", s.committed);
    if let Some(last) = &s.last {
        out += &format!(", last pause {}, p99 {}", ms(last.pause_us), ms(s.pause.p99_us));
    }
    out += &format!(
        ", saver {:.0} MB/s, {}",
        s.save_mb_s,
        saver_words(s.in_flight, s.delayed, s.delayed_ms)
    );
    if s.failed > 0 {
        out += &format!(", {} errors", s.failed);
    }
    if board.state != VmState::Paused
        && let Some(rate) = board.ops_rate()
    {
        out += &format!(", guest {} ops/s", short(rate));
    }
    Some(out)
}

impl Live {
    /// Start the line (for a run with snapshots), every `every` or at the
    /// default pace.
    pub fn start(cell: Arc<BoardCell>, every: Option<Duration>) -> Option<Live> {
        let tty = std::io::stderr().is_terminal();
        let every = every.unwrap_or(if tty {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("live".into())
            .spawn(move || {
                let mut drawn = false;
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let Some(text) = line(&cell.lock()) else { continue };
                    let mut err = std::io::stderr().lock();
                    // stderr may be unwritable: never fail over a status line.
                    let _ = if tty {
                        drawn = true;
                        write!(err, "\r\x1b[2K{text}")
                    } else {
                        writeln!(err, "{text}")
                    };
                    let _ = err.flush();
                }
                if drawn {
                    let _ = write!(std::io::stderr(), "\r\x1b[2K");
                }
            })
            .ok()?;
        Some(Live {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stop the line (and clear it on a terminal).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saver_is_described_in_words() {
        assert_eq!(saver_words(None, 0, 0.0), "keeping up");
        assert_eq!(saver_words(Some(12), 0, 0.0), "writing epoch 12");
        assert_eq!(
            saver_words(Some(334), 334, 17_571.0),
            "writing epoch 334; 334 epochs started late waiting for it (17.6s in all)"
        );
        assert_eq!(
            saver_words(None, 1, 40.0),
            "idle; 1 epoch started late waiting for it (40ms in all)"
        );
    }
}
