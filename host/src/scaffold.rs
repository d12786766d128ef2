//! `event-host new`: a handler project to start from, in Rust, Python or
//! JavaScript.
//!
//! The project carries the WIT this binary implements (embedded at build
//! time, so it always matches the host that generated it), a handler that
//! consumes the exchange asked for, a `build.sh` that writes
//! `<name>.wasm`, a sample `events.jsonl` routed to it, a `test.sh` that
//! builds, checks and replays it, and a README of five lines.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};

use crate::manifest::ExchangeKind;

/// The WIT files of the world `handler`, as this binary implements it.
const WIT: [(&str, &str); 4] = [
    ("wit/handler.wit", include_str!("../../wit/handler.wit")),
    (
        "wit/deps/config/config.wit",
        include_str!("../../wit/deps/config/config.wit"),
    ),
    (
        "wit/deps/keyvalue/keyvalue.wit",
        include_str!("../../wit/deps/keyvalue/keyvalue.wit"),
    ),
    (
        "wit/deps/logging/logging.wit",
        include_str!("../../wit/deps/logging/logging.wit"),
    ),
];

/// Files every project gets, whatever its language.
const COMMON: [(&str, &str); 2] = [
    ("test.sh", include_str!("../templates/common/test.sh")),
    ("README.md", include_str!("../templates/common/README.md")),
];

const RUST: [(&str, &str); 3] = [
    ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
    ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
    ("build.sh", include_str!("../templates/rust/build.sh")),
];

const PYTHON: [(&str, &str); 2] = [
    ("app.py", include_str!("../templates/python/app.py")),
    ("build.sh", include_str!("../templates/python/build.sh")),
];

const JAVASCRIPT: [(&str, &str); 2] = [
    ("app.js", include_str!("../templates/javascript/app.js")),
    ("build.sh", include_str!("../templates/javascript/build.sh")),
];

/// The language of a new handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with wit-bindgen (needs cargo and the wasm32-wasip2 target).
    Rust,
    /// Python with componentize-py (installed by `build.sh` from PyPI).
    Python,
    /// JavaScript with componentize-js (installed by `build.sh` from npm).
    Javascript,
}

/// What the new handler consumes: `EXCHANGE[:KIND[:BINDING-KEY]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Exchange name.
    pub exchange: String,
    /// Its kind (default fanout).
    pub kind: ExchangeKind,
    /// One binding key (none: the empty key).
    pub binding_key: Option<String>,
}

impl FromStr for Subscribe {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let exchange = parts.next().unwrap_or_default().to_owned();
        if exchange.is_empty() || exchange.len() > 255 || exchange.starts_with("amq.") {
            return Err(format!(
                "--subscribe {s:?}: name an exchange (1 to 255 bytes, not amq.*), as EXCHANGE[:KIND[:BINDING-KEY]]"
            ));
        }
        let kind = match parts.next() {
            None | Some("") => ExchangeKind::Fanout,
            Some(kind) => serde_json::from_value(serde_json::Value::String(kind.to_owned()))
                .map_err(|_| {
                    format!("--subscribe {s:?}: the kind is fanout, direct, topic or headers, not {kind:?}")
                })?,
        };
        let binding_key = parts.next().map(str::to_owned);
        Ok(Self {
            exchange,
            kind,
            binding_key,
        })
    }
}

impl Subscribe {
    /// A sample event this subscription routes: its routing key and, on a
    /// headers exchange, the headers its binding asks for.
    fn sample_event(&self, body: &str) -> String {
        let key = self.binding_key.as_deref().unwrap_or("");
        let (routing_key, headers) = match self.kind {
            ExchangeKind::Fanout => (String::new(), serde_json::Map::new()),
            ExchangeKind::Direct => (key.to_owned(), serde_json::Map::new()),
            // A word for each wildcard: `#` may stand for one word too.
            ExchangeKind::Topic => (
                key.split('.')
                    .map(|w| if w == "*" || w == "#" { "sample" } else { w })
                    .collect::<Vec<_>>()
                    .join("."),
                serde_json::Map::new(),
            ),
            ExchangeKind::Headers => (
                String::new(),
                key.split(',')
                    .filter_map(|pair| pair.trim().split_once('='))
                    .filter(|(k, _)| *k != "x-match")
                    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
                    .collect(),
            ),
        };
        let mut line = serde_json::json!({
            "exchange": self.exchange,
            "routing_key": routing_key,
            "payload": serde_json::from_str::<serde_json::Value>(body)
                .unwrap_or_else(|_| serde_json::Value::String(body.to_owned())),
        });
        if !headers.is_empty() {
            line["properties"] = serde_json::json!({ "headers": headers });
        }
        line.to_string()
    }
}

