//! The server's routes against docs/openapi.yaml: every documented
//! operation is served, nothing else is, and every error is one line of JSON.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt;

use super::board::{Board, BoardCell, Refusal};
use super::openapi_check::Document;
use super::server::{body_text, test_router};
use super::{ROUTES, VmState};

const METHODS: [&str; 7] = ["GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE"];

fn documented() -> BTreeSet<(String, String)> {
    let ops = Document::load().operations();
    for (m, p) in &ops {
        assert!(METHODS.contains(&m.as_str()), "unexpected key {m} under {p}");
    }
    ops
}

pub(super) fn cell() -> Arc<BoardCell> {
    Arc::new(BoardCell::new(Board {
        state: VmState::Running,
        vcpus: 1,
        mem_bytes: 256 << 20,
        started: Instant::now(),
        workload: None,
        ops: None,
        ops_per_s: None,
        probe: Vec::new(),
        snap: None,
        replica: None,
        output: None,
        nets: Vec::new(),
    }))
}

/// Send one request to a router whose controller refuses every command;
/// the answer to a documented operation must match the document.
fn send(method: &str, path: &str, body: &str) -> (StatusCode, Option<String>, String) {
    let (tx, rx) = mpsc::sync_channel::<super::board::Envelope>(4);
    let controller = std::thread::spawn(move || {
        while let Ok(env) = rx.recv() {
            let _ = env.reply.send(Err(Refusal::Conflict("refused by the test".into())));
        }
    });
    let app = test_router(cell(), tx, Arc::new(|| {}));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let res = rt.block_on(app.oneshot(req)).unwrap();
    let status = res.status();
    let allow = res
        .headers()
        .get(header::ALLOW)
        .map(|v| v.to_str().unwrap().to_string());
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .map_or(String::new(), |v| v.to_str().unwrap().to_string());
    let is_json = content_type.starts_with("application/json");
    let text = rt.block_on(body_text(res));
    let bare = path.split('?').next().unwrap_or(path);
    let doc = Document::load();
    if doc.operations().contains(&(method.to_string(), bare.to_string()))
        && let Err(e) = doc.check(method, bare, status.as_u16(), &content_type, text.as_bytes())
    {
        panic!("docs/openapi.yaml does not describe the answer: {e}");
    }
    if status.is_client_error() || status.is_server_error() {
        assert!(is_json, "{method} {path}: {status} is not JSON: {text}");
        assert_eq!(text.trim_end().lines().count(), 1, "{method} {path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"].is_string(), "{text}");
    }
    controller.join().unwrap();
    (status, allow, text)
}

#[test]
fn the_routes_are_the_documented_operations() {
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(served, documented(), "ROUTES and docs/openapi.yaml differ");
}

#[test]
fn every_documented_operation_is_served_and_no_other() {
    let ops = documented();
    let paths: BTreeSet<&String> = ops.iter().map(|(_, p)| p).collect();
    for path in paths {
        for m in METHODS {
            let body = if m == "PATCH" { r#"{"interval":"20ms"}"# } else { "" };
            let (status, allow, text) = send(m, path, body);
            if ops.contains(&(m.to_string(), path.clone())) {
                assert!(
                    status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path} is documented but not served: {status} {text}"
                );
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}: {text}");
                let allow = allow.unwrap_or_default();
                for (dm, dp) in &ops {
                    if dp == path {
                        assert!(allow.contains(dm.as_str()), "{m} {path}: Allow: {allow}");
                    }
                }
            }
        }
    }
    for path in ["/", "/vm/", "/vms", "/snapshots/take/1", "/snapshots/42", "/%ff"] {
        let (status, _, text) = send("GET", path, "");
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {text}");
        assert!(text.contains("GET /vm"), "the 404 names the endpoints: {text}");
    }
}

#[test]
fn bad_requests_get_one_line_json_errors() {
    for (m, path, body, want) in [
        ("GET", "/vm?x=1", "", StatusCode::BAD_REQUEST),
        ("PATCH", "/snapshots/config", "", StatusCode::BAD_REQUEST),
        ("PATCH", "/snapshots/config", "{", StatusCode::BAD_REQUEST),
        ("PATCH", "/snapshots/config", "{}", StatusCode::BAD_REQUEST),
        (
            "PATCH",
            "/snapshots/config",
            r#"{"interval":"0"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "PATCH",
            "/snapshots/config",
            r#"{"mode":"fast"}"#,
            StatusCode::BAD_REQUEST,
        ),
        ("PATCH", "/snapshots/config", r#"{"x":"1"}"#, StatusCode::BAD_REQUEST),
        // Snapshots are off in this router: refused by the controller.
        ("PUT", "/snapshots/take", "", StatusCode::CONFLICT),
        ("GET", "/snapshots", "", StatusCode::CONFLICT),
        ("GET", "/snapshots/config", "", StatusCode::CONFLICT),
    ] {
        let (status, _, text) = send(m, path, body);
        assert_eq!(status, want, "{m} {path} {body}: {text}");
    }
    let big = format!(r#"{{"interval":"{}"}}"#, "1".repeat(super::server::MAX_BODY));
    let (status, _, text) = send("PATCH", "/snapshots/config", &big);
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
}
