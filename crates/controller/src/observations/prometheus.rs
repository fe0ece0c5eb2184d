//! Prometheus as an observation source: both versions' counts per step from the series the
//! traffic provider exports itself (Istio's sidecars, ingress-nginx, Envoy under a Gateway API
//! implementation, or Coalmine's routers scraped by a Prometheus), for providers that have no
//! `/stats` of Coalmine's to count from.
//!
//! **Counts.** Each sample asks for the raw samples of the provider's request counter and
//! latency histogram since the last sample (a range selector, no function), and adds up each
//! series' increase the way Prometheus' `increase()` does, without its extrapolation: a value
//! lower than the one before is a counter reset (a restarted pod, a new Envoy), and the new
//! value is all that was counted since. A series first seen after the source started (a new
//! canary pod, the first 503) counts from zero; the requests a restarted pod served between
//! its last scrape and its restart are lost, as they are to `increase()`. Counts are whole
//! numbers, so the sequential judges see requests, not rates.
//!
//! **Scrape lag.** A step holds what Prometheus had scraped when it was asked: the step's end
//! is the newest scrape of each target before the query, on average half a scrape interval
//! (plus the scrape's own duration) behind the traffic, at most one interval. Detection is
//! delayed by as much; [`PrometheusSource::lag`] says how far behind the last step was. A step
//! shorter than the scrape interval may hold no scrape at all (zero counts) and the next one two:
//! the sum over steps is right, a single step is not a rate. The versions' pods are scraped at
//! different moments, so a step may hold one version's requests alone, which tells the
//! sequential judge nothing (it compares the versions within a step): such a step is held until
//! the other version's series advance too, at most [`PAIRING_HOLD_SECS`].
//!
//! **Latency.** The histogram's buckets are all Prometheus knows: each step's count in a bucket
//! is spread evenly over the bucket (one latency per point up to [`SPREAD_POINTS`]), so a
//! quantile read from the counts is `histogram_quantile()`'s linear interpolation to within the
//! bucket's width over the smallest step count in it.
//!
//! **Built-in checks.** On a provider like these, `request-success-rate` and `request-duration`
//! are read by the queries Flagger's observer runs ([`flagger_builtin_query`]): the same
//! thresholds mean the same thing as under Flagger, NGINX's duration (a mean) included.
//! [`with_builtin_queries`] turns a rollout's built-in checks into those queries.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use coalmine_judge::sequential::counts::Arm;
use coalmine_judge::Counts;
use coalmine_rollout::Observation;
use coalmine_spec::rollout::{MetricCheck, BUILTIN_DURATION, BUILTIN_SUCCESS_RATE};
use coalmine_spec::templates::{Provider, PROMETHEUS};

use super::{ObservationSource, ObserveError, Sample};
use crate::providers::{Providers, QueryError};
use crate::{BoxFuture, Unrunnable};

/// How many points one bucket's count of one step is spread over, at most: a count up to this
/// is one latency per point, where `histogram_quantile()` would interpolate each rank. The
/// points of steps with as many latencies coincide, so a window holds few more.
pub const SPREAD_POINTS: u64 = 256;

/// How long a step holding one version's requests alone waits for the other's.
pub const PAIRING_HOLD_SECS: f64 = 30.0;

/// How far back the first sample looks for each series' last value: Prometheus' own lookback
/// (an instant query sees a series as long as it has a sample this recent).
const BASELINE_LOOKBACK_SECS: u64 = 300;

/// How much further back than the last sample each query looks: a scrape is stored (stamped
/// with its start) only once it is complete, so a sample older than the last query may have
/// arrived since. Samples already counted are skipped by their timestamps.
const LOOKBACK_MARGIN_SECS: u64 = 30;

/// Where a traffic provider's series say how each version is doing: the provider's own request
/// counter and latency histogram, and which labels tell the versions apart. Declared once here;
/// the operator builds one from a Canary (the constructors follow Flagger's naming).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshSeries {
    /// Istio's standard metrics as the destination's sidecar reports them
    /// (`istio_requests_total`, `istio_request_duration_milliseconds`, `reporter="destination"`):
    /// a version is a workload in `namespace`.
    Istio {
        namespace: String,
        primary: String,
        canary: String,
    },
    /// ingress-nginx's metrics (`nginx_ingress_controller_requests`,
    /// `nginx_ingress_controller_request_duration_seconds`) of the Ingress `ingress` in
    /// `namespace`: requests sent to the canary backend carry a non-empty `canary` label (or,
    /// where a controller labels them so, the canary Ingress `<ingress>-canary`).
    Nginx { namespace: String, ingress: String },
    /// Envoy's cluster statistics as Contour (and Flagger's Gateway API guide) expose them
    /// (`envoy_cluster_upstream_rq`, `envoy_cluster_upstream_rq_time`): a version is a backend
    /// Service, whose Envoy cluster is named `<namespace>_<service>_<port>`.
    Envoy {
        namespace: String,
        primary: String,
        canary: String,
    },
    /// Coalmine's routers' own exposition (`http_requests_total{version,status}`,
    /// `http_request_duration_seconds`) in a Prometheus that scrapes them; `matchers` picks the
    /// rollout's routers (e.g. `service="payment-service"`), empty for every router.
    Coalmine { matchers: String },
    /// An app's own series for a feature flag (`spec.flag.prometheus`): its request counter and
    /// latency histogram (seconds), labelled `variant`; a version is a variant of the flag.
    FlagVariants {
        requests: String,
        duration: String,
        status_label: String,
        selector: String,
        stable: String,
        canary: String,
    },
}

