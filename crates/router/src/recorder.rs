//! Counting what the router saw, per version: status codes, latency, upstream failures, mirrored
//! copies. How the counts are shown (`/stats`, Prometheus text) is [`crate::exposition`]'s.
//!
//! Each worker thread owns a [`Recorder`] so the hot path touches only its own cache lines; a
//! scrape sums them into a [`Snapshot`]. Counters never reset while the process lives, so
//! readers take differences between two snapshots (and notice a restart by `instance`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::route::Version;

/// Upper bounds, in seconds, of the `http_request_duration_seconds` buckets: fine around the
/// 10 ms – 1 s range where canary latency regressions usually show.
pub const LATENCY_BUCKETS: [f64; 21] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
    1.5, 2.0, 2.5, 5.0, 10.0,
];

/// hdrhistogram precision for `/stats`: two significant digits (1 % value error).
pub(crate) const HDR_SIGFIG: u8 = 2;
const HDR_MAX_MICROS: u64 = 3_600_000_000;

/// Why the router answered in the upstream's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Could not connect (refused, unreachable, connect timeout): 502 or 504.
    Connect,
    /// No response head within the response timeout: 504.
    Timeout,
    /// The connection broke or the upstream spoke bad HTTP: 502.
    Protocol,
    /// The answer broke off after its head reached the client: counted as a 502.
    Body,
    /// The version has no endpoint ready (Gateway API mode: its Service's EndpointSlices
    /// list none): 503.
    NoEndpoints,
}

impl UpstreamFailure {
    pub(crate) const ALL: [UpstreamFailure; 5] = [
        UpstreamFailure::Connect,
        UpstreamFailure::Timeout,
        UpstreamFailure::Protocol,
        UpstreamFailure::Body,
        UpstreamFailure::NoEndpoints,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Protocol => "protocol",
            UpstreamFailure::Body => "body",
            UpstreamFailure::NoEndpoints => "no_endpoints",
        }
    }
}

/// What a request to a version without endpoints is answered (503), on both paths.
pub(crate) const NO_ENDPOINTS: &str =
    "coalmine router: the version this request was routed to has no endpoint ready";

/// What a request weighed to a backend that does not resolve is answered (500), on both paths.
pub(crate) const INVALID_BACKEND: &str =
    "coalmine router: the backend this request was weighed to does not resolve";

/// What a request no service takes is answered (404), on both paths.
pub(crate) const NO_SERVICE: &str =
    "coalmine router: no service of this router takes this host and path";

/// Why the router failed a request on its own account, before any version could answer it:
/// never counted against a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalFailure {
    /// Out of file descriptors, memory or local ports for a new upstream connection.
    Resources,
    /// No service of the route table takes the request (its host, path and headers): 404.
    NoService,
    /// The backend the request was weighed to does not resolve (Gateway API: a Service that
    /// does not exist, a kind that is not a Service): 500, the configuration's fault.
    InvalidBackend,
}

impl LocalFailure {
    pub(crate) const ALL: [LocalFailure; 3] = [
        LocalFailure::Resources,
        LocalFailure::NoService,
        LocalFailure::InvalidBackend,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LocalFailure::Resources => "resources",
            LocalFailure::NoService => "no_service",
            LocalFailure::InvalidBackend => "invalid_backend",
        }
    }
}

struct VersionCounters {
    /// Index `code - 100`, for codes 100..=599.
    status: Box<[AtomicU64]>,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
    failures: [AtomicU64; UpstreamFailure::ALL.len()],
    /// Requests sent again on a new connection after a kept-alive one failed them.
    retries: AtomicU64,
    hdr: Mutex<Histogram<u64>>,
}

fn new_hdr() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HDR_MAX_MICROS, HDR_SIGFIG).expect("static histogram bounds")
}

/// A snapshot's histogram: small until counts are added (it grows to fit them), so the zeros
/// of a table's idle services cost little on each scrape.
fn empty_hdr() -> Histogram<u64> {
    Histogram::new(HDR_SIGFIG).expect("static histogram precision")
}

impl VersionCounters {
    fn new() -> Self {
        VersionCounters {
            status: (0..500).map(|_| AtomicU64::new(0)).collect(),
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            failures: Default::default(),
            retries: AtomicU64::new(0),
            hdr: Mutex::new(new_hdr()),
        }
    }
}

/// Where a service's counters are in every worker's recorder: given by name once per process
/// ([`Metrics::service_id`]), so a service keeps its counts across table swaps (and a service
/// deleted and added again goes on from where it was).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceId(u32);

