//! The status page: `GET /status`, one JSON document saying how this
//! fleet member is doing, and `GET /`, a self-contained page that shows it
//! (refreshed every 1.5 s).
//!
//! The document joins what the host already keeps — the registry (versions,
//! status, notes), the Prometheus counters, the last minutes per second
//! ([`crate::activity`]), the lifecycle history ([`crate::journal`]) — with
//! one thing it has to ask the broker: each handler's dead-letter queue
//! depth. That is a passive declare on the host's live connection, cached
//! for [`DEPTH_TTL`] so that pages left open refreshing do not turn into
//! broker traffic, and bounded by [`DEPTH_TIMEOUT`] so a broker that does
//! not answer cannot hold the page.
//!
//! The page is one HTML file compiled into the binary, with its CSS,
//! JavaScript and SVG charts inline and no external URL: hosts often have
//! no internet, and the Content-Security-Policy it is served with keeps it
//! that way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Connection;
use serde::Serialize;
use tokio::sync::watch;

use crate::activity::{self, Window};
use crate::broker::Topology;
use crate::journal::{unix_ms, Happening};
use crate::metrics::{HandlerCounters, Metrics};
use crate::registry::{BrokenFile, Registry, Status};

/// The page, as served at `/`.
pub const PAGE: &str = include_str!("status_page.html");

/// What the page may load: itself and `/status`, nothing from elsewhere.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src data:; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How long a DLQ depth is reused before the broker is asked again.
pub const DEPTH_TTL: Duration = Duration::from_secs(5);

/// How long one depth query may take.
pub const DEPTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Seconds of activity `/status` returns unless asked (`?seconds=N`, up
/// to [`activity::WINDOW_SECS`]).
pub const DEFAULT_SECONDS: u64 = 300;

/// `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct Document {
    /// This host's id (`host_id`).
    pub host_id: String,
    /// `sqlite` or `postgres`.
    pub state_backend: &'static str,
    /// Whether the host's broker connection is up.
    pub broker_connected: bool,
    /// When the host started (RFC 3339 UTC).
    pub started_at: String,
    /// Seconds since then.
    pub uptime_secs: u64,
    /// When this document was made (Unix ms): the page's clock.
    pub now_unix_ms: u64,
    /// Every handler, by name.
    pub handlers: Vec<HandlerStatus>,
    /// Dropped files not activated.
    pub refused_files: Vec<BrokenFile>,
    /// The last lifecycle changes, newest first.
    pub lifecycle: Vec<Happening>,
}

/// One handler in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct HandlerStatus {
    /// Its name.
    pub name: String,
    /// The version its manifest declares.
    pub guest_version: String,
    /// sha256 of the file serving it.
    pub version: String,
    /// Its first 12 hex digits, as logs and notes write it.
    pub short_version: String,
    /// What the current version replaced (short sha256), if anything.
    pub previous_version: Option<String>,
    /// Consuming, paused, removed, ...
    pub status: Status,
    /// Why, when the status alone does not say.
    pub status_reason: Option<String>,
    /// The last rollback or pause.
    pub note: Option<String>,
    /// Its work queue.
    pub queue: String,
    /// Its dead-letter queue.
    pub dead_letter_queue: String,
    /// Messages waiting in the dead-letter queue (at most [`DEPTH_TTL`]
    /// old); `None` when the broker could not say.
    pub dlq_depth: Option<u32>,
    /// Why not, when it could not.
    pub dlq_error: Option<String>,
    /// Counters since the host started.
    pub counters: HandlerCounters,
    /// The last minutes, second by second.
    pub recent: Window,
}

/// What the status document needs beyond the registry and the metrics:
/// when the host started, its broker connection and the DLQ depth cache.
pub struct StatusSource {
    started: Instant,
    started_unix_ms: u64,
    /// The live broker connection (`None` while disconnected): the one the
    /// session runs on, so counting a DLQ costs a channel, not a
    /// connection.
    broker: watch::Receiver<Option<Arc<Connection>>>,
    /// Depth (or why none) and when it was asked, per handler. A tokio
    /// mutex held across the queries: requests arriving meanwhile wait
    /// for that answer instead of asking again.
    depths: tokio::sync::Mutex<HashMap<String, (Instant, Depth)>>,
}

/// A DLQ's depth, or why the broker could not say.
type Depth = Result<u32, String>;

/// Where a handler's depth is asked: its name and queues.
type DlqOf = (String, Topology);

impl StatusSource {
    /// Starting now, with the broker connection as the session publishes it.
    pub fn new(broker: watch::Receiver<Option<Arc<Connection>>>) -> Self {
        Self {
            started: Instant::now(),
            started_unix_ms: unix_ms(),
            broker,
            depths: tokio::sync::Mutex::default(),
        }
    }

