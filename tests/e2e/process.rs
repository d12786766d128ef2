//! The real `event-host` binary as a child process, for tests that need
//! signals (SIGTERM, SIGKILL) or the whole process's output.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use crate::amqp_support::{free_port, http_get};

/// How long a host may take to compile its guests and get ready (at
/// `trace`, Cranelift's own traces make the first compile slow).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long to wait for any other sign of life in the log.
const LOG_TIMEOUT: Duration = Duration::from_secs(60);

/// GET `path` from an admin endpoint: the status code, 0 if unreachable.
pub fn http_status(addr: &str, path: &str) -> u16 {
    http_get(addr, path).0
}

/// Reads a growing log file line by line from where it left off.
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    carry: Vec<u8>,
}

impl LogTail {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            offset: 0,
            carry: Vec::new(),
        }
    }

    /// Complete lines written since the last call.
    pub fn new_lines(&mut self) -> Vec<String> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        self.offset += buf.len() as u64;
        self.carry.extend_from_slice(&buf);
        let Some(last) = self.carry.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let rest = self.carry.split_off(last + 1);
        let done = std::mem::replace(&mut self.carry, rest);
        String::from_utf8_lossy(&done)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// Run `cmd` to its end: whether it succeeded, its stdout and its stderr.
pub fn run_to_end(mut cmd: Command) -> (bool, String, String) {
    let out = cmd.output().expect("the command starts");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `event-host` binary with a clean environment: no inherited
/// `EVENT_HOST_*` settings, no colours, run from `cwd`.
pub fn event_host(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_event-host"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EVENT_HOST_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .current_dir(cwd);
    // The run's state backend, for a host whose state folder is the usual
    // `state` beside its config.
    crate::backend::apply_env(&mut cmd, &cwd.join("state"));
    cmd
}

/// A running host whose stdout and stderr both go to one log file. Killed
/// if still running when dropped (a failed assertion mid-scenario).
pub struct Run {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
    pub admin: String,
}

impl Run {
    pub fn start(name: &'static str, dir: &Path, mut cmd: Command) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let admin = format!("127.0.0.1:{}", free_port());
        cmd.args(["--admin-addr", &admin])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd.spawn().expect("starting event-host");
        Self {
            name,
            child,
            log,
            admin,
        }
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{}: event-host exited early ({status}); log: {}",
                self.name,
                self.log.display()
            );
        }
    }

    /// Wait until /readyz answers 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while http_status(&self.admin, "/readyz") != 200 {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{}: host not ready in time; log: {}",
                self.name,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until `n` log lines contain `needle` (counting from the start).
    pub fn wait_log(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + LOG_TIMEOUT;
        let mut tail = LogTail::new(&self.log);
        let mut count = 0;
        loop {
            count += tail
                .new_lines()
                .iter()
                .filter(|l| l.contains(needle))
                .count();
            if count >= n {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{}: no {n} log lines with {needle:?} in time; log: {}",
                self.name,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then wait for a graceful exit.
    pub fn terminate(mut self) -> PathBuf {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.wait_exit();
        assert!(
            status.success(),
            "{}: event-host did not stop cleanly on SIGTERM ({status})",
            self.name
        );
        self.log.clone()
    }

    /// Wait for the host to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + LOG_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: event-host did not exit in time",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Run {
    /// A handler's counters from `/handlers` (`Null` when unreachable).
    pub fn counters(&self, handler: &str) -> serde_json::Value {
        let (_, body) = http_get(&self.admin, "/handlers");
        serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .unwrap_or_default()
            .into_iter()
            .find(|h| h["name"] == handler)
            .map(|h| h["counters"].clone())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Wait until `handler`'s `counter` reaches `n`.
    pub fn wait_counter(&mut self, handler: &str, counter: &str, n: u64) {
        let deadline = Instant::now() + LOG_TIMEOUT;
        while self.counters(handler)[counter].as_u64().unwrap_or(0) < n {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{}: {handler}.{counter} never reached {n}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}
