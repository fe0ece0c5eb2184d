//! The native `Rollout` document and the analysis block it shares with Flagger's `Canary`.
//!
//! Field names and meanings are Flagger's (`spec.analysis.*`), so a Canary's analysis parses into
//! the same [`Analysis`] type. Coalmine's additions are marked as such in their doc comments.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::alerts::{AlertProviderSpec, Severity};
use crate::duration::Dur;
use crate::Weight;

pub const API_VERSION: &str = "coalmine.dev/v1alpha1";

/// Flagger's default `progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: u64 = 600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    #[serde(deserialize_with = "api_version")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: RolloutSpec,
}

/// The annotation naming the `RolloutGroup` a rollout is a member of.
pub const GROUP_ANNOTATION: &str = "coalmine.dev/group";

/// The annotation naming the release of its group a member is part of, when the members share
/// a cohort: their affinity cookie derives from it (see `RolloutGroup::mark_members`).
pub const GROUP_RELEASE_ANNOTATION: &str = "coalmine.dev/group-release";

impl Rollout {
    /// The group it is a member of (set by the group when they are applied together).
    pub fn group(&self) -> Option<&str> {
        self.metadata
            .annotations
            .get(GROUP_ANNOTATION)
            .map(String::as_str)
    }

    /// The release of its group it is part of, when the group's members share a cohort.
    pub fn group_release(&self) -> Option<&str> {
        self.metadata
            .annotations
            .get(GROUP_RELEASE_ANNOTATION)
            .map(String::as_str)
    }

    /// The name whose sticky buckets its users fall into: `spec.cohort`, or its own name. The
    /// routers' route name (which salts their sticky hash) is this.
    pub fn cohort(&self) -> &str {
        self.spec.cohort.as_deref().unwrap_or(&self.metadata.name)
    }
}

fn api_version<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = String::deserialize(d)?;
    if v != API_VERSION {
        return Err(serde::de::Error::custom(format!(
            "a Rollout has apiVersion {API_VERSION}, not {v:?}"
        )));
    }
    Ok(v)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// Admin addresses of the Coalmine routers that carry this service's traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routers: Vec<HttpUrl>,
    /// A router `coalmine serve` runs itself for this rollout (one process for everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<HostedRouter>,
    /// Which service of the routers' route tables this rollout drives (`/routes/{service}`,
    /// `/stats/{service}`); default: the routers' default service.
    #[serde(
        default,
        deserialize_with = "router_service",
        skip_serializing_if = "Option::is_none"
    )]
    pub router_service: Option<String>,
    /// Coalmine: the name whose sticky buckets this rollout's users fall into (default: the
    /// rollout's name). Rollouts of one cohort at the same weight send the same users to their
    /// canaries; a `RolloutGroup` gives its members its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cohort: Option<String>,
    /// The name metric templates see as `{{ service }}` and `{{ target }}` (default: the
    /// rollout's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The two versions. Required to run; a rollout that is only simulated may leave them out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Target>,
    #[serde(default = "default_deadline")]
    pub progress_deadline_seconds: u64,
    #[serde(default)]
    pub skip_analysis: bool,
    #[serde(default)]
    pub suspend: bool,
    /// Coalmine's addition (Argo's preview service): requests matching any of these reach the
    /// canary whenever the routers have one, whatever its weight, and count as its traffic —
    /// how a load test measures a blue-green canary before users reach it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preview: Vec<HttpMatch>,
    /// Coalmine's addition: a feature flag the rollout steps, served over OFREP by `coalmine
    /// serve` (alone, or together with the routers' weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<crate::flag::Flag>,
    pub analysis: Analysis,
}

/// A service name the routers take (see `coalmine_contract::check_service_name`).
pub(crate) fn router_service<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(d)?;
    coalmine_contract::check_service_name(&name).map_err(serde::de::Error::custom)?;
    Ok(Some(name))
}

impl RolloutSpec {
    /// The routers' service this rollout drives: `routerService`, or the default service.
    pub fn router_service(&self) -> &str {
        self.router_service
            .as_deref()
            .unwrap_or(coalmine_contract::DEFAULT_SERVICE)
    }
}

