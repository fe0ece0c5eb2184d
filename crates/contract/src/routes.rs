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

/// Where one version's requests go: one upstream, or several — a version running as many pods,
/// as the router finds them in EndpointSlices in Gateway API mode — each request to one of them
/// at random. Written as one URL or a list of URLs.
///
/// Gateway API mode also writes weighted groups: `[{weight: 70, endpoints: [...]}, {weight: 30,
/// endpoints: [...]}]`, a group picked by weight, then one of its endpoints. A group without
/// endpoints (`[]`) answers its share 503, counted as the version's (`no_endpoints`: its pods
/// are not serving); a group that is `{weight: 5, invalid: "why"}` (a backend that does not
/// resolve) answers its share 500, counted as the router's (`invalid_backend`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints(Vec<EndpointGroup>);

/// One backend of a version: its weight among the version's groups and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointGroup {
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<UpstreamUrl>,
    /// Why this backend does not resolve (then it has no endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
    /// Changes to the answers of this backend on their way to the client (Gateway API's
    /// backendRef-level `ResponseHeaderModifier`: how Flagger sets its affinity cookie on the
    /// canary's answers).
    #[serde(
        default,
        deserialize_with = "header_changes",
        skip_serializing_if = "HeaderChanges::is_empty"
    )]
    pub response_headers: HeaderChanges,
}

/// Where one request of a version goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Picked<'e> {
    /// An endpoint, and the backend it belongs to.
    Url(&'e UpstreamUrl, &'e EndpointGroup),
    /// The chosen backend has no endpoint ready.
    NoEndpoint,
    /// The chosen backend does not resolve.
    Invalid,
}

impl Endpoints {
    /// One backend's endpoints (none: every request 503).
    pub fn new(urls: Vec<UpstreamUrl>) -> Endpoints {
        Endpoints(vec![EndpointGroup {
            weight: 1,
            endpoints: urls,
            invalid: None,
            response_headers: HeaderChanges::default(),
        }])
    }

    /// Weighted backends. A version of groups that all weigh 0 takes no share (as Gateway
    /// API's backends of weight 0 take none) and answers what its first group would.
    pub fn weighted(groups: Vec<EndpointGroup>) -> Endpoints {
        Endpoints(groups)
    }

    pub fn groups(&self) -> &[EndpointGroup] {
        &self.0
    }

    /// Every endpoint of every group.
    pub fn urls(&self) -> impl Iterator<Item = &UpstreamUrl> {
        self.0.iter().flat_map(|g| &g.endpoints)
    }

    /// Where a request goes, from the caller's random bits: a group by weight (the high bits),
    /// then one of its endpoints (the low bits).
    pub fn pick(&self, random: u64) -> Picked<'_> {
        let group = match self.0.as_slice() {
            [] => return Picked::NoEndpoint,
            [one] => one,
            groups => {
                let total: u64 = groups.iter().map(|g| u64::from(g.weight)).sum();
                if total == 0 {
                    &groups[0]
                } else {
                    let mut at = ((u128::from(random >> 32) * u128::from(total)) >> 32) as u64;
                    groups
                        .iter()
                        .find(|g| {
                            let w = u64::from(g.weight);
                            if at < w {
                                true
                            } else {
                                at -= w;
                                false
                            }
                        })
                        .unwrap_or(&groups[0])
                }
            }
        };
        if group.invalid.is_some() {
            return Picked::Invalid;
        }
        match group.endpoints.len() {
            0 => Picked::NoEndpoint,
            1 => Picked::Url(&group.endpoints[0], group),
            // Multiply-shift over the low bits: no division.
            n => Picked::Url(
                &group.endpoints[((u64::from(random as u32) * n as u64) >> 32) as usize],
                group,
            ),
        }
    }

    /// The single-group form: one backend of weight 1, valid.
    fn plain(&self) -> Option<&[UpstreamUrl]> {
        match self.0.as_slice() {
            [g] if g.weight == 1 && g.invalid.is_none() && g.response_headers.is_empty() => {
                Some(&g.endpoints)
            }
            _ => None,
        }
    }
}

impl From<UpstreamUrl> for Endpoints {
    fn from(url: UpstreamUrl) -> Endpoints {
        Endpoints::new(vec![url])
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, group) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            if self.0.len() > 1 {
                write!(f, "{}× ", group.weight)?;
            }
            if let Some(why) = &group.invalid {
                write!(f, "invalid ({why})")?;
            }
            for (j, url) in group.endpoints.iter().enumerate() {
                if j > 0 {
                    f.write_str(", ")?;
                }
                f.write_str(url.as_str())?;
            }
        }
        Ok(())
    }
}

