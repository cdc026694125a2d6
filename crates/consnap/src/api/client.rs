//! A client of the control API, for `consnap ctl` and `consnap demo`: one
//! request per connection, over the Unix socket, with a deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use thiserror::Error;

/// Why a request got no answer; each names the socket or the request.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The client's runtime did not start.
    #[error("cannot start the client runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// No answer within the deadline.
    #[error("no answer from {sock} within {secs}s")]
    Timeout {
        /// The API socket.
        sock: PathBuf,
        /// The deadline, seconds.
        secs: u64,
    },
    /// Nothing listens on the socket.
    #[error("cannot connect to {sock}: {source} (is a consnap running with --api-sock {sock}?)")]
    Connect {
        /// The API socket.
        sock: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{sock}: {source}")]
    Http {
        /// The API socket.
        sock: PathBuf,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built.
    #[error("bad request {method} {path}: {source}")]
    Request {
        /// Its method.
        method: String,
        /// Its path.
        path: String,
        /// Cause.
        #[source]
        source: hyper::http::Error,
    },
}

/// An answer: its status and body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The error message of an error answer (`{"error": ...}`), or the body.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<super::ApiError>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

/// Send `method path` with an optional JSON body to the API at `sock`.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ClientError::Runtime)?;
    rt.block_on(async {
        match tokio::time::timeout(timeout, exchange(sock, method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                sock: sock.to_path_buf(),
                secs: timeout.as_secs(),
            }),
        }
    })
}

async fn exchange(sock: &Path, method: &str, path: &str, body: Option<String>) -> Result<Answer, ClientError> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|source| ClientError::Connect {
            sock: sock.to_path_buf(),
            source,
        })?;
    let broken = |source: hyper::Error| ClientError::Http {
        sock: sock.to_path_buf(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(broken)?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|source| ClientError::Request {
            method: method.to_string(),
            path: path.to_string(),
            source,
        })?;
    let res = sender.send_request(req).await.map_err(broken)?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.map_err(broken)?.to_bytes().to_vec();
    conn.abort();
    Ok(Answer { status, body })
}
