//! Where one request goes: its service (the table's selection), then the routing decision,
//! drawn with this worker's random generator and applied to that service's routes — which
//! version, which upstream, whether a copy goes to the canary, whether to answer with the
//! affinity cookie. Both request paths dispatch here; a request no service takes is `None`
//! (answered 404, the router's).

use std::cell::Cell;

use http::HeaderValue;

use std::time::Instant;

use http::StatusCode;

use crate::recorder::{
    LocalFailure, Recorder, ServiceId, UpstreamFailure, INVALID_BACKEND, NO_ENDPOINTS, NO_SERVICE,
};
use crate::rewrite::AnswerChanges;
use crate::route::{route, Headers, RequestView, Version};
use crate::table::{EndpointGroup, Picked, RouteTable, ServiceTable, UpstreamUrl};

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed_from_thread());
}

fn seed_from_thread() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let stack = &t as *const u64 as u64;
    xxhash_rust::xxh3::xxh3_64_with_seed(&t.to_le_bytes(), stack) | 1
}

/// wyrand: fast, good enough for traffic splitting, one per thread.
fn next_random() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let m = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((m >> 64) as u64) ^ (m as u64)
    })
}

/// Where one request goes, borrowed from the table it was decided on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dispatch<'t> {
    /// The service that took the request.
    pub(crate) service: &'t ServiceTable,
    pub(crate) version: Version,
    /// That version's upstream.
    pub(crate) target: &'t UpstreamUrl,
    /// The backend it belongs to (its answer changes).
    pub(crate) backend: &'t EndpointGroup,
    /// The canary, when a copy of this stable-bound request goes to it too.
    pub(crate) mirror_to: Option<&'t UpstreamUrl>,
    /// Answer with the affinity cookie, pinning this user to the canary.
    pub(crate) set_affinity: bool,
}

/// A request the router answers itself, counted where it belongs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Undeliverable {
    /// No service takes it: 404, the router's own (`no_service`).
    NoService,
    /// The chosen version has no endpoint ready: 503, counted as that version's
    /// (`no_endpoints`): its pods are not serving.
    NoEndpoint(ServiceId, Version),
    /// The chosen backend does not resolve: 500, the router's own (`invalid_backend`).
    InvalidBackend,
}

/// Decides where a request goes.
pub(crate) fn dispatch<'t, H: Headers + ?Sized>(
    table: &'t RouteTable,
    request: &RequestView<'_, H>,
) -> Result<Dispatch<'t>, Undeliverable> {
    let service = table.select(request).ok_or(Undeliverable::NoService)?;
    dispatch_with(service, request, next_random(), next_random())
}

fn dispatch_with<'t, H: Headers + ?Sized>(
    service: &'t ServiceTable,
    request: &RequestView<'_, H>,
    random: u64,
    endpoint_draw: u64,
) -> Result<Dispatch<'t>, Undeliverable> {
    let decision = route(service, request, random);
    let doc = &service.doc;
    let canary = || {
        doc.canary
            .as_ref()
            .expect("route() picks or mirrors canary only if set")
    };
    let endpoints = match decision.version {
        Version::Stable => &doc.stable,
        Version::Canary => canary(),
    };
    let (target, backend) = match endpoints.pick(endpoint_draw) {
        Picked::Url(url, backend) => (url, backend),
        Picked::NoEndpoint => return Err(Undeliverable::NoEndpoint(service.id, decision.version)),
        Picked::Invalid => return Err(Undeliverable::InvalidBackend),
    };
    // A canary without an endpoint gets no copy (there is nowhere to send it).
    let mirror_to = match decision.mirror {
        true => match canary().pick(endpoint_draw.rotate_left(32)) {
            Picked::Url(url, _) => Some(url),
            Picked::NoEndpoint | Picked::Invalid => None,
        },
        false => None,
    };
    Ok(Dispatch {
        service,
        version: decision.version,
        target,
        backend,
        mirror_to,
        set_affinity: decision.set_affinity,
    })
}

/// Counts a request the router answers itself, and what it answers: both paths' one rule.
pub(crate) fn answer_undeliverable(
    recorder: &Recorder,
    why: Undeliverable,
    started: Instant,
) -> (StatusCode, &'static str) {
    match why {
        Undeliverable::NoService => {
            recorder.record_local_failure(LocalFailure::NoService);
            (StatusCode::NOT_FOUND, NO_SERVICE)
        }
        Undeliverable::InvalidBackend => {
            recorder.record_local_failure(LocalFailure::InvalidBackend);
            (StatusCode::INTERNAL_SERVER_ERROR, INVALID_BACKEND)
        }
        Undeliverable::NoEndpoint(service, version) => {
            recorder.record_failure(service, version, UpstreamFailure::NoEndpoints);
            let status = StatusCode::SERVICE_UNAVAILABLE;
            recorder.record(service, version, status.as_u16(), started.elapsed());
            (status, NO_ENDPOINTS)
        }
    }
}

