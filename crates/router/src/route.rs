//! The routing decision within a service: a pure function of the service's routes and the
//! request's parts. (Which service takes a request is [`RouteTable::select`], just before.)
//!
//! [`RouteTable::select`]: crate::table::RouteTable::select
//!
//! Architecture invariant: nothing here does IO, reads the clock or draws random numbers; the
//! caller passes the randomness in, so tests can replay any decision.

use http::HeaderMap;
use serde::Serialize;

use crate::geo::{client_address, Geo, Location};
use crate::table::{ServiceTable, StickyKey, Subject};
use coalmine_contract::GeoField;

// Declared once, in the contract: a feature flag buckets its users with the same functions.
pub use coalmine_contract::sticky::{sticky_bucket, BUCKETS};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    Stable,
    Canary,
}

impl Version {
    pub const ALL: [Version; 2] = [Version::Stable, Version::Canary];

    pub fn as_str(self) -> &'static str {
        match self {
            Version::Stable => "stable",
            Version::Canary => "canary",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a request went where it went; the order is the order rules are tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    NoCanary,
    /// A preview rule: the canary before it has any share (Argo's preview service).
    Preview,
    Match,
    Affinity,
    Sticky,
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub version: Version,
    pub reason: Reason,
    /// Also send a copy of this (stable-bound) request to the canary.
    pub mirror: bool,
    /// Answer with the affinity cookie, pinning this user to the canary.
    pub set_affinity: bool,
}

/// A request's headers as the decision reads them: every value of a (lowercase) name, in order.
/// Implemented for hyper's parsed `HeaderMap` and for the HTTP/1.1 fast path's raw head.
pub trait Headers {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl Headers for HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).into_iter().map(|v| v.as_bytes())
    }
}

impl Headers for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// A header value as text, when it is visible ASCII (what `HeaderValue::to_str` accepts).
fn text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// What the decision reads of a request.
pub struct RequestView<'a, H: Headers + ?Sized = HeaderMap> {
    pub headers: &'a H,
    pub query: Option<&'a str>,
    /// The connection's peer and the router's geography sources: where the client is, read
    /// only when a rule asks.
    pub client: Option<(std::net::IpAddr, &'a Geo)>,
    /// The `Host` header's value, or HTTP/2's `:authority` (port included, any case).
    pub host: Option<&'a [u8]>,
    /// The path, without the query.
    pub path: &'a [u8],
    /// The request method, as sent.
    pub method: &'a [u8],
}

impl<H: Headers + ?Sized> RequestView<'_, H> {
    /// Where the client is: the geography sources at the client's address (the
    /// `X-Forwarded-For` hop the user trusts, else the peer) or at a CDN's headers.
    fn location(&self) -> Location {
        let Some((peer, geo)) = self.client else {
            return Location::default();
        };
        let client = client_address(
            peer,
            || self.headers.values("x-forwarded-for"),
            geo.trusted_hops,
        );
        geo.locate(client, self.headers)
    }
}

/// Decides where one request goes. `random` is a uniformly random 64-bit value for this request.
pub fn route<H: Headers + ?Sized>(
    table: &ServiceTable,
    req: &RequestView<'_, H>,
    random: u64,
) -> Decision {
    let doc = &table.doc;
    let stable = |reason, mirror| Decision {
        version: Version::Stable,
        reason,
        mirror,
        set_affinity: false,
    };
    if doc.canary.is_none() {
        return stable(Reason::NoCanary, false);
    }
    let canary = |reason, set_affinity| Decision {
        version: Version::Canary,
        reason,
        mirror: false,
        set_affinity,
    };
    let holds = |rules: &[crate::table::MatchRule]| {
        rules
            .iter()
            .any(|rule| rule.all.iter().all(|c| condition_holds(c, req)))
    };
    if holds(&doc.preview) {
        return canary(Reason::Preview, false);
    }
    if holds(&doc.matches) {
        return canary(Reason::Match, false);
    }
    let weight = u64::from(doc.canary_weight.basis_points());
    if let Some(aff) = &doc.affinity {
        if weight > 0 && cookie(req.headers, &aff.cookie_name) == Some(&table.affinity_token) {
            return canary(Reason::Affinity, false);
        }
    }
    let sticky_key = doc.sticky.as_ref().and_then(|k| match k {
        StickyKey::Header(name) => req.headers.values(name.as_str()).next(),
        StickyKey::Cookie(name) => cookie(req.headers, name).map(str::as_bytes),
    });
    let (bucket, reason) = match sticky_key {
        Some(key) => (sticky_bucket(key, table.salt), Reason::Sticky),
        None => ((random & 0xffff_ffff) % BUCKETS, Reason::Random),
    };
    if bucket < weight {
        return canary(reason, doc.affinity.is_some());
    }
    // Mirroring draws from the high half of `random`, independent of the split above.
    let mirror = (random >> 32) % BUCKETS < u64::from(doc.mirror.basis_points());
    stable(reason, mirror)
}