impl MeshSeries {
    /// Istio: the canary workload is the target, the primary `<target>-primary`.
    pub fn istio(namespace: &str, target: &str) -> MeshSeries {
        MeshSeries::Istio {
            namespace: namespace.into(),
            primary: format!("{target}-primary"),
            canary: target.into(),
        }
    }

    /// ingress-nginx: the Canary's Ingress (its canary twin is `<ingress>-canary`).
    pub fn nginx(namespace: &str, ingress: &str) -> MeshSeries {
        MeshSeries::Nginx {
            namespace: namespace.into(),
            ingress: ingress.into(),
        }
    }

    /// Gateway API: the HTTPRoute's backends, the Services `<target>-primary` and
    /// `<target>-canary`, as Envoy-based implementations (Contour) name their clusters.
    pub fn gateway_api(namespace: &str, target: &str) -> MeshSeries {
        MeshSeries::Envoy {
            namespace: namespace.into(),
            primary: format!("{target}-primary"),
            canary: format!("{target}-canary"),
        }
    }

    /// Coalmine's routers, picked by label matchers (`a="b",c=~"d"`).
    pub fn coalmine(matchers: &str) -> MeshSeries {
        MeshSeries::Coalmine {
            matchers: matchers.into(),
        }
    }

    /// Both versions' series of the request counter.
    fn requests(&self) -> String {
        match self {
            MeshSeries::Istio { .. } => format!("istio_requests_total{{{}}}", self.matchers()),
            MeshSeries::Nginx { .. } => {
                format!("nginx_ingress_controller_requests{{{}}}", self.matchers())
            }
            MeshSeries::Envoy { .. } => {
                format!("envoy_cluster_upstream_rq{{{}}}", self.matchers())
            }
            MeshSeries::Coalmine { .. } => format!("http_requests_total{{{}}}", self.matchers()),
            MeshSeries::FlagVariants { requests, .. } => {
                format!("{requests}{{{}}}", self.matchers())
            }
        }
    }

    /// Both versions' series of the latency histogram's buckets.
    fn buckets(&self) -> String {
        let name = match self {
            MeshSeries::Istio { .. } => "istio_request_duration_milliseconds_bucket".to_string(),
            MeshSeries::Nginx { .. } => {
                "nginx_ingress_controller_request_duration_seconds_bucket".to_string()
            }
            MeshSeries::Envoy { .. } => "envoy_cluster_upstream_rq_time_bucket".to_string(),
            MeshSeries::Coalmine { .. } => "http_request_duration_seconds_bucket".to_string(),
            MeshSeries::FlagVariants { duration, .. } => format!("{duration}_bucket"),
        };
        format!("{name}{{{}}}", self.matchers())
    }

    /// The label matchers that select both versions' series and nothing else.
    fn matchers(&self) -> String {
        match self {
            MeshSeries::Istio {
                namespace,
                primary,
                canary,
            } => format!(
                r#"reporter="destination",destination_workload_namespace="{}",destination_workload=~"{}|{}""#,
                escape(namespace),
                escape(&regex_quote(primary)),
                escape(&regex_quote(canary)),
            ),
            MeshSeries::Nginx { namespace, ingress } => format!(
                r#"namespace="{}",ingress=~"{}(-canary)?""#,
                escape(namespace),
                escape(&regex_quote(ingress)),
            ),
            MeshSeries::Envoy {
                namespace,
                primary,
                canary,
            } => format!(
                r#"envoy_cluster_name=~"{}_({}|{})_[0-9a-zA-Z-]+""#,
                escape(&regex_quote(namespace)),
                escape(&regex_quote(primary)),
                escape(&regex_quote(canary)),
            ),
            MeshSeries::Coalmine { matchers } => {
                let versions = r#"version=~"stable|canary""#;
                if matchers.trim().is_empty() {
                    versions.to_string()
                } else {
                    format!("{},{versions}", matchers.trim().trim_end_matches(','))
                }
            }
            MeshSeries::FlagVariants {
                selector,
                stable,
                canary,
                ..
            } => {
                let variants = format!(
                    r#"variant=~"{}|{}""#,
                    escape(&regex_quote(stable)),
                    escape(&regex_quote(canary))
                );
                if selector.is_empty() {
                    variants
                } else {
                    format!("{selector},{variants}")
                }
            }
        }
    }

