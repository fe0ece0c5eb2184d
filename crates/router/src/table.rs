//! The route table: which upstreams exist, how much traffic the canary gets and which requests it
//! gets regardless of weight. One document shape serves the YAML config, `GET /routes` and
//! `PUT /routes`; every field validates while it is deserialized, so a bad value is reported at its
//! own line and column (YAML) or with its field name (JSON).

use std::fmt;

use http::HeaderName;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use coalmine_spec::rollout::{url_port, whole_value_regex};
use coalmine_spec::weight::{basis_points_to_percent, percent_to_basis_points};

/// A percentage with two decimals, kept as basis points (10,000 = 100 %).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Weight(u32);

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(10_000);

    pub fn from_percent(pct: f64) -> Result<Self, String> {
        percent_to_basis_points(pct).map(Weight)
    }
    pub fn basis_points(self) -> u32 {
        self.0
    }
    pub fn percent(self) -> f64 {
        basis_points_to_percent(self.0)
    }
}

impl TryFrom<f64> for Weight {
    type Error = String;
    fn try_from(pct: f64) -> Result<Self, String> {
        Weight::from_percent(pct)
    }
}

impl From<Weight> for f64 {
    fn from(w: Weight) -> f64 {
        w.percent()
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
    pub fn parse(text: &str) -> Result<Self, String> {
        // First, for a message that says which port and why (the URL parser's does not).
        url_port(text)?;
        let parsed = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(format!(
                "{text:?}: only http:// upstreams are supported (TLS ends at the router)"
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(format!(
                "{text:?}: credentials in an upstream URL are not supported"
            ));
        }
        if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(format!(
                "{text:?}: an upstream URL has no path or query; requests keep their own"
            ));
        }
        let host = match parsed.host() {
            Some(url::Host::Ipv6(addr)) => addr.to_string(),
            Some(h) => h.to_string(),
            None => return Err(format!("{text:?} has no host")),
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
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
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

/// How a string is compared. Regexes match the whole value, as in Istio and Envoy.
#[derive(Clone, Debug)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(regex::Regex),
}

impl StrMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(v) => value == v,
            StrMatch::Prefix(v) => value.starts_with(v.as_str()),
            StrMatch::Suffix(v) => value.ends_with(v.as_str()),
            StrMatch::Regex(re) => re.is_match(value),
        }
    }

    fn regex(pattern: &str) -> Result<Self, String> {
        whole_value_regex(pattern).map(StrMatch::Regex)
    }

    fn pattern(&self) -> (&'static str, String) {
        match self {
            StrMatch::Exact(v) => ("exact", v.clone()),
            StrMatch::Prefix(v) => ("prefix", v.clone()),
            StrMatch::Suffix(v) => ("suffix", v.clone()),
            // Strip the anchoring we added so the document round-trips.
            StrMatch::Regex(re) => {
                let s = re.as_str();
                ("regex", s[4..s.len() - 2].to_string())
            }
        }
    }
}

impl PartialEq for StrMatch {
    fn eq(&self, other: &Self) -> bool {
        self.pattern() == other.pattern()
    }
}

/// What part of the request a condition reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Subject {
    Header(HeaderName),
    Cookie(String),
    Query(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub subject: Subject,
    pub test: StrMatch,
}

/// One match rule: all of its conditions must hold. Rules are alternatives: any rule that holds
/// sends the request to the canary (Flagger's `match` list has the same shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRule", into = "RawRule")]
pub struct MatchRule {
    pub all: Vec<Condition>,
}

impl MatchRule {
    /// The command-line syntax: `NAME=VALUE` (header exact), `NAME~REGEX` (header regex),
    /// `cookie:NAME=VALUE`, `query:NAME=VALUE`.
    pub fn parse_flag(text: &str) -> Result<Self, String> {
        let (subject_kind, rest) = if let Some(r) = text.strip_prefix("cookie:") {
            ("cookie", r)
        } else if let Some(r) = text.strip_prefix("query:") {
            ("query", r)
        } else {
            ("header", text)
        };
        let eq = rest.find('=');
        let tilde = rest.find('~');
        let (name, test) = match (eq, tilde) {
            (Some(i), t) if t.is_none_or(|t| i < t) => {
                (&rest[..i], StrMatch::Exact(rest[i + 1..].to_string()))
            }
            (_, Some(i)) if subject_kind == "header" => {
                (&rest[..i], StrMatch::regex(&rest[i + 1..])?)
            }
            _ => {
                return Err(format!(
                "{text:?}: expected NAME=VALUE, NAME~REGEX, cookie:NAME=VALUE or query:NAME=VALUE"
            ))
            }
        };
        let condition = Condition {
            subject: subject(subject_kind, name)?,
            test,
        };
        Ok(MatchRule {
            all: vec![condition],
        })
    }
}

