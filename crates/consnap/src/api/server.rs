//! The API server: a Unix socket (created 0600) served by hyper and routed
//! by axum on a thread of its own with a single-threaded tokio runtime.
//!
//! Reads (`GET`) are answered on that thread from the board; `GET
//! /snapshots` reads the store on a small blocking pool. Commands go to the
//! controller through a bounded queue (a full queue is refused with 503)
//! and their replies come back on a oneshot channel with a deadline.
//! Connections are bounded as [`super::conn`] describes; a request's body
//! must arrive within [`BODY_TIMEOUT`] (else 408). Every error answer is
//! one line of JSON, `{"error": "..."}`.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{Semaphore, oneshot};

use super::ApiError;
use super::board::{Answer, BoardCell, Command, Envelope, Refusal};
use super::conn::{self, Admission, Busy, Conn, JsonErrors, Registry};
use crate::ls_cmd;

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 << 10;
/// Time a client has to send a request's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands queued for the controller at most.
pub const QUEUE: usize = 64;
/// How long a pause, resume or configuration change may take.
const COMMAND_WAIT: Duration = Duration::from_secs(10);
/// How long `PUT /snapshots/take` waits for its epoch to be durable.
const TAKE_WAIT: Duration = Duration::from_secs(120);
/// Whole-request deadline (beyond the longest wait above).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(130);

/// Why the API cannot be served; each names the `--api-sock` path.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Another process serves the socket.
    #[error("--api-sock {path}: a process is listening there (another consnap?); stop it or choose another path")]
    Listening {
        /// The socket.
        path: PathBuf,
    },
    /// A socket left by a process that died cannot be removed.
    #[error("--api-sock {path}: cannot remove the stale socket: {source}")]
    Stale {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Something that is not a socket is there.
    #[error("--api-sock {path}: exists and is not a socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket cannot be created.
    #[error("--api-sock {path}: cannot listen there: {source}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The path cannot be looked at, or the socket set up.
    #[error("--api-sock {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// [`ApiServer::start`] was given a listener that is served already.
    #[error("the API socket is already served")]
    AlreadyServed,
    /// The server's thread did not start.
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A bound socket, checked before the VM is built; removed again if it
/// is dropped before it is served.
#[derive(Debug)]
pub struct Listener {
    socket: Option<UnixListener>,
    path: PathBuf,
    inode: Option<(u64, u64)>,
}

/// The device and inode of `path`, to tell our socket from one put in its place.
fn inode(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Remove `path` if it is still the socket with `id`.
fn remove_if_ours(path: &Path, id: Option<(u64, u64)>) {
    if id.is_some() && inode(path) == id {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.socket.take().is_some() {
            remove_if_ours(&self.path, self.inode);
        }
    }
}

/// Create the socket at `path`, 0600. A socket file nobody listens on (left
/// by a process that died) is replaced; a live one, or anything that is
/// not a socket, is refused.
pub fn bind(path: &Path) -> Result<Listener, ServerError> {
    let at = || path.to_path_buf();
    let io = |source| ServerError::Io { path: at(), source };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::Listening { path: at() }),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!("replacing the stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|source| ServerError::Stale { path: at(), source })?;
            }
            Err(e) => return Err(io(e)),
        },
        Ok(_) => return Err(ServerError::NotASocket { path: at() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // It is bound (and listening) under a temporary name and renamed into
    // place, so that whoever waits for `path` to appear never finds a
    // socket not yet listening (bind and listen are two calls).
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    // The socket must never be open to others, not even for a moment: bind
    // under a umask that leaves 0600. This runs before any other thread
    // that creates files exists.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&tmp);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let socket = bound.map_err(|source| ServerError::Listen { path: at(), source })?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| socket.set_nonblocking(true))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })?;
    Ok(Listener {
        socket: Some(socket),
        path: path.to_path_buf(),
        inode: inode(path),
    })
}

/// Wakes the controller when a command is queued.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
struct App {
    cell: Arc<BoardCell>,
    commands: SyncSender<Envelope>,
    waker: Wake,
    /// One store listing at a time.
    listing: Arc<Semaphore>,
}

/// The running server; [`ApiServer::stop`] ends it and removes the socket.
pub struct ApiServer {
    stop: Option<oneshot::Sender<()>>,
    #[cfg(test)]
    registry: Arc<Registry>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    inode: Option<(u64, u64)>,
}

impl ApiServer {
    /// Serve `listener` on a new thread.
    pub fn start(
        mut listener: Listener,
        cell: Arc<BoardCell>,
        commands: SyncSender<Envelope>,
        waker: Wake,
    ) -> Result<ApiServer, ServerError> {
        let socket = listener.socket.take().ok_or(ServerError::AlreadyServed)?;
        let (path, inode) = (listener.path.clone(), listener.inode);
        let app = App {
            cell,
            commands,
            waker,
            listing: Arc::new(Semaphore::new(1)),
        };
        let (stop, stopped) = oneshot::channel();
        let registry = Arc::new(Registry::default());
        let served = Arc::clone(&registry);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve_thread(socket, router(app), served, stopped))
            .map_err(|e| {
                remove_if_ours(&path, inode);
                ServerError::Thread(e)
            })?;
        Ok(ApiServer {
            stop: Some(stop),
            #[cfg(test)]
            registry,
            thread: Some(thread),
            path,
            inode,
        })
    }

    /// Connections with a request in progress now.
    #[cfg(test)]
    pub fn busy_connections(&self) -> usize {
        self.registry.busy()
    }

    /// Stop serving (requests in progress are dropped) and remove the
    /// socket, if it is still the one this server created.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the API thread panicked");
        }
        remove_if_ours(&self.path, self.inode);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve_thread(socket: UnixListener, app: Router, registry: Arc<Registry>, stopped: oneshot::Receiver<()>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the API runtime: {e}");
            return;
        }
    };
    rt.block_on(accept_loop(socket, app, registry, stopped));
    rt.shutdown_timeout(Duration::from_millis(200));
}

