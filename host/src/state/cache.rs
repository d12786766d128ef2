//! The SQLite backend's read cache and key filter.
//!
//! Safe only because the embedded store is one process's alone (see
//! `Sqlite::open`): nothing else can change a committed value under it.
//! Shared state has no such cache — another host may write any key at any
//! time.

use anyhow::{Context, Result};
use foldhash::HashMap;
use growable_bloom_filter::GrowableBloom;
use rusqlite::Connection;

use super::sqlite::read_kv;

/// Committed values this process read or wrote, so that the hot path — a
/// handler reading a key, then the commit validating that read — costs a
/// hash lookup instead of two SQLite statements. Every write goes through
/// `Sqlite::commit`, which updates the cache after its transaction
/// commits, and no other process can write the file while this one holds
/// it (see `Sqlite::open`), so the cache is never stale.
#[derive(Default)]
pub(super) struct ReadCache {
    /// Namespace → key → committed value (`None`: absent).
    pub(super) entries: HashMap<String, HashMap<String, Option<Vec<u8>>>>,
    /// Approximate bytes held, to bound the cache.
    bytes: usize,
    /// Every (namespace, key) the kv table may hold: a read of a key it
    /// does not contain is answered "absent" without asking SQLite. Most
    /// reads of absent keys are of keys never written — a handler's "have
    /// I seen this order?" — and each would otherwise cost a B-tree
    /// descent. Built from the table at open and fed every committed
    /// write; deletes stay in it (a false "maybe" only costs the lookup).
    /// `None` when the state holds more keys than it is kept for.
    keys: Option<GrowableBloom>,
    /// Reads that went to SQLite (for tests of the cache and the filter).
    pub(super) sqlite_reads: u64,
}

impl ReadCache {
    /// Keys the filter is kept for (about 1.2 bytes each at its 1% false
    /// positive rate: ~20 MiB at the bound). A state holding more is read
    /// through SQLite for absent keys as well, as it would be without it.
    const MAX_FILTERED_KEYS: usize = 16_000_000;

    /// A cache over the kv table behind `conn`, with the key filter built
    /// from every key it holds (when there are not too many).
    pub(super) fn over(conn: &Connection) -> Result<Self> {
        let count: i64 = conn
            .query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
            .context("counting state keys")?;
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let keys = if count > Self::MAX_FILTERED_KEYS {
            None
        } else {
            let mut filter = GrowableBloom::new(0.01, (count * 2).max(100_000));
            let mut stmt = conn.prepare("SELECT ns, key FROM kv")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let (ns, key): (String, String) = (row.get(0)?, row.get(1)?);
                filter.insert((ns.as_str(), key.as_str()));
            }
            Some(filter)
        };
        Ok(Self {
            keys,
            ..Self::default()
        })
    }

    /// Bound on what the cache holds. Past it the cache starts over: hot
    /// keys come back at once, and the memory stays bounded whatever the
    /// handlers store.
    const MAX_BYTES: usize = 64 << 20;
    /// Rough per-entry overhead of the maps, for the bound.
    const ENTRY_OVERHEAD: usize = 64;

    /// The committed value of `key`: from the cache, else from SQLite
    /// through `conn` (the store's connection, or its open transaction),
    /// and then cached.
    pub(super) fn read(
        &mut self,
        conn: &Connection,
        ns: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        if let Some(value) = self.entries.get(ns).and_then(|keys| keys.get(key)) {
            return Ok(value.clone());
        }
        if self.keys.as_ref().is_some_and(|f| !f.contains((ns, key))) {
            // Never written: absent, and not worth a cache entry (the
            // filter answers again as cheaply).
            return Ok(None);
        }
        self.sqlite_reads += 1;
        let value = read_kv(conn, ns, key)?;
        self.insert(ns, key, value.clone());
        Ok(value)
    }

    /// A committed write (or delete, `None`) of `key`. A cached key gets
    /// its new value; an uncached one stays uncached: the hot keys are the
    /// ones read before they are written (a stock level), while a key only
    /// written (a dedupe record) would fill the cache for nothing.
    pub(super) fn committed(&mut self, ns: &str, key: &str, value: Option<&[u8]>) {
        if value.is_some() {
            if let Some(filter) = &mut self.keys {
                filter.insert((ns, key));
                if filter.len() > Self::MAX_FILTERED_KEYS {
                    self.keys = None;
                }
            }
        }
        let cached = self.entries.get_mut(ns).and_then(|keys| keys.get_mut(key));
        if let Some(cached) = cached {
            let old = cached.as_ref().map_or(0, Vec::len);
            let new = value.map_or(0, <[u8]>::len);
            *cached = value.map(<[u8]>::to_vec);
            self.bytes = (self.bytes + new).saturating_sub(old);
        }
    }

    fn insert(&mut self, ns: &str, key: &str, value: Option<Vec<u8>>) {
        let size = key.len() + value.as_ref().map_or(0, Vec::len) + Self::ENTRY_OVERHEAD;
        if self.bytes + size > Self::MAX_BYTES {
            self.entries.clear();
            self.bytes = 0;
        }
        let keys = match self.entries.get_mut(ns) {
            Some(keys) => keys,
            None => self.entries.entry(ns.to_owned()).or_default(),
        };
        self.bytes += size;
        if let Some(old) = keys.insert(key.to_owned(), value) {
            let old = key.len() + old.map_or(0, |v| v.len()) + Self::ENTRY_OVERHEAD;
            self.bytes = self.bytes.saturating_sub(old);
        }
    }
}
