//! Feature flags over OpenFeature's remote evaluation protocol (OFREP), so any OpenFeature SDK
//! with its OFREP provider reads them: `POST /ofrep/v1/evaluate/flags/{key}` (one flag) and
//! `POST /ofrep/v1/evaluate/flags` (every flag, with an `ETag`; `If-None-Match` gets 304 while
//! nothing changed), and the optional `GET /ofrep/v1/configuration` (polling on, at least a
//! second apart; no caching: flags change while their rollouts run). Evaluations are reads, open like the API's others: they tell a user's
//! variant, never a secret, and an SDK may still send an `Authorization` header (ignored).
//!
//! Also the counts API, `POST /api/v1/flags/{key}/counts` (behind the token, like every
//! change: counts decide a rollback), and `GET /api/v1/flags`, the flags served.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use coalmine_contract::FlagCountsDoc;

use super::api::ApiError;
use super::Daemon;
use crate::flags::{self, EvaluationError};

/// The web pages (origins) that may evaluate flags from a browser, as OpenFeature's web SDKs
/// do: `serve --ofrep-allow-origin`; `*` lets any page. Evaluations carry no credentials (no
/// cookie, and the token is not asked for), so an origin allowed can read users' variants and
/// nothing else; the rest of the API answers browsers of other origins nothing they can read.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(pub Vec<String>);

impl AllowedOrigins {
    /// What `Access-Control-Allow-Origin` says to a request from `origin`, if it is allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.0.iter().any(|o| o == "*") {
            return Some(HeaderValue::from_static("*"));
        }
        let origin_text = origin.to_str().ok()?;
        self.0
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin_text))
            .then(|| origin.clone())
    }
}

/// The OFREP routes, answering browsers' preflights and telling them which origins may read.
pub(super) fn routes(origins: AllowedOrigins) -> Router<Arc<Daemon>> {
    let preflight = || async { StatusCode::NO_CONTENT };
    Router::new()
        .route(
            "/ofrep/v1/evaluate/flags",
            post(evaluate_all).options(preflight),
        )
        .route(
            "/ofrep/v1/evaluate/flags/{key}",
            post(evaluate_one).options(preflight),
        )
        .route(
            "/ofrep/v1/configuration",
            get(configuration).options(preflight),
        )
        .route_layer(middleware::from_fn_with_state(Arc::new(origins), cors))
}

/// CORS for the OFREP routes: an allowed origin's page may send the SDK's headers and read the
/// answer and its `ETag`; any other origin's gets no permission (its browser keeps the answer
/// from it).
async fn cors(
    State(origins): State<Arc<AllowedOrigins>>,
    request: Request,
    next: Next,
) -> Response {
    let allowed = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| origins.allow(o));
    let preflight = request.method() == Method::OPTIONS;
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("ETag"),
        );
        if preflight {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type, authorization, if-none-match"),
            );
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }
    response
}

/// OFREP's JSON answers carry `application/json` (the providers check it).
fn answer(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn status_of(e: &EvaluationError) -> StatusCode {
    match e {
        EvaluationError::FlagNotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// A request body that could not be read (past the API's size limit, or broken off): OFREP's
/// invalid context, so an SDK reports why rather than a bare status.
fn unread(body: BytesRejection) -> EvaluationError {
    EvaluationError::InvalidContext(format!(
        "the request body was not read: {}",
        body.body_text()
    ))
}

/// `POST /ofrep/v1/evaluate/flags/{key}`.
pub(super) async fn evaluate_one(
    Path(key): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let evaluated = body.map_err(unread).and_then(|body| {
        let context = flags::evaluate::context_of(&body)?;
        let flag = flags::served()
            .get(&key)
            .ok_or_else(|| EvaluationError::FlagNotFound(key.clone()))?;
        let e = flag.evaluate(&context)?;
        Ok(flag.success_json(&e))
    });
    match evaluated {
        Ok(success) => answer(StatusCode::OK, &success),
        Err(e) => answer(status_of(&e), &e.to_json(&key)),
    }
}

/// `POST /ofrep/v1/evaluate/flags`: every served flag for one context. A flag that cannot be
/// evaluated for it (no targeting key to split by) is its failure document in the list.
pub(super) async fn evaluate_all(
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let context = match body
        .map_err(unread)
        .and_then(|body| flags::evaluate::context_of(&body))
    {
        Ok(context) => context,
        Err(e) => {
            return answer(
                StatusCode::BAD_REQUEST,
                &json!({"errorCode": e.code(), "errorDetails": e.to_string()}),
            )
        }
    };
    let evaluated: Vec<Value> = flags::served()
        .all()
        .iter()
        .map(|flag| match flag.evaluate(&context) {
            Ok(e) => flag.success_json(&e),
            Err(e) => e.to_json(&flag.flag.key),
        })
        .collect();
    tagged_json(&headers, json!({ "flags": evaluated }).to_string())
}

/// The shortest poll interval Coalmine asks of OFREP clients: a flag changes when its rollout
/// steps or rolls back, and a conditional bulk evaluation costs a 304, so a second is enough
/// to bring a rollback to open pages quickly.
pub const MIN_POLLING_INTERVAL_MS: u64 = 1_000;

/// `GET /ofrep/v1/configuration` (OFREP's optional extension): what a provider may rely on.
/// Flags change while their rollouts run, so polling is on and caching off.
pub(super) async fn configuration(headers: HeaderMap) -> Response {
    let body = json!({
        "name": "coalmine",
        "capabilities": {
            "cacheInvalidation": {
                "polling": {"enabled": true, "minPollingIntervalMs": MIN_POLLING_INTERVAL_MS}
            },
            "flagEvaluation": {
                "supportedTypes": ["boolean", "string", "int", "float", "object"]
            },
            "caching": {"enabled": false}
        }
    });
    tagged_json(&headers, body.to_string())
}

/// A JSON answer with its `ETag`; `If-None-Match` naming it gets 304. The answer itself is
/// what a client caches: equal answers, equal tags.
fn tagged_json(headers: &HeaderMap, body: String) -> Response {
    let etag = format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(body.as_bytes()));
    let tag = HeaderValue::from_str(&etag).expect("hex in quotes is a header value");
    if none_match(headers, &etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, tag),
        ],
        body,
    )
        .into_response()
}

/// Whether `If-None-Match` lists `etag` (or is `*`), weak tags compared weakly (RFC 9110).
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

/// `POST /api/v1/flags/{key}/counts`: an app's per-variant counts since its last report.
pub(super) async fn report_counts(
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let doc: FlagCountsDoc = serde_json::from_slice(&body).map_err(ApiError::NotFlagCounts)?;
    flags::served().report(&key, &doc)?;
    Ok(answer(StatusCode::ACCEPTED, &json!({"key": key})))
}

/// `GET /api/v1/flags`: each served flag, its rollout and what it serves.
pub(super) async fn list() -> Response {
    let all: Vec<Value> = flags::served()
        .all()
        .iter()
        .map(|f| {
            let (serving, percent) = match f.serving {
                flags::Serving::Stable => ("stable", 0.0),
                flags::Serving::Split(w) => ("split", w.percent()),
                flags::Serving::Promoted => ("promoted", 100.0),
            };
            json!({
                "key": f.flag.key,
                "rollout": f.rollout,
                "cohort": f.cohort,
                "canary": f.flag.canary,
                "stable": f.flag.stable,
                "serving": serving,
                "canaryPercent": percent,
            })
        })
        .collect();
    Json(all).into_response()
}
