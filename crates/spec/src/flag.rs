//! `spec.flag` (Coalmine's): a feature flag the rollout steps instead of, or with, a router's
//! weight. Coalmine serves it over OpenFeature's remote evaluation protocol (OFREP); the
//! canary variant goes to the rollout's share of users, bucketed by their targeting key with
//! the router's sticky buckets (`coalmine_contract::sticky`), so the same users see the canary
//! whether the router or the app decides.
//!
//! ```yaml
//! flag:
//!   key: new-checkout
//!   variants: {on: true, off: false}
//!   canary: on
//!   stable: off
//!   cohort: checkout          # whose sticky buckets to share (default: the rollout's cohort, as its routes)
//!   targeting:                # any entry whose attributes all match → the canary variant
//!     - user-id: {regex: "qa-.*"}
//!     - region: {exact: eu-west}
//!       plan: {exact: enterprise}
//!   prometheus:               # optional: the app's own series in Prometheus, by `variant`
//!     address: http://127.0.0.1:9090
//!     requests: app_requests_total              # a counter labelled `variant` and `status`
//!     duration: app_request_duration_seconds    # a histogram in seconds, labelled `variant`
//!     selector: 'app="shop"'                    # more label matchers (optional)
//! ```
//!
//! Without `prometheus`, the app reports its counts to `serve` (`POST /api/v1/flags/{key}/counts`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollout::StringMatch;

/// The context attribute naming the targeting key itself in a targeting rule.
pub const TARGETING_KEY: &str = "targetingKey";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawFlag", into = "RawFlag")]
pub struct Flag {
    /// The flag's key: `/ofrep/v1/evaluate/flags/{key}`.
    pub key: String,
    /// Each variant's value (any JSON value: a boolean, string, number or object).
    pub variants: BTreeMap<String, serde_json::Value>,
    /// The variant the rollout's share of users sees (the new behaviour).
    pub canary: String,
    /// The variant everyone else sees, and everyone after a rollback.
    pub stable: String,
    /// The route name whose sticky buckets the flag shares; none: the route the rollout's
    /// routers carry (named after the rollout).
    pub cohort: Option<String>,
    /// User groups that see the canary variant whenever there is a canary, whatever its share.
    pub targeting: Vec<BTreeMap<String, StringMatch>>,
    /// Where the app's per-variant series are, if in Prometheus.
    pub prometheus: Option<FlagSeries>,
}

/// `flag.prometheus`: the app's request counter and latency histogram in Prometheus, each series
/// labelled with the flag's `variant`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlagSeries {
    /// Prometheus' base URL.
    pub address: crate::rollout::HttpUrl,
    /// The request counter (labels `variant` and the status label).
    #[serde(deserialize_with = "metric_name")]
    pub requests: String,
    /// The latency histogram in seconds (its `_bucket` series, labels `variant` and `le`).
    #[serde(deserialize_with = "metric_name")]
    pub duration: String,
    /// The label holding the HTTP status (default `status`; 5xx are failures).
    #[serde(default = "default_status_label", deserialize_with = "label_name")]
    pub status_label: String,
    /// More label matchers picking the app's series (`app="shop",env="prod"`).
    #[serde(default, deserialize_with = "selector")]
    pub selector: String,
}

fn default_status_label() -> String {
    "status".into()
}

fn metric_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let first = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    if !name.starts_with(first) || !name.chars().all(|c| first(c) || c.is_ascii_digit()) {
        return Err(serde::de::Error::custom(format!(
            "{name:?} is not a Prometheus metric name"
        )));
    }
    Ok(name)
}

fn label_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let first = |c: char| c.is_ascii_alphabetic() || c == '_';
    if !name.starts_with(first) || !name.chars().all(|c| first(c) || c.is_ascii_digit()) {
        return Err(serde::de::Error::custom(format!(
            "{name:?} is not a Prometheus label name"
        )));
    }
    Ok(name)
}

/// Label matchers go inside the series' braces: no braces of their own.
fn selector<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    if text.contains(['{', '}']) {
        return Err(serde::de::Error::custom(format!(
            "{text:?}: write the label matchers alone (app=\"shop\"), without braces"
        )));
    }
    Ok(text.trim().trim_end_matches(',').to_string())
}

