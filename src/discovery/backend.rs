//! The `Discovery` interface, the record cache every backend keeps, and the
//! in-memory backend.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::{Record, ValidationError};

/// Changes a subscriber may have queued before it counts as lagging.
pub const SUBSCRIPTION_CAPACITY: usize = 4096;

/// One change to the set of records.
// Put is the common case; boxing it would add an allocation to every change.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A record appeared or changed.
    Put(Record),
    /// The record with this name is gone.
    Delete(String),
}

/// A stream of [`Change`]s. Bounded: a subscriber that falls more than
/// [`SUBSCRIPTION_CAPACITY`] changes behind loses changes and is told so by
/// [`Subscription::take_lagged`]; it then reloads from a snapshot.
#[derive(Debug)]
pub struct Subscription {
    rx: Receiver<Change>,
    lagged: Arc<AtomicBool>,
}

impl Subscription {
    /// Next change, if one is queued.
    pub fn try_recv(&self) -> Option<Change> {
        self.rx.try_recv().ok()
    }

    /// Next change, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Change> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The channel, for `select!` with other queues.
    pub fn receiver(&self) -> &Receiver<Change> {
        &self.rx
    }

    /// Whether changes were dropped since the last call (queue full).
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }
}

/// Why a discovery operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The record breaks the rules.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A discovery file could not be read.
    #[error("discovery file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A discovery file is not valid YAML of the expected shape.
    #[error("discovery file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its location.
        message: String,
    },
    /// The backend store failed or is unreachable.
    #[error("discovery backend {backend}: {message}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What happened.
        message: String,
    },
}

/// Service discovery, whatever the backend. Records are cached locally: reads
/// never wait on a remote store.
pub trait Discovery: Send + Sync {
    /// Every known record, in name order.
    fn snapshot(&self) -> Vec<Record>;
    /// The record with this name.
    fn get(&self, name: &str) -> Option<Record>;
    /// Changes from now on.
    fn subscribe(&self) -> Subscription;
    /// Publishes (or replaces) this process's own record.
    fn publish(&self, record: Record) -> Result<(), DiscoveryError>;
    /// Removes a record this process published (graceful stop).
    fn withdraw(&self, name: &str) -> Result<(), DiscoveryError>;
}

#[derive(Debug, Default)]
struct CacheInner {
    records: BTreeMap<String, Record>,
    subscribers: Vec<(Sender<Change>, Arc<AtomicBool>)>,
}

/// Records by name plus the subscribers to notify; shared by backends.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cache {
    inner: Arc<Mutex<CacheInner>>,
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, CacheInner> {
        // A panic while holding the lock cannot leave the map half-updated in
        // a way that matters more than losing discovery altogether.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn snapshot(&self) -> Vec<Record> {
        self.lock().records.values().cloned().collect()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Record> {
        self.lock().records.get(name).cloned()
    }

    pub(crate) fn subscribe(&self) -> Subscription {
        let (tx, rx) = crossbeam_channel::bounded(SUBSCRIPTION_CAPACITY);
        let lagged = Arc::new(AtomicBool::new(false));
        self.lock().subscribers.push((tx, lagged.clone()));
        Subscription { rx, lagged }
    }

    fn notify(inner: &mut CacheInner, change: Change) {
        inner
            .subscribers
            .retain(|(tx, lagged)| match tx.try_send(change.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    lagged.store(true, Ordering::Release);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
    }

    /// Stores `record`; notifies only if it changed.
    pub(crate) fn put(&self, record: Record) {
        let mut inner = self.lock();
        if inner.records.get(record.name()) == Some(&record) {
            return;
        }
        inner.records.insert(record.name().to_string(), record.clone());
        Self::notify(&mut inner, Change::Put(record));
    }

    pub(crate) fn delete(&self, name: &str) {
        let mut inner = self.lock();
        if inner.records.remove(name).is_some() {
            Self::notify(&mut inner, Change::Delete(name.to_string()));
        }
    }

    /// Makes the cache hold exactly `records`, notifying the differences.
    pub(crate) fn replace_all(&self, records: Vec<Record>) {
        let mut inner = self.lock();
        let mut fresh: BTreeMap<String, Record> = records.into_iter().map(|r| (r.name().to_string(), r)).collect();
        let gone: Vec<String> = inner
            .records
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            inner.records.remove(&name);
            Self::notify(&mut inner, Change::Delete(name));
        }
        for (name, record) in std::mem::take(&mut fresh) {
            if inner.records.get(&name) != Some(&record) {
                inner.records.insert(name, record.clone());
                Self::notify(&mut inner, Change::Put(record));
            }
        }
    }
}

/// Discovery driven through the API: the embedded default, for tests, demos
/// and single-process deployments. Share it (it is cheap to clone) between the
/// nodes that should see each other.
#[derive(Clone, Debug, Default)]
pub struct MemoryDiscovery {
    cache: Cache,
}

impl MemoryDiscovery {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Discovery for MemoryDiscovery {
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
        self.cache.put(record);
        Ok(())
    }

    fn withdraw(&self, name: &str) -> Result<(), DiscoveryError> {
        self.cache.delete(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{GroupRecord, NodeRecord};

    fn node(name: &str, custom: &str) -> Record {
        Record::Node(NodeRecord {
            name: name.into(),
            custom_data: custom.into(),
            ..Default::default()
        })
    }

    #[test]
    fn memory_publish_withdraw_notifies_changes_only() {
        let d = MemoryDiscovery::new();
        let sub = d.subscribe();
        d.publish(node("a", "1")).unwrap();
        d.publish(node("a", "1")).unwrap();
        d.publish(node("a", "2")).unwrap();
        d.withdraw("a").unwrap();
        d.withdraw("a").unwrap();
        let changes: Vec<Change> = std::iter::from_fn(|| sub.try_recv()).collect();
        assert_eq!(
            changes,
            vec![
                Change::Put(node("a", "1")),
                Change::Put(node("a", "2")),
                Change::Delete("a".into())
            ]
        );
        assert!(matches!(
            d.publish(node("Bad Name", "")),
            Err(DiscoveryError::Invalid(_))
        ));
        let group = Record::Group(GroupRecord {
            name: "g".into(),
            r#type: "group".into(),
            node_list: vec!["a".into()],
            ..Default::default()
        });
        d.publish(group.clone()).unwrap();
        assert_eq!(d.get("g"), Some(group));
    }

    #[test]
    fn slow_subscriber_is_told_it_lagged() {
        let d = MemoryDiscovery::new();
        let sub = d.subscribe();
        for i in 0..SUBSCRIPTION_CAPACITY + 10 {
            d.publish(node("a", &i.to_string())).unwrap();
        }
        assert!(sub.take_lagged());
        assert!(!sub.take_lagged());
        drop(sub);
        d.publish(node("b", "")).unwrap();
        assert_eq!(d.snapshot().len(), 2);
    }

    #[test]
    fn replace_all_diffs() {
        let cache = Cache::default();
        cache.replace_all(vec![node("a", ""), node("b", "")]);
        let sub = cache.subscribe();
        cache.replace_all(vec![node("b", "x"), node("c", "")]);
        let changes: Vec<Change> = std::iter::from_fn(|| sub.try_recv()).collect();
        assert_eq!(
            changes,
            vec![
                Change::Delete("a".into()),
                Change::Put(node("b", "x")),
                Change::Put(node("c", ""))
            ]
        );
    }
}
