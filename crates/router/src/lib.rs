//! Coalmine's data plane.
//!
//! - [`table`]: the route table in force (the contract's document, compiled).
//! - [`route`]: the pure routing decision.
//! - [`recorder`]: per-version counters; [`exposition`]: them as `/stats` and Prometheus text.
//! - `dispatch`: where one request goes (the decision applied to the table in force), for both
//!   request paths: `http1` (the plain HTTP/1.1 request, proxied in the connection's task) and
//!   `hyper_path` (HTTP/2, upgrades, what `http1` hands over). They share `upstream` (pool,
//!   connect, the retry-once rule, whose failure it was), `rewrite` (header rewriting, pure)
//!   and `mirror`; `worker` holds what they run on.
//! - [`server`]: sockets, worker threads, TLS, graceful shutdown; `admin` API.

mod admin;
mod dispatch;
mod drain;
pub mod exposition;
mod framing;
pub mod geo;
mod http1;
mod hyper_path;
mod mirror;
pub mod recorder;
mod rewrite;
pub mod route;
pub mod server;
pub mod table;
mod timer;
mod upstream;
mod worker;

pub use route::{route, Decision, Reason, RequestView, Version};
pub use server::{start, tls_acceptor, RouterConfig, RouterHandle, StartError, TlsFiles};
pub use table::{MatchRule, RouteTable, RoutesDoc, StickyKey, UpstreamUrl, Weight};
pub use worker::ProxyOptions;