/// One service's counters on one worker.
struct ServiceCounters {
    versions: [VersionCounters; 2],
    mirror_status: Box<[AtomicU64]>,
    mirror_failures: AtomicU64,
    /// Mirrored copies' latency until their response head, like `versions`' own.
    mirror_latency: Mutex<Histogram<u64>>,
    /// Copies not sent because the worker's mirror concurrency limit was reached.
    mirror_dropped: AtomicU64,
    /// Requests picked for mirroring but not copied because they carried a body.
    mirror_skipped_body: AtomicU64,
    /// Requests picked for mirroring but not copied because their method is not safe.
    mirror_skipped_method: AtomicU64,
    pairs: PairCounters,
}

/// Mirrored requests paired with the user's answer to the same request (see
/// [`crate::mirror::PairSide`]).
#[derive(Default)]
struct PairCounters {
    /// Index `[stable failed][canary failed]`: a failure is a 5xx, the router's 502/504 for a
    /// version included.
    outcomes: [[AtomicU64; 2]; 2],
    /// Pairs one side of which failed on the router's or the client's account: nobody's.
    unpaired: AtomicU64,
    /// Pairs both answered without a failure, by how much later the canary's copy was
    /// answered than the user's: index `i` counts differences in `(b[i-1], b[i]]` of
    /// [`LATENCY_BUCKETS`] `b`, the last index those above the last bound.
    slower: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Likewise, the canary's copy answered sooner.
    faster: [AtomicU64; LATENCY_BUCKETS.len() + 1],
}

/// Index into [`PairCounters::slower`]/`faster` of a latency difference.
fn difference_index(d: Duration) -> usize {
    let secs = d.as_secs_f64();
    LATENCY_BUCKETS
        .iter()
        .position(|&b| secs <= b)
        .unwrap_or(LATENCY_BUCKETS.len())
}

impl ServiceCounters {
    fn new() -> Self {
        ServiceCounters {
            versions: [VersionCounters::new(), VersionCounters::new()],
            mirror_status: (0..500).map(|_| AtomicU64::new(0)).collect(),
            mirror_failures: AtomicU64::new(0),
            mirror_latency: Mutex::new(new_hdr()),
            mirror_dropped: AtomicU64::new(0),
            mirror_skipped_body: AtomicU64::new(0),
            mirror_skipped_method: AtomicU64::new(0),
            pairs: PairCounters::default(),
        }
    }
}

/// Service slots per chunk of a recorder's service table.
const SLOTS_PER_CHUNK: usize = 64;
/// Services a router can count over its life (names ever put in its table).
pub const MAX_SERVICES: usize = 64 * 1024;

/// [`SLOTS_PER_CHUNK`] services' counters on one worker, each made on first use.
type ServiceChunk = Box<[OnceLock<Box<ServiceCounters>>]>;

