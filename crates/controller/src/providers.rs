//! Metric providers: ask Prometheus (an instant query) or any HTTP endpoint answering JSON
//! (`web`) for one number. Every way of not getting exactly one number becomes a reading with the
//! reason in words: the check fails (or, for no data, waits per the rollout's `noData` rule), and
//! the rollout is never promoted on an answer it could not read.

use std::time::Duration;

use serde_json::Value;

use coalmine_judge::Reading;
use coalmine_spec::rollout::MetricCheck;
use coalmine_spec::templates::{Provider, WebMethod, DEFAULT_QUERY_TIMEOUT, PROMETHEUS, WEB};

use crate::http::reqwest_reason;

/// How much of an unexpected answer a reason quotes.
const QUOTE_CHARS: usize = 200;

/// HTTP clients for the providers: one that verifies certificates and one for providers with
/// `insecureSkipVerify` (built only if a check asks for it).
#[derive(Clone)]
pub struct Providers {
    client: reqwest::Client,
    insecure: Option<reqwest::Client>,
}

impl Providers {
    pub fn new(checks: &[MetricCheck]) -> Providers {
        Self::with_insecure(
            checks
                .iter()
                .any(|c| c.provider.as_ref().is_some_and(|p| p.insecure_skip_verify)),
        )
    }

    /// The clients for asking one provider (a Prometheus that the traffic provider's series are
    /// read from).
    pub fn for_provider(provider: &Provider) -> Providers {
        Self::with_insecure(provider.insecure_skip_verify)
    }

    fn with_insecure(insecure: bool) -> Providers {
        let insecure = insecure.then(|| {
            reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .build()
                .unwrap_or_default()
        });
        Providers {
            client: reqwest::Client::new(),
            insecure,
        }
    }

    /// The check's current value, from its (resolved) provider and query.
    pub async fn read(&self, check: &MetricCheck) -> Reading {
        let (Some(provider), Some(query)) = (&check.provider, &check.query) else {
            return error(format!(
                "metric {:?} has no provider and query (its templateRef was not resolved)",
                check.name
            ));
        };
        let origin = provider_name(provider);
        let (status, body) = match self.ask(provider, query, None).await {
            Ok(answer) => answer,
            Err(Unanswered::Unsupported(reason)) => return error(reason),
            Err(Unanswered::NoAnswer(reason)) => return error(format!("{origin}: {reason}")),
        };
        let reading = match provider.kind.as_str() {
            PROMETHEUS => prometheus_reading(status, &body),
            _ => web_reading(status, &body, query),
        };
        with_origin(reading, &origin)
    }

    /// Prometheus' answer to the instant query `query` evaluated at unix time `at` (several
    /// queries at one time read one moment), whatever its type: the answer's `data`
    /// (`resultType` and `result`). The reasons name the provider, its address redacted.
    pub async fn prometheus_data(
        &self,
        provider: &Provider,
        query: &str,
        at: f64,
    ) -> Result<Value, QueryError> {
        let origin = provider_name(provider);
        let (status, body) = self
            .ask(provider, query, Some(at))
            .await
            .map_err(|e| match e {
                Unanswered::Unsupported(reason) => QueryError::Failed(reason),
                Unanswered::NoAnswer(reason) => {
                    QueryError::Unreachable(format!("{origin}: {reason}"))
                }
            })?;
        prometheus_answer(status, &body)
            .map_err(|reason| QueryError::Failed(format!("{origin}: {reason}")))
    }

    /// Sends `provider` its query (a Prometheus one evaluated at unix time `at`, or now): the
    /// answer's status and body, whatever they are.
    async fn ask(
        &self,
        provider: &Provider,
        query: &str,
        at: Option<f64>,
    ) -> Result<(u16, Vec<u8>), Unanswered> {
        let client = match (&self.insecure, provider.insecure_skip_verify) {
            (Some(insecure), true) => insecure,
            _ => &self.client,
        };
        let timeout = provider
            .timeout
            .map(|d| d.0)
            .unwrap_or(DEFAULT_QUERY_TIMEOUT);
        let address = provider.address.as_deref().unwrap_or_default();
        let request = match provider.kind.as_str() {
            PROMETHEUS => client
                .get(format!("{}/api/v1/query", address.trim_end_matches('/')))
                // Prometheus stops evaluating when its own timeout passes, sparing it the work.
                .query(&[("query", query), ("timeout", &prometheus_seconds(timeout))])
                .query(&Vec::from_iter(at.map(|at| ("time", format!("{at:.3}"))))),
            WEB => match provider.method.unwrap_or(WebMethod::Get) {
                WebMethod::Get => client.get(address),
                WebMethod::Post => client
                    .post(address)
                    .body(provider.body.clone().unwrap_or_default()),
            },
            other => {
                return Err(Unanswered::Unsupported(format!(
                    "provider type {other:?} is not supported"
                )))
            }
        };
        let request = with_headers(request, provider).timeout(timeout);
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(Unanswered::NoAnswer(format!(
                    "no answer within {} (the provider's timeout)",
                    coalmine_spec::format_duration(timeout)
                )))
            }
            Err(e) => return Err(Unanswered::NoAnswer(reqwest_reason(&e))),
        };
        let status = response.status().as_u16();
        match response.bytes().await {
            Ok(body) => Ok((status, body.to_vec())),
            Err(e) => Err(Unanswered::NoAnswer(format!(
                "reading the answer failed: {}",
                reqwest_reason(&e)
            ))),
        }
    }
}