impl<'t> Dispatch<'t> {
    /// Where the service's counters are.
    pub(crate) fn counters(&self) -> ServiceId {
        self.service.id
    }

    /// What the answer gets on its way to the client: the affinity cookie, the route's and
    /// then the backend's header changes.
    pub(crate) fn answer_changes(&self) -> AnswerChanges<'t> {
        AnswerChanges {
            cookie: self.affinity_cookie(),
            headers: [
                &self.service.doc.response_headers,
                &self.backend.response_headers,
            ],
        }
    }

    /// The `Set-Cookie` value pinning this user to the canary, when the decision asks for one.
    pub(crate) fn affinity_cookie(&self) -> Option<HeaderValue> {
        if !self.set_affinity {
            return None;
        }
        let aff = self.service.doc.affinity.as_ref()?;
        HeaderValue::from_str(&format!(
            "{}={}; Max-Age={}; Path=/",
            aff.cookie_name, self.service.affinity_token, aff.max_age
        ))
        .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::tests::table;

    fn view(headers: &http::HeaderMap) -> RequestView<'_, http::HeaderMap> {
        RequestView {
            headers,
            query: None,
            client: None,
            host: None,
            path: b"/",
            method: b"GET",
        }
    }

    fn go(t: &ServiceTable, random: u64) -> Dispatch<'_> {
        dispatch_with(t, &view(&http::HeaderMap::new()), random, 0).unwrap()
    }

    #[test]
    fn a_version_of_many_endpoints_spreads_its_requests_and_one_of_none_is_undeliverable() {
        let t = table(serde_json::json!({
            "stable": ["http://10.0.0.1:80", "http://10.0.0.2:80", "http://10.0.0.3:80"],
            "canary": [], "canaryWeight": 50, "mirror": 100
        }));
        let headers = http::HeaderMap::new();
        let mut per_endpoint = std::collections::HashMap::new();
        let (mut no_endpoint, n) = (0, 30_000);
        for _ in 0..n {
            match dispatch_with(&t, &view(&headers), next_random(), next_random()) {
                Ok(d) => {
                    assert_eq!(d.version, Version::Stable);
                    assert!(
                        d.mirror_to.is_none(),
                        "a canary without endpoints gets no copy"
                    );
                    *per_endpoint.entry(d.target.as_str()).or_insert(0) += 1;
                }
                Err(Undeliverable::NoEndpoint(_, Version::Canary)) => no_endpoint += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        // Half to the canary (none), the rest spread over three: 5,000 each, sd about 75.
        assert!((14_600..=15_400).contains(&no_endpoint), "{no_endpoint}");
        assert_eq!(per_endpoint.len(), 3);
        assert!(
            per_endpoint.values().all(|c| (4_700..=5_300).contains(c)),
            "{per_endpoint:?}"
        );
    }

    #[test]
    fn the_decision_picks_the_versions_upstream_and_the_mirror_target() {
        let t = table(serde_json::json!({"mirror": 100}));
        let d = go(&t, 1);
        assert_eq!(
            (d.version, d.target.as_str(), d.mirror_to),
            (Version::Canary, "http://127.0.0.1:2", None)
        );
        let d = go(&t, 9_000);
        assert_eq!(
            (d.version, d.target.as_str()),
            (Version::Stable, "http://127.0.0.1:1")
        );
        assert_eq!(d.mirror_to.map(|u| u.as_str()), Some("http://127.0.0.1:2"));
    }

    #[test]
    fn the_affinity_cookie_pins_this_canary_for_its_lifetime() {
        let t = table(serde_json::json!({"affinity": {"cookieName": "pin", "maxAge": 60}}));
        let d = go(&t, 1);
        assert_eq!(
            d.affinity_cookie().unwrap(),
            format!("pin={}; Max-Age=60; Path=/", t.affinity_token).as_str()
        );
        assert_eq!(
            go(&t, 9_000).affinity_cookie(),
            None,
            "stable is not pinned"
        );
    }

    #[test]
    fn random_values_spread_over_buckets() {
        let n = 100_000;
        let canary = (0..n)
            .filter(|_| (next_random() & 0xffff_ffff) % 10_000 < 500)
            .count();
        // 5 % of 100,000 is 5,000 with a standard deviation of about 69.
        assert!((4_700..=5_300).contains(&canary), "{canary}");
    }
}
