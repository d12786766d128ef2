#![allow(dead_code)] // the test binary and the broker benchmark each use a subset

//! Support for tests against a real RabbitMQ: an in-process host with an
//! injected shutdown, a plain AMQP client, unique names and clean-up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

use crate::support::guest;

/// The broker under test.
pub fn amqp_url() -> String {
    std::env::var("EVENT_HOST_AMQP_URL")
        .unwrap_or_else(|_| event_host::config::DEFAULT_AMQP_URL.to_owned())
}

/// Ask the broker about `queue` without declaring it (a passive declare:
/// its message and consumer counts; an error when it does not exist).
pub async fn passive_declare(ch: &lapin::Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// A name no other test (or concurrent run) uses.
pub fn unique(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "evh-t{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The whole HTTP answer (status line and headers too) of `GET path`, with
/// one extra request header line if given; empty if unreachable.
pub fn http_get_raw(addr: &str, path: &str, header: Option<&str>) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let header = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n{header}\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// GET `path` from an admin endpoint: (status, body); status 0 if
/// unreachable.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_get_with(addr, path, None)
}

/// [`http_get`] with one extra request header line (e.g. `Authorization:
/// Bearer ...`).
pub fn http_get_with(addr: &str, path: &str, header: Option<&str>) -> (u16, String) {
    let text = http_get_raw(addr, path, header);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Consume `queue` without acks on a connection of its own, in a thread,
/// handing each message (with when it arrived) to `on` until `on` returns
/// false, `stop` is set, or `limit` has passed.
pub fn consume_in_thread(
    queue: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    limit: Duration,
    mut on: impl FnMut(&lapin::message::Delivery, Instant) -> bool + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use futures_util::StreamExt;
            let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            let mut consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "test-consumer".into(),
                    lapin::options::BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let deadline = Instant::now() + limit;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let next = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
                let Ok(Some(Ok(d))) = next else { continue };
                if !on(&d, Instant::now()) {
                    break;
                }
            }
            let _ = conn.close(200, "done".into()).await;
        })
    })
}

/// A TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `event-host run` in-process, stopped when dropped.
pub struct TestHost {
    pub rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub admin: String,
    /// Handlers and state live here for the host's lifetime.
    _dir: tempfile::TempDir,
}

impl TestHost {
    /// Start a host with these guests and config (TOML without the
    /// top-level addresses, which are filled in here).
    pub fn start(guests: &[&str], config: &str) -> Self {
        Self::start_with_url(guests, config, &amqp_url())
    }

    /// [`TestHost::start`] against the broker at `url` (a private node, a
    /// proxy in front of the shared one).
    pub fn start_with_url(guests: &[&str], config: &str, url: &str) -> Self {
        Self::start_prepared(guests, config, url, |_| {})
    }

    /// [`TestHost::start_with_url`], with `prepare` given the state folder
    /// (`state_path`) before the host opens it: to leave what a previous
    /// run would have left there.
    pub fn start_prepared(
        guests: &[&str],
        config: &str,
        url: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Self {
        Self::start_on(guests, config, url, prepare, true)
    }

    /// [`TestHost::start`] on embedded state whatever backend the run
    /// uses: for what only embedded state does (refusing a shared queue).
    pub fn start_embedded(guests: &[&str], config: &str) -> Self {
        Self::start_on(guests, config, &amqp_url(), |_| {}, false)
    }

    fn start_on(
        guests: &[&str],
        config: &str,
        url: &str,
        prepare: impl FnOnce(&std::path::Path),
        run_backend: bool,
    ) -> Self {
        // Host logs show up with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("EVENT_HOST_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let handlers = dir.path().join("handlers");
        std::fs::create_dir_all(&handlers).unwrap();
        for g in guests {
            std::fs::copy(guest(g), handlers.join(format!("{g}.wasm"))).unwrap();
        }
        prepare(&dir.path().join("state"));
        let admin = format!("127.0.0.1:{}", free_port());
        let text = format!(
            "handlers_dir = {:?}\nstate_path = {:?}\namqp_url = {:?}\nadmin_addr = {:?}\ndurability = \"normal\"\n{}{config}",
            handlers.to_str().unwrap(),
            dir.path().join("state").to_str().unwrap(),
            url,
            admin,
            if run_backend {
                crate::backend::config_lines(&dir.path().join("state"))
            } else {
                String::new()
            },
        );
        let config = event_host::config::Config::parse(&text).expect("test config");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = rt.spawn(event_host::server::run(config, async {
            let _ = rx.await;
        }));
        let host = Self {
            rt,
            stop: Some(tx),
            task: Some(task),
            admin,
            _dir: dir,
        };
        host.wait_for("/readyz", |status, _| status == 200, "host ready");
        host
    }

    /// GET a path of the admin endpoint: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin, path)
    }

