//! How the counts are shown: the `/stats` document (the contract's [`StatsDoc`]) and the
//! Prometheus text exposition. Both read one [`Snapshot`], summed over workers on each scrape.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use coalmine_contract::{
    Latency, LocalStats, MirrorPairs, MirrorStats, ServiceStats, StatsDoc, VersionStats,
};
use hdrhistogram::Histogram;

use crate::recorder::{
    Metrics, PairsSnapshot, ServiceSnapshot, Snapshot, UpstreamFailure, VersionSnapshot,
    HDR_SIGFIG, LATENCY_BUCKETS,
};
use crate::route::Version;
use crate::table::RouteTable;

impl VersionSnapshot {
    fn stats(&self) -> VersionStats {
        VersionStats {
            requests: self.count,
            statuses: self.statuses.clone(),
            failures: UpstreamFailure::ALL
                .iter()
                .map(|f| (f.as_str().to_string(), self.failures[*f as usize]))
                .collect(),
            retries: self.retries,
            latency: latency_doc(&self.latency, self.sum_micros),
        }
    }
}

/// A histogram as `/stats` shows it: hdrhistogram buckets as `[microseconds, count]` pairs.
fn latency_doc(latency: &Histogram<u64>, sum_micros: u64) -> Latency {
    Latency {
        unit: "microseconds".to_string(),
        significant_digits: HDR_SIGFIG,
        sum_micros,
        counts: latency
            .iter_recorded()
            .map(|it| {
                (
                    latency.highest_equivalent(it.value_iterated_to()),
                    it.count_at_value(),
                )
            })
            .collect(),
    }
}

impl crate::recorder::MirrorSnapshot {
    fn stats(&self) -> MirrorStats {
        MirrorStats {
            requests: self.requests,
            statuses: self.statuses.clone(),
            failed: self.failed,
            dropped: self.dropped,
            skipped_with_body: self.skipped_with_body,
            skipped_unsafe_method: self.skipped_unsafe_method,
            latency: latency_doc(&self.latency, 0),
            pairs: self.pairs.stats(),
        }
    }
}

/// Each latency bucket's lower bound in microseconds, from 0: the bounds a latency difference
/// is counted "more than".
fn difference_bounds() -> impl Iterator<Item = u64> {
    std::iter::once(0).chain(LATENCY_BUCKETS.iter().map(|b| (b * 1e6).round() as u64))
}

impl PairsSnapshot {
    fn stats(&self) -> MirrorPairs {
        // Bucket i holds differences in (bound i, bound i+1]: "more than bound k" is the sum
        // of the buckets from k on.
        let more_than = |by: &[u64]| -> Vec<(u64, u64)> {
            difference_bounds()
                .enumerate()
                .map(|(k, bound)| (bound, by[k..].iter().sum()))
                .collect()
        };
        MirrorPairs {
            both_ok: self.outcomes[0][0],
            canary_only_failed: self.outcomes[0][1],
            stable_only_failed: self.outcomes[1][0],
            both_failed: self.outcomes[1][1],
            unpaired: self.unpaired,
            canary_slower_by: more_than(&self.slower),
            canary_faster_by: more_than(&self.faster),
        }
    }
}

impl ServiceSnapshot {
    fn stats(&self) -> ServiceStats {
        ServiceStats {
            stable: self.versions[0].stats(),
            canary: self.versions[1].stats(),
            mirror: self.mirror.stats(),
        }
    }
}

impl Snapshot {
    /// `/stats/{service}` (`all`: `/stats`, the service's counts at the top and every
    /// service's in `services`). A service without counts shows zeros.
    pub fn stats_doc(
        &self,
        metrics: &Metrics,
        generation: u64,
        service: &str,
        all: bool,
    ) -> StatsDoc {
        let counts = self
            .services
            .get(service)
            .map(ServiceSnapshot::stats)
            .unwrap_or_default();
        StatsDoc {
            instance: metrics.instance.clone(),
            started_unix_ms: metrics.started_unix_ms,
            generation,
            service: service.to_string(),
            stable: counts.stable,
            canary: counts.canary,
            mirror: counts.mirror,
            router: LocalStats {
                local_failures: self
                    .local_failures
                    .iter()
                    .map(|(reason, n)| (reason.to_string(), *n))
                    .collect(),
                accept_errors: self.accept_errors,
            },
            services: if all {
                self.services
                    .iter()
                    .map(|(name, s)| (name.clone(), s.stats()))
                    .collect()
            } else {
                Default::default()
            },
        }
    }

