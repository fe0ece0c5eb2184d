//! The contract between Coalmine's router and whatever drives it, declared once for both sides.
//!
//! - [`weight`]: [`Weight`], a traffic share in exact basis points.
//! - [`routes`]: the route document of one service — which requests it takes (hosts, path
//!   prefixes, exact paths or regexes, headers) and where they go; what `PUT /routes/{service}` takes ([`RoutesDoc`]
//!   whole, or a [`RoutesPatch`] of the fields a controller owns) and what `GET /routes`
//!   answers ([`ServedRoutes`]) — and the [`OWNER_HEADER`] a controller signs its changes with.
//!   A router's table is a list of services; the single-service forms are [`DEFAULT_SERVICE`].
//! - [`matching`]: match rules ([`MatchRule`]): which requests reach the canary whatever the
//!   weight.
//! - [`sticky`]: sticky buckets ([`sticky_bucket`], [`sticky_salt`]): which users a weight sends
//!   to the canary, the same in the router and in a feature flag.
//! - [`flags`]: the per-variant counts an app reports for a feature flag ([`FlagCountsDoc`]).
//! - [`stats`]: the `/stats` document ([`StatsDoc`]), counters a controller turns into readings.
//!
//! Every value validates while it is deserialized, so a bad one is reported at its own position
//! (YAML) or with its field name (JSON). Architecture invariant: no IO, no server, no client;
//! the router serves these types, the controller reads and writes them.

pub mod flags;
pub mod matching;
pub mod routes;
pub mod stats;
pub mod sticky;
pub mod weight;

pub use flags::{FlagCountsDoc, VariantCounts};
pub use matching::{Condition, GeoField, HeaderName, MatchRule, StrMatch, Subject};
pub use routes::{
    check_service_name, check_services, group_release, services_list, url_port, Affinity,
    EndpointGroup, Endpoints, HeaderChanges, HeaderValueSpec, HostPattern, PathMatch, PathPrefix,
    Picked, RoutesDoc, RoutesPatch, ServedRoutes, StickyKey, UpstreamUrl, DEFAULT_SERVICE,
    OWNER_HEADER,
};
pub use stats::{
    Latency, LocalStats, MirrorPairs, MirrorStats, ServiceStats, StatsDoc, VersionStats,
};
pub use sticky::{in_canary, sticky_bucket, sticky_salt, BUCKETS};
pub use weight::Weight;

/// A value the contract does not accept, with the reason in words (the value quoted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<String> for Invalid {
    fn from(message: String) -> Self {
        Invalid(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Self {
        Invalid(message.to_string())
    }
}

impl From<Invalid> for String {
    fn from(e: Invalid) -> String {
        e.0
    }
}
