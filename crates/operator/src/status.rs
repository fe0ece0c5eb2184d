//! What a `Canary` (Flagger's fields, as `flagger.app/v1beta1` declares them) and a `Rollout`
//! (the same, plus Coalmine's) report in `status`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use coalmine_rollout::Phase;

/// Flagger's `CanaryStatus`, field for field: what `kubectl get canaries`, `kubectl wait
/// --for=condition=promoted` and Flagger's Grafana boards read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Traffic weight routed to the canary (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_checks: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u32>,
    /// A hash of the target's pod template (and tracked configs) that the last run started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_spec: Option<String>,
    /// The same hash for the last promoted run: a rollback to it starts no analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_promoted_spec: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// ConfigMaps and Secrets the target references, `kind/name` → a hash of their data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tracked_configs: BTreeMap<String, String>,
}

/// Flagger's one condition, `Promoted` (`status` True, False or Unknown; `reason` the phase).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// A `Rollout`'s status: Flagger's fields, and what Coalmine knows besides.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    #[serde(flatten)]
    pub canary: CanaryStatus,
    /// The `metadata.generation` this status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The share the canary really gets (provider `kubernetes` rounds the weight to whole
    /// replicas), in %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_weight: Option<f64>,
    /// Each metric check's last reading.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckReading>,
    /// The sequential judges' evidence as it grows (as `coalmine status --output json` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub sequential: Option<serde_json::Value>,
    /// The state machine's whole state: what an operator restarted mid-analysis resumes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub state: Option<serde_json::Value>,
}

/// One metric check's last reading, as `coalmine status --output json` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckReading {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// `pass`, `fail` or `inconclusive`.
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// A `RolloutGroup`'s status: where the group stands as its members' statuses say (the same
/// decision `coalmine serve` takes), each member in a line, and Flagger's `Promoted` condition
/// as a Rollout has it (`kubectl wait --for=condition=promoted rolloutgroup/<name>`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutGroupStatus {
    /// `Progressing`, `RollingBack`, `RolledBack` or `Succeeded`; none while the group is
    /// invalid (its `Promoted` condition says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Why the group rolls back: the member that failed first, and its evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<GroupMemberStatus>,
    /// The `metadata.generation` this status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One member as its group sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupMemberStatus {
    pub name: String,
    /// Its Rollout's phase (none before its first run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Its canary's weight (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// How far the group lets it go now: `up to 10 %`, `may promote`, `waiting for …` (it
    /// would go on), `closed until …` (before the group decided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<String>,
}

/// A CRD schema must be structural: free-form JSON is an object whose fields are kept.
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
}
