//! The route table in force: the contract's [`RoutesDoc`]s (declared in `coalmine-contract`, the
//! documents users and controllers write), one per service, compiled for the hot path with the
//! numbers derived once per swap — each service's sticky salt and affinity token, its counters'
//! slot, and the index that picks a request's service without allocating.
//!
//! Which service takes a request (Gateway API's HTTPRoute precedence, in this order):
//!
//! 1. **Host**: a service naming the request's host exactly, over one whose `*.` wildcard
//!    matches it (the longest wildcard first), over one naming no host (it takes every host).
//! 2. **Path**: an exact path, then the longest matching path prefix (by whole segments; no
//!    prefix is `/`), then a path regex.
//! 3. **Method**: a service naming methods over one that takes any.
//! 4. **Headers**: more header and query conditions over fewer.
//! 5. **Order**: the service written first in the table.
//!
//! A service whose headers do not hold does not take the request; the next one is tried. A
//! request no service takes is answered 404 by the router and counted as the router's
//! (`no_service`), never as any version's.

use std::cmp::Reverse;
use std::collections::HashMap;

pub use coalmine_contract::{
    check_service_name, check_services, services_list, Affinity, Condition, EndpointGroup,
    Endpoints, HeaderChanges, HeaderName, HostPattern, Invalid, MatchRule, PathMatch, PathPrefix,
    Picked, RoutesDoc, ServedRoutes, StickyKey, StrMatch, Subject, UpstreamUrl, Weight,
    DEFAULT_SERVICE, OWNER_HEADER,
};

use crate::recorder::{Metrics, ServiceId};
use crate::route::{condition_holds, Headers, RequestView};

/// One service, ready for the hot path.
#[derive(Debug)]
pub struct ServiceTable {
    pub doc: RoutesDoc,
    /// Where its counters are (the same for its name across swaps).
    pub id: ServiceId,
    pub(crate) salt: u64,
    /// Value of the affinity cookie for this canary (`Affinity::token`): a new canary URL, or a
    /// new release of its rollout group, invalidates old pins.
    pub(crate) affinity_token: String,
}

impl ServiceTable {
    pub fn new(doc: RoutesDoc, id: ServiceId) -> Self {
        let salt = coalmine_contract::sticky_salt(&doc.name, &doc.service);
        let affinity_token = match (&doc.affinity, &doc.canary) {
            (Some(affinity), Some(canary)) => affinity.token(&doc.name, canary),
            _ => String::new(),
        };
        ServiceTable {
            doc,
            id,
            salt,
            affinity_token,
        }
    }
}

/// A validated table, ready for the hot path.
#[derive(Debug)]
pub struct RouteTable {
    /// In table order (the last tie-breaker of the precedence).
    pub services: Vec<ServiceTable>,
    /// Bumped by every swap; lets clients tell which table served them.
    pub generation: u64,
    index: Selector,
}

impl RouteTable {
    /// Compiles a table: every service named once, each given its counters' slot.
    pub fn new(docs: Vec<RoutesDoc>, generation: u64, metrics: &Metrics) -> Result<Self, Invalid> {
        check_services(&docs)?;
        let services = docs
            .into_iter()
            .map(|doc| {
                let id = metrics.service_id(&doc.service)?;
                Ok(ServiceTable::new(doc, id))
            })
            .collect::<Result<Vec<_>, Invalid>>()?;
        let index = Selector::new(&services);
        Ok(RouteTable {
            services,
            generation,
            index,
        })
    }

    /// The service of this name.
    pub fn service(&self, name: &str) -> Option<&ServiceTable> {
        self.services.iter().find(|s| s.doc.service == name)
    }

    /// The documents, in table order.
    pub fn docs(&self) -> Vec<RoutesDoc> {
        self.services.iter().map(|s| s.doc.clone()).collect()
    }

