//! Command-line interface: argument parsing and the `check` and `replay`
//! commands. `main` only calls [`run`].

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::runtime::Runtime;
use crate::state::StateStore;

/// event-host: RabbitMQ events through hot-reloadable WebAssembly handlers.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `event_host=debug`.
    /// The default leaves lapin out: it logs every channel the broker closes
    /// at ERROR, including the host's own probes for exchanges that do not
    /// exist yet, and every broker error that matters is reported by the
    /// host with its context. `--log info` brings lapin's lines back.
    #[arg(
        long,
        global = true,
        env = "EVENT_HOST_LOG",
        default_value = "info,lapin=off"
    )]
    pub log: String,
    /// Log format.
    #[arg(long, global = true, env = "EVENT_HOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar: consume from RabbitMQ and dispatch to the handlers.
    ///
    /// Settings come from the config file, then `EVENT_HOST_*` environment
    /// variables, then these flags (later wins).
    Run {
        /// Host config file (TOML).
        #[arg(long, env = "EVENT_HOST_CONFIG")]
        config: Option<PathBuf>,
        /// Folder of handler `.wasm` files [default: handlers].
        #[arg(long)]
        handlers_dir: Option<PathBuf>,
        /// State folder [default: state].
        #[arg(long)]
        state: Option<PathBuf>,
        /// AMQP URL [default: the local broker as guest]. Also
        /// EVENT_HOST_AMQP_URL; its password is never printed.
        #[arg(long)]
        amqp_url: Option<String>,
        /// Admin HTTP address [default: 127.0.0.1:9090].
        #[arg(long)]
        admin_addr: Option<String>,
    },
    /// Ask a running host whether it is ready (`/readyz` on its admin
    /// address): exit 0 when it is, 1 with the reason when not. For
    /// container healthchecks, where there is no curl.
    Health {
        /// Host config file (TOML), for its `admin_addr`.
        #[arg(long, env = "EVENT_HOST_CONFIG")]
        config: Option<PathBuf>,
        /// Admin HTTP address [default: the config's, else 127.0.0.1:9090].
        /// Also EVENT_HOST_ADMIN_ADDR.
        #[arg(long)]
        admin_addr: Option<String>,
        /// Ask `/healthz` (the process answers) instead of `/readyz` (it
        /// consumes every handler's queue).
        #[arg(long)]
        live: bool,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Start a handler project in DIR (named after it): the WIT, a
    /// handler, build.sh, a sample events.jsonl, test.sh and a README.
    New {
        /// The project folder (absent or empty); its name is the handler's.
        dir: PathBuf,
        /// The handler's language (javascript: componentize-js, with the
        /// WASI HTTP it bundles left out).
        #[arg(long, value_enum, default_value_t = crate::scaffold::Lang::Rust)]
        lang: crate::scaffold::Lang,
        /// What it consumes: EXCHANGE[:KIND[:BINDING-KEY]], KIND one of
        /// fanout (default), direct, topic, headers.
        #[arg(long, default_value = "events")]
        subscribe: crate::scaffold::Subscribe,
    },
    /// A handler's dead letters: look at them, send them back.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        action: DlqAction,
        /// Host config file (TOML): the broker, the handler's queue, the
        /// state (whose secret signs what goes back).
        #[arg(long, env = "EVENT_HOST_CONFIG", global = true)]
        config: Option<PathBuf>,
    },
    /// Validate a handler component and print its manifest as JSON.
    Check {
        /// The `.wasm` file.
        file: PathBuf,
        /// Keep compiled code here, and reuse it: a large component (a
        /// Python one takes ~20 s) compiles once, not every time.
        #[arg(long, env = "EVENT_HOST_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Run handlers over a JSON-lines file of events, with no broker.
    Replay {
        /// Folder of handler `.wasm` files.
        #[arg(long)]
        handlers: PathBuf,
        /// JSON-lines events: {"exchange", "routing_key", "payload", "properties"}.
        #[arg(long)]
        events: PathBuf,
        /// Host config file (per-handler config, limits).
        #[arg(long, env = "EVENT_HOST_CONFIG")]
        config: Option<PathBuf>,
        /// State folder to use and keep; without it state is in memory.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Keep compiled code here, and reuse it (as `check`).
        #[arg(long, env = "EVENT_HOST_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
}

/// `event-host dlq` actions.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Show the oldest dead letters: reason, attempts, version, when, and
    /// the start of the payload. They stay in the queue.
    List {
        /// The handler (its manifest name).
        handler: String,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to the handler's work queue: attempts reset,
    /// message id, exchange and routing key kept. Each leaves the DLQ only
    /// once the broker confirmed its copy.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["all", "message_id", "reason_prefix"])))]
    Redrive {
        /// The handler (its manifest name).
        handler: String,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Those with this message id.
        #[arg(long)]
        message_id: Option<String>,
        /// Those whose reason starts with this text.
        #[arg(long)]
        reason_prefix: Option<String>,
        /// At most this many a second (spare the handler a flood).
        #[arg(long)]
        rate: Option<f64>,
    },
}

/// Parse arguments, set up logging, run the command.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and why, outermost context first.
            // Any URL in it is redacted: a config file error quotes the
            // offending line, which may be the `amqp_url` one.
            eprintln!(
                "error: {}",
                redact_urls(&format!("{e:#}").replace('\n', "; "))
            );
            ExitCode::FAILURE
        }
    }
}

