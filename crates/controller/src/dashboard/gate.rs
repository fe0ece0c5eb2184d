//! Who may change things, and who did: the bearer token (the CLI, scripts, Alertmanager) or a
//! dashboard session signed in with that token. `coalmine serve` and `coalmine operator` put
//! the same gate in front of their changes.
//!
//! A session is a random id in a cookie (HttpOnly, SameSite=Strict, Secure when the page came
//! over TLS) plus a CSRF token the page sends back in a header on every change, and a change
//! whose `Origin` is another site is refused whatever it carries. Sessions live in memory: a
//! restarted daemon asks people to sign in again.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::driver::now_ms;

/// The header a client names the person behind a token-authenticated call with (the CLI sends
/// `user on host`): the token is shared, so it cannot say who.
pub const ACTOR_HEADER: &str = "x-coalmine-actor";
/// The header the dashboard sends its session's CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
const COOKIE: &str = "coalmine_session";
/// How long a sign-in lasts.
const SESSION_LIFETIME_MS: u64 = 12 * 3600 * 1000;
/// A wrong token costs this long, and wrong tokens are answered one at a time (many
/// connections guess no faster than one), so guessing it over the network is slow.
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(300);
const MAX_NAME_CHARS: usize = 64;

/// Who made a change, as the rollout's history records it.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// Why the gate refused, answered `{"error": message}` like every refusal of the API.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("this call needs the API token (Authorization: Bearer TOKEN) or a dashboard sign-in")]
    Unauthorized,
    #[error("refused: a change from the dashboard must come from its own page, with the session's CSRF token")]
    Forbidden,
    #[error("that is not the API token")]
    WrongToken,
    #[error("name: say who you are (1 to {0} characters), for the history of what you do")]
    BadName(usize),
    #[error("this server was started without an API token, so its dashboard only shows: {0}")]
    ReadOnly(&'static str),
}

impl IntoResponse for GateError {
    fn into_response(self) -> Response {
        let status = match self {
            GateError::Unauthorized | GateError::WrongToken => StatusCode::UNAUTHORIZED,
            GateError::Forbidden | GateError::ReadOnly(_) => StatusCode::FORBIDDEN,
            GateError::BadName(_) => StatusCode::BAD_REQUEST,
        };
        let mut resp = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

struct Session {
    name: String,
    csrf: String,
    expires_ms: u64,
}

/// The token and the sessions signed in with it.
pub struct Gate {
    /// `None`: nobody can change anything here (a read-only dashboard); `hint` says how to.
    token: Option<String>,
    hint: &'static str,
    /// The server itself speaks TLS: session cookies are `Secure`.
    over_tls: bool,
    sessions: Mutex<HashMap<String, Session>>,
    /// Held while a wrong token's delay runs: guesses wait their turn. The right token never
    /// takes it.
    guessing: tokio::sync::Mutex<()>,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("the kernel's random source is readable");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without stopping at the first difference, so timing does not leak a secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the page was fetched over TLS through a proxy that says so.
fn proxied_over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// A change from a page of another site: its `Origin` names a host other than ours.
fn cross_site(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false; // not a browser's cross-origin request (curl, the CLI)
    };
    let Some((_, origin_host)) = origin.split_once("://") else {
        return true;
    };
    // Behind a proxy that rewrites Host, the host the browser saw is X-Forwarded-Host.
    !["host", "x-forwarded-host"]
        .into_iter()
        .filter_map(|h| headers.get(h).and_then(|v| v.to_str().ok()))
        .flat_map(|v| v.split(','))
        .any(|h| h.trim().eq_ignore_ascii_case(origin_host))
}

/// The routes of signing in and out (`/api/v1/session`).
pub fn session_routes<S: Clone + Send + Sync + 'static>(gate: Arc<Gate>) -> axum::Router<S> {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/api/v1/session",
            get(session).post(sign_in).delete(sign_out),
        )
        .with_state(gate)
}

