//! The host as a process, checked with the ledger: SIGKILL mid-stream
//! loses nothing and applies nothing twice after a restart; SIGTERM with
//! events in flight finishes them, exits 0 within the drain timeout, and
//! the restarted host is handed none of the events the first run handled.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::amqp_support::amqp_url;
use crate::ledger::{all_ledger, Ledger, Produced, Report, HANDLER};
use crate::process::{event_host, Run};
use crate::support::guest;

/// Events per stream, and the rate they are published at.
const EVENTS: u64 = 10_000;
const RATE: f64 = 4_000.0;

/// A handlers folder with the chaos guest and a config file for `ledger`
/// (default durability: every commit fsynced).
fn deploy(dir: &Path, ledger: &Ledger, drain_timeout_secs: u64) -> PathBuf {
    let handlers = dir.join("handlers");
    std::fs::create_dir_all(&handlers).unwrap();
    std::fs::copy(guest("chaos"), handlers.join("chaos.wasm")).unwrap();
    let config = dir.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "handlers_dir = {:?}\nstate_path = {:?}\namqp_url = {:?}\ndrain_timeout_secs = {drain_timeout_secs}\n{}",
            handlers.to_str().unwrap(),
            dir.join("state").to_str().unwrap(),
            ledger.url,
            ledger.config(""),
        ),
    )
    .unwrap();
    config
}

fn start(name: &'static str, dir: &Path, config: &Path) -> Run {
    let mut cmd = event_host(dir);
    cmd.args(["run", "--config", config.to_str().unwrap()]);
    let mut run = Run::start(name, dir, cmd);
    run.wait_ready();
    run
}

/// Wait until nothing is left in the queues and the counters have not
/// moved for a second.
fn wait_settled(run: &mut Run, ledger: &Ledger) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (String::new(), Instant::now());
    loop {
        let now = run.counters(HANDLER).to_string();
        if now != last.0 {
            last = (now, Instant::now());
        }
        if last.1.elapsed() >= Duration::from_secs(1) && ledger.backlog() == Some(0) {
            return;
        }
        run.assert_running();
        assert!(Instant::now() < deadline, "never settled: {}", last.0);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Read back state, DLQ and outputs once no host runs.
fn check(ledger: &Ledger, dir: &Path, produced: &Produced) -> Report {
    let store = crate::backend::open_state(&dir.join("state"));
    let pending = store.pending_outbox().unwrap().len();
    ledger.check_store(&store, pending, produced, &all_ledger())
}

fn assert_exactly_once(report: &Report) {
    assert!(report.lost.is_empty(), "lost: {report}");
    assert!(report.duplicated.is_empty(), "duplicated: {report}");
    assert!(report.unexpected.is_empty(), "unexpected: {report}");
    assert_eq!(report.applied_once, report.confirmed, "{report}");
    assert!(report.outputs_missing.is_empty(), "{report}");
    assert!(report.outputs_reissued.is_empty(), "{report}");
}

#[test]
fn a_host_killed_mid_stream_loses_nothing_and_applies_nothing_twice_after_restart() {
    killed_mid_stream(Ledger::new(&amqp_url(), 5, 100));
}

/// The same with a producer that sets no message id (as the seed's Order
/// Service): the idempotency key in the body keeps it exactly once.
#[test]
fn a_host_killed_mid_stream_applies_nothing_twice_without_message_ids() {
    killed_mid_stream(Ledger::new(&amqp_url(), 5, 100).without_message_ids());
}

fn killed_mid_stream(ledger: Ledger) {
    let dir = tempfile::tempdir().unwrap();
    ledger.declare_outputs();
    let config = deploy(dir.path(), &ledger, 30);
    let mut first = start("sigkill-1", dir.path(), &config);
    let producer = ledger.produce(EVENTS, RATE, all_ledger());

    // Mid-stream, mid-drain: batches in every stage of their life.
    first.wait_counter(HANDLER, "acked", EVENTS / 4);
    let acked_before = first.counters(HANDLER)["acked"].as_u64().unwrap();
    first.kill();

    let mut second = start("sigkill-2", dir.path(), &config);
    let produced = producer.join();
    wait_settled(&mut second, &ledger);
    let deduped = second.counters(HANDLER)["duplicates"].as_u64().unwrap();
    second.terminate();

    let report = check(&ledger, dir.path(), &produced);
    eprintln!(
        "SIGKILL after {acked_before} acked; the restarted host skipped {deduped} redelivered, already committed events\n{report}"
    );
    assert_eq!(report.confirmed as u64, EVENTS, "{report}");
    assert_exactly_once(&report);
    // Output of batches committed but unconfirmed at the kill is
    // published again (same message ids: at-least-once output, deduped
    // downstream by id); the graceful stop that follows leaves none.
    assert_eq!(report.outbox_pending, 0, "{report}");
    ledger.delete();
}

#[test]
fn sigterm_finishes_in_flight_events_and_nothing_handled_is_delivered_again() {
    const DRAIN: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new(&amqp_url(), 5, 100);
    ledger.declare_outputs();
    let config = deploy(dir.path(), &ledger, DRAIN.as_secs());
    let mut first = start("sigterm-1", dir.path(), &config);
    let producer = ledger.produce(EVENTS, RATE, all_ledger());

    first.wait_counter(HANDLER, "acked", EVENTS / 4);
    let asked = Instant::now();
    let log = first.terminate(); // asserts exit status 0
    let took = asked.elapsed();
    assert!(
        took < DRAIN,
        "stopping took {took:?}, over the drain timeout"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("shutdown requested"), "{text}");
    assert!(
        !text.contains("drain timeout"),
        "in-flight events did not settle: {text}"
    );

    let mut second = start("sigterm-2", dir.path(), &config);
    let produced = producer.join();
    wait_settled(&mut second, &ledger);
    let c = second.counters(HANDLER);
    second.terminate();

    let report = check(&ledger, dir.path(), &produced);
    eprintln!("SIGTERM drained in {took:?}; second run counters {c}\n{report}");
    assert_eq!(
        c["duplicates"], 0,
        "events the first run handled were delivered again: {c}"
    );
    assert_eq!(report.confirmed as u64, EVENTS, "{report}");
    assert_exactly_once(&report);
    // A graceful stop leaves no output to publish again.
    assert_eq!(report.outputs_raw, report.outputs_distinct, "{report}");
    assert_eq!(report.outbox_pending, 0, "{report}");
    ledger.delete();
}