impl Serialize for Endpoints {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.plain() {
            Some([one]) => one.serialize(s),
            Some(many) => many.serialize(s),
            None => self.0.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Endpoints {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            One(String),
            Many(Vec<String>),
            Groups(Vec<EndpointGroup>),
        }
        let written = Written::deserialize(d).map_err(|e: D::Error| {
            // A missing field keeps serde's own words (it names the field).
            let said = e.to_string();
            serde::de::Error::custom(if said.starts_with("missing field") {
                said
            } else {
                "an upstream is a URL (http://host:port), a list of them, or weighted groups ({weight, endpoints})".to_string()
            })
        })?;
        let urls = match written {
            Written::One(url) => vec![url],
            Written::Many(urls) => urls,
            Written::Groups(groups) => return Ok(Endpoints(groups)),
        };
        urls.iter()
            .map(|u| UpstreamUrl::parse(u))
            .collect::<Result<Vec<_>, _>>()
            .map(Endpoints::new)
            .map_err(serde::de::Error::custom)
    }
}

/// A header's new value, as a route's `requestHeaders` sets or adds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueSpec {
    pub name: HeaderName,
    #[serde(deserialize_with = "header_value")]
    pub value: String,
}

fn header_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    // RFC 9110 field-value: visible ASCII, spaces and tabs inside; no line breaks or NULs.
    if value
        .bytes()
        .any(|b| b == b'\r' || b == b'\n' || b == 0 || b == 0x7f)
        || value.starts_with([' ', '\t'])
        || value.ends_with([' ', '\t'])
    {
        return Err(serde::de::Error::custom(format!(
            "{value:?} is not a header value (no line breaks, NULs or surrounding spaces)"
        )));
    }
    Ok(value)
}

/// Changes to the request's headers on its way upstream (Gateway API's `RequestHeaderModifier`):
/// `set` replaces every field of that name, `add` appends one, `remove` drops every field of
/// that name. Applied after the router's own (`X-Forwarded-For`); hop-by-hop headers and `Host`
/// are the router's and cannot be named.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderChanges {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValueSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValueSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<HeaderName>,
}

/// Headers a route may not change: the connection's own (hop-by-hop), its framing and `Host`.
const ROUTERS_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "host",
];

impl HeaderChanges {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Whether a field of this name (lowercase) is dropped from the client's request: it is
    /// set anew or removed.
    pub fn drops(&self, name: &[u8]) -> bool {
        self.set
            .iter()
            .any(|h| h.name.as_str().as_bytes().eq_ignore_ascii_case(name))
            || self
                .remove
                .iter()
                .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
    }

    /// The fields to write after the client's (those kept): every `set`, then every `add`.
    pub fn appended(&self) -> impl Iterator<Item = &HeaderValueSpec> {
        self.set.iter().chain(&self.add)
    }

    fn check(&self) -> Result<(), Invalid> {
        let names = self.set.iter().chain(&self.add).map(|h| &h.name);
        for name in names.chain(&self.remove) {
            if ROUTERS_HEADERS.contains(&name.as_str()) {
                return Err(Invalid(format!(
                    "{name:?} is the router's to write (framing, connection or Host); a route cannot change it"
                )));
            }
        }
        Ok(())
    }
}

fn header_changes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HeaderChanges, D::Error> {
    let changes = HeaderChanges::deserialize(d)?;
    changes.check().map_err(serde::de::Error::custom)?;
    Ok(changes)
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
    /// The rollout group's release this canary is part of ([`group_release`]). With it, the
    /// cookie's value comes from the route's name (the group's cohort) and the release, so
    /// every member of the group sets and honours the same cookie; without it, from the
    /// canary's URL, as for a rollout of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

impl Affinity {
    /// The cookie's value pinning a user to `canary`, the canary of the route named
    /// `route_name`. A new canary (or a new group release) is a new value, so pins from an
    /// earlier release send nobody to this one.
    pub fn token(&self, route_name: &str, canary: &Endpoints) -> String {
        let hash = match &self.release {
            Some(release) => xxh3_64(format!("{route_name}\n{release}").as_bytes()),
            None => xxh3_64(canary.to_string().as_bytes()),
        };
        format!("{hash:016x}")
    }
}

/// A rollout group's release: one key for the members' canaries together (each member's name
/// and its canary as its document gives it, in the group's order), so every member derives
/// the same affinity cookie, and a new canary of any member makes a new release.
pub fn group_release<'a>(canaries: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut text = String::new();
    for (member, canary) in canaries {
        text.push_str(member);
        text.push('\0');
        text.push_str(canary);
        text.push('\n');
    }
    format!("{:016x}", xxh3_64(text.as_bytes()))
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

/// The service a router carries when none is named: what `--stable`/`--canary`, the config
/// file's top-level route fields, `PUT /routes` and a rollout without `routerService` mean.
pub const DEFAULT_SERVICE: &str = "default";

fn default_service() -> String {
    DEFAULT_SERVICE.to_string()
}

/// Longest service name: a DNS label's, so a name fits a URL path segment and a metric label.
const MAX_SERVICE_NAME_LEN: usize = 63;

/// A service name: 1 to 63 ASCII letters, digits, `-`, `_` or `.`, starting with a letter or
/// digit (it is a path segment of `/routes/{service}` and a `service` label value).
pub fn check_service_name(name: &str) -> Result<(), Invalid> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
    if name.is_empty()
        || name.len() > MAX_SERVICE_NAME_LEN
        || !name.as_bytes()[0].is_ascii_alphanumeric()
        || !name.bytes().all(ok)
    {
        return Err(Invalid(format!(
            "{name:?} is not a service name (1 to {MAX_SERVICE_NAME_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit)"
        )));
    }
    Ok(())
}

