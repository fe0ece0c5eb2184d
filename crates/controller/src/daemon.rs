//! `coalmine serve`: many rollouts, their state in SQLite, an HTTP API for the `apply`,
//! `status`, `promote`, `abort`, `pause`, `resume` and `history` clients.
//!
//! Mutating calls need the daemon's bearer token; reads are open. A restart on the same state
//! file resumes every unfinished rollout from its persisted phase and weight. Alertmanager's
//! webhook (`POST /api/v1/alertmanager`, same token) rolls back the rollouts whose
//! `rollbackOnAlerts` match a firing alert; `/metrics` shows every rollout to Prometheus.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use coalmine_rollout::{Event, EventLevel, Input, Outcome, Phase, Status};
use coalmine_router::{RouterConfig, RouterHandle, RoutesDoc, UpstreamUrl};
use coalmine_spec::documents::{self, Document};
use coalmine_spec::rollout::{HttpUrl, Rollout, Target};

use crate::driver::{now_ms, Driver, Sink};
use crate::processes::ManagedProcess;
use crate::report::{event_json, status_json};
use crate::store::{Store, StoreError};
use crate::telemetry::Telemetry;

pub struct DaemonConfig {
    pub api: SocketAddr,
    pub state: PathBuf,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Running {
    run: i64,
    /// `analysis.rollbackOnAlerts` of the running spec.
    rollout: Arc<Rollout>,
    control: mpsc::Sender<Input>,
    task: tokio::task::JoinHandle<()>,
}

/// A router `serve` runs itself for a rollout (`spec.router`).
struct HostedRouter {
    listen: String,
    handle: RouterHandle,
}

struct Daemon {
    store: Store,
    token: String,
    running: Mutex<HashMap<String, Running>>,
    routers: Mutex<HashMap<String, HostedRouter>>,
    /// Processes started for `command` targets, by rollout. Held across awaits (starting one
    /// waits for its readiness), hence tokio's mutex.
    processes: tokio::sync::Mutex<HashMap<String, Versions>>,
    telemetry: Arc<Telemetry>,
}

/// The processes serving one rollout's versions.
#[derive(Default)]
struct Versions {
    stable: Option<ManagedProcess>,
    canary: Option<ManagedProcess>,
}

/// Persists every step of one run.
struct StoreSink {
    store: Store,
    name: String,
    run: i64,
    telemetry: Arc<Telemetry>,
    /// Whether this run's outcome has been counted (a resumed run may have ended before).
    counted: bool,
}

impl Sink for StoreSink {
    fn record(&mut self, status: &Status, events: &[Event]) {
        if let Err(e) = self.store.record(&self.name, self.run, status, events) {
            tracing::error!(rollout = %self.name, "could not persist a step: {e}");
        }
        self.telemetry.observe(&self.name, status);
        if let (Some(outcome), false) = (status.outcome, self.counted) {
            let seconds = now_ms().saturating_sub(status.started_ms) as f64 / 1000.0;
            self.telemetry.finished(&self.name, outcome, seconds);
            self.counted = true;
        }
        for e in events {
            tracing::info!(rollout = %self.name, phase = e.phase.as_str(), weight = e.weight, "{}", e.message);
        }
    }
}

/// Runs the daemon until `shutdown` resolves. Unfinished rollouts keep their state on disk and
/// resume when the daemon starts again; shutting down does not roll anything back.
pub async fn serve(
    config: DaemonConfig,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let store = Store::open(&config.state)?;
    let daemon = Arc::new(Daemon {
        store,
        token: config.token,
        running: Mutex::new(HashMap::new()),
        routers: Mutex::new(HashMap::new()),
        processes: tokio::sync::Mutex::new(HashMap::new()),
        telemetry: Arc::new(Telemetry::default()),
    });
    daemon.resume_all().await?;
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.api,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: config.api,
            source,
        })?;
    ready(addr);
    let mutating = Router::new()
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/rollouts/{name}/{command}", post(command))
        .route("/api/v1/alertmanager", post(alertmanager))
        .route_layer(middleware::from_fn_with_state(
            daemon.clone(),
            require_token,
        ));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/rollouts", get(list))
        .route("/api/v1/rollouts/{name}", get(one))
        .route("/api/v1/rollouts/{name}/history", get(history))
        .merge(mutating)
        .with_state(daemon.clone());
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    for (_, running) in daemon.running.lock().expect("running").drain() {
        running.task.abort();
    }
    for (_, hosted) in daemon.routers.lock().expect("routers").drain() {
        hosted.handle.shutdown();
    }
    served.map_err(|source| DaemonError::Listen {
        addr: config.api,
        source,
    })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn require_token(State(d): State<Arc<Daemon>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), d.token.as_bytes()) => {
            next.run(req).await
        }
        _ => {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "this call needs the daemon's token: Authorization: Bearer TOKEN",
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
            resp
        }
    }
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct ApplyRequest {
    /// The documents, a file each: Rollouts and the MetricTemplates they use.
    files: Vec<SourceFile>,
    /// Start a new run even if the document is unchanged (retry a failed release).
    #[serde(default)]
    restart: bool,
}