async fn accept_loop(socket: UnixListener, app: Router, registry: Arc<Registry>, mut stopped: oneshot::Receiver<()>) {
    let listener = match tokio::net::UnixListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot serve the API socket: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stopped => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                tracing::warn!("API socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match registry.admit() {
            Admission::Serve(conn) => {
                tokio::spawn(serve_connection(stream, conn, Arc::clone(&registry), app.clone()));
            }
            Admission::Refuse(permit) => {
                tracing::debug!("API: every connection is busy; refusing a client");
                tokio::spawn(async move {
                    conn::refuse(stream).await;
                    drop(permit);
                });
            }
            Admission::Drop => tracing::debug!("API: every connection is busy; closing a client"),
        }
    }
}

/// Serve one admitted connection until it ends, idles too long or is
/// evicted; its requests mark it busy while they are handled.
async fn serve_connection(stream: tokio::net::UnixStream, conn: Arc<Conn>, registry: Arc<Registry>, app: Router) {
    let inner = TowerToHyperService::new(app);
    let busy_conn = Arc::clone(&conn);
    let service = hyper::service::service_fn(move |req| {
        let busy = Busy::start(&busy_conn);
        let answer = inner.call(req);
        async move {
            let res = answer.await;
            drop(busy);
            res
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // Idle connections are closed by conn::must_close, which also covers
    // half-sent headers.
    http.header_read_timeout(None).max_buf_size(64 << 10);
    let served = http.serve_connection(TokioIo::new(JsonErrors::new(stream)), service);
    tokio::select! {
        r = served => {
            if let Err(e) = r {
                tracing::debug!("API connection: {e}");
            }
        }
        why = conn::must_close(&conn) => tracing::debug!("API connection closed: {why:?}"),
    }
    registry.leave(&conn);
}

fn router(app: App) -> Router {
    Router::new()
        .route("/vm", get(vm))
        .route("/vm/pause", put(pause))
        .route("/vm/resume", put(resume))
        .route("/snapshots", get(list))
        .route("/snapshots/take", put(take))
        .route("/snapshots/config", get(config).patch(set_config))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(guard))
        .with_state(app)
}

/// An error answer: one line of JSON.
pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let body = serde_json::to_string(&ApiError { error: msg.into() })
        .unwrap_or_else(|_| r#"{"error":"unprintable error"}"#.into());
    (status, [(header::CONTENT_TYPE, "application/json")], body + "\n").into_response()
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body + "\n",
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        ),
    }
}

/// Around every request: no query strings, the body within
/// [`BODY_TIMEOUT`] and [`MAX_BODY`], a deadline, and errors (also those
/// axum and hyper produce, such as 405) as one-line JSON.
async fn guard(req: Request, next: Next) -> Response {
    if req.uri().query().is_some_and(|q| !q.is_empty()) {
        return error(StatusCode::BAD_REQUEST, "this API takes no query parameters");
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => return body_error(&e),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request's body did not arrive within {}s", BODY_TIMEOUT.as_secs()),
            );
        }
    };
    let req = Request::from_parts(parts, axum::body::Body::from(body));
    let res = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(res) => res,
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "the request timed out"),
    };
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let msg = match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => line.to_string(),
        None => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let fixed = error(status, msg);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let (_, body) = fixed.into_parts();
    Response::from_parts(parts, body)
}

