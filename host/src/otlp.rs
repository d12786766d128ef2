//! OpenTelemetry export of the per-event spans (OTLP over HTTP/protobuf).
//!
//! Off unless an endpoint is configured (`otlp_endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
//! The span of each attempt at an event is the one [`crate::trace`]
//! already made: its ids are the ones the host stamps on everything the
//! attempt causes, so the exported span is the parent of the next hop's.
//! That is why spans are handed to the SDK's batch processor as finished
//! [`SpanData`] rather than built through its `Tracer`, which would pick
//! ids of its own.
//!
//! Exporting never blocks an event: the batch processor has a bounded
//! queue and its own thread (with the blocking HTTP client); when the
//! collector is slow or away, spans past the queue are dropped (the SDK
//! warns once and reports the count at shutdown), never buffered without
//! bound.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanExporter as _, SpanLinks,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::guest::GuestLog;
use crate::trace::Span;

/// The OTLP/HTTP path of traces, appended to a base endpoint.
const TRACES_PATH: &str = "/v1/traces";

/// Spans waiting for export at most, unless `OTEL_BSP_MAX_QUEUE_SIZE` says
/// otherwise (a few seconds of a busy host); past it new spans are dropped
/// rather than held.
const MAX_QUEUED_SPANS: usize = 8192;

/// How long a graceful shutdown waits for the last spans to go out.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// The URL spans are posted to, from the configured endpoint: a base URL
/// (no path, as `OTEL_EXPORTER_OTLP_ENDPOINT` is) gets `/v1/traces`; a URL
/// with a path (as `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is) is used as it
/// is. `None` when export is off.
pub fn traces_url(endpoint: Option<&str>) -> Option<String> {
    let endpoint = endpoint.map(str::trim).filter(|e| !e.is_empty())?;
    let after_scheme = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let has_path = after_scheme
        .find('/')
        .is_some_and(|slash| !after_scheme[slash..].trim_end_matches('/').is_empty());
    Some(if has_path {
        endpoint.to_owned()
    } else {
        format!("{}{TRACES_PATH}", endpoint.trim_end_matches('/'))
    })
}

/// `url` with any user and password in it replaced by `***`, for logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// What every span of one handler version carries: built once per batch
/// (a batch runs on one version), its strings shared by the batch's spans
/// rather than copied into each.
pub struct VersionSpans {
    name: String,
    attributes: Vec<KeyValue>,
}

impl VersionSpans {
    /// The span name and attributes of events of `handler` at `version`
    /// (its sha256) declaring `guest_version`, consumed from `queue`.
    pub fn new(handler: &str, version: &str, guest_version: &str, queue: &str) -> Self {
        let shared = |s: &str| opentelemetry::Value::from(std::sync::Arc::<str>::from(s));
        Self {
            name: format!("process {handler}"),
            attributes: vec![
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("event_host.handler", shared(handler)),
                KeyValue::new("event_host.version", shared(version)),
                KeyValue::new("event_host.guest_version", shared(guest_version)),
                KeyValue::new("event_host.queue", shared(queue)),
            ],
        }
    }
}

/// One finished attempt at an event, as the dispatcher saw it.
pub struct EventSpan<'a> {
    /// The attempt's span (ids and flags).
    pub span: Span,
    /// `tracestate` as it came, passed on.
    pub tracestate: Option<&'a str>,
    /// Its handler version's name and attributes.
    pub version: &'a VersionSpans,
    /// Exchange the event was published to.
    pub exchange: &'a str,
    /// Routing key the event was published with.
    pub routing_key: &'a str,
    /// The event's message id, if it had one.
    pub message_id: Option<&'a str>,
    /// Delivery attempt (1 for the first).
    pub attempt: u32,
    /// `ack`, `duplicate`, `retry`, `dead_letter` or `requeue`.
    pub outcome: &'static str,
    /// Why, for anything but a plain ack.
    pub reason: Option<String>,
    /// When the host started on it.
    pub start: SystemTime,
    /// When it was settled at the broker (acked, or sent on its way).
    pub end: SystemTime,
    /// Time in the guest.
    pub guest_time: Duration,
    /// What the guest logged through `wasi:logging`, as span events.
    pub logs: Vec<GuestLog>,
}

/// Exports event spans to an OTLP collector.
#[derive(Debug)]
pub struct Exporter {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
    url: String,
}