/// The config file at `path` (the defaults without one).
fn file_config(path: Option<PathBuf>) -> Result<Config> {
    match path {
        Some(path) => Config::load(&path),
        None => Ok(Config::default()),
    }
}

/// [`file_config`] with the `EVENT_HOST_*` environment over it: what `run`
/// sees, and so what the commands that reach a running deployment
/// (`health`, `dlq`) must see too.
fn deployed_config(path: Option<PathBuf>) -> Result<Config> {
    let mut config = file_config(path)?;
    config.apply_env()?;
    Ok(config)
}

fn async_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `event-host dlq`: straight to the broker, signing with the state's
/// secret (a running host is not needed).
async fn dlq_command(config: &Config, action: DlqAction) -> Result<()> {
    let handler = match &action {
        DlqAction::List { handler, .. } | DlqAction::Redrive { handler, .. } => handler.clone(),
    };
    let queue = config
        .handlers
        .get(&handler)
        .and_then(|h| h.queue.clone())
        .unwrap_or_else(|| handler.clone());
    let topology = crate::broker::Topology::of_queue(&queue);
    let conn = crate::broker::connect(&config.amqp_url, config.heartbeat_secs).await?;
    match action {
        DlqAction::List { limit, json, .. } => {
            let listing = crate::dlq::list(&conn, &handler, &topology, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", crate::dlq::render(&handler, &listing));
            }
        }
        DlqAction::Redrive {
            all,
            message_id,
            reason_prefix,
            rate,
            ..
        } => {
            let filter = match (all, message_id, reason_prefix) {
                (_, Some(id), _) => crate::dlq::Filter::MessageId(id),
                (_, _, Some(prefix)) => crate::dlq::Filter::ReasonPrefix(prefix),
                _ => crate::dlq::Filter::All,
            };
            let config = config.clone();
            let secret = tokio::task::spawn_blocking(move || state_secret(&config))
                .await
                .context("reading the host secret")??;
            let signer = crate::broker::RetrySigner::new(secret);
            let done = crate::dlq::redrive(
                &conn,
                &handler,
                &topology,
                &signer,
                &filter,
                rate,
                |moved| {
                    if moved % 100 == 0 {
                        eprintln!("{moved} sent back so far");
                    }
                },
            )
            .await?;
            println!(
                "{handler}: {} sent back to {queue:?}; left in {:?}: {} not matching, {} not signed by this fleet (refused outputs, or copies from before signing)",
                done.moved, topology.dlq, done.skipped, done.unsigned
            );
        }
    }
    let _ = conn.close(200, crate::broker::short("done")).await;
    Ok(())
}

/// The secret the hosts on `config`'s state sign with: from the shared
/// database, or the file an embedded host keeps beside its own.
fn state_secret(config: &Config) -> Result<[u8; 32]> {
    if config.state_url.as_ref().is_some_and(|u| !u.0.is_empty()) {
        return StateStore::from_config(config)?.host_secret();
    }
    crate::state::secret_from_file(&config.state_path)
}

