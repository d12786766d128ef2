//! The admin HTTP endpoint: health, readiness, Prometheus metrics, the
//! handler list, state inspection, dead letters (list, re-drive) and the
//! status page (`/` and its data, `/status`; see [`crate::status`]).
//!
//! With an `admin_token` configured, everything but the probes, the
//! metrics and the page itself (`/healthz`, `/readyz`, `/metrics`: what
//! orchestrators and scrapers call without credentials, and which show no
//! handler state; `/`, which holds no data and asks for the token when
//! `/status` answers 401) needs `Authorization: Bearer <token>`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::guest::parse_int;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::state::StateStore;
use crate::status::{self, StatusSource};

/// What the endpoint reads.
pub struct AdminState {
    /// Live handlers.
    pub registry: Arc<Registry>,
    /// Handler state.
    pub state: StateStore,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The bearer token the protected routes require, if any.
    pub token: Option<String>,
    /// This host's id in a fleet (`Config::host_id`), shown in `/handlers`.
    pub host_id: String,
    /// The broker, for the dead-letter routes (which use a connection of
    /// their own). Never shown.
    pub amqp_url: String,
    /// AMQP heartbeat for that connection.
    pub heartbeat_secs: u16,
    /// Start time, broker connection and DLQ depth cache, for `/status`.
    pub status: StatusSource,
}

/// The routes.
pub fn router(state: Arc<AdminState>) -> Router {
    let protected = Router::new()
        .route("/handlers", get(handlers))
        .route("/status", get(status_document))
        .route("/state/{handler}/{*key}", get(state_value))
        .route("/dlq/{handler}", get(dlq_list))
        .route("/dlq/{handler}/redrive", axum::routing::post(dlq_redrive))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .merge(protected)
        .with_state(state)
}

/// Let the request through when no token is configured or it carries the
/// right one; otherwise 401. The token is neither logged nor echoed.
async fn require_token(
    State(s): State<Arc<AdminState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = s.token.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if token_matches(given, token) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "unauthorized: this admin endpoint needs `Authorization: Bearer <admin_token>`\n",
        )
            .into_response(),
    }
}

/// Compare in constant time: both sides are hashed first (so neither
/// length nor a common prefix shows in the timing), then every byte of the
/// digests is compared.
fn token_matches(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Bind `addr` and serve until `stop` resolves. Returns the bound address
/// through `bound` (useful with port 0).
pub async fn serve(
    addr: &str,
    state: Arc<AdminState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin endpoint to {addr}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state))
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!("admin endpoint failed: {e}");
        }
    });
    Ok((bound, task))
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    match s.registry.not_ready(std::time::Instant::now()) {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// Every handler, then every refused file. Each entry names this host
/// (`host_id`) and where its state lives (`state_backend`), so the lists
/// of a fleet's hosts can be merged and still read: the list stays a plain
/// array, as clients and the README's `jq '.[]'` read it.
async fn handlers(State(s): State<Arc<AdminState>>) -> Json<Value> {
    let (host_id, backend) = (s.host_id.as_str(), s.state.backend_name());
    let mut list: Vec<Value> = s
        .registry
        .entries()
        .iter()
        .map(|e| {
            let v = e.version();
            json!({
                "name": &*v.name,
                "version": v.sha256,
                "guest_version": v.declared.version,
                "file": v.path,
                "subscriptions": v.settings.manifest.subscriptions,
                "queue": v.topology.queue,
                "dead_letter_queue": v.topology.dlq,
                "max_attempts": v.settings.max_attempts,
                "events_per_instance": v.settings.budget.events_per_instance,
                "status": e.status(),
                "status_reason": e.status_reason(),
                "host_id": host_id,
                "state_backend": backend,
                "previous_version": e.previous().map(|p| p.sha256.clone()),
                "note": e.note(),
                "counters": s.metrics.counters(&v.name),
            })
        })
        .collect();
    // Refused files are listed too, so a bad drop is visible where the
    // operator looks for the handler.
    list.extend(s.registry.broken().into_iter().map(|b| {
        json!({
            "name": null,
            "file": b.file,
            "version": b.sha256,
            "status": "refused",
            "error": b.error,
            "host_id": host_id,
            "state_backend": backend,
        })
    }));
    Json(Value::Array(list))
}

/// `?seconds=N` of `GET /status`.
#[derive(serde::Deserialize)]
struct StatusQuery {
    seconds: Option<u64>,
}

/// `GET /status`: the status page's data (see [`crate::status`]).
async fn status_document(
    State(s): State<Arc<AdminState>>,
    axum::extract::Query(q): axum::extract::Query<StatusQuery>,
) -> Response {
    let doc = s
        .status
        .document(
            &s.host_id,
            s.state.backend_name(),
            &s.registry,
            &s.metrics,
            q.seconds.unwrap_or(status::DEFAULT_SECONDS),
        )
        .await;
    // A page polls this: never a cached answer.
    ([(header::CACHE_CONTROL, "no-store")], Json(doc)).into_response()
}

/// `GET /`: the status page. It holds no data, so it is served without the
/// token; its script asks for one when `/status` says 401.
async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, status::PAGE_CSP),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        status::PAGE,
    )
        .into_response()
}

