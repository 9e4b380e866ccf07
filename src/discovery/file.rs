//! Discovery from a static YAML file, reloaded when the file changes.
//!
//! The file maps a process key to that process's settings; its `discovery`
//! entry is the record (the layout of the seed's examples):
//!
//! ```yaml
//! app1:
//!   discovery:
//!     name: app1
//!     metadata: { namespace_name: namespace-1, kind: app }
//!     gateway:
//!       - priority: 1
//!         address: tcp://10.0.0.1:1234
//!         match: { metadata: { namespace_name: namespace-1 } }
//! frontends:
//!   discovery: { name: frontends, type: group, node_list: [app1] }
//! ```
//!
//! A reload that fails (unreadable, bad YAML, an invalid record, no records at
//! all, as while a writer has truncated the file) is logged and ignored: the
//! last good content stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::{RecursiveMode, Watcher};
use serde::Deserialize;

use super::backend::Cache;
use super::{Discovery, DiscoveryError, GroupRecord, NodeRecord, Record, Subscription, TYPE_GROUP};

#[derive(Deserialize)]
struct ProcessEntry {
    discovery: Option<yaml_serde::Value>,
}

/// Parses a discovery file's text into records, in file order. Does not
/// validate them (see [`Record::validate`]).
pub fn parse_file(text: &str) -> Result<Vec<(String, Record)>, String> {
    let entries: yaml_serde::Mapping = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
    let mut records = Vec::new();
    for (key, value) in entries {
        let key = key.as_str().map(str::to_string).unwrap_or_else(|| format!("{key:?}"));
        let entry: ProcessEntry = yaml_serde::from_value(value).map_err(|e| format!("{key}: {e}"))?;
        let Some(discovery) = entry.discovery else {
            continue;
        };
        let is_group = discovery.get("type").and_then(|t| t.as_str()) == Some(TYPE_GROUP);
        let record = if is_group {
            Record::Group(
                yaml_serde::from_value::<GroupRecord>(discovery).map_err(|e| format!("{key}.discovery: {e}"))?,
            )
        } else {
            Record::Node(yaml_serde::from_value::<NodeRecord>(discovery).map_err(|e| format!("{key}.discovery: {e}"))?)
        };
        records.push((key, record));
    }
    Ok(records)
}

fn load(path: &Path) -> Result<Vec<Record>, DiscoveryError> {
    let text = std::fs::read_to_string(path).map_err(|source| DiscoveryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let records = parse_file(&text).map_err(|message| DiscoveryError::Parse {
        path: path.to_path_buf(),
        message,
    })?;
    let mut seen = BTreeMap::new();
    for (key, record) in &records {
        record.validate()?;
        if let Some(first) = seen.insert(record.name(), key) {
            return Err(DiscoveryError::Parse {
                path: path.to_path_buf(),
                message: format!("{key} and {first} both name record {:?}", record.name()),
            });
        }
    }
    drop(seen);
    Ok(records.into_iter().map(|(_, record)| record).collect())
}

/// Records published through the API by this process, kept across reloads.
type Local = Arc<Mutex<BTreeMap<String, Record>>>;

/// Discovery from a YAML file, watched for changes.
pub struct FileDiscovery {
    path: PathBuf,
    cache: Cache,
    local: Local,
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for FileDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDiscovery")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn reload(path: &Path, cache: &Cache, local: &Local) {
    match load(path) {
        // A writer truncates before it writes: an empty file is a file being
        // written, never a reason to forget every peer.
        Ok(records) if records.is_empty() => {
            tracing::warn!(path = %path.display(), "discovery file has no records; keeping the previous records")
        }
        Ok(mut records) => {
            let local = local.lock().unwrap_or_else(|p| p.into_inner());
            records.retain(|r| !local.contains_key(r.name()));
            records.extend(local.values().cloned());
            cache.replace_all(records);
            tracing::info!(path = %path.display(), "discovery file reloaded");
        }
        Err(err) => tracing::error!(%err, "discovery file not reloaded; keeping the previous records"),
    }
}

impl FileDiscovery {
    /// Loads `path` (it must be valid now) and watches it for changes.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DiscoveryError> {
        let path = std::path::absolute(path.as_ref()).map_err(|source| DiscoveryError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        })?;
        let cache = Cache::default();
        cache.replace_all(load(&path)?);
        let local: Local = Arc::default();
        let (watched_path, watched_cache, watched_local) = (path.clone(), cache.clone(), local.clone());
        let file_name = path.file_name().map(|n| n.to_os_string());
        // Editors replace files by renaming: watch the directory, filter by name.
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event)
                if event
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name) =>
            {
                if !event.kind.is_access() {
                    reload(&watched_path, &watched_cache, &watched_local);
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "discovery file watch error"),
        })
        .map_err(|e| DiscoveryError::Backend {
            backend: "file",
            message: format!("cannot watch {}: {e}", path.display()),
        })?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| DiscoveryError::Backend {
                backend: "file",
                message: format!("cannot watch {}: {e}", dir.display()),
            })?;
        Ok(Self {
            path,
            cache,
            local,
            _watcher: watcher,
        })
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Discovery for FileDiscovery {
    fn snapshot(&self) -> Vec<Record> {
        self.cache.snapshot()
    }

    fn get(&self, name: &str) -> Option<Record> {
        self.cache.get(name)
    }

    fn subscribe(&self) -> Subscription {
        self.cache.subscribe()
    }

    fn publish(&self, record: Record) -> Result<(), DiscoveryError> {
        record.validate()?;
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.name().to_string(), record.clone());
        self.cache.put(record);
        Ok(())
    }

    fn withdraw(&self, name: &str) -> Result<(), DiscoveryError> {
        self.local.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        self.cache.delete(name);
        Ok(())
    }
}