/// `text` with the password of every `scheme://user:password@host` in it
/// hidden (see [`crate::broker::redact`]). A URL runs to the next
/// whitespace or quote.
fn redact_urls(text: &str) -> String {
    let is_scheme = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = rest[..i]
            .char_indices()
            .rev()
            .find(|&(_, c)| !is_scheme(c))
            .map_or(0, |(j, c)| j + c.len_utf8());
        let end = rest[i + 3..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
            .map_or(rest.len(), |j| i + 3 + j);
        out.push_str(&rest[..start]);
        out.push_str(&crate::broker::redact(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.finish().with(HideCredentials).init(),
        LogFormat::Json => builder.json().finish().with(HideCredentials).init(),
    }
}

/// Drops the trace events in which lapin prints a frame carrying the
/// broker credentials. At `trace` lapin logs every frame it writes
/// (`lapin::io_loop`, "will write to buffer") with its `Debug` form, and
/// `Connection.StartOk` holds the SASL PLAIN response `\0user\0password`
/// as a byte list, so the password would be one `--log trace` away.
/// `SecureOk` and `UpdateSecret` carry credentials the same way.
struct HideCredentials;

impl HideCredentials {
    /// `Debug` text of the frames and internal commands that carry secrets.
    const MARKERS: [&'static str; 3] = ["StartOk {", "SecureOk {", "UpdateSecret"];
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for HideCredentials {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if !event.metadata().target().starts_with("lapin") {
            return true;
        }
        struct Find(bool);
        impl tracing::field::Visit for Find {
            fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if !self.0 {
                    let text = format!("{value:?}");
                    self.0 = HideCredentials::MARKERS.iter().any(|m| text.contains(m));
                }
            }
        }
        let mut found = Find(false);
        event.record(&mut found);
        !found.0
    }
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Run {
            config,
            handlers_dir,
            state,
            amqp_url,
            admin_addr,
        } => {
            let mut config = deployed_config(config)?;
            if let Some(v) = handlers_dir {
                config.handlers_dir = v;
            }
            if let Some(v) = state {
                config.state_path = v;
            }
            if let Some(v) = amqp_url {
                config.amqp_url = v;
            }
            if let Some(v) = admin_addr {
                config.admin_addr = v;
            }
            let rt = async_runtime()?;
            rt.block_on(crate::server::run(config, shutdown_signal()))
        }
        Command::Health {
            config,
            admin_addr,
            live,
            timeout_secs,
        } => {
            let config = deployed_config(config)?;
            let addr = admin_addr.unwrap_or(config.admin_addr);
            let path = if live { "/healthz" } else { "/readyz" };
            let (status, body) = crate::admin::probe(
                &addr,
                path,
                std::time::Duration::from_secs(timeout_secs.max(1)),
            )?;
            if status != 200 {
                anyhow::bail!("{path} on {addr}: {status} {body}");
            }
            println!("{path} on {addr}: {body}");
            Ok(())
        }
        Command::New {
            dir,
            lang,
            subscribe,
        } => {
            crate::scaffold::create(&dir, lang, &subscribe)?;
            println!(
                "created {}: ./build.sh builds it, ./test.sh checks and replays it (see its README.md)",
                dir.display()
            );
            Ok(())
        }
        Command::Dlq { action, config } => {
            let config = deployed_config(config)?;
            let rt = async_runtime()?;
            rt.block_on(dlq_command(&config, action))
        }
        Command::Check { file, cache_dir } => {
            let config = Config {
                cache_dir,
                ..Config::default()
            };
            let runtime = Runtime::new(config.runtime.clone())?;
            let version = crate::handler::load_file(&runtime, &config, &file)?;
            runtime.wait_for_cache_writes();
            let out = serde_json::json!({
                "file": file,
                "sha256": version.sha256,
                "manifest": version.declared,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Replay {
            handlers,
            events,
            config,
            state,
            cache_dir,
        } => {
            let mut config = file_config(config)?;
            if cache_dir.is_some() {
                config.cache_dir = cache_dir;
            }
            let runtime = Arc::new(Runtime::new(config.runtime.clone())?);
            let loaded = crate::handler::load_dir(&runtime, &config, &handlers)?;
            runtime.wait_for_cache_writes();
            let store = match state {
                Some(dir) => StateStore::open(&dir, config.durability)?,
                None => StateStore::in_memory()?,
            };
            let dispatcher = Dispatcher::new(runtime, store);
            let file = std::fs::File::open(&events)
                .with_context(|| format!("opening events file {}", events.display()))?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let summary =
                crate::replay::replay(&dispatcher, &loaded, BufReader::new(file), &mut out)?;
            tracing::info!(
                invocations = summary.invocations,
                unroutable = summary.unroutable,
                "replay finished"
            );
            Ok(())
        }
    }
}
