//! `coalmine simulate --scenario FILE`: synthetic traffic for a rollout on a virtual clock.
//!
//! ```yaml
//! traffic: {rps: 200}          # total requests per second; `curve` varies it over time
//! duration: 45m                # a run still undecided then counts as undecided
//! stable: {errorRate: 0.001, latency: {median: 50ms, sigma: 0.5}}   # lognormal
//! canary: {errorRate: 0.10,  latency: {median: 50ms, sigma: 0.5}, startAfter: 0s}
//! ```

use serde::{Deserialize, Serialize};

use crate::duration::Dur;
use crate::yaml::{parse_yaml, SpecError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scenario {
    pub traffic: TrafficShape,
    pub duration: Dur,
    pub stable: Behaviour,
    pub canary: Behaviour,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficShape {
    /// Requests per second at the start (and throughout without a curve).
    #[serde(deserialize_with = "positive")]
    pub rps: f64,
    /// From each point's time on, the rate is its `rps` (a step function).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<CurvePoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CurvePoint {
    pub at: Dur,
    #[serde(deserialize_with = "non_negative")]
    pub rps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Behaviour {
    /// Share of requests answered 5xx.
    #[serde(deserialize_with = "probability")]
    pub error_rate: f64,
    pub latency: Latency,
    /// Canary only: it behaves like stable until then (a bug that shows up later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_after: Option<Dur>,
}

/// Lognormal latency: `median` is e^μ, `sigma` the standard deviation of its logarithm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Latency {
    pub median: Dur,
    #[serde(deserialize_with = "non_negative")]
    pub sigma: f64,
}

impl TrafficShape {
    /// Requests per second at `t_ms` after the start.
    pub fn rps_at(&self, t_ms: u64) -> f64 {
        self.curve
            .iter()
            .filter(|p| p.at.0.as_millis() as u64 <= t_ms)
            .max_by_key(|p| p.at.0)
            .map_or(self.rps, |p| p.rps)
    }
}

fn number<'de, D: serde::Deserializer<'de>>(
    d: D,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && ok(v) {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!("{v} is not {what}")))
    }
}

fn positive<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    number(d, |v| v > 0.0, "above 0")
}

fn non_negative<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    number(d, |v| v >= 0.0, "0 or more")
}

fn probability<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    number(d, |v| (0.0..=1.0).contains(&v), "a share between 0 and 1")
}

pub fn parse_scenario(file: &str, text: &str) -> Result<Scenario, SpecError> {
    parse_yaml(file, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_scenario_reads_and_mistakes_are_located() {
        let text = "traffic: {rps: 200, curve: [{at: 10m, rps: 50}]}
duration: 45m
stable: {errorRate: 0.001, latency: {median: 50ms, sigma: 0.5}}
canary: {errorRate: 0.10,  latency: {median: 50ms, sigma: 0.5}, startAfter: 0s}
";
        let s = parse_scenario("s.yaml", text).unwrap();
        assert_eq!(s.traffic.rps_at(0), 200.0);
        assert_eq!(s.traffic.rps_at(600_000), 50.0);
        assert_eq!(s.canary.error_rate, 0.1);
        let bad = text.replace("errorRate: 0.10", "errorRate: 1.5");
        let err = parse_scenario("s.yaml", &bad).unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (4, "canary.errorRate"));
    }
}