/// One worker's counters. Only that worker's thread writes them (scrapes only read), so an
/// increment is a plain load and store: no locked read-modify-write on the hot path.
///
/// A service's counters (some 60 KiB with their histograms) are made on its first request on
/// this worker, so a table of a thousand services costs only what its services use: the
/// slots are two levels of `OnceLock`s (chunks of 64), which after their first use are one
/// acquire load each, no lock and no allocation.
pub struct Recorder {
    services: Box<[OnceLock<ServiceChunk>]>,
    local_failures: [AtomicU64; LocalFailure::ALL.len()],
    /// Requests this worker is proxying right now.
    in_flight: AtomicI64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

fn status_index(status: u16) -> usize {
    usize::from(status.clamp(100, 599) - 100)
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            services: (0..MAX_SERVICES / SLOTS_PER_CHUNK)
                .map(|_| OnceLock::new())
                .collect(),
            local_failures: Default::default(),
            in_flight: AtomicI64::new(0),
        }
    }

    /// A service's counters on this worker, made on first use.
    fn service(&self, id: ServiceId) -> &ServiceCounters {
        let id = id.0 as usize;
        self.services[id / SLOTS_PER_CHUNK]
            .get_or_init(|| (0..SLOTS_PER_CHUNK).map(|_| OnceLock::new()).collect())
            [id % SLOTS_PER_CHUNK]
            .get_or_init(|| Box::new(ServiceCounters::new()))
    }

    /// A service's counters on this worker, if it has counted anything here.
    fn counted(&self, id: ServiceId) -> Option<&ServiceCounters> {
        let id = id.0 as usize;
        self.services[id / SLOTS_PER_CHUNK].get()?[id % SLOTS_PER_CHUNK]
            .get()
            .map(|b| &**b)
    }

    /// Counts a request in flight until the guard drops.
    pub fn enter(&self) -> InFlight<'_> {
        let n = &self.in_flight;
        n.store(n.load(Relaxed) + 1, Relaxed);
        InFlight(n)
    }

    /// Records one answered request: status (the router's own 502/504 included) and the time
    /// until the response head.
    pub fn record(&self, service: ServiceId, version: Version, status: u16, elapsed: Duration) {
        let v = &self.service(service).versions[version.index()];
        bump(&v.status[status_index(status)], 1);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            bump(&v.buckets[i], 1);
        }
        bump(&v.count, 1);
        let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        bump(&v.sum_micros, micros);
        if let Ok(mut h) = v.hdr.lock() {
            h.saturating_record(micros.max(1));
        }
    }

    pub fn record_failure(&self, service: ServiceId, version: Version, failure: UpstreamFailure) {
        bump(
            &self.service(service).versions[version.index()].failures[failure as usize],
            1,
        );
    }

    pub fn record_retry(&self, service: ServiceId, version: Version) {
        bump(&self.service(service).versions[version.index()].retries, 1);
    }

    pub fn record_local_failure(&self, failure: LocalFailure) {
        bump(&self.local_failures[failure as usize], 1);
    }

    /// A mirrored copy's outcome and the time until its response head; `None` when it never
    /// got a response.
    pub fn record_mirror(&self, service: ServiceId, answer: Option<(u16, Duration)>) {
        let s = self.service(service);
        match answer {
            Some((status, elapsed)) => {
                bump(&s.mirror_status[status_index(status)], 1);
                let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
                if let Ok(mut h) = s.mirror_latency.lock() {
                    h.saturating_record(micros.max(1));
                }
            }
            None => bump(&s.mirror_failures, 1),
        }
    }

    /// A copy not sent: the worker's mirror concurrency limit was reached.
    pub fn record_mirror_dropped(&self, service: ServiceId) {
        bump(&self.service(service).mirror_dropped, 1);
    }

    /// A request picked for mirroring but not copied because it carries a body.
    pub fn record_mirror_skipped_body(&self, service: ServiceId) {
        bump(&self.service(service).mirror_skipped_body, 1);
    }

    /// A request picked for mirroring but not copied because its method is not safe.
    pub fn record_mirror_skipped_method(&self, service: ServiceId) {
        bump(&self.service(service).mirror_skipped_method, 1);
    }

    /// A mirrored request's two answers: the user's (stable's) and the canary's copy's, each
    /// a status and the time until its head, `None` when that side failed on the router's or
    /// the client's account (the pair is then nobody's evidence).
    pub fn record_pair(
        &self,
        service: ServiceId,
        stable: Option<(u16, Duration)>,
        canary: Option<(u16, Duration)>,
    ) {
        let p = &self.service(service).pairs;
        let (Some((stable, stable_took)), Some((canary, canary_took))) = (stable, canary) else {
            bump(&p.unpaired, 1);
            return;
        };
        let (stable_failed, canary_failed) = (stable >= 500, canary >= 500);
        bump(
            &p.outcomes[usize::from(stable_failed)][usize::from(canary_failed)],
            1,
        );
        if stable_failed || canary_failed {
            // A failure's time says how fast it failed, not how fast the version answers.
            return;
        }
        if canary_took > stable_took {
            bump(&p.slower[difference_index(canary_took - stable_took)], 1);
        } else if stable_took > canary_took {
            bump(&p.faster[difference_index(stable_took - canary_took)], 1);
        }
    }
}

/// A request in flight on one worker; see [`Recorder::enter`].
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.store(self.0.load(Relaxed) - 1, Relaxed);
    }
}

/// Router-wide numbers and the per-worker recorders.
pub struct Metrics {
    recorders: Mutex<Vec<Arc<Recorder>>>,
    /// Every service name ever in the table; a name's index is its [`ServiceId`].
    service_names: Mutex<ServiceNames>,
    pub route_swaps: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Accepts that failed for want of descriptors or memory (the listener backs off).
    pub accept_errors: AtomicU64,
    /// Random per process start: a reader that sees it change knows the counters restarted.
    pub instance: String,
    pub started_unix_ms: u64,
}

#[derive(Default)]
struct ServiceNames {
    ids: HashMap<String, ServiceId>,
    names: Vec<String>,
}