fn subject(kind: &str, name: &str) -> Result<Subject, String> {
    if name.is_empty() {
        return Err(format!("a {kind} match needs a name"));
    }
    match kind {
        "header" => HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map(Subject::Header)
            .map_err(|_| format!("{name:?} is not a valid header name")),
        "cookie" => Ok(Subject::Cookie(name.to_string())),
        _ => Ok(Subject::Query(name.to_string())),
    }
}

/// The serialized form of a rule: the flag syntax as a string, one condition as an object
/// (`{"header": "x-canary", "exact": "true"}`), or several ANDed (`{"all": [...]}`).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RawRule {
    Flag(String),
    All { all: Vec<RawCondition> },
    One(RawCondition),
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cookie: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    suffix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl TryFrom<RawCondition> for Condition {
    type Error = String;
    fn try_from(raw: RawCondition) -> Result<Self, String> {
        let subject = match (raw.header, raw.cookie, raw.query) {
            (Some(n), None, None) => subject("header", &n)?,
            (None, Some(n), None) => subject("cookie", &n)?,
            (None, None, Some(n)) => subject("query", &n)?,
            _ => return Err("a match condition names exactly one of header, cookie, query".into()),
        };
        let test = match (raw.exact, raw.prefix, raw.suffix, raw.regex) {
            (Some(v), None, None, None) => StrMatch::Exact(v),
            (None, Some(v), None, None) => StrMatch::Prefix(v),
            (None, None, Some(v), None) => StrMatch::Suffix(v),
            (None, None, None, Some(v)) => StrMatch::regex(&v)?,
            _ => {
                return Err(
                    "a match condition has exactly one of exact, prefix, suffix, regex".into(),
                )
            }
        };
        Ok(Condition { subject, test })
    }
}

impl From<&Condition> for RawCondition {
    fn from(c: &Condition) -> Self {
        let mut raw = RawCondition::default();
        match &c.subject {
            Subject::Header(n) => raw.header = Some(n.as_str().to_string()),
            Subject::Cookie(n) => raw.cookie = Some(n.clone()),
            Subject::Query(n) => raw.query = Some(n.clone()),
        }
        let (kind, value) = c.test.pattern();
        match kind {
            "exact" => raw.exact = Some(value),
            "prefix" => raw.prefix = Some(value),
            "suffix" => raw.suffix = Some(value),
            _ => raw.regex = Some(value),
        }
        raw
    }
}

impl TryFrom<RawRule> for MatchRule {
    type Error = String;
    fn try_from(raw: RawRule) -> Result<Self, String> {
        match raw {
            RawRule::Flag(s) => MatchRule::parse_flag(&s),
            RawRule::One(c) => Ok(MatchRule {
                all: vec![c.try_into()?],
            }),
            RawRule::All { all } => {
                if all.is_empty() {
                    return Err("`all` needs at least one condition".into());
                }
                let all = all
                    .into_iter()
                    .map(Condition::try_from)
                    .collect::<Result<_, _>>()?;
                Ok(MatchRule { all })
            }
        }
    }
}

