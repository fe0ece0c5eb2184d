//! The routers' own counters of the rollout's service (`GET /stats/{service}`) as an observation
//! source: each sample is every router's counters, and a step is the difference from the sample
//! before, summed over routers.
//! A router that restarted in between (another start time) counts from zero; one whose
//! `instance` changed is reported as restarted, so the driver puts its routes back at once.
//! The canary's answers to mirrored copies count as its own (Flagger's dark launch judges a
//! mirrored canary on them), and each copy paired with stable's answer to the same request is
//! the step's `pairs` (Coalmine's dark launch judges on those).

use std::collections::BTreeMap;
use std::time::Duration;

use coalmine_contract::{MirrorPairs, StatsDoc, VersionStats, DEFAULT_SERVICE};
use coalmine_judge::{Counts, PairedBatch};
use coalmine_rollout::Observation;
use coalmine_spec::rollout::{HttpUrl, Rollout};

use super::{ObservationSource, ObserveError, Registration, Sample};
use crate::http::reqwest_reason;
use crate::{BoxFuture, Unrunnable};

pub const REGISTERED: Registration = Registration { takes, open };

fn takes(rollout: &Rollout) -> bool {
    !rollout.spec.routers.is_empty()
}

fn open(rollout: &Rollout) -> Result<Box<dyn ObservationSource>, Unrunnable> {
    Ok(Box::new(RouterStats {
        admins: rollout.spec.routers.clone(),
        service: rollout.spec.router_service().to_string(),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("a TLS-less client always builds"),
        counters: Counters::default(),
    }))
}

struct RouterStats {
    admins: Vec<HttpUrl>,
    /// The routers' service the rollout drives.
    service: String,
    client: reqwest::Client,
    counters: Counters,
}

impl RouterStats {
    /// Every router's `/stats/{service}`, in the order of `admins`, mirrored answers counted as the
    /// canary's.
    async fn read(&self) -> Result<Vec<StatsDoc>, ObserveError> {
        let mut out = Vec::with_capacity(self.admins.len());
        for admin in &self.admins {
            // The default service's are `/stats`, as routers served them before they had
            // services (see `traffic::routers::routes_path`).
            let url = if self.service == DEFAULT_SERVICE {
                format!("{admin}/stats")
            } else {
                format!("{admin}/stats/{}", self.service)
            };
            let resp = self
                .client
                .get(&url)
                .send()
                .await
                .map_err(|e| ObserveError::Unreachable(format!("{admin}: {}", reqwest_reason(&e))))?;
            if !resp.status().is_success() {
                return Err(ObserveError::Unreadable(format!(
                    "{url} answered {}",
                    resp.status()
                )));
            }
            let stats = resp.json::<StatsDoc>().await.map_err(|e| {
                ObserveError::Unreadable(format!("{url} is not a stats document: {e}"))
            })?;
            out.push(with_mirror_as_canary(stats));
        }
        Ok(out)
    }
}

impl ObservationSource for RouterStats {
    fn sample(&mut self) -> BoxFuture<'_, Result<Sample, ObserveError>> {
        Box::pin(async move {
            let stats = self.read().await?;
            Ok(self.counters.step(stats))
        })
    }
}

/// The canary's observations are its answers to real traffic and to mirrored copies alike
/// (Flagger's dark launch judges a mirrored canary on its own responses): the mirror's counts
/// are folded into the canary's. A copy that got no answer is a failure. The pairs stay.
fn with_mirror_as_canary(mut stats: StatsDoc) -> StatsDoc {
    let mut m = std::mem::take(&mut stats.mirror);
    stats.mirror.pairs = std::mem::take(&mut m.pairs);
    let c = &mut stats.canary;
    for (status, n) in &m.statuses {
        *c.statuses.entry(*status).or_default() += n;
        c.requests += n;
    }
    if m.failed > 0 {
        *c.statuses.entry(502).or_default() += m.failed;
        c.requests += m.failed;
    }
    c.latency.counts.extend(m.latency.counts);
    stats
}

/// Every router's counters at the last sample.
#[derive(Debug, Default)]
struct Counters {
    last: Option<Vec<StatsDoc>>,
}

