//! The feature-flag counts document an app posts to `coalmine serve` (`POST
//! /api/v1/flags/{key}/counts`): what each variant's requests did since the app's last report.
//! Reports add up; the rollout judges the canary variant against the stable one on them, as it
//! judges a router's two versions on `/stats`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Per variant (by name), the counts since the last report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlagCountsDoc {
    pub variants: BTreeMap<String, VariantCounts>,
}

/// One variant's requests since the last report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawVariantCounts")]
pub struct VariantCounts {
    /// Requests served under this variant.
    pub requests: u64,
    /// Of those, the ones that failed (a 5xx, or whatever the app counts as a failure).
    #[serde(default)]
    pub errors: u64,
    /// Latency histogram: `[upper bound in microseconds, requests]` pairs; optional (without
    /// it the latency checks have no data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_micros: Vec<(u64, u64)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawVariantCounts {
    requests: u64,
    #[serde(default)]
    errors: u64,
    #[serde(default)]
    latency_micros: Vec<(u64, u64)>,
}

impl TryFrom<RawVariantCounts> for VariantCounts {
    type Error = crate::Invalid;
    fn try_from(raw: RawVariantCounts) -> Result<Self, crate::Invalid> {
        if raw.errors > raw.requests {
            return Err(
                format!("errors ({}) exceed requests ({})", raw.errors, raw.requests).into(),
            );
        }
        let timed = raw
            .latency_micros
            .iter()
            .try_fold(0u64, |sum, (_, n)| sum.checked_add(*n));
        match timed {
            Some(t) if t <= raw.requests => {}
            _ => {
                return Err(format!(
                    "latencyMicros counts more requests than requests ({})",
                    raw.requests
                )
                .into())
            }
        }
        Ok(VariantCounts {
            requests: raw.requests,
            errors: raw.errors,
            latency_micros: raw.latency_micros,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_that_cannot_be_are_refused_with_the_reason() {
        let bad = serde_json::from_str::<FlagCountsDoc>(
            r#"{"variants": {"on": {"requests": 3, "errors": 4}}}"#,
        )
        .unwrap_err();
        assert!(
            bad.to_string().contains("errors (4) exceed requests (3)"),
            "{bad}"
        );
        let bad = serde_json::from_str::<FlagCountsDoc>(
            r#"{"variants": {"on": {"requests": 3, "latencyMicros": [[1000, 2], [2000, 2]]}}}"#,
        )
        .unwrap_err();
        assert!(bad.to_string().contains("latencyMicros"), "{bad}");
        let good: FlagCountsDoc = serde_json::from_str(
            r#"{"variants": {"on": {"requests": 3, "errors": 1, "latencyMicros": [[1000, 3]]}}}"#,
        )
        .unwrap();
        assert_eq!(good.variants["on"].errors, 1);
    }
}