    /// The whole table as `GET /routes` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        ServedRoutes::table_json(&self.docs(), self.generation)
    }

    /// One service as `GET /routes/{service}` shows it.
    pub fn service_json(&self, service: &ServiceTable) -> serde_json::Value {
        ServedRoutes::json(&service.doc, self.generation)
    }

    /// The service that takes a request (see the module's precedence), if any. Allocates
    /// nothing: the host is lowercased into a stack buffer, looked up in maps built at the
    /// swap, and each host's candidates are already in precedence order.
    pub fn select<H: Headers + ?Sized>(&self, req: &RequestView<'_, H>) -> Option<&ServiceTable> {
        let index = &self.index;
        let takes = |candidates: &[Candidate]| {
            candidates
                .iter()
                .find(|c| {
                    let doc = &self.services[c.service].doc;
                    c.path.as_ref().is_none_or(|p| p.matches(req.path))
                        && (doc.methods.is_empty()
                            || doc.methods.iter().any(|m| m.as_bytes() == req.method))
                        && doc
                            .headers
                            .iter()
                            .all(|rule| rule.all.iter().all(|cond| condition_holds(cond, req)))
                })
                .map(|c| &self.services[c.service])
        };
        let by_host = !index.exact.is_empty() || !index.wildcard.is_empty();
        let mut buf = [0u8; coalmine_contract::routes::MAX_HOST_LEN];
        // A table whose services name no host (the single-service forms) skips the host.
        let host = req.host.filter(|_| by_host);
        if let Some(host) = host.and_then(|h| normalized_host(h, &mut buf)) {
            if let Some(found) = index.exact.get(host).and_then(|c| takes(c)) {
                return Some(found);
            }
            if !index.wildcard.is_empty() {
                // Longest suffix first: `.b.example.com` before `.example.com`.
                for (at, _) in host.iter().enumerate().filter(|(_, b)| **b == b'.') {
                    if let Some(found) = index.wildcard.get(&host[at..]).and_then(|c| takes(c)) {
                        return Some(found);
                    }
                }
            }
        }
        takes(&index.any_host)
    }
}