/// A person's name as the history shows it: trimmed, printable, bounded.
fn clean_name(raw: &str) -> Option<String> {
    let name: String = raw.trim().chars().filter(|c| !c.is_control()).collect();
    (!name.is_empty() && name.chars().count() <= MAX_NAME_CHARS).then_some(name)
}

impl Gate {
    /// A gate opened by `token`.
    pub fn new(token: String) -> Gate {
        Gate {
            token: Some(token),
            hint: "",
            over_tls: false,
            sessions: Mutex::new(HashMap::new()),
            guessing: tokio::sync::Mutex::new(()),
        }
    }

    /// Says the server speaks TLS itself, so its session cookies are `Secure`.
    pub fn over_tls(mut self, over_tls: bool) -> Gate {
        self.over_tls = over_tls;
        self
    }

    /// A gate nobody passes: `hint` tells people how they change things instead.
    pub fn closed(hint: &'static str) -> Gate {
        Gate {
            token: None,
            hint,
            over_tls: false,
            sessions: Mutex::new(HashMap::new()),
            guessing: tokio::sync::Mutex::new(()),
        }
    }

    fn token_is(&self, given: &str) -> bool {
        self.token
            .as_deref()
            .is_some_and(|t| constant_time_eq(given.as_bytes(), t.as_bytes()))
    }

    fn signed_in(&self, headers: &HeaderMap) -> Option<(String, String)> {
        let id = cookie_value(headers, COOKIE)?;
        let mut all = self.sessions.lock().expect("sessions");
        let now = now_ms();
        all.retain(|_, s| s.expires_ms > now);
        all.get(id).map(|s| (s.name.clone(), s.csrf.clone()))
    }
}

