//! Flagger's threshold check: one number against `thresholdRange {min, max}`.

use serde::{Deserialize, Serialize};

/// What a metric provider returned for one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Reading {
    Value {
        value: f64,
    },
    /// The provider answered but had nothing to measure (no requests, an empty result).
    NoData {
        reason: String,
    },
    /// The provider could not be asked or gave an answer that is not one number.
    Error {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "verdict")]
pub enum Verdict {
    Pass,
    Fail {
        reason: String,
    },
    /// Not enough evidence either way; what that means is the rollout's `noData` rule.
    Inconclusive {
        reason: String,
    },
}

impl Verdict {
    pub fn is_pass(&self) -> bool {
        matches!(self, Verdict::Pass)
    }
}

/// A value inside the range passes; outside fails. Bounds are inclusive, as in Flagger
/// (`value < min` or `value > max` fails). A provider error is a failure (never a promotion on a
/// broken provider); no data is inconclusive. A NaN value is an error, not a pass.
pub fn judge_threshold(reading: &Reading, min: Option<f64>, max: Option<f64>) -> Verdict {
    match reading {
        Reading::Value { value } if value.is_nan() => Verdict::Fail {
            reason: "the metric is NaN".into(),
        },
        Reading::Value { value } => {
            if let Some(min) = min.filter(|m| value < m) {
                Verdict::Fail {
                    reason: format!("{} < {} (min)", trim(*value), trim(min)),
                }
            } else if let Some(max) = max.filter(|m| value > m) {
                Verdict::Fail {
                    reason: format!("{} > {} (max)", trim(*value), trim(max)),
                }
            } else {
                Verdict::Pass
            }
        }
        Reading::NoData { reason } => Verdict::Inconclusive {
            reason: format!("no data: {reason}"),
        },
        Reading::Error { reason } => Verdict::Fail {
            reason: reason.clone(),
        },
    }
}

/// Short numbers for reasons: 99.2, not 99.19999999.
fn trim(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(v: f64) -> Reading {
        Reading::Value { value: v }
    }

    #[test]
    fn bounds_are_inclusive_like_flaggers() {
        assert_eq!(
            judge_threshold(&value(99.0), Some(99.0), None),
            Verdict::Pass
        );
        assert_eq!(
            judge_threshold(&value(98.9), Some(99.0), None),
            Verdict::Fail {
                reason: "98.9 < 99 (min)".into()
            }
        );
        assert_eq!(
            judge_threshold(&value(500.0), None, Some(500.0)),
            Verdict::Pass
        );
        assert!(!judge_threshold(&value(500.5), None, Some(500.0)).is_pass());
    }

    #[test]
    fn missing_data_is_inconclusive_and_errors_fail() {
        let none = Reading::NoData {
            reason: "no requests".into(),
        };
        assert!(matches!(
            judge_threshold(&none, Some(99.0), None),
            Verdict::Inconclusive { .. }
        ));
        let broken = Reading::Error {
            reason: "timeout".into(),
        };
        assert!(matches!(
            judge_threshold(&broken, Some(99.0), None),
            Verdict::Fail { .. }
        ));
        assert!(!judge_threshold(&value(f64::NAN), Some(99.0), None).is_pass());
    }
}
