//! Counts from a traffic provider's own series, through a real Prometheus: an exporter on
//! 127.0.0.1 exposes the series Istio's sidecars, ingress-nginx, Envoy (as Contour names its
//! clusters) and Coalmine's router expose — names and labels as they write them — growing at
//! rates the test sets, and Prometheus scrapes it every second. Per provider: each step's counts
//! are the exporter's rates over the scrapes the step saw, a restarted canary (its counters back
//! to zero) is counted on, the built-in checks read what Flagger's queries read and agree with
//! the counts, and the sequential judge rejects a canary failing 5 % of its requests against a
//! primary failing 0.1 %, and not one failing as often as the primary.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coalmine_controller::observations::prometheus::{
    flagger_builtin_query, with_builtin_queries, MeshSeries, PrometheusSource,
};
use coalmine_controller::observations::{ObservationSource, ObserveError};
use coalmine_controller::providers::Providers;
use coalmine_judge::{Batch, CountsTest, Reading};
use coalmine_rollout::Observation;
use coalmine_spec::rollout::{MetricCheck, BUILTIN_DURATION, BUILTIN_SUCCESS_RATE};
use coalmine_spec::templates::{Provider, PROMETHEUS};

use common::promstack::*;
use common::stub::*;

/// Prometheus' scrape interval here, in seconds.
const SCRAPE_SECS: f64 = 1.0;
/// Sampling steps after the first (which only starts counting), one a second.
const STEPS: usize = 14;
/// The step after which the failing release's canary restarts (its counters start from zero).
const RESTART_AFTER_STEP: usize = 4;
/// The built-in checks' interval (Flagger's `{{ interval }}`).
const CHECK_WINDOW: Duration = Duration::from_secs(8);

/// One version's traffic: requests a second and the share answered 503.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rates {
    rps: f64,
    failing: f64,
}

impl Rates {
    fn ok(&self) -> f64 {
        self.rps * (1.0 - self.failing)
    }
    fn failures(&self) -> f64 {
        self.rps * self.failing
    }
}

const PRIMARY: Rates = Rates {
    rps: 4000.0,
    failing: 0.001,
};
pub(crate) const FAILING_CANARY: Rates = Rates {
    rps: 1000.0,
    failing: 0.05,
};
const EQUAL_CANARY: Rates = Rates {
    rps: 1000.0,
    failing: 0.001,
};

/// Latency, the same for every request: uniform within each (low, high] milliseconds with the
/// share given; p99 = 25 + 25 · (0.99 − 0.95) / 0.045 = 47.2 ms, p50 = 10 ms.
const LATENCY: [(f64, f64, f64); 4] = [
    (5.0, 10.0, 0.5),
    (10.0, 25.0, 0.45),
    (25.0, 50.0, 0.045),
    (50.0, 100.0, 0.005),
];
const P99_MS: f64 = 25.0 + 25.0 * (0.99 - 0.95) / 0.045;
/// The mean latency (NGINX's `request-duration` under Flagger is a mean), in seconds.
const MEAN_SECS: f64 = 0.0173;

/// The share of requests at most `ms` milliseconds.
fn cdf(ms: f64) -> f64 {
    LATENCY
        .iter()
        .map(|(low, high, share)| share * ((ms - low) / (high - low)).clamp(0.0, 1.0))
        .sum()
}

/// Istio's and Envoy's default buckets (milliseconds).
const ENVOY_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// ingress-nginx's buckets (Prometheus' defaults, seconds).
const NGINX_BUCKETS_S: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Coalmine's router's buckets (seconds; `LATENCY_BUCKETS` in crates/router/src/recorder.rs).
const COALMINE_BUCKETS_S: [f64; 21] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
    1.5, 2.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kind {
    Istio,
    Nginx,
    Envoy,
    Coalmine,
}

/// The seed's namespace, as the operator tests use it.
const NAMESPACE: &str = "shop";

/// Which of a release's versions a series is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    Primary,
    Canary,
}

impl Kind {
    fn series(&self, release: &str) -> MeshSeries {
        match self {
            Kind::Istio => MeshSeries::istio(NAMESPACE, release),
            Kind::Nginx => MeshSeries::nginx(NAMESPACE, release),
            Kind::Envoy => MeshSeries::gateway_api(NAMESPACE, release),
            Kind::Coalmine => MeshSeries::coalmine(&format!("service=\"{release}\"")),
        }
    }

