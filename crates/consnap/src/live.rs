//! The live status line of a run that takes snapshots: epochs, the last
//! pause, pause p99, saver MB/s, backlog and the guest's op rate, on
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
    out += &format!(", saver {:.0} MB/s", s.save_mb_s);
    out += ", backlog ";
    out += &match (s.in_flight, s.delayed) {
        (None, 0) => "none".to_string(),
        (Some(id), 0) => format!("saving {id}"),
        (None, n) => format!("{n} late ({:.0}ms)", s.delayed_ms),
        (Some(id), n) => format!("saving {id}, {n} late ({:.0}ms)", s.delayed_ms),
    };
    if s.failed > 0 {
        out += &format!(", {} errors", s.failed);
    }
    if let Some(rate) = board.ops_per_s {
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
