//! The API server's connections: which are served, for how long, and what
//! a client beyond the limit gets.
//!
//! At most [`MAX_CONNECTIONS`] connections are served at once. A
//! connection is *busy* while a request of it is being handled (from its
//! headers to its answer) and *idle* otherwise: before its first request
//! arrives in full, between requests, while its answer is being sent. An
//! idle connection is closed after [`IDLE_TIMEOUT`], and at once when a
//! new client needs its place (the longest idle goes first), so neither
//! idle, slow nor half-sent connections keep anyone out. Only when every
//! place holds a request in progress is a new client answered 503 with a
//! one-line JSON error and closed; at most [`MAX_REFUSING`] such answers
//! are written at once, clients beyond that are closed without one.
//!
//! hyper answers a request it cannot parse with a bare status and an
//! empty body; [`JsonErrors`] gives that answer the API's one-line JSON
//! body, as every other error answer has.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::ApiError;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a connection may be idle: to send a request's headers, between
/// requests, or to read an answer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// 503 answers to clients beyond [`MAX_CONNECTIONS`] written at once.
pub const MAX_REFUSING: usize = 64;
/// How long a refused client has to take its 503.
const REFUSE_WAIT: Duration = Duration::from_secs(1);

/// One served connection, as the registry sees it.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    /// Requests being handled now.
    busy: AtomicUsize,
    /// When it last became idle.
    idle_since: Mutex<Instant>,
    /// Told when its place goes to a new client.
    evicted: Notify,
}

impl Conn {
    fn idle_since(&self) -> MutexGuard<'_, Instant> {
        self.idle_since.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
    }

    /// When an idle connection is closed, if it stays idle.
    fn idle_deadline(&self) -> Instant {
        *self.idle_since() + IDLE_TIMEOUT
    }
}

/// Marks its connection busy while it lives (a request being handled).
pub struct Busy(Arc<Conn>);

impl Busy {
    /// A request of `conn` is being handled.
    pub fn start(conn: &Arc<Conn>) -> Busy {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(conn))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since() = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connections being served, and the places for refusals.
#[derive(Debug)]
pub struct Registry {
    conns: Mutex<Vec<Arc<Conn>>>,
    next_id: AtomicU64,
    refusing: Arc<Semaphore>,
}

/// What becomes of a new client.
pub enum Admission {
    /// Served, in this place.
    Serve(Arc<Conn>),
    /// Answered 503 (the permit bounds such answers).
    Refuse(tokio::sync::OwnedSemaphorePermit),
    /// Closed at once.
    Drop,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            conns: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
        }
    }
}

impl Registry {
    fn conns(&self) -> MutexGuard<'_, Vec<Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new client: a free one, or that of the connection
    /// idle the longest (which is told to close); if every place is busy,
    /// a refusal.
    pub fn admit(&self) -> Admission {
        let mut conns = self.conns();
        if conns.len() >= MAX_CONNECTIONS {
            let longest_idle = conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_idle())
                .min_by_key(|(_, c)| *c.idle_since())
                .map(|(i, _)| i);
            let Some(i) = longest_idle else {
                return match Arc::clone(&self.refusing).try_acquire_owned() {
                    Ok(permit) => Admission::Refuse(permit),
                    Err(_) => Admission::Drop,
                };
            };
            let old = conns.swap_remove(i);
            tracing::debug!("API: closing idle connection {} to serve a new one", old.id);
            old.evicted.notify_one();
        }
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            evicted: Notify::new(),
        });
        conns.push(Arc::clone(&conn));
        Admission::Serve(conn)
    }

    /// Connections with a request in progress.
    #[cfg(test)]
    pub fn busy(&self) -> usize {
        self.conns().iter().filter(|c| !c.is_idle()).count()
    }

    /// `conn` is closed: its place is free.
    pub fn leave(&self, conn: &Conn) {
        self.conns().retain(|c| c.id != conn.id);
    }
}

/// Why a served connection ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Idle for [`IDLE_TIMEOUT`].
    Idle,
    /// Its place went to a new client.
    Evicted,
}

/// Wait until `conn` must be closed: idle for too long, or evicted. (A
/// busy connection's requests have deadlines of their own.)
pub async fn must_close(conn: &Conn) -> Closed {
    loop {
        let wake = if conn.is_idle() {
            conn.idle_deadline()
        } else {
            Instant::now() + IDLE_TIMEOUT
        };
        tokio::select! {
            _ = conn.evicted.notified() => return Closed::Evicted,
            _ = tokio::time::sleep_until(wake) => {
                if conn.is_idle() && Instant::now() >= conn.idle_deadline() {
                    return Closed::Idle;
                }
            }
        }
    }
}

