//! The route document: which upstreams exist, how much traffic the canary gets, which requests
//! it gets regardless of weight, and who drives the router. One shape serves the router's YAML
//! config, `GET /routes` and `PUT /routes`.

use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::matching::{HeaderName, MatchRule};
use crate::{Invalid, Weight};

/// Request header of a `PUT /routes` sent on behalf of a controller: the change is made only if
/// the router is driven by no controller or by this one. Checked and applied under one lock,
/// so two controllers can never both drive one router.
pub const OWNER_HEADER: &str = "x-coalmine-owner";

/// The read-only field `GET /routes` adds to the document (and `PUT /routes` ignores, so a
/// client may send back what it read).
pub const GENERATION: &str = "generation";

/// The port written in an `http://` or `https://` URL, if any, checked: digits, 1 to 65535.
/// (A general URL parser says only "invalid port number"; this says which and why.)
pub fn url_port(url: &str) -> Result<Option<u16>, Invalid> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = match host_port.strip_prefix('[') {
        Some(v6) => v6
            .split_once(']')
            .and_then(|(_, after)| after.strip_prefix(':')),
        None => host_port.rsplit_once(':').map(|(_, port)| port),
    };
    let Some(port) = port.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Invalid(format!("{url:?}: {port:?} is not a port number")));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(Some(p)),
        _ => Err(Invalid(format!(
            "{url:?}: port {port} is out of range (ports are 1 to 65535)"
        ))),
    }
}

/// An upstream base URL: `http://host:port`, no path, query or credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UpstreamUrl {
    url: String,
    host: String,
    port: u16,
    /// Stable identity for connection pools: the same URL is the same pool across table swaps.
    id: u64,
}

impl UpstreamUrl {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        // First, for a message that says which port and why (the URL parser's does not).
        url_port(text)?;
        let parsed = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(Invalid(format!(
                "{text:?}: only http:// upstreams are supported (TLS ends at the router)"
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Invalid(format!(
                "{text:?}: credentials in an upstream URL are not supported"
            )));
        }
        if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(Invalid(format!(
                "{text:?}: an upstream URL has no path or query; requests keep their own"
            )));
        }
        let host = match parsed.host() {
            Some(url::Host::Ipv6(addr)) => addr.to_string(),
            Some(h) => h.to_string(),
            None => return Err(Invalid(format!("{text:?} has no host"))),
        };
        let port = parsed.port_or_known_default().unwrap_or(80);
        let url = format!("http://{}:{}", bracket_v6(&host), port);
        Ok(UpstreamUrl {
            id: xxh3_64(url.as_bytes()),
            url,
            host,
            port,
        })
    }
    pub fn as_str(&self) -> &str {
        &self.url
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn id(&self) -> u64 {
        self.id
    }
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl TryFrom<String> for UpstreamUrl {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        UpstreamUrl::parse(&s)
    }
}

impl From<UpstreamUrl> for String {
    fn from(u: UpstreamUrl) -> String {
        u.url
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Where the sticky key comes from: the same key always lands in the same bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSticky", into = "RawSticky")]
pub enum StickyKey {
    Header(HeaderName),
    Cookie(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSticky {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cookie: Option<String>,
}

impl TryFrom<RawSticky> for StickyKey {
    type Error = Invalid;
    fn try_from(raw: RawSticky) -> Result<Self, Invalid> {
        match (raw.header, raw.cookie) {
            (Some(h), None) if !h.is_empty() => HeaderName::parse(&h).map(StickyKey::Header),
            (Some(_), None) => Err("a header match needs a name".into()),
            (None, Some(c)) if !c.is_empty() => Ok(StickyKey::Cookie(c)),
            _ => Err("sticky names exactly one of header, cookie".into()),
        }
    }
}

impl From<StickyKey> for RawSticky {
    fn from(k: StickyKey) -> Self {
        match k {
            StickyKey::Header(h) => RawSticky {
                header: Some(h.as_str().into()),
                cookie: None,
            },
            StickyKey::Cookie(c) => RawSticky {
                header: None,
                cookie: Some(c),
            },
        }
    }
}

/// Flagger's `sessionAffinity`: a user who got the canary keeps it, through a cookie.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Affinity {
    pub cookie_name: String,
    /// Seconds the cookie lives; Flagger's default is one day.
    #[serde(default = "default_affinity_max_age")]
    pub max_age: u64,
}

/// Flagger's default lifetime of the affinity cookie: one day, in seconds.
pub const DEFAULT_AFFINITY_MAX_AGE: u64 = 86_400;

fn default_affinity_max_age() -> u64 {
    DEFAULT_AFFINITY_MAX_AGE
}

/// The name of a route no rollout has named: what a router starts with.
pub const DEFAULT_NAME: &str = "default";

fn default_name() -> String {
    DEFAULT_NAME.to_string()
}

/// The route table as users write and read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutesDoc {
    /// Names the route; salts the sticky hash, so two services do not pick the same users.
    #[serde(default = "default_name")]
    pub name: String,
    pub stable: UpstreamUrl,
    #[serde(default)]
    pub canary: Option<UpstreamUrl>,
    #[serde(default)]
    pub canary_weight: Weight,
    #[serde(default, rename = "match")]
    pub matches: Vec<MatchRule>,
    /// Requests that reach the canary whenever there is one, whatever its weight: how a load
    /// test or a person previews a blue-green canary before it gets any user traffic.
    #[serde(default)]
    pub preview: Vec<MatchRule>,
    #[serde(default)]
    pub sticky: Option<StickyKey>,
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// Share of stable-bound requests also copied to the canary.
    #[serde(default)]
    pub mirror: Weight,
    /// The controller driving this router (a rollout and where it runs), while one does: a
    /// route change sent on behalf of another is refused (see [`OWNER_HEADER`]).
    #[serde(default)]
    pub owner: Option<String>,
}

impl RoutesDoc {
    /// A table sending everything to stable: the starting point when only `--stable` is known.
    pub fn stable_only(stable: UpstreamUrl) -> Self {
        RoutesDoc {
            name: default_name(),
            stable,
            canary: None,
            canary_weight: Weight::ZERO,
            matches: Vec::new(),
            preview: Vec::new(),
            sticky: None,
            affinity: None,
            mirror: Weight::ZERO,
            owner: None,
        }
    }

    /// Applies a partial JSON document (`PUT /routes`): the fields it names replace ours, the
    /// rest stay. Nothing changes unless the merged result is valid; the error names the field.
    pub fn patched(&self, patch: &serde_json::Value) -> Result<RoutesDoc, Invalid> {
        let serde_json::Value::Object(fields) = patch else {
            return Err("the route document must be a JSON object".into());
        };
        let mut merged = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let target = merged
            .as_object_mut()
            .expect("a RoutesDoc serializes to an object");
        for (key, value) in fields {
            if key == GENERATION {
                continue; // read-only, echoed back by clients that PUT what they GET
            }
            target.insert(key.clone(), value.clone());
        }
        let json = serde_json::to_string(&merged).map_err(|e| e.to_string())?;
        let mut de = serde_json::Deserializer::from_str(&json);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner = inner.split(" at line ").next().unwrap_or("").to_string();
            Invalid(if path == "." {
                inner
            } else {
                format!("{path}: {inner}")
            })
        })
    }
}