#[derive(Deserialize)]
struct SourceFile {
    file: String,
    text: String,
}

async fn apply(State(d): State<Arc<Daemon>>, Json(req): Json<ApplyRequest>) -> Response {
    let files: Vec<(String, String)> = req.files.into_iter().map(|f| (f.file, f.text)).collect();
    let names = files
        .iter()
        .map(|f| f.0.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let set = match documents::load(&files).and_then(|set| set.require_runnable().map(|()| set)) {
        Ok(set) => set,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let mut rollouts = Vec::new();
    for located in set.rollouts() {
        match &located.doc {
            Document::Rollout(r) => rollouts.push(r.clone()),
            Document::Canary(c) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{}:{}: Canary {:?}: `coalmine convert` it into a Rollout first (Kubernetes would say where its traffic goes)", located.file, located.line, c.metadata.name),
                )
            }
            _ => {}
        }
    }
    if rollouts.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{names}: no Rollout to apply"),
        );
    }
    // Everything is checked before anything changes: a bad document leaves running rollouts be.
    for r in &rollouts {
        if let Err(e) = check_runnable(r) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{names}: {}: {e}", r.metadata.name),
            );
        }
    }
    let mut applied = Vec::new();
    for rollout in rollouts {
        let name = rollout.metadata.name.clone();
        let result = d.apply_one(rollout, req.restart).await;
        match result {
            Ok(action) => applied.push(json!({"name": name, "action": action})),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}")),
        }
    }
    Json(json!({"applied": applied, "warnings": set.warnings})).into_response()
}

/// What `Driver::new` would refuse, found without starting anything.
fn check_runnable(r: &Rollout) -> Result<(), String> {
    for (field, target) in [("stable", &r.spec.stable), ("canary", &r.spec.canary)] {
        if target.is_none() {
            return Err(format!(
                "spec.{field}: give the version's url or command (only `coalmine simulate` runs without)"
            ));
        }
    }
    if r.spec.routers.is_empty() && r.spec.router.is_none() {
        return Err(
            "spec.routers: list at least one router admin address, or host one with spec.router"
                .into(),
        );
    }
    if let Some(hosted) = &r.spec.router {
        hosted
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("spec.router.listen: {e}"))?;
    }
    Ok(())
}

impl Daemon {
    async fn resume_all(self: &Arc<Self>) -> Result<(), StoreError> {
        for stored in self.store.all()? {
            self.telemetry
                .observe(&stored.rollout.metadata.name, &stored.status);
            let unfinished = !stored.status.phase.is_final();
            if unfinished || !stored.settled {
                let name = stored.rollout.metadata.name.clone();
                tracing::info!(rollout = %name, phase = stored.status.phase.as_str(), "resuming");
                if let Err(e) = self
                    .spawn(stored.rollout, Some(stored.status), stored.run)
                    .await
                {
                    tracing::error!(rollout = %name, "cannot resume: {e}");
                }
            }
        }
        Ok(())
    }