/// The host of a `Host` header or `:authority`, without port or trailing dot, lowercased into
/// `buf`; `None` when it is longer than any host name.
fn normalized_host<'b>(host: &[u8], buf: &'b mut [u8]) -> Option<&'b [u8]> {
    let name = if host.first() == Some(&b'[') {
        // An IPv6 literal: up to its bracket (never a service's host name).
        &host[..host
            .iter()
            .position(|b| *b == b']')
            .map_or(host.len(), |i| i + 1)]
    } else {
        &host[..host.iter().position(|b| *b == b':').unwrap_or(host.len())]
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    let out = buf.get_mut(..name.len())?;
    for (o, b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
}

/// A service under one host key with one of its path prefixes.
#[derive(Debug)]
struct Candidate {
    service: usize,
    /// `None`: every path.
    path: Option<PathMatch>,
}

/// Which services may take a request, by host: built once per swap, each list in precedence
/// order (longest path prefix, then most header conditions, then table order).
#[derive(Debug, Default)]
struct Selector {
    exact: HashMap<Box<[u8]>, Vec<Candidate>>,
    /// Keyed by the suffix with its dot (`.example.com` for `*.example.com`).
    wildcard: HashMap<Box<[u8]>, Vec<Candidate>>,
    any_host: Vec<Candidate>,
}

impl Selector {
    fn new(services: &[ServiceTable]) -> Selector {
        let mut index = Selector::default();
        for (i, service) in services.iter().enumerate() {
            let doc = &service.doc;
            let paths: Vec<Option<PathMatch>> = if doc.paths.is_empty() {
                vec![None]
            } else {
                doc.paths.iter().cloned().map(Some).collect()
            };
            let candidates = || {
                paths.iter().map(move |path| Candidate {
                    service: i,
                    path: path.clone(),
                })
            };
            if doc.hosts.is_empty() {
                index.any_host.extend(candidates());
            }
            for host in &doc.hosts {
                let (map, key) = match host.wildcard_suffix() {
                    Some(suffix) => (&mut index.wildcard, suffix),
                    None => (&mut index.exact, host.as_str()),
                };
                map.entry(key.as_bytes().into())
                    .or_default()
                    .extend(candidates());
            }
        }
        let conditions = |c: &Candidate| -> usize {
            services[c.service]
                .doc
                .headers
                .iter()
                .map(|r| r.all.len())
                .sum()
        };
        let order = |list: &mut Vec<Candidate>| {
            list.sort_by_key(|c| {
                (
                    PathMatch::precedence(c.path.as_ref()),
                    Reverse(!services[c.service].doc.methods.is_empty()),
                    Reverse(conditions(c)),
                    c.service,
                )
            })
        };
        index.exact.values_mut().for_each(order);
        index.wildcard.values_mut().for_each(order);
        order(&mut index.any_host);
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use xxhash_rust::xxh3::xxh3_64;

    fn table(services: serde_json::Value) -> RouteTable {
        let docs = services
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let mut doc = s.clone();
                doc["stable"] = "http://127.0.0.1:1".into();
                serde_json::from_value(doc).unwrap()
            })
            .collect();
        RouteTable::new(docs, 1, &Metrics::new("i".into(), 0)).unwrap()
    }

    /// The service a request of this host, path and headers goes to.
    fn pick<'t>(
        t: &'t RouteTable,
        host: Option<&str>,
        path: &str,
        h: &[(&str, &str)],
    ) -> Option<&'t str> {
        let mut headers = http::HeaderMap::new();
        for (k, v) in h {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let view = RequestView {
            client: None,
            headers: &headers,
            query: None,
            host: host.map(str::as_bytes),
            path: path.as_bytes(),
            method: b"GET",
        };
        t.select(&view).map(|s| s.doc.service.as_str())
    }

    #[test]
    fn exact_hosts_beat_wildcards_which_beat_any_host() {
        let t = table(json!([
            {"service": "catch-all"},
            {"service": "wide", "hosts": ["*.example.com"]},
            {"service": "narrow", "hosts": ["*.shop.example.com"]},
            {"service": "exact", "hosts": ["pay.shop.example.com"]},
        ]));
        assert_eq!(
            pick(&t, Some("PAY.shop.example.com:8443"), "/", &[]),
            Some("exact")
        );
        assert_eq!(
            pick(&t, Some("pay.shop.example.com."), "/", &[]),
            Some("exact")
        );
        assert_eq!(
            pick(&t, Some("cart.shop.example.com"), "/", &[]),
            Some("narrow")
        );
        assert_eq!(pick(&t, Some("a.b.example.com"), "/", &[]), Some("wide"));
        // A wildcard does not take its own apex.
        assert_eq!(pick(&t, Some("example.com"), "/", &[]), Some("catch-all"));
        assert_eq!(pick(&t, None, "/", &[]), Some("catch-all"));
        assert_eq!(pick(&t, Some("[::1]:80"), "/", &[]), Some("catch-all"));
        let long = "a".repeat(300);
        assert_eq!(pick(&t, Some(&long), "/", &[]), Some("catch-all"));
    }

    #[test]
    fn within_a_host_the_longest_prefix_then_more_headers_then_order_wins() {
        let t = table(json!([
            {"service": "root", "hosts": ["shop.test"]},
            {"service": "api", "hosts": ["shop.test"], "paths": ["/api"]},
            {"service": "api-v2", "hosts": ["shop.test"], "paths": ["/api/v2"]},
            {"service": "api-blue", "hosts": ["shop.test"], "paths": ["/api"], "headers": ["x-tenant=blue"]},
            {"service": "api-blue-too", "hosts": ["shop.test"], "paths": ["/api"], "headers": ["x-tenant=blue"]},
        ]));
        assert_eq!(
            pick(
                &t,
                Some("shop.test"),
                "/api/v2/pay",
                &[("x-tenant", "blue")]
            ),
            Some("api-v2")
        );
        assert_eq!(
            pick(&t, Some("shop.test"), "/api/v1", &[("x-tenant", "blue")]),
            Some("api-blue")
        );
        assert_eq!(
            pick(&t, Some("shop.test"), "/api/v1", &[("x-tenant", "red")]),
            Some("api")
        );
        // Whole segments only.
        assert_eq!(pick(&t, Some("shop.test"), "/apis", &[]), Some("root"));
        // No service for another host: the router answers 404.
        assert_eq!(pick(&t, Some("other.test"), "/api", &[]), None);
    }

    #[test]
    fn a_host_whose_services_do_not_take_the_path_falls_to_less_specific_hosts() {
        let t = table(json!([
            {"service": "any", "paths": ["/"]},
            {"service": "wild", "hosts": ["*.test"], "paths": ["/static"]},
            {"service": "shop", "hosts": ["shop.test"], "paths": ["/cart"]},
        ]));
        assert_eq!(pick(&t, Some("shop.test"), "/cart/1", &[]), Some("shop"));
        assert_eq!(
            pick(&t, Some("shop.test"), "/static/a.css", &[]),
            Some("wild")
        );
        assert_eq!(pick(&t, Some("shop.test"), "/", &[]), Some("any"));
    }

    #[test]
    fn unnamed_services_salt_their_sticky_buckets_apart() {
        let t = table(json!([
            {"service": "default"}, {"service": "a"}, {"service": "b"},
            {"service": "c", "name": "checkout"}
        ]));
        let salts: Vec<u64> = t.services.iter().map(|s| s.salt).collect();
        assert_eq!(
            salts[0],
            xxh3_64(b"default"),
            "the single-service form's salt"
        );
        assert_ne!(salts[1], salts[2]);
        assert_eq!(
            salts[3],
            xxh3_64(b"checkout"),
            "a named route (a rollout's) keeps its name's"
        );
    }

    #[test]
    fn a_table_names_each_service_once() {
        let docs: Vec<RoutesDoc> = ["a", "a"]
            .iter()
            .map(|s| {
                serde_json::from_value(json!({"service": s, "stable": "http://127.0.0.1:1"}))
                    .unwrap()
            })
            .collect();
        let e = RouteTable::new(docs, 1, &Metrics::new("i".into(), 0)).unwrap_err();
        assert!(e.0.contains("already the name"), "{e}");
    }

    #[test]
    fn an_exact_path_beats_prefixes_and_a_regex_comes_after_every_prefix() {
        let t = table(json!([
            {"service": "regex", "paths": [{"regex": "/api/v[0-9]+/users"}]},
            {"service": "api", "paths": ["/api"]},
            {"service": "exact", "paths": [{"exact": "/api/v1/users"}]},
            {"service": "root", "paths": ["/"]},
        ]));
        assert_eq!(pick(&t, None, "/api/v1/users", &[]), Some("exact"));
        assert_eq!(
            pick(&t, None, "/api/v2/users", &[]),
            Some("api"),
            "a prefix first"
        );
        assert_eq!(pick(&t, None, "/v2", &[]), Some("root"));
        let t = table(json!([
            {"service": "root", "paths": ["/"]},
            {"service": "regex", "paths": [{"regex": "/api/v[0-9]+/users"}]},
        ]));
        assert_eq!(
            pick(&t, None, "/api/v2/users", &[]),
            Some("regex"),
            "over '/' alone"
        );
        assert_eq!(
            pick(&t, None, "/api/v2/users/7", &[]),
            Some("root"),
            "whole path"
        );
    }

    #[test]
    fn a_service_naming_the_method_beats_one_taking_any_on_the_same_path() {
        let t = table(json!([
            {"service": "any", "paths": ["/orders"], "headers": ["x-a=1"]},
            {"service": "writes", "paths": ["/orders"], "methods": ["POST", "PUT"]},
        ]));
        let pick_method = |method: &'static [u8]| {
            let headers = http::HeaderMap::new();
            let view = RequestView {
                client: None,
                headers: &headers,
                query: None,
                host: None,
                path: b"/orders",
                method,
            };
            t.select(&view).map(|s| s.doc.service.clone())
        };
        assert_eq!(pick_method(b"POST").as_deref(), Some("writes"));
        assert_eq!(pick_method(b"GET"), None, "'any' wants its header");
        assert!(serde_json::from_value::<RoutesDoc>(
            json!({"stable": "http://127.0.0.1:1", "methods": ["get"]})
        )
        .unwrap_err()
        .to_string()
        .contains("upper-case token"));
    }
}