fn default_deadline() -> u64 {
    DEFAULT_PROGRESS_DEADLINE_SECONDS
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostedRouter {
    #[serde(deserialize_with = "socket_address")]
    pub listen: String,
    #[serde(
        default,
        deserialize_with = "optional_socket_address",
        skip_serializing_if = "Option::is_none"
    )]
    pub admin: Option<String>,
}

/// An `IP:port` the hosted router binds (port 0 picks a free one).
fn socket_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    if text.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(text);
    }
    let port = text.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
    let message = if !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_err()
    {
        format!("{text:?}: port {port} is out of range (ports are 0 to 65535)")
    } else {
        format!("{text:?} is not an IP:port address such as 127.0.0.1:8080")
    };
    Err(serde::de::Error::custom(message))
}

fn optional_socket_address<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    socket_address(d).map(Some)
}

/// An `http://host:port` address (a router's admin API, a webhook, an upstream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "String", into = "String")]
pub struct HttpUrl(String);

impl HttpUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))
            .ok_or_else(|| format!("{text:?} is not an http:// or https:// URL"))?;
        let host = rest.split(['/', '?']).next().unwrap_or("");
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(format!("{text:?} has no valid host"));
        }
        url_port(text)?;
        Ok(HttpUrl(text.trim_end_matches('/').to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Declared once, in the router↔controller contract: an upstream URL and a match rule are
// checked there with the same words.
pub use coalmine_contract::matching::whole_value_regex;
pub use coalmine_contract::url_port;

impl TryFrom<String> for HttpUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        HttpUrl::parse(&s)
    }
}

impl From<HttpUrl> for String {
    fn from(u: HttpUrl) -> String {
        u.0
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A version of the service: an address that already serves it, or a process Coalmine starts,
/// health-checks and stops (`{port}` in the command is replaced by a free port).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawTarget", into = "RawTarget")]
pub enum Target {
    Url(HttpUrl),
    Command {
        command: Vec<String>,
        readiness: Readiness,
        env: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Readiness {
    #[serde(default = "default_readiness_path")]
    pub path: String,
    #[serde(default = "default_readiness_timeout")]
    pub timeout: Dur,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            path: default_readiness_path(),
            timeout: default_readiness_timeout(),
        }
    }
}

fn default_readiness_path() -> String {
    "/healthz".into()
}
fn default_readiness_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<HttpUrl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    readiness: Option<Readiness>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
}

impl TryFrom<RawTarget> for Target {
    type Error = String;
    fn try_from(raw: RawTarget) -> Result<Self, String> {
        match (raw.url, raw.command) {
            (Some(url), None) if raw.readiness.is_none() && raw.env.is_empty() => {
                Ok(Target::Url(url))
            }
            (Some(_), None) => Err("readiness and env apply to a `command` target only".into()),
            (None, Some(command)) if !command.is_empty() => Ok(Target::Command {
                command,
                readiness: raw.readiness.unwrap_or_default(),
                env: raw.env,
            }),
            (None, Some(_)) => Err("`command` needs at least the program to run".into()),
            _ => Err("a target has exactly one of `url` or `command`".into()),
        }
    }
}

impl From<Target> for RawTarget {
    fn from(t: Target) -> Self {
        match t {
            Target::Url(url) => RawTarget {
                url: Some(url),
                command: None,
                readiness: None,
                env: BTreeMap::new(),
            },
            Target::Command {
                command,
                readiness,
                env,
            } => RawTarget {
                url: None,
                command: Some(command),
                readiness: Some(readiness),
                env,
            },
        }
    }
}

/// `spec.analysis`: Flagger's fields with Flagger's meanings, plus Coalmine's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Analysis {
    /// How often the analysis runs. No 10-second floor (Flagger has one).
    #[serde(default = "default_interval")]
    pub interval: Dur,
    /// Failed checks before a rollback (Flagger: at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_weight: Option<Weight>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_weight: Option<Weight>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub step_weights: Vec<Weight>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_weight_promotion: Option<Weight>,
    /// A/B testing (with `match`) or blue-green (without): analysis runs this many times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub mirror: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_weight: Option<Weight>,
    /// Accepted for Flagger compatibility; readiness is judged by Coalmine's own checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_ready_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_ready_threshold: Option<u32>,
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub match_: Vec<HttpMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricCheck>,
    /// Where the rollout's news is posted (Slack, Teams, ...): each alert names an AlertProvider
    /// and the least severity it receives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<AlertNotification>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<Webhook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// Coalmine: what a check without data does. `hold` (default) keeps the weight and waits, bounded
    /// by `progressDeadlineSeconds`; `fail` counts it as a failed check, as Flagger does.
    #[serde(default, skip_serializing_if = "is_default")]
    pub no_data: NoDataRule,
    /// Coalmine: `total` (default, Flagger's rule: failed checks add up over the whole run) or
    /// `consecutive` (a passing check resets the count).
    #[serde(default, skip_serializing_if = "is_default")]
    pub failure_counting: FailureCounting,
    /// Coalmine: firing alerts that roll this rollout back; every label listed must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollback_on_alerts: Vec<BTreeMap<String, String>>,
    /// Coalmine: the anytime-valid comparison of canary against stable, on by default.
    #[serde(default, skip_serializing_if = "is_default")]
    pub sequential: Sequential,
    /// Coalmine: a dark launch before the first weight step (canary strategy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dark_launch: Option<DarkLaunch>,
}