/// What `GET /routes` and `PUT /routes` answer: the document in force and its generation
/// (bumped by every swap; lets clients tell which table served them).
#[derive(Clone, Debug, PartialEq)]
pub struct ServedRoutes {
    pub doc: RoutesDoc,
    pub generation: u64,
}

impl ServedRoutes {
    /// The answer's JSON, without taking the document: the router writes it from its own table.
    pub fn json(doc: &RoutesDoc, generation: u64) -> serde_json::Value {
        let mut v = serde_json::to_value(doc).expect("a RoutesDoc serializes");
        v[GENERATION] = generation.into();
        v
    }

    /// Reads an answer; `None` unless it is a route document with its generation.
    pub fn from_json(mut value: serde_json::Value) -> Option<ServedRoutes> {
        let generation = value.as_object_mut()?.remove(GENERATION)?.as_u64()?;
        let doc = serde_json::from_value(value).ok()?;
        Some(ServedRoutes { doc, generation })
    }
}

/// A partial route document for `PUT /routes`: only the fields that are `Some` are sent, and
/// the router keeps every other field as it is. A controller sends the fields it owns and
/// leaves the rest (rules the router was started with, say) to whoever set them. For a field
/// that may be empty, `Some(None)` sends `null`: "none".
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutesPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable: Option<UpstreamUrl>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Option<UpstreamUrl>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<Weight>,
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<MatchRule>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<Vec<MatchRule>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Option<StickyKey>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Option<Affinity>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Weight>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Option<String>>,
}

impl RoutesPatch {
    /// Lets a router go: no controller drives it any more. Its routes stay as they are.
    pub fn release() -> RoutesPatch {
        RoutesPatch {
            owner: Some(None),
            ..RoutesPatch::default()
        }
    }

    /// Whether a router's table already says what this patch says (fields left out agree).
    pub fn agrees_with(&self, doc: &RoutesDoc) -> bool {
        fn same<T: PartialEq>(patch: &Option<T>, doc: &T) -> bool {
            patch.as_ref().is_none_or(|p| p == doc)
        }
        same(&self.name, &doc.name)
            && same(&self.stable, &doc.stable)
            && same(&self.canary, &doc.canary)
            && same(&self.canary_weight, &doc.canary_weight)
            && same(&self.matches, &doc.matches)
            && same(&self.preview, &doc.preview)
            && same(&self.sticky, &doc.sticky)
            && same(&self.affinity, &doc.affinity)
            && same(&self.mirror, &doc.mirror)
            && same(&self.owner, &doc.owner)
    }