    async fn apply_one(
        self: &Arc<Self>,
        rollout: Rollout,
        restart: bool,
    ) -> Result<&'static str, String> {
        let name = rollout.metadata.name.clone();
        let existing = self.store.get(&name).map_err(|e| e.to_string())?;
        let action = match &existing {
            Some(old) if old.rollout == rollout && !restart => return Ok("unchanged"),
            Some(old) if !old.status.phase.is_final() => "restarted",
            Some(_) => "started",
            None => "created",
        };
        // Started (processes ready) before the old run stops: a failure leaves the old run be.
        let driver = self.driver(&rollout, None).await?;
        if let Some(old) = self.running.lock().expect("running").remove(&name) {
            old.task.abort();
        }
        let message = match action {
            "restarted" => "New revision applied: analysis restarted from the beginning",
            _ => "Rollout applied",
        };
        let event = Event {
            time_ms: now_ms(),
            level: EventLevel::Info,
            phase: Phase::Initializing,
            weight: 0,
            message: message.into(),
        };
        let run = self
            .store
            .start_run(&rollout, driver.status(), &[event])
            .map_err(|e| e.to_string())?;
        self.launch(rollout, driver, run);
        Ok(action)
    }

    /// A driver for the rollout, with its processes ready and its hosted router (if any)
    /// started and added.
    async fn driver(&self, rollout: &Rollout, status: Option<Status>) -> Result<Driver, String> {
        let mut effective = rollout.clone();
        let name = &rollout.metadata.name;
        {
            let mut processes = self.processes.lock().await;
            let versions = processes.entry(name.clone()).or_default();
            if let Some(Target::Command {
                command,
                readiness,
                env,
            }) = &rollout.spec.stable
            {
                // The stable process is kept across runs (after a promotion it is the canary
                // process of the run before).
                if versions
                    .stable
                    .as_ref()
                    .is_none_or(|p| &p.command != command)
                {
                    let started = ManagedProcess::start(command, env, readiness)
                        .await
                        .map_err(|e| format!("spec.stable: {e}"))?;
                    versions.stable = Some(started);
                }
            }
            if let Some(Target::Command {
                command,
                readiness,
                env,
            }) = &rollout.spec.canary
            {
                let started = ManagedProcess::start(command, env, readiness)
                    .await
                    .map_err(|e| format!("spec.canary: {e}"))?;
                versions.canary = Some(started);
            }
            for (process, target) in [
                (&versions.stable, &mut effective.spec.stable),
                (&versions.canary, &mut effective.spec.canary),
            ] {
                if let (Some(p), Some(Target::Command { .. })) = (process, &*target) {
                    *target = Some(Target::Url(HttpUrl::parse(&p.url)?));
                }
            }
        }
        if let Some(hosted) = &rollout.spec.router {
            let admin = self.hosted_router(&effective, &hosted.listen, hosted.admin.as_deref())?;
            effective.spec.routers.push(admin);
        }
        Driver::new(&effective, status).map_err(|e| e.to_string())
    }

    /// The run ended: the version that lost stops serving.
    async fn retire_processes(&self, name: &str, outcome: Outcome) {
        let mut processes = self.processes.lock().await;
        if let Some(versions) = processes.get_mut(name) {
            match outcome {
                Outcome::Promoted => versions.stable = versions.canary.take(),
                Outcome::RolledBack => versions.canary = None,
            }
        }
    }

    fn hosted_router(
        &self,
        rollout: &Rollout,
        listen: &str,
        admin: Option<&str>,
    ) -> Result<HttpUrl, String> {
        let name = &rollout.metadata.name;
        let mut routers = self.routers.lock().expect("routers");
        if let Some(r) = routers.get(name).filter(|r| r.listen == listen) {
            return HttpUrl::parse(&format!("http://{}", r.handle.admin));
        }
        if let Some(old) = routers.remove(name) {
            // Shutting down joins its threads after a drain: not on an async worker.
            tokio::task::spawn_blocking(move || old.handle.shutdown());
        }
        let Some(Target::Url(stable)) = &rollout.spec.stable else {
            return Err("spec.stable: a hosted router needs a url".into());
        };
        let stable = UpstreamUrl::parse(stable.as_str())?;
        let mut routes = RoutesDoc::stable_only(stable);
        routes.name = name.clone();
        let handle = coalmine_router::start(RouterConfig::embedded(
            listen
                .parse()
                .map_err(|e| format!("spec.router.listen: {e}"))?,
            admin
                .unwrap_or("127.0.0.1:0")
                .parse()
                .map_err(|e| format!("spec.router.admin: {e}"))?,
            routes,
        ))
        .map_err(|e| format!("spec.router: {e}"))?;
        let admin = HttpUrl::parse(&format!("http://{}", handle.admin))?;
        routers.insert(
            name.clone(),
            HostedRouter {
                listen: listen.to_string(),
                handle,
            },
        );
        Ok(admin)
    }

    async fn spawn(
        self: &Arc<Self>,
        rollout: Rollout,
        status: Option<Status>,
        run: i64,
    ) -> Result<(), String> {
        let driver = self.driver(&rollout, status).await?;
        self.launch(rollout, driver, run);
        Ok(())
    }

    fn launch(self: &Arc<Self>, rollout: Rollout, mut driver: Driver, run: i64) {
        let name = rollout.metadata.name.clone();
        let (control, inputs) = mpsc::channel(16);
        let daemon = self.clone();
        let task_name = name.clone();
        let counted = driver.status().outcome.is_some();
        let task = tokio::spawn(async move {
            let mut sink = StoreSink {
                store: daemon.store.clone(),
                name: task_name.clone(),
                run,
                telemetry: daemon.telemetry.clone(),
                counted,
            };
            let outcome = driver.run(inputs, &mut sink).await;
            if driver.settled() {
                if let Err(e) = daemon.store.mark_settled(&task_name, run) {
                    tracing::error!(rollout = %task_name, "{e}");
                }
            }
            tracing::info!(rollout = %task_name, ?outcome, "rollout ended");
            let current = {
                let mut running = daemon.running.lock().expect("running");
                let current = running.get(&task_name).is_some_and(|r| r.run == run);
                if current {
                    running.remove(&task_name);
                }
                current
            };
            if current {
                daemon.retire_processes(&task_name, outcome).await;
            }
        });
        self.running.lock().expect("running").insert(
            name,
            Running {
                run,
                rollout: Arc::new(rollout),
                control,
                task,
            },
        );
    }
}

