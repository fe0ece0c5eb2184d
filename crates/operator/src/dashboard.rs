//! `coalmine operator`'s side of the dashboard (the page and its live updates are
//! `coalmine_controller::dashboard`'s): the cluster's Rollouts, watched by every replica, leader
//! or not, so whichever one a Service sends a person to shows the same.
//!
//! A rollout's key is `namespace/name`. Each status a run writes is a step: its machine state
//! (`status.state`) becomes a point of the run's series, which this process keeps from the time
//! it started watching. The events are the Kubernetes Events on the Rollout and its Canary.
//! The actions are what `kubectl` would do, written as the person who signed in (the field
//! manager names them, so the run's history does): `promote` and `abort` the
//! `coalmine.dev/request` annotation, `pause` and `resume` `spec.suspend`, on the object the
//! user wrote (the Canary, when the Rollout is its).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::{json, Value};

use coalmine_controller::dashboard::{self, gate, Actor, Gate, Live};
use coalmine_controller::report::status_json;
use coalmine_controller::time::rfc3339;
use coalmine_rollout::Status;

use crate::crd::Rollout;
use crate::requests::REQUEST_ANNOTATION;

/// What a read-only dashboard says instead of the actions.
const KUBECTL_HINT: &str = "act with kubectl: `kubectl annotate canary/NAME coalmine.dev/request=promote` (or abort), `spec.suspend: true` pauses";

pub struct Dashboard {
    client: kube::Client,
    rollouts: Store<Rollout>,
    live: Arc<Live>,
    gate: Arc<Gate>,
}

/// Why a dashboard call failed, answered `{"error": message}` like the rest of the API.
#[derive(Debug, thiserror::Error)]
enum DashboardError {
    #[error("no rollout {0:?} (the dashboard names them namespace/name)")]
    NoSuchRollout(String),
    #[error("unknown command {0:?}: promote, abort, pause or resume")]
    UnknownCommand(String),
    #[error("{0} has no machine state yet: its run has not started")]
    NotStarted(String),
    #[error("the API server refused: {0}")]
    Kube(#[from] kube::Error),
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        let status = match self {
            DashboardError::NoSuchRollout(_) | DashboardError::UnknownCommand(_) => {
                StatusCode::NOT_FOUND
            }
            DashboardError::NotStarted(_) => StatusCode::CONFLICT,
            DashboardError::Kube(_) => StatusCode::BAD_GATEWAY,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

fn key_of(rollout: &Rollout) -> String {
    format!(
        "{}/{}",
        rollout.metadata.namespace.as_deref().unwrap_or_default(),
        rollout.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The machine's state a run wrote in the status, if any.
fn machine_status(rollout: &Rollout) -> Option<Status> {
    let state = rollout.status.as_ref()?.state.clone()?;
    serde_json::from_value(state).ok()
}

/// The Canary a Rollout runs for, if it is one's (Flagger's resource the user wrote).
fn canary_of(rollout: &Rollout) -> Option<String> {
    rollout
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Canary" && o.api_version.starts_with(crate::flagger::GROUP))
        .map(|o| o.name.clone())
}

impl Dashboard {
    /// Starts watching the Rollouts (of `namespace`, or all) and returns the dashboard; `gate`
    /// opens its actions.
    pub fn start(client: kube::Client, namespace: Option<&str>, gate: Gate) -> Arc<Dashboard> {
        let api: Api<Rollout> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (rollouts, writer) = reflector::store();
        let dashboard = Arc::new(Dashboard {
            client,
            rollouts,
            live: Arc::new(Live::default()),
            gate: Arc::new(gate),
        });
        let live = dashboard.live.clone();
        tokio::spawn(async move {
            // The last state seen of each rollout: a status write that changes no state (a
            // condition's time) is no step.
            let mut seen: HashMap<String, Value> = HashMap::new();
            let mut changes = watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .boxed();
            while let Some(event) = changes.next().await {
                match event {
                    Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r)) => {
                        let key = key_of(&r);
                        let state = r.status.as_ref().and_then(|s| s.state.clone());
                        let Some((state, status)) = state
                            .zip(machine_status(&r))
                            .filter(|(s, _)| seen.get(&key) != Some(s))
                        else {
                            continue;
                        };
                        seen.insert(key.clone(), state);
                        let document = r.to_document();
                        live.saved(
                            &key,
                            &document,
                            status.started_ms as i64,
                            &status,
                            &[],
                            coalmine_controller::driver::now_ms(),
                        );
                    }
                    Ok(watcher::Event::Delete(r)) => {
                        let key = key_of(&r);
                        seen.remove(&key);
                        live.deleted(&key);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "dashboard: watching Rollouts"),
                }
            }
        });
        dashboard
    }

    /// The routes to serve beside `/healthz`: the page, its reads and the gated actions.
    pub fn routes(self: &Arc<Dashboard>) -> Router {
        let actions = Router::new()
            .route("/api/v1/rollouts/{key}/{command}", post(command))
            .route_layer(axum::middleware::from_fn_with_state(
                self.gate.clone(),
                gate::require_signed,
            ));
        Router::new()
            .route("/api/v1/watch", get(watch))
            .route("/api/v1/rollouts/{key}", get(one))
            .route("/api/v1/rollouts/{key}/live", get(detail))
            .merge(actions)
            .with_state(self.clone())
            .merge(dashboard::page_routes())
            .merge(gate::session_routes(self.gate.clone()))
    }

    fn find(&self, key: &str) -> Result<Arc<Rollout>, DashboardError> {
        self.rollouts
            .state()
            .into_iter()
            .find(|r| key_of(r) == key)
            .ok_or_else(|| DashboardError::NoSuchRollout(key.to_string()))
    }

    fn snapshot(&self) -> Value {
        let mut rows: Vec<Value> = self
            .rollouts
            .state()
            .iter()
            .map(|r| {
                let key = key_of(r);
                match machine_status(r) {
                    Some(status) => dashboard::live::row(&key, &r.to_document(), &status, None),
                    None => json!({
                        "key": key,
                        "name": r.metadata.name,
                        "namespace": r.metadata.namespace,
                        "phase": r.status.as_ref().and_then(|s| s.canary.phase).map_or("Initializing", |p| p.as_str()),
                        "lastEvent": "waiting for its first run",
                    }),
                }
            })
            .collect();
        rows.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        json!({ "rows": rows })
    }

    /// The Events on the Rollout and on its Canary, oldest first, as the page lists them.
    async fn events(&self, rollout: &Rollout) -> Result<Vec<Value>, DashboardError> {
        let namespace = rollout.metadata.namespace.as_deref().unwrap_or_default();
        let name = rollout.metadata.name.as_deref().unwrap_or_default();
        let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), namespace);
        let mut events: Vec<(String, Value)> = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.name.as_deref() == Some(name)
                        && matches!(r.kind.as_deref(), Some("Rollout" | "Canary"))
                })
            })
            .map(|e| {
                let time = e
                    .series
                    .as_ref()
                    .map(|s| s.last_observed_time.0.to_string())
                    .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
                    .or_else(|| {
                        e.metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| t.0.to_string())
                    })
                    .unwrap_or_default();
                let level = if e.type_.as_deref() == Some("Warning") {
                    "warning"
                } else {
                    "info"
                };
                let v =
                    json!({"time": time, "level": level, "message": e.note, "reason": e.reason});
                (time, v)
            })
            .collect();
        events.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(events.into_iter().map(|(_, v)| v).collect())
    }
}

