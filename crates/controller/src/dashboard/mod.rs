//! The dashboard: one page (HTML, a script and a style sheet built into the binary, no CDN,
//! so it works in an air-gapped cluster) that lists the rollouts and shows one in detail, kept
//! current by Server-Sent Events. `coalmine serve` and `coalmine operator` both serve it at
//! `/`, each reading its own rollouts; the page is the same.
//!
//! What a server gives the page, by route:
//! - `GET /api/v1/watch`: [`watch`]: a `snapshot` of every row ([`live::row`]; under `serve`
//!   each `RolloutGroup`'s too, in `groups`), then a `change` per saved step or changed group
//!   row ([`Live`]).
//! - `GET /api/v1/groups/{name}/history` (`serve`): a group's page reads its history there.
//! - `GET /api/v1/rollouts/{key}/live`: [`detail_json`].
//! - `GET /api/v1/rollouts/{key}`: the status (`report::status_json`).
//! - `POST /api/v1/rollouts/{key}/{promote|abort|pause|resume}` behind [`gate`].
//! - `/api/v1/session`: [`gate::session_routes`].

pub mod gate;
pub mod live;

use std::convert::Infallible;

use axum::http::{header, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::Stream;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use coalmine_spec::redact;
use coalmine_spec::rollout::Rollout;

pub use gate::{Actor, Gate, GateError, ACTOR_HEADER};
pub use live::Live;

const PAGE: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Only the page's own script and styles run; nothing is fetched from elsewhere, and no other
/// site may frame it (clickjacking the action buttons).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The page and its assets.
pub fn page_routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route(
            "/",
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Small, and a new binary may change them: revalidate rather than guess an age.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /api/v1/watch`: Server-Sent Events — a `snapshot` of every row first (`snapshot()`
/// gives `{"rows": [...]}`), then a `change` per saved step or deletion. A page that falls
/// behind is sent a fresh snapshot.
pub fn watch<F>(live: &Live, snapshot: F) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>>
where
    F: Fn() -> Result<Value, String> + Send + Sync + 'static,
{
    let snapshot_event = move || match snapshot() {
        Ok(v) => SseEvent::default().event("snapshot").data(v.to_string()),
        Err(e) => SseEvent::default()
            .event("failure")
            .data(json!({ "error": e }).to_string()),
    };
    // Subscribed before the snapshot is read: a change in between is sent twice, never lost.
    let changes = live.subscribe();
    let closed = Box::pin(live.closed());
    let first = snapshot_event();
    let stream = futures::stream::unfold(
        (snapshot_event, changes, closed, Some(first)),
        |(snapshot_event, mut changes, mut closed, first)| async move {
            if let Some(first) = first {
                return Some((Ok(first), (snapshot_event, changes, closed, None)));
            }
            let event = tokio::select! {
                // The server is shutting down: the stream ends, the page reconnects elsewhere.
                _ = &mut closed => return None,
                change = changes.recv() => match change {
                    Ok(change) => SseEvent::default()
                        .event("change")
                        .data(change.json().to_string()),
                    Err(RecvError::Lagged(_)) => snapshot_event(),
                    Err(RecvError::Closed) => return None,
                },
            };
            Some((Ok(event), (snapshot_event, changes, closed, None)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Fields of the documents named like secrets that are none: `sessionAffinity` names cookies.
const NOT_SECRETS: [&str; 1] = ["sessionAffinity"];

/// A document as shown to anyone who can read the API: credentials in URLs and the values of
/// fields named like secrets (tokens, keys, passwords) replaced.
fn redacted(value: &mut Value) {
    match value {
        Value::String(s) => *s = header_values_hidden(&redact::text(s)),
        Value::Array(items) => items.iter_mut().for_each(redacted),
        Value::Object(fields) => {
            // A notification provider's address is a secret as a whole (a chat webhook's path).
            let notification = fields
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(redact::is_notification_kind);
            for (key, v) in fields.iter_mut() {
                if notification && key == "address" {
                    if let Value::String(s) = v {
                        *s = redact::address(s);
                    }
                } else if redact::is_secret_name(key) && !NOT_SECRETS.contains(&key.as_str()) {
                    hidden(v);
                } else {
                    redacted(v);
                }
            }
        }
        _ => {}
    }
}

/// Headers written in a string (`-H 'Authorization: Bearer x'` in a load tester's command)
/// whose names say they carry a credential: each value, up to its closing quote or the line's
/// end, replaced.
fn header_values_hidden(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(colon) = rest.find(": ") {
        let before = &rest[..colon];
        let name = before
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .next()
            .unwrap_or_default();
        let after = &rest[colon + 2..];
        let end = after.find(['\'', '"', '\n']).unwrap_or(after.len());
        out.push_str(&rest[..colon + 2]);
        if !name.is_empty() && end > 0 && redact::is_secret_name(name) {
            out.push_str(redact::REDACTED);
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Every value under a secret's name, however deep: a route's match on a secret header is
/// `{exact: VALUE}`.
fn hidden(value: &mut Value) {
    match value {
        Value::String(_) | Value::Number(_) => *value = json!(redact::REDACTED),
        Value::Array(items) => items.iter_mut().for_each(hidden),
        Value::Object(fields) => fields.values_mut().for_each(hidden),
        _ => {}
    }
}

/// A document as YAML, its secrets redacted.
pub fn document_yaml<T: serde::Serialize>(document: &T) -> String {
    let mut doc = serde_json::to_value(document).expect("a document serializes");
    redacted(&mut doc);
    serde_saphyr::to_string(&doc).unwrap_or_else(|e| format!("# cannot show the document: {e}"))
}

/// `GET /api/v1/rollouts/{key}/live?points=false` leaves the series out (a page that has it
/// refreshes the rest).
#[derive(Debug, serde::Deserialize)]
pub struct DetailQuery {
    #[serde(default = "yes")]
    pub points: bool,
}

fn yes() -> bool {
    true
}

/// What one rollout's page shows: its status (`report::status_json`), the series of its run
/// (from [`Live`]), each check's threshold, the run's events and the document it runs (as
/// [`document_yaml`] shows it).
pub fn detail_json(
    rollout: &Rollout,
    run: i64,
    status: Value,
    points: Option<Vec<live::Point>>,
    events: Vec<Value>,
    document: String,
) -> Value {
    let checks: Vec<Value> = rollout
        .spec
        .analysis
        .metrics
        .iter()
        .map(|m| {
            let range = m.range();
            json!({"name": m.name, "min": range.min, "max": range.max})
        })
        .collect();
    json!({
        "run": run,
        "status": status,
        "service": rollout.spec.router_service(),
        "group": rollout.group(),
        "points": points,
        "checks": checks,
        "events": events,
        "document": document,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_documents_secrets_are_not_shown() {
        let mut doc = json!({
            "webhooks": [{"url": "https://user:hunter2@hooks.example/x?token=abc", "metadata": {"token": "s3cret", "cmd": "hey"}}],
            "headers": {"Authorization": "Bearer xyz"},
            "alerts": [{"name": "on-call", "provider": {"type": "slack", "address": "https://hooks.slack.com/services/T0/B0/w3bh00k"}}],
        });
        redacted(&mut doc);
        let text = doc.to_string();
        for secret in ["hunter2", "abc", "s3cret", "xyz", "w3bh00k"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        assert!(text.contains("hey"), "the rest stays: {text}");
    }

    #[test]
    fn a_route_matching_a_secret_header_or_query_parameter_does_not_show_its_value() {
        // A canary route for testers: whoever sends this key (or session) gets the canary.
        let mut doc = json!({"spec": {"analysis": {
            "match": [
                {"headers": {"X-Api-Key": {"exact": "k3y-value"}, "x-user": {"prefix": "beta-"}}},
                {"queryParams": {"access_token": {"regex": "t0ken.*"}}},
                {"headers": {"Authorization": {"suffix": "b34rer"}}},
            ],
            "sessionAffinity": {"cookieName": "canary-affinity", "maxAge": 3600},
        }}});
        redacted(&mut doc);
        let text = doc.to_string();
        for secret in ["k3y-value", "t0ken", "b34rer"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        for kept in [
            "beta-",
            "canary-affinity",
            "3600",
            "X-Api-Key",
            "access_token",
        ] {
            assert!(text.contains(kept), "{kept} hidden: {text}");
        }
    }

    #[test]
    fn a_secret_header_in_a_webhooks_command_is_not_shown() {
        // Flagger's load tester runs `cmd`; its requests often carry a credential.
        let mut doc = json!({"webhooks": [{"name": "load", "metadata": {
            "cmd": "hey -z 1m -H 'Authorization: Bearer b34rer' -H \"X-Api-Key: k3y\" http://checkout-canary/",
            "type": "cmd",
        }}]});
        redacted(&mut doc);
        let text = doc.to_string();
        for secret in ["b34rer", "k3y"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        assert!(text.contains("hey -z 1m -H 'Authorization: "), "{text}");
        assert!(text.contains("http://checkout-canary/"), "{text}");
    }
}
