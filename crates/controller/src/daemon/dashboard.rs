//! `coalmine serve`'s side of the dashboard ([`crate::dashboard`]): its rows (rollouts and
//! groups) and one rollout's page, read from the state file and the series this process saw.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::api::{shown_status, ApiError};
use super::Daemon;
use crate::dashboard::{self, live::row, live::with_held};
use crate::report::event_json;

pub(super) fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/api/v1/watch", get(watch))
        .route("/api/v1/rollouts/{name}/live", get(detail))
}

/// Every rollout's row, as the list shows it.
fn snapshot(d: &Daemon) -> Result<Value, ApiError> {
    let held = d.held.lock().expect("held").clone();
    let rows: Vec<Value> = d
        .store
        .all()?
        .iter()
        .map(|s| match s {
            Ok(s) => {
                let name = &s.rollout.metadata.name;
                with_held(
                    row(
                        name,
                        &s.rollout,
                        &s.status,
                        d.live.last_event(name, s.run).as_ref(),
                    ),
                    held.get(name),
                )
            }
            Err(bad) => json!({
                "key": bad.name,
                "name": bad.name,
                "phase": "Unknown",
                "lastEvent": format!("its stored state cannot be read: {}", bad.error),
            }),
        })
        .collect();
    Ok(json!({ "rows": rows, "groups": d.group_rows()? }))
}

async fn watch(State(d): State<Arc<Daemon>>) -> Response {
    let live = d.live.clone();
    dashboard::watch(&live, move || snapshot(&d).map_err(|e| e.to_string())).into_response()
}

async fn detail(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Query(query): Query<dashboard::DetailQuery>,
) -> Result<Response, ApiError> {
    let stored = d.stored(&name)?;
    let events: Vec<Value> = d
        .store
        .history(&name)
        .map_err(ApiError::state(&name))?
        .iter()
        .filter(|(run, _)| *run == stored.run)
        .map(|(run, e)| event_json(&name, Some(*run), e))
        .collect();
    Ok(Json(dashboard::detail_json(
        &stored.rollout,
        stored.run,
        shown_status(&d, &stored.rollout, &stored.status),
        query.points.then(|| d.live.points(&name, stored.run)),
        events,
        dashboard::document_yaml(&stored.rollout),
    ))
    .into_response())
}