impl Counters {
    /// The step from the last sample to `now`: each router's counters minus its counters then
    /// (from zero for a router that restarted), summed.
    fn step(&mut self, now: Vec<StatsDoc>) -> Sample {
        let instances = |stats: &[StatsDoc]| -> Vec<String> {
            stats.iter().map(|s| s.instance.clone()).collect()
        };
        let sample = match &self.last {
            None => Sample::default(),
            Some(before) => Sample {
                counts: Observation {
                    canary: between(before, &now, |s| &s.canary),
                    stable: between(before, &now, |s| &s.stable),
                    pairs: Box::new(pairs_between(before, &now)),
                },
                restarted: instances(before) != instances(&now),
            },
        };
        self.last = Some(now);
        sample
    }
}

/// One version's counts from the `before` sample to the `after` one, summed over routers. A
/// router that restarted in between (another start time) counts from zero.
fn between(
    before: &[StatsDoc],
    after: &[StatsDoc],
    version: fn(&StatsDoc) -> &VersionStats,
) -> Counts {
    let mut out = Counts::default();
    for (i, router) in after.iter().enumerate() {
        let base = before
            .get(i)
            .filter(|b| b.started_unix_ms == router.started_unix_ms)
            .map(version);
        add_delta(&mut out, version(router), base);
    }
    out
}

/// The mirrored pairs from the `before` sample to the `after` one, summed over routers, as
/// [`between`] does the versions' counts.
fn pairs_between(before: &[StatsDoc], after: &[StatsDoc]) -> PairedBatch {
    let mut out = PairedBatch::default();
    for (i, router) in after.iter().enumerate() {
        let base = before
            .get(i)
            .filter(|b| b.started_unix_ms == router.started_unix_ms)
            .map(|b| &b.mirror.pairs);
        out.add(&pairs_delta(&router.mirror.pairs, base));
    }
    out
}

fn pairs_delta(now: &MirrorPairs, before: Option<&MirrorPairs>) -> PairedBatch {
    let zero = MirrorPairs::default();
    let before = before.unwrap_or(&zero);
    let by = |now: &[(u64, u64)], before: &[(u64, u64)]| -> Vec<(u64, u64)> {
        now.iter()
            .map(|&(bound, n)| {
                let was = before.iter().find(|(b, _)| *b == bound).map_or(0, |p| p.1);
                (bound, n.saturating_sub(was))
            })
            .collect()
    };
    PairedBatch {
        both_ok: now.both_ok.saturating_sub(before.both_ok),
        canary_only_failed: now
            .canary_only_failed
            .saturating_sub(before.canary_only_failed),
        stable_only_failed: now
            .stable_only_failed
            .saturating_sub(before.stable_only_failed),
        both_failed: now.both_failed.saturating_sub(before.both_failed),
        canary_slower_by: by(&now.canary_slower_by, &before.canary_slower_by),
        canary_faster_by: by(&now.canary_faster_by, &before.canary_faster_by),
    }
}