impl Gate {
    /// Who is asking for a change: the bearer token (with the name its client gives), or a
    /// signed-in session whose page sent its CSRF token from this site.
    fn authorize(&self, headers: &HeaderMap) -> Result<Actor, GateError> {
        if self.token.is_none() {
            return Err(GateError::ReadOnly(self.hint));
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(token) = bearer {
            if !self.token_is(token) {
                return Err(GateError::WrongToken);
            }
            let named = headers
                .get(ACTOR_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(clean_name);
            return Ok(Actor(match named {
                Some(name) => format!("{name} with the API token"),
                None => "a client with the API token".to_string(),
            }));
        }
        let (name, csrf) = self.signed_in(headers).ok_or(GateError::Unauthorized)?;
        let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if cross_site(headers)
            || !sent.is_some_and(|s| constant_time_eq(s.as_bytes(), csrf.as_bytes()))
        {
            return Err(GateError::Forbidden);
        }
        Ok(Actor(format!("{name}, signed in to the dashboard")))
    }

    /// [`Gate::authorize`], a wrong token answered after its delay.
    async fn authorize_or_wait(&self, headers: &HeaderMap) -> Result<Actor, GateError> {
        let authorized = self.authorize(headers);
        if let Err(GateError::WrongToken) = authorized {
            self.wrong_token_delay().await;
        }
        authorized
    }

    /// Waits [`WRONG_TOKEN_DELAY`] after every wrong guess before it.
    async fn wrong_token_delay(&self) {
        let _turn = self.guessing.lock().await;
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
    }
}

/// The gate of every change; the caller's name is handed on as an [`Actor`].
pub async fn require_signed(
    State(gate): State<Arc<Gate>>,
    mut req: Request,
    next: Next,
) -> Response {
    match gate.authorize_or_wait(req.headers()).await {
        Ok(actor) => {
            req.extensions_mut().insert(actor);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub struct SignIn {
    token: String,
    /// Who is signing in, for the history of what they do.
    name: String,
}

fn session_cookie(id: &str, max_age_s: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    ))
    .expect("a cookie of hex digits is a header value")
}

/// `POST /api/v1/session`: signs in with the API token and a name.
pub async fn sign_in(
    State(gate): State<Arc<Gate>>,
    headers: HeaderMap,
    Json(form): Json<SignIn>,
) -> Result<Response, GateError> {
    if cross_site(&headers) {
        return Err(GateError::Forbidden);
    }
    if gate.token.is_none() {
        return Err(GateError::ReadOnly(gate.hint));
    }
    if !gate.token_is(form.token.trim()) {
        gate.wrong_token_delay().await;
        return Err(GateError::WrongToken);
    }
    let name = clean_name(&form.name).ok_or(GateError::BadName(MAX_NAME_CHARS))?;
    let (id, csrf) = (random_hex(), random_hex());
    gate.sessions.lock().expect("sessions").insert(
        id.clone(),
        Session {
            name: name.clone(),
            csrf: csrf.clone(),
            expires_ms: now_ms() + SESSION_LIFETIME_MS,
        },
    );
    tracing::info!(%name, "signed in to the dashboard");
    let mut resp = Json(json!({"signedIn": true, "name": name, "csrf": csrf})).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(
            &id,
            SESSION_LIFETIME_MS / 1000,
            gate.over_tls || proxied_over_tls(&headers),
        ),
    );
    Ok(resp)
}

/// `GET /api/v1/session`: whether this browser is signed in, as whom, and the CSRF token its
/// changes must carry (a page of another site cannot read it).
pub async fn session(State(gate): State<Arc<Gate>>, headers: HeaderMap) -> Response {
    let mut resp = match gate.signed_in(&headers) {
        Some((name, csrf)) => Json(json!({"signedIn": true, "name": name, "csrf": csrf})),
        None => {
            Json(json!({"signedIn": false, "readOnly": gate.token.is_none(), "hint": gate.hint}))
        }
    }
    .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `DELETE /api/v1/session`: signs out (through the gate, so a page of another site cannot
/// sign anyone out).
pub async fn sign_out(State(gate): State<Arc<Gate>>, headers: HeaderMap) -> Response {
    if let Err(e) = gate.authorize_or_wait(&headers).await {
        return e.into_response();
    }
    if let Some(id) = cookie_value(&headers, COOKIE) {
        gate.sessions.lock().expect("sessions").remove(id);
    }
    let mut resp = (StatusCode::OK, Json(json!({"signedIn": false}))).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie("", 0, gate.over_tls || proxied_over_tls(&headers)),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_change_from_another_sites_page_is_cross_site_and_one_from_ours_is_not() {
        let ours = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert!(!cross_site(&ours));
        let theirs = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "https://evil.example"),
        ]);
        assert!(cross_site(&theirs));
        let opaque = headers(&[("host", "127.0.0.1:8080"), ("origin", "null")]);
        assert!(
            cross_site(&opaque),
            "a sandboxed page's null origin is not ours"
        );
        assert!(
            !cross_site(&headers(&[("host", "a")])),
            "no Origin: not a browser's cross-origin call"
        );
    }

    #[test]
    fn the_session_cookie_is_read_among_others_and_is_httponly_strict_and_secure_over_tls() {
        let h = headers(&[("cookie", "a=1; coalmine_session=abc; b=2")]);
        assert_eq!(cookie_value(&h, COOKIE), Some("abc"));
        let plain = session_cookie("abc", 60, false);
        let plain = plain.to_str().unwrap();
        assert!(
            plain.contains("HttpOnly") && plain.contains("SameSite=Strict"),
            "{plain}"
        );
        assert!(!plain.contains("Secure"), "{plain}");
        assert!(session_cookie("abc", 60, true)
            .to_str()
            .unwrap()
            .ends_with("; Secure"));
    }

    #[test]
    fn names_are_trimmed_printable_and_bounded() {
        assert_eq!(clean_name("  alice \n").as_deref(), Some("alice"));
        assert_eq!(clean_name("a\u{7}b").as_deref(), Some("ab"));
        assert_eq!(clean_name("   "), None);
        assert_eq!(clean_name(&"x".repeat(65)), None);
    }
}