    /// Poll an admin path until `ok` holds (30 s at most).
    pub fn wait_for(&self, path: &str, ok: impl Fn(u16, &str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get(path);
            if ok(status, &body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The folder the host watches.
    pub fn handlers_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("handlers")
    }

    /// `/handlers`, parsed (refused files included).
    pub fn handlers(&self) -> Vec<Value> {
        let (_, body) = self.get("/handlers");
        serde_json::from_str::<Vec<Value>>(&body).unwrap_or_default()
    }

    /// One handler's entry from `/handlers` (`Null` when absent).
    pub fn handler(&self, name: &str) -> Value {
        self.handlers()
            .into_iter()
            .find(|h| h["name"] == name)
            .unwrap_or(Value::Null)
    }

    /// Poll `/handlers` until `ok` holds for `name`'s entry (30 s at most).
    pub fn wait_handler(&self, name: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let h = self.handler(name);
            if ok(&h) {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {h}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A handler's counters from `/handlers`.
    pub fn counters(&self, handler: &str) -> Value {
        self.handler(handler)["counters"].clone()
    }

    /// One counter of `handler` (0 when absent).
    pub fn counter(&self, handler: &str, counter: &str) -> u64 {
        self.counters(handler)[counter].as_u64().unwrap_or(0)
    }

    /// Wait until a counter of `handler` reaches `n`.
    pub fn wait_counter(&self, handler: &str, counter: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = self.counters(handler);
            if c[counter].as_u64().unwrap_or(0) >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {handler}.{counter} >= {n}: {c}"
            );
            // Short: benchmarks time drains by this.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop gracefully and return what `run` returned.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    /// Stop gracefully but keep the host's folder (its state can then be
    /// read) until the `TestHost` is dropped.
    pub fn stop_in_place(&mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    /// True while `run` has not returned (the host has not exited).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// The host's state folder (`state_path`).
    pub fn state_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("state")
    }

    /// One unlabelled sample of `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0.0)
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => self.rt.block_on(task).map_err(anyhow::Error::from)?,
            None => Ok(()),
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// A plain AMQP client, as any other service would use.
pub struct Client {
    pub rt: tokio::runtime::Runtime,
    pub conn: Connection,
    pub ch: Channel,
    queues: Vec<String>,
    exchanges: Vec<String>,
    url: String,
}

impl Client {
    pub fn connect() -> Self {
        Self::connect_to(&amqp_url())
    }

    /// A client of the broker at `url` (a private node).
    pub fn connect_to(url: &str) -> Self {
        // A worker thread of its own, so the connection answers heartbeats
        // between `block_on` calls: a test may leave its client idle for
        // longer than the broker's heartbeat timeout.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (conn, ch) = rt.block_on(async {
            let conn = Connection::connect(url, ConnectionProperties::default())
                .await
                .expect("broker reachable");
            let ch = conn.create_channel().await.unwrap();
            (conn, ch)
        });
        Self {
            rt,
            conn,
            ch,
            queues: Vec::new(),
            exchanges: Vec::new(),
            url: url.to_owned(),
        }
    }

    /// Remember a handler's whole topology to delete when the client is
    /// dropped: its work queue, dead-letter queue and exchange, and the
    /// retry queues of the default four retries from `retry_base_ms`
    /// (doubling, as the host names them), plus `exchanges`.
    pub fn cleanup_handler(&mut self, queue: &str, retry_base_ms: u64, exchanges: &[&str]) {
        let mut queues = vec![queue.to_owned(), format!("{queue}.dlq")];
        queues.extend((0..4).map(|n| format!("{queue}.retry.{}ms", retry_base_ms << n)));
        let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
        let dlx = format!("{queue}.dlx");
        let mut all = vec![dlx.as_str()];
        all.extend_from_slice(exchanges);
        self.cleanup(&queues, &all);
    }

    /// Remember names to delete when the client is dropped.
    pub fn cleanup(&mut self, queues: &[&str], exchanges: &[&str]) {
        self.queues.extend(queues.iter().map(|s| s.to_string()));
        self.exchanges
            .extend(exchanges.iter().map(|s| s.to_string()));
    }

    /// Publish with exactly these properties (default: none at all).
    pub fn publish(&self, exchange: &str, key: &str, payload: &[u8], props: BasicProperties) {
        self.rt.block_on(async {
            self.ch
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    payload,
                    props,
                )
                .await
                .unwrap();
        });
    }

    /// A server-named exclusive queue bound to `exchange` with `key`.
    pub fn bind_probe(&self, exchange: &str, key: &str) -> String {
        self.rt.block_on(async {
            let q = self
                .ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let name = q.name().as_str().to_owned();
            self.ch
                .queue_bind(
                    name.as_str().into(),
                    exchange.into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            name
        })
    }

    /// Messages ready in `queue` (a passive declare).
    pub fn depth(&self, queue: &str) -> u32 {
        self.rt.block_on(async {
            let ch = self.conn.create_channel().await.unwrap();
            let q = passive_declare(&ch, queue).await.unwrap();
            let _ = ch.close(200, "probe".into()).await;
            q.message_count()
        })
    }

    /// Take up to `n` messages from `queue`, waiting at most `wait`.
    pub fn take(
        &self,
        queue: &str,
        n: usize,
        wait: Duration,
    ) -> Vec<lapin::message::BasicGetMessage> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            let m = self
                .rt
                .block_on(
                    self.ch
                        .basic_get(queue.into(), BasicGetOptions { no_ack: true }),
                )
                .unwrap();
            match m {
                Some(m) => got.push(m),
                None => std::thread::sleep(Duration::from_millis(25)),
            }
        }
        got
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.rt.block_on(async {
            // The test may have broken this connection (or the broker);
            // the cleanup still runs, on a fresh one.
            let ch = match self.conn.create_channel().await {
                Ok(ch) => ch,
                Err(_) => {
                    let conn = Connection::connect(&self.url, ConnectionProperties::default())
                        .await
                        .expect("broker reachable for cleanup");
                    self.conn = conn;
                    self.conn.create_channel().await.expect("cleanup channel")
                }
            };
            for q in &self.queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for e in &self.exchanges {
                let _ = ch
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = self.conn.close(200, "test done".into()).await;
        });
    }
}

/// A text header of a message.
pub fn header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let v = m
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
        .clone();
    Some(match event_host::broker::header_value(&v) {
        event_host::dispatch::HeaderValue::Text(s) => s,
        event_host::dispatch::HeaderValue::Integer(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

/// Names for one inventory deployment.
pub struct Inventory {
    pub orders: String,
    pub events: String,
    pub queue: String,
}

impl Inventory {
    pub fn new() -> Self {
        Self {
            orders: unique("orders"),
            events: unique("inventory-events"),
            queue: unique("inventory"),
        }
    }

    pub fn config(&self, extra: &str) -> String {
        self.config_with_stock(extra, 10)
    }

    /// [`Inventory::config`] with `stock` Laptops.
    pub fn config_with_stock(&self, extra: &str, stock: u64) -> String {
        format!(
            r#"
[handlers.inventory]
queue = "{q}"
subscriptions = [{{ exchange = "{o}", kind = "fanout" }}]
publishes_to = [{{ exchange = "{e}", kind = "topic" }}]
retry_base_ms = 50
{extra}
[handlers.inventory.config]
"stock.Laptop" = "{stock}"
"inventory-exchange" = "{e}"
"#,
            q = self.queue,
            o = self.orders,
            e = self.events,
        )
    }

    pub fn cleanup(&self, client: &mut Client) {
        client.cleanup_handler(&self.queue, 50, &[&self.orders, &self.events]);
    }
}

/// Declare a topic exchange (non-durable, deleted by the test).
pub fn declare_topic(client: &Client, exchange: &str) {
    client.rt.block_on(async {
        client
            .ch
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
    });
}
