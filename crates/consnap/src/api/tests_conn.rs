//! The server's connection limits over a real socket: idle, slow and
//! half-sent clients keep no one out, clients beyond the limit are
//! answered 503, and bytes that are not HTTP get a one-line JSON 400.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::board::Envelope;
use super::conn::MAX_CONNECTIONS;
use super::server::{self, ApiServer};
use super::tests::cell;

/// A failure guard only: no answer expected here takes nearly as long.
const GUARD: Duration = Duration::from_secs(60);

/// A server on a socket of its own, removed with it.
struct Served {
    server: Option<ApiServer>,
    path: PathBuf,
    _commands: mpsc::Receiver<Envelope>,
}

impl Served {
    fn start() -> Served {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "consnap-api-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let (tx, rx) = mpsc::sync_channel(4);
        let server = ApiServer::start(server::bind(&path).unwrap(), cell(), tx, Arc::new(|| {})).unwrap();
        Served {
            server: Some(server),
            path,
            _commands: rx,
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        s
    }

    /// Send `bytes` on a new connection; the answer, read until the server closes.
    fn ask(&self, bytes: &[u8]) -> (u16, String) {
        let mut s = self.connect();
        s.write_all(bytes).unwrap();
        answer(&mut s)
    }

    /// Wait until `n` connections hold a request in progress.
    fn wait_busy(&self, n: usize) {
        let start = Instant::now();
        let server = self.server.as_ref().unwrap();
        while server.busy_connections() != n {
            assert!(start.elapsed() < GUARD, "{} busy, not {n}", server.busy_connections());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Status and body of the answer on `s`, read until the server closes.
fn answer(s: &mut UnixStream) -> (u16, String) {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

/// A one-line JSON error with a message.
#[track_caller]
fn assert_json_error(body: &str) {
    assert_eq!(body.trim_end().lines().count(), 1, "{body:?}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
}

const GET_VM: &[u8] = b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
const HALF_BODY: &[u8] =
    b"PATCH /snapshots/config HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";

#[test]
fn idle_and_half_sent_clients_keep_no_one_out() {
    let served = Served::start();
    let mut idle: Vec<UnixStream> = (0..64).map(|_| served.connect()).collect();
    let half_headers: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut s = served.connect();
            s.write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let half_bodies: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut s = served.connect();
            s.write_all(HALF_BODY).unwrap();
            s
        })
        .collect();
    let (status, body) = served.ask(GET_VM);
    assert_eq!(status, 200, "{body}");
    let vm: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(vm["state"], "running", "{body}");
    // The longest idle made room: closed without an answer.
    assert_eq!(answer(&mut idle[0]), (0, String::new()));
    drop((idle, half_headers, half_bodies));
}

#[test]
fn clients_beyond_the_limit_get_503_and_half_sent_bodies_408() {
    let served = Served::start();
    let mut stuck: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut s = served.connect();
            s.write_all(HALF_BODY).unwrap();
            s
        })
        .collect();
    served.wait_busy(MAX_CONNECTIONS);
    for _ in 0..3 {
        let (status, body) = served.ask(GET_VM);
        assert_eq!(status, 503, "{body}");
        assert_json_error(&body);
    }
    // A body that never arrives is given up, answered 408...
    let (status, body) = answer(&mut stuck[0]);
    assert_eq!(status, 408, "{body}");
    assert_json_error(&body);
    // ...and then everyone is served again.
    drop(stuck);
    served.wait_busy(0);
    let (status, body) = served.ask(GET_VM);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn bytes_that_are_not_http_get_a_json_400() {
    let served = Served::start();
    for garbage in [
        &b"\x00\x01garbage\r\n\r\n"[..],
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ] {
        let (status, body) = served.ask(garbage);
        assert_eq!(status, 400, "{:?}: {body}", String::from_utf8_lossy(garbage));
        assert_json_error(&body);
    }
    // The connection is still usable for others.
    assert_eq!(served.ask(GET_VM).0, 200);
}
