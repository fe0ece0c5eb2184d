//! Match rules: which requests reach the canary whatever its weight (`match`), or whenever there
//! is one (`preview`). One shape for the flag syntax (`x-canary=true`), YAML and JSON.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Invalid;

/// A header field name (RFC 9110 token), lowercase: what a rule or a sticky key reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeaderName(String);

/// Longest header name accepted, as hyper's `http` crate accepts (so the router can match
/// every name its clients can send).
const MAX_HEADER_NAME_LEN: usize = (1 << 16) - 1;

impl HeaderName {
    /// Any case in, lowercase kept: header names are compared without case.
    pub fn parse(name: &str) -> Result<Self, Invalid> {
        let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN || !name.bytes().all(is_token) {
            return Err(Invalid(format!("{name:?} is not a valid header name")));
        }
        Ok(HeaderName(name.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for HeaderName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HeaderName::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A regex that must match a whole value, as Istio's and Envoy's header regexes do: the
/// pattern is anchored as `^(?:PATTERN)$`. It is compiled on its own first, so an error shows
/// the pattern as the user wrote it, and a pattern that is not whole by itself (`a)|(b`) cannot
/// slip out of the anchors.
pub fn whole_value_regex(pattern: &str) -> Result<regex::Regex, Invalid> {
    regex::Regex::new(pattern).map_err(|e| regex_message(pattern, &e))?;
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| regex_message(pattern, &e))
}

/// `invalid regex "^(1|2": unclosed group (at character 2)`: one line, the user's pattern.
fn regex_message(pattern: &str, e: &regex::Error) -> Invalid {
    let regex::Error::Syntax(text) = e else {
        return Invalid(format!("invalid regex {pattern:?}: {e}"));
    };
    // The regex crate's syntax errors show the pattern, a line of carets under the mistake and
    // `error: REASON`; the pattern is already in our message, so keep the reason and where.
    let reason = text
        .lines()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or(text.as_str());
    let at = text
        .lines()
        .find(|l| l.trim_start().starts_with('^') && l.trim().chars().all(|c| c == '^'))
        .and_then(|l| l.find('^'))
        .filter(|_| !pattern.contains('\n'))
        .map(|indent| format!(" (at character {})", indent.saturating_sub(4) + 1))
        .unwrap_or_default();
    Invalid(format!("invalid regex {pattern:?}: {reason}{at}"))
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

    /// A whole-value regex (see [`whole_value_regex`]).
    pub fn regex(pattern: &str) -> Result<Self, Invalid> {
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
    /// Where the client is, as the router's geography sources say (a GeoIP database at the
    /// client's address, or a CDN's header).
    Geo(GeoField),
}

/// What is known of where a client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeoField {
    /// ISO 3166-1 alpha-2, upper case: `DE`.
    Country,
    /// ISO 3166-2: the country, `-`, the subdivision: `US-CA`.
    Region,
}

impl GeoField {
    pub fn as_str(self) -> &'static str {
        match self {
            GeoField::Country => "country",
            GeoField::Region => "region",
        }
    }

    fn parse(name: &str) -> Result<GeoField, Invalid> {
        match name {
            "country" => Ok(GeoField::Country),
            "region" => Ok(GeoField::Region),
            other => Err(Invalid(format!(
                "geo:{other}: a geography match reads country (ISO 3166-1: DE) or region (ISO 3166-2: US-CA)"
            ))),
        }
    }
}

impl MatchRule {
    /// Whether any condition reads the client's location: such a rule needs a router with a
    /// geography source.
    pub fn reads_geography(&self) -> bool {
        self.all
            .iter()
            .any(|c| matches!(c.subject, Subject::Geo(_)))
    }
}

impl Subject {
    /// A header condition's subject, named in any case.
    pub fn header(name: &str) -> Result<Self, Invalid> {
        subject("header", name)
    }
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
    /// `cookie:NAME=VALUE`, `query:NAME=VALUE`, `geo:country=DE`, `geo:region~US-(CA|WA)`.
    pub fn parse_flag(text: &str) -> Result<Self, Invalid> {
        let (subject_kind, rest) = if let Some(r) = text.strip_prefix("cookie:") {
            ("cookie", r)
        } else if let Some(r) = text.strip_prefix("query:") {
            ("query", r)
        } else if let Some(r) = text.strip_prefix("geo:") {
            ("geo", r)
        } else {
            ("header", text)
        };
        let eq = rest.find('=');
        let tilde = rest.find('~');
        let (name, test) = match (eq, tilde) {
            (Some(i), t) if t.is_none_or(|t| i < t) => {
                (&rest[..i], StrMatch::Exact(rest[i + 1..].to_string()))
            }
            (_, Some(i)) if matches!(subject_kind, "header" | "geo") => {
                (&rest[..i], StrMatch::regex(&rest[i + 1..])?)
            }
            _ => {
                return Err(Invalid(format!(
                "{text:?}: expected NAME=VALUE, NAME~REGEX, cookie:NAME=VALUE, query:NAME=VALUE or geo:country=CODE"
            )))
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

fn subject(kind: &str, name: &str) -> Result<Subject, Invalid> {
    if name.is_empty() {
        return Err(Invalid(format!("a {kind} match needs a name")));
    }
    match kind {
        "header" => HeaderName::parse(name).map(Subject::Header),
        "cookie" => Ok(Subject::Cookie(name.to_string())),
        "geo" => GeoField::parse(name).map(Subject::Geo),
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
    /// `country` or `region`.
    #[serde(skip_serializing_if = "Option::is_none")]
    geo: Option<String>,
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
    type Error = Invalid;
    fn try_from(raw: RawCondition) -> Result<Self, Invalid> {
        let subject = match (raw.header, raw.cookie, raw.query, raw.geo) {
            (Some(n), None, None, None) => subject("header", &n)?,
            (None, Some(n), None, None) => subject("cookie", &n)?,
            (None, None, Some(n), None) => subject("query", &n)?,
            (None, None, None, Some(n)) => subject("geo", &n)?,
            _ => {
                return Err(
                    "a match condition names exactly one of header, cookie, query, geo".into(),
                )
            }
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
            Subject::Geo(field) => raw.geo = Some(field.as_str().to_string()),
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
    type Error = Invalid;
    fn try_from(raw: RawRule) -> Result<Self, Invalid> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_syntax_covers_every_match_kind() {
        let r = MatchRule::parse_flag("x-canary=true").unwrap();
        assert_eq!(
            r.all[0].subject,
            Subject::Header(HeaderName::parse("x-canary").unwrap())
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
            .to_string()
            .contains("invalid regex"));
        assert!(MatchRule::parse_flag("bad header=1").is_err());
    }

    #[test]
    fn header_names_are_tokens_kept_lowercase() {
        assert_eq!(HeaderName::parse("X-User_1").unwrap().as_str(), "x-user_1");
        assert_eq!(
            HeaderName::parse("a!#$%&'*+-.^_`|~9").unwrap().as_str(),
            "a!#$%&'*+-.^_`|~9"
        );
        for bad in ["", "bad header", "x:y", "é", "a\"b", "(x)"] {
            assert_eq!(
                HeaderName::parse(bad).unwrap_err().to_string(),
                format!("{bad:?} is not a valid header name")
            );
        }
        assert!(HeaderName::parse(&"a".repeat(MAX_HEADER_NAME_LEN)).is_ok());
        assert!(HeaderName::parse(&"a".repeat(MAX_HEADER_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn a_bad_regex_is_reported_as_written_on_one_line() {
        let err = MatchRule::parse_flag("user-id~^(1|2").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid regex "^(1|2": unclosed group (at character 2)"#
        );
    }

    #[test]
    fn a_regex_cannot_escape_its_anchors() {
        // `^(?:a)|(b)$` would compile and match any value starting with "a".
        let err = MatchRule::parse_flag("x~a)|(b").unwrap_err().to_string();
        assert!(err.contains(r#"invalid regex "a)|(b""#), "{err}");
    }

    #[test]
    fn regex_matches_the_whole_value_like_istio() {
        let r = MatchRule::parse_flag("user-id~1|2").unwrap();
        assert!(r.all[0].test.matches("1"));
        assert!(!r.all[0].test.matches("12"));
    }
}