fn service_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    check_service_name(&name).map_err(serde::de::Error::custom)?;
    Ok(name)
}

/// A host a service answers for: an exact name (`shop.example.com`) or a wildcard
/// (`*.example.com`: any name ending in `.example.com`, however many labels before it, but not
/// `example.com` itself — Gateway API's rule). Kept lowercase; matched without case, without
/// the port and a trailing dot of the request's `Host` (or HTTP/2 `:authority`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern(String);

/// Longest host name (RFC 1035).
pub const MAX_HOST_LEN: usize = 253;

impl HostPattern {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let lower = text.to_ascii_lowercase();
        let name = lower.strip_prefix("*.").unwrap_or(&lower);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.is_empty() || lower.len() > MAX_HOST_LEN || !name.split('.').all(label_ok) {
            return Err(Invalid(format!(
                "{text:?} is not a host name (letters, digits and '-' in dot-separated labels, no port; `*.` in front for a wildcard)"
            )));
        }
        Ok(HostPattern(lower))
    }

    /// The name as written, lowercase (`*.example.com` for a wildcard).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For a wildcard, the suffix a matching host ends with, dot included (`.example.com`).
    pub fn wildcard_suffix(&self) -> Option<&str> {
        self.0.strip_prefix('*')
    }
}

impl TryFrom<String> for HostPattern {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        HostPattern::parse(&s)
    }
}

impl From<HostPattern> for String {
    fn from(h: HostPattern) -> String {
        h.0
    }
}

/// A path prefix a service answers for, matched by whole segments as Gateway API's
/// `PathPrefix`: `/api` takes `/api`, `/api/` and `/api/v1`, not `/apis`. A trailing `/` is
/// dropped (`/api/` is `/api`); `/` takes every path. Compared with case, undecoded.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathPrefix(String);

