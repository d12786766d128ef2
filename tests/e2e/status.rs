//! The status page: its data, `GET /status`, tested on its own against a
//! real host and real orders; and the page, `GET /`, in a real headless
//! Chromium (Debian's), driven by playwright-core (`tests/browser/`):
//! orders flowing, and the admin token asked for.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use serde_json::Value;

use crate::amqp_support::{http_get_raw, http_get_with, unique, Client, TestHost};
use crate::support::{install, repo_root, variant};

/// Both example handlers, wired as in `examples/config.toml` (checkouts →
/// order-publisher → orders → inventory) on names of this test's own.
struct Shop {
    checkout: String,
    orders: String,
    events: String,
    inventory: String,
    publisher: String,
}

impl Shop {
    fn new() -> Self {
        Self {
            checkout: unique("checkout"),
            orders: unique("orders"),
            events: unique("inventory-events"),
            inventory: unique("inventory"),
            publisher: unique("order-publisher"),
        }
    }

    /// The handlers' config, after `top` (top-level keys).
    fn config(&self, top: &str) -> String {
        format!(
            r#"{top}
[handlers.inventory]
queue = "{inventory}"
subscriptions = [{{ exchange = "{orders}", kind = "fanout" }}]
publishes_to = [{{ exchange = "{events}", kind = "topic" }}]
idempotency_key = "/id"
retry_base_ms = 50
[handlers.inventory.config]
"stock.Laptop" = "1000000"
"inventory-exchange" = "{events}"

[handlers.order-publisher]
queue = "{publisher}"
subscriptions = [{{ exchange = "{checkout}", kind = "direct", binding_keys = ["checkout.requested"] }}]
publishes_to = [{{ exchange = "{orders}", kind = "fanout" }}]
retry_base_ms = 50
[handlers.order-publisher.config]
"orders-exchange" = "{orders}"
"#,
            inventory = self.inventory,
            orders = self.orders,
            events = self.events,
            publisher = self.publisher,
            checkout = self.checkout,
        )
    }

    fn cleanup(&self, client: &mut Client) {
        client.cleanup_handler(&self.inventory, 50, &[&self.orders, &self.events]);
        client.cleanup_handler(&self.publisher, 50, &[&self.checkout]);
    }

    /// A shop on names of its own, its client (which deletes them when
    /// dropped) and a host running both handlers behind [`TOKEN`].
    fn behind_the_token() -> (Self, Client, TestHost) {
        let shop = Self::new();
        let mut client = Client::connect();
        shop.cleanup(&mut client);
        let host = TestHost::start(
            &["inventory", "order-publisher"],
            &shop.config(&format!("admin_token = {TOKEN:?}")),
        );
        (shop, client, host)
    }

    /// One checkout, as a plain client sends it (no properties).
    fn checkout(&self, client: &Client, body: &str) {
        client.publish(
            &self.checkout,
            "checkout.requested",
            body.as_bytes(),
            BasicProperties::default(),
        );
    }
}

const TOKEN: &str = "status-test-token";