    /// Whether Flagger's `request-duration` here is a p99 (NGINX's is a mean).
    fn duration_is_p99(&self) -> bool {
        *self != Kind::Nginx
    }

    /// Whether Flagger's queries here read the canary alone (NGINX's read the whole Ingress:
    /// ingress-nginx labels the canary's requests with the main Ingress and a `canary` label).
    fn flagger_reads_canary_alone(&self) -> bool {
        *self != Kind::Nginx
    }

    /// The exposition of one version of `release`: `ok` and `failed` requests so far, as this
    /// provider writes them.
    fn exposition(
        &self,
        out: &mut Families,
        release: &str,
        version: Version,
        ok: f64,
        failed: f64,
    ) {
        let requests = ok + failed;
        let (counter, histogram, buckets, per_ms, labels): (&str, &str, &[f64], f64, String) =
            match self {
                // Istio's standard metrics (istio.io "Istio Standard Metrics"): the labels the
                // destination's sidecar writes.
                Kind::Istio => {
                    let workload = match version {
                        Version::Primary => format!("{release}-primary"),
                        Version::Canary => release.to_string(),
                    };
                    (
                        "istio_requests_total",
                        "istio_request_duration_milliseconds",
                        &ENVOY_BUCKETS_MS,
                        1.0,
                        format!(
                            r#"reporter="destination",source_workload="loadtester",source_workload_namespace="{NAMESPACE}",source_principal="spiffe://cluster.local/ns/{NAMESPACE}/sa/default",destination_workload="{workload}",destination_workload_namespace="{NAMESPACE}",destination_service="{release}.{NAMESPACE}.svc.cluster.local",destination_service_name="{release}",destination_service_namespace="{NAMESPACE}",destination_version="unknown",request_protocol="http",connection_security_policy="mutual_tls""#
                        ),
                    )
                }
                // ingress-nginx's socket collector: the main Ingress's name on every request,
                // `canary` the alternative upstream's name when the canary backend served it.
                Kind::Nginx => {
                    let (canary, service) = match version {
                        Version::Primary => (String::new(), release.to_string()),
                        Version::Canary => (
                            format!("{NAMESPACE}-{release}-canary-80"),
                            format!("{release}-canary"),
                        ),
                    };
                    let common = format!(
                        r#"controller_class="k8s.io/ingress-nginx",controller_namespace="ingress-nginx",controller_pod="ingress-nginx-controller-5c8d66c76d-9ljxq",ingress="{release}",namespace="{NAMESPACE}",service="{service}""#
                    );
                    // Flagger's NGINX duration: the (older) upstream latency summary.
                    let summary = "nginx_ingress_controller_ingress_upstream_latency_seconds";
                    let seconds = requests * MEAN_SECS;
                    out.line(
                        summary,
                        "summary",
                        format!("{summary}_sum{{{common}}} {seconds}"),
                    );
                    out.line(
                        summary,
                        "summary",
                        format!("{summary}_count{{{common}}} {requests}"),
                    );
                    (
                        "nginx_ingress_controller_requests",
                        "nginx_ingress_controller_request_duration_seconds",
                        &NGINX_BUCKETS_S,
                        1000.0,
                        format!(
                            r#"canary="{canary}",{common},host="{release}.example.com",method="GET",path="/""#
                        ),
                    )
                }
                // Envoy's cluster stats through Contour: `envoy_cluster_name` is
                // `<namespace>_<service>_<port>` (Flagger's contour.go matches it so).
                Kind::Envoy => {
                    let service = match version {
                        Version::Primary => format!("{release}-primary"),
                        Version::Canary => format!("{release}-canary"),
                    };
                    (
                        "envoy_cluster_upstream_rq",
                        "envoy_cluster_upstream_rq_time",
                        &ENVOY_BUCKETS_MS,
                        1.0,
                        format!(r#"envoy_cluster_name="{NAMESPACE}_{service}_9898""#),
                    )
                }
                // crates/router/src/exposition.rs; `service` is the scrape target's label.
                Kind::Coalmine => {
                    let version = match version {
                        Version::Primary => "stable",
                        Version::Canary => "canary",
                    };
                    (
                        "http_requests_total",
                        "http_request_duration_seconds",
                        &COALMINE_BUCKETS_S,
                        1000.0,
                        format!(r#"version="{version}""#),
                    )
                }
            };
        let status = match self {
            Kind::Istio => "response_code",
            Kind::Envoy => "envoy_response_code",
            Kind::Nginx | Kind::Coalmine => "status",
        };
        for (code, n) in [("200", ok), ("503", failed)] {
            out.line(
                counter,
                "counter",
                format!("{counter}{{{labels},{status}=\"{code}\"}} {n}"),
            );
        }
        // Istio's and ingress-nginx's histograms are split by status too; Envoy's and the
        // router's are not.
        let split: Vec<(Option<&str>, f64)> = match self {
            Kind::Istio | Kind::Nginx => vec![(Some("200"), ok), (Some("503"), failed)],
            Kind::Envoy | Kind::Coalmine => vec![(None, requests)],
        };
        for (code, n) in split {
            let labels = match code {
                Some(code) => format!("{labels},{status}=\"{code}\""),
                None => labels.clone(),
            };
            let mut line = |text: String| out.line(histogram, "histogram", text);
            for le in buckets {
                let below = (n * cdf(le * per_ms)).floor();
                line(format!(
                    "{histogram}_bucket{{{labels},le=\"{le}\"}} {below}"
                ));
            }
            line(format!("{histogram}_bucket{{{labels},le=\"+Inf\"}} {n}"));
            let sum = n * MEAN_SECS * 1000.0 / per_ms;
            line(format!("{histogram}_sum{{{labels}}} {sum}"));
            line(format!("{histogram}_count{{{labels}}} {n}"));
        }
    }
}

/// A text exposition being written: each family's samples together under one TYPE line.
#[derive(Default)]
struct Families(std::collections::BTreeMap<String, (String, Vec<String>)>);

impl Families {
    fn line(&mut self, family: &str, kind: &str, sample: String) {
        let entry = self
            .0
            .entry(family.to_string())
            .or_insert_with(|| (kind.to_string(), Vec::new()));
        entry.1.push(sample);
    }

    /// The exposition, each sample stamped `at_ms`.
    fn text(&self, at_ms: u64) -> String {
        let mut out = String::new();
        for (family, (kind, samples)) in &self.0 {
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            for sample in samples {
                out.push_str(&format!("{sample} {at_ms}\n"));
            }
        }
        out
    }
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What a release's exporter counts from: when its versions started (unix seconds; the canary
/// again when it restarts).
#[derive(Clone)]
pub(crate) struct Clocks {
    pub(crate) primary_since: f64,
    pub(crate) canary_since: Arc<Mutex<f64>>,
}

impl Clocks {
    /// A version's counters at unix time `at`: requests answered 200 and 503 since it started.
    fn counters(since: f64, rates: Rates, at: f64) -> (f64, f64) {
        let up = (at - since).max(0.0);
        ((rates.ok() * up).floor(), (rates.failures() * up).floor())
    }
}

/// An exporter of one release (primary and canary at the rates given) on 127.0.0.1.
pub(crate) fn exporter(kind: Kind, release: &'static str, canary: Rates, clocks: Clocks) -> String {
    exporter_of(
        kind,
        release,
        canary,
        clocks,
        &[Version::Primary, Version::Canary],
    )
}

/// An exporter of some of a release's versions (a version's pods are their own targets).
fn exporter_of(
    kind: Kind,
    release: &'static str,
    canary: Rates,
    clocks: Clocks,
    versions: &[Version],
) -> String {
    let versions = versions.to_vec();
    let (url, _requests) = stub(move |_| {
        // The samples carry the time they were counted at (Prometheus keeps a sample's own
        // timestamp), so the test knows what each scrape saw whatever the machine's load; the
        // restart is read at the same moment.
        let canary_since = clocks.canary_since.lock().unwrap();
        let at_ms = (unix_now() * 1000.0).floor() as u64;
        let now = at_ms as f64 / 1000.0;
        let mut families = Families::default();
        for version in &versions {
            let (since, rates) = match version {
                Version::Primary => (clocks.primary_since, PRIMARY),
                Version::Canary => (*canary_since, canary),
            };
            let (ok, failed) = Clocks::counters(since, rates, now);
            kind.exposition(&mut families, release, *version, ok, failed);
        }
        (
            Duration::ZERO,
            response("200 OK", "text/plain; version=0.0.4", &families.text(at_ms)),
        )
    });
    url
}

/// One release's run: each step's counts, when they were sampled up to (the newest scrape they
/// saw, unix seconds), and how far behind the sample that scrape was.
struct Steps {
    series: MeshSeries,
    steps: Vec<(Observation, f64, Duration)>,
    judge: CountsTest,
    rejected_at_step: Option<usize>,
}

/// A real Prometheus scraping `scrape` every second, each target scraped a few times; and the
/// provider that asks it.
async fn scraping(scrape: Vec<ScrapeTarget>) -> (Prometheus, Provider) {
    let prometheus = Prometheus::start_scraping(PrometheusSetup {
        scrape,
        ..PrometheusSetup::default()
    })
    .await;
    tokio::time::sleep(Duration::from_secs_f64(2.5 * SCRAPE_SECS)).await;
    let server = Provider {
        kind: PROMETHEUS.into(),
        address: Some(prometheus.url.clone()),
        ..Provider::default()
    };
    (prometheus, server)
}

/// One step's counts as the sequential judge takes them.
fn batch(o: &Observation) -> Batch {
    Batch {
        canary_requests: o.canary.requests,
        canary_failures: o.canary.server_errors,
        stable_requests: o.stable.requests,
        stable_failures: o.stable.server_errors,
    }
}

async fn sample(source: &mut PrometheusSource) -> (Observation, f64, Duration) {
    let sample = source.sample().await.expect("a sample");
    let lag = source.lag().expect("a scrape seen");
    (sample.counts, source.counted_up_to().unwrap(), lag)
}

/// The counts one step should hold: the counters at the newest scrape it saw minus those at the
/// step before's (from zero when the version restarted in between: what it served since the
/// scrape before its restart is lost).
fn expected(since: f64, restart: Option<f64>, rates: Rates, from: f64, to: f64) -> (f64, f64) {
    let started = |at: f64| match restart {
        Some(r) if r <= at => r,
        _ => since,
    };
    let (ok1, failed1) = Clocks::counters(started(to), rates, to);
    let (ok0, failed0) = if started(to) > from {
        (0.0, 0.0)
    } else {
        Clocks::counters(started(from), rates, from)
    };
    (ok1 + failed1 - ok0 - failed0, failed1 - failed0)
}

/// Both versions' counts over the steps that ended in the last `window` (as the driver's window
/// sums them for a check).
fn over_window(steps: &[(Observation, f64, Duration)], window: Duration) -> Observation {
    let end = steps.last().unwrap().1;
    let mut out = Observation::default();
    for (counts, at, _) in steps {
        if *at > end - window.as_secs_f64() {
            out.canary.add(&counts.canary);
            out.stable.add(&counts.stable);
        }
    }
    out
}

async fn provider_counts_and_judges(kind: Kind) {
    let started = Instant::now();
    let since = unix_now();
    let failing_clocks = Clocks {
        primary_since: since,
        canary_since: Arc::new(Mutex::new(since)),
    };
    let equal_clocks = Clocks {
        primary_since: since,
        canary_since: Arc::new(Mutex::new(since)),
    };
    let failing_url = exporter(kind, "podinfo", FAILING_CANARY, failing_clocks.clone());
    let equal_url = exporter(kind, "backend", EQUAL_CANARY, equal_clocks.clone());
    let target = |job: &str, url: &str, release: &str| {
        let t = ScrapeTarget::new(job, url);
        // Prometheus labels a scraped router with its rollout, as deploy/prometheus does.
        if kind == Kind::Coalmine {
            t.label("service", release)
        } else {
            t
        }
    };
    let scrape = vec![
        target("podinfo", &failing_url, "podinfo"),
        target("backend", &equal_url, "backend"),
    ];
    let (prometheus, server) = scraping(scrape).await;
    let releases = ["podinfo", "backend"];

    let mut runs: Vec<(PrometheusSource, Steps)> = releases
        .iter()
        .map(|release| {
            let series = kind.series(release);
            (
                PrometheusSource::new(&server, series.clone()).unwrap(),
                Steps {
                    series,
                    steps: Vec::new(),
                    judge: CountsTest::default(),
                    rejected_at_step: None,
                },
            )
        })
        .collect();
    for (source, steps) in &mut runs {
        let first = sample(source).await;
        assert_eq!(
            first.0,
            Observation::default(),
            "the first sample only starts counting"
        );
        steps.steps.push(first);
    }
    // A release Prometheus has no series of (yet): zero counts, not an error.
    let mut absent = PrometheusSource::new(&server, kind.series("absent")).unwrap();
    assert_eq!(
        absent.sample().await.unwrap().counts,
        Observation::default()
    );
    let mut restarted_at = None;
    for step in 1..=STEPS {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (source, steps) in &mut runs {
            let taken = sample(source).await;
            let o = &taken.0;
            steps.judge.observe(batch(o)).unwrap();
            if steps.judge.rejected(0.05) && steps.rejected_at_step.is_none() {
                steps.rejected_at_step = Some(step);
            }
            steps.steps.push(taken);
        }
        if step == RESTART_AFTER_STEP {
            let mut canary_since = failing_clocks.canary_since.lock().unwrap();
            *canary_since = unix_now();
            restarted_at = Some(*canary_since);
        }
    }

    let nothing = absent.sample().await.expect("no series is no error");
    assert_eq!(nothing.counts, Observation::default());
    assert_eq!(absent.lag(), None);

    // Each step holds the exporter's counts between the newest scrapes it and the step before
    // saw; the steps are a second apart, so that is a second of traffic give or take a scrape.
    let mut lags = Vec::new();
    for ((_, steps), canary, restart) in [
        (&runs[0], FAILING_CANARY, restarted_at),
        (&runs[1], EQUAL_CANARY, None),
    ] {
        for pair in steps.steps.windows(2) {
            let ((_, from, _), (counts, to, lag)) = (&pair[0], &pair[1]);
            lags.push(lag.as_secs_f64());
            for (rates, counts, restart) in [
                (PRIMARY, &counts.stable, None),
                (canary, &counts.canary, restart),
            ] {
                // Exactly, but for the counters' rounding to whole requests (two of them). A
                // step over the restart also holds what scrapes between its start and the
                // restart saw (a late step spans several scrapes): up to all its traffic.
                let (requests, failures) = expected(since, restart, rates, *from, *to);
                let (all, all_failures) = expected(since, None, rates, *from, *to);
                let within = |got: u64, low: f64, high: f64| {
                    (low - 2.0..=high.max(low) + 2.0).contains(&(got as f64))
                };
                assert!(
                    within(counts.requests, requests, all)
                        && within(counts.server_errors, failures, all_failures),
                    "{kind:?} {:?}: {} requests and {} failures from {from:.3} to {to:.3}, expected {requests} and {failures}",
                    steps.series,
                    counts.requests,
                    counts.server_errors,
                );
                // Against the wall clock: a step is its second of traffic, shifted by at most
                // one scrape interval at either end (a restart loses at most one more).
                let wall = to - from;
                let lost = if restart.is_some_and(|r| r > *from && r <= *to) {
                    rates.rps * SCRAPE_SECS
                } else {
                    0.0
                };
                assert!(
                    counts.requests as f64 <= rates.rps * (wall + SCRAPE_SECS) + 2.0
                        && counts.requests as f64 + lost >= rates.rps * (wall - SCRAPE_SECS) - 2.0,
                    "{kind:?}: {} requests over {wall:.2} s at {} a second",
                    counts.requests,
                    rates.rps
                );
            }
        }
    }
    let max_lag = lags.iter().cloned().fold(0.0, f64::max);
    let mean_lag = lags.iter().sum::<f64>() / lags.len() as f64;
    println!(
        "{kind:?}: scrape lag over {} steps: mean {:.3} s, max {:.3} s (scrape interval {SCRAPE_SECS} s)",
        lags.len(),
        mean_lag,
        max_lag
    );
    assert!(
        max_lag <= SCRAPE_SECS + 0.5,
        "a step's counts are at most a scrape interval (and the scrape's duration) old: {max_lag} s"
    );

    // The sequential judge rejects the canary failing 5 % (against 0.1 %), not the equal one.
    let failing = &runs[0].1;
    let equal = &runs[1].1;
    println!(
        "{kind:?}: failing canary rejected at step {:?}, equal canary: {:?} (log BF {:.2})",
        failing.rejected_at_step,
        equal.rejected_at_step,
        equal.judge.log_bayes_factor()
    );
    assert!(
        failing.rejected_at_step.is_some(),
        "{kind:?}: a canary failing 5 % against 0.1 % is rejected: {:?}",
        failing.judge.evidence(0.05)
    );
    assert!(
        equal.rejected_at_step.is_none(),
        "{kind:?}: a canary failing as often as the primary is not: {:?}",
        equal.judge.evidence(0.05)
    );

    // The built-in checks read Flagger's queries, and agree with the counts over their window.
    for (release, (_, steps), canary) in [
        ("podinfo", &runs[0], FAILING_CANARY),
        ("backend", &runs[1], EQUAL_CANARY),
    ] {
        let mut checks: Vec<MetricCheck> = [BUILTIN_SUCCESS_RATE, BUILTIN_DURATION]
            .iter()
            .map(|name| {
                serde_json::from_value(serde_json::json!({
                    "name": name,
                    "interval": coalmine_spec::format_duration(CHECK_WINDOW),
                }))
                .unwrap()
            })
            .collect();
        with_builtin_queries(&mut checks, &server, &steps.series);
        let providers = Providers::for_provider(&server);
        let success_rate = value(providers.read(&checks[0]).await);
        let duration = value(providers.read(&checks[1]).await);
        let flagger_success_rate = prometheus
            .value(
                &flagger_builtin_query(&steps.series, BUILTIN_SUCCESS_RATE, CHECK_WINDOW).unwrap(),
            )
            .await
            .unwrap();
        let flagger_duration = prometheus
            .value(&flagger_builtin_query(&steps.series, BUILTIN_DURATION, CHECK_WINDOW).unwrap())
            .await
            .unwrap();
        println!(
            "{kind:?} {release}: success rate {success_rate} (Flagger's query {flagger_success_rate}), duration {duration} ms (Flagger's query {flagger_duration})"
        );
        // Read a moment apart from counters growing steadily: equal but for a request or two.
        assert!((success_rate - flagger_success_rate).abs() < 0.01);
        assert_eq!(
            duration,
            flagger_duration.floor(),
            "Flagger truncates to whole ms"
        );

        // What the exporter's rates say Flagger reads.
        let (truth_rate, truth_duration) = if kind.flagger_reads_canary_alone() {
            (100.0 * (1.0 - canary.failing), P99_MS)
        } else {
            let all = PRIMARY.rps + canary.rps;
            let failing = PRIMARY.failures() + canary.failures();
            (100.0 * (1.0 - failing / all), MEAN_SECS * 1000.0)
        };
        assert!(
            (flagger_success_rate - truth_rate).abs() < 0.05,
            "{kind:?} {release}: {flagger_success_rate} % where the exporter fails {truth_rate} %"
        );
        assert!(
            (flagger_duration - truth_duration).abs() < 0.1,
            "{kind:?} {release}: {flagger_duration} ms where the exporter's is {truth_duration} ms"
        );

        // The counts over the check's window agree with Flagger's queries on the same data:
        // steady rates make the ratios equal but for whole requests (±2 failures of the ≈400
        // the canary fails in 8 s: 0.05 points); the p99 to within a step's spread.
        let counted = over_window(&steps.steps, CHECK_WINDOW);
        let window = counted.canary.clone();
        let counted_rate = if kind.flagger_reads_canary_alone() {
            value(window.success_rate())
        } else {
            let mut both = window.clone();
            both.add(&counted.stable);
            value(both.success_rate())
        };
        assert!(
            (counted_rate - flagger_success_rate).abs()
                < 0.05 + 100.0 * 2.0 / window.requests as f64,
            "{kind:?} {release}: counts {counted_rate} %, Flagger's query {flagger_success_rate} %"
        );
        if kind.duration_is_p99() {
            let counted_p99 = value(window.latency_quantile_ms(0.99));
            // Each step's count in the p99's bucket (25–50 ms, 4.5 % of a second's requests)
            // lies one per point; the window's p99 is within a point's spacing of the
            // interpolation, and a rank (of the ≈ 360 in the bucket) more.
            let in_bucket = canary.rps * SCRAPE_SECS * 0.045;
            let resolution = 25.0 / in_bucket.floor() + 25.0 / (8.0 * in_bucket);
            println!("{kind:?} {release}: counts' p99 {counted_p99} ms, Flagger's {flagger_duration} ms (± {resolution:.3})");
            assert!(
                (counted_p99 - flagger_duration).abs() <= resolution,
                "{kind:?} {release}: counts' p99 {counted_p99} ms, Flagger's {flagger_duration} ms"
            );
        }
    }
    println!("{kind:?}: {:.1} s", started.elapsed().as_secs_f64());
}

fn value(reading: Reading) -> f64 {
    match reading {
        Reading::Value { value } => value,
        other => panic!("expected a value, got {other:?}"),
    }
}

/// The primary's and the canary's pods are separate targets, scraped at different moments:
/// steps shorter than the scrape interval often see one version's scrape alone. Those are held
/// until the other's arrives, so every step the judge sees compares both versions, and the
/// counts still add up to the exporter's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_scraped_apart_reach_the_judge_together() {
    let since = unix_now();
    let clocks = Clocks {
        primary_since: since,
        canary_since: Arc::new(Mutex::new(since)),
    };
    let primary = exporter_of(
        Kind::Istio,
        "podinfo",
        FAILING_CANARY,
        clocks.clone(),
        &[Version::Primary],
    );
    let canary = exporter_of(
        Kind::Istio,
        "podinfo",
        FAILING_CANARY,
        clocks,
        &[Version::Canary],
    );
    let scrape = vec![
        ScrapeTarget::new("podinfo-primary", &primary),
        ScrapeTarget::new("podinfo", &canary),
    ];
    let (_prometheus, server) = scraping(scrape).await;
    let mut source =
        PrometheusSource::new(&server, MeshSeries::istio(NAMESPACE, "podinfo")).unwrap();
    let (first, from, _) = sample(&mut source).await;
    assert_eq!(first, Observation::default());
    let mut judge = CountsTest::default();
    let mut total = Observation::default();
    let mut to = from;
    // Four samples a scrape interval: two targets scraped a quarter interval apart or more
    // give one-sided steps.
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_secs_f64(SCRAPE_SECS / 4.0)).await;
        let (o, at, _) = sample(&mut source).await;
        to = at;
        judge.observe(batch(&o)).unwrap();
        assert_eq!(
            o.canary.requests == 0,
            o.stable.requests == 0,
            "a step with one version's requests alone: {o:?}"
        );
        total.canary.add(&o.canary);
        total.stable.add(&o.stable);
    }
    // A query Prometheus refuses (matchers that do not parse) is no sample, said as
    // Prometheus said it, and blames no version.
    let mut refused =
        PrometheusSource::new(&server, MeshSeries::coalmine(r#"service=~"("#)).unwrap();
    match refused.sample().await {
        Err(ObserveError::Unreadable(reason)) => {
            assert!(reason.contains("bad_data"), "{reason}")
        }
        other => panic!("expected Unreadable, got {other:?}"),
    }
    let totals = judge.totals();
    println!(
        "{} steps, {} with requests; canary {} requests, primary {}",
        totals.batches,
        totals.batches - totals.uninformative_batches,
        total.canary.requests,
        total.stable.requests
    );
    assert!(judge.rejected(0.05), "{:?}", judge.evidence(0.05));
    // What was handed on is what the exporter counted over the run, but for the scrapes the
    // last steps still hold back (at most one interval of each version and a held step).
    for (counted, rates) in [(&total.canary, FAILING_CANARY), (&total.stable, PRIMARY)] {
        let span = to - from;
        assert!(
            counted.requests as f64 <= rates.rps * (span + SCRAPE_SECS) + 2.0
                && counted.requests as f64 >= rates.rps * (span - 2.0 * SCRAPE_SECS) - 2.0,
            "{} requests over {span:.2} s at {} a second",
            counted.requests,
            rates.rps
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_counts_judge_and_flagger_builtins() {
    provider_counts_and_judges(Kind::Istio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_counts_judge_and_flagger_builtins() {
    provider_counts_and_judges(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_envoy_counts_judge_and_flagger_builtins() {
    provider_counts_and_judges(Kind::Envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalmine_router_series_counts_judge_and_flagger_builtins() {
    provider_counts_and_judges(Kind::Coalmine).await;
}