impl PathPrefix {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        if !text.starts_with('/') || text.contains(['?', '#']) || text.contains("//") {
            return Err(Invalid(format!(
                "{text:?} is not a path prefix (it starts with '/', has no '?', '#' or empty segment)"
            )));
        }
        let trimmed = text.trim_end_matches('/');
        Ok(PathPrefix(if trimmed.is_empty() {
            "/".to_string()
        } else {
            trimmed.to_string()
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `path` (a request's path, without its query) is under this prefix, segment by
    /// segment.
    pub fn matches(&self, path: &[u8]) -> bool {
        let prefix = self.0.as_bytes();
        prefix == b"/"
            || (path.starts_with(prefix)
                && (path.len() == prefix.len() || path[prefix.len()] == b'/'))
    }
}

impl TryFrom<String> for PathPrefix {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        PathPrefix::parse(&s)
    }
}

impl From<PathPrefix> for String {
    fn from(p: PathPrefix) -> String {
        p.0
    }
}

/// Which paths a service takes: a prefix (written as a plain path: `/api`), an exact path
/// (`{exact: /api/v1/users}`), or a whole-path regex (`{regex: "/v[0-9]+/.*"}`). Compared with
/// the request's path as sent (without its query), with case. Precedence (Gateway API's): an
/// exact path over any prefix, a longer prefix over a shorter, and a regex after every prefix.
#[derive(Clone, Debug)]
pub enum PathMatch {
    Prefix(PathPrefix),
    Exact(String),
    Regex(regex::Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Prefix(p) => p.matches(path),
            PathMatch::Exact(e) => e.as_bytes() == path,
            PathMatch::Regex(r) => std::str::from_utf8(path).is_ok_and(|p| r.is_match(p)),
        }
    }

    /// Orders paths by precedence, most specific first: exact paths (longer first), then
    /// prefixes (longer first), then regexes; no path at all (`None`) comes last.
    pub fn precedence(path: Option<&PathMatch>) -> (u8, std::cmp::Reverse<usize>) {
        match path {
            Some(PathMatch::Exact(e)) => (0, std::cmp::Reverse(e.len())),
            Some(PathMatch::Prefix(p)) if p.as_str() != "/" => {
                (1, std::cmp::Reverse(p.as_str().len()))
            }
            Some(PathMatch::Regex(_)) => (2, std::cmp::Reverse(0)),
            Some(PathMatch::Prefix(_)) | None => (3, std::cmp::Reverse(0)),
        }
    }
}

impl PartialEq for PathMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PathMatch::Prefix(a), PathMatch::Prefix(b)) => a == b,
            (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
            (PathMatch::Regex(a), PathMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl From<PathPrefix> for PathMatch {
    fn from(p: PathPrefix) -> PathMatch {
        PathMatch::Prefix(p)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum WrittenPath {
    Prefix(String),
    Other(OtherPath),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
enum OtherPath {
    Exact(String),
    Regex(String),
}

/// The pattern as written (the compiled regex is anchored).
fn written_regex(r: &regex::Regex) -> &str {
    let s = r.as_str();
    s.strip_prefix("^(?:")
        .and_then(|s| s.strip_suffix(")$"))
        .unwrap_or(s)
}

impl Serialize for PathMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PathMatch::Prefix(p) => WrittenPath::Prefix(p.as_str().to_string()),
            PathMatch::Exact(e) => WrittenPath::Other(OtherPath::Exact(e.clone())),
            PathMatch::Regex(r) => {
                WrittenPath::Other(OtherPath::Regex(written_regex(r).to_string()))
            }
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for PathMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let written = WrittenPath::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a path is a prefix (\"/api\"), {exact: \"/api/v1\"} or {regex: \"/v[0-9]+/.*\"}",
            )
        })?;
        match written {
            WrittenPath::Prefix(p) => PathPrefix::parse(&p).map(PathMatch::Prefix),
            WrittenPath::Other(OtherPath::Exact(e)) => {
                if !e.starts_with('/') || e.contains(['?', '#']) {
                    Err(Invalid(format!(
                        "{e:?} is not an exact path (it starts with '/', has no '?' or '#')"
                    )))
                } else {
                    Ok(PathMatch::Exact(e))
                }
            }
            WrittenPath::Other(OtherPath::Regex(r)) => {
                crate::matching::whole_value_regex(&r).map(PathMatch::Regex)
            }
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Request methods as a service's selector: RFC 9110 tokens, compared with case (methods are
/// case-sensitive), so `get` is refused rather than never matching.
fn methods<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let methods = Vec::<String>::deserialize(d)?;
    for m in &methods {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if m.is_empty() || !m.bytes().all(token) || m.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(serde::de::Error::custom(format!(
                "{m:?} is not a request method (an upper-case token: GET, POST, …)"
            )));
        }
    }
    Ok(methods)
}

/// A service's selectors: rules on headers and query parameters (Gateway API's `HTTPRouteMatch`
/// has both); a rule on a cookie or the client's place selects a version, not a service.
fn header_rules<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<MatchRule>, D::Error> {
    let rules = Vec::<MatchRule>::deserialize(d)?;
    for rule in &rules {
        if let Some(c) = rule.all.iter().find(|c| {
            !matches!(
                c.subject,
                crate::Subject::Header(_) | crate::Subject::Query(_)
            )
        }) {
            let what = match &c.subject {
                crate::Subject::Cookie(n) => format!("cookie {n:?}"),
                crate::Subject::Geo(field) => format!("client's {}", field.as_str()),
                crate::Subject::Header(_) | crate::Subject::Query(_) => unreachable!(),
            };
            return Err(serde::de::Error::custom(format!(
                "a service is selected by headers and query parameters, not by a {what} (put it in match to choose a version)"
            )));
        }
    }
    Ok(rules)
}

/// One service's routes as users write and read them: which requests it takes (`hosts`,
/// `paths`, `headers`; none of a kind means any) and where they go. A router's table is a list
/// of these; the single-service forms (`--stable`, `PUT /routes`) are the one named
/// [`DEFAULT_SERVICE`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutesDoc {
    /// The service's name: `/routes/{service}`, `/stats/{service}`, the `service` label.
    #[serde(default = "default_service", deserialize_with = "service_name")]
    pub service: String,
    /// Host names (exact or `*.` wildcard) this service answers for; none: every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostPattern>,
    /// Paths this service answers for (prefixes, exact paths, regexes); none: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
    /// Request methods this service takes (`GET`, `POST`, …); none: every method.
    #[serde(
        default,
        deserialize_with = "methods",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub methods: Vec<String>,
    /// Header and query-parameter rules that must all hold for this service to take a request.
    #[serde(
        default,
        deserialize_with = "header_rules",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub headers: Vec<MatchRule>,
    /// Names the route; salts the sticky hash, so two services do not pick the same users.
    #[serde(default = "default_name")]
    pub name: String,
    pub stable: Endpoints,
    #[serde(default)]
    pub canary: Option<Endpoints>,
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
    /// Changes to the answer's headers on the way to the client (Gateway API's
    /// `ResponseHeaderModifier`), before those of the backend that answered.
    #[serde(
        default,
        deserialize_with = "header_changes",
        skip_serializing_if = "HeaderChanges::is_empty"
    )]
    pub response_headers: HeaderChanges,
    /// Changes to the request's headers on the way upstream.
    #[serde(
        default,
        deserialize_with = "header_changes",
        skip_serializing_if = "HeaderChanges::is_empty"
    )]
    pub request_headers: HeaderChanges,
    /// The controller driving this router (a rollout and where it runs), while one does: a
    /// route change sent on behalf of another is refused (see [`OWNER_HEADER`]).
    #[serde(default)]
    pub owner: Option<String>,
}

