//! The admin HTTP endpoint, on a control thread of its own (tokio, axum):
//! the data plane never waits on it.
//!
//! - `GET /metrics`: Prometheus text ([`super::Node::metrics_text`]);
//! - `GET /healthz`: 200 while the process serves HTTP at all;
//! - `GET /readyz`: 200 once the node is up, 503 while stopping;
//! - `GET /safe-to-delete`: 200 `yes` when nothing is queued or
//!   unacknowledged, else 409 with the reasons (a Kubernetes preStop hook
//!   polls it);
//! - `GET /connections`: JSON of the node's routes and counters;
//! - `GET /stats`: JSON of rates, loss and latency of the node and of each
//!   connection over the last 1, 5, 15 and 60 s ([`super::Node::stats_report`];
//!   `atbus stats` shows it live);
//! - `POST /clients?stream=N&ttl_s=S[&name=X][&relay_kind=K]`: allocates a
//!   client on an untrusted network ([`crate::grant`]) and answers its grant
//!   as JSON, token included: bind the endpoint where only operators reach
//!   it (`atbus token issue` calls it).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::{NodeError, Shared};

/// The running endpoint; dropping it (or [`AdminServer::stop`]) ends it.
#[derive(Debug)]
pub(super) struct AdminServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The bound address (port 0 resolved).
    pub address: SocketAddr,
}

impl AdminServer {
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A view of the node for handlers: the node's shared state, without
/// keeping it alive.
#[derive(Clone)]
struct Admin(Weak<Shared>);

impl Admin {
    fn node(&self) -> Option<Arc<Shared>> {
        self.0.upgrade()
    }
}

/// Binds `address` and serves until stopped.
pub(super) fn start(shared: &Arc<Shared>, address: SocketAddr) -> Result<AdminServer, NodeError> {
    let failed = |reason: String| NodeError::Config {
        field: "admin",
        reason: format!("{address}: {reason}"),
    };
    let listener = std::net::TcpListener::bind(address).map_err(|e| failed(e.to_string()))?;
    listener.set_nonblocking(true).map_err(|e| failed(e.to_string()))?;
    let bound = listener.local_addr().map_err(|e| failed(e.to_string()))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin = Admin(Arc::downgrade(shared));
    let thread = std::thread::Builder::new()
        .name(format!("atbus-{}-admin", shared.name))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!("admin endpoint: no runtime: {e}");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::error!("admin endpoint on {bound}: {e}");
                        return;
                    }
                };
                let app = Router::new()
                    .route("/metrics", get(metrics))
                    .route("/healthz", get(|| async { "ok\n" }))
                    .route("/readyz", get(readyz))
                    .route("/safe-to-delete", get(safe_to_delete))
                    .route("/connections", get(connections))
                    .route("/stats", get(stats))
                    .route("/clients", post(issue_client))
                    .with_state(admin);
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!("admin endpoint on {bound}: {e}");
                }
            });
        })
        .map_err(|e| failed(e.to_string()))?;
    tracing::info!(node = %shared.name, "admin endpoint on http://{bound}");
    Ok(AdminServer {
        stop: Some(stop_tx),
        thread: Some(thread),
        address: bound,
    })
}

async fn metrics(State(admin): State<Admin>) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let content_type = [("content-type", "text/plain; version=0.0.4; charset=utf-8")];
    match admin.node() {
        Some(node) => (StatusCode::OK, content_type, node.metrics_text()),
        None => (StatusCode::SERVICE_UNAVAILABLE, content_type, String::new()),
    }
}

async fn readyz(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    match admin.node() {
        Some(node) if node.is_ready() => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}

async fn safe_to_delete(State(admin): State<Admin>) -> (StatusCode, String) {
    let Some(node) = admin.node() else {
        return (StatusCode::OK, "yes: stopped\n".into());
    };
    // Asking the shards waits on them: off the async thread.
    let reasons = tokio::task::spawn_blocking(move || node.unsafe_to_delete(Duration::from_secs(2)))
        .await
        .unwrap_or_else(|e| vec![format!("check failed: {e}")]);
    if reasons.is_empty() {
        (StatusCode::OK, "yes\n".into())
    } else {
        (StatusCode::CONFLICT, format!("no: {}\n", reasons.join("; ")))
    }
}

async fn connections(State(admin): State<Admin>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let Some(node) = admin.node() else {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::Value::Null));
    };
    let stats = node.stats();
    let peers: Vec<serde_json::Value> = node
        .connected_peers()
        .into_iter()
        .map(|peer| {
            let route = match node.route_to(&peer) {
                Some(super::RouteInfo::Mem) => serde_json::json!({"kind": "mem"}),
                Some(super::RouteInfo::Dial(addresses)) => serde_json::json!({
                    "kind": "dial",
                    "addresses": addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
                Some(super::RouteInfo::Group(members)) => serde_json::json!({"kind": "group", "members": members}),
                None => serde_json::json!({"kind": "accepted"}),
            };
            serde_json::json!({"peer": peer, "route": route})
        })
        .collect();
    let listening: Vec<String> = node
        .listening
        .lock()
        .map(|l| l.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    let body = serde_json::json!({
        "node": &*node.name,
        "listening": listening,
        "connected": peers,
        "stats": {
            "connections_established": stats.connections_established,
            "connections_closed": stats.connections_closed,
            "bad_frames": stats.bad_frames,
            "handshake_failures": stats.handshake_failures,
            "auth_failures": stats.auth_failures,
            "e2e_failures": stats.e2e_failures,
            "messages_received": stats.messages_received,
            "queued": stats.queued,
        },
    });
    (StatusCode::OK, axum::Json(body))
}

/// `POST /clients` parameters.
#[derive(serde::Deserialize)]
struct ClientRequest {
    stream: i64,
    #[serde(default = "default_ttl")]
    ttl_s: u64,
    name: Option<String>,
    /// The client's relays: records of this `kind` (its `advertise_relay`).
    relay_kind: Option<String>,
}

fn default_ttl() -> u64 {
    3600
}

async fn issue_client(
    State(admin): State<Admin>,
    Query(request): Query<ClientRequest>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let Some(node) = admin.node() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": "the node stopped"})),
        );
    };
    let relay = request.relay_kind.map(|kind| crate::discovery::RelaySelector {
        name: String::new(),
        metadata: Some(crate::discovery::Metadata {
            kind,
            ..Default::default()
        }),
    });
    match node.issue_client(
        request.name.as_deref(),
        request.stream,
        Duration::from_secs(request.ttl_s),
        relay,
    ) {
        Ok(grant) => (StatusCode::OK, axum::Json(serde_json::json!(grant))),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": e.to_string()})),
        ),
    }
}

async fn stats(State(admin): State<Admin>) -> (StatusCode, axum::Json<serde_json::Value>) {
    match admin.node().map(|node| node.stats_report()) {
        Some(Some(report)) => (StatusCode::OK, axum::Json(serde_json::json!(report))),
        Some(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": "no sample yet (one a second)"})),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": "the node stopped"})),
        ),
    }
}
