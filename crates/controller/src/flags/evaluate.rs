//! One flag evaluation, as OFREP answers it: pure — the flag as served, the evaluation context
//! in, the variant (or the OFREP error) out. The canary's share is bucketed by the targeting key
//! with the router's own sticky buckets (`coalmine_contract::sticky`), salted by the flag's
//! cohort, so a user the router sends to the canary sees the canary variant, and no other.

use serde_json::{json, Map, Value};

use coalmine_contract::{in_canary, sticky_bucket, StrMatch, Weight};
use coalmine_spec::flag::{Flag, TARGETING_KEY};

/// What the flag serves now: the machine's `Traffic` as the flag reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// No canary: everyone sees the stable variant (before the canary starts, after a rollback).
    Stable,
    /// The canary variant to the targeted users and to this share of the others.
    Split(Weight),
    /// Promoted: everyone sees the canary variant.
    Promoted,
}

/// A flag as the daemon serves it: its document, compiled, and what it serves now.
#[derive(Debug, Clone)]
pub struct ServedFlag {
    /// The rollout stepping it.
    pub rollout: String,
    pub flag: Flag,
    /// The route name whose sticky buckets it shares.
    pub cohort: String,
    pub salt: u64,
    /// `flag.targeting`, compiled: any rule whose conditions all hold.
    pub targeting: Vec<Vec<(String, StrMatch)>>,
    pub serving: Serving,
}

/// OFREP's reasons for a successful evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A targeting rule matched the context.
    TargetingMatch,
    /// Bucketed into the canary's share, or out of it, by the targeting key.
    Split,
    /// Everyone sees the same variant (promoted).
    Static,
    /// No canary: the stable variant, the flag's default.
    Default,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Split => "SPLIT",
            Reason::Static => "STATIC",
            Reason::Default => "DEFAULT",
        }
    }
}

/// OFREP's error codes, each with its details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvaluationError {
    #[error("no flag {0:?} is served here")]
    FlagNotFound(String),
    #[error("{0}")]
    TargetingKeyMissing(String),
    #[error("{0}")]
    InvalidContext(String),
    #[error("{0}")]
    ParseError(String),
}

impl EvaluationError {
    pub fn code(&self) -> &'static str {
        match self {
            EvaluationError::FlagNotFound(_) => "FLAG_NOT_FOUND",
            EvaluationError::TargetingKeyMissing(_) => "TARGETING_KEY_MISSING",
            EvaluationError::InvalidContext(_) => "INVALID_CONTEXT",
            EvaluationError::ParseError(_) => "PARSE_ERROR",
        }
    }

    /// OFREP's failure document for flag `key`.
    pub fn to_json(&self, key: &str) -> Value {
        json!({
            "key": key,
            "reason": "ERROR",
            "errorCode": self.code(),
            "errorDetails": self.to_string(),
        })
    }
}

/// A successful evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub variant: String,
    pub value: Value,
    pub reason: Reason,
}

/// The evaluation context of an OFREP request body: `{"context": {...}}` (an empty body or
/// no `context` is an empty context).
pub fn context_of(body: &[u8]) -> Result<Map<String, Value>, EvaluationError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| EvaluationError::ParseError(format!("the request body is not JSON: {e}")))?;
    let Value::Object(mut request) = request else {
        return Err(EvaluationError::InvalidContext(
            "the request body is not a JSON object with a `context`".into(),
        ));
    };
    let context = match request.remove("context") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(context)) => context,
        Some(_) => {
            return Err(EvaluationError::InvalidContext(
                "`context` is not a JSON object".into(),
            ))
        }
    };
    match context.get(TARGETING_KEY) {
        None | Some(Value::String(_)) => Ok(context),
        Some(_) => Err(EvaluationError::InvalidContext(
            "`context.targetingKey` is not a string".into(),
        )),
    }
}