/// `analysis.darkLaunch`: before any user reaches the canary, a share of stable's requests is
/// copied to it (requests without a body; its answers are discarded) and its answer to each
/// copy is compared with stable's answer to the same request, by sequential tests whose
/// false-rollback rate stays below `alpha`. The canary fails the requests stable answers, or
/// is slower on them: rolled back, no user having reached it. Otherwise, after `duration` and
/// `minRequests` paired requests, the first weight step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DarkLaunch {
    /// The share of stable's requests copied to the canary (default 100).
    #[serde(default = "all_traffic")]
    pub mirror_weight: Weight,
    /// The dark launch lasts at least this long (default 1m).
    #[serde(default = "default_dark_launch_duration")]
    pub duration: Dur,
    /// And until this many mirrored requests have been paired with stable's answers (default
    /// 100); held until then, bounded by `progressDeadlineSeconds`.
    #[serde(default = "default_dark_launch_min_requests")]
    pub min_requests: u64,
    /// A canary copy answered later than stable's answer to the same request by more than this
    /// counts as slower (default 10ms): below it, two processes' jitter.
    #[serde(default = "default_dark_launch_latency_tolerance")]
    pub latency_tolerance: Dur,
    /// The false-rollback bound of the whole dark launch, split evenly between the failure
    /// and the latency comparisons (default 0.01).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

fn all_traffic() -> Weight {
    Weight::FULL
}
fn default_dark_launch_duration() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}
fn default_dark_launch_min_requests() -> u64 {
    100
}
fn default_dark_launch_latency_tolerance() -> Dur {
    Dur(std::time::Duration::from_millis(10))
}

/// `analysis.sequential`: canary against stable, continuously, with sequential tests whose
/// false-rollback rate stays below `alpha` however often they look. A rejection rolls back at
/// once, between ticks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sequential {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The false-rollback bound over the whole rollout, split evenly between the error test and
    /// the latency test.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// A canary quantile slower than stable's by more than this share (0.1 = 10 %) is a
    /// regression.
    #[serde(default = "default_latency_tolerance")]
    pub latency_tolerance: f64,
    /// And slower by more than this (default 1ms): below it, how a latency was measured
    /// (a mirrored copy, a cold connection) matters as much as the version, and no user notices.
    #[serde(default = "default_latency_min_difference")]
    pub latency_min_difference: Dur,
    /// The latency quantiles compared.
    #[serde(default = "default_quantiles")]
    pub quantiles: Vec<f64>,
}