impl Flag {
    /// The name whose sticky salt the flag's buckets use (see `coalmine_contract::sticky_salt`):
    /// its own `cohort`, or its rollout's (`Rollout::cohort`), as the rollout's routes use.
    pub fn cohort_of<'a>(&'a self, rollout_cohort: &'a str) -> &'a str {
        self.cohort.as_deref().unwrap_or(rollout_cohort)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFlag {
    #[serde(deserialize_with = "flag_key")]
    key: String,
    variants: BTreeMap<String, serde_json::Value>,
    canary: String,
    stable: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cohort: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    targeting: Vec<BTreeMap<String, StringMatch>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prometheus: Option<FlagSeries>,
}

/// A flag key is one path segment of the OFREP URL: letters, digits, `.`, `_`, `-`.
fn flag_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let key = String::deserialize(d)?;
    check_flag_key(&key).map_err(serde::de::Error::custom)?;
    Ok(key)
}

/// Whether `key` can name a flag (one path segment of the OFREP URL).
pub fn check_flag_key(key: &str) -> Result<(), String> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if key.is_empty() || key.len() > 253 || !key.chars().all(fine) || key == "." || key == ".." {
        return Err(format!(
            "{key:?} is not a flag key: 1 to 253 letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

impl TryFrom<RawFlag> for Flag {
    type Error = String;
    fn try_from(raw: RawFlag) -> Result<Self, String> {
        let known = || {
            raw.variants
                .keys()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if raw.variants.len() < 2 {
            return Err(
                "variants: a flag needs at least two variants, the canary's and the stable one's"
                    .into(),
            );
        }
        for (field, name) in [("canary", &raw.canary), ("stable", &raw.stable)] {
            if !raw.variants.contains_key(name) {
                return Err(format!(
                    "{field}: no variant {name:?} (the variants: {})",
                    known()
                ));
            }
        }
        if raw.canary == raw.stable {
            return Err(format!(
                "canary and stable are both {:?}: they name two different variants",
                raw.canary
            ));
        }
        if let Some(cohort) = &raw.cohort {
            if cohort.is_empty() {
                return Err(
                    "cohort: an empty name (leave it out to share the rollout's route's buckets)"
                        .into(),
                );
            }
        }
        if let Some(i) = raw.targeting.iter().position(BTreeMap::is_empty) {
            return Err(format!(
                "targeting[{i}]: an empty rule would match everyone; name at least one context attribute"
            ));
        }
        Ok(Flag {
            key: raw.key,
            variants: raw.variants,
            canary: raw.canary,
            stable: raw.stable,
            cohort: raw.cohort,
            targeting: raw.targeting,
            prometheus: raw.prometheus,
        })
    }
}

impl From<Flag> for RawFlag {
    fn from(f: Flag) -> Self {
        RawFlag {
            key: f.key,
            variants: f.variants,
            canary: f.canary,
            stable: f.stable,
            cohort: f.cohort,
            targeting: f.targeting,
            prometheus: f.prometheus,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::parse_yaml;
    use crate::rollout::Rollout;

    fn rollout(flag: &str) -> String {
        format!(
            "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: checkout
spec:
  flag:
{flag}
  analysis:
    stepWeight: 10
"
        )
    }

    #[test]
    fn a_flag_block_reads_as_written() {
        let text = rollout(
            "    key: new-checkout
    variants: {on: true, off: false}
    canary: on
    stable: off
    targeting:
      - user-id: {regex: \"qa-.*\"}
      - region: {exact: eu}
        plan: {exact: pro}",
        );
        let r: Rollout = parse_yaml("r.yaml", &text).unwrap();
        let flag = r.spec.flag.unwrap();
        assert_eq!(flag.key, "new-checkout");
        assert_eq!(flag.variants["on"], serde_json::json!(true));
        assert_eq!((flag.canary.as_str(), flag.stable.as_str()), ("on", "off"));
        assert_eq!(flag.cohort_of("checkout"), "checkout");
        assert_eq!(flag.targeting.len(), 2);
    }

    #[test]
    fn bad_flags_are_named_at_their_place() {
        let cases = [
            (
                "    key: new checkout\n    variants: {on: true, off: false}\n    canary: on\n    stable: off",
                "r.yaml:7:10: spec.flag.key: \"new checkout\" is not a flag key",
            ),
            (
                "    key: k\n    variants: {on: true, off: false}\n    canary: yes\n    stable: off",
                "canary: no variant \"yes\"",
            ),
            (
                "    key: k\n    variants: {on: true}\n    canary: on\n    stable: on",
                "at least two variants",
            ),
            (
                "    key: k\n    variants: {on: true, off: false}\n    canary: on\n    stable: off\n    targeting:\n      - user-id: {regex: \"(\"}",
                "spec.flag.targeting",
            ),
            (
                "    key: k\n    variants: {on: true, off: false}\n    canary: on\n    stable: off\n    colour: red",
                "unknown field `colour`",
            ),
            (
                "    key: k\n    variants: {on: true, off: false}\n    canary: on\n    stable: off\n    prometheus:\n      address: http://p:9090\n      requests: app requests\n      duration: d",
                "r.yaml:13:17: spec.flag.prometheus.requests: \"app requests\" is not a Prometheus metric name",
            ),
            (
                "    key: k\n    variants: {on: true, off: false}\n    canary: on\n    stable: off\n    prometheus:\n      address: http://p:9090\n      requests: r\n      duration: d\n      selector: '{app=\"x\"}'",
                "without braces",
            ),
        ];
        for (flag, expected) in cases {
            let err = parse_yaml::<Rollout>("r.yaml", &rollout(flag)).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err}\nwanted: {expected}"
            );
            assert!(err.to_string().starts_with("r.yaml:"), "{err}");
        }
    }
}