async fn state_value(
    State(s): State<Arc<AdminState>>,
    Path((handler, key)): Path<(String, String)>,
) -> Response {
    if s.registry.get(&handler).is_none() {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no handler {handler:?}")})),
        )
            .into_response();
    }
    let store = s.state.clone();
    let (ns, k) = (handler.clone(), key.clone());
    let read = tokio::task::spawn_blocking(move || store.get_committed(&ns, &k)).await;
    match read {
        Ok(Ok(Some(bytes))) => {
            Json(json!({"key": key, "value": display_value(&bytes)})).into_response()
        }
        Ok(Ok(None)) => (
            StatusCode::NOT_FOUND,
            Json(json!({"key": key, "error": "no such key"})),
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": format!("{e:#}")})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

/// `?limit=N` of `GET /dlq/{handler}`.
#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

/// What `POST /dlq/{handler}/redrive` sends back: `?all=true`,
/// `?message_id=ID` or `?reason_prefix=TEXT` (one of them), and `rate`.
#[derive(serde::Deserialize)]
struct RedriveQuery {
    all: Option<bool>,
    message_id: Option<String>,
    reason_prefix: Option<String>,
    rate: Option<f64>,
}

fn error(status: StatusCode, e: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": e.to_string()}))).into_response()
}

/// The handler's topology (`None`: no such handler here).
fn topology_of(s: &AdminState, handler: &str) -> Option<crate::broker::Topology> {
    s.registry
        .get(handler)
        .map(|entry| entry.version().topology.clone())
}

fn no_handler(handler: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no handler {handler:?}"))
}

/// `GET /dlq/{handler}?limit=N`: the DLQ's depth and its oldest messages
/// (left in place), as `event-host dlq list --json` prints them.
async fn dlq_list(
    State(s): State<Arc<AdminState>>,
    Path(handler): Path<String>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> Response {
    let Some(topology) = topology_of(&s, &handler) else {
        return no_handler(&handler);
    };
    let listed = async {
        let conn = crate::broker::connect(&s.amqp_url, s.heartbeat_secs).await?;
        let listing =
            crate::dlq::list(&conn, &handler, &topology, q.limit.unwrap_or(20).min(1000)).await;
        let _ = conn.close(200, crate::broker::short("listed")).await;
        listing
    }
    .await;
    match listed {
        Ok(listing) => Json(listing).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

/// `POST /dlq/{handler}/redrive?all=true|message_id=ID|reason_prefix=TEXT`:
/// send dead letters back to the work queue, as `event-host dlq redrive`
/// does; answers when done, with the counts.
async fn dlq_redrive(
    State(s): State<Arc<AdminState>>,
    Path(handler): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RedriveQuery>,
) -> Response {
    use crate::dlq::Filter;
    let Some(topology) = topology_of(&s, &handler) else {
        return no_handler(&handler);
    };
    let filter = match (q.all, q.message_id, q.reason_prefix) {
        (Some(true), None, None) => Filter::All,
        (None | Some(false), Some(id), None) => Filter::MessageId(id),
        (None | Some(false), None, Some(prefix)) => Filter::ReasonPrefix(prefix),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "say which: exactly one of all=true, message_id=ID, reason_prefix=TEXT",
            )
        }
    };
    let store = s.state.clone();
    let secret = match tokio::task::spawn_blocking(move || store.host_secret()).await {
        Ok(Ok(secret)) => secret,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let signer = crate::broker::RetrySigner::new(secret);
    let done = async {
        let conn = crate::broker::connect(&s.amqp_url, s.heartbeat_secs).await?;
        let done =
            crate::dlq::redrive(&conn, &handler, &topology, &signer, &filter, q.rate, |_| {}).await;
        let _ = conn.close(200, crate::broker::short("re-driven")).await;
        done
    }
    .await;
    match done {
        Ok(done) => Json(done).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

/// Integers (the `increment` encoding) as JSON numbers, other UTF-8 as
/// strings, anything else as an array of bytes.
fn display_value(bytes: &[u8]) -> Value {
    if let Some(n) = parse_int(bytes) {
        return json!(n);
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => json!(s),
        Err(_) => json!(bytes),
    }
}

/// Ask a running host's admin endpoint at `addr` for `path` (`/readyz`,
/// `/healthz`): the status code and body. For `event-host health`, the
/// container healthcheck, where a slim image has no curl. A wildcard
/// listen address (`0.0.0.0`, `[::]`) is asked on loopback.
pub fn probe(addr: &str, path: &str, timeout: std::time::Duration) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;

    let mut target: SocketAddr = addr
        .to_socket_addrs()
        .with_context(|| format!("admin address {addr:?}"))?
        .next()
        .with_context(|| format!("admin address {addr:?} resolves to nothing"))?;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connecting to the admin endpoint at {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("asking {target}{path}"))?;
    let mut response = Vec::new();
    // The probes' answers are a few lines; a host that says more is cut.
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer of {target}{path}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("{target}{path} did not answer HTTP"))?;
    Ok((status, body.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_exactly() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3cret ", "s3cret"));
        assert!(!token_matches("", "s3cret"));
    }
}