impl RoutesDoc {
    /// A table sending everything to stable: the starting point when only `--stable` is known.
    pub fn stable_only(stable: Endpoints) -> Self {
        RoutesDoc {
            service: default_service(),
            hosts: Vec::new(),
            paths: Vec::new(),
            methods: Vec::new(),
            headers: Vec::new(),
            name: default_name(),
            stable,
            canary: None,
            canary_weight: Weight::ZERO,
            matches: Vec::new(),
            preview: Vec::new(),
            sticky: None,
            affinity: None,
            mirror: Weight::ZERO,
            request_headers: HeaderChanges::default(),
            response_headers: HeaderChanges::default(),
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
        RoutesDoc::from_json_value(&merged)
    }

    /// A new service from a whole document (`PUT /routes/{service}` of a service the router
    /// does not have): `service` is the path's; a different one in the body is an error.
    pub fn created(service: &str, doc: &serde_json::Value) -> Result<RoutesDoc, Invalid> {
        let serde_json::Value::Object(fields) = doc else {
            return Err("the route document must be a JSON object".into());
        };
        let mut fields = fields.clone();
        fields.remove(GENERATION);
        fields.entry("service").or_insert_with(|| service.into());
        RoutesDoc::from_json_value(&serde_json::Value::Object(fields))
    }

    fn from_json_value(value: &serde_json::Value) -> Result<RoutesDoc, Invalid> {
        let json = serde_json::to_string(value).map_err(|e| e.to_string())?;
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

/// Checks a whole table: every service named once. (Each service checked itself while it was
/// read.)
pub fn check_services(services: &[RoutesDoc]) -> Result<(), Invalid> {
    for (i, doc) in services.iter().enumerate() {
        if let Some(first) = services[..i].iter().position(|d| d.service == doc.service) {
            return Err(Invalid(format!(
                "services[{i}].service: {:?} is already the name of services[{first}]; each service is named once",
                doc.service
            )));
        }
    }
    Ok(())
}

/// A table's services as a config file lists them, checked whole (see [`check_services`]).
pub fn services_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<RoutesDoc>, D::Error> {
    let services = Vec::<RoutesDoc>::deserialize(d)?;
    check_services(&services).map_err(serde::de::Error::custom)?;
    Ok(services)
}

/// The key of `GET /routes`' answer listing every service.
pub const SERVICES: &str = "services";

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

    /// `GET /routes`: the whole table — every service in `services`, in table order — and, for
    /// readers of the single-service form, the default service's fields at the top (absent
    /// when the table has no default service).
    pub fn table_json(services: &[RoutesDoc], generation: u64) -> serde_json::Value {
        let mut v = match services.iter().find(|d| d.service == DEFAULT_SERVICE) {
            Some(default) => ServedRoutes::json(default, generation),
            None => serde_json::json!({ GENERATION: generation }),
        };
        v[SERVICES] = serde_json::to_value(services).expect("route documents serialize");
        v
    }

    /// Reads an answer (of `/routes/{service}`, or the default service's of `/routes`); `None`
    /// unless it is a route document with its generation.
    pub fn from_json(mut value: serde_json::Value) -> Option<ServedRoutes> {
        let fields = value.as_object_mut()?;
        fields.remove(SERVICES);
        let generation = fields.remove(GENERATION)?.as_u64()?;
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
    pub stable: Option<Endpoints>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Option<Endpoints>>,
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
            doc.canary.as_ref().unwrap().to_string(),
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
        let doc = RoutesDoc::stable_only(UpstreamUrl::parse("http://127.0.0.1:1").unwrap().into());
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
    fn services_are_selected_by_checked_hosts_paths_and_header_rules() {
        let doc: RoutesDoc = serde_json::from_value(json!({
            "service": "checkout", "stable": "http://127.0.0.1:1",
            "hosts": ["Shop.Example.com", "*.shop.example.com"],
            "paths": ["/checkout/", "/"], "headers": ["x-tenant=blue"]
        }))
        .unwrap();
        assert_eq!(doc.hosts[0].as_str(), "shop.example.com");
        assert_eq!(doc.hosts[1].wildcard_suffix(), Some(".shop.example.com"));
        assert_eq!(doc.hosts[0].wildcard_suffix(), None);
        assert_eq!(
            doc.paths[0],
            PathMatch::Prefix(PathPrefix::parse("/checkout").unwrap())
        );
        assert!(doc.paths[0].matches(b"/checkout"));
        assert!(doc.paths[0].matches(b"/checkout/pay"));
        assert!(!doc.paths[0].matches(b"/checkouts"));
        assert!(!doc.paths[0].matches(b"/"));
        assert!(doc.paths[1].matches(b"/anything"));
        let back: RoutesDoc = serde_json::from_value(serde_json::to_value(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);

        let err = |extra: serde_json::Value| {
            let mut v = json!({"stable": "http://127.0.0.1:1"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            serde_json::from_value::<RoutesDoc>(v)
                .unwrap_err()
                .to_string()
        };
        assert!(err(json!({"hosts": ["shop.example.com:8080"]})).contains("no port"));
        assert!(err(json!({"hosts": ["a.*.com"]})).contains("not a host name"));
        assert!(err(json!({"paths": ["api"]})).contains("starts with '/'"));
        assert!(err(json!({"headers": ["cookie:a=b"]}))
            .contains("headers and query parameters, not by a cookie"));
        assert!(err(json!({"service": "a/b"})).contains("not a service name"));
        assert!(err(json!({"service": ""})).contains("not a service name"));
        // A document without selectors is the default service, taking every request.
        let plain: RoutesDoc =
            serde_json::from_value(json!({"stable": "http://127.0.0.1:1"})).unwrap();
        assert_eq!(plain.service, DEFAULT_SERVICE);
        let shown = serde_json::to_value(&plain).unwrap();
        assert!(shown.get("hosts").is_none(), "{shown}");
    }

    #[test]
    fn a_table_names_each_service_once_and_shows_the_default_at_the_top() {
        let doc = |service: &str| RoutesDoc {
            service: service.into(),
            ..RoutesDoc::stable_only(UpstreamUrl::parse("http://127.0.0.1:1").unwrap().into())
        };
        let table = [doc("default"), doc("cart"), doc("checkout")];
        check_services(&table).unwrap();
        let e = check_services(&[doc("cart"), doc("a"), doc("cart")])
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("services[2].service: \"cart\" is already the name of services[0]"),
            "{e}"
        );

        let json = ServedRoutes::table_json(&table, 7);
        assert_eq!(json["stable"], "http://127.0.0.1:1");
        assert_eq!(json["services"][2]["service"], "checkout");
        let served = ServedRoutes::from_json(json).unwrap();
        assert_eq!((served.doc, served.generation), (doc("default"), 7));
        // Without a default service, the answer is no single service's.
        let json = ServedRoutes::table_json(&table[1..], 7);
        assert!(json.get("stable").is_none());
        assert!(ServedRoutes::from_json(json).is_none());
    }

    #[test]
    fn a_created_service_takes_its_name_from_the_path_unless_the_body_differs() {
        let created = RoutesDoc::created(
            "cart",
            &json!({"stable": "http://127.0.0.1:1", "generation": 3}),
        )
        .unwrap();
        assert_eq!(created.service, "cart");
        let other = RoutesDoc::created(
            "cart",
            &json!({"stable": "http://127.0.0.1:1", "service": "x"}),
        )
        .unwrap();
        assert_eq!(other.service, "x", "the caller compares it with the path");
        let e = RoutesDoc::created("cart", &json!({"canaryWeight": 5}))
            .unwrap_err()
            .0;
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

    #[test]
    fn a_version_is_one_upstream_or_a_list_and_reads_back_as_written() {
        let one: RoutesDoc =
            serde_json::from_value(json!({"stable": "http://10.0.0.1:80"})).unwrap();
        assert_eq!(
            serde_json::to_value(&one).unwrap()["stable"],
            "http://10.0.0.1:80"
        );
        let many: RoutesDoc = serde_json::from_value(
            json!({"stable": ["http://10.0.0.1:8080", "http://10.0.0.2:8080"], "canary": []}),
        )
        .unwrap();
        assert_eq!(many.stable.urls().count(), 2);
        assert_eq!(
            serde_json::to_value(&many).unwrap()["stable"],
            json!(["http://10.0.0.1:8080", "http://10.0.0.2:8080"])
        );
        // No endpoint: the version's requests are answered 503, nothing is picked.
        assert_eq!(many.canary.as_ref().unwrap().pick(7), Picked::NoEndpoint);
        // Every endpoint is picked, each about as often (multiply-shift over the draw).
        let mut seen = [0u32; 2];
        for i in 0..1000u64 {
            let draw = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let Picked::Url(url, _) = many.stable.pick(draw) else {
                panic!("an endpoint")
            };
            seen[many.stable.urls().position(|u| u == url).unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| (450..=550).contains(n)), "{seen:?}");
        // Weighted groups: 70/30/0 by weight, an invalid one's share Invalid.
        let groups: Endpoints = serde_json::from_value(json!([
            {"weight": 60, "endpoints": ["http://10.0.0.1:80"]},
            {"weight": 30, "endpoints": ["http://10.0.0.2:80", "http://10.0.0.3:80"]},
            {"weight": 0, "endpoints": ["http://10.0.0.4:80"]},
            {"weight": 10, "invalid": "Service shop/x not found"},
        ]))
        .unwrap();
        let mut counts = std::collections::HashMap::new();
        let mut state = 1u64;
        for _ in 0..100_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = match groups.pick(state ^ (state >> 29)) {
                Picked::Url(u, _) => u.as_str().to_string(),
                other => format!("{other:?}"),
            };
            *counts.entry(key).or_insert(0u32) += 1;
        }
        let share = |k: &str| f64::from(counts.get(k).copied().unwrap_or(0)) / 100_000.0;
        assert!(
            (share("http://10.0.0.1:80") - 0.60).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share("http://10.0.0.2:80") - 0.15).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share("http://10.0.0.3:80") - 0.15).abs() < 0.01,
            "{counts:?}"
        );
        assert_eq!(share("http://10.0.0.4:80"), 0.0, "weight 0 takes nothing");
        assert!((share("Invalid") - 0.10).abs() < 0.01, "{counts:?}");
        // Written back as groups; the plain forms stay plain.
        assert_eq!(
            serde_json::to_value(&groups).unwrap()[3],
            json!({"weight": 10, "invalid": "Service shop/x not found"})
        );
        let err = serde_json::from_value::<RoutesDoc>(json!({"stable": ["http://a:1", 7]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a list of them"), "{err}");
        let err = serde_json::from_value::<RoutesDoc>(json!({"stable": ["https://a:1"]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only http://"), "{err}");
    }

    #[test]
    fn paths_are_prefixes_exact_paths_or_regexes_in_gateway_api_precedence() {
        let doc: RoutesDoc = serde_json::from_value(json!({
            "stable": "http://127.0.0.1:1",
            "paths": ["/api", {"exact": "/api/v1/users"}, {"regex": "/v[0-9]+/.*"}]
        }))
        .unwrap();
        let [prefix, exact, regex] = &doc.paths[..] else {
            panic!("three paths")
        };
        assert!(exact.matches(b"/api/v1/users") && !exact.matches(b"/api/v1/users/1"));
        assert!(
            regex.matches(b"/v2/x") && !regex.matches(b"/x/v2/x"),
            "whole path"
        );
        assert!(prefix.matches(b"/api/v1"));
        let mut order = [None, Some(regex), Some(prefix), Some(exact)];
        order.sort_by_key(|p| PathMatch::precedence(*p));
        assert_eq!(order, [Some(exact), Some(prefix), Some(regex), None]);
        // Written back as written.
        assert_eq!(
            serde_json::to_value(&doc).unwrap()["paths"],
            json!(["/api", {"exact": "/api/v1/users"}, {"regex": "/v[0-9]+/.*"}])
        );
        for (bad, says) in [
            (json!({"exact": "api"}), "not an exact path"),
            (json!({"regex": "(a"}), "invalid regex"),
            (json!({"glob": "/a*"}), "a path is a prefix"),
        ] {
            let err = serde_json::from_value::<RoutesDoc>(
                json!({"stable": "http://127.0.0.1:1", "paths": [bad]}),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn request_header_changes_are_checked_and_leave_the_routers_headers_alone() {
        let doc: RoutesDoc = serde_json::from_value(json!({
            "stable": "http://127.0.0.1:1",
            "requestHeaders": {"set": [{"name": "X-Env", "value": "canary"}],
                               "add": [{"name": "x-trace", "value": "1"}],
                               "remove": ["X-Debug"]}
        }))
        .unwrap();
        let changes = &doc.request_headers;
        assert!(changes.drops(b"x-env") && changes.drops(b"X-DEBUG") && !changes.drops(b"x-trace"));
        let appended: Vec<_> = changes.appended().map(|h| h.name.as_str()).collect();
        assert_eq!(appended, ["x-env", "x-trace"]);
        for (bad, says) in [
            (
                json!({"set": [{"name": "Host", "value": "a"}]}),
                "the router's to write",
            ),
            (
                json!({"remove": ["transfer-encoding"]}),
                "the router's to write",
            ),
            (
                json!({"add": [{"name": "x-a", "value": "a\r\nx-b: c"}]}),
                "not a header value",
            ),
            (
                json!({"add": [{"name": "x a", "value": "a"}]}),
                "not a valid header name",
            ),
        ] {
            let err = serde_json::from_value::<RoutesDoc>(
                json!({"stable": "http://127.0.0.1:1", "requestHeaders": bad}),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    fn affinity(release: Option<&str>) -> Affinity {
        serde_json::from_value(json!({"cookieName": "canary", "release": release})).unwrap()
    }

    fn canary(url: &str) -> Endpoints {
        UpstreamUrl::parse(url).unwrap().into()
    }

    #[test]
    fn a_rollouts_own_cookie_follows_its_canary_url_as_before_releases() {
        let own = affinity(None);
        let v2 = canary("http://127.0.0.1:8002");
        // What routers always answered: the canary's URL, hashed.
        assert_eq!(
            own.token("checkout", &v2),
            format!("{:016x}", xxh3_64(v2.to_string().as_bytes()))
        );
        assert_eq!(own.token("other-route", &v2), own.token("checkout", &v2));
        assert_ne!(
            own.token("checkout", &v2),
            own.token("checkout", &canary("http://127.0.0.1:8003"))
        );
        // A document without a release reads and writes as before.
        let doc: Affinity = serde_json::from_value(json!({"cookieName": "canary"})).unwrap();
        assert_eq!(doc, own);
        assert_eq!(
            serde_json::to_value(&doc).unwrap(),
            json!({"cookieName": "canary", "maxAge": DEFAULT_AFFINITY_MAX_AGE})
        );
    }

    #[test]
    fn a_groups_members_share_one_cookie_per_release() {
        let release = group_release([
            ("ledger", "http://127.0.0.1:8002"),
            ("orders", "http://127.0.0.1:9002"),
        ]);
        let shared = affinity(Some(&release));
        let cohort = "group/payment-change";
        // The same value on every member, whatever its canary.
        assert_eq!(
            shared.token(cohort, &canary("http://127.0.0.1:8002")),
            shared.token(cohort, &canary("http://127.0.0.1:9002"))
        );
        // Another group, or another release of this one (a member's new canary), is another
        // cookie: its pins send nobody to these canaries.
        assert_ne!(
            shared.token("group/other", &canary("http://127.0.0.1:8002")),
            shared.token(cohort, &canary("http://127.0.0.1:8002"))
        );
        let next = group_release([
            ("ledger", "http://127.0.0.1:8002"),
            ("orders", "http://127.0.0.1:9003"),
        ]);
        assert_ne!(next, release);
        assert_ne!(
            affinity(Some(&next)).token(cohort, &canary("http://127.0.0.1:8002")),
            shared.token(cohort, &canary("http://127.0.0.1:8002"))
        );
        // Names and canaries are kept apart: moving text between them is another release.
        assert_ne!(group_release([("ab", "c")]), group_release([("a", "bc")]));
        assert_eq!(
            release,
            group_release([
                ("ledger", "http://127.0.0.1:8002"),
                ("orders", "http://127.0.0.1:9002"),
            ])
        );
    }
}
