//! Child processes with a deadline, their output kept in files.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How a child ended.
pub struct Ended {
    pub status: ExitStatus,
    /// From spawn to exit.
    pub wall: Duration,
    /// The child was sent SIGTERM at its cap (see [`wait`]).
    pub capped: bool,
}

/// Spawn `cmd` with stdout and stderr written to `out` and `err`.
pub fn spawn(cmd: &mut Command, out: &Path, err: &Path) -> Result<Child, String> {
    let o = File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let e = File::create(err).map_err(|e| format!("{}: {e}", err.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(o)
        .stderr(e)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))
}

/// Wait for `child` until `deadline`; past it, kill it and say so. With a
/// `cap`, the child is first sent SIGTERM when the cap passes (consnap
/// then ends the run cleanly and writes its report).
pub fn wait(child: &mut Child, started: Instant, deadline: Duration, cap: Option<Duration>) -> Result<Ended, String> {
    let mut capped = false;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Ok(Ended {
                    status,
                    wall: started.elapsed(),
                    capped,
                });
            }
            Ok(None) if !capped && cap.is_some_and(|c| started.elapsed() > c) => {
                capped = true;
                if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                    // SAFETY: kill(2) on our own child, which has not been
                    // reaped yet (try_wait said it runs), so the pid is its.
                    unsafe {
                        libc::kill(pid, libc::SIGTERM);
                    }
                }
            }
            Ok(None) if started.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("killed after {:.0} s (the deadline)", deadline.as_secs_f64()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the child: {e}")),
        }
    }
}

/// The last lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Total size of the files under `dir`, bytes.
pub fn du(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}
