//! Counting what the router saw, per version: status codes, latency, upstream failures, mirrored
//! copies. How the counts are shown (`/stats`, Prometheus text) is [`crate::exposition`]'s.
//!
//! Each worker thread owns a [`Recorder`] so the hot path touches only its own cache lines; a
//! scrape sums them into a [`Snapshot`]. Counters never reset while the process lives, so
//! readers take differences between two snapshots (and notice a restart by `instance`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
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
}

impl UpstreamFailure {
    pub(crate) const ALL: [UpstreamFailure; 4] = [
        UpstreamFailure::Connect,
        UpstreamFailure::Timeout,
        UpstreamFailure::Protocol,
        UpstreamFailure::Body,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Protocol => "protocol",
            UpstreamFailure::Body => "body",
        }
    }
}

/// Why the router failed a request on its own account, before any version could answer it:
/// never counted against a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalFailure {
    /// Out of file descriptors, memory or local ports for a new upstream connection.
    Resources,
}

impl LocalFailure {
    pub(crate) const ALL: [LocalFailure; 1] = [LocalFailure::Resources];

    pub fn as_str(self) -> &'static str {
        match self {
            LocalFailure::Resources => "resources",
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

/// One worker's counters. Only that worker's thread writes them (scrapes only read), so an
/// increment is a plain load and store: no locked read-modify-write on the hot path.
pub struct Recorder {
    versions: [VersionCounters; 2],
    mirror_status: Box<[AtomicU64]>,
    mirror_failures: AtomicU64,
    /// Mirrored copies' latency until their response head, like `versions`' own.
    mirror_latency: Mutex<Histogram<u64>>,
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
            versions: [VersionCounters::new(), VersionCounters::new()],
            mirror_status: (0..500).map(|_| AtomicU64::new(0)).collect(),
            mirror_failures: AtomicU64::new(0),
            mirror_latency: Mutex::new(new_hdr()),
            local_failures: Default::default(),
            in_flight: AtomicI64::new(0),
        }
    }

    /// Counts a request in flight until the guard drops.
    pub fn enter(&self) -> InFlight<'_> {
        let n = &self.in_flight;
        n.store(n.load(Relaxed) + 1, Relaxed);
        InFlight(n)
    }

    /// Records one answered request: status (the router's own 502/504 included) and the time
    /// until the response head.
    pub fn record(&self, version: Version, status: u16, elapsed: Duration) {
        let v = &self.versions[version.index()];
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

    pub fn record_failure(&self, version: Version, failure: UpstreamFailure) {
        bump(
            &self.versions[version.index()].failures[failure as usize],
            1,
        );
    }

    pub fn record_retry(&self, version: Version) {
        bump(&self.versions[version.index()].retries, 1);
    }

    pub fn record_local_failure(&self, failure: LocalFailure) {
        bump(&self.local_failures[failure as usize], 1);
    }

    /// A mirrored copy's outcome and the time until its response head; `None` when it never
    /// got a response.
    pub fn record_mirror(&self, answer: Option<(u16, Duration)>) {
        match answer {
            Some((s, elapsed)) => {
                bump(&self.mirror_status[status_index(s)], 1);
                let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
                if let Ok(mut h) = self.mirror_latency.lock() {
                    h.saturating_record(micros.max(1));
                }
            }
            None => bump(&self.mirror_failures, 1),
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
    pub route_swaps: AtomicU64,
    pub mirror_dropped: AtomicU64,
    pub mirror_skipped_body: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Accepts that failed for want of descriptors or memory (the listener backs off).
    pub accept_errors: AtomicU64,
    /// Random per process start: a reader that sees it change knows the counters restarted.
    pub instance: String,
    pub started_unix_ms: u64,
}

impl Metrics {
    pub fn new(instance: String, started_unix_ms: u64) -> Self {
        Metrics {
            recorders: Mutex::new(Vec::new()),
            route_swaps: AtomicU64::new(0),
            mirror_dropped: AtomicU64::new(0),
            mirror_skipped_body: AtomicU64::new(0),
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

    pub fn snapshot(&self) -> Snapshot {
        let recorders = self.recorders.lock().expect("recorder list").clone();
        let mut versions = [VersionSnapshot::new(), VersionSnapshot::new()];
        let mut mirror = MirrorSnapshot::new();
        let mut in_flight = 0;
        let mut local_failures = [0; LocalFailure::ALL.len()];
        for r in &recorders {
            in_flight += r.in_flight.load(Relaxed);
            for (snap, v) in versions.iter_mut().zip(&r.versions) {
                snap.add(v);
            }
            add_statuses(&mut mirror.statuses, &r.mirror_status);
            mirror.failed += r.mirror_failures.load(Relaxed);
            if let Ok(h) = r.mirror_latency.lock() {
                let _ = mirror.latency.add(&*h);
            }
            for (n, c) in local_failures.iter_mut().zip(&r.local_failures) {
                *n += c.load(Relaxed);
            }
        }
        let local_failures = LocalFailure::ALL
            .iter()
            .map(|f| (f.as_str(), local_failures[*f as usize]))
            .collect();
        mirror.requests = mirror.statuses.values().sum::<u64>() + mirror.failed;
        mirror.dropped = self.mirror_dropped.load(Relaxed);
        mirror.skipped_with_body = self.mirror_skipped_body.load(Relaxed);
        Snapshot {
            versions,
            mirror,
            in_flight,
            local_failures,
            accept_errors: self.accept_errors.load(Relaxed),
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
            latency: new_hdr(),
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
    /// Time until each answered copy's response head.
    pub latency: Histogram<u64>,
}

impl MirrorSnapshot {
    fn new() -> Self {
        MirrorSnapshot {
            requests: 0,
            statuses: BTreeMap::new(),
            failed: 0,
            dropped: 0,
            skipped_with_body: 0,
            latency: new_hdr(),
        }
    }
}

pub struct Snapshot {
    pub versions: [VersionSnapshot; 2],
    pub mirror: MirrorSnapshot,
    /// Requests being proxied, summed over workers.
    pub in_flight: i64,
    /// Requests the router failed on its own account, by reason.
    pub local_failures: BTreeMap<&'static str, u64>,
    /// Connections the listener could not accept (out of descriptors, memory).
    pub accept_errors: u64,
}

/// Two workers' recorders with stable 200 in 3 ms and in 30 ms, canary 502 in 0.2 ms and one
/// canary connect failure: the fixture of the counting and the exposition tests.
#[cfg(test)]
pub(crate) fn two_workers_recorded() -> (Metrics, Arc<Recorder>, Arc<Recorder>) {
    let m = Metrics::new("i".into(), 0);
    let (a, b) = (m.new_recorder(), m.new_recorder());
    a.record(Version::Stable, 200, Duration::from_millis(3));
    b.record(Version::Stable, 200, Duration::from_millis(30));
    b.record(Version::Canary, 502, Duration::from_micros(200));
    b.record_failure(Version::Canary, UpstreamFailure::Connect);
    (m, a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_workers_and_counts_requests_in_flight() {
        let (m, a, b) = two_workers_recorded();
        let busy = (a.enter(), b.enter(), b.enter());
        assert_eq!(m.snapshot().in_flight, 3);
        drop(busy);
        let s = m.snapshot();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.versions[0].statuses[&200], 2);
        assert_eq!(s.versions[1].failures[0], 1);
        assert_eq!(s.versions[0].buckets.iter().sum::<u64>(), 2);
        assert_eq!(s.versions[0].latency.len(), 2);
    }
}
