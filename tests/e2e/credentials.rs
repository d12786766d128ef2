//! Credentials never leak. The real binary runs at the most verbose level
//! (`--log trace`: every crate, lapin's frame traces and Cranelift's
//! included) through a good connect, a wrong password, an unreachable
//! broker, a forced reconnect, a malformed URL and a malformed config file,
//! and the password is in none of its output, in any encoding; nor in
//! `--help` with `EVENT_HOST_AMQP_URL` set.
//!
//! Each run uses a dedicated RabbitMQ user with a random password (deleted
//! at the end, even on failure) and its own queue and exchange names. The
//! only connections closed at the broker are that user's.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::amqp_support::{unique, Client};
use crate::process::{event_host, free_port, http_status, Run};
use crate::support::guest;

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("running rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 16 random hex digits (std's `RandomState` is randomly seeded).
fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Percent-encode everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A password made of random tokens joined by characters that must be
/// percent-encoded in a URL, and every form in which it could show up.
struct Secret {
    password: String,
    tokens: Vec<String>,
}

impl Secret {
    fn new() -> Self {
        let tokens: Vec<String> = (0..3).map(|_| random_hex()).collect();
        Self {
            password: format!("{}@{}/{}", tokens[0], tokens[1], tokens[2]),
            tokens,
        }
    }

    /// The password as written in a URL.
    fn encoded(&self) -> String {
        percent_encode(&self.password)
    }

    /// Each form is a leak: the password raw and percent-encoded; any one
    /// of its random tokens (a partial leak); a token's bytes as `Debug`
    /// prints a `Vec<u8>` (`[0, 117, ...]`, how lapin traces a frame) and
    /// as hex.
    fn forms(&self) -> Vec<String> {
        let mut forms = vec![self.password.clone(), self.encoded()];
        for t in &self.tokens {
            forms.push(t.clone());
            forms.push(
                t.bytes()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            forms.push(t.bytes().map(|b| format!("{b:02x}")).collect());
        }
        forms
    }
}

/// A RabbitMQ user of its own, deleted on drop (which also closes its
/// connections).
struct BrokerUser {
    name: String,
    secret: Secret,
}

impl BrokerUser {
    fn create() -> Self {
        let user = Self {
            name: unique("cred-user"),
            secret: Secret::new(),
        };
        rabbitmqctl(&["add_user", &user.name, &user.secret.password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    /// A URL for this user with `password` percent-encoded, as it must be.
    fn url(&self, password: &Secret, port: u16) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:{port}/%2f",
            self.name,
            password.encoded()
        )
    }

    /// Close this user's connections, and only these, at the broker.
    fn close_connections(&self) -> usize {
        let list = rabbitmqctl(&["list_connections", "--quiet", "user", "pid"]);
        let mut closed = 0;
        for line in list.lines() {
            if let Some((user, pid)) = line.split_once('\t') {
                if user.trim() == self.name {
                    rabbitmqctl(&[
                        "close_connection",
                        pid.trim(),
                        "credentials test: reconnect",
                    ]);
                    closed += 1;
                }
            }
        }
        closed
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `event-host --log trace <global> run --config <config>`, from `dir`.
fn traced_run(dir: &Path, config: &str, global: &[&str]) -> Command {
    let mut cmd = event_host(dir);
    cmd.args(["--log", "trace"])
        .args(global)
        .args(["run", "--config", config]);
    cmd
}

/// What a scan of one output found.
struct Scan {
    lines: usize,
    /// (line number, the leaked form, the line's start).
    leaks: Vec<(usize, String, String)>,
    /// Per marker, whether some line contained it.
    markers: Vec<bool>,
}

/// Stream through `text`'s lines looking for every secret form and marker.
fn scan(reader: impl BufRead, secrets: &[String], markers: &[&str]) -> Scan {
    let mut result = Scan {
        lines: 0,
        leaks: Vec::new(),
        markers: vec![false; markers.len()],
    };
    let mut reader = reader;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).unwrap() == 0 {
            break;
        }
        result.lines += 1;
        let line = String::from_utf8_lossy(&buf);
        for s in secrets {
            if line.contains(s.as_str()) {
                let start: String = line.chars().take(400).collect();
                result.leaks.push((result.lines, s.clone(), start));
            }
        }
        for (found, m) in result.markers.iter_mut().zip(markers) {
            *found |= line.contains(m);
        }
    }
    result
}

/// What is wrong with `log`: any secret in it, any marker missing. A clean
/// log is deleted (a trace run writes hundreds of MB).
fn check(name: &str, log: &Path, secrets: &[String], markers: &[&str]) -> Vec<String> {
    let s = scan(BufReader::new(File::open(log).unwrap()), secrets, markers);
    let mut problems = Vec::new();
    if !s.leaks.is_empty() {
        problems.push(format!(
            "{name}: the password leaked ({} of {} lines), first: {:?}",
            s.leaks.len(),
            s.lines,
            &s.leaks[..s.leaks.len().min(3)]
        ));
    }
    for (found, m) in s.markers.iter().zip(markers) {
        if !found {
            problems.push(format!(
                "{name}: the scenario did not happen as planned: no {m:?} in {} lines",
                s.lines
            ));
        }
    }
    eprintln!("{name}: {} lines, {} problems", s.lines, problems.len());
    if problems.is_empty() {
        let _ = std::fs::remove_file(log);
    }
    problems
}

#[test]
fn the_password_is_in_no_output_even_at_trace_level() {
    let user = BrokerUser::create();
    let wrong = Secret::new();
    // Every scenario runs even after one failed, so a failure shows all.
    let mut problems = Vec::new();
    let mut secrets = user.secret.forms();
    secrets.extend(wrong.forms());
    // The admin token is a secret too: configured in every run, never shown.
    let admin_token = random_hex();
    secrets.push(admin_token.clone());

    let exchange = unique("cred-orders");
    let queue = unique("cred-inventory");
    let mut client = Client::connect();
    client.cleanup(
        &[&queue, &format!("{queue}.dlq")],
        &[&exchange, &format!("{queue}.dlx")],
    );

    let dir = tempfile::tempdir().unwrap();
    let handlers = dir.path().join("handlers");
    std::fs::create_dir_all(&handlers).unwrap();
    std::fs::copy(guest("inventory"), handlers.join("inventory.wasm")).unwrap();
    // One state folder for every run: the first compiles the guest (with
    // Cranelift tracing), the others reuse the compiled code.
    let config_text = |amqp_url: &str| {
        format!(
            "handlers_dir = {:?}\nstate_path = {:?}\n{amqp_url}durability = \"normal\"\n\
             drain_timeout_secs = 5\nadmin_token = {admin_token:?}\n\
             [handlers.inventory]\nqueue = {queue:?}\nmax_attempts = 1\n\
             subscriptions = [{{ exchange = {exchange:?}, kind = \"fanout\" }}]\n",
            handlers.to_str().unwrap(),
            dir.path().join("state").to_str().unwrap(),
        )
    };
    let config = dir.path().join("host.toml");
    std::fs::write(&config, config_text("")).unwrap();
    let config = config.to_str().unwrap();
    let good_url = user.url(&user.secret, 5672);
    let connected = format!(
        "connected broker=amqp://{}:***@127.0.0.1:5672/%2f",
        user.name
    );
    let session_ended = format!(
        "broker session ended: connecting to amqp://{}:***@",
        user.name
    );

    // 1. A good connect, the URL as a flag.
    let mut cmd = traced_run(dir.path(), config, &[]);
    cmd.args(["--amqp-url", &good_url]);
    let mut run = Run::start("good-connect", dir.path(), cmd);
    run.wait_ready();
    let log = run.terminate();
    problems.extend(check(
        "good-connect",
        &log,
        &secrets,
        &[
            &connected,
            // Trace level really reached lapin's frame traces and Cranelift.
            " TRACE ",
            "lapin::io_loop: will write to buffer",
            "cranelift_codegen::",
            "stopped",
        ],
    ));

    // 2. A wrong password, the URL from the environment: refused, retried.
    let mut cmd = traced_run(dir.path(), config, &[]);
    cmd.env("EVENT_HOST_AMQP_URL", user.url(&wrong, 5672));
    let mut run = Run::start("wrong-password", dir.path(), cmd);
    run.wait_log(&session_ended, 2);
    assert_ne!(http_status(&run.admin, "/readyz"), 200);
    let log = run.terminate();
    problems.extend(check(
        "wrong-password",
        &log,
        &secrets,
        &[&session_ended, "ACCESS_REFUSED", " TRACE "],
    ));

    // 3. An unreachable broker (a closed port), the URL in the config file.
    let closed = free_port();
    let unreachable = dir.path().join("unreachable.toml");
    std::fs::write(
        &unreachable,
        config_text(&format!(
            "amqp_url = {:?}\n",
            user.url(&user.secret, closed)
        )),
    )
    .unwrap();
    let cmd = traced_run(dir.path(), unreachable.to_str().unwrap(), &[]);
    let mut run = Run::start("unreachable", dir.path(), cmd);
    run.wait_log(&session_ended, 2);
    let log = run.terminate();
    problems.extend(check(
        "unreachable",
        &log,
        &secrets,
        &[
            &format!("amqp://{}:***@127.0.0.1:{closed}/%2f", user.name),
            "Connection refused",
        ],
    ));

    // 4. A reconnect: the broker closes the host's connection; JSON logs.
    let mut cmd = traced_run(dir.path(), config, &["--log-format", "json"]);
    cmd.env("EVENT_HOST_AMQP_URL", &good_url);
    let mut run = Run::start("reconnect", dir.path(), cmd);
    run.wait_ready();
    run.wait_log("\"message\":\"connected\"", 1);
    assert!(
        user.close_connections() >= 1,
        "the host's connection is listed at the broker"
    );
    run.wait_log("broker session ended", 1);
    run.wait_log("\"message\":\"connected\"", 2);
    run.wait_ready();
    let log = run.terminate();
    problems.extend(check(
        "reconnect",
        &log,
        &secrets,
        &[
            "credentials test: reconnect",
            &format!("\"broker\":\"amqp://{}:***@127.0.0.1:5672/%2f\"", user.name),
            "\"level\":\"TRACE\"",
        ],
    ));

    // 5. The password written into the URL without percent-encoding: its
    // `@` and `/` must not let part of it pass for the host name.
    let raw = format!(
        "amqp://{}:{}@127.0.0.1:5672/%2f",
        user.name, user.secret.password
    );
    let mut cmd = traced_run(dir.path(), config, &[]);
    cmd.args(["--amqp-url", &raw]);
    let mut run = Run::start("malformed-url", dir.path(), cmd);
    // Refused at start (not retried as if the broker were away).
    assert!(!run.wait_exit().success(), "a malformed URL is an error");
    let log = run.log.clone();
    problems.extend(check(
        "malformed-url",
        &log,
        &secrets,
        &[&format!(
            "invalid AMQP URL amqp://{}:***@127.0.0.1:5672/%2f",
            user.name
        )],
    ));

    // 6. A config file whose `amqp_url` line does not parse: the TOML error
    // quotes that line.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("amqp_url = {good_url}\n")).unwrap();
    let cmd = traced_run(dir.path(), bad.to_str().unwrap(), &[]);
    let mut run = Run::start("bad-config", dir.path(), cmd);
    assert!(!run.wait_exit().success(), "a bad config file is an error");
    let log = run.log.clone();
    problems.extend(check(
        "bad-config",
        &log,
        &secrets,
        &[
            "TOML parse error",
            &format!("amqp_url = amqp://{}:***@127.0.0.1", user.name),
        ],
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn help_never_shows_the_amqp_url() {
    let secret = Secret::new();
    let url = format!("amqp://evh-help:{}@127.0.0.1:5672/%2f", secret.encoded());
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["help", "run"],
        &["run", "-h"],
        &["--version"],
    ] {
        let out = event_host(dir.path())
            .env("EVENT_HOST_AMQP_URL", &url)
            .env("EVENT_HOST_LOG", "trace")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        let mut text = out.stdout.clone();
        text.extend_from_slice(&out.stderr);
        let s = scan(&text[..], &secret.forms(), &["event-host"]);
        assert!(
            s.leaks.is_empty(),
            "{args:?} shows the password: {:?}",
            s.leaks
        );
        assert!(s.markers[0], "{args:?} printed something");
    }
}

#[test]
fn redact_hides_passwords_even_when_not_percent_encoded() {
    use event_host::broker::redact;
    let cases = [
        ("amqp://u:p4ss@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
        ("amqp://u:pa/ss@h/%2f", "amqp://u:***@h/%2f"),
        ("amqp://u:p@ss/w#rd@h/vh", "amqp://u:***@h/vh"),
        ("amqps://u:p?ss@h", "amqps://u:***@h"),
        ("u:p4ss@h:5672", "u:***@h:5672"),
        ("amqp://h:5672/%2f", "amqp://h:5672/%2f"),
        ("amqp://u@h/%2f", "amqp://u@h/%2f"),
    ];
    for (url, want) in cases {
        assert_eq!(redact(url), want, "{url}");
    }
}

/// GET `path` with an optional bearer token: (status, body).
fn get_with_token(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    crate::amqp_support::http_get_with(addr, path, auth.as_deref())
}

#[test]
fn the_admin_token_guards_everything_but_the_probes_and_metrics() {
    let inv = crate::amqp_support::Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let token = random_hex();
    let host = crate::amqp_support::TestHost::start(
        &["inventory"],
        &format!("admin_token = {token:?}\n{}", inv.config("")),
    );
    let addr = host.admin.as_str();
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get_with_token(addr, open, None).0, 200, "{open}");
    }
    // (No order ran yet: the state key is not there, a 404 past the guard.)
    for (guarded, authorized) in [("/handlers", 200), ("/state/inventory/stock.Laptop", 404)] {
        let (status, body) = get_with_token(addr, guarded, None);
        assert_eq!(status, 401, "{guarded}: {body}");
        assert!(body.contains("Bearer"), "a clear refusal: {body}");
        assert!(!body.contains(&token), "{body}");
        let (status, _) = get_with_token(addr, guarded, Some("wrong"));
        assert_eq!(status, 401, "{guarded} with a wrong token");
        let (status, _) = get_with_token(addr, guarded, Some(&format!("{token}x")));
        assert_eq!(status, 401, "{guarded} with a longer token");
        let (status, body) = get_with_token(addr, guarded, Some(&token));
        assert_eq!(status, authorized, "{guarded} with the token: {body}");
    }
    host.stop().unwrap();
}
