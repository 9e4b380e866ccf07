//! Discovery in etcd: one key per record (`<prefix><name>`, value a protobuf
//! `discovery_record`), attached to a lease this process keeps alive, so a
//! record disappears when its process dies. Every process watches the prefix
//! and keeps a local cache.
//!
//! etcd-client needs tokio: it runs on a dedicated control thread with a
//! current-thread runtime; the rest of the process talks to it through a
//! bounded queue and reads the shared cache. An etcd outage never clears the
//! cache: known peers stay reachable. After it, the thread reconnects (with
//! backoff), grants a new lease, puts this process's records again, reads the
//! whole prefix and watches from there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use prost::Message;
use tokio::sync::mpsc;

use super::backend::Cache;
use super::{Discovery, DiscoveryError, DiscoveryRecord, Record, Subscription};

/// Commands the control thread accepts at once before `publish` fails.
const COMMAND_QUEUE: usize = 256;

/// Settings of the etcd backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix of every record.
    pub prefix: String,
    /// Lease time to live: how long a dead process's records survive it.
    pub ttl: Duration,
    /// Timeout of connecting and of each request.
    pub timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/atbus/discovery/".into(),
            ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl EtcdConfig {
    /// Checks the settings, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        let bad = |message: String| DiscoveryError::Backend {
            backend: "etcd",
            message,
        };
        if self.endpoints.is_empty() {
            return Err(bad("etcd.endpoints is empty".into()));
        }
        if self.prefix.is_empty() {
            return Err(bad("etcd.prefix is empty".into()));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(bad(format!("etcd.ttl {:?} is below one second", self.ttl)));
        }
        Ok(())
    }
}

enum Command {
    Publish(Box<Record>),
    Withdraw(String),
    Shutdown,
}

/// Connection state, for readiness checks.
#[derive(Debug, Default)]
struct Status {
    /// Own records are in etcd under a live lease and the watch is running.
    registered: AtomicBool,
}

/// Discovery backed by etcd.
pub struct EtcdDiscovery {
    cache: Cache,
    own: Arc<Mutex<BTreeMap<String, Record>>>,
    commands: mpsc::Sender<Command>,
    status: Arc<Status>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("registered", &self.is_registered())
            .finish_non_exhaustive()
    }
}

impl EtcdDiscovery {
    /// Starts the control thread. Returns at once: the first connection
    /// happens in the background (see [`EtcdDiscovery::wait_registered`]).
    pub fn start(config: EtcdConfig) -> Result<Self, DiscoveryError> {
        config.validate()?;
        let cache = Cache::default();
        let own: Arc<Mutex<BTreeMap<String, Record>>> = Arc::default();
        let status = Arc::new(Status::default());
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DiscoveryError::Backend {
                backend: "etcd",
                message: format!("cannot start the control runtime: {e}"),
            })?;
        let worker = Worker {
            config,
            cache: cache.clone(),
            own: own.clone(),
            status: status.clone(),
            commands: rx,
            stale: BTreeSet::new(),
        };
        let thread = std::thread::Builder::new()
            .name("atbus-etcd".into())
            .spawn(move || runtime.block_on(worker.run()))
            .map_err(|e| DiscoveryError::Backend {
                backend: "etcd",
                message: format!("cannot start the control thread: {e}"),
            })?;
        Ok(Self {
            cache,
            own,
            commands,
            status,
            thread: Some(thread),
        })
    }

    /// Whether this process's records are in etcd and the watch is running.
    pub fn is_registered(&self) -> bool {
        self.status.registered.load(Ordering::Acquire)
    }

    /// Waits until registered, at most `timeout`.
    pub fn wait_registered(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_registered() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn command(&self, command: Command) -> Result<(), DiscoveryError> {
        self.commands.try_send(command).map_err(|e| DiscoveryError::Backend {
            backend: "etcd",
            message: format!("control queue ({COMMAND_QUEUE} commands) unavailable: {e}"),
        })
    }

    /// Graceful stop: withdraws this process's records (revoking the lease)
    /// and ends the control thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // A full queue still ends the thread: dropping the sender closes it.
            let _ = self.commands.try_send(Command::Shutdown);
            let _ = thread.join();
        }
    }
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Discovery for EtcdDiscovery {
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
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.name().to_string(), record.clone());
        self.cache.put(record.clone());
        self.command(Command::Publish(Box::new(record)))
    }

    fn withdraw(&self, name: &str) -> Result<(), DiscoveryError> {
        self.own.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        self.cache.delete(name);
        self.command(Command::Withdraw(name.to_string()))
    }
}

fn encode(record: &Record) -> Vec<u8> {
    DiscoveryRecord {
        record: Some(record.clone()),
    }
    .encode_to_vec()
}

fn decode(value: &[u8]) -> Option<Record> {
    DiscoveryRecord::decode(value).ok()?.record
}

/// Why a session with etcd ended.
enum End {
    Shutdown,
    Lost(String),
}

struct Worker {
    config: EtcdConfig,
    cache: Cache,
    own: Arc<Mutex<BTreeMap<String, Record>>>,
    status: Arc<Status>,
    commands: mpsc::Receiver<Command>,
    /// Names withdrawn while disconnected, to delete on reconnection.
    stale: BTreeSet<String>,
}