async fn list(State(d): State<Arc<Daemon>>) -> Response {
    match d.store.all() {
        Ok(all) => Json(
            all.iter()
                .map(|s| status_json(&s.rollout, &s.status))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn one(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    match d.store.get(&name) {
        Ok(Some(s)) => Json(status_json(&s.rollout, &s.status)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no rollout named {name:?}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn history(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    match d.store.history(&name) {
        Ok(events) if events.is_empty() => {
            error(StatusCode::NOT_FOUND, format!("no rollout named {name:?}"))
        }
        Ok(events) => Json(
            events
                .iter()
                .map(|(run, e)| event_json(&name, Some(*run), e))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn command(
    State(d): State<Arc<Daemon>>,
    Path((name, command)): Path<(String, String)>,
) -> Response {
    let input = match command.as_str() {
        "promote" => Input::Promote,
        "abort" => Input::Abort {
            reason: "requested through the API".into(),
        },
        "pause" => Input::Pause,
        "resume" => Input::Resume,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown command {other:?}: promote, abort, pause or resume"),
            )
        }
    };
    let control = d
        .running
        .lock()
        .expect("running")
        .get(&name)
        .map(|r| r.control.clone());
    match control {
        Some(control) if control.send(input).await.is_ok() => (
            StatusCode::ACCEPTED,
            Json(json!({"name": name, "command": command})),
        )
            .into_response(),
        _ => match d.store.get(&name) {
            Ok(Some(s)) => error(
                StatusCode::CONFLICT,
                format!("{name} is not running (phase {})", s.status.phase.as_str()),
            ),
            _ => error(StatusCode::NOT_FOUND, format!("no rollout named {name:?}")),
        },
    }
}

async fn metrics(State(d): State<Arc<Daemon>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        d.telemetry.encode(),
    )
        .into_response()
}

/// Alertmanager's webhook body (version 4); only what the receiver acts on.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AlertmanagerPayload {
    version: String,
    #[serde(default)]
    alerts: Vec<Alert>,
}

#[derive(Deserialize)]
struct Alert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Alert {
    /// How the alert reads in a rollout's events: name, labels and summary.
    fn describe(&self) -> String {
        let name = self
            .labels
            .get("alertname")
            .map_or("(unnamed)", String::as_str);
        let labels: Vec<String> = self
            .labels
            .iter()
            .filter(|(k, _)| *k != "alertname")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut text = format!("alert {name} firing [{}]", labels.join(", "));
        if let Some(summary) = self.annotations.get("summary") {
            text.push_str(": ");
            text.push_str(summary);
        }
        text
    }
}

/// Rolls back every running rollout that a firing alert matches. Answers 200 with what it did
/// (Alertmanager retries on anything else, so a payload it cannot use is still a 400, not a 5xx).
async fn alertmanager(State(d): State<Arc<Daemon>>, body: axum::body::Bytes) -> Response {
    let payload: AlertmanagerPayload = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("not an Alertmanager webhook payload: {e}"),
            )
        }
    };
    if payload.version != "4" {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "Alertmanager webhook payload version {:?}: Coalmine reads version 4",
                payload.version
            ),
        );
    }
    let targets: Vec<(String, mpsc::Sender<Input>, String)> = {
        let running = d.running.lock().expect("running");
        let mut targets = Vec::new();
        for alert in payload.alerts.iter().filter(|a| a.status == "firing") {
            for (name, r) in running.iter() {
                let already = targets.iter().any(|(n, _, _)| n == name);
                if !already && r.rollout.spec.analysis.rolled_back_by_alert(&alert.labels) {
                    targets.push((name.clone(), r.control.clone(), alert.describe()));
                }
            }
        }
        targets
    };
    let mut rolled_back = Vec::new();
    for (name, control, reason) in targets {
        tracing::warn!(rollout = %name, "{reason}: rolling back");
        if control.send(Input::RollBack { reason }).await.is_ok() {
            rolled_back.push(name);
        }
    }
    Json(json!({"alerts": payload.alerts.len(), "rolledBack": rolled_back})).into_response()
}