    /// The label holding the HTTP status.
    fn status_label(&self) -> &str {
        match self {
            MeshSeries::Istio { .. } => "response_code",
            MeshSeries::Nginx { .. } => "status",
            MeshSeries::Envoy { .. } => "envoy_response_code",
            MeshSeries::Coalmine { .. } => "status",
            MeshSeries::FlagVariants { status_label, .. } => status_label,
        }
    }

    /// The histogram's `le` unit, in microseconds.
    fn le_micros(&self) -> f64 {
        match self {
            MeshSeries::Istio { .. } | MeshSeries::Envoy { .. } => 1e3,
            MeshSeries::Nginx { .. }
            | MeshSeries::Coalmine { .. }
            | MeshSeries::FlagVariants { .. } => 1e6,
        }
    }

    /// Which version a series counts, if either.
    fn arm(&self, labels: &BTreeMap<String, String>) -> Option<Arm> {
        let label = |name: &str| labels.get(name).map(String::as_str).unwrap_or_default();
        let which = |value: &str, primary: &str, canary: &str| {
            if value == canary {
                Some(Arm::Canary)
            } else if value == primary {
                Some(Arm::Stable)
            } else {
                None
            }
        };
        match self {
            MeshSeries::Istio {
                primary, canary, ..
            } => which(label("destination_workload"), primary, canary),
            MeshSeries::Nginx { ingress, .. } => {
                let ingress_label = label("ingress");
                if !label("canary").is_empty() || ingress_label == format!("{ingress}-canary") {
                    Some(Arm::Canary)
                } else if ingress_label == ingress {
                    Some(Arm::Stable)
                } else {
                    None
                }
            }
            MeshSeries::Envoy {
                namespace,
                primary,
                canary,
            } => {
                // `<namespace>_<service>_<port>`; a port name may not hold `_`.
                let service = label("envoy_cluster_name")
                    .strip_prefix(&format!("{namespace}_"))
                    .and_then(|rest| rest.rsplit_once('_'))
                    .map(|(service, _port)| service)?;
                which(service, primary, canary)
            }
            MeshSeries::Coalmine { .. } => which(label("version"), "stable", "canary"),
            MeshSeries::FlagVariants { stable, canary, .. } => {
                which(label("variant"), stable, canary)
            }
        }
    }
}

/// A label value inside double quotes.
fn escape(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"")
}

