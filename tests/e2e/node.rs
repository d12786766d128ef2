//! A RabbitMQ node of a test's own, for tests that stop, restart or cut the
//! broker: they must never disturb the shared broker other tests use, nor
//! leave it stopped when they fail.
//!
//! [`PrivateBroker::start`] runs `rabbitmq-server` (the scripts the Debian
//! package installs under `/usr/lib/rabbitmq/bin`, or whatever
//! `rabbitmq-server` is on `PATH`; `EVENT_HOST_RABBITMQ_SBIN` overrides) as
//! a second node on this machine:
//!
//! - its own node name (`evh-<pid>-<n>@localhost`), AMQP port and
//!   distribution port, picked free;
//! - its own config file (the system one names port 5672), an empty
//!   `rabbitmq-env.conf` (the system one names the shared node) and an
//!   empty enabled-plugins file (no management listener to clash);
//! - data, logs, pid file and a `HOME` holding its own Erlang cookie in a
//!   temporary folder; as root the node runs as the `rabbitmq` user and the
//!   folder is chowned to it, as the package does it;
//! - `rabbitmqctl` runs with the same `HOME`, so the cookies match.
//!
//! Dropping it (also while a failing test unwinds) halts the node and
//! removes the folder. A watchdog process does the same if the test
//! process dies without unwinding (SIGKILL, Ctrl-C).
//!
//! A machine without RabbitMQ fails the test with a clear message; it does
//! not pass silently.

#![allow(dead_code)] // each test uses a subset

use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a node may take to accept AMQP after starting (about 4-7 s on
/// a 2-core machine; more when tests run in parallel).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A RabbitMQ node of the test's own.
pub struct PrivateBroker {
    node: String,
    port: u16,
    dist_port: u16,
    sbin: PathBuf,
    /// Run the node and `rabbitmqctl` as this uid/gid (the `rabbitmq`
    /// user, when the tests run as root).
    user: Option<(u32, u32)>,
    server: Option<Child>,
    watchdog: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

fn fail(what: impl std::fmt::Display) -> ! {
    panic!(
        "cannot run a private RabbitMQ node for this test: {what}\n\
         These tests stop, restart and cut a broker of their own, a second node \
         started from the `rabbitmq-server` package (Debian/Ubuntu: \
         `apt-get install rabbitmq-server`; CI installs it). \
         Set EVENT_HOST_RABBITMQ_SBIN to the folder holding `rabbitmq-server` and \
         `rabbitmqctl` if they are installed elsewhere."
    )
}

/// Where `rabbitmq-server` and `rabbitmqctl` are. The Debian `/usr/sbin`
/// wrappers switch to the `rabbitmq` user with its own `HOME` (and so its
/// cookie), hence the real scripts are preferred.
fn sbin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("EVENT_HOST_RABBITMQ_SBIN") {
        return Some(PathBuf::from(dir));
    }
    let debian = Path::new("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() {
        return Some(debian.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("rabbitmq-server"))
        .find(|p| p.exists())
        .and_then(|p| fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_owned))
}

/// uid and gid of a user, from `/etc/passwd`.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.split(':').next() == Some(name))?;
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| fail(format!("no free port: {e}")))
}