/// Write a new handler project into `dir` (which must be absent or
/// empty), named after the folder. Returns the files written.
pub fn create(dir: &Path, lang: Lang, subscribe: &Subscribe) -> Result<Vec<PathBuf>> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: the folder's name names the handler", dir.display()))?
        .to_owned();
    crate::manifest::validate_name(&name)
        .with_context(|| format!("{}: the folder's name is the handler's", dir.display()))?;
    if dir.exists()
        && dir
            .read_dir()
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", dir.display());
    }
    let binding_keys = |quote: fn(&str) -> String| {
        subscribe
            .binding_key
            .as_deref()
            .map(quote)
            .unwrap_or_default()
    };
    let kind = subscribe.kind.as_str();
    let kind_title = format!("{}{}", kind[..1].to_uppercase(), &kind[1..]);
    let (source, build_needs) = match lang {
        Lang::Rust => (
            "src/lib.rs",
            " (needs cargo; adds the wasm32-wasip2 target)",
        ),
        Lang::Python => (
            "app.py",
            " (needs python3; installs componentize-py from PyPI into a cache once)",
        ),
        Lang::Javascript => (
            "app.js",
            " (needs node and npm; installs componentize-js from npm into a cache once)",
        ),
    };
    let vars: Vec<(&str, String)> = vec![
        ("name", name.clone()),
        // Cargo takes no `.` in a package name, and names the cdylib
        // after the package with `-` as `_`.
        ("package", name.replace('.', "-")),
        ("artifact", name.replace(['.', '-'], "_")),
        ("exchange", subscribe.exchange.clone()),
        ("kind", kind.to_owned()),
        ("kind_rust", kind_title.clone()),
        ("kind_python", kind.to_uppercase()),
        (
            "binding_keys_rust",
            binding_keys(|k| format!("{:?}.into()", k)),
        ),
        ("binding_keys_python", binding_keys(|k| format!("{k:?}"))),
        (
            "binding_keys_js",
            binding_keys(|k| serde_json::Value::String(k.to_owned()).to_string()),
        ),
        ("source", source.to_owned()),
        ("build_needs", build_needs.to_owned()),
    ];
    let fill = |template: &str| {
        vars.iter().fold(template.to_owned(), |text, (key, value)| {
            text.replace(&format!("{{{{{key}}}}}"), value)
        })
    };
    let events = format!(
        "{}\n{}\n",
        subscribe.sample_event(r#"{"hello": "world"}"#),
        subscribe.sample_event("not json"),
    );
    let own: &[(&str, &str)] = match lang {
        Lang::Rust => &RUST,
        Lang::Python => &PYTHON,
        Lang::Javascript => &JAVASCRIPT,
    };
    let mut files: Vec<(&str, String)> = WIT.iter().map(|(p, t)| (*p, (*t).to_owned())).collect();
    files.extend(COMMON.iter().chain(own).map(|(p, t)| (*p, fill(t))));
    files.push(("events.jsonl", events));
    let mut written = Vec::new();
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        if path.extension().is_some_and(|e| e == "sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", path.display()))?;
        }
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_are_exchange_kind_and_binding_key() {
        let s: Subscribe = "orders".parse().unwrap();
        assert_eq!(
            s,
            Subscribe {
                exchange: "orders".into(),
                kind: ExchangeKind::Fanout,
                binding_key: None
            }
        );
        let s: Subscribe = "events:topic:order.*.eu".parse().unwrap();
        assert_eq!(s.kind, ExchangeKind::Topic);
        assert_eq!(s.binding_key.as_deref(), Some("order.*.eu"));
        // A binding key may hold colons.
        let s: Subscribe = "x:direct:a:b".parse().unwrap();
        assert_eq!(s.binding_key.as_deref(), Some("a:b"));
        for bad in ["", ":topic", "amq.topic", "x:nope"] {
            assert!(bad.parse::<Subscribe>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sample_events_are_routed_by_the_subscription() {
        let sample = |s: &str| -> serde_json::Value {
            serde_json::from_str(&s.parse::<Subscribe>().unwrap().sample_event("{}")).unwrap()
        };
        assert_eq!(sample("o")["routing_key"], "");
        assert_eq!(sample("o:direct:k")["routing_key"], "k");
        assert_eq!(
            sample("o:topic:order.*.#")["routing_key"],
            "order.sample.sample"
        );
        let h = sample("o:headers:x-match=any,type=order");
        assert_eq!(
            h["properties"]["headers"],
            serde_json::json!({"type": "order"})
        );
    }

    #[test]
    fn a_project_is_named_after_its_folder_and_never_overwrites() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("stock-alerts");
        let files = create(&dir, Lang::Rust, &"orders".parse().unwrap()).unwrap();
        assert!(files.iter().any(|f| f.ends_with("wit/handler.wit")));
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains(r#"name: "stock-alerts".into()"#), "{lib}");
        assert!(lib.contains("ExchangeKind::Fanout"), "{lib}");
        assert!(!lib.contains("{{"), "every placeholder filled: {lib}");
        let build = std::fs::read_to_string(dir.join("build.sh")).unwrap();
        assert!(build.contains("stock_alerts.wasm") && build.contains("stock-alerts.wasm"));
        let err = create(&dir, Lang::Rust, &"orders".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        let err = create(
            &root.path().join("bad name"),
            Lang::Rust,
            &"o".parse().unwrap(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("handler"), "{err:#}");
    }
}
