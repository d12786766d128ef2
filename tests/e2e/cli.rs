//! The `event-host` binary: `check` and `replay`, run as a user would.

use std::process::Command;

use serde_json::Value;

use crate::support::{guest, handlers_dir};

fn event_host() -> Command {
    Command::new(env!("CARGO_BIN_EXE_event-host"))
}

#[test]
fn check_prints_the_manifest_as_json() {
    let out = event_host()
        .arg("check")
        .arg(guest("inventory"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["manifest"]["name"], "inventory");
    assert_eq!(v["manifest"]["subscriptions"][0]["exchange"], "orders");
    assert_eq!(v["manifest"]["subscriptions"][0]["kind"], "fanout");
    // Its outputs: the exchanges it may publish to.
    assert_eq!(v["manifest"]["publishes"][0]["exchange"], "inventory");
    assert_eq!(v["manifest"]["publishes"][0]["kind"], "topic");
    assert_eq!(v["sha256"].as_str().map(str::len), Some(64));
}

#[test]
fn check_of_a_manifest_that_sleeps_fails_at_its_deadline_with_the_reason() {
    // `sleepy`'s manifest() sleeps for a minute.
    let started = std::time::Instant::now();
    let out = event_host()
        .arg("check")
        .arg(guest("sleepy"))
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success(), "a sleeping manifest was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("calling manifest()") && stderr.contains("deadline of 1000 ms exceeded"),
        "{stderr}"
    );
    assert!(
        took < std::time::Duration::from_secs(30),
        "check waited {took:?} for the sleeping manifest"
    );
}