/// The answer to a body that could not be read: too large, or broken off.
fn body_error(e: &axum::Error) -> Response {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {} KiB", MAX_BODY >> 10),
            );
        }
        cause = c.source();
    }
    error(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}"))
}

async fn not_found(req: Request) -> Response {
    let all: Vec<String> = super::ROUTES.iter().map(|(m, p)| format!("{m} {p}")).collect();
    error(
        StatusCode::NOT_FOUND,
        format!("no endpoint {}; there are {}", req.uri().path(), all.join(", ")),
    )
}

async fn vm(State(app): State<App>) -> Response {
    let info = app.cell.lock().vm_info();
    json(&info)
}

async fn stats(State(app): State<App>) -> Response {
    let stats = app.cell.lock().stats();
    json(&stats)
}

async fn metrics(State(app): State<App>) -> Response {
    let text = super::metrics::render(&app.cell.lock());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn config(State(app): State<App>) -> Response {
    let config = app.cell.lock().config();
    match config {
        Some(c) => json(&c),
        None => refused(Refusal::Conflict(super::board::SNAPSHOTS_OFF.into())),
    }
}

async fn list(State(app): State<App>) -> Response {
    let Some(dir) = app.cell.lock().snapshot_dir() else {
        return refused(Refusal::Conflict(super::board::SNAPSHOTS_OFF.into()));
    };
    let Ok(_one) = app.listing.acquire().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the API is stopping");
    };
    match tokio::task::spawn_blocking(move || ls_cmd::rows(&dir, store::Depth::Structure)).await {
        Ok(Ok(rows)) => json(&rows),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("listing failed: {e}")),
    }
}

async fn pause(State(app): State<App>) -> Response {
    command(&app, Command::Pause, COMMAND_WAIT).await
}

async fn resume(State(app): State<App>) -> Response {
    command(&app, Command::Resume, COMMAND_WAIT).await
}

async fn take(State(app): State<App>) -> Response {
    command(&app, Command::Take, TAKE_WAIT).await
}

async fn set_config(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let essence = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON (Content-Type: application/json)",
            );
        }
    }
    match super::board::parse_patch(&body) {
        Ok((interval, mode)) => command(&app, Command::Configure { interval, mode }, COMMAND_WAIT).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

fn refused(r: Refusal) -> Response {
    match r {
        Refusal::Conflict(msg) => error(StatusCode::CONFLICT, msg),
        Refusal::Failed(msg) => error(StatusCode::INTERNAL_SERVER_ERROR, msg),
    }
}

/// Queue `cmd` for the controller, wake it, and wait up to `wait` for its reply.
async fn command(app: &App, cmd: Command, wait: Duration) -> Response {
    let (reply, answer) = oneshot::channel();
    match app.commands.try_send(Envelope { cmd, reply }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "too many commands waiting; try again");
        }
        Err(TrySendError::Disconnected(_)) => {
            return error(StatusCode::CONFLICT, "the VM is stopping");
        }
    }
    if !app.cell.pending.swap(true, Ordering::SeqCst) {
        (app.waker)();
    }
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(Ok(Answer::State(state)))) => {
            let mut info = app.cell.lock().vm_info();
            info.state = state;
            json(&info)
        }
        Ok(Ok(Ok(Answer::Epoch(e)))) => json(&e),
        Ok(Ok(Ok(Answer::Config(c)))) => json(&c),
        Ok(Ok(Err(r))) => refused(r),
        Ok(Err(_)) => error(StatusCode::CONFLICT, "the VM is stopping"),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no answer from the VM within {}s", wait.as_secs()),
        ),
    }
}

/// Requests without a socket, for tests of the routes.
#[cfg(test)]
pub fn test_router(cell: Arc<BoardCell>, commands: SyncSender<Envelope>, waker: Wake) -> Router {
    router(App {
        cell,
        commands,
        waker,
        listing: Arc::new(Semaphore::new(1)),
    })
}

/// Body of a response, for tests.
#[cfg(test)]
pub async fn body_text(res: Response) -> String {
    String::from_utf8_lossy(&axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap_or_default()).into_owned()
}
