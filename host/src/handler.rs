//! Loading handler files into ready-to-run handler versions.
//!
//! A [`HandlerVersion`] is immutable: a new file produces a new version, and
//! events already running keep the `Arc` of the version they started on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::bindings::HandlerPre;
use crate::broker::Topology;
use crate::config::{Config, HandlerSettings};
use crate::guest::GuestState;
use crate::manifest::Manifest;
use crate::runtime::Runtime;

/// One loaded version of a handler.
pub struct HandlerVersion {
    /// Handler name (from the manifest).
    pub name: Arc<str>,
    /// sha256 of the file, hex: the version identity.
    pub sha256: String,
    /// The file it came from.
    pub path: PathBuf,
    /// The manifest as the component declared it.
    pub declared: Manifest,
    /// Effective settings (manifest with config overrides, limits).
    pub settings: HandlerSettings,
    /// Ready-to-instantiate component.
    pub pre: HandlerPre<GuestState>,
    /// Its queue names (retry queues depend on its max attempts).
    pub topology: Topology,
    /// Whether the compiled code came from the cache.
    pub cached: bool,
}

impl std::fmt::Debug for HandlerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerVersion")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl HandlerVersion {
    /// Short version id for logs and output (first 12 hex digits).
    pub fn short_version(&self) -> &str {
        &self.sha256[..12]
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Load, validate and prepare one handler file, through the compiled-code
/// cache only when the config names one (`cache_dir`): one-shot commands
/// (`check`, `replay`) leave no files behind unless asked to.
pub fn load_file(runtime: &Runtime, config: &Config, path: &Path) -> Result<HandlerVersion> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    load_bytes(runtime, config, path, &bytes, config.cache_dir.as_deref())
}

/// Load a handler from bytes already read from `path`, reusing and filling
/// the compiled-code cache folder `cache` when given (the serving host
/// does; one-shot commands do not leave files behind).
pub fn load_bytes(
    runtime: &Runtime,
    config: &Config,
    path: &Path,
    bytes: &[u8],
    cache: Option<&Path>,
) -> Result<HandlerVersion> {
    let sha256 = sha256_hex(bytes);
    let (prepared, cached) = runtime
        .prepare_cached(bytes, cache.map(|dir| (dir, sha256.as_str())))
        .with_context(|| format!("{} is not a usable handler", path.display()))?;
    let settings = config
        .resolve(&prepared.manifest)
        .with_context(|| format!("configuring {}", path.display()))?;
    Ok(HandlerVersion {
        name: prepared.manifest.name.as_str().into(),
        sha256,
        path: path.to_owned(),
        declared: prepared.manifest,
        topology: Topology::new(&settings.broker),
        settings,
        pre: prepared.pre,
        cached,
    })
}

/// The `.wasm` files of a handlers folder, in name order. Dot-files are
/// skipped: they are the documented place for a file being written before
/// it is renamed into place.
pub fn wasm_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("reading handlers folder {}", dir.display()))?
    {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if !hidden && path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Load every handler in a folder; any bad file or duplicate name fails
/// the whole load with every reason listed.
pub fn load_dir(
    runtime: &Runtime,
    config: &Config,
    dir: &Path,
) -> Result<Vec<Arc<HandlerVersion>>> {
    let mut loaded: Vec<Arc<HandlerVersion>> = Vec::new();
    let mut errors = Vec::new();
    for path in wasm_files(dir)? {
        match load_file(runtime, config, &path) {
            Ok(v) => {
                if let Some(other) = loaded.iter().find(|o| o.name == v.name) {
                    errors.push(format!(
                        "{} and {} both declare handler {:?}",
                        other.path.display(),
                        path.display(),
                        v.name
                    ));
                } else {
                    loaded.push(Arc::new(v));
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(loaded)
}