    /// The Prometheus text exposition (format 0.0.4). The two seed metrics carry exactly the
    /// labels the seed's PromQL uses (`service`, `version`, `status`); everything of the
    /// router's own is `coalmine_router_*`. Every per-version series carries its service.
    pub fn prometheus_text(&self, metrics: &Metrics, table: &RouteTable) -> String {
        let mut out = Exposition::default();
        let versions = || {
            self.services.iter().flat_map(|(service, s)| {
                Version::ALL
                    .into_iter()
                    .map(move |v| (service.as_str(), v, &s.versions[v.index()]))
            })
        };
        out.family(
            "http_requests_total",
            "HTTP requests answered, by service, version and status code.",
            "counter",
        );
        for (service, version, v) in versions() {
            for (status, n) in &v.statuses {
                let status = status.to_string();
                out.sample(
                    "http_requests_total",
                    &[
                        ("service", service),
                        ("version", version.as_str()),
                        ("status", &status),
                    ],
                    *n,
                );
            }
        }
        out.family(
            "http_request_duration_seconds",
            "Time from receiving a request to receiving the upstream's response head.",
            "histogram",
        );
        for (service, version, v) in versions() {
            let labels = [("service", service), ("version", version.as_str())];
            let mut cumulative = 0;
            for (bound, n) in LATENCY_BUCKETS.iter().zip(v.buckets) {
                cumulative += n;
                let le = bound.to_string();
                out.sample(
                    "http_request_duration_seconds_bucket",
                    &[labels[0], labels[1], ("le", &le)],
                    cumulative,
                );
            }
            out.sample(
                "http_request_duration_seconds_bucket",
                &[labels[0], labels[1], ("le", "+Inf")],
                v.count,
            );
            out.sample(
                "http_request_duration_seconds_sum",
                &labels,
                v.sum_micros as f64 / 1e6,
            );
            out.sample("http_request_duration_seconds_count", &labels, v.count);
        }
        out.family(
            "coalmine_router_upstream_failures_total",
            "Requests the upstream failed, by kind: connect, timeout and protocol were answered 502/504 by the router; body broke off after its head (counted as 502).",
            "counter",
        );
        for (service, version, v) in versions() {
            for f in UpstreamFailure::ALL {
                out.sample(
                    "coalmine_router_upstream_failures_total",
                    &[
                        ("service", service),
                        ("version", version.as_str()),
                        ("kind", f.as_str()),
                    ],
                    v.failures[f as usize],
                );
            }
        }
        out.family(
            "coalmine_router_upstream_retries_total",
            "Requests sent again on a new upstream connection after a kept-alive one failed them before any answer (only requests that cannot have been processed, or idempotent ones).",
            "counter",
        );
        for (service, version, v) in versions() {
            out.sample(
                "coalmine_router_upstream_retries_total",
                &[("service", service), ("version", version.as_str())],
                v.retries,
            );
        }
        out.family(
            "coalmine_router_local_failures_total",
            "Requests the router failed on its own account (out of descriptors, memory or local ports), never counted against a version.",
            "counter",
        );
        for (reason, n) in &self.local_failures {
            out.sample(
                "coalmine_router_local_failures_total",
                &[("reason", reason)],
                *n,
            );
        }
        out.family(
            "coalmine_router_accept_errors_total",
            "Client connections the listener could not accept for want of descriptors or memory.",
            "counter",
        );
        out.sample(
            "coalmine_router_accept_errors_total",
            &[],
            self.accept_errors,
        );
        out.family(
            "coalmine_router_mirror_requests_total",
            "Mirrored copies answered by the canary, by service and status code.",
            "counter",
        );
        for (service, s) in &self.services {
            for (status, n) in &s.mirror.statuses {
                out.sample(
                    "coalmine_router_mirror_requests_total",
                    &[("service", service), ("status", &status.to_string())],
                    *n,
                );
            }
        }
        out.family(
            "coalmine_router_mirror_failures_total",
            "Mirrored copies that got no response.",
            "counter",
        );
        for (service, s) in &self.services {
            out.sample(
                "coalmine_router_mirror_failures_total",
                &[("service", service)],
                s.mirror.failed,
            );
        }
        out.family(
            "coalmine_router_mirror_dropped_total",
            "Requests not mirrored, by reason: the concurrency limit was reached, they had a body, or their method was not safe.",
            "counter",
        );
        for (service, s) in &self.services {
            out.sample(
                "coalmine_router_mirror_dropped_total",
                &[("service", service), ("reason", "concurrency")],
                s.mirror.dropped,
            );
            out.sample(
                "coalmine_router_mirror_dropped_total",
                &[("service", service), ("reason", "body")],
                s.mirror.skipped_with_body,
            );
            out.sample(
                "coalmine_router_mirror_dropped_total",
                &[("service", service), ("reason", "method")],
                s.mirror.skipped_unsafe_method,
            );
        }
        out.family(
            "coalmine_router_mirror_pairs_total",
            "Mirrored requests paired with stable's answer to the same request, by whether each failed (5xx).",
            "counter",
        );
        let class = |failed: usize| if failed == 1 { "error" } else { "ok" };
        for (service, s) in &self.services {
            for (stable, row) in s.mirror.pairs.outcomes.iter().enumerate() {
                for (canary, n) in row.iter().enumerate() {
                    let labels = [
                        ("service", service.as_str()),
                        ("stable", class(stable)),
                        ("canary", class(canary)),
                    ];
                    out.sample("coalmine_router_mirror_pairs_total", &labels, *n);
                }
            }
        }
        out.family(
            "coalmine_router_mirror_unpaired_total",
            "Mirrored requests not paired because one side failed on the router's or the client's account.",
            "counter",
        );
        for (service, s) in &self.services {
            out.sample(
                "coalmine_router_mirror_unpaired_total",
                &[("service", service)],
                s.mirror.pairs.unpaired,
            );
        }
        out.family(
            "coalmine_router_mirror_pair_latency_difference_total",
            "Pairs both answered well, by whether the canary's copy was answered later or sooner than stable answered the user, by more than `more_than` seconds.",
            "counter",
        );
        for (service, s) in &self.services {
            let doc = s.mirror.pairs.stats();
            for (canary, by) in [
                ("slower", &doc.canary_slower_by),
                ("faster", &doc.canary_faster_by),
            ] {
                for (bound, n) in by {
                    let more_than = (*bound as f64 / 1e6).to_string();
                    let labels = [
                        ("service", service.as_str()),
                        ("canary", canary),
                        ("more_than", more_than.as_str()),
                    ];
                    out.sample(
                        "coalmine_router_mirror_pair_latency_difference_total",
                        &labels,
                        *n,
                    );
                }
            }
        }
        out.family(
            "coalmine_router_canary_weight_ratio",
            "Share of unmatched traffic sent to the canary (0 to 1), by service.",
            "gauge",
        );
        for service in &table.services {
            let doc = &service.doc;
            let ratio = if doc.canary.is_some() {
                doc.canary_weight.percent() / 100.0
            } else {
                0.0
            };
            out.sample(
                "coalmine_router_canary_weight_ratio",
                &[("service", &doc.service)],
                ratio,
            );
        }
        out.family(
            "coalmine_router_route_generation",
            "Generation of the route table in force.",
            "gauge",
        );
        out.sample("coalmine_router_route_generation", &[], table.generation);
        out.family(
            "coalmine_router_route_swaps_total",
            "Route tables swapped in through the admin API.",
            "counter",
        );
        out.sample(
            "coalmine_router_route_swaps_total",
            &[],
            metrics.route_swaps.load(Relaxed),
        );
        out.family(
            "coalmine_router_connections_accepted_total",
            "Client connections accepted.",
            "counter",
        );
        out.sample(
            "coalmine_router_connections_accepted_total",
            &[],
            metrics.connections_accepted.load(Relaxed),
        );
        out.family(
            "coalmine_router_requests_in_flight",
            "Requests being proxied right now.",
            "gauge",
        );
        out.sample("coalmine_router_requests_in_flight", &[], self.in_flight);
        out.text
    }
}

