//! Errors as the API server sends them: a `metav1.Status` with the HTTP code, `reason` and
//! `details` that clients (kube-rs's `ErrorResponse`, client-go's `apierrors`) act on.

use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// One failed request; [`ApiError::status`] is the body the API server would send.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

/// What an error is about: the resource (`configmaps`, `canaries.flagger.app`), its group and
/// the object's name, as `details` carries them.
pub struct Subject<'a> {
    pub group: &'a str,
    /// The plural resource name: `details.kind` is the resource, not the Kind, in most errors.
    pub resource: &'a str,
    pub name: &'a str,
}

impl Subject<'_> {
    /// `configmaps` or `canaries.flagger.app`, as messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    fn details(&self) -> Value {
        json!({"name": self.name, "group": self.group, "kind": self.resource})
    }
}

/// One `details.causes[]` entry of an `Invalid` error.
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    /// Without the field: `Required value`.
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(subject: &Subject) -> Self {
        Self {
            details: Some(subject.details()),
            ..Self::new(
                404,
                "NotFound",
                format!("{} {:?} not found", subject.qualified(), subject.name),
            )
        }
    }

    /// A path this server does not serve (no such resource or group).
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn already_exists(subject: &Subject) -> Self {
        Self {
            details: Some(subject.details()),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} {:?} already exists", subject.qualified(), subject.name),
            )
        }
    }

    /// A stale `resourceVersion` or a failed precondition.
    pub fn conflict(subject: &Subject, why: &str) -> Self {
        Self {
            details: Some(subject.details()),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {:?}: {why}",
                    subject.qualified(),
                    subject.name
                ),
            )
        }
    }

    pub fn stale(subject: &Subject) -> Self {
        Self::conflict(
            subject,
            "the object has been modified; please apply your changes to the latest version and \
             try again",
        )
    }

    /// 422: `kind` is the object's Kind (`Canary`), as in the API server's `Invalid` errors.
    pub fn invalid(kind: &str, subject: &Subject, causes: Vec<Cause>) -> Self {
        let kind_group = if subject.group.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}.{}", subject.group)
        };
        let listed: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let listed = match listed.as_slice() {
            [one] => one.clone(),
            _ => format!("[{}]", listed.join(", ")),
        };
        let causes: Vec<Value> = causes
            .iter()
            .map(|c| {
                json!({
                    "reason": c.reason,
                    "message": format!("{}: {}", c.field, c.message),
                    "field": c.field,
                })
            })
            .collect();
        Self {
            details: Some(json!({
                "name": subject.name,
                "group": subject.group,
                "kind": kind,
                "causes": causes,
            })),
            ..Self::new(
                422,
                "Invalid",
                format!("{kind_group} {:?} is invalid: {listed}", subject.name),
            )
        }
    }

    /// 410: a `resourceVersion` older than the kept history.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml, application/strategic-merge-patch+json \
                 (got {content_type:?})"
            ),
        )
    }

    /// The `metav1.Status` body.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = http::StatusCode::from_u16(self.code)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.status())).into_response()
    }
}