impl Metrics {
    pub fn new(instance: String, started_unix_ms: u64) -> Self {
        Metrics {
            recorders: Mutex::new(Vec::new()),
            service_names: Mutex::new(ServiceNames::default()),
            route_swaps: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            instance,
            started_unix_ms,
        }
    }

    /// A recorder for one worker thread.
    pub fn new_recorder(&self) -> Arc<Recorder> {
        let r = Arc::new(Recorder::new());
        self.recorders
            .lock()
            .expect("recorder list")
            .push(r.clone());
        r
    }

    /// The counters' slot of a service, the same for a name as long as the process lives.
    /// Fails only when [`MAX_SERVICES`] names have been used.
    pub fn service_id(&self, name: &str) -> Result<ServiceId, coalmine_contract::Invalid> {
        let mut known = self.service_names.lock().expect("service names");
        if let Some(id) = known.ids.get(name) {
            return Ok(*id);
        }
        if known.names.len() >= MAX_SERVICES {
            return Err(coalmine_contract::Invalid(format!(
                "service {name:?}: this router has counted {MAX_SERVICES} services since it started, its most; restart it to count new ones"
            )));
        }
        let id = ServiceId(known.names.len() as u32);
        known.names.push(name.to_string());
        known.ids.insert(name.to_string(), id);
        Ok(id)
    }

    /// Sums the workers' counters: every service that counted something, and each of
    /// `services` (the table's) even if it has not, at zero.
    pub fn snapshot<'a>(&self, services: impl IntoIterator<Item = &'a str>) -> Snapshot {
        self.sum(services, |_| true)
    }

    /// Sums the workers' counters of one service only (`/stats/{service}`, read every second
    /// by each rollout's controller: the other services' histograms are not summed for it);
    /// at zero if `at_zero` and it has counted nothing.
    pub fn service_snapshot(&self, service: &str, at_zero: bool) -> Snapshot {
        self.sum(at_zero.then_some(service), |name| name == service)
    }

    fn sum<'a>(
        &self,
        at_zero: impl IntoIterator<Item = &'a str>,
        wanted: impl Fn(&str) -> bool,
    ) -> Snapshot {
        let recorders = self.recorders.lock().expect("recorder list").clone();
        let names: Vec<(ServiceId, String)> = {
            let known = self.service_names.lock().expect("service names");
            let ids = known.names.iter().enumerate();
            ids.filter(|(_, name)| wanted(name))
                .map(|(i, name)| (ServiceId(i as u32), name.clone()))
                .collect()
        };
        let mut snapshots: BTreeMap<String, ServiceSnapshot> = at_zero
            .into_iter()
            .map(|s| (s.to_string(), ServiceSnapshot::new()))
            .collect();
        let mut in_flight = 0;
        let mut local_failures = [0; LocalFailure::ALL.len()];
        for r in &recorders {
            in_flight += r.in_flight.load(Relaxed);
            for (n, c) in local_failures.iter_mut().zip(&r.local_failures) {
                *n += c.load(Relaxed);
            }
        }
        for (id, name) in names {
            for counters in recorders.iter().filter_map(|r| r.counted(id)) {
                snapshots
                    .entry(name.clone())
                    .or_insert_with(ServiceSnapshot::new)
                    .add(counters);
            }
        }
        let local_failures = LocalFailure::ALL
            .iter()
            .map(|f| (f.as_str(), local_failures[*f as usize]))
            .collect();
        Snapshot {
            services: snapshots,
            in_flight,
            local_failures,
            accept_errors: self.accept_errors.load(Relaxed),
        }
    }
}

/// One service's counts, summed over workers.
pub struct ServiceSnapshot {
    pub versions: [VersionSnapshot; 2],
    pub mirror: MirrorSnapshot,
}

impl ServiceSnapshot {
    fn new() -> Self {
        ServiceSnapshot {
            versions: [VersionSnapshot::new(), VersionSnapshot::new()],
            mirror: MirrorSnapshot::new(),
        }
    }