fn add_delta(counts: &mut Counts, now: &VersionStats, before: Option<&VersionStats>) {
    let errors = |v: &VersionStats| -> u64 {
        v.statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum()
    };
    let (base_requests, base_errors) = before.map_or((0, 0), |b| (b.requests, errors(b)));
    counts.requests += now.requests.saturating_sub(base_requests);
    counts.server_errors += errors(now).saturating_sub(base_errors);
    let base: BTreeMap<u64, u64> = before
        .map(|b| b.latency.counts.iter().copied().collect())
        .unwrap_or_default();
    for (micros, n) in &now.latency.counts {
        let d = n.saturating_sub(base.get(micros).copied().unwrap_or(0));
        if d > 0 {
            *counts.latency.entry(*micros).or_default() += d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_contract::Latency;
    use coalmine_judge::Reading;
    use coalmine_rollout::Window;

    fn stats(started: u64, requests: u64, errors: u64, latency: &[(u64, u64)]) -> StatsDoc {
        let mut statuses = BTreeMap::new();
        statuses.insert(200, requests - errors);
        if errors > 0 {
            statuses.insert(503, errors);
        }
        StatsDoc {
            instance: "r".into(),
            started_unix_ms: started,
            stable: VersionStats::default(),
            canary: VersionStats {
                requests,
                statuses,
                latency: Latency {
                    counts: latency.to_vec(),
                    ..Latency::default()
                },
                ..VersionStats::default()
            },
            ..StatsDoc::default()
        }
    }

    /// Samples as the driver takes them: each step into a window of `horizon_ms`.
    struct Sampled {
        counters: Counters,
        window: Window,
        last_ms: Option<u64>,
    }

    impl Sampled {
        fn new(horizon_ms: u64) -> Sampled {
            Sampled {
                counters: Counters::default(),
                window: Window::new(horizon_ms),
                last_ms: None,
            }
        }

        fn push(&mut self, at_ms: u64, stats: Vec<StatsDoc>) {
            let sample = self.counters.step(stats);
            if let Some(start) = self.last_ms.replace(at_ms) {
                self.window.push(start, at_ms, sample.counts);
            }
        }

        fn canary(&self, window_ms: u64) -> Counts {
            self.window.canary(window_ms)
        }
    }

    #[test]
    fn window_subtracts_the_sample_at_its_start_and_sums_routers() {
        let mut w = Sampled::new(60_000);
        w.push(
            0,
            vec![stats(1, 100, 0, &[(1000, 100)]), stats(1, 0, 0, &[])],
        );
        w.push(
            30_000,
            vec![
                stats(1, 200, 5, &[(1000, 195), (9000, 5)]),
                stats(1, 50, 0, &[(2000, 50)]),
            ],
        );
        w.push(
            60_000,
            vec![
                stats(1, 300, 10, &[(1000, 290), (9000, 10)]),
                stats(1, 100, 0, &[(2000, 100)]),
            ],
        );
        let last_30s = w.canary(30_000);
        assert_eq!(last_30s.requests, 100 + 50);
        assert_eq!(last_30s.server_errors, 5);
        assert_eq!(
            last_30s.success_rate(),
            Reading::Value {
                value: 100.0 * 145.0 / 150.0
            }
        );
        // 95 at 1 ms, 50 at 2 ms, 5 at 9 ms: p99 is rank 149 → 9 ms; p50 rank 75 → 1 ms.
        assert_eq!(
            last_30s.latency_quantile_ms(0.99),
            Reading::Value { value: 9.0 }
        );
        assert_eq!(
            last_30s.latency_quantile_ms(0.5),
            Reading::Value { value: 1.0 }
        );
        assert_eq!(w.canary(60_000).requests, 300);
    }

    #[test]
    fn a_restarted_router_counts_from_zero_and_one_sample_is_no_data() {
        let mut w = Sampled::new(60_000);
        w.push(0, vec![stats(1, 1000, 0, &[])]);
        assert!(matches!(
            w.canary(10_000).success_rate(),
            Reading::NoData { .. }
        ));
        w.push(10_000, vec![stats(2, 40, 4, &[])]);
        let c = w.canary(10_000);
        assert_eq!((c.requests, c.server_errors), (40, 4));
    }

    #[test]
    fn old_samples_are_dropped_past_the_horizon() {
        let mut w = Sampled::new(20_000);
        for i in 0..10 {
            w.push(i * 10_000, vec![stats(1, i * 10, 0, &[])]);
        }
        assert_eq!(w.canary(20_000).requests, 20);
    }

    #[test]
    fn a_new_instance_is_a_restart_and_mirrored_answers_are_the_canarys() {
        let mut counters = Counters::default();
        assert_eq!(counters.step(vec![stats(1, 10, 0, &[])]), Sample::default());
        let mut moved = stats(1, 20, 0, &[]);
        assert!(!counters.step(vec![moved.clone()]).restarted);
        moved.instance = "another".into();
        assert!(counters.step(vec![moved]).restarted);

        let mut mirrored = stats(1, 0, 0, &[]);
        mirrored.mirror.statuses.insert(200, 3);
        mirrored.mirror.failed = 1;
        let folded = with_mirror_as_canary(mirrored);
        assert_eq!(folded.canary.requests, 4);
        assert_eq!(folded.canary.statuses[&502], 1);
    }

    #[test]
    fn the_pairs_of_a_step_are_the_differences_summed_over_routers() {
        let with_pairs = |started: u64, both_ok: u64, canary_only: u64, slower: u64| {
            let mut s = stats(started, 0, 0, &[]);
            s.mirror.pairs = MirrorPairs {
                both_ok,
                canary_only_failed: canary_only,
                canary_slower_by: vec![(0, slower), (10_000, slower / 2)],
                ..MirrorPairs::default()
            };
            with_mirror_as_canary(s)
        };
        let mut counters = Counters::default();
        counters.step(vec![with_pairs(1, 100, 2, 40), with_pairs(1, 10, 0, 4)]);
        // The second router restarted: its pairs count from zero.
        let step = counters.step(vec![with_pairs(1, 150, 5, 60), with_pairs(2, 7, 1, 2)]);
        let p = step.counts.pairs;
        assert_eq!((p.both_ok, p.canary_only_failed), (57, 4));
        assert_eq!(p.canary_slower_by, vec![(0, 22), (10_000, 11)]);
        assert_eq!(p.beyond(10_000), (11, 0));
    }
}