    /// Whether the broker connection is up.
    pub fn broker_connected(&self) -> bool {
        self.broker
            .borrow()
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// The document, with `seconds` of activity per handler.
    pub async fn document(
        &self,
        host_id: &str,
        state_backend: &'static str,
        registry: &Registry,
        metrics: &Metrics,
        seconds: u64,
    ) -> Document {
        let entries = registry.entries();
        let dlqs: Vec<DlqOf> = entries
            .iter()
            .map(|e| (e.name().to_owned(), e.version().topology.clone()))
            .collect();
        let mut depths = self.depths(&dlqs).await;
        let now = activity::unix_now();
        let handlers = entries
            .iter()
            .map(|e| {
                let v = e.version();
                let (dlq_depth, dlq_error) = match depths.remove(e.name()) {
                    Some(Ok(n)) => (Some(n), None),
                    Some(Err(why)) => (None, Some(why)),
                    None => (None, Some("not asked".into())),
                };
                HandlerStatus {
                    name: v.name.to_string(),
                    guest_version: v.declared.version.clone(),
                    version: v.sha256.clone(),
                    short_version: v.short_version().to_owned(),
                    previous_version: e.previous().map(|p| p.short_version().to_owned()),
                    status: e.status(),
                    status_reason: e.status_reason(),
                    note: e.note(),
                    queue: v.topology.queue.clone(),
                    dead_letter_queue: v.topology.dlq.clone(),
                    dlq_depth,
                    dlq_error,
                    counters: metrics.counters(&v.name),
                    recent: metrics.activity.window(&v.name, now, seconds),
                }
            })
            .collect();
        Document {
            host_id: host_id.to_owned(),
            state_backend,
            broker_connected: self.broker_connected(),
            started_at: crate::journal::rfc3339(self.started_unix_ms),
            uptime_secs: self.started.elapsed().as_secs(),
            now_unix_ms: unix_ms(),
            handlers,
            refused_files: registry.broken(),
            lifecycle: registry.journal().recent(),
        }
    }

    /// The DLQ depth of each of `dlqs`, asked of the broker where the
    /// cached answer is older than [`DEPTH_TTL`] (all at once, each within
    /// [`DEPTH_TIMEOUT`]).
    async fn depths(&self, dlqs: &[DlqOf]) -> HashMap<String, Depth> {
        let mut cache = self.depths.lock().await;
        // Only the registry's handlers: the cache never outgrows it.
        cache.retain(|name, _| dlqs.iter().any(|(n, _)| n == name));
        let stale: Vec<&DlqOf> = dlqs
            .iter()
            .filter(|(name, _)| {
                cache
                    .get(name)
                    .is_none_or(|(at, _)| at.elapsed() >= DEPTH_TTL)
            })
            .collect();
        if !stale.is_empty() {
            let conn = self.broker.borrow().clone();
            let asked = futures_util::future::join_all(
                stale
                    .iter()
                    .map(|(name, topology)| dlq_depth(conn.as_deref(), name, topology)),
            )
            .await;
            for ((name, _), depth) in stale.into_iter().zip(asked) {
                cache.insert(name.clone(), (Instant::now(), depth));
            }
        }
        cache
            .iter()
            .map(|(name, (_, depth))| (name.clone(), depth.clone()))
            .collect()
    }
}

/// One DLQ's depth, or why the broker could not say.
async fn dlq_depth(conn: Option<&Connection>, handler: &str, topology: &Topology) -> Depth {
    let Some(conn) = conn.filter(|c| c.status().connected()) else {
        return Err("not connected to the broker".into());
    };
    match tokio::time::timeout(DEPTH_TIMEOUT, crate::dlq::depth(conn, handler, topology)).await {
        Ok(Ok(depth)) => Ok(depth),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!(
            "the broker did not answer within {} s",
            DEPTH_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        // No URL of another origin anywhere in it: not a script, style,
        // font or image (the CSP would block it; this says so at build).
        // The SVG namespace is a name, never fetched.
        let page = PAGE.replace("'http://www.w3.org/2000/svg'", "");
        for needle in ["http:", "https:", "//cdn", "src=", "url(", "@import"] {
            assert!(!page.contains(needle), "the page mentions {needle:?}");
        }
        // The favicon request a browser makes otherwise is a 404 in the
        // console.
        assert!(PAGE.contains(r#"<link rel="icon" href="data:,">"#));
        // Its data comes from `/status`, relative to the page.
        assert!(PAGE.contains("api('status?seconds='"));
    }

    #[tokio::test]
    async fn without_a_broker_the_depth_is_null_with_the_reason_and_cached() {
        let (_tx, rx) = watch::channel(None);
        let source = StatusSource::new(rx);
        let registry = Registry::default();
        let metrics = Metrics::new();
        let doc = source
            .document("h1", "sqlite", &registry, &metrics, 60)
            .await;
        assert!(!doc.broker_connected);
        assert!(doc.handlers.is_empty());
        let topology = Topology {
            queue: "q".into(),
            dlx: "q.dlx".into(),
            dlq: "q.dlq".into(),
            retry_queues: vec![],
        };
        let depths = source.depths(&[("a".into(), topology.clone())]).await;
        assert_eq!(
            depths.get("a"),
            Some(&Err("not connected to the broker".into()))
        );
        // Cached, and only for handlers still listed.
        let cached_at = source.depths.lock().await["a"].0;
        let again = source.depths(&[("a".into(), topology)]).await;
        assert_eq!(again.len(), 1);
        assert_eq!(source.depths.lock().await["a"].0, cached_at);
        assert!(source.depths(&[]).await.is_empty());
    }
}
