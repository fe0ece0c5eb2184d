//! Status and events as users read them: JSON with Flagger's status names (`phase`,
//! `canaryWeight`, `failedChecks`, `iterations`, `lastTransitionTime`, `conditions`) plus each
//! metric's last value and reason.

use serde_json::{json, Value};

use coalmine_judge::{Reading, Verdict};
use coalmine_rollout::{DarkLaunchStage, Event, MetricStatus, Phase, Status};
use coalmine_spec::rollout::{Rollout, Target};

use crate::time::rfc3339;

/// A rollout holding because its last step could not be saved.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub since_ms: u64,
    pub reason: String,
}

fn target(t: &Option<Target>) -> Value {
    match t {
        Some(Target::Url(u)) => json!(coalmine_spec::redact::url(u.as_str())),
        Some(Target::Command { command, .. }) => json!({ "command": command }),
        None => Value::Null,
    }
}

/// Flagger's `Promoted` condition: Unknown while a run is under way, True on success, False on
/// failure; its reason is the phase, as Flagger reports it.
fn promoted_condition(status: &Status) -> Value {
    let state = match status.phase {
        Phase::Succeeded => "True",
        Phase::Failed => "False",
        _ => "Unknown",
    };
    json!({
        "type": "Promoted",
        "status": state,
        "reason": status.phase.as_str(),
        "message": status.message,
        "lastTransitionTime": rfc3339(status.last_transition_ms),
    })
}

/// Coalmine's `DarkLaunch` condition, while a rollout has one: Unknown while it mirrors, True
/// once it passed (the pairs it judged), False when the canary was worse than stable on the
/// same requests, or the rollout ended during it — the message says which, with the pairs.
fn dark_launch_condition(status: &Status) -> Option<Value> {
    let dark = status.dark_launch.as_ref()?;
    let (state, reason) = match dark.stage {
        DarkLaunchStage::Running => ("Unknown", "Mirroring"),
        DarkLaunchStage::Passed => ("True", "Passed"),
        DarkLaunchStage::Failed => ("False", "Failed"),
    };
    let e = dark.evidence();
    let t = e.totals;
    let pairs = format!(
        "{} paired requests: the canary alone failed {}, stable alone {}; the canary slower on {}, faster on {}",
        t.pairs, t.canary_only_failed, t.stable_only_failed, t.canary_slower, t.canary_faster
    );
    let message = match dark.stage {
        DarkLaunchStage::Failed => {
            // Why the run rolled back: the paired test's rejection, or what ended it meanwhile.
            let why = status
                .message
                .strip_prefix("Rolling back: ")
                .unwrap_or(&status.message);
            format!("{why} ({pairs})")
        }
        _ => pairs,
    };
    Some(json!({
        "type": "DarkLaunch",
        "status": state,
        "reason": reason,
        "message": message,
        "lastTransitionTime": rfc3339(dark.ended_ms.unwrap_or(dark.started_ms)),
    }))
}

/// Each check's last reading as users see it: `{name, value, verdict, reason, time}`.
pub fn metrics_json(metrics: &[MetricStatus]) -> Vec<Value> {
    metrics
        .iter()
        .map(|m| {
            let (value, reading_reason) = match &m.reading {
                Reading::Value { value } => (json!(value), None),
                Reading::NoData { reason } | Reading::Error { reason } => {
                    (Value::Null, Some(reason.clone()))
                }
            };
            let (verdict, reason) = match &m.verdict {
                Verdict::Pass => ("pass", reading_reason),
                Verdict::Fail { reason } => ("fail", Some(reason.clone())),
                Verdict::Inconclusive { reason } => ("inconclusive", Some(reason.clone())),
            };
            json!({
                "name": m.name,
                "value": value,
                "verdict": verdict,
                "reason": reason,
                "time": rfc3339(m.time_ms),
            })
        })
        .collect()
}

/// What a rollout whose last step could not be saved says instead of its status's message.
pub fn holding_message(held: &Held) -> String {
    format!(
        "Holding: the state cannot be saved since {} ({}); nothing moves until it can",
        rfc3339(held.since_ms),
        held.reason
    )
}

