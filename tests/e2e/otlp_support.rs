//! A real OTLP/HTTP traces receiver for tests and benchmarks: it decodes
//! the protobuf the exporter sends (`ExportTraceServiceRequest`) and
//! answers as a collector does.

#![allow(dead_code)] // each user (test binary, benchmark) uses a subset

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use prost::Message;

/// One span as the receiver got it, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct Got {
    pub resource: BTreeMap<String, String>,
    pub span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl Got {
    pub fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }
    pub fn parent(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }
    pub fn attr(&self, key: &str) -> Option<String> {
        find(&self.span.attributes, key)
    }
    pub fn status(&self) -> Option<SpanStatus> {
        self.span.status.as_ref().map(|s| s.code())
    }
}

pub fn text(v: &Option<AnyValue>) -> Option<String> {
    match v.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

pub fn find(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(&kv.value))
}

/// An OTLP/HTTP traces endpoint on a port of its own.
pub struct Receiver {
    pub url: String,
    got: Arc<Mutex<Vec<Got>>>,
    count: Arc<AtomicU64>,
    /// Bodies that did not decode: the exporter sent something else.
    bad: Arc<Mutex<Vec<String>>>,
    /// Serves until the test ends.
    _rt: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct Sink {
    got: Arc<Mutex<Vec<Got>>>,
    bad: Arc<Mutex<Vec<String>>>,
    /// Spans received, kept or not.
    count: Arc<AtomicU64>,
    /// Keep every span (tests), or only count them (benchmarks).
    keep: bool,
}

async fn traces(State(sink): State<Sink>, body: Bytes) -> axum::response::Response {
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => {
            sink.bad.lock().unwrap().push(e.to_string());
            return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
    };
    let spans: usize = request
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum();
    sink.count.fetch_add(spans as u64, Ordering::Relaxed);
    if !sink.keep {
        return ExportTraceServiceResponse::default()
            .encode_to_vec()
            .into_response();
    }
    let mut got = sink.got.lock().unwrap();
    for rs in request.resource_spans {
        let resource: BTreeMap<String, String> = rs
            .resource
            .map(|r| r.attributes)
            .unwrap_or_default()
            .iter()
            .filter_map(|kv| Some((kv.key.clone(), text(&kv.value)?)))
            .collect();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            got.push(Got {
                resource: resource.clone(),
                span,
            });
        }
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

impl Receiver {
    /// A receiver that keeps every span it gets.
    pub fn start() -> Self {
        Self::new(true)
    }

    /// A receiver that decodes and counts spans, keeping none (a
    /// benchmark's hundreds of thousands).
    pub fn counting() -> Self {
        Self::new(false)
    }

    /// Spans received so far.
    pub fn received(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn new(keep: bool) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sink = Sink {
            got: Arc::default(),
            bad: Arc::default(),
            count: Arc::default(),
            keep,
        };
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let count = sink.count.clone();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(traces))
            // For a receiver in another process (the benchmark's).
            .route(
                "/count",
                axum::routing::get(
                    move || async move { count.load(Ordering::Relaxed).to_string() },
                ),
            )
            .with_state(sink.clone());
        rt.spawn(async move { axum::serve(listener, app).await });
        Self {
            url: format!("http://{addr}"),
            got: sink.got,
            bad: sink.bad,
            count: sink.count,
            _rt: rt,
        }
    }

    /// Every span received so far, after checking each body decoded.
    pub fn spans(&self) -> Vec<Got> {
        assert!(
            self.bad.lock().unwrap().is_empty(),
            "bodies that are not OTLP: {:?}",
            self.bad.lock().unwrap()
        );
        self.got.lock().unwrap().clone()
    }

    pub fn of_trace(&self, trace: &str) -> Vec<Got> {
        let mut spans: Vec<Got> = self
            .spans()
            .into_iter()
            .filter(|g| g.trace_id() == trace)
            .collect();
        spans.sort_by_key(|g| g.span.start_time_unix_nano);
        spans
    }
}