    fn add(&mut self, c: &ServiceCounters) {
        for (snap, v) in self.versions.iter_mut().zip(&c.versions) {
            snap.add(v);
        }
        let m = &mut self.mirror;
        add_statuses(&mut m.statuses, &c.mirror_status);
        m.failed += c.mirror_failures.load(Relaxed);
        m.dropped += c.mirror_dropped.load(Relaxed);
        m.skipped_with_body += c.mirror_skipped_body.load(Relaxed);
        m.skipped_unsafe_method += c.mirror_skipped_method.load(Relaxed);
        if let Ok(h) = c.mirror_latency.lock() {
            let _ = m.latency.add(&*h);
        }
        m.requests = m.statuses.values().sum::<u64>() + m.failed;
        let (p, c) = (&mut m.pairs, &c.pairs);
        for (stable, row) in c.outcomes.iter().enumerate() {
            for (canary, n) in row.iter().enumerate() {
                p.outcomes[stable][canary] += n.load(Relaxed);
            }
        }
        p.unpaired += c.unpaired.load(Relaxed);
        for (sum, n) in p.slower.iter_mut().zip(&c.slower) {
            *sum += n.load(Relaxed);
        }
        for (sum, n) in p.faster.iter_mut().zip(&c.faster) {
            *sum += n.load(Relaxed);
        }
    }
}

fn add_statuses(into: &mut BTreeMap<u16, u64>, counters: &[AtomicU64]) {
    for (i, c) in counters.iter().enumerate() {
        let n = c.load(Relaxed);
        if n > 0 {
            *into.entry(i as u16 + 100).or_default() += n;
        }
    }
}