/// Why a provider's answer could not be had.
enum Unanswered {
    /// A provider type Coalmine cannot ask.
    Unsupported(String),
    /// Asked, and no (whole) answer came.
    NoAnswer(String),
}

/// Why a Prometheus query gave no data to read. The reasons name the provider (address
/// redacted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// No answer: refused, unreachable, timed out, broken off.
    #[error("{0}")]
    Unreachable(String),
    /// An answer that is not a successful Prometheus answer.
    #[error("{0}")]
    Failed(String),
}

fn error(reason: String) -> Reading {
    Reading::Error { reason }
}

fn with_headers(
    mut request: reqwest::RequestBuilder,
    provider: &Provider,
) -> reqwest::RequestBuilder {
    for (name, values) in &provider.headers {
        for value in values.values() {
            request = request.header(name.as_str(), value.as_str());
        }
    }
    request
}

/// How a provider is named in reasons: its kind and address, without credentials.
fn provider_name(provider: &Provider) -> String {
    let address = coalmine_spec::redact::url(provider.address.as_deref().unwrap_or_default());
    match provider.kind.as_str() {
        PROMETHEUS => format!("prometheus {address}"),
        _ => format!("web {address}"),
    }
}

fn with_origin(reading: Reading, origin: &str) -> Reading {
    match reading {
        Reading::NoData { reason } => Reading::NoData {
            reason: format!("{origin}: {reason}"),
        },
        Reading::Error { reason } => Reading::Error {
            reason: format!("{origin}: {reason}"),
        },
        value => value,
    }
}