async fn watch(State(d): State<Arc<Dashboard>>) -> Response {
    let live = d.live.clone();
    dashboard::watch(&live, move || Ok(d.snapshot())).into_response()
}

async fn one(
    State(d): State<Arc<Dashboard>>,
    Path(key): Path<String>,
) -> Result<Response, DashboardError> {
    let rollout = d.find(&key)?;
    let status = machine_status(&rollout).ok_or_else(|| DashboardError::NotStarted(key))?;
    Ok(Json(status_json(&rollout.to_document(), &status, None)).into_response())
}

async fn detail(
    State(d): State<Arc<Dashboard>>,
    Path(key): Path<String>,
    Query(query): Query<dashboard::DetailQuery>,
) -> Result<Response, DashboardError> {
    let rollout = d.find(&key)?;
    let status = machine_status(&rollout).ok_or_else(|| DashboardError::NotStarted(key.clone()))?;
    let run = status.started_ms as i64;
    let document = rollout.to_document();
    let mut shown = status_json(&document, &status, None);
    shown["startedAt"] = json!(rfc3339(status.started_ms));
    Ok(Json(dashboard::detail_json(
        &document,
        run,
        shown,
        query.points.then(|| d.live.points(&key, run)),
        d.events(&rollout).await?,
        dashboard::document_yaml(&json!({
            "apiVersion": "coalmine.dev/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": rollout.metadata.name, "namespace": rollout.metadata.namespace},
            "spec": rollout.spec,
        })),
    ))
    .into_response())
}

/// An action, done the way `kubectl` does it, by the person signed in.
async fn command(
    State(d): State<Arc<Dashboard>>,
    Extension(Actor(by)): Extension<Actor>,
    Path((key, command)): Path<(String, String)>,
) -> Result<Response, DashboardError> {
    let rollout = d.find(&key)?;
    let patch = match command.as_str() {
        "promote" | "abort" => {
            json!({"metadata": {"annotations": {REQUEST_ANNOTATION: command}}})
        }
        "pause" => json!({"spec": {"suspend": true}}),
        "resume" => json!({"spec": {"suspend": false}}),
        other => return Err(DashboardError::UnknownCommand(other.to_string())),
    };
    let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
    let (kind, name, resource) = match canary_of(&rollout) {
        Some(canary) => (
            "Canary",
            canary,
            ApiResource::erase::<crate::flagger::Canary>(&()),
        ),
        None => (
            "Rollout",
            rollout.metadata.name.clone().unwrap_or_default(),
            ApiResource::erase::<Rollout>(&()),
        ),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(d.client.clone(), &namespace, &resource);
    // The field manager is who asked: the run's history names the annotation's writer.
    let as_them = PatchParams {
        field_manager: Some(field_manager(&by)),
        ..PatchParams::default()
    };
    api.patch(&name, &as_them, &Patch::Merge(&patch)).await?;
    tracing::info!(%key, %command, %by, "dashboard action");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"name": key, "command": command, "on": format!("{kind} {namespace}/{name}")})),
    )
        .into_response())
}

/// A field manager's name: at most 128 printable characters.
fn field_manager(by: &str) -> String {
    by.chars().filter(|c| !c.is_control()).take(128).collect()
}

/// A read-only gate, for an operator started without a dashboard token.
pub fn read_only_gate() -> Gate {
    Gate::closed(KUBECTL_HINT)
}
