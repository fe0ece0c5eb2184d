//! The traffic backend for Coalmine's own routers: their admin API (`PUT /routes`, `GET /stats`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use coalmine_rollout::Traffic;
use coalmine_spec::rollout::{Analysis, HttpMatch, HttpUrl, StringMatch};
use coalmine_spec::weight::basis_points_to_percent;

/// What a rollout's routers serve, apart from the weights the state machine decides.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub name: String,
    pub stable: String,
    pub canary: String,
    /// Router match rules (`{"all": [...]}`) from the analysis' `match`.
    pub match_rules: Vec<Value>,
    pub affinity: Option<Value>,
}

impl Upstreams {
    pub fn new(name: &str, stable: &str, canary: &str, analysis: &Analysis) -> Upstreams {
        Upstreams {
            name: name.to_string(),
            stable: stable.to_string(),
            canary: canary.to_string(),
            match_rules: analysis.match_.iter().filter_map(router_rule).collect(),
            affinity: analysis.session_affinity.as_ref().map(|a| {
                let mut v = json!({"cookieName": a.cookie_name});
                if let Some(age) = a.max_age {
                    v["maxAge"] = json!(age);
                }
                v
            }),
        }
    }

    /// The route document that makes a router do what `traffic` says.
    pub fn routes(&self, traffic: &Traffic) -> Value {
        let (stable, canary) = if traffic.promoted {
            (&self.canary, None)
        } else if traffic.canary {
            (&self.stable, Some(&self.canary))
        } else {
            (&self.stable, None)
        };
        let match_rules: &[Value] = if traffic.apply_match && canary.is_some() {
            &self.match_rules
        } else {
            &[]
        };
        json!({
            "name": self.name,
            "stable": stable,
            "canary": canary,
            "canaryWeight": basis_points_to_percent(traffic.canary_weight),
            "match": match_rules,
            "affinity": if canary.is_some() { self.affinity.clone() } else { None },
            "mirror": basis_points_to_percent(traffic.mirror_weight),
        })
    }
}

/// Flagger's HTTPMatchRequest as a router rule: every header and query condition must hold.
/// `sourceLabels` needs a mesh and is dropped (`coalmine check` warns about it).
fn router_rule(m: &HttpMatch) -> Option<Value> {
    let condition = |subject: &str, name: &str, test: &StringMatch| {
        let (kind, value) = match test {
            StringMatch::Exact(v) => ("exact", v),
            StringMatch::Prefix(v) => ("prefix", v),
            StringMatch::Suffix(v) => ("suffix", v),
            StringMatch::Regex(v) => ("regex", v),
        };
        json!({ subject: name, kind: value })
    };
    let all: Vec<Value> = m
        .headers
        .iter()
        .map(|(n, t)| condition("header", n, t))
        .chain(m.query_params.iter().map(|(n, t)| condition("query", n, t)))
        .collect();
    (!all.is_empty()).then(|| json!({ "all": all }))
}

/// One router's counters, as `/stats` reports them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterStats {
    pub instance: String,
    pub started_unix_ms: u64,
    pub stable: VersionStats,
    pub canary: VersionStats,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionStats {
    pub requests: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub latency: Latency,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// `[microseconds, count]`; equal values add up across routers and over time.
    pub counts: Vec<(u64, u64)>,
}

/// The routers carrying one rollout's traffic.
#[derive(Debug, Clone)]
pub struct RouterSet {
    admins: Vec<HttpUrl>,
    client: reqwest::Client,
}

impl RouterSet {
    pub fn new(admins: Vec<HttpUrl>) -> RouterSet {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("a TLS-less client always builds");
        RouterSet { admins, client }
    }

    pub fn admins(&self) -> &[HttpUrl] {
        &self.admins
    }

    /// Applies the same table to every router. All must take it; the first refusal is the error.
    pub async fn apply(&self, routes: &Value) -> Result<(), String> {
        for admin in &self.admins {
            let url = format!("{admin}/routes");
            let resp = self
                .client
                .put(&url)
                .json(routes)
                .send()
                .await
                .map_err(|e| format!("{admin}: {}", reqwest_reason(&e)))?;
            if !resp.status().is_success() {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                return Err(format!("{admin} refused the routes ({status}): {body}"));
            }
        }
        Ok(())
    }

    /// Every router's `/stats`, in the order of `admins`.
    pub async fn stats(&self) -> Result<Vec<RouterStats>, String> {
        let mut out = Vec::with_capacity(self.admins.len());
        for admin in &self.admins {
            let url = format!("{admin}/stats");
            let resp = self
                .client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("{admin}: {}", reqwest_reason(&e)))?;
            if !resp.status().is_success() {
                return Err(format!("{admin}/stats answered {}", resp.status()));
            }
            let stats = resp
                .json::<RouterStats>()
                .await
                .map_err(|e| format!("{admin}/stats is not a stats document: {e}"))?;
            out.push(stats);
        }
        Ok(out)
    }
}

/// reqwest's Display omits the cause ("error sending request"); the cause is what users need.
pub fn reqwest_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    if e.is_connect() {
        return "connection refused or unreachable".into();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}