pub struct VersionSnapshot {
    pub statuses: BTreeMap<u16, u64>,
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS`]; the rest fell above the last.
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum_micros: u64,
    pub failures: [u64; UpstreamFailure::ALL.len()],
    pub retries: u64,
    pub latency: Histogram<u64>,
}

impl VersionSnapshot {
    fn new() -> Self {
        VersionSnapshot {
            statuses: BTreeMap::new(),
            buckets: [0; LATENCY_BUCKETS.len()],
            count: 0,
            sum_micros: 0,
            failures: [0; UpstreamFailure::ALL.len()],
            retries: 0,
            latency: empty_hdr(),
        }
    }

    fn add(&mut self, v: &VersionCounters) {
        add_statuses(&mut self.statuses, &v.status);
        for (b, c) in self.buckets.iter_mut().zip(&v.buckets) {
            *b += c.load(Relaxed);
        }
        self.count += v.count.load(Relaxed);
        self.sum_micros += v.sum_micros.load(Relaxed);
        for (f, c) in self.failures.iter_mut().zip(&v.failures) {
            *f += c.load(Relaxed);
        }
        self.retries += v.retries.load(Relaxed);
        if let Ok(h) = v.hdr.lock() {
            // Same bounds on both sides, so adding cannot fail.
            let _ = self.latency.add(&*h);
        }
    }
}

pub struct MirrorSnapshot {
    pub requests: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// Copies that got no response (connect error, timeout).
    pub failed: u64,
    /// Copies not sent because the mirror concurrency limit was reached.
    pub dropped: u64,
    /// Requests picked for mirroring but not copied because they carried a body.
    pub skipped_with_body: u64,
    /// Requests picked for mirroring but not copied because their method is not safe.
    pub skipped_unsafe_method: u64,
    /// Time until each answered copy's response head.
    pub latency: Histogram<u64>,
    pub pairs: PairsSnapshot,
}

/// Mirrored requests paired with the user's answer; see [`Recorder::record_pair`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairsSnapshot {
    /// `[stable failed][canary failed]`.
    pub outcomes: [[u64; 2]; 2],
    pub unpaired: u64,
    /// Non-cumulative, by [`LATENCY_BUCKETS`] (the last index above the last bound).
    pub slower: [u64; LATENCY_BUCKETS.len() + 1],
    pub faster: [u64; LATENCY_BUCKETS.len() + 1],
}

impl MirrorSnapshot {
    fn new() -> Self {
        MirrorSnapshot {
            requests: 0,
            statuses: BTreeMap::new(),
            failed: 0,
            dropped: 0,
            skipped_with_body: 0,
            skipped_unsafe_method: 0,
            latency: empty_hdr(),
            pairs: PairsSnapshot::default(),
        }
    }
}

pub struct Snapshot {
    /// Per service, by name.
    pub services: BTreeMap<String, ServiceSnapshot>,
    /// Requests being proxied, summed over workers.
    pub in_flight: i64,
    /// Requests the router failed on its own account, by reason.
    pub local_failures: BTreeMap<&'static str, u64>,
    /// Connections the listener could not accept (out of descriptors, memory).
    pub accept_errors: u64,
}

/// Two workers' recorders with the default service's stable 200 in 3 ms and in 30 ms, canary
/// 502 in 0.2 ms and one canary connect failure, two mirrored pairs, and service `cart`'s
/// stable 200 in 1 ms: the fixture of the counting and the exposition tests.
#[cfg(test)]
pub(crate) fn two_workers_recorded() -> (Metrics, Arc<Recorder>, Arc<Recorder>) {
    let m = Metrics::new("i".into(), 0);
    let (a, b) = (m.new_recorder(), m.new_recorder());
    let default = m.service_id("default").unwrap();
    let cart = m.service_id("cart").unwrap();
    a.record(default, Version::Stable, 200, Duration::from_millis(3));
    b.record(default, Version::Stable, 200, Duration::from_millis(30));
    b.record(default, Version::Canary, 502, Duration::from_micros(200));
    b.record_failure(default, Version::Canary, UpstreamFailure::Connect);
    a.record(cart, Version::Stable, 200, Duration::from_millis(1));
    // Two mirrored requests: the canary's copy 2 ms slower, and a canary 500.
    let ms = Duration::from_millis;
    a.record_pair(default, Some((200, ms(3))), Some((200, ms(5))));
    a.record_pair(default, Some((200, ms(3))), Some((500, ms(1))));
    (m, a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_workers_per_service_and_counts_requests_in_flight() {
        let (m, a, b) = two_workers_recorded();
        let busy = (a.enter(), b.enter(), b.enter());
        assert_eq!(m.snapshot([]).in_flight, 3);
        drop(busy);
        let s = m.snapshot(["default", "idle"]);
        assert_eq!(s.in_flight, 0);
        let default = &s.services["default"];
        assert_eq!(default.versions[0].statuses[&200], 2);
        assert_eq!(default.versions[1].failures[0], 1);
        assert_eq!(default.versions[0].buckets.iter().sum::<u64>(), 2);
        assert_eq!(default.versions[0].latency.len(), 2);
        // Another service's counts are its own, and a service of the table that counted
        // nothing is there at zero.
        assert_eq!(s.services["cart"].versions[0].statuses[&200], 1);
        assert_eq!(s.services["cart"].versions[1].count, 0);
        assert_eq!(s.services["idle"].versions[0].count, 0);
        assert_eq!(s.services.len(), 3);
        // One service alone: only its counts are summed.
        let cart = m.service_snapshot("cart", false);
        assert_eq!(cart.services.keys().collect::<Vec<_>>(), ["cart"]);
        assert_eq!(cart.services["cart"].versions[0].count, 1);
        assert!(m.service_snapshot("idle", false).services.is_empty());
        assert_eq!(m.service_snapshot("idle", true).services.len(), 1);
    }

    #[test]
    fn a_name_keeps_its_counters_slot() {
        let m = Metrics::new("i".into(), 0);
        let a = m.service_id("a").unwrap();
        let b = m.service_id("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(m.service_id("a").unwrap(), a);
        // Far slots land in their own chunk.
        let r = m.new_recorder();
        let far = ServiceId(MAX_SERVICES as u32 - 1);
        r.record(far, Version::Canary, 200, Duration::from_millis(1));
        assert!(r.counted(far).is_some());
        assert!(r.counted(a).is_none());
    }

    #[test]
    fn a_pair_counts_by_both_outcomes_and_the_canarys_latency_beside_stables() {
        let m = Metrics::new("i".into(), 0);
        let r = m.new_recorder();
        let s = m.service_id("default").unwrap();
        let ms = Duration::from_millis;
        r.record_pair(s, Some((200, ms(10))), Some((200, ms(13)))); // 3 ms slower
        r.record_pair(s, Some((200, ms(10))), Some((204, ms(4)))); // 6 ms faster
        r.record_pair(s, Some((200, ms(10))), Some((500, ms(1)))); // the canary's failure
        r.record_pair(s, Some((502, ms(10))), Some((200, ms(1)))); // stable's
        r.record_pair(s, Some((200, ms(10))), None); // the router's: nobody's
        let p = m.snapshot([]).services["default"].mirror.pairs.clone();
        assert_eq!(p.outcomes, [[2, 1], [1, 0]]);
        assert_eq!(p.unpaired, 1);
        // 3 ms is in (2.5 ms, 5 ms], 6 ms in (5 ms, 10 ms]; failures are not timed.
        assert_eq!(p.slower.iter().sum::<u64>(), 1);
        assert_eq!(p.slower[2], 1);
        assert_eq!(p.faster.iter().sum::<u64>(), 1);
        assert_eq!(p.faster[3], 1);
    }
}