/// `GET /status?{query}` with the token: the parsed document.
fn status(host: &TestHost, query: &str) -> Value {
    let auth = format!("Authorization: Bearer {TOKEN}");
    let (code, body) = http_get_with(&host.admin, &format!("/status?{query}"), Some(&auth));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Poll `/status` until `ok` holds for the named handler (30 s at most).
fn wait_status(host: &TestHost, name: &str, ok: impl Fn(&Value, &Value) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc = status(host, "");
        if let Some(h) = handler_of(&doc, name) {
            if ok(&doc, h) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {doc}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn handler_of<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
    doc["handlers"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
}

fn sum(values: &Value) -> u64 {
    values
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

#[test]
fn the_status_document_reports_versions_rates_latency_dlq_depth_and_lifecycle() {
    let (shop, client, host) = Shop::behind_the_token();

    // The data needs the token; the page, which holds none, does not.
    let (code, _) = http_get_with(&host.admin, "/status", None);
    assert_eq!(code, 401);
    let page = http_get_raw(&host.admin, "/", None);
    let head = page.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(
        page.starts_with("HTTP/1.0 200") || page.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(page.contains("<title>event-host status</title>"));

    let doc = status(&host, "");
    assert_eq!(doc["broker_connected"], true, "{doc}");
    let backend = if crate::backend::on_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(doc["state_backend"], backend);
    assert!(doc["host_id"].as_str().is_some_and(|h| !h.is_empty()));
    assert!(
        doc["uptime_secs"].is_u64() && doc["started_at"].as_str().is_some_and(|t| t.ends_with('Z'))
    );
    let names: Vec<&str> = doc["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, ["inventory", "order-publisher"]);
    let inventory_sha = {
        let inv = handler_of(&doc, "inventory").unwrap();
        assert_eq!(inv["guest_version"], "1.0.0");
        assert_eq!(inv["status"], "consuming");
        assert_eq!(inv["queue"], shop.inventory.as_str());
        assert_eq!(inv["dead_letter_queue"], format!("{}.dlq", shop.inventory));
        let sha = inv["version"].as_str().unwrap();
        assert_eq!(inv["short_version"], &sha[..12]);
        assert_eq!(inv["counters"]["acked"], 0);
        // Nothing yet: the default five minutes, all zeros.
        let recent = &inv["recent"];
        assert_eq!(recent["seconds"], 300);
        assert_eq!(recent["events"].as_array().unwrap().len(), 300);
        assert_eq!(sum(&recent["events"]), 0);
        assert!(recent["p50_ms"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_null));
        assert_eq!(recent["last_minute"]["events_per_sec"], 0.0);
        sha[..12].to_owned()
    };
    // Both loads are in the lifecycle, with the version that loaded.
    for name in ["inventory", "order-publisher"] {
        let h = handler_of(&doc, name).unwrap();
        assert!(
            doc["lifecycle"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["event"] == "loaded"
                    && e["handler"] == name
                    && e["to"] == h["short_version"]
                    && e["at"].as_str().is_some_and(|t| t.ends_with('Z'))),
            "{name} loaded: {}",
            doc["lifecycle"]
        );
    }
    // The window is asked for in seconds, up to ten minutes; a bad
    // query is refused, not a crash.
    let short = status(&host, "seconds=60");
    assert_eq!(
        handler_of(&short, "inventory").unwrap()["recent"]["events"]
            .as_array()
            .unwrap()
            .len(),
        60
    );
    let long = status(&host, "seconds=99999999");
    assert_eq!(
        handler_of(&long, "inventory").unwrap()["recent"]["seconds"],
        600
    );
    let auth = format!("Authorization: Bearer {TOKEN}");
    let (code, _) = http_get_with(&host.admin, "/status?seconds=lots", Some(&auth));
    assert_eq!(code, 400);

    // Real orders: 40 checkouts become 40 orders, and one checkout that
    // is not JSON is dead-lettered by order-publisher.
    for n in 0..40 {
        shop.checkout(
            &client,
            &format!(r#"{{"item": "Laptop", "quantity": 1, "checkout_id": "c-{n}"}}"#),
        );
    }
    shop.checkout(&client, "not json");
    // (`/handlers` needs the token too: the counters are read here.)
    // The window shows whole seconds only: the last one has to close.
    wait_status(
        &host,
        "order-publisher",
        |_, h| {
            h["recent"]["outcomes"]["acked"] == 40 && h["recent"]["outcomes"]["dead_lettered"] == 1
        },
        "order-publisher's 41 events in its window",
    );
    wait_status(
        &host,
        "inventory",
        |_, h| h["recent"]["outcomes"]["acked"] == 40,
        "inventory's 40 orders in its window",
    );
    let doc = status(&host, "");
    let publisher = handler_of(&doc, "order-publisher").unwrap();
    let recent = &publisher["recent"];
    assert_eq!(sum(&recent["events"]), 41, "{recent}");
    assert_eq!(sum(&recent["failed"]), 1, "the dead-lettered checkout");
    assert_eq!(publisher["counters"]["dead_lettered"], 1);
    let inv = handler_of(&doc, "inventory").unwrap();
    let recent = &inv["recent"];
    assert!(recent["last_minute"]["events_per_sec"].as_f64().unwrap() > 0.0);
    assert!(recent["last_minute"]["p50_ms"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    // Per second, where anything ran: 0 < p50 ≤ p99 (ms).
    let (p50, p99) = (
        recent["p50_ms"].as_array().unwrap(),
        recent["p99_ms"].as_array().unwrap(),
    );
    let ran: Vec<(f64, f64)> = p50
        .iter()
        .zip(p99)
        .filter_map(|(a, b)| Some((a.as_f64()?, b.as_f64()?)))
        .collect();
    assert!(!ran.is_empty(), "{recent}");
    assert!(ran.iter().all(|(a, b)| *a > 0.0 && a <= b), "{ran:?}");
    // The last entry is the last whole second before the document.
    let (end, now) = (
        recent["end"].as_u64().unwrap(),
        doc["now_unix_ms"].as_u64().unwrap() / 1000,
    );
    assert!(end < now && now - end <= 2, "{end} {now}");

    // The dead letter shows in the DLQ depth (asked of the broker, cached
    // for a few seconds).
    wait_status(
        &host,
        "order-publisher",
        |_, h| h["dlq_depth"] == 1 && h["dlq_error"].is_null(),
        "order-publisher's DLQ depth 1",
    );
    assert_eq!(
        handler_of(&status(&host, ""), "inventory").unwrap()["dlq_depth"],
        0
    );

    // A new version: the reload and both versions are in the lifecycle.
    install(
        &host.handlers_dir(),
        "inventory.wasm",
        &variant("inventory", "status-test"),
    );
    wait_status(
        &host,
        "inventory",
        |doc, h| {
            h["previous_version"] == inventory_sha.as_str()
                && doc["lifecycle"][0]["event"] == "reloaded"
                && doc["lifecycle"][0]["handler"] == "inventory"
                && doc["lifecycle"][0]["from"] == inventory_sha.as_str()
                && doc["lifecycle"][0]["to"] == h["short_version"]
        },
        "the reload, newest first in the lifecycle",
    );
    host.stop().unwrap();
}

/// Chromium from Debian, or where `EVENT_HOST_CHROMIUM` says. `None` (the
/// test skips, saying so) only when it is absent and
/// `EVENT_HOST_REQUIRE_BROWSER` is unset: `scripts/test.sh` installs it and
/// sets that, so CI never skips.
fn chromium() -> Option<PathBuf> {
    let path = PathBuf::from(
        std::env::var("EVENT_HOST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
    );
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("EVENT_HOST_REQUIRE_BROWSER").is_none(),
        "EVENT_HOST_REQUIRE_BROWSER is set but there is no Chromium at {} \
         (apt-get install chromium, or scripts/test.sh)",
        path.display()
    );
    eprintln!(
        "SKIPPED status page browser test: no Chromium at {} (apt-get install chromium; \
         scripts/test.sh installs it and makes this test required)",
        path.display()
    );
    None
}

/// `tests/browser`, with its driver (playwright-core, no browser of its
/// own) installed from its lockfile when it is not yet.
fn browser_driver() -> PathBuf {
    let dir = repo_root().join("tests/browser");
    if !dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("running npm (Node.js and npm are needed for the browser test)");
        assert!(status.success(), "npm ci in {} failed", dir.display());
    }
    dir
}

/// Start the driver (`tests/browser/status.mjs`) on `host`'s page for
/// both example handlers, with `env`: the child and its output lines.
fn drive(
    chromium: &std::path::Path,
    host: &TestHost,
    env: &[(&str, &str)],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let driver = browser_driver();
    let mut cmd = Command::new("node");
    cmd.arg(driver.join("status.mjs"))
        .arg(format!("http://{}/", host.admin))
        .args(["inventory", "order-publisher"])
        .env("CHROMIUM", chromium)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("running node");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, lines)
}

/// One JSON line of the driver, within `limit`.
fn next_line(lines: &mpsc::Receiver<String>, limit: Duration, what: &str) -> Value {
    let line = lines.recv_timeout(limit).unwrap_or_else(|_| {
        panic!("the browser driver said nothing about {what} within {limit:?}")
    });
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// What the browser reported as wrong so far (console errors, page
/// errors, failed requests, HTTP errors): none of it is allowed.
fn assert_clean(said: &Value) {
    for kind in [
        "console_errors",
        "page_errors",
        "failed_requests",
        "http_errors",
    ] {
        assert_eq!(said[kind], serde_json::json!([]), "{kind}: {said}");
    }
}

#[test]
fn the_status_page_in_chromium_shows_both_handlers_and_its_rate_chart_moves() {
    if crate::backend::on_postgres() {
        // The page reads what the host counts, not its state backend (the
        // JSON test runs on both): the SQLite pass ran it.
        return;
    }
    let Some(chromium) = chromium() else {
        return;
    };
    let shop = Arc::new(Shop::new());
    let mut client = Client::connect();
    shop.cleanup(&mut client);
    let host = TestHost::start(&["inventory", "order-publisher"], &shop.config(""));

    let mut env = vec![("STATUS_LOOKUP", "inventory/stock.Laptop")];
    // For the README's picture: EVENT_HOST_STATUS_SCREENSHOT=/abs/docs/status-page.png
    let screenshot = std::env::var("EVENT_HOST_STATUS_SCREENSHOT").ok();
    if let Some(path) = &screenshot {
        env.extend([
            ("STATUS_SCREENSHOT", path.as_str()),
            ("STATUS_SCREENSHOT_AFTER_SECS", "75"),
        ]);
    }
    let (mut child, lines) = drive(&chromium, &host, &env);

    let loaded = next_line(&lines, Duration::from_secs(60), "loading the page");
    assert_eq!(loaded["event"], "loaded", "{loaded}");
    assert_eq!(loaded["title"], "event-host status");
    assert_eq!(
        loaded["handlers"],
        serde_json::json!(["inventory", "order-publisher"])
    );
    for name in ["inventory", "order-publisher"] {
        assert_eq!(loaded["charts"][name]["peak"], 0, "no events yet: {loaded}");
    }
    assert_clean(&loaded);

    // Orders flow: checkouts at ~50/s (some faster, some slower, so the
    // chart has a shape) until the page has shown them.
    let flowing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (shop, flowing) = (shop.clone(), flowing.clone());
        std::thread::spawn(move || {
            let client = Client::connect();
            let started = Instant::now();
            let mut n = 0u64;
            while flowing.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(180) {
                let burst = 3 + (started.elapsed().as_secs() / 7 % 4) * 2;
                for _ in 0..burst {
                    n += 1;
                    // Now and then one order-publisher dead-letters.
                    let body = if n.is_multiple_of(97) {
                        "not json".to_owned()
                    } else {
                        format!(r#"{{"item": "Laptop", "quantity": 1, "checkout_id": "b-{n}"}}"#)
                    };
                    shop.checkout(&client, &body);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let moved = next_line(&lines, Duration::from_secs(90), "the rate charts moving");
    assert_eq!(moved["event"], "moved", "{moved}");
    for name in ["inventory", "order-publisher"] {
        let (before, after) = (&loaded["charts"][name], &moved["charts"][name]);
        assert!(
            after["peak"].as_f64().is_some_and(|p| p > 0.0),
            "{name}: {moved}"
        );
        assert_ne!(
            before["d"], after["d"],
            "{name}'s rate chart did not change"
        );
    }
    // The state-key lookup, through the page's form.
    assert_eq!(moved["lookup"]["status"], "200", "{moved}");
    let text = moved["lookup"]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("inventory / stock.Laptop = "), "{text}");
    let stock: u64 = text.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(stock < 1_000_000, "orders were reserved: {text}");
    assert_clean(&moved);
    if screenshot.is_some() {
        // A hot reload, so the picture's lifecycle shows one.
        install(
            &host.handlers_dir(),
            "inventory.wasm",
            &variant("inventory", "screenshot"),
        );
        let shot = next_line(&lines, Duration::from_secs(150), "the screenshot");
        assert_eq!(shot["event"], "screenshot", "{shot}");
        assert_clean(&shot);
    }
    flowing.store(false, Ordering::Relaxed);
    publisher.join().unwrap();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "the browser driver failed: {exit}");
    host.stop().unwrap();
}

#[test]
fn the_status_page_asks_for_the_admin_token_and_keeps_it_for_the_tab() {
    if crate::backend::on_postgres() {
        return; // as above: the SQLite pass ran it
    }
    let Some(chromium) = chromium() else {
        return;
    };
    let (_shop, _client, host) = Shop::behind_the_token();
    let (mut child, lines) = drive(&chromium, &host, &[("STATUS_TOKEN", TOKEN)]);
    let said = next_line(&lines, Duration::from_secs(90), "the token form");
    assert_eq!(said["event"], "token", "{said}");
    assert_eq!(said["asked"], true, "the page asked for the token: {said}");
    assert!(
        said["refused"]
            .as_str()
            .is_some_and(|r| r.contains("refused")),
        "a wrong token is said to be refused: {said}"
    );
    assert_eq!(said["stored"], TOKEN, "kept in sessionStorage");
    assert_eq!(said["asked_again"], false, "not asked again in the tab");
    // The only errors: the two 401s that made the page ask (no token, then
    // the wrong one), which the browser logs itself.
    assert_eq!(said["page_errors"], serde_json::json!([]), "{said}");
    assert_eq!(said["failed_requests"], serde_json::json!([]), "{said}");
    let http: Vec<&str> = said["http_errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(http.len(), 2, "{said}");
    assert!(
        http.iter()
            .all(|e| e.starts_with("401 ") && e.contains("/status?seconds=")),
        "{said}"
    );
    let console = said["console_errors"].as_array().unwrap();
    assert!(
        console.len() <= 2
            && console
                .iter()
                .all(|e| e.as_str().is_some_and(|e| e.contains("401"))),
        "{said}"
    );
    assert!(child.wait().unwrap().success());
    host.stop().unwrap();
}