impl Worker {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.config.prefix)
    }

    fn own_records(&self) -> Vec<Record> {
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session().await {
                End::Shutdown => return,
                End::Lost(reason) => {
                    self.status.registered.store(false, Ordering::Release);
                    tracing::warn!(%reason, retry_in = ?backoff, "etcd unavailable; keeping the cached records");
                }
            }
            // Wait out the backoff, still taking commands (they only touch the
            // own-record set, which the next session puts).
            let deadline = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    command = self.commands.recv() => match command {
                        None | Some(Command::Shutdown) => return,
                        Some(Command::Withdraw(name)) => {
                            self.stale.insert(name);
                        }
                        Some(Command::Publish(record)) => {
                            self.stale.remove(record.name());
                        }
                    },
                }
            }
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// One connection's lifetime: register, sync, watch, serve commands.
    async fn session(&mut self) -> End {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.config.timeout)
            .with_timeout(self.config.timeout);
        let mut client = match Client::connect(&self.config.endpoints, Some(options)).await {
            Ok(client) => client,
            Err(e) => return End::Lost(format!("connect: {e}")),
        };
        let ttl = self.config.ttl.as_secs().max(1) as i64;
        let lease = match client.lease_grant(ttl, None).await {
            Ok(lease) => lease.id(),
            Err(e) => return End::Lost(format!("lease grant: {e}")),
        };
        let (mut keeper, mut keepalive) = match client.lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => return End::Lost(format!("lease keep-alive: {e}")),
        };
        // Records withdrawn while etcd was away still sit under the old lease.
        for name in std::mem::take(&mut self.stale) {
            if let Err(e) = client.delete(self.key(&name), None).await {
                self.stale.insert(name);
                return End::Lost(format!("delete: {e}"));
            }
        }
        for record in self.own_records() {
            let key = self.key(record.name());
            if let Err(e) = client
                .put(key, encode(&record), Some(PutOptions::new().with_lease(lease)))
                .await
            {
                return End::Lost(format!("put: {e}"));
            }
        }
        let snapshot = match client
            .get(self.config.prefix.as_bytes(), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(snapshot) => snapshot,
            Err(e) => return End::Lost(format!("get: {e}")),
        };
        let revision = snapshot.header().map_or(0, |h| h.revision());
        let records: Vec<Record> = snapshot.kvs().iter().filter_map(|kv| decode(kv.value())).collect();
        self.cache.replace_all(records);
        let mut watch = match client
            .watch(
                self.config.prefix.as_bytes(),
                Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)),
            )
            .await
        {
            Ok(watch) => watch,
            Err(e) => return End::Lost(format!("watch: {e}")),
        };
        self.status.registered.store(true, Ordering::Release);
        tracing::info!(lease, revision, "registered in etcd");

        let mut refresh = tokio::time::interval(self.config.ttl / 3);
        loop {
            tokio::select! {
                _ = refresh.tick() => {
                    if let Err(e) = keeper.keep_alive().await {
                        return End::Lost(format!("keep-alive: {e}"));
                    }
                }
                answer = keepalive.message() => match answer {
                    Ok(Some(answer)) if answer.ttl() > 0 => {}
                    Ok(Some(_)) => return End::Lost("lease expired".into()),
                    Ok(None) => return End::Lost("keep-alive stream closed".into()),
                    Err(e) => return End::Lost(format!("keep-alive: {e}")),
                },
                message = watch.message() => match message {
                    Ok(Some(response)) => {
                        if response.canceled() {
                            return End::Lost(format!("watch canceled: {}", response.cancel_reason()));
                        }
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            match event.event_type() {
                                EventType::Put => match decode(kv.value()) {
                                    Some(record) => self.cache.put(record),
                                    None => tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "undecodable discovery record ignored"),
                                },
                                EventType::Delete => {
                                    let key = String::from_utf8_lossy(kv.key());
                                    if let Some(name) = key.strip_prefix(&self.config.prefix) {
                                        self.cache.delete(name);
                                    }
                                }
                            }
                        }
                    }
                    Ok(None) => return End::Lost("watch stream closed".into()),
                    Err(e) => return End::Lost(format!("watch: {e}")),
                },
                command = self.commands.recv() => match command {
                    Some(Command::Publish(record)) => {
                        let key = self.key(record.name());
                        if let Err(e) = client.put(key, encode(&record), Some(PutOptions::new().with_lease(lease))).await {
                            return End::Lost(format!("put: {e}"));
                        }
                    }
                    Some(Command::Withdraw(name)) => {
                        if let Err(e) = client.delete(self.key(&name), None).await {
                            return End::Lost(format!("delete: {e}"));
                        }
                    }
                    None | Some(Command::Shutdown) => {
                        // Graceful stop: revoking the lease deletes every own key now.
                        let _ = tokio::time::timeout(self.config.timeout, client.lease_revoke(lease)).await;
                        self.status.registered.store(false, Ordering::Release);
                        return End::Shutdown;
                    }
                },
            }
        }
    }
}