/// A rollout's status as users read it; `held` says its last step could not be saved, so
/// it is holding where the status says it is.
pub fn status_json(rollout: &Rollout, status: &Status, held: Option<&Held>) -> Value {
    let metrics = metrics_json(&status.metrics);
    let mut conditions = vec![promoted_condition(status)];
    conditions.extend(dark_launch_condition(status));
    let mut message = status.message.clone();
    if let Some(held) = held {
        conditions.push(json!({
            "type": "StateSaved",
            "status": "False",
            "reason": "WriteFailed",
            "message": held.reason,
            "lastTransitionTime": rfc3339(held.since_ms),
        }));
        message = holding_message(held);
    }
    json!({
        "name": rollout.metadata.name,
        "namespace": rollout.metadata.namespace.as_deref().unwrap_or("default"),
        "group": rollout.group(),
        "stable": target(&rollout.spec.stable),
        "canary": target(&rollout.spec.canary),
        "phase": status.phase.as_str(),
        "canaryWeight": status.canary_weight.percent(),
        "failedChecks": status.failed_checks,
        "iterations": status.iterations,
        "paused": status.paused,
        "promoted": status.promoted,
        "outcome": status.outcome,
        "message": message,
        "stateSaved": held.is_none(),
        "startedAt": rfc3339(status.started_ms),
        "lastTransitionTime": rfc3339(status.last_transition_ms),
        "conditions": conditions,
        "metrics": metrics,
        // The sequential judges' evidence as it grows: Bayes factor and always-valid p-values.
        "sequential": status.sequential.as_ref().map(|s| s.evidence()),
        // The dark launch's paired evidence: Bayes factors on the pairs only one version
        // failed and on latency differences beyond the tolerance.
        "darkLaunch": status.dark_launch.as_ref().map(|d| json!({
            "stage": d.stage,
            "startedAt": rfc3339(d.started_ms),
            "evidence": d.evidence(),
        })),
    })
}

pub fn event_json(rollout: &str, run: Option<i64>, event: &Event) -> Value {
    let mut v = json!({
        "time": rfc3339(event.time_ms),
        "rollout": rollout,
        "level": event.level,
        "phase": event.phase.as_str(),
        "canaryWeight": event.weight.percent(),
        "message": event.message,
    });
    if let Some(run) = run {
        v["run"] = json!(run);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_rollout::{DarkLaunchPlan, DarkLaunchStatus, Machine, Plan};

    fn dark_launch_status(stage: DarkLaunchStage, message: &str) -> Status {
        let analysis: coalmine_spec::rollout::Analysis = coalmine_spec::parse_yaml(
            "a.yaml",
            "interval: 1m\nstepWeight: 10\ndarkLaunch: {minRequests: 10}\n",
        )
        .expect("analysis");
        let mut status = Machine::new(Plan::new(&analysis, 600, false), 0)
            .status()
            .clone();
        let plan = DarkLaunchPlan::from_settings(analysis.dark_launch.as_ref().expect("dark"));
        let mut dark = DarkLaunchStatus::new(&plan, 1_000);
        if stage != DarkLaunchStage::Running {
            dark.ended_ms = Some(5_000);
        }
        dark.stage = stage;
        status.dark_launch = Some(dark);
        status.message = message.into();
        status
    }

    fn condition(status: &Status) -> Value {
        dark_launch_condition(status).expect("a DarkLaunch condition")
    }

    #[test]
    fn a_dark_launch_says_how_it_ended_in_its_condition() {
        let passed = condition(&dark_launch_status(DarkLaunchStage::Passed, "Advance"));
        assert_eq!(passed["status"], "True");
        assert_eq!(passed["reason"], "Passed");
        assert!(passed["message"]
            .as_str()
            .unwrap()
            .starts_with("0 paired requests"));
        let failed = condition(&dark_launch_status(
            DarkLaunchStage::Failed,
            "Rolling back: aborted: requested through kubectl",
        ));
        assert_eq!(failed["status"], "False");
        assert_eq!(
            failed["message"],
            "aborted: requested through kubectl (0 paired requests: the canary alone failed 0, stable alone 0; the canary slower on 0, faster on 0)"
        );
        let running = condition(&dark_launch_status(DarkLaunchStage::Running, "Mirroring"));
        assert_eq!(running["status"], "Unknown");
        assert_eq!(running["lastTransitionTime"], rfc3339(1_000));
        // In the status users (and the operator's Rollout) read, beside Flagger's condition.
        assert_eq!(
            status_json_conditions(&dark_launch_status(DarkLaunchStage::Passed, "")),
            ["Promoted", "DarkLaunch"]
        );
    }

    fn status_json_conditions(status: &Status) -> Vec<String> {
        let rollout: Rollout = coalmine_spec::parse_yaml(
            "r.yaml",
            "apiVersion: coalmine.dev/v1alpha1\nkind: Rollout\nmetadata: {name: web}\nspec:\n  analysis: {interval: 1m, stepWeight: 10}\n",
        )
        .expect("rollout");
        status_json(&rollout, status, None)["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap().to_string())
            .collect()
    }
}