/// Writes the Prometheus text format. Kept here rather than in prometheus-client because that
/// crate only writes OpenMetrics, whose counter families (`# TYPE x counter` over `x_total`)
/// Debian's promtool 2.42 rejects in `promtool check metrics`.
#[derive(Default)]
pub struct Exposition {
    pub text: String,
}

impl Exposition {
    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<SampleValue>) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"");
                for ch in v.chars() {
                    match ch {
                        '\\' => self.text.push_str("\\\\"),
                        '"' => self.text.push_str("\\\""),
                        '\n' => self.text.push_str("\\n"),
                        c => self.text.push(c),
                    }
                }
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = match value.into() {
            SampleValue::Int(n) => writeln!(self.text, " {n}"),
            SampleValue::Float(f) if f.is_nan() => writeln!(self.text, " NaN"),
            SampleValue::Float(f) => writeln!(self.text, " {f}"),
        };
    }
}

pub enum SampleValue {
    Int(i128),
    Float(f64),
}

impl From<u64> for SampleValue {
    fn from(v: u64) -> Self {
        SampleValue::Int(v.into())
    }
}
impl From<i64> for SampleValue {
    fn from(v: i64) -> Self {
        SampleValue::Int(v.into())
    }
}
impl From<f64> for SampleValue {
    fn from(v: f64) -> Self {
        SampleValue::Float(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_workers_and_exposes_seed_metric_names_per_service() {
        let (m, _a, _b) = crate::recorder::two_workers_recorded();
        let docs = ["default", "cart", "idle"]
            .iter()
            .map(|s| {
                serde_json::from_value(serde_json::json!({
                    "service": s, "stable": "http://127.0.0.1:1", "canary": "http://127.0.0.1:2",
                    "canaryWeight": 5
                }))
                .unwrap()
            })
            .collect();
        let table = RouteTable::new(docs, 3, &m).unwrap();
        let s = m.snapshot(table.services.iter().map(|s| s.doc.service.as_str()));
        let text = s.prometheus_text(&m, &table);
        for line in [
            "http_requests_total{service=\"default\",version=\"stable\",status=\"200\"} 2\n",
            "http_requests_total{service=\"default\",version=\"canary\",status=\"502\"} 1\n",
            "http_requests_total{service=\"cart\",version=\"stable\",status=\"200\"} 1\n",
            "http_request_duration_seconds_bucket{service=\"default\",version=\"stable\",le=\"0.005\"} 1\n",
            "http_request_duration_seconds_bucket{service=\"default\",version=\"stable\",le=\"0.05\"} 2\n",
            "http_request_duration_seconds_count{service=\"default\",version=\"canary\"} 1\n",
            // A service of the table with no requests yet shows zeros, so rates start at once.
            "http_request_duration_seconds_count{service=\"idle\",version=\"canary\"} 0\n",
            "coalmine_router_upstream_failures_total{service=\"default\",version=\"canary\",kind=\"connect\"} 1\n",
            "coalmine_router_canary_weight_ratio{service=\"cart\"} 0.05\n",
            "coalmine_router_route_generation 3\n",
            "coalmine_router_mirror_pairs_total{service=\"default\",stable=\"ok\",canary=\"error\"} 1\n",
            "coalmine_router_mirror_pairs_total{service=\"cart\",stable=\"error\",canary=\"ok\"} 0\n",
            "coalmine_router_mirror_unpaired_total{service=\"default\"} 0\n",
            "coalmine_router_mirror_pair_latency_difference_total{service=\"default\",canary=\"slower\",more_than=\"0\"} 1\n",
            "coalmine_router_mirror_pair_latency_difference_total{service=\"default\",canary=\"slower\",more_than=\"0.005\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        let doc = s.stats_doc(&m, 3, "default", false);
        assert_eq!(doc.service, "default");
        assert_eq!(doc.stable.requests, 2);
        assert_eq!(doc.canary.failures["connect"], 1);
        assert_eq!(
            doc.stable.latency.counts.iter().map(|c| c.1).sum::<u64>(),
            2
        );
        let max = doc.stable.latency.counts.iter().map(|c| c.0).max().unwrap();
        assert!((29_700..=30_300).contains(&max), "{max}");
        assert!(doc.services.is_empty());
        let pairs = &doc.mirror.pairs;
        assert_eq!((pairs.both_ok, pairs.canary_only_failed), (1, 1));
        assert_eq!(pairs.canary_slower_by[0], (0, 1));
        assert_eq!(pairs.canary_slower_by[1], (1_000, 1));
        assert_eq!(pairs.canary_slower_by[3], (5_000, 0));
        let cart = s.stats_doc(&m, 3, "cart", false);
        assert_eq!((cart.stable.requests, cart.canary.requests), (1, 0));
        let all = s.stats_doc(&m, 3, "default", true);
        assert_eq!(all.stable, doc.stable);
        assert_eq!(all.services["cart"].stable.requests, 1);
        assert_eq!(all.services["idle"].stable.requests, 0);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.sample("x", &[("reason", "a\"b\\c\nd")], 1u64);
        out.sample("y", &[], f64::NAN);
        assert_eq!(out.text, "x{reason=\"a\\\"b\\\\c\\nd\"} 1\ny NaN\n");
    }
}