/// A name matched literally inside a regular expression (Kubernetes names may hold `.`).
fn regex_quote(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The query Flagger's observer runs for built-in check `name` (`request-success-rate`,
/// `request-duration`) on this provider's canary, rendered with the check's `interval`; `None`
/// for a name that is not one of them. Flagger's shapes: `pkg/metrics/observers/istio.go`,
/// `nginx.go` and `contour.go` (Flagger has no Gateway API observer; its Gateway API guide
/// uses the Contour queries as templates); for Coalmine's routers, the same shapes on the
/// seed's series. Flagger's templates are spread over lines; these are the same queries on one.
pub fn flagger_builtin_query(
    series: &MeshSeries,
    name: &str,
    interval: Duration,
) -> Option<String> {
    let i = promql_duration(interval);
    let success_rate = |counter: &str, selector: &str, status: &str| {
        format!(
            r#"sum(rate({counter}{{{selector},{status}!~"5.*"}}[{i}])) / sum(rate({counter}{{{selector}}}[{i}])) * 100"#
        )
    };
    let p99 = |buckets: &str, selector: &str| {
        format!(r#"histogram_quantile(0.99, sum(rate({buckets}{{{selector}}}[{i}])) by (le))"#)
    };
    let query = match (series, name) {
        (
            MeshSeries::Istio {
                namespace, canary, ..
            },
            _,
        ) => {
            let selector = format!(
                r#"reporter="destination",destination_workload_namespace="{namespace}",destination_workload=~"{canary}""#
            );
            match name {
                BUILTIN_SUCCESS_RATE => {
                    success_rate("istio_requests_total", &selector, "response_code")
                }
                BUILTIN_DURATION => p99("istio_request_duration_milliseconds_bucket", &selector),
                _ => return None,
            }
        }
        (MeshSeries::Nginx { namespace, ingress }, _) => {
            let selector = format!(r#"namespace="{namespace}",ingress="{ingress}""#);
            match name {
                BUILTIN_SUCCESS_RATE => {
                    success_rate("nginx_ingress_controller_requests", &selector, "status")
                }
                // Flagger's NGINX duration is the mean upstream latency, not a quantile.
                BUILTIN_DURATION => format!(
                    "sum(rate(nginx_ingress_controller_ingress_upstream_latency_seconds_sum{{{selector}}}[{i}])) / sum(rate(nginx_ingress_controller_ingress_upstream_latency_seconds_count{{{selector}}}[{i}])) * 1000"
                ),
                _ => return None,
            }
        }
        (
            MeshSeries::Envoy {
                namespace, canary, ..
            },
            _,
        ) => {
            let selector = format!(r#"envoy_cluster_name=~"{namespace}_{canary}_[0-9a-zA-Z-]+""#);
            match name {
                BUILTIN_SUCCESS_RATE => success_rate(
                    "envoy_cluster_upstream_rq",
                    &selector,
                    "envoy_response_code",
                ),
                BUILTIN_DURATION => p99("envoy_cluster_upstream_rq_time_bucket", &selector),
                _ => return None,
            }
        }
        (MeshSeries::Coalmine { matchers }, _) => {
            let matchers = matchers.trim().trim_end_matches(',');
            let selector = if matchers.is_empty() {
                r#"version="canary""#.to_string()
            } else {
                format!(r#"{matchers},version="canary""#)
            };
            match name {
                BUILTIN_SUCCESS_RATE => success_rate("http_requests_total", &selector, "status"),
                BUILTIN_DURATION => format!(
                    "{} * 1000",
                    p99("http_request_duration_seconds_bucket", &selector)
                ),
                _ => return None,
            }
        }
        // Flagger has no queries of an app's flag series: the built-ins read the counts.
        (MeshSeries::FlagVariants { .. }, _) => return None,
    };
    Some(query)
}

/// Go's duration syntax as PromQL accepts it: whole units, or milliseconds.
fn promql_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        coalmine_spec::format_duration(d)
    } else {
        format!("{}ms", d.as_millis().max(1))
    }
}

/// Makes a rollout's built-in `request-success-rate` and `request-duration` checks (its
/// `spec.analysis.metrics`) ask `server` Flagger's queries for `series`
/// ([`flagger_builtin_query`]), so they read what Flagger would. A duration is read in whole
/// milliseconds, as Flagger truncates it. `kayenta-score` stays on the counts.
pub fn with_builtin_queries(checks: &mut [MetricCheck], server: &Provider, series: &MeshSeries) {
    for check in checks {
        if !check.is_builtin() {
            continue;
        }
        let Some(query) = flagger_builtin_query(series, &check.name, check.window()) else {
            continue;
        };
        check.query = Some(if check.name == BUILTIN_DURATION {
            format!("floor({query})")
        } else {
            query
        });
        check.provider = Some(server.clone());
    }
}

/// Opens the source that reads `series` from the Prometheus `server` (a provider of type
/// `prometheus`: address, headers, timeout, `insecureSkipVerify`). Nothing is asked yet: the
/// first sample only starts counting.
pub fn open(
    server: &Provider,
    series: MeshSeries,
) -> Result<Box<dyn ObservationSource>, Unrunnable> {
    Ok(Box::new(PrometheusSource::new(server, series)?))
}

/// Both versions' counts from a traffic provider's series in Prometheus.
pub struct PrometheusSource {
    providers: Providers,
    server: Provider,
    series: MeshSeries,
    counters: SeriesCounters,
    pairing: Pairing,
    /// When the last sample was asked (unix seconds); `None` before the first.
    asked_at: Option<f64>,
    /// The newest scrape of the request counter the last sample saw (unix seconds).
    newest: Option<f64>,
}

impl PrometheusSource {
    pub fn new(server: &Provider, series: MeshSeries) -> Result<PrometheusSource, Unrunnable> {
        if server.kind != PROMETHEUS || server.address.as_deref().unwrap_or_default().is_empty() {
            return Err(Unrunnable {
                field: "metricsServer".into(),
                message: "the traffic provider's series are read from Prometheus: give its address"
                    .into(),
            });
        }
        Ok(PrometheusSource {
            providers: Providers::for_provider(server),
            server: server.clone(),
            series,
            counters: SeriesCounters::default(),
            pairing: Pairing::default(),
            asked_at: None,
            newest: None,
        })
    }

    /// How far behind the traffic the last sample's counts were: its time minus the newest
    /// scrape of the request counter it saw. `None` before a sample that saw one.
    pub fn lag(&self) -> Option<Duration> {
        Some(Duration::from_secs_f64(
            (self.asked_at? - self.newest?).max(0.0),
        ))
    }

    /// The newest scrape of the request counter the last sample saw (unix seconds): its
    /// version's counts reach up to it.
    pub fn counted_up_to(&self) -> Option<f64> {
        self.newest
    }

    /// Raw samples of `selector` since the last sample (the last five minutes' for the
    /// first).
    async fn raw(&self, selector: &str, now: f64) -> Result<Vec<Raw>, ObserveError> {
        // A range selector gives the samples themselves with their scrape times (an instant
        // query would stamp each with the query's time).
        let secs = match self.asked_at {
            None => BASELINE_LOOKBACK_SECS,
            Some(before) => (now - before).max(0.0).ceil() as u64 + LOOKBACK_MARGIN_SECS,
        };
        let query = format!("{selector}[{secs}s]");
        let data = self
            .providers
            .prometheus_data(&self.server, &query, now)
            .await
            .map_err(|e| match e {
                QueryError::Unreachable(reason) => ObserveError::Unreachable(reason),
                QueryError::Failed(reason) => ObserveError::Unreadable(reason),
            })?;
        raw_series(&data).map_err(|reason| {
            ObserveError::Unreadable(format!(
                "{}: {reason}",
                coalmine_spec::redact::url(self.server.address.as_deref().unwrap_or_default())
            ))
        })
    }
}

impl ObservationSource for PrometheusSource {
    fn sample(&mut self) -> BoxFuture<'_, Result<Sample, ObserveError>> {
        Box::pin(async move {
            let now = unix_now();
            let (requests, buckets) = (self.series.requests(), self.series.buckets());
            let (requests, buckets) =
                tokio::join!(self.raw(&requests, now), self.raw(&buckets, now));
            let (requests, buckets) = (requests?, buckets?);
            let newest = requests
                .iter()
                .filter_map(|s| s.samples.last().map(|(t, _)| *t))
                .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
            self.newest = newest;
            let first = self.asked_at.replace(now).is_none();
            if first {
                self.counters.since = now;
            }
            if first {
                self.counters.start(requests.into_iter().chain(buckets));
                return Ok(Sample::default());
            }
            let requests = self.counters.advance(requests);
            let buckets = self.counters.advance(buckets);
            let step = step_counts(&self.series, &requests, &buckets);
            Ok(Sample {
                counts: self.pairing.step(step, now),
                restarted: false,
            })
        })
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// One series' samples as Prometheus returned them, oldest first.
#[derive(Debug, Clone, PartialEq)]
struct Raw {
    labels: BTreeMap<String, String>,
    /// (unix seconds, value)
    samples: Vec<(f64, f64)>,
}

/// The series of an instant vector (one sample each) or a range vector (raw samples).
fn raw_series(data: &Value) -> Result<Vec<Raw>, String> {
    let kind = data["resultType"].as_str().unwrap_or_default();
    let Some(result) = data["result"].as_array() else {
        return Err("the answer has no result list".into());
    };
    let sample = |v: &Value| -> Result<(f64, f64), String> {
        let t = v[0].as_f64();
        let value = v[1].as_str().and_then(|s| s.parse::<f64>().ok());
        match (t, value) {
            (Some(t), Some(value)) => Ok((t, value)),
            _ => Err(format!("{v} is not a sample")),
        }
    };
    result
        .iter()
        .map(|series| {
            let labels = series["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let samples = match kind {
                "vector" => vec![sample(&series["value"])?],
                "matrix" => series["values"]
                    .as_array()
                    .map(|values| values.iter().map(sample).collect::<Result<Vec<_>, _>>())
                    .transpose()?
                    .unwrap_or_default(),
                other => return Err(format!("a {other:?} result where series were asked for")),
            };
            Ok(Raw { labels, samples })
        })
        .collect()
}

/// Every series' last sample seen: what its next samples are counted from.
#[derive(Debug, Default)]
struct SeriesCounters {
    last: HashMap<BTreeMap<String, String>, (f64, f64)>,
    /// When counting began (unix seconds): a series first seen with a sample after it is new
    /// (a new pod, a first 503) and counts from zero; one seen with an older sample only starts
    /// being counted.
    since: f64,
}

impl SeriesCounters {
    /// Starts counting from each series' last sample.
    fn start(&mut self, series: impl IntoIterator<Item = Raw>) {
        for Raw { labels, samples } in series {
            if let Some(last) = samples.last() {
                self.last.insert(labels, *last);
            }
        }
    }

    /// Each series' increase since it was last seen, as `increase()` adds it up without
    /// extrapolating: a drop is a reset, after which the new value is all that was counted.
    fn advance(&mut self, series: Vec<Raw>) -> Vec<(BTreeMap<String, String>, f64)> {
        let mut out = Vec::with_capacity(series.len());
        for Raw { labels, samples } in series {
            let mut increase = 0.0;
            let mut last = self.last.get(&labels).copied();
            for (t, value) in samples {
                let before = match last {
                    Some((seen, _)) if t <= seen => continue,
                    Some((_, before)) => before,
                    None if t <= self.since => value,
                    None => 0.0,
                };
                increase += if value < before {
                    value
                } else {
                    value - before
                };
                last = Some((t, value));
            }
            if let Some(last) = last {
                self.last.insert(labels.clone(), last);
            }
            out.push((labels, increase));
        }
        out
    }
}

/// Steps held while only one version's series advanced.
#[derive(Debug, Default)]
struct Pairing {
    held: Observation,
    /// When holding began (unix seconds).
    since: Option<f64>,
}

impl Pairing {
    /// The counts to hand on at `now`: the held ones and this step's, once both versions have
    /// requests in them (or neither has, or they were held for [`PAIRING_HOLD_SECS`]).
    fn step(&mut self, counts: Observation, now: f64) -> Observation {
        self.held.canary.add(&counts.canary);
        self.held.stable.add(&counts.stable);
        let one_sided = (self.held.canary.requests == 0) != (self.held.stable.requests == 0);
        let since = *self.since.get_or_insert(now);
        if one_sided && now - since < PAIRING_HOLD_SECS {
            return Observation::default();
        }
        self.since = None;
        std::mem::take(&mut self.held)
    }
}

/// Both versions' counts from their series' increases over one step.
fn step_counts(
    series: &MeshSeries,
    requests: &[(BTreeMap<String, String>, f64)],
    buckets: &[(BTreeMap<String, String>, f64)],
) -> Observation {
    #[derive(Default)]
    struct Tally {
        requests: f64,
        failures: f64,
        /// `le` (as written) → cumulative count.
        buckets: BTreeMap<String, f64>,
    }
    let mut tallies = [Tally::default(), Tally::default()];
    let index = |arm: Arm| usize::from(arm == Arm::Canary);
    for (labels, increase) in requests {
        let Some(arm) = series.arm(labels) else {
            continue;
        };
        let tally = &mut tallies[index(arm)];
        tally.requests += increase;
        let status = labels.get(series.status_label()).map(String::as_str);
        if status.is_some_and(|s| s.starts_with('5')) {
            tally.failures += increase;
        }
    }
    for (labels, increase) in buckets {
        let (Some(arm), Some(le)) = (series.arm(labels), labels.get("le")) else {
            continue;
        };
        *tallies[index(arm)].buckets.entry(le.clone()).or_default() += increase;
    }
    let [stable, canary] = tallies.map(|t| {
        let requests = t.requests.round() as u64;
        Counts {
            requests,
            server_errors: (t.failures.round() as u64).min(requests),
            latency: latency(&t.buckets, series.le_micros()),
        }
    });
    Observation {
        canary,
        stable,
        ..Observation::default()
    }
}

/// A histogram's cumulative bucket counts (`le` → count) as latencies in microseconds: each
/// bucket's count spread evenly over the bucket, the first from zero, those above the highest
/// finite bound at that bound (where `histogram_quantile()` puts them).
fn latency(buckets: &BTreeMap<String, f64>, le_micros: f64) -> BTreeMap<u64, u64> {
    let mut bounds: Vec<(f64, f64)> = buckets
        .iter()
        .filter_map(|(le, n)| Some((le.parse::<f64>().ok()?, *n)))
        .filter(|(le, _)| !le.is_nan())
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out = BTreeMap::new();
    let (mut below, mut lower) = (0.0, 0.0);
    for (le, cumulative) in bounds {
        let n = (cumulative - below).round().max(0.0) as u64;
        below = below.max(cumulative);
        if le.is_infinite() {
            if n > 0 {
                *out.entry((lower * le_micros).round() as u64).or_default() += n;
            }
            continue;
        }
        spread(&mut out, lower * le_micros, le * le_micros, n);
        lower = le;
    }
    out
}

/// `n` latencies spread evenly over (`low`, `high`] microseconds.
fn spread(latency: &mut BTreeMap<u64, u64>, low: f64, high: f64, n: u64) {
    let points = n.min(SPREAD_POINTS);
    for j in 0..points {
        let at = low + (high - low) * (j + 1) as f64 / points as f64;
        // Up to each point, its share of `n` (rounded): remainders spread evenly too.
        let upto = |k: u64| (n * k + points / 2) / points;
        let share = upto(j + 1) - upto(j);
        *latency.entry(at.round() as u64).or_default() += share;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_judge::Reading;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn raw(pairs: &[(&str, &str)], samples: &[(f64, f64)]) -> Raw {
        Raw {
            labels: labels(pairs),
            samples: samples.to_vec(),
        }
    }

    #[test]
    fn increases_skip_what_was_counted_and_restart_after_a_reset() {
        let mut c = SeriesCounters {
            since: 100.0,
            ..SeriesCounters::default()
        };
        let a = [("pod", "a")];
        // The baseline: the last value so far, not this rollout's.
        c.start(vec![raw(&a, &[(98.0, 900.0), (99.0, 1000.0)])]);
        // Overlapping lookbacks: 99 is skipped; 1000 → 1010 → (restart) 4 → 9.
        let step = c.advance(vec![raw(
            &a,
            &[(99.0, 1000.0), (101.0, 1010.0), (102.0, 4.0), (103.0, 9.0)],
        )]);
        assert_eq!(step[0].1, 10.0 + 4.0 + 5.0);
        assert_eq!(c.advance(vec![raw(&a, &[(103.0, 9.0)])])[0].1, 0.0);
        // A series born after counting began (a new pod, a first 503) counts from zero.
        let b = [("pod", "b")];
        assert_eq!(c.advance(vec![raw(&b, &[(104.0, 3.0)])])[0].1, 3.0);
        // One first seen with a sample from before counting began (stored late) only starts.
        let late = [("pod", "late")];
        assert_eq!(
            c.advance(vec![raw(&late, &[(99.5, 70.0), (104.0, 72.0)])])[0].1,
            2.0
        );
    }

    #[test]
    fn a_step_with_one_versions_requests_waits_for_the_others() {
        let counts = |canary: u64, stable: u64| {
            let mut o = Observation::default();
            o.canary.requests = canary;
            o.stable.requests = stable;
            o
        };
        let mut p = Pairing::default();
        // The canary's pods were scraped in this step, the primary's not yet.
        assert_eq!(p.step(counts(10, 0), 0.0), Observation::default());
        assert_eq!(p.step(counts(0, 0), 1.0), Observation::default());
        assert_eq!(p.step(counts(5, 40), 2.0), counts(15, 40));
        assert_eq!(p.step(counts(0, 0), 3.0), Observation::default());
        // A version without traffic holds the other's no longer than PAIRING_HOLD_SECS.
        assert_eq!(p.step(counts(0, 7), 4.0), Observation::default());
        assert_eq!(p.step(counts(0, 3), 4.0 + PAIRING_HOLD_SECS), counts(0, 10));
    }

    #[test]
    fn istio_series_are_told_apart_by_workload_and_status() {
        let series = MeshSeries::istio("test", "podinfo");
        let req = |workload: &str, code: &str, n: f64| {
            (
                labels(&[("destination_workload", workload), ("response_code", code)]),
                n,
            )
        };
        let bucket = |workload: &str, le: &str, n: f64| {
            (labels(&[("destination_workload", workload), ("le", le)]), n)
        };
        let obs = step_counts(
            &series,
            &[
                req("podinfo", "200", 95.0),
                req("podinfo", "503", 5.0),
                req("podinfo-primary", "200", 1000.0),
                req("other", "500", 7.0),
            ],
            &[
                bucket("podinfo", "10", 50.0),
                bucket("podinfo", "25", 95.0),
                bucket("podinfo", "50", 100.0),
                bucket("podinfo", "+Inf", 100.0),
            ],
        );
        assert_eq!((obs.canary.requests, obs.canary.server_errors), (100, 5));
        assert_eq!((obs.stable.requests, obs.stable.server_errors), (1000, 0));
        // histogram_quantile(0.99) = 25 + 25 · (99 − 95) / 5 = 45 ms; spread over 5 points,
        // the nearest rank lands on the same point.
        assert_eq!(
            obs.canary.latency_quantile_ms(0.99),
            Reading::Value { value: 45.0 }
        );
        assert_eq!(obs.canary.latency.values().sum::<u64>(), 100);
    }

    #[test]
    fn nginx_envoy_and_coalmine_versions() {
        let nginx = MeshSeries::nginx("test", "podinfo");
        let l = |pairs: &[(&str, &str)]| labels(pairs);
        assert_eq!(
            nginx.arm(&l(&[("ingress", "podinfo"), ("canary", "")])),
            Some(Arm::Stable)
        );
        assert_eq!(
            nginx.arm(&l(&[
                ("ingress", "podinfo"),
                ("canary", "test-podinfo-canary-80")
            ])),
            Some(Arm::Canary)
        );
        assert_eq!(
            nginx.arm(&l(&[("ingress", "podinfo-canary")])),
            Some(Arm::Canary)
        );
        let envoy = MeshSeries::gateway_api("test", "podinfo");
        assert_eq!(
            envoy.arm(&l(&[("envoy_cluster_name", "test_podinfo-canary_9898")])),
            Some(Arm::Canary)
        );
        assert_eq!(
            envoy.arm(&l(&[("envoy_cluster_name", "test_podinfo-primary_http")])),
            Some(Arm::Stable)
        );
        assert_eq!(
            envoy.arm(&l(&[("envoy_cluster_name", "test_podinfo_9898")])),
            None
        );
        let coalmine = MeshSeries::coalmine(r#"service="payment-service""#);
        assert_eq!(
            coalmine.arm(&l(&[("version", "canary")])),
            Some(Arm::Canary)
        );
        assert_eq!(
            coalmine.requests(),
            r#"http_requests_total{service="payment-service",version=~"stable|canary"}"#
        );
        assert_eq!(
            MeshSeries::istio("a.b", "web.v2").matchers(),
            r#"reporter="destination",destination_workload_namespace="a.b",destination_workload=~"web\\.v2-primary|web\\.v2""#
        );
    }

    #[test]
    fn flagger_queries_are_rendered_with_the_checks_interval() {
        let istio = MeshSeries::istio("test", "podinfo");
        assert_eq!(
            flagger_builtin_query(&istio, BUILTIN_SUCCESS_RATE, Duration::from_secs(60)).unwrap(),
            r#"sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="test",destination_workload=~"podinfo",response_code!~"5.*"}[1m])) / sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="test",destination_workload=~"podinfo"}[1m])) * 100"#
        );
        assert_eq!(
            flagger_builtin_query(&istio, BUILTIN_DURATION, Duration::from_secs(30)).unwrap(),
            r#"histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter="destination",destination_workload_namespace="test",destination_workload=~"podinfo"}[30s])) by (le))"#
        );
        let envoy = MeshSeries::gateway_api("test", "podinfo");
        assert!(
            flagger_builtin_query(&envoy, BUILTIN_SUCCESS_RATE, Duration::from_secs(60))
                .unwrap()
                .contains(r#"envoy_cluster_name=~"test_podinfo-canary_[0-9a-zA-Z-]+",envoy_response_code!~"5.*""#)
        );
        assert!(flagger_builtin_query(
            &MeshSeries::nginx("test", "podinfo"),
            BUILTIN_DURATION,
            Duration::from_millis(1500)
        )
        .unwrap()
        .contains("upstream_latency_seconds_sum{namespace=\"test\",ingress=\"podinfo\"}[1500ms]"));
        assert_eq!(
            flagger_builtin_query(&istio, "kayenta-score", Duration::from_secs(60)),
            None
        );
    }

    #[test]
    fn built_in_checks_become_flaggers_queries_and_others_stay() {
        let check =
            |doc: serde_json::Value| -> MetricCheck { serde_json::from_value(doc).unwrap() };
        let mut checks = vec![
            check(
                serde_json::json!({"name": "request-success-rate", "interval": "30s", "thresholdRange": {"min": 99}}),
            ),
            check(serde_json::json!({"name": "request-duration", "thresholdRange": {"max": 500}})),
            check(serde_json::json!({"name": "kayenta-score"})),
            check(serde_json::json!({"name": "error-rate", "templateRef": {"name": "error-rate"}})),
        ];
        let server = Provider {
            kind: PROMETHEUS.into(),
            address: Some("http://prometheus:9090".into()),
            ..Provider::default()
        };
        let series = MeshSeries::istio("test", "podinfo");
        with_builtin_queries(&mut checks, &server, &series);
        assert_eq!(
            checks[0].query,
            flagger_builtin_query(&series, BUILTIN_SUCCESS_RATE, Duration::from_secs(30))
        );
        assert_eq!(checks[0].provider.as_ref(), Some(&server));
        assert!(!checks[0].is_builtin());
        let duration = checks[1].query.as_deref().unwrap();
        assert!(
            duration.starts_with("floor(histogram_quantile(0.99,") && duration.contains("[1m]"),
            "{duration}"
        );
        assert!(checks[2].is_builtin() && checks[2].provider.is_none());
        assert!(checks[3].query.is_none() && checks[3].provider.is_none());
    }

    #[test]
    fn a_source_needs_a_prometheus_address() {
        let server = Provider {
            kind: PROMETHEUS.into(),
            ..Provider::default()
        };
        assert!(open(&server, MeshSeries::istio("a", "b")).is_err());
    }

    #[tokio::test]
    async fn prometheus_out_of_reach_is_no_sample_and_names_no_secret() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The listener is dropped: nothing answers on the port.
        let server = Provider {
            kind: PROMETHEUS.into(),
            address: Some(format!("http://user:hunter2@127.0.0.1:{port}")),
            timeout: Some(coalmine_spec::Dur(Duration::from_secs(2))),
            ..Provider::default()
        };
        let mut source = open(&server, MeshSeries::istio("test", "podinfo")).unwrap();
        match source.sample().await {
            Err(ObserveError::Unreachable(reason)) => {
                assert!(!reason.contains("hunter2"), "{reason}");
                assert!(reason.contains(&port.to_string()), "{reason}");
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
}