impl Default for Sequential {
    fn default() -> Self {
        Sequential {
            enabled: true,
            alpha: default_alpha(),
            latency_tolerance: default_latency_tolerance(),
            latency_min_difference: default_latency_min_difference(),
            quantiles: default_quantiles(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_alpha() -> f64 {
    0.01
}
fn default_latency_tolerance() -> f64 {
    0.1
}
fn default_latency_min_difference() -> Dur {
    Dur(std::time::Duration::from_millis(1))
}
fn default_quantiles() -> Vec<f64> {
    vec![0.5, 0.95, 0.99]
}

impl Analysis {
    /// The canary's weight steps, rising, ending at the maximum: `stepWeights` as given, or
    /// `stepWeight` multiples capped at `maxWeight` (Flagger overshoots `maxWeight` when it is
    /// not a multiple; Coalmine stops at it). `None` without weights (A/B, blue-green).
    pub fn weight_ladder(&self) -> Option<Vec<Weight>> {
        if !self.step_weights.is_empty() {
            return Some(self.step_weights.clone());
        }
        let step = self.step_weight?;
        let max = self.max_weight.unwrap_or(Weight::FULL);
        let mut out = Vec::new();
        let mut w = step.basis_points();
        while w < max.basis_points() {
            out.push(Weight::from_basis_points(w).expect("below the maximum weight"));
            w += step.basis_points();
        }
        out.push(max);
        Some(out)
    }

    /// Whether a firing alert with these labels rolls this rollout back: some entry of
    /// `rollbackOnAlerts` has all its labels on the alert with the same values.
    pub fn rolled_back_by_alert(&self, labels: &BTreeMap<String, String>) -> bool {
        self.rollback_on_alerts.iter().any(|matcher| {
            !matcher.is_empty()
                && matcher
                    .iter()
                    .all(|(name, value)| labels.get(name) == Some(value))
        })
    }
}

fn default_interval() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NoDataRule {
    #[default]
    Hold,
    Fail,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailureCounting {
    #[default]
    Total,
    Consecutive,
}

/// Flagger's HTTPMatchRequest as Coalmine's router can apply it: every header and query
/// parameter listed must match. `sourceLabels` needs a mesh and is reported, not applied.
/// `geo` is Coalmine's: where the client is (`country`: ISO 3166-1 `DE`; `region`: ISO 3166-2
/// `US-CA`), as the routers place clients (`--geoip-db` or a CDN's header); a router that
/// cannot place clients refuses the rollout's routes before any traffic moves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub geo: BTreeMap<GeoKey, StringMatch>,
}

/// What a `geo` match reads of where the client is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum GeoKey {
    /// ISO 3166-1 alpha-2: `DE`.
    Country,
    /// ISO 3166-2: `US-CA`.
    Region,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Matches the whole value, as in Istio; checked when read, so `check` finds a bad one.
    #[serde(deserialize_with = "regex_pattern")]
    Regex(String),
}

impl StringMatch {
    /// The contract's compiled form, as the router and the flag evaluator test values.
    pub fn to_str_match(&self) -> Result<coalmine_contract::StrMatch, coalmine_contract::Invalid> {
        use coalmine_contract::StrMatch;
        match self {
            StringMatch::Exact(v) => Ok(StrMatch::Exact(v.clone())),
            StringMatch::Prefix(v) => Ok(StrMatch::Prefix(v.clone())),
            StringMatch::Suffix(v) => Ok(StrMatch::Suffix(v.clone())),
            StringMatch::Regex(v) => StrMatch::regex(v),
        }
    }
}

fn regex_pattern<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let pattern = String::deserialize(d)?;
    whole_value_regex(&pattern).map_err(serde::de::Error::custom)?;
    Ok(pattern)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricCheck {
    pub name: String,
    /// The window the metric is computed over (Flagger's default: 1m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_range: Option<ThresholdRange>,
    /// Flagger's deprecated single threshold: a minimum for `request-success-rate`, a maximum
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Coalmine: the provider of an inline `query` (Flagger takes it from the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<crate::templates::Provider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub template_variables: BTreeMap<String, String>,
}

/// Flagger's window for a metric without `interval`.
pub const DEFAULT_METRIC_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl MetricCheck {
    /// The window the metric is computed over: its `interval`, or Flagger's default.
    pub fn window(&self) -> std::time::Duration {
        self.interval.map_or(DEFAULT_METRIC_WINDOW, |d| d.0)
    }

    /// Answered from the routers' own counts, not from a provider.
    pub fn is_builtin(&self) -> bool {
        self.query.is_none()
            && self.template_ref.is_none()
            && BUILTINS.contains(&self.name.as_str())
    }

    /// The bounds this check enforces, folding the deprecated `threshold` in.
    pub fn range(&self) -> ThresholdRange {
        let mut range = self.threshold_range.clone().unwrap_or_default();
        if let Some(t) = self.threshold {
            if self.name == BUILTIN_SUCCESS_RATE {
                range.min = range.min.or(Some(t));
            } else {
                range.max = range.max.or(Some(t));
            }
        }
        range
    }
}

/// The built-in metric names Flagger defines (success rate in %, p99 duration in ms).
pub const BUILTIN_SUCCESS_RATE: &str = "request-success-rate";
pub const BUILTIN_DURATION: &str = "request-duration";
/// Coalmine: Kayenta's fixed-window judge over the metric's window, canary against stable
/// (a score 0–100; Kayenta's usual pass mark is `min: 90`).
pub const BUILTIN_KAYENTA_SCORE: &str = "kayenta-score";
pub const BUILTINS: [&str; 3] = [
    BUILTIN_SUCCESS_RATE,
    BUILTIN_DURATION,
    BUILTIN_KAYENTA_SCORE,
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlertNotification {
    pub name: String,
    /// info (default: every message), warn (warnings and errors) or error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    pub provider_ref: TemplateRef,
    /// Coalmine: the AlertProvider's spec, copied in when the rollout is resolved so a stored
    /// rollout needs no other document. Holds no secret unless the provider wrote its address
    /// inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub provider: Option<AlertProviderSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionAffinity {
    pub cookie_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
    /// The remaining fields are Flagger's cookie attributes; accepted, applied by the router's
    /// defaults (Path=/; HttpOnly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_cookie_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitioned: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Webhook {
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: HookKind,
    pub url: HttpUrl,
    /// Flagger's default: 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub mute_alert: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, rename = "disableTLS", skip_serializing_if = "is_false")]
    pub disable_tls: bool,
}

/// Flagger's webhook types; the empty string means `rollout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookKind {
    ConfirmRollout,
    PreRollout,
    #[default]
    Rollout,
    ConfirmTrafficIncrease,
    ConfirmPromotion,
    PostRollout,
    Rollback,
    Event,
}

impl HookKind {
    pub const ALL: [HookKind; 8] = [
        HookKind::ConfirmRollout,
        HookKind::PreRollout,
        HookKind::Rollout,
        HookKind::ConfirmTrafficIncrease,
        HookKind::ConfirmPromotion,
        HookKind::PostRollout,
        HookKind::Rollback,
        HookKind::Event,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::ConfirmRollout => "confirm-rollout",
            HookKind::PreRollout => "pre-rollout",
            HookKind::Rollout => "rollout",
            HookKind::ConfirmTrafficIncrease => "confirm-traffic-increase",
            HookKind::ConfirmPromotion => "confirm-promotion",
            HookKind::PostRollout => "post-rollout",
            HookKind::Rollback => "rollback",
            HookKind::Event => "event",
        }
    }
}

/// In a CRD: one of the webhook type names (empty means `rollout`, as in Flagger).
impl schemars::JsonSchema for HookKind {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HookKind".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut names: Vec<&str> = vec![""];
        names.extend(HookKind::ALL.iter().map(|k| k.as_str()));
        schemars::json_schema!({ "type": "string", "enum": names })
    }
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for HookKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for HookKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(HookKind::Rollout);
        }
        HookKind::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| {
                let known: Vec<&str> = HookKind::ALL.iter().map(|k| k.as_str()).collect();
                let hint = crate::suggest::nearest(&text, known.iter().copied())
                    .map(|n| format!(", did you mean `{n}`?"))
                    .unwrap_or_else(|| format!(", expected one of {}", known.join(", ")));
                serde::de::Error::custom(format!("unknown webhook type `{text}`{hint}"))
            })
    }
}