pub(crate) fn condition_holds<H: Headers + ?Sized>(
    c: &crate::table::Condition,
    req: &RequestView<'_, H>,
) -> bool {
    match &c.subject {
        Subject::Header(name) => req
            .headers
            .values(name.as_str())
            .any(|v| text(v).is_some_and(|s| c.test.matches(s))),
        Subject::Cookie(name) => cookie(req.headers, name).is_some_and(|v| c.test.matches(v)),
        Subject::Query(name) => req.query.is_some_and(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .any(|(k, v)| k == name.as_str() && c.test.matches(&v))
        }),
        Subject::Geo(field) => {
            let at = req.location();
            let code = match field {
                GeoField::Country => at.country,
                GeoField::Region => at.region,
            };
            code.is_some_and(|code| c.test.matches(code.as_str()))
        }
    }
}

/// The value of a cookie, from any `Cookie` header (HTTP/2 clients may send several).
pub fn cookie<'a, H: Headers + ?Sized>(headers: &'a H, name: &str) -> Option<&'a str> {
    headers
        .values("cookie")
        .filter_map(text)
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::table::{RoutesDoc, Weight};

    /// A service with stable, canary at 5 % and the fields of `extra` (JSON, as `PUT /routes`).
    pub(crate) fn table(extra: serde_json::Value) -> ServiceTable {
        let mut doc = serde_json::json!({
            "stable": "http://127.0.0.1:1", "canary": "http://127.0.0.1:2", "canaryWeight": 5
        });
        for (k, v) in extra.as_object().unwrap() {
            doc[k] = v.clone();
        }
        let metrics = crate::recorder::Metrics::new("i".into(), 0);
        ServiceTable::new(
            serde_json::from_value::<RoutesDoc>(doc).unwrap(),
            metrics.service_id("default").unwrap(),
        )
    }

    #[test]
    fn preview_rules_reach_the_canary_at_weight_zero_and_nothing_without_one() {
        let t = table(serde_json::json!({"canaryWeight": 0, "preview": ["x-preview=true"]}));
        let h = headers(&[("x-preview", "true")]);
        let view = RequestView {
            headers: &h,
            query: None,
            client: None,
            host: None,
            path: b"/",
            method: b"GET",
        };
        let d = route(&t, &view, 0);
        assert_eq!((d.version, d.reason), (Version::Canary, Reason::Preview));
        let plain = headers(&[]);
        let view = RequestView {
            headers: &plain,
            query: None,
            client: None,
            host: None,
            path: b"/",
            method: b"GET",
        };
        assert_eq!(route(&t, &view, 0).version, Version::Stable);
        let t = table(serde_json::json!({"canary": null, "preview": ["x-preview=true"]}));
        let view = RequestView {
            headers: &h,
            query: None,
            client: None,
            host: None,
            path: b"/",
            method: b"GET",
        };
        assert_eq!(route(&t, &view, 0).version, Version::Stable);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn go(t: &ServiceTable, h: &HeaderMap, q: Option<&str>, random: u64) -> Decision {
        route(
            t,
            &RequestView {
                headers: h,
                query: q,
                client: None,
                host: None,
                path: b"/",
                method: b"GET",
            },
            random,
        )
    }

    #[test]
    fn no_canary_means_stable() {
        let t = table(serde_json::json!({"canary": null, "canaryWeight": 100}));
        assert_eq!(go(&t, &HeaderMap::new(), None, 0).reason, Reason::NoCanary);
    }

    #[test]
    fn random_split_uses_the_low_bits_against_the_weight() {
        let t = table(serde_json::json!({}));
        assert_eq!(
            go(&t, &HeaderMap::new(), None, 499).version,
            Version::Canary
        );
        assert_eq!(
            go(&t, &HeaderMap::new(), None, 500).version,
            Version::Stable
        );
    }

    #[test]
    fn matches_win_over_weight_zero() {
        let t = table(serde_json::json!({"canaryWeight": 0, "match": [
            "x-canary=true", "user-id~^(1|2|3|4|5)$", "cookie:canary=always", "query:beta=on"]}));
        let canary = |h: &[(&str, &str)], q| go(&t, &headers(h), q, 0).version == Version::Canary;
        assert!(canary(&[("x-canary", "true")], None));
        assert!(!canary(&[("x-canary", "false")], None));
        assert!(canary(&[("user-id", "3")], None));
        assert!(!canary(&[("user-id", "6")], None));
        assert!(canary(&[("cookie", "a=b; canary=always")], None));
        assert!(canary(&[], Some("x=1&beta=on")));
        assert!(!canary(&[], Some("beta=off")));
    }

    #[test]
    fn and_rules_need_every_condition() {
        let t = table(serde_json::json!({"canaryWeight": 0, "match": [{"all": [
            {"header": "a", "exact": "1"}, {"header": "b", "prefix": "x"}]}]}));
        let v = |h: &[(&str, &str)]| go(&t, &headers(h), None, 0).version;
        assert_eq!(v(&[("a", "1"), ("b", "xy")]), Version::Canary);
        assert_eq!(v(&[("a", "1")]), Version::Stable);
    }

    #[test]
    fn sticky_keys_move_only_stable_to_canary_as_weight_rises() {
        let mut t = table(serde_json::json!({"sticky": {"header": "user-id"}}));
        let mut previous = vec![false; 2000];
        for weight in [0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 99.99, 100.0] {
            t.doc.canary_weight = Weight::from_percent(weight).unwrap();
            let mut on_canary = 0;
            for (user, was) in previous.iter_mut().enumerate() {
                let h = headers(&[("user-id", &user.to_string())]);
                // Randomness must not matter for a sticky user.
                let d = go(&t, &h, None, user as u64 * 7919);
                let now = d.version == Version::Canary;
                assert!(
                    !*was || now,
                    "user {user} left the canary when weight rose to {weight}"
                );
                *was = now;
                on_canary += usize::from(now);
            }
            let expected = 2000.0 * weight / 100.0;
            assert!((on_canary as f64 - expected).abs() <= 4.0 * expected.max(1.0).sqrt() + 1.0);
        }
    }

    #[test]
    fn affinity_pins_canary_users_and_is_offered_on_weighted_canary_hits() {
        let t = table(serde_json::json!({"affinity": {"cookieName": "flagger-cookie"}}));
        let d = go(&t, &HeaderMap::new(), None, 1);
        assert_eq!((d.version, d.set_affinity), (Version::Canary, true));
        let pinned = headers(&[("cookie", &format!("flagger-cookie={}", t.affinity_token))]);
        assert_eq!(go(&t, &pinned, None, 9999).reason, Reason::Affinity);
        let stale = headers(&[("cookie", "flagger-cookie=0000")]);
        assert_eq!(go(&t, &stale, None, 9999).version, Version::Stable);
    }

    #[test]
    fn a_groups_cookie_from_one_services_canary_pins_the_user_on_the_others() {
        let member = |canary: &str, release: &str| {
            table(serde_json::json!({
                "name": "group/payment-change",
                "canary": canary,
                "affinity": {"cookieName": "pin", "release": release},
            }))
        };
        let ledger = member("http://127.0.0.1:2", "r1");
        let orders = member("http://127.0.0.1:3", "r1");
        assert_eq!(ledger.affinity_token, orders.affinity_token);
        let pinned = headers(&[("cookie", &format!("pin={}", ledger.affinity_token))]);
        // 9999 would be stable for anyone unpinned at 5 %.
        assert_eq!(go(&orders, &pinned, None, 9999).reason, Reason::Affinity);
        // The next release of the group: the old cookie pins nobody.
        let next = member("http://127.0.0.1:3", "r2");
        assert_eq!(go(&next, &pinned, None, 9999).version, Version::Stable);
        // Nor does it pin on a route of its own, whose cookie follows its canary's URL.
        let own = table(serde_json::json!({"affinity": {"cookieName": "pin"}}));
        assert_eq!(go(&own, &pinned, None, 9999).version, Version::Stable);
    }

    #[test]
    fn mirror_only_copies_stable_requests() {
        let t = table(serde_json::json!({"mirror": 100}));
        assert!(go(&t, &HeaderMap::new(), None, 9000).mirror);
        assert!(!go(&t, &HeaderMap::new(), None, 1).mirror); // went to canary itself
        let t = table(serde_json::json!({"mirror": 50}));
        assert!(go(&t, &HeaderMap::new(), None, (4999u64 << 32) | 9000).mirror);
        assert!(!go(&t, &HeaderMap::new(), None, (5000u64 << 32) | 9000).mirror);
    }
}
