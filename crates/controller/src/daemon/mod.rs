//! `coalmine serve`: many rollouts, their state in SQLite, an HTTP API for the `apply`,
//! `status`, `promote`, `abort`, `pause`, `resume` and `history` clients.
//!
//! Mutating calls need the daemon's bearer token; reads are open. A restart on the same state
//! file resumes every unfinished rollout from its persisted phase and weight. Alertmanager's
//! webhook (`POST /api/v1/alertmanager`, same token) rolls back the rollouts whose
//! `rollbackOnAlerts` match a firing alert; `/metrics` shows every rollout to Prometheus.
//!
//! By concern: [`api`] (the HTTP API and its one error type), [`supervision`] (running and
//! keeping rollouts), [`alerts`] (Alertmanager's receiver), [`hosted`] (the processes and
//! routers `serve` runs itself), [`dashboard`] (what the web page at `/` reads of `serve`'s
//! rollouts; the page, its live updates and the sign-in gate are [`crate::dashboard`]'s).

mod alerts;
mod api;
mod dashboard;
mod groups;
mod hosted;
mod ofrep;
mod supervision;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::dashboard::{Gate, Live};
use crate::driver::now_ms;
use crate::lock::{LockError, StateLock};
use crate::state::sqlite::{Opened, Store, StoreError};
use crate::telemetry::Telemetry;

pub use crate::dashboard::ACTOR_HEADER;
pub use hosted::{HostedRouter, RouterHost};
pub use ofrep::AllowedOrigins;

pub struct DaemonConfig {
    pub api: SocketAddr,
    pub state: PathBuf,
    pub token: String,
    /// Runs the routers rollouts ask `serve` to host (`spec.router`); without one such
    /// rollouts are refused.
    pub router_host: Option<Arc<dyn RouterHost>>,
    /// Serve the API (and the dashboard) over TLS: its session cookie is then `Secure`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The web pages that may evaluate flags from a browser (OFREP's web SDKs).
    pub ofrep_origins: AllowedOrigins,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Locked(#[from] LockError),
    /// The cause is in the message, not a `source`: shown once however it is printed.
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

struct Daemon {
    store: Store,
    /// How this daemon names itself to the routers it drives (with each rollout's name).
    controller: String,
    held: supervision::HeldSteps,
    /// The token, or a dashboard session signed in with it, opens every change.
    gate: Arc<Gate>,
    running: Mutex<HashMap<String, supervision::Running>>,
    /// The task deciding each rollout group, by name.
    groups: Mutex<HashMap<String, groups::SupervisedGroup>>,
    hosted: hosted::Hosted,
    telemetry: Arc<Telemetry>,
    /// What the dashboard's pages watch.
    live: Arc<Live>,
    ofrep_origins: AllowedOrigins,
}

/// Runs the daemon until `shutdown` resolves. Unfinished rollouts keep their state on disk and
/// resume when the daemon starts again; shutting down does not roll anything back.
pub async fn serve(
    config: DaemonConfig,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    // Before anything is read: a second daemon on this file must not even start.
    let since = crate::time::rfc3339(now_ms());
    let holder = |api: SocketAddr| format!("pid {}, api {api}, since {since}", std::process::id());
    let mut lock = StateLock::acquire(&config.state, &holder(config.api))?;
    let (store, opened) = Store::open(&config.state)?;
    if opened == Opened::Created {
        tracing::warn!(state = %config.state.display(), "created a new, empty state file");
    }
    let controller = format!(
        "coalmine serve {} on {}",
        store.controller_id()?,
        crate::host_name()
    );
    let daemon = Arc::new(Daemon {
        store,
        controller,
        held: Arc::new(Mutex::new(HashMap::new())),
        gate: Arc::new(Gate::new(config.token).over_tls(config.tls.is_some())),
        running: Mutex::new(HashMap::new()),
        groups: Mutex::new(HashMap::new()),
        hosted: hosted::Hosted::new(config.router_host),
        telemetry: Arc::new(Telemetry::default()),
        live: Arc::new(Live::default()),
        ofrep_origins: config.ofrep_origins,
    });
    daemon.resume_all().await?;
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .map_err(|cause| DaemonError::Listen {
            addr: config.api,
            cause,
        })?;
    let addr = listener.local_addr().map_err(|cause| DaemonError::Listen {
        addr: config.api,
        cause,
    })?;
    // The address actually bound (the configured one may be port 0).
    let _ = lock.describe(&holder(addr));
    ready(addr);
    let live = daemon.live.clone();
    let shutdown = async move {
        shutdown.await;
        // Open dashboards hold streams that never end by themselves.
        live.close();
    };
    let app = api::routes(daemon.clone());
    let served = match config.tls {
        Some(acceptor) => tls::serve(listener, acceptor, app, shutdown).await,
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    daemon.groups.lock().expect("groups").clear();
    for (_, running) in daemon.running.lock().expect("running").drain() {
        running.task.abort();
    }
    daemon.hosted.shut_down();
    served.map_err(|cause| DaemonError::Listen {
        addr: config.api,
        cause,
    })
}
