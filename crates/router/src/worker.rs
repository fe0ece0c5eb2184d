//! What the request paths run on: the options and state every worker shares, one worker
//! thread's handle (its recorder and mirror slots), and one client connection's facts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::Semaphore;

use crate::framing::HeadFlags;
use crate::geo::Geo;
use crate::recorder::{Metrics, Recorder};
use crate::table::{Invalid, RouteTable, RoutesDoc};

/// Limits and timeouts of the proxy path.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response head arrives.
    pub response_timeout: Duration,
    /// Mirrored copies in flight per worker; more are dropped, never queued.
    pub mirror_concurrency: usize,
    /// Idle upstream connections kept per upstream per worker.
    pub max_idle_per_upstream: usize,
    /// How long a client may stall mid-body (sending a request or taking a response) before
    /// the router gives up on it: the client's failure, never the version's.
    pub client_stall_timeout: Duration,
    /// Where clients are, for rules that match on geography.
    pub geo: Arc<Geo>,
    /// Who writes the route table when it is not the admin API (Gateway API mode: "the
    /// cluster's HTTPRoutes"): then `PUT` and `DELETE` on `/routes` are refused (409) with it.
    pub routes_written_by: Option<String>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(30),
            mirror_concurrency: 64,
            max_idle_per_upstream: 256,
            client_stall_timeout: Duration::from_secs(75),
            geo: Arc::new(Geo::default()),
            routes_written_by: None,
        }
    }
}

/// State every worker shares.
pub struct Shared {
    pub table: ArcSwap<RouteTable>,
    pub metrics: Arc<Metrics>,
    pub options: ProxyOptions,
    /// Serializes read-modify-write of the table so two writers cannot lose each other's
    /// changes.
    pub(crate) writer: std::sync::Mutex<()>,
    /// Whether the table was written once by its writer (see
    /// [`ProxyOptions::routes_written_by`]): until then the router is not ready.
    pub(crate) programmed: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new(table: RouteTable, metrics: Arc<Metrics>, options: ProxyOptions) -> Shared {
        Shared {
            table: ArcSwap::from_pointee(table),
            metrics,
            options,
            writer: std::sync::Mutex::new(()),
            programmed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Compiles and swaps in the next table; the caller holds the writer lock.
    pub(crate) fn swap(
        &self,
        current: &RouteTable,
        docs: Vec<RoutesDoc>,
    ) -> Result<Arc<RouteTable>, Invalid> {
        let table = Arc::new(RouteTable::new(
            docs,
            current.generation + 1,
            &self.metrics,
        )?);
        self.table.store(table.clone());
        self.metrics
            .route_swaps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(table)
    }

    /// Replaces the whole table (Gateway API mode's writer), unless it already says this;
    /// answers the table in force. Requests already routed finish where they were sent.
    pub fn replace_routes(&self, docs: Vec<RoutesDoc>) -> Result<Arc<RouteTable>, Invalid> {
        let _writer = self.writer.lock().expect("route table writer lock");
        let current = self.table.load_full();
        let table = if current.docs() == docs {
            current
        } else {
            self.swap(&current, docs)?
        };
        self.programmed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(table)
    }

    /// Ready for traffic: always, unless something else writes the table and has not yet.
    pub fn ready(&self) -> bool {
        self.options.routes_written_by.is_none()
            || self.programmed.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// One worker thread's handle on the proxy.
#[derive(Clone)]
pub struct Worker {
    pub shared: Arc<Shared>,
    pub recorder: Arc<Recorder>,
    pub(crate) mirror_slots: Arc<Semaphore>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Self {
        let recorder = shared.metrics.new_recorder();
        let mirror_slots = Arc::new(Semaphore::new(shared.options.mirror_concurrency));
        Worker {
            shared,
            recorder,
            mirror_slots,
        }
    }
}

/// One client connection: its worker and what is known of the client.
pub struct Connection {
    pub worker: Worker,
    pub client: ClientInfo,
}

/// Per-connection facts the proxy adds to forwarded requests.
#[derive(Clone)]
pub struct ClientInfo {
    pub tls: bool,
    /// What the raw request head carried (see [`crate::framing`]).
    pub head: HeadFlags,
    /// The peer's IP as a header value, made once per connection.
    pub peer_ip: HeaderValue,
    pub peer: std::net::IpAddr,
}

impl ClientInfo {
    pub fn new(peer: SocketAddr, tls: bool, head: HeadFlags) -> Self {
        let peer_ip =
            HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a header value");
        ClientInfo {
            tls,
            head,
            peer_ip,
            peer: peer.ip(),
        }
    }
}