impl From<MatchRule> for RawRule {
    fn from(rule: MatchRule) -> Self {
        if rule.all.len() == 1 {
            RawRule::One((&rule.all[0]).into())
        } else {
            RawRule::All {
                all: rule.all.iter().map(RawCondition::from).collect(),
            }
        }
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
    type Error = String;
    fn try_from(raw: RawSticky) -> Result<Self, String> {
        match (raw.header, raw.cookie) {
            (Some(h), None) => match subject("header", &h)? {
                Subject::Header(n) => Ok(StickyKey::Header(n)),
                _ => unreachable!("subject(header) yields a header"),
            },
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

fn default_affinity_max_age() -> u64 {
    86_400
}

fn default_name() -> String {
    "default".to_string()
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

/// Request header of a `PUT /routes` sent on behalf of a controller: the change is made only if
/// the router is driven by no controller or by this one. Checked and applied under one lock,
/// so two controllers can never both drive one router.
pub const OWNER_HEADER: &str = "x-coalmine-owner";

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

    /// Applies a partial JSON document: the fields it names replace ours, the rest stay.
    /// Nothing changes unless the merged result is valid.
    pub fn patched(&self, patch: &serde_json::Value) -> Result<RoutesDoc, String> {
        let serde_json::Value::Object(fields) = patch else {
            return Err("the route document must be a JSON object".into());
        };
        let mut merged = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let target = merged
            .as_object_mut()
            .expect("a RoutesDoc serializes to an object");
        for (key, value) in fields {
            if key == "generation" {
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
            if path == "." {
                inner
            } else {
                format!("{path}: {inner}")
            }
        })
    }
}

/// A validated table, ready for the hot path, with the numbers derived once per swap.
#[derive(Debug)]
pub struct RouteTable {
    pub doc: RoutesDoc,
    /// Bumped by every swap; lets clients tell which table served them.
    pub generation: u64,
    pub(crate) salt: u64,
    /// Value of the affinity cookie for this canary: a new canary URL invalidates old pins.
    pub(crate) affinity_token: String,
}

impl RouteTable {
    pub fn new(doc: RoutesDoc, generation: u64) -> Self {
        let salt = xxh3_64(doc.name.as_bytes());
        let affinity_token = match &doc.canary {
            Some(c) => format!("{:016x}", xxh3_64(c.as_str().as_bytes())),
            None => String::new(),
        };
        RouteTable {
            doc,
            generation,
            salt,
            affinity_token,
        }
    }

    /// The document plus read-only fields, as `GET /routes` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.doc).expect("a RoutesDoc serializes");
        v["generation"] = self.generation.into();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_syntax_covers_every_match_kind() {
        let r = MatchRule::parse_flag("x-canary=true").unwrap();
        assert_eq!(
            r.all[0].subject,
            Subject::Header(HeaderName::from_static("x-canary"))
        );
        assert!(r.all[0].test.matches("true"));
        let r = MatchRule::parse_flag("User-Id~^(1|2|3|4|5)$").unwrap();
        assert!(r.all[0].test.matches("3") && !r.all[0].test.matches("13"));
        let r = MatchRule::parse_flag("cookie:canary=always").unwrap();
        assert_eq!(r.all[0].subject, Subject::Cookie("canary".into()));
        let r = MatchRule::parse_flag("query:beta=1").unwrap();
        assert_eq!(r.all[0].subject, Subject::Query("beta".into()));
        assert!(MatchRule::parse_flag("novalue").is_err());
        assert!(MatchRule::parse_flag("x~(unclosed")
            .unwrap_err()
            .contains("invalid regex"));
        assert!(MatchRule::parse_flag("bad header=1").is_err());
    }

    #[test]
    fn a_bad_regex_is_reported_as_written_on_one_line() {
        let err = MatchRule::parse_flag("user-id~^(1|2").unwrap_err();
        assert_eq!(
            err,
            r#"invalid regex "^(1|2": unclosed group (at character 2)"#
        );
        let doc = serde_json::json!({
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
    fn a_regex_cannot_escape_its_anchors() {
        // `^(?:a)|(b)$` would compile and match any value starting with "a".
        let err = MatchRule::parse_flag("x~a)|(b").unwrap_err();
        assert!(err.contains(r#"invalid regex "a)|(b""#), "{err}");
    }

    #[test]
    fn regex_matches_the_whole_value_like_istio() {
        let r = MatchRule::parse_flag("user-id~1|2").unwrap();
        assert!(r.all[0].test.matches("1"));
        assert!(!r.all[0].test.matches("12"));
    }

    #[test]
    fn document_round_trips_through_json() {
        let json = serde_json::json!({
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
        let back: RoutesDoc = serde_json::from_value(serde_json::to_value(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn patch_keeps_omitted_fields_and_rejects_bad_ones() {
        let doc: RoutesDoc = serde_json::from_value(serde_json::json!({
            "stable": "http://127.0.0.1:1", "canary": "http://127.0.0.1:2", "canaryWeight": 5
        }))
        .unwrap();
        let p = doc
            .patched(&serde_json::json!({"canaryWeight": 10}))
            .unwrap();
        assert_eq!(p.canary_weight.basis_points(), 1000);
        assert_eq!(p.canary, doc.canary);
        let p = doc.patched(&serde_json::json!({"canary": null})).unwrap();
        assert!(p.canary.is_none());
        let e = doc
            .patched(&serde_json::json!({"canaryWeight": 101}))
            .unwrap_err();
        assert!(e.contains("canaryWeight"), "{e}");
        let e = doc
            .patched(&serde_json::json!({"canaryWieght": 1}))
            .unwrap_err();
        assert!(e.contains("canaryWieght"), "{e}");
        let e = doc
            .patched(&serde_json::json!({"stable": "https://x"}))
            .unwrap_err();
        assert!(e.contains("stable"), "{e}");
    }

    #[test]
    fn upstream_urls_are_checked() {
        assert!(UpstreamUrl::parse("http://127.0.0.1:80").is_ok());
        assert_eq!(UpstreamUrl::parse("http://h").unwrap().port(), 80);
        assert!(UpstreamUrl::parse("127.0.0.1:80").is_err());
        assert!(UpstreamUrl::parse("ftp://h").is_err());
        assert!(UpstreamUrl::parse("http://h/path").is_err());
        assert_eq!(
            UpstreamUrl::parse("http://127.0.0.1:99999").unwrap_err(),
            r#""http://127.0.0.1:99999": port 99999 is out of range (ports are 1 to 65535)"#
        );
        assert!(UpstreamUrl::parse("http://127.0.0.1:0")
            .unwrap_err()
            .contains("port 0 is out of range"));
        assert_eq!(
            UpstreamUrl::parse("http://[::1]:8080").unwrap().host(),
            "::1"
        );
    }
}