/// An error answer written by hand: status line, JSON body, close.
fn error_answer(status: &str, message: &str) -> Vec<u8> {
    let body = serde_json::to_string(&ApiError {
        error: message.to_string(),
    })
    .unwrap_or_else(|_| r#"{"error":"unprintable error"}"#.into())
        + "\n";
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answer a client beyond the limit with 503 and close, giving it at most
/// [`REFUSE_WAIT`] to take the answer.
pub async fn refuse(mut stream: UnixStream) {
    let answer = error_answer(
        "503 Service Unavailable",
        &format!("the API serves {MAX_CONNECTIONS} requests at once and all are in progress; try again"),
    );
    let exchange = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        // Take what the client sent, so that it reads the answer rather
        // than a reset.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    if let Ok(Err(e)) = tokio::time::timeout(REFUSE_WAIT, exchange).await {
        tracing::debug!("API: refusing a client: {e}");
    }
}

/// The JSON answer for hyper's own bare error answer in `buf` (a head with
/// an error status, `content-length: 0` and nothing after it), if it is one.
/// The server's handlers never give an error answer without a body.
fn json_for_bare_error(buf: &[u8]) -> Option<Vec<u8>> {
    let head = buf.strip_suffix(b"\r\n\r\n")?;
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.strip_prefix("HTTP/1.1 ")?;
    let code: u16 = status.get(..3)?.parse().ok()?;
    if !(400..600).contains(&code) || !lines.any(|l| l.eq_ignore_ascii_case("content-length: 0")) {
        return None;
    }
    let message = match code {
        414 => "the request's path is too long",
        431 => "the request's headers are too large",
        _ => "not an HTTP/1.1 request",
    };
    Some(error_answer(status, message))
}

/// A connection's stream whose bare error answers (see
/// [`json_for_bare_error`]) are replaced by one-line JSON ones.
pub struct JsonErrors<T> {
    io: T,
    /// A replacement answer still to be written, and how much of it is.
    pending: Vec<u8>,
    written: usize,
}

impl<T> JsonErrors<T> {
    /// Wrap `io`.
    pub fn new(io: T) -> Self {
        JsonErrors {
            io,
            pending: Vec::new(),
            written: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> JsonErrors<T> {
    /// Write out the pending replacement, if any.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrors<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrors<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        match json_for_bare_error(buf) {
            Some(answer) => {
                self.pending = answer;
                // Written here or by the next flush; the bare answer is taken whole.
                if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(buf.len()))
            }
            None => Pin::new(&mut self.io).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_error_answers_become_json() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 16:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(json_for_bare_error(bare).unwrap()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        assert_eq!(body, "{\"error\":\"not an HTTP/1.1 request\"}\n");
        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(
            String::from_utf8(json_for_bare_error(big).unwrap())
                .unwrap()
                .contains("too large")
        );
        // Answers with a body, and successes, pass unchanged.
        for other in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\n{}\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n\r\n",
        ] {
            assert!(
                json_for_bare_error(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn a_full_registry_makes_room_by_closing_the_longest_idle() {
        let reg = Registry::default();
        let conns: Vec<Arc<Conn>> = (0..MAX_CONNECTIONS)
            .map(|_| match reg.admit() {
                Admission::Serve(c) => c,
                _ => panic!("refused below the limit"),
            })
            .collect();
        // All busy but the third: the newcomer takes the third's place.
        let busy: Vec<Busy> = conns.iter().filter(|c| c.id != 2).map(Busy::start).collect();
        let Admission::Serve(new) = reg.admit() else {
            panic!("no room made")
        };
        assert_ne!(new.id, 2);
        assert_eq!(reg.conns().len(), MAX_CONNECTIONS);
        assert!(!reg.conns().iter().any(|c| c.id == 2), "the idle one was kept");
        // Everyone busy: refused with an answer, then without one.
        let _new_busy = Busy::start(&new);
        let mut permits = Vec::new();
        for _ in 0..MAX_REFUSING {
            match reg.admit() {
                Admission::Refuse(p) => permits.push(p),
                _ => panic!("not refused"),
            }
        }
        assert!(matches!(reg.admit(), Admission::Drop));
        drop(permits);
        assert!(matches!(reg.admit(), Admission::Refuse(_)));
        // A request done: that connection is idle again, and makes room.
        drop(busy);
        assert!(matches!(reg.admit(), Admission::Serve(_)));
    }
}