#[test]
fn check_refuses_another_world_with_a_one_line_reason() {
    for file in [guest("other-world"), std::path::PathBuf::from("Cargo.toml")] {
        let out = event_host().arg("check").arg(&file).output().unwrap();
        assert!(!out.status.success(), "{file:?} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one line: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

fn replay(handlers: &[&str], config: &str, events: &str) -> Vec<Value> {
    let dir = handlers_dir(handlers);
    let events_file = dir.path().join("events.jsonl");
    std::fs::write(&events_file, events).unwrap();
    let config_file = dir.path().join("config.toml");
    std::fs::write(&config_file, config).unwrap();
    let out = event_host()
        .args(["replay", "--handlers"])
        .arg(dir.path())
        .arg("--events")
        .arg(&events_file)
        .arg("--config")
        .arg(&config_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

const CONFIG: &str = r#"
[handlers.inventory.config]
"stock.Laptop" = "10"
"low-stock-threshold" = "3"
"#;

#[test]
fn replay_chains_checkout_to_order_to_inventory() {
    let lines = replay(
        &["order-publisher", "inventory", "chaos"],
        CONFIG,
        r#"{"exchange":"checkout","routing_key":"checkout.requested","payload":{"item":"Laptop","quantity":3}}"#,
    );
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(lines[0]["handler"], "order-publisher");
    assert_eq!(lines[0]["outcome"], "ack");
    assert_eq!(lines[0]["published"][0]["exchange"], "orders");
    assert_eq!(lines[0]["published"][0]["payload"]["id"], 1);
    assert_eq!(lines[1]["handler"], "inventory");
    assert_eq!(lines[1]["exchange"], "orders");
    assert_eq!(lines[1]["outcome"], "ack");
    let reserved = &lines[1]["published"][0];
    assert_eq!(reserved["routing_key"], "inventory.reserved");
    assert_eq!(reserved["payload"]["remaining"], 7);
}

#[test]
fn replay_routes_fanout_direct_and_topic() {
    // chaos binds topic "chaos" with "#"; order-publisher binds direct
    // "checkout" with "checkout.requested"; inventory binds fanout "orders".
    let events = [
        // direct: the wrong key reaches nobody, the right one reaches order-publisher
        r#"{"exchange":"checkout","routing_key":"checkout.other","payload":{"item":"Laptop","quantity":1}}"#,
        // fanout: any routing key reaches inventory
        r#"{"exchange":"orders","routing_key":"whatever","payload":{"id":9,"item":"Laptop","quantity":1}}"#,
        // topic "#": any key, including several words, reaches chaos
        r#"{"exchange":"chaos","routing_key":"a.b.c","payload":{"action":"ok"}}"#,
        // unknown exchange: dropped
        r#"{"exchange":"nowhere","routing_key":"","payload":{}}"#,
    ];
    let lines = replay(
        &["order-publisher", "inventory", "chaos"],
        CONFIG,
        &events.join("\n"),
    );
    let handlers: Vec<&str> = lines
        .iter()
        .map(|l| l["handler"].as_str().unwrap())
        .collect();
    assert_eq!(handlers, ["inventory", "chaos"], "{lines:#?}");
    assert_eq!(lines[1]["routing_key"], "a.b.c");
}

#[test]
fn replay_reports_failures_per_invocation() {
    let events = [
        r#"{"exchange":"orders","payload":"not json"}"#,
        r#"{"exchange":"chaos","routing_key":"x","payload":{"action":"retry","reason":"later"}}"#,
    ];
    let lines = replay(&["inventory", "chaos"], CONFIG, &events.join("\n"));
    assert_eq!(lines[0]["outcome"], "reject");
    assert!(lines[0]["reason"].as_str().unwrap().len() > 3);
    assert_eq!(lines[1]["outcome"], "retry");
    assert_eq!(lines[1]["reason"], "later");
}

#[test]
fn replay_enforces_the_publish_allow_list() {
    let publish = |exchange: &str| {
        format!(
            r#"{{"exchange":"chaos","routing_key":"x","payload":{{"action":"publish","exchange":"{exchange}","routing_key":"k"}}}}"#
        )
    };
    let events = [publish("allowed"), publish("elsewhere"), publish("")];
    let lines = replay(
        &["chaos"],
        "[handlers.chaos]\npublishes_to = [{ exchange = 'allowed', kind = 'topic' }]",
        &events.join("\n"),
    );
    assert_eq!(lines[0]["outcome"], "ack", "{lines:#?}");
    assert_eq!(lines[0]["published"][0]["exchange"], "allowed");
    for refused in &lines[1..] {
        assert_eq!(refused["outcome"], "reject", "{refused:#?}");
        assert!(
            refused["reason"].as_str().unwrap().contains("NotAllowed"),
            "{refused:#?}"
        );
    }
}

#[test]
fn run_at_the_default_level_logs_no_errors_for_a_healthy_start() {
    use crate::amqp_support::{amqp_url, unique, Client};
    use crate::process::Run;
    // Exchanges that do not exist yet: the host probes for them (a passive
    // declare the broker answers by closing the channel) and creates them.
    let (exchange, queue) = (unique("fresh-orders"), unique("fresh-inventory"));
    let mut client = Client::connect();
    let q = queue.as_str();
    client.cleanup_handler(q, 1000, &[&exchange]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("handlers")).unwrap();
    std::fs::copy(
        guest("inventory"),
        dir.path().join("handlers/inventory.wasm"),
    )
    .unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "amqp_url = {:?}\n[handlers.inventory]\nqueue = {q:?}\nsubscriptions = [{{ exchange = {exchange:?}, kind = \"fanout\" }}]\n",
            amqp_url()
        ),
    )
    .unwrap();
    let mut cmd = crate::process::event_host(dir.path());
    cmd.args(["run", "--config", config.to_str().unwrap()]);
    let mut run = Run::start("default-log", dir.path(), cmd);
    run.wait_ready();
    let log = run.terminate();
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("consuming"), "{text}");
    assert!(
        !text.contains("ERROR") && !text.contains("WARN"),
        "a healthy start logged a problem:\n{text}"
    );
}

#[test]
fn health_of_a_host_that_is_not_there_fails_with_the_address() {
    let port = crate::amqp_support::free_port();
    let out = event_host()
        .args([
            "health",
            "--admin-addr",
            &format!("0.0.0.0:{port}"),
            "--timeout-secs",
            "2",
        ])
        .env_remove("EVENT_HOST_CONFIG")
        .env_remove("EVENT_HOST_ADMIN_ADDR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains(&format!("127.0.0.1:{port}")),
        "asked on loopback, said where: {err}"
    );
}

/// `check --cache-dir` leaves the compiled code behind before it exits (it
/// is written in the background), so the next `check` or `replay` of a
/// large component loads it instead of compiling again.
#[test]
fn check_with_a_cache_dir_leaves_the_compiled_code_for_the_next_run() {
    let cache = tempfile::tempdir().unwrap();
    let check = || {
        let out = event_host()
            .arg("check")
            .arg("--cache-dir")
            .arg(cache.path())
            .arg(guest("inventory"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_dir(cache.path()).unwrap().count()
    };
    assert_eq!(
        check(),
        1,
        "the compiled code is in the cache when check exits"
    );
    assert_eq!(check(), 1, "and is used, not written again beside itself");
}
