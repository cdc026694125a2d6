//! Snapshot errors on stderr, once: the same failure repeating every
//! interval (an unusable directory, a full disk, a lock held by another
//! process) is printed the first time, then as a count of repeats every few
//! seconds and at the end of the run.

use std::io::Write;
use std::time::{Duration, Instant};

/// How often a repeating error is summarised.
const SUMMARY_EVERY: Duration = Duration::from_secs(5);

/// Rate-limited printer of snapshot errors.
#[derive(Debug)]
pub(crate) struct ErrorLog {
    /// The engine's `stop_after`.
    stop_after: Option<u32>,
    last: Option<String>,
    repeats: u64,
    since: Instant,
}

/// The message without its "epoch N: " prefix, so that one cause repeating
/// over many epochs counts as one error.
fn cause(msg: &str) -> &str {
    msg.strip_prefix("epoch ")
        .and_then(|rest| rest.split_once(": "))
        .filter(|(id, _)| id.bytes().all(|b| b.is_ascii_digit()))
        .map_or(msg, |(_, cause)| cause)
}

impl ErrorLog {
    pub(crate) fn new(stop_after: Option<u32>) -> ErrorLog {
        ErrorLog {
            stop_after,
            last: None,
            repeats: 0,
            since: Instant::now(),
        }
    }

    /// Report one error.
    pub(crate) fn error(&mut self, msg: &str) {
        let key = cause(msg);
        if self.last.as_deref() == Some(key) {
            self.repeats += 1;
            if self.since.elapsed() >= SUMMARY_EVERY {
                self.flush();
                self.last = Some(key.to_string());
            }
            return;
        }
        self.flush();
        // stderr may be unwritable (a full file): never panic over a message.
        let mut err = std::io::stderr();
        let _ = match self.stop_after {
            Some(1) => writeln!(err, "consnap: snapshot error: {msg}"),
            Some(n) => writeln!(
                err,
                "consnap: snapshot error: {msg} (the VM keeps running unprotected and snapshots are retried; the run stops after {n} failures in a row)"
            ),
            None => writeln!(
                err,
                "consnap: snapshot error: {msg} (the VM keeps running unprotected; snapshots are retried)"
            ),
        };
        self.last = Some(key.to_string());
        self.since = Instant::now();
    }

    /// Print the count of repeats not yet reported.
    pub(crate) fn flush(&mut self) {
        if self.repeats > 0
            && let Some(last) = &self.last
        {
            let _ = writeln!(
                std::io::stderr(),
                "consnap: snapshot error repeated {} more times in {:.0}s: {last}",
                self.repeats,
                self.since.elapsed().as_secs_f64()
            );
        }
        self.repeats = 0;
        self.last = None;
        self.since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_ids_do_not_make_errors_distinct() {
        assert_eq!(cause("epoch 12: disk full"), "disk full");
        assert_eq!(cause("epoch x: disk full"), "epoch x: disk full");
        assert_eq!(
            cause("snapshot directory unusable: no"),
            "snapshot directory unusable: no"
        );
        let mut log = ErrorLog::new(None);
        log.error("epoch 1: disk full");
        log.error("epoch 2: disk full");
        log.error("epoch 3: disk full");
        assert_eq!(log.repeats, 2);
        log.error("epoch 4: other");
        assert_eq!(log.repeats, 0);
        assert_eq!(log.last.as_deref(), Some("other"));
    }
}
