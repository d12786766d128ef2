//! The sandbox, as obeyed/violated pairs: whatever a guest does, the host
//! survives, the event fails with a clear reason, and the next event works.

use std::time::{Duration, Instant};

use event_host::dispatch::{Delivery, Execution, Outcome, Warm};
use event_host::runtime::CallResult;

use crate::support::{guest, Harness};

fn chaos(config: &str) -> Harness {
    Harness::new(&["chaos"], config)
}

fn assert_next_event_ok(h: &Harness) {
    let ok = h.send("chaos", r#"{"action":"ok"}"#);
    assert_eq!(
        ok.outcome,
        Outcome::Ack,
        "the next event on the handler succeeds: {ok:?}"
    );
}

#[test]
fn endless_loop_is_interrupted_within_deadline_plus_100ms() {
    let h = chaos("[handlers.chaos]\ndeadline_ms = 200\nmax_attempts = 3");
    // Obeyed: burning less than the deadline is fine.
    let short = h.send("chaos", r#"{"action":"burn","micros":20000}"#);
    assert_eq!(short.outcome, Outcome::Ack, "{short:?}");
    // Violated: a loop is cut off at the deadline.
    let started = Instant::now();
    let handled = h.send("chaos", r#"{"action":"loop"}"#);
    let took = started.elapsed();
    assert_eq!(handled.outcome, Outcome::Retry, "{handled:?}");
    let reason = handled.reason.unwrap_or_default();
    assert!(reason.contains("deadline of 200 ms exceeded"), "{reason}");
    assert!(
        took < Duration::from_millis(300),
        "interrupted after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(200),
        "interrupted early, after {took:?}"
    );
    assert_next_event_ok(&h);
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn unbounded_allocation_stops_at_the_cap_with_host_memory_bounded() {
    let h = chaos("[handlers.chaos]\nmemory_mb = 32");
    // Obeyed: a normal event fits.
    assert_next_event_ok(&h);
    let before = vm_hwm_kib();
    let handled = h.send("chaos", r#"{"action":"alloc"}"#);
    let grown_mib = (vm_hwm_kib() - before) / 1024;
    assert_eq!(handled.outcome, Outcome::Retry, "{handled:?}");
    let reason = handled.reason.unwrap_or_default();
    assert!(reason.contains("memory limit exceeded"), "{reason}");
    // The guest got at most its 32 MiB; peak host memory grew by about that.
    assert!(
        grown_mib < 32 + 48,
        "host peak memory grew by {grown_mib} MiB"
    );
    assert_next_event_ok(&h);
}

#[test]
fn unbounded_recursion_traps() {
    let h = chaos("");
    let handled = h.send("chaos", r#"{"action":"recurse"}"#);
    assert_eq!(handled.outcome, Outcome::Retry, "{handled:?}");
    assert!(handled.reason.unwrap_or_default().contains("trap"));
    assert_next_event_ok(&h);
}

#[test]
fn panic_traps_and_the_next_event_is_fine() {
    let h = chaos("");
    let handled = h.send("chaos", r#"{"action":"panic"}"#);
    assert_eq!(handled.outcome, Outcome::Retry, "{handled:?}");
    assert!(handled.reason.unwrap_or_default().contains("unreachable"));
    assert_next_event_ok(&h);
}

#[test]
fn exit_is_a_failed_attempt_not_a_host_exit() {
    let h = chaos("");
    // WASI p2 `exit` carries only success or failure, so code 3 arrives as 1.
    // Even exit(0) is a failure: the handler never returned its result.
    for (code, shown) in [(3, "exit(1)"), (0, "exit(0)")] {
        let handled = h.send("chaos", &format!(r#"{{"action":"exit","code":{code}}}"#));
        assert_eq!(handled.outcome, Outcome::Retry, "{handled:?}");
        let reason = handled.reason.unwrap_or_default();
        assert!(reason.contains(shown), "{reason}");
    }
    assert_next_event_ok(&h);
}

#[test]
fn file_env_and_socket_probes_all_fail() {
    let h = chaos("");
    for probe in [
        r#"{"action":"read-file","path":"/etc/passwd"}"#,
        r#"{"action":"read-file","path":"Cargo.toml"}"#,
        r#"{"action":"env","name":"PATH"}"#,
        r#"{"action":"socket","addr":"127.0.0.1:5672"}"#,
    ] {
        let handled = h.send("chaos", probe);
        let reason = handled.reason.clone().unwrap_or_default();
        assert_eq!(handled.outcome, Outcome::Reject, "{probe}: {handled:?}");
        assert!(
            reason.starts_with("denied:"),
            "{probe} was not denied: {reason}"
        );
    }
}

#[test]
fn guest_output_is_captured_with_a_bound() {
    // The deadline is generous: 100k writes take a second or more on a
    // loaded machine, and this test is about the output bound, not speed.
    let h = chaos("[handlers.chaos]\nmax_output_bytes = 1024\ndeadline_ms = 60000");
    let handler = &h.handlers["chaos"];
    // 100k lines of output (2 MB): kept to 1 KiB, and the guest never sees
    // an error.
    let event = event_host::bindings::Event {
        payload: br#"{"action":"print","text":"hello from the guest","times":100000}"#.to_vec(),
        exchange: "test".into(),
        routing_key: String::new(),
        message_id: None,
        correlation_id: None,
        content_type: None,
        headers: Vec::new(),
        timestamp: None,
        redelivered: false,
        attempt: 1,
    };
    let call = h.dispatcher.runtime().call(
        &handler.pre,
        handler.name.clone(),
        h.dispatcher.state().clone(),
        handler.settings.config.clone(),
        &handler.settings.budget,
        &event,
    );
    assert!(matches!(call.result, CallResult::Ok), "{:?}", call.result);
    assert_eq!(call.effects.stdout.len(), 1024, "stdout kept to the cap");
    assert!(call.effects.stdout.starts_with(b"hello from the guest\n"));
    assert_eq!(call.effects.stderr, b"hello from the guest\n");
    assert_next_event_ok(&h);
}

#[test]
fn a_component_of_another_world_is_refused_by_loading() {
    let h = chaos("");
    let runtime = h.dispatcher.runtime();
    let other = std::fs::read(guest("other-world")).unwrap();
    let err = runtime
        .prepare(&other)
        .err()
        .expect("another world is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("handler world") || msg.contains("import"),
        "{msg}"
    );

    // The smallest valid core module: magic and version 1.
    let core = b"\0asm\x01\0\0\0";
    let msg = format!(
        "{:#}",
        runtime.prepare(core).err().expect("core module refused")
    );
    assert!(msg.contains("not a WebAssembly component"), "{msg}");

    let msg = format!(
        "{:#}",
        runtime.prepare(b"garbage").err().expect("garbage refused")
    );
    assert!(msg.contains("not a WebAssembly component"), "{msg}");

    let good = std::fs::read(guest("chaos")).unwrap();
    let truncated = &good[..good.len() / 2];
    assert!(
        runtime.prepare(truncated).is_err(),
        "a half-written file is refused"
    );
}

/// Run one event with `payload` through chaos in `warm`'s instance, as
/// the broker path runs each event of a batch.
fn execute_in(h: &Harness, warm: &mut Warm, payload: &str) -> Execution {
    let delivery = Delivery {
        payload: payload.as_bytes().to_vec(),
        exchange: "test".into(),
        attempt: 1,
        ..Delivery::default()
    };
    h.dispatcher
        .execute_in(&h.handlers["chaos"], &delivery, warm)
        .expect("no host fault")
}

/// Run `n` `calls` events through `warm` and return how many events each
/// one's instance had run, from its own commit; every event writes one
/// key and must carry only that write.
fn calls_per_instance(h: &Harness, warm: &mut Warm, first: usize, n: usize) -> Vec<u64> {
    (first..first + n)
        .map(|i| {
            let key = format!("calls.{i}");
            let execution = execute_in(h, warm, &format!(r#"{{"action":"calls","key":"{key}"}}"#));
            assert_eq!(execution.outcome, Outcome::Ack, "{:?}", execution.reason);
            let writes = execution.commit.expect("a commit").writes;
            assert_eq!(writes.len(), 1, "only this event's write: {writes:?}");
            assert_eq!(writes[0].0, key);
            let value = writes[0].1.clone().expect("a value");
            String::from_utf8(value).unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn every_event_gets_a_fresh_instance_unless_the_handler_allows_reuse() {
    // Obeyed: by default nothing of one event's instance reaches the next,
    // even through the broker path's per-batch slot.
    let h = chaos("");
    let mut warm = Warm::default();
    assert_eq!(calls_per_instance(&h, &mut warm, 0, 4), [1, 1, 1, 1]);

    // Allowed: one instance serves up to three events, then a fresh one.
    let h = chaos("[handlers.chaos]\nevents_per_instance = 3");
    let mut warm = Warm::default();
    assert_eq!(calls_per_instance(&h, &mut warm, 0, 4), [1, 2, 3, 1]);
}

#[test]
fn a_failed_call_never_leaves_its_instance_to_the_next_event() {
    let h = chaos("[handlers.chaos]\nevents_per_instance = 100");
    let mut warm = Warm::default();
    assert_eq!(calls_per_instance(&h, &mut warm, 0, 2), [1, 2]);
    let mut next = 2;
    for failing in [
        r#"{"action":"panic"}"#,
        r#"{"action":"retry","reason":"later"}"#,
        r#"{"action":"reject","reason":"bad"}"#,
        r#"{"action":"kv-set-then-fail","key":"k","value":"v"}"#,
    ] {
        let failed = execute_in(&h, &mut warm, failing);
        assert_ne!(failed.outcome, Outcome::Ack, "{failing}");
        assert!(failed.commit.is_none(), "{failing}: no effects");
        // The events after it start over in a fresh instance.
        assert_eq!(
            calls_per_instance(&h, &mut warm, next, 2),
            [1, 2],
            "after {failing}"
        );
        next += 2;
    }
}

#[test]
fn a_reused_instance_gives_every_event_its_whole_deadline() {
    // Three 300 ms events in one instance under a 500 ms deadline: each is
    // timed from its own start, not the instance's.
    let h = chaos("[handlers.chaos]\nevents_per_instance = 10\ndeadline_ms = 500");
    let mut warm = Warm::default();
    for _ in 0..3 {
        let execution = execute_in(&h, &mut warm, r#"{"action":"burn","micros":300000}"#);
        assert_eq!(execution.outcome, Outcome::Ack, "{:?}", execution.reason);
    }
    // Violated: a loop in the reused instance is still cut at 500 ms.
    let execution = execute_in(&h, &mut warm, r#"{"action":"loop"}"#);
    assert_eq!(execution.outcome, Outcome::Retry);
    let reason = execution.reason.unwrap_or_default();
    assert!(reason.contains("deadline of 500 ms exceeded"), "{reason}");
}

// ---- waits: the deadline bounds every one a guest can cause ----------------

/// Send `payload` to chaos and time it.
fn timed(h: &Harness, payload: &str) -> (event_host::dispatch::Handled, Duration) {
    let started = Instant::now();
    let handled = h.send("chaos", payload);
    (handled, started.elapsed())
}

fn assert_timed_out(handled: &event_host::dispatch::Handled, took: Duration, deadline_ms: u64) {
    assert_eq!(
        handled.outcome,
        Outcome::Retry,
        "a failed attempt: {handled:?}"
    );
    let reason = handled.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(&format!("deadline of {deadline_ms} ms exceeded")),
        "{reason}"
    );
    assert!(
        took < Duration::from_millis(deadline_ms + 100),
        "interrupted after {took:?}"
    );
}

#[test]
fn sleeping_past_the_deadline_is_interrupted_within_deadline_plus_100ms() {
    let h = chaos("[handlers.chaos]\ndeadline_ms = 500");
    // Obeyed: a short sleep is a normal wait.
    let (short, _) = timed(&h, r#"{"action":"sleep","ms":20}"#);
    assert_eq!(short.outcome, Outcome::Ack, "{short:?}");
    // Violated: a minute's sleep ends at the deadline, as a timeout.
    let (handled, took) = timed(&h, r#"{"action":"sleep","ms":60000}"#);
    assert_timed_out(&handled, took, 500);
    // Short sleeps for ever: the last one is cut, the next traps.
    let (handled, took) = timed(&h, r#"{"action":"sleep-loop"}"#);
    assert_timed_out(&handled, took, 500);
    assert_next_event_ok(&h);
}

#[test]
fn a_sleeper_in_a_reused_instance_is_interrupted_too() {
    let h = chaos("[handlers.chaos]\nevents_per_instance = 10\ndeadline_ms = 300");
    let mut warm = Warm::default();
    let ok = execute_in(&h, &mut warm, r#"{"action":"sleep","ms":10}"#);
    assert_eq!(ok.outcome, Outcome::Ack, "{:?}", ok.reason);
    let started = Instant::now();
    let slept = execute_in(&h, &mut warm, r#"{"action":"sleep","ms":60000}"#);
    let took = started.elapsed();
    assert_eq!(slept.outcome, Outcome::Retry);
    let reason = slept.reason.unwrap_or_default();
    assert!(reason.contains("deadline of 300 ms exceeded"), "{reason}");
    assert!(
        took < Duration::from_millis(400),
        "interrupted after {took:?}"
    );
}

#[test]
fn reading_stdin_returns_at_once() {
    // Were stdin open, the read would wait and the deadline end it.
    let h = chaos("[handlers.chaos]\ndeadline_ms = 2000");
    let handled = h.send("chaos", r#"{"action":"read-stdin"}"#);
    assert_eq!(handled.outcome, Outcome::Ack, "{handled:?}");
}

// ---- state bounds ------------------------------------------------------------

/// chaos `kv-big` with these sizes.
fn kv_big(
    h: &Harness,
    key_bytes: usize,
    value_bytes: usize,
    writes: usize,
) -> event_host::dispatch::Handled {
    h.send(
        "chaos",
        &format!(
            r#"{{"action":"kv-big","key_bytes":{key_bytes},"value_bytes":{value_bytes},"writes":{writes}}}"#
        ),
    )
}

/// The guest saw the refusal (chaos asks for a retry on a state error),
/// and the event is dead-lettered at once, not retried: it would go over
/// the limit again.
fn assert_state_error(handled: &event_host::dispatch::Handled, knob: &str) {
    assert_eq!(handled.outcome, Outcome::Reject, "{handled:?}");
    let reason = handled.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("a state call went over a per-event limit (")
            && reason.contains(&format!("({knob})), which the event would do again: "))
            && reason.contains("state error: Error::Other("),
        "the refusal names {knob}, then what the guest said: {reason}"
    );
}

#[test]
fn state_keys_are_bounded_by_max_key_bytes_default_512() {
    let h = chaos("");
    assert_eq!(kv_big(&h, 512, 1, 1).outcome, Outcome::Ack);
    assert_eq!(
        h.state("chaos", &format!("big.0{}", "k".repeat(507)))
            .as_deref(),
        Some("v")
    );
    assert_state_error(&kv_big(&h, 513, 1, 1), "max_key_bytes");
    assert_next_event_ok(&h);
}

#[test]
fn state_values_are_bounded_by_max_value_bytes() {
    // The default, 1 MiB.
    let h = chaos("[handlers.chaos]\ndeadline_ms = 10000");
    assert_eq!(kv_big(&h, 8, 1 << 20, 1).outcome, Outcome::Ack);
    assert_state_error(&kv_big(&h, 8, (1 << 20) + 1, 1), "max_value_bytes");
    // Configured.
    let h = chaos("[handlers.chaos]\nmax_value_bytes = 1000");
    assert_eq!(kv_big(&h, 8, 1000, 1).outcome, Outcome::Ack);
    assert_state_error(&kv_big(&h, 8, 1001, 1), "max_value_bytes");
}

/// Values read stay in the event's transaction until it commits, so the
/// bytes one event may read are bounded too: past it the read traps the
/// call (a failed attempt), it does not keep growing host memory.
#[test]
fn state_reads_per_event_are_bounded_by_max_read_bytes() {
    let set = r#"{"action":"kv-set","key":"a","value":"1000000000"}"#;
    let incr = r#"{"action":"kv-incr","key":"a","delta":1}"#;
    // A 10-byte value read (by `increment`) within 10 bytes...
    let h = chaos("[handlers.chaos]\nmax_read_bytes = 10");
    assert_eq!(h.send("chaos", set).outcome, Outcome::Ack);
    assert_eq!(h.send("chaos", incr).outcome, Outcome::Ack);
    assert_eq!(h.state("chaos", "a").as_deref(), Some("1000000001"));
    // ... and past 9: the call traps, nothing is written.
    let h = chaos("[handlers.chaos]\nmax_read_bytes = 9");
    assert_eq!(h.send("chaos", set).outcome, Outcome::Ack);
    let handled = h.send("chaos", incr);
    assert_eq!(handled.outcome, Outcome::Retry, "{handled:?}");
    let reason = handled.reason.clone().unwrap_or_default();
    assert!(reason.contains("max_read_bytes"), "{reason}");
    assert_eq!(h.state("chaos", "a").as_deref(), Some("1000000000"));
}

#[test]
fn state_writes_per_event_are_bounded_by_max_writes() {
    let h = chaos("[handlers.chaos]\ndeadline_ms = 10000");
    assert_eq!(
        kv_big(&h, 8, 1, 1000).outcome,
        Outcome::Ack,
        "the default, 1000"
    );
    assert_state_error(&kv_big(&h, 8, 1, 1001), "max_writes");
    let h = chaos("[handlers.chaos]\nmax_writes = 10");
    assert_state_error(&kv_big(&h, 8, 1, 11), "max_writes");
    assert_eq!(
        h.state("chaos", "big.0kkk"),
        None,
        "nothing of it committed"
    );
    assert_eq!(kv_big(&h, 8, 1, 10).outcome, Outcome::Ack);
    assert_eq!(h.state("chaos", "big.9kkk").as_deref(), Some("v"));
}

#[test]
fn bytes_written_per_event_are_bounded_by_max_written_bytes() {
    // The default, 8 MiB: eight 1 MiB values less their keys fit, nine do not.
    let h = chaos("[handlers.chaos]\ndeadline_ms = 10000");
    assert_eq!(kv_big(&h, 8, (1 << 20) - 8, 8).outcome, Outcome::Ack);
    assert_state_error(&kv_big(&h, 8, 1 << 20, 9), "max_written_bytes");
    // Configured: ten keys of 8 bytes and values of 92 bytes are 1000.
    let h = chaos("[handlers.chaos]\nmax_written_bytes = 1000");
    assert_eq!(kv_big(&h, 8, 92, 10).outcome, Outcome::Ack);
    assert_state_error(&kv_big(&h, 8, 93, 10), "max_written_bytes");
}

#[test]
fn live_state_resources_per_instance_are_bounded() {
    let h = chaos("");
    for kind in ["false", "true"] {
        let hold = |n: usize| {
            h.send(
                "chaos",
                &format!(r#"{{"action":"hold-many","n":{n},"cas":{kind},"key":"k"}}"#),
            )
        };
        let fits = hold(1000);
        assert_eq!(fits.outcome, Outcome::Ack, "{kind}: {fits:?}");
        let over = hold(5000);
        assert_eq!(over.outcome, Outcome::Retry, "{over:?}");
        let reason = over.reason.unwrap_or_default();
        assert!(reason.contains("live resources"), "{reason}");
    }
    assert_next_event_ok(&h);
}

// ---- publishing: allow-listed, and only what the broker can carry ----------

fn publish(h: &Harness, exchange: &str, extra: &str) -> event_host::dispatch::Handled {
    h.send(
        "chaos",
        &format!(r#"{{"action":"publish","exchange":"{exchange}","routing_key":"k"{extra}}}"#),
    )
}

fn assert_refused(handled: &event_host::dispatch::Handled, error: &str) {
    assert_eq!(handled.outcome, Outcome::Reject, "{handled:?}");
    let reason = handled.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("publish refused: PublishError::{error}(")),
        "the guest saw {error}: {reason}"
    );
    assert!(handled.published.is_empty());
}

#[test]
fn a_guest_publishes_only_to_the_exchanges_it_declares() {
    let h = chaos("[handlers.chaos]\npublishes_to = [{ exchange = 'declared', kind = 'topic' }]");
    // Obeyed.
    let ok = publish(&h, "declared", "");
    assert_eq!(ok.outcome, Outcome::Ack, "{ok:?}");
    assert_eq!(ok.published.len(), 1);
    // Violated: the default exchange (any queue), amq.*, and the rest.
    for exchange in ["", "amq.direct", "amq.topic", "undeclared", "inventory"] {
        assert_refused(&publish(&h, exchange, ""), "NotAllowed");
    }
    // The default exchange and amq.* when named explicitly.
    let h = chaos(
        "[handlers.chaos]\npublishes_to = [{ exchange = '', kind = 'direct' }, { exchange = 'amq.direct', kind = 'direct' }]",
    );
    for exchange in ["", "amq.direct"] {
        let ok = publish(&h, exchange, "");
        assert_eq!(ok.outcome, Outcome::Ack, "{exchange:?}: {ok:?}");
    }
    assert_refused(&publish(&h, "amq.topic", ""), "NotAllowed");
}

#[test]
fn a_publish_the_broker_cannot_carry_is_invalid_to_the_guest() {
    let h = chaos("[handlers.chaos]\npublishes_to = [{ exchange = 'out', kind = 'topic' }]");
    let fits = "i".repeat(255);
    let long = "i".repeat(256);
    for field in ["message_id", "correlation_id", "content_type"] {
        // Obeyed: 255 bytes, the AMQP short string.
        let ok = publish(&h, "out", &format!(r#","{field}":"{fits}""#));
        assert_eq!(ok.outcome, Outcome::Ack, "{field}: {ok:?}");
        // Violated: one more.
        assert_refused(
            &publish(&h, "out", &format!(r#","{field}":"{long}""#)),
            "Invalid",
        );
    }
    let routed = h.send(
        "chaos",
        &format!(r#"{{"action":"publish","exchange":"out","routing_key":"{long}"}}"#),
    );
    assert_refused(&routed, "Invalid");
    assert_refused(&publish(&h, &long, ""), "Invalid");
    // Headers: names the host can carry, not the host's own, bounded bytes.
    let ok = publish(
        &h,
        "out",
        &format!(r#","headers":{{"{fits}":"v","x-trace":"1"}}"#),
    );
    assert_eq!(ok.outcome, Outcome::Ack, "{ok:?}");
    let names: Vec<&str> = ok.published[0]
        .headers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(
        names.contains(&fits.as_str()) && names.contains(&"x-trace"),
        "{names:?}"
    );
    for headers in [
        format!(r#"{{"{long}":"v"}}"#),
        r#"{"":"v"}"#.to_owned(),
        r#"{"x-event-host-attempt":"99"}"#.to_owned(),
        format!(r#"{{"big":"{}"}}"#, "v".repeat(16 << 10)),
    ] {
        assert_refused(
            &publish(&h, "out", &format!(r#","headers":{headers}"#)),
            "Invalid",
        );
    }
    let fits_cap = format!(r#","headers":{{"big":"{}"}}"#, "v".repeat((16 << 10) - 3));
    assert_eq!(publish(&h, "out", &fits_cap).outcome, Outcome::Ack);
    assert_next_event_ok(&h);
}
