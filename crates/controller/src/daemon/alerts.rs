//! Alertmanager's receiver: a firing alert matching a rollout's `rollbackOnAlerts` that began
//! during its current run rolls that rollout back (`Input::RollBack` on its control channel).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use coalmine_rollout::Input;

use super::api::ApiError;
use super::Daemon;

/// Alertmanager's webhook body (version 4); only what the receiver acts on.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AlertmanagerPayload {
    version: String,
    #[serde(default)]
    alerts: Vec<Alert>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Alert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    /// RFC 3339; an alert that began before a run is about an earlier one.
    #[serde(default)]
    starts_at: Option<String>,
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

    /// Whether the alert began during a run that started at `run_started_ms`. One without a
    /// readable start time is taken as current.
    fn began_during_run(&self, run_started_ms: u64) -> bool {
        self.starts_at
            .as_deref()
            .and_then(crate::time::parse_rfc3339)
            .is_none_or(|starts| starts >= run_started_ms)
    }
}

/// Rolls back every running rollout that a firing alert matches. Answers 200 with what it did
/// (Alertmanager retries on anything else, so a payload it cannot use is still a 400, not a 5xx).
/// An alert that began firing before a rollout's current run started is about an earlier run
/// (Alertmanager repeats firing alerts) and leaves this one be.
pub(super) async fn alertmanager(
    State(d): State<Arc<Daemon>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let payload: AlertmanagerPayload =
        serde_json::from_slice(&body).map_err(ApiError::NotAlertmanager)?;
    if payload.version != "4" {
        return Err(ApiError::AlertmanagerVersion(payload.version));
    }
    let mut ignored = Vec::new();
    let targets: Vec<(String, mpsc::Sender<Input>, String)> = {
        let running = d.running.lock().expect("running");
        let mut targets = Vec::new();
        for alert in payload.alerts.iter().filter(|a| a.status == "firing") {
            for (name, r) in running.iter() {
                let already = targets.iter().any(|(n, _, _)| n == name);
                if already || !r.rollout.spec.analysis.rolled_back_by_alert(&alert.labels) {
                    continue;
                }
                if alert.began_during_run(r.started_ms) {
                    targets.push((name.clone(), r.control.clone(), alert.describe()));
                } else {
                    ignored.push(json!({
                        "rollout": name,
                        "alert": alert.describe(),
                        "why": "it began firing before this run started",
                    }));
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
    Ok(
        Json(
            json!({"alerts": payload.alerts.len(), "rolledBack": rolled_back, "ignored": ignored}),
        )
        .into_response(),
    )
}