    /// The JSON body of the `PUT /routes` that applies this patch.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a route patch serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bad_regex_in_a_document_is_reported_as_written() {
        let doc = json!({
            "stable": "http://127.0.0.1:1",
            "match": [{"header": "user-id", "regex": "[a-"}]
        });
        let err = serde_json::from_value::<RoutesDoc>(doc)
            .unwrap_err()
            .to_string();
        assert!(err.contains(r#"invalid regex "[a-""#), "{err}");
        assert!(!err.contains("(?:"), "{err}");
    }

    #[test]
    fn document_round_trips_through_json() {
        let json = json!({
            "stable": "http://127.0.0.1:9001",
            "canary": "http://localhost:9002/",
            "canaryWeight": 0.5,
            "match": ["x-canary=true", {"header": "user-id", "regex": "^(1|2)$"},
                      {"all": [{"cookie": "a", "exact": "b"}, {"query": "c", "prefix": "d"}]}],
            "sticky": {"header": "X-User"},
            "mirror": 10
        });
        let doc: RoutesDoc = serde_json::from_value(json).unwrap();
        assert_eq!(
            doc.canary.as_ref().unwrap().as_str(),
            "http://localhost:9002"
        );
        assert_eq!(doc.canary_weight.basis_points(), 50);
        assert_eq!(
            doc.sticky,
            Some(StickyKey::Header(HeaderName::parse("x-user").unwrap()))
        );
        let back: RoutesDoc = serde_json::from_value(serde_json::to_value(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn patch_keeps_omitted_fields_and_rejects_bad_ones() {
        let doc: RoutesDoc = serde_json::from_value(json!({
            "stable": "http://127.0.0.1:1", "canary": "http://127.0.0.1:2", "canaryWeight": 5
        }))
        .unwrap();
        let p = doc.patched(&json!({"canaryWeight": 10})).unwrap();
        assert_eq!(p.canary_weight.basis_points(), 1000);
        assert_eq!(p.canary, doc.canary);
        let p = doc.patched(&json!({"canary": null})).unwrap();
        assert!(p.canary.is_none());
        let e = doc.patched(&json!({"canaryWeight": 101})).unwrap_err().0;
        assert!(e.contains("canaryWeight"), "{e}");
        let e = doc.patched(&json!({"canaryWieght": 1})).unwrap_err().0;
        assert!(e.contains("canaryWieght"), "{e}");
        let e = doc.patched(&json!({"stable": "https://x"})).unwrap_err().0;
        assert!(e.contains("stable"), "{e}");
        assert_eq!(doc.patched(&json!({"generation": 7})).unwrap(), doc);
    }

    #[test]
    fn a_typed_patch_sends_only_its_fields_and_null_for_none() {
        let doc: RoutesDoc = serde_json::from_value(json!({
            "stable": "http://127.0.0.1:1", "canary": "http://127.0.0.1:2", "canaryWeight": 5,
            "match": ["x-canary=true"], "owner": "someone"
        }))
        .unwrap();
        let patch = RoutesPatch {
            canary: Some(None),
            canary_weight: Some(Weight::ZERO),
            owner: Some(None),
            ..RoutesPatch::default()
        };
        assert_eq!(
            patch.to_json(),
            json!({"canary": null, "canaryWeight": 0.0, "owner": null})
        );
        assert!(!patch.agrees_with(&doc));
        let applied = doc.patched(&patch.to_json()).unwrap();
        assert!(patch.agrees_with(&applied));
        // What the patch leaves out stays, and agrees whatever it is.
        assert_eq!(applied.matches, doc.matches);
        assert_eq!(applied.stable, doc.stable);
        assert!(RoutesPatch::default().agrees_with(&doc));
        assert_eq!(RoutesPatch::default().to_json(), json!({}));
    }

    #[test]
    fn the_served_document_carries_its_generation() {
        let doc = RoutesDoc::stable_only(UpstreamUrl::parse("http://127.0.0.1:1").unwrap());
        let json = ServedRoutes::json(&doc, 4);
        assert_eq!(json["generation"], 4);
        assert_eq!(json["stable"], "http://127.0.0.1:1");
        let back = ServedRoutes::from_json(json).unwrap();
        assert_eq!((back.doc, back.generation), (doc.clone(), 4));
        // A document without its generation is not an answer of a router.
        let bare = serde_json::to_value(&doc).unwrap();
        assert!(ServedRoutes::from_json(bare).is_none());
        assert!(ServedRoutes::from_json(json!({"status": "ok", "generation": 1})).is_none());
    }

    #[test]
    fn upstream_urls_are_checked() {
        assert!(UpstreamUrl::parse("http://127.0.0.1:80").is_ok());
        assert_eq!(UpstreamUrl::parse("http://h").unwrap().port(), 80);
        assert!(UpstreamUrl::parse("127.0.0.1:80").is_err());
        assert!(UpstreamUrl::parse("ftp://h").is_err());
        assert!(UpstreamUrl::parse("http://h/path").is_err());
        assert_eq!(
            UpstreamUrl::parse("http://127.0.0.1:99999").unwrap_err().0,
            r#""http://127.0.0.1:99999": port 99999 is out of range (ports are 1 to 65535)"#
        );
        assert!(UpstreamUrl::parse("http://127.0.0.1:0")
            .unwrap_err()
            .0
            .contains("port 0 is out of range"));
        assert_eq!(
            UpstreamUrl::parse("http://[::1]:8080").unwrap().host(),
            "::1"
        );
    }
}
