//! A client of the control API, for `consnap ctl` and `consnap demo`: one
//! request per connection, over the Unix socket, with a deadline.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

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
pub fn call(sock: &Path, method: &str, path: &str, body: Option<String>, timeout: Duration) -> Result<Answer, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))?;
    rt.block_on(async {
        match tokio::time::timeout(timeout, exchange(sock, method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer from {} within {}s",
                sock.display(),
                timeout.as_secs()
            )),
        }
    })
}

async fn exchange(sock: &Path, method: &str, path: &str, body: Option<String>) -> Result<Answer, String> {
    let stream = tokio::net::UnixStream::connect(sock).await.map_err(|e| {
        format!(
            "cannot connect to {}: {e} (is a consnap running with --api-sock {}?)",
            sock.display(),
            sock.display()
        )
    })?;
    let broken = |e: hyper::Error| format!("{}: {e}", sock.display());
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
        .map_err(|e| format!("bad request {method} {path}: {e}"))?;
    let res = sender.send_request(req).await.map_err(broken)?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.map_err(broken)?.to_bytes().to_vec();
    conn.abort();
    Ok(Answer { status, body })
}