impl ServedFlag {
    /// Compiles a flag for serving (its targeting rules are checked when the document is read);
    /// `rollout_cohort` is its rollout's (`Rollout::cohort`: its group's, or its name), shared
    /// unless the flag names its own.
    pub fn new(
        rollout: &str,
        rollout_cohort: &str,
        route_service: &str,
        flag: &Flag,
        serving: Serving,
    ) -> Result<ServedFlag, coalmine_contract::Invalid> {
        let cohort = flag.cohort_of(rollout_cohort).to_string();
        let targeting = flag
            .targeting
            .iter()
            .map(|rule| {
                rule.iter()
                    .map(|(attribute, test)| Ok((attribute.clone(), test.to_str_match()?)))
                    .collect::<Result<Vec<_>, coalmine_contract::Invalid>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServedFlag {
            rollout: rollout.to_string(),
            salt: coalmine_contract::sticky_salt(&cohort, route_service),
            cohort,
            flag: flag.clone(),
            targeting,
            serving,
        })
    }

    /// The variant `context` sees.
    pub fn evaluate(&self, context: &Map<String, Value>) -> Result<Evaluation, EvaluationError> {
        let (variant, reason) = match self.serving {
            Serving::Promoted => (&self.flag.canary, Reason::Static),
            Serving::Stable => (&self.flag.stable, Reason::Default),
            Serving::Split(share) => {
                if self.targeted(context) {
                    (&self.flag.canary, Reason::TargetingMatch)
                } else {
                    let key = match context.get(TARGETING_KEY) {
                        Some(Value::String(key)) => key,
                        _ => {
                            return Err(EvaluationError::TargetingKeyMissing(format!(
                                "flag {:?} splits users by `targetingKey`; the context has none",
                                self.flag.key
                            )))
                        }
                    };
                    let canary = in_canary(sticky_bucket(key.as_bytes(), self.salt), share);
                    let variant = if canary {
                        &self.flag.canary
                    } else {
                        &self.flag.stable
                    };
                    (variant, Reason::Split)
                }
            }
        };
        Ok(Evaluation {
            variant: variant.clone(),
            value: self.flag.variants[variant].clone(),
            reason,
        })
    }

    /// Whether some targeting rule holds entirely for `context`.
    fn targeted(&self, context: &Map<String, Value>) -> bool {
        self.targeting.iter().any(|rule| {
            rule.iter().all(|(attribute, test)| {
                attribute_text(context, attribute).is_some_and(|v| test.matches(&v))
            })
        })
    }

    /// OFREP's success document for an evaluation of this flag.
    pub fn success_json(&self, e: &Evaluation) -> Value {
        let share = match self.serving {
            Serving::Stable => 0.0,
            Serving::Split(w) => w.percent(),
            Serving::Promoted => 100.0,
        };
        json!({
            "key": self.flag.key,
            "value": e.value,
            "reason": e.reason.as_str(),
            "variant": e.variant,
            "metadata": {
                "rollout": self.rollout,
                "cohort": self.cohort,
                "canaryPercent": share,
            },
        })
    }
}

/// A context attribute as text: a string as it is, a number or boolean as JSON writes it;
/// anything else (objects, lists, null) matches no rule.
fn attribute_text(context: &Map<String, Value>, attribute: &str) -> Option<String> {
    match context.get(attribute)? {
        Value::String(s) => Some(s.clone()),
        v @ (Value::Number(_) | Value::Bool(_)) => Some(v.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(serving: Serving) -> ServedFlag {
        let flag: Flag = serde_json::from_value(json!({
            "key": "new-checkout",
            "variants": {"on": true, "off": false},
            "canary": "on",
            "stable": "off",
            "targeting": [{"user-id": {"regex": "qa-.*"}}, {"region": {"exact": "eu"}, "plan": {"exact": "pro"}}],
        }))
        .unwrap();
        ServedFlag::new("checkout", "checkout", "default", &flag, serving).unwrap()
    }

    fn ctx(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_share_follows_the_routers_sticky_buckets() {
        let f = flag(Serving::Split(Weight::from_basis_points(2_500).unwrap()));
        let salt = coalmine_contract::sticky_salt("checkout", "default");
        for i in 0..1_000 {
            let user = format!("user-{i}");
            let e = f.evaluate(&ctx(json!({"targetingKey": user}))).unwrap();
            let expected = sticky_bucket(user.as_bytes(), salt) < 2_500;
            assert_eq!(e.variant == "on", expected, "{user}");
            assert_eq!(e.reason, Reason::Split);
        }
    }

    #[test]
    fn targeted_users_see_the_canary_and_a_missing_key_is_an_error() {
        let f = flag(Serving::Split(Weight::ZERO));
        let e = f.evaluate(&ctx(json!({"user-id": "qa-7"}))).unwrap();
        assert_eq!(
            (e.variant.as_str(), e.reason),
            ("on", Reason::TargetingMatch)
        );
        let e = f
            .evaluate(&ctx(
                json!({"targetingKey": "u", "region": "eu", "plan": "pro"}),
            ))
            .unwrap();
        assert_eq!(e.reason, Reason::TargetingMatch);
        let e = f
            .evaluate(&ctx(
                json!({"targetingKey": "u", "region": "eu", "plan": "free"}),
            ))
            .unwrap();
        assert_eq!((e.variant.as_str(), e.reason), ("off", Reason::Split));
        let missing = f.evaluate(&ctx(json!({"region": "eu"}))).unwrap_err();
        assert_eq!(missing.code(), "TARGETING_KEY_MISSING");
        // Once promoted or rolled back, nobody needs a key.
        let e = flag(Serving::Promoted).evaluate(&Map::new()).unwrap();
        assert_eq!((e.variant.as_str(), e.reason), ("on", Reason::Static));
        let e = flag(Serving::Stable)
            .evaluate(&ctx(json!({"user-id": "qa-1"})))
            .unwrap();
        assert_eq!((e.variant.as_str(), e.reason), ("off", Reason::Default));
    }

    #[test]
    fn request_bodies_are_read_as_ofrep_says() {
        assert_eq!(context_of(b"").unwrap(), Map::new());
        assert_eq!(context_of(b"{}").unwrap(), Map::new());
        assert_eq!(context_of(b"{nope").unwrap_err().code(), "PARSE_ERROR");
        assert_eq!(context_of(b"[1]").unwrap_err().code(), "INVALID_CONTEXT");
        assert_eq!(
            context_of(br#"{"context": 3}"#).unwrap_err().code(),
            "INVALID_CONTEXT"
        );
        assert_eq!(
            context_of(br#"{"context": {"targetingKey": 5}}"#)
                .unwrap_err()
                .code(),
            "INVALID_CONTEXT"
        );
    }
}