impl Exporter {
    /// An exporter posting to `url` (see [`traces_url`]), its spans naming
    /// this host as the service instance. The service name is
    /// `OTEL_SERVICE_NAME`, else `event-host`; `OTEL_RESOURCE_ATTRIBUTES`
    /// and `OTEL_EXPORTER_OTLP_HEADERS` are honoured as usual.
    pub fn start(url: &str, host_id: &str) -> Result<Self> {
        if let Ok(protocol) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL") {
            if !protocol.is_empty() && protocol != "http/protobuf" {
                anyhow::bail!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL={protocol:?}: event-host exports OTLP over \
                     http/protobuf only (the collector's port 4318)"
                );
            }
        }
        let mut exporter = SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()
            .with_context(|| format!("setting up OTLP export to {}", redact(url)))?;
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "event-host".into());
        exporter.set_resource(
            &Resource::builder()
                .with_service_name(service)
                .with_attributes([
                    KeyValue::new("service.instance.id", host_id.to_owned()),
                    KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                ])
                .build(),
        );
        // The builder reads the OTEL_BSP_* variables; the queue is larger
        // than the SDK's default unless one is given.
        let mut batch = BatchConfigBuilder::default();
        if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
            batch = batch.with_max_queue_size(MAX_QUEUED_SPANS);
        }
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch.build())
            .build();
        Ok(Self {
            processor,
            scope: InstrumentationScope::builder("event-host")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            url: url.to_owned(),
        })
    }

    /// Where spans go.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Queue one event's span for export, unless its trace is not sampled
    /// (as the publisher's `traceparent` said, or, for a new trace,
    /// `trace_sample_ratio`).
    pub fn export(&self, e: EventSpan<'_>) {
        if e.span.flags & 0x01 == 0 {
            return;
        }
        self.processor.on_end(self.span_data(e));
    }

    fn span_data(&self, e: EventSpan<'_>) -> SpanData {
        let trace_state = e
            .tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let mut attributes = Vec::with_capacity(e.version.attributes.len() + 8);
        attributes.extend_from_slice(&e.version.attributes);
        attributes.extend([
            KeyValue::new("messaging.destination.name", e.exchange.to_owned()),
            KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                e.routing_key.to_owned(),
            ),
            KeyValue::new("event_host.attempt", i64::from(e.attempt)),
            KeyValue::new("event_host.outcome", e.outcome),
            KeyValue::new(
                "event_host.guest_time_us",
                i64::try_from(e.guest_time.as_micros()).unwrap_or(i64::MAX),
            ),
        ]);
        if let Some(id) = e.message_id {
            attributes.push(KeyValue::new("messaging.message.id", id.to_owned()));
        }
        if let Some(reason) = &e.reason {
            attributes.push(KeyValue::new("event_host.reason", reason.clone()));
        }
        let status = match e.outcome {
            "ack" | "duplicate" => Status::Ok,
            _ => Status::Error {
                description: Cow::Owned(e.reason.unwrap_or_else(|| e.outcome.to_owned())),
            },
        };
        let events = e
            .logs
            .into_iter()
            .map(|log| {
                opentelemetry::trace::Event::new(
                    log.message,
                    log.at,
                    vec![
                        KeyValue::new("level", log.level),
                        KeyValue::new("log.context", log.context),
                    ],
                    0,
                )
            })
            .collect();
        // Non-exhaustive: filled in place.
        let mut span_events = SpanEvents::default();
        span_events.events = events;
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(e.span.trace_id),
                SpanId::from_bytes(e.span.span_id),
                TraceFlags::new(e.span.flags),
                false,
                trace_state,
            ),
            parent_span_id: e.span.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: e.span.parent.is_some(),
            span_kind: SpanKind::Consumer,
            name: Cow::Owned(e.version.name.clone()),
            start_time: e.start,
            end_time: e.end.max(e.start),
            attributes,
            dropped_attributes_count: 0,
            events: span_events,
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }

    /// Send what is queued and stop (a graceful shutdown), waiting at most
    /// a few seconds for the collector.
    pub fn shutdown(&self) {
        if let Err(e) = self.processor.shutdown_with_timeout(SHUTDOWN_FLUSH) {
            tracing::warn!(url = %self.url, "OTLP export: spans may be lost at shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_endpoint_gets_the_traces_path_and_a_full_one_is_kept() {
        assert_eq!(
            traces_url(Some("http://jaeger:4318")).as_deref(),
            Some("http://jaeger:4318/v1/traces")
        );
        assert_eq!(
            traces_url(Some("http://jaeger:4318/")).as_deref(),
            Some("http://jaeger:4318/v1/traces")
        );
        assert_eq!(
            traces_url(Some("https://otel.example/custom/v1/traces")).as_deref(),
            Some("https://otel.example/custom/v1/traces")
        );
        assert_eq!(traces_url(Some("  ")), None);
        assert_eq!(traces_url(None), None);
    }

    #[test]
    fn credentials_in_an_endpoint_are_not_logged() {
        assert_eq!(
            redact("https://user:secret@otel.example:4318/v1/traces"),
            "https://***@otel.example:4318/v1/traces"
        );
        assert_eq!(redact("http://jaeger:4318"), "http://jaeger:4318");
    }
}