/// Prometheus' duration syntax for a timeout (milliseconds, which it always accepts).
fn prometheus_seconds(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// Reads Prometheus' answer to an instant query (`/api/v1/query`): one series or a scalar is a
/// value; no series or NaN is no data (nothing was measured, e.g. 0/0 with no canary traffic);
/// anything else is an error.
pub fn prometheus_reading(status: u16, body: &[u8]) -> Reading {
    let data = match prometheus_answer(status, body) {
        Ok(data) => data,
        Err(reason) => return error(reason),
    };
    let sample = match (data["resultType"].as_str(), &data["result"]) {
        (Some("vector"), Value::Array(series)) => match series.as_slice() {
            [] => {
                return Reading::NoData {
                    reason: "the query returned no series".into(),
                }
            }
            [one] => &one["value"],
            many => {
                return error(format!(
                    "the query returned {} series where one number is needed ({}, ...): aggregate it, e.g. with sum()",
                    many.len(),
                    many[0]["metric"]
                ))
            }
        },
        (Some("scalar"), sample) => sample,
        (kind, _) => {
            return error(format!(
                "the query returned a {} where one number is needed",
                kind.unwrap_or("result of unknown type")
            ))
        }
    };
    // A sample is [unix_time, "value"]; Prometheus writes the value as a string.
    let value = sample[1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .or_else(|| sample[1].as_f64());
    match value {
        Some(v) if v.is_nan() => Reading::NoData {
            reason: "the query returned NaN (nothing to measure, e.g. no requests in the window)"
                .into(),
        },
        Some(value) => Reading::Value { value },
        None => error(format!("the sample {sample} has no numeric value")),
    }
}

/// The `data` of a successful Prometheus answer, or why the answer is not one.
fn prometheus_answer(status: u16, body: &[u8]) -> Result<Value, String> {
    let Ok(mut doc) = serde_json::from_slice::<Value>(body) else {
        return Err(format!(
            "HTTP {status}, and the answer is not Prometheus' JSON: {}",
            quote(body)
        ));
    };
    if doc["status"] != "success" {
        let kind = doc["errorType"].as_str().unwrap_or("unknown");
        let message = doc["error"].as_str().unwrap_or("no message");
        return Err(format!("query failed (HTTP {status}, {kind}): {message}"));
    }
    Ok(doc["data"].take())
}

/// Reads a `web` provider's answer: a 2xx JSON document in which the JSONPath `path` selects
/// exactly one number (a numeric string or a boolean, as 1 or 0, also count); `null` or nothing
/// selected is no data.
pub fn web_reading(status: u16, body: &[u8], path: &str) -> Reading {
    if !(200..300).contains(&status) {
        return error(format!("HTTP {status}: {}", quote(body)));
    }
    let doc: Value = match serde_json::from_slice(body) {
        Ok(doc) => doc,
        Err(e) => return error(format!("the answer is not JSON ({e}): {}", quote(body))),
    };
    let path_expr = match serde_json_path::JsonPath::parse(path) {
        Ok(p) => p,
        Err(e) => return error(format!("JSONPath {path:?}: {e}")),
    };
    let nodes = path_expr.query(&doc).all();
    let node = match nodes.as_slice() {
        [] => {
            return Reading::NoData {
                reason: format!("{path} selects nothing in the answer"),
            }
        }
        [one] => *one,
        many => {
            return error(format!(
                "{path} selects {} values where one number is needed",
                many.len()
            ))
        }
    };
    match node {
        Value::Number(n) => n
            .as_f64()
            .map(|value| Reading::Value { value })
            .unwrap_or_else(|| error(format!("{path} is {n}, not a number Coalmine can compare"))),
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(v) if v.is_nan() => Reading::NoData {
                reason: format!("{path} is NaN"),
            },
            Ok(value) => Reading::Value { value },
            Err(_) => error(format!("{path} is the string {s:?}, not a number")),
        },
        Value::Bool(b) => Reading::Value {
            value: if *b { 1.0 } else { 0.0 },
        },
        Value::Null => Reading::NoData {
            reason: format!("{path} is null"),
        },
        other => error(format!(
            "{path} is {}, not a number",
            quote(other.to_string().as_bytes())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(r: Reading) -> String {
        match r {
            Reading::Error { reason } | Reading::NoData { reason } => reason,
            Reading::Value { value } => panic!("expected no value, got {value}"),
        }
    }

    #[test]
    fn prometheus_answers_with_one_number_are_values() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.1,"0.0125"]}]}}"#;
        assert_eq!(
            prometheus_reading(200, vector),
            Reading::Value { value: 0.0125 }
        );
        let scalar =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"7"]}}"#;
        assert_eq!(
            prometheus_reading(200, scalar),
            Reading::Value { value: 7.0 }
        );
        let inf =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"+Inf"]}}"#;
        assert_eq!(
            prometheus_reading(200, inf),
            Reading::Value {
                value: f64::INFINITY
            }
        );
    }

    #[test]
    fn prometheus_answers_without_one_number_say_why() {
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(
            matches!(prometheus_reading(200, empty), Reading::NoData { reason } if reason.contains("no series"))
        );
        let nan = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#;
        assert!(
            matches!(prometheus_reading(200, nan), Reading::NoData { reason } if reason.contains("NaN"))
        );
        let two = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"status":"500"},"value":[1,"1"]},{"metric":{"status":"503"},"value":[1,"1"]}]}}"#;
        let r = reason(prometheus_reading(200, two));
        assert!(r.contains("2 series") && r.contains("sum()"), "{r}");
        let bad = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        let r = reason(prometheus_reading(400, bad));
        assert!(r.contains("bad_data") && r.contains("parse error"), "{r}");
        let r = reason(prometheus_reading(502, b"<html>Bad Gateway</html>"));
        assert!(r.contains("HTTP 502") && r.contains("Bad Gateway"), "{r}");
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(reason(prometheus_reading(200, matrix)).contains("matrix"));
    }

    #[test]
    fn web_answers_are_picked_by_jsonpath() {
        let body = br#"{"data":{"errorRate":"0.02","ok":true,"gone":null,"list":[1,2]}}"#;
        assert_eq!(
            web_reading(200, body, "$.data.errorRate"),
            Reading::Value { value: 0.02 }
        );
        assert_eq!(
            web_reading(200, body, "$.data.ok"),
            Reading::Value { value: 1.0 }
        );
        assert!(matches!(
            web_reading(200, body, "$.data.gone"),
            Reading::NoData { .. }
        ));
        assert!(matches!(
            web_reading(200, body, "$.data.missing"),
            Reading::NoData { .. }
        ));
        assert!(reason(web_reading(200, body, "$.data.list[*]")).contains("selects 2 values"));
        assert!(reason(web_reading(200, body, "$.data")).contains("not a number"));
        assert!(reason(web_reading(500, b"oops", "$.x")).contains("HTTP 500"));
        assert!(reason(web_reading(200, b"not json", "$.x")).contains("not JSON"));
    }
}
