//! Child processes with a deadline, their output kept in files.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Why a child could not be started or waited for.
#[derive(Debug, Error)]
pub enum ProcError {
    /// A file for its output could not be created.
    #[error("{path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The program did not start.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
    /// It ran past its deadline and was killed.
    #[error("killed after {:.0} s (the deadline)", .deadline.as_secs_f64())]
    Deadline { deadline: Duration },
    /// Waiting for it failed.
    #[error("waiting for the child: {0}")]
    Wait(#[source] std::io::Error),
}

/// How a child ended.
pub struct Ended {
    pub status: ExitStatus,
    /// From spawn to exit.
    pub wall: Duration,
    /// The child was sent SIGTERM at its cap (see [`wait`]).
    pub capped: bool,
}

/// Spawn `cmd` with stdout and stderr written to `out` and `err`.
pub fn spawn(cmd: &mut Command, out: &Path, err: &Path) -> Result<Child, ProcError> {
    let create = |path: &Path| {
        File::create(path).map_err(|source| ProcError::Output {
            path: path.to_path_buf(),
            source,
        })
    };
    let (o, e) = (create(out)?, create(err)?);
    cmd.stdin(Stdio::null())
        .stdout(o)
        .stderr(e)
        .spawn()
        .map_err(|source| ProcError::Spawn {
            program: cmd.get_program().to_os_string(),
            source,
        })
}

/// Wait for `child` until `deadline`; past it, kill it and say so. With a
/// `cap`, the child is first sent SIGTERM when the cap passes (consnap
/// then ends the run cleanly and writes its report).
pub fn wait(
    child: &mut Child,
    started: Instant,
    deadline: Duration,
    cap: Option<Duration>,
) -> Result<Ended, ProcError> {
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
                return Err(ProcError::Deadline { deadline });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(ProcError::Wait(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_program_and_the_deadline() {
        let dir = std::env::temp_dir();
        let (out, err) = (dir.join("bench-proc-test.out"), dir.join("bench-proc-test.err"));
        let e = spawn(&mut Command::new("/nonexistent/consnap"), &out, &err).unwrap_err();
        assert!(matches!(e, ProcError::Spawn { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("cannot start \"/nonexistent/consnap\": "),
            "{e}"
        );
        let _ = (std::fs::remove_file(&out), std::fs::remove_file(&err));
        let e = ProcError::Deadline {
            deadline: Duration::from_secs(90),
        };
        assert_eq!(e.to_string(), "killed after 90 s (the deadline)");
    }
}