/// Two distinct free ports: AMQP and Erlang distribution (given
/// explicitly, not derived from the AMQP port as RabbitMQ would).
fn two_free_ports() -> (u16, u16) {
    loop {
        let (a, b) = (free_port(), free_port());
        if a != b {
            return (a, b);
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl PrivateBroker {
    /// Start a node and wait until it accepts AMQP connections. Panics,
    /// with the reason and the node's output, when it cannot.
    pub fn start() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let Some(sbin) = sbin_dir() else {
            fail("`rabbitmq-server` is not installed (not in /usr/lib/rabbitmq/bin nor on PATH)")
        };
        for tool in ["rabbitmq-server", "rabbitmqctl"] {
            if !sbin.join(tool).exists() {
                fail(format!("{} does not exist", sbin.join(tool).display()));
            }
        }
        let root = fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        let user = if root { user_ids("rabbitmq") } else { None };
        let node = format!(
            "evh-{}-{}@localhost",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let (port, dist_port) = two_free_ports();
        let dir = tempfile::Builder::new()
            .prefix("evh-rabbit-")
            .tempdir()
            .unwrap_or_else(|e| fail(format!("no temporary folder: {e}")));
        let d = dir.path();
        let setup = || -> std::io::Result<()> {
            for sub in ["mnesia", "log", "home"] {
                fs::create_dir(d.join(sub))?;
            }
            fs::write(
                d.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.1 = 127.0.0.1:{port}\n\
                     loopback_users.guest = true\n\
                     disk_free_limit.absolute = 10MB\n"
                ),
            )?;
            fs::write(d.join("rabbitmq-env.conf"), "")?;
            fs::write(d.join("enabled_plugins"), "")?;
            fs::write(d.join("node.out"), "")?;
            let cookie = d.join("home/.erlang.cookie");
            fs::write(
                &cookie,
                format!("EVH{}{port}{dist_port}COOKIE", std::process::id()),
            )?;
            fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
            if let Some((uid, gid)) = user {
                for entry in walk(d)? {
                    std::os::unix::fs::chown(&entry, Some(uid), Some(gid))?;
                }
            }
            Ok(())
        };
        if let Err(e) = setup() {
            fail(format!("preparing {}: {e}", d.display()));
        }
        let mut broker = Self {
            node,
            port,
            dist_port,
            sbin,
            user,
            server: None,
            watchdog: None,
            dir: Some(dir),
        };
        broker.spawn_server();
        broker.spawn_watchdog();
        broker.wait_amqp(START_TIMEOUT);
        broker
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("node folder").path()
    }

    /// Environment shared by the node and `rabbitmqctl`: nothing inherited
    /// but `PATH`, so a developer's `RABBITMQ_*` settings cannot point
    /// either of them at the shared node.
    fn command(&self, program: &str) -> Command {
        let d = self.dir();
        let mut cmd = Command::new(self.sbin.join(program));
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("HOME", d.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .current_dir(d);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn spawn_server(&mut self) {
        let d = self.dir().to_owned();
        let out = fs::OpenOptions::new()
            .append(true)
            .open(d.join("node.out"))
            .unwrap();
        let mut cmd = self.command("rabbitmq-server");
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("rabbitmq.pid"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own process group: a Ctrl-C meant for the tests does not
            // reach it half-way; the watchdog stops it instead.
            .process_group(0);
        match cmd.spawn() {
            Ok(child) => self.server = Some(child),
            Err(e) => fail(format!(
                "running {}: {e}",
                self.sbin.join("rabbitmq-server").display()
            )),
        }
    }

    /// A shell that outlives this process if it dies without unwinding and
    /// then halts the node and removes its folder.
    fn spawn_watchdog(&mut self) {
        let server = self.server.as_ref().map(Child::id).unwrap_or(0);
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
             HOME='{home}' '{ctl}' -n '{node}' stop >/dev/null 2>&1; \
             sleep 2; kill -9 {server} 2>/dev/null; rm -rf '{dir}'",
            me = std::process::id(),
            home = self.dir().join("home").display(),
            ctl = self.sbin.join("rabbitmqctl").display(),
            node = self.node,
            dir = self.dir().display(),
        );
        self.watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
    }

    /// The node's name (`evh-<pid>-<n>@localhost`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Its AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its AMQP URL (guest/guest, default vhost).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node's output and the end of its log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let log = self.dir().join("log").join(format!("{}.log", self.node));
        format!(
            "--- {} output ---\n{}\n--- log ---\n{}",
            self.node,
            tail(&self.dir().join("node.out"), 20),
            tail(&log, 30)
        )
    }

    /// Wait until the node completes an AMQP handshake.
    pub fn wait_amqp(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = self.url();
        loop {
            if let Some(server) = self.server.as_mut() {
                if let Ok(Some(status)) = server.try_wait() {
                    fail(format!(
                        "node {} exited ({status}) while starting\n{}",
                        self.node,
                        self.diagnostics()
                    ));
                }
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let connected = rt.block_on(async {
                    match tokio::time::timeout(
                        Duration::from_secs(5),
                        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
                    )
                    .await
                    {
                        Ok(Ok(conn)) => {
                            let _ = conn.close(200, "probe".into()).await;
                            true
                        }
                        _ => false,
                    }
                });
                if connected {
                    return;
                }
            }
            if Instant::now() > deadline {
                fail(format!(
                    "node {} did not accept AMQP on port {} within {timeout:?}\n{}",
                    self.node,
                    self.port,
                    self.diagnostics()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `rabbitmqctl -n <node> args…`, its standard output; panics when it
    /// fails.
    pub fn rabbitmqctl(&self, args: &[&str]) -> String {
        match self.try_rabbitmqctl(args) {
            Ok(out) => out,
            Err(e) => panic!("{e}"),
        }
    }

    /// `rabbitmqctl -n <node> args…`: standard output, or an error with
    /// everything it said.
    pub fn try_rabbitmqctl(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running rabbitmqctl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "rabbitmqctl -n {} {args:?} failed ({}):\n{stdout}\n{}",
                self.node,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Rows of a `rabbitmqctl list_*` command, tab-separated fields.
    pub fn list(&self, command: &str, fields: &[&str]) -> Vec<Vec<String>> {
        let mut args = vec![command, "-q", "--no-table-headers"];
        args.extend_from_slice(fields);
        self.rabbitmqctl(&args)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect()
    }

    /// Stop the RabbitMQ application (the Erlang node stays up): every
    /// connection is closed and the port stops accepting.
    pub fn stop_app(&self) {
        self.rabbitmqctl(&["stop_app"]);
    }

    /// Start the application again and wait until it accepts AMQP.
    pub fn start_app(&mut self) {
        self.rabbitmqctl(&["start_app"]);
        self.wait_amqp(START_TIMEOUT);
    }

    /// Close every client connection (in the default vhost).
    pub fn close_all_connections(&self) {
        self.rabbitmqctl(&["close_all_connections", "event-host fault test"]);
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if let Some(mut server) = self.server.take() {
            let _ = self.try_rabbitmqctl(&["stop"]);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match server.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = server.kill();
                        let _ = server.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        // The TempDir removes the folder (data, logs, cookie).
        drop(self.dir.take());
    }
}

/// A folder and everything under it.
fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_owned()];
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}
