//! The daemon's own Prometheus metrics, named like Flagger's (`flagger_canary_*`) but for
//! Coalmine's rollouts: weight, phase, failed checks, each check's last value, outcomes and how
//! long rollouts took. Served at `coalmine serve`'s `/metrics`.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use coalmine_judge::Reading;
use coalmine_rollout::{Outcome, Phase, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabel {
    rollout: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    rollout: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabels {
    rollout: String,
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TestLabels {
    rollout: String,
    test: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    rollout: String,
    outcome: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type DurationFamily = Family<OutcomeLabels, Histogram, fn() -> Histogram>;

pub struct Telemetry {
    registry: Mutex<Registry>,
    weight: Family<RolloutLabel, FloatGauge>,
    phase: Family<PhaseLabels, Gauge>,
    failed_checks: Family<RolloutLabel, Gauge>,
    metric_value: Family<MetricLabels, FloatGauge>,
    outcomes: Family<OutcomeLabels, Counter>,
    durations: DurationFamily,
    p_values: Family<TestLabels, FloatGauge>,
    state_unsaved: Family<RolloutLabel, Gauge>,
    state_write_errors: Counter,
}

fn duration_histogram() -> Histogram {
    // 5 s to about 3 h: from a fast rollback to a slow, many-step promotion.
    Histogram::new(exponential_buckets(5.0, 2.0, 12))
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Promoted => "promoted",
        Outcome::RolledBack => "rolled_back",
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::default();
        let weight = Family::<RolloutLabel, FloatGauge>::default();
        registry.register(
            "coalmine_rollout_weight",
            "Traffic share of the canary, in percent",
            weight.clone(),
        );
        let phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "coalmine_rollout_phase",
            "1 for the rollout's current phase (Flagger's names), 0 for the others",
            phase.clone(),
        );
        let failed_checks = Family::<RolloutLabel, Gauge>::default();
        registry.register(
            "coalmine_rollout_failed_checks",
            "Failed checks counted toward the rollback threshold",
            failed_checks.clone(),
        );
        let metric_value = Family::<MetricLabels, FloatGauge>::default();
        registry.register(
            "coalmine_rollout_metric_value",
            "Last value of each analysis metric (NaN when the last reading had no value)",
            metric_value.clone(),
        );
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "coalmine_rollout_outcomes",
            "Rollouts ended, by outcome (promoted or rolled_back)",
            outcomes.clone(),
        );
        let durations = DurationFamily::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "coalmine_rollout_duration",
            "Time from a rollout's start to its outcome",
            Unit::Seconds,
            durations.clone(),
        );
        let p_values = Family::<TestLabels, FloatGauge>::default();
        registry.register(
            "coalmine_rollout_sequential_p_value",
            "Always-valid p-value of each sequential test (errors, latency); rollback below alpha/2",
            p_values.clone(),
        );
        let state_unsaved = Family::<RolloutLabel, Gauge>::default();
        registry.register(
            "coalmine_rollout_state_unsaved",
            "1 while a rollout holds because its last step could not be saved (nothing moves until it can)",
            state_unsaved.clone(),
        );
        let state_write_errors = Counter::default();
        registry.register(
            "coalmine_state_write_errors",
            "Steps the daemon could not save to its state file (disk full, I/O error)",
            state_write_errors.clone(),
        );
        Telemetry {
            state_unsaved,
            state_write_errors,
            p_values,
            registry: Mutex::new(registry),
            weight,
            phase,
            failed_checks,
            metric_value,
            outcomes,
            durations,
        }
    }
}

impl Telemetry {
    /// Shows a rollout's current status in the gauges.
    pub fn observe(&self, rollout: &str, status: &Status) {
        let label = RolloutLabel {
            rollout: rollout.to_string(),
        };
        self.weight
            .get_or_create(&label)
            .set(status.canary_weight.percent());
        self.failed_checks
            .get_or_create(&label)
            .set(i64::from(status.failed_checks));
        for phase in Phase::ALL {
            self.phase
                .get_or_create(&PhaseLabels {
                    rollout: rollout.to_string(),
                    phase: phase.as_str(),
                })
                .set(i64::from(phase == status.phase));
        }
        // Outcome counters start at 0, so `increase()` sees a rollout's first outcome.
        for outcome in [Outcome::Promoted, Outcome::RolledBack] {
            let _ = self.outcomes.get_or_create(&OutcomeLabels {
                rollout: rollout.to_string(),
                outcome: outcome_name(outcome),
            });
        }
        if let Some(evidence) = status.sequential.as_ref().map(|s| s.evidence()) {
            for (test, p) in [
                ("errors", evidence.errors.p_value),
                ("latency", evidence.latency.p_value),
            ] {
                self.p_values
                    .get_or_create(&TestLabels {
                        rollout: rollout.to_string(),
                        test,
                    })
                    .set(p);
            }
        }
        for m in &status.metrics {
            let value = match m.reading {
                Reading::Value { value } => value,
                _ => f64::NAN,
            };
            self.metric_value
                .get_or_create(&MetricLabels {
                    rollout: rollout.to_string(),
                    metric: m.name.clone(),
                })
                .set(value);
        }
    }

    /// Whether a rollout is holding on a step it could not save.
    pub fn unsaved(&self, rollout: &str, unsaved: bool) {
        let label = RolloutLabel {
            rollout: rollout.to_string(),
        };
        if unsaved {
            self.state_write_errors.inc();
        }
        self.state_unsaved
            .get_or_create(&label)
            .set(i64::from(unsaved));
    }

    /// Stops showing a deleted rollout.
    pub fn forget(&self, rollout: &str) {
        let label = RolloutLabel {
            rollout: rollout.to_string(),
        };
        self.weight.remove(&label);
        self.failed_checks.remove(&label);
        self.state_unsaved.remove(&label);
        for phase in Phase::ALL {
            self.phase.remove(&PhaseLabels {
                rollout: rollout.to_string(),
                phase: phase.as_str(),
            });
        }
    }

    /// Counts a rollout that just ended, with how long it took.
    pub fn finished(&self, rollout: &str, outcome: Outcome, seconds: f64) {
        let labels = OutcomeLabels {
            rollout: rollout.to_string(),
            outcome: outcome_name(outcome),
        };
        self.outcomes.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(seconds);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("registry");
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_outcomes_show_in_the_exposition() {
        let t = Telemetry::default();
        let mut status: Status = serde_json::from_value(serde_json::json!({
            "phase": "Progressing", "canaryWeight": 2500, "failedChecks": 1, "iterations": 0,
            "mirrored": false, "promoted": false, "paused": false, "lastTransitionMs": 0,
            "startedMs": 0, "stalledSinceMs": null, "nextTickMs": null, "message": "",
            "metrics": [], "pending": null, "outcome": null
        }))
        .expect("status");
        t.observe("web", &status);
        status.phase = Phase::Failed;
        t.observe("web", &status);
        t.finished("web", Outcome::RolledBack, 8.0);
        let text = t.encode();
        for line in [
            r#"coalmine_rollout_weight{rollout="web"} 25.0"#,
            r#"coalmine_rollout_failed_checks{rollout="web"} 1"#,
            r#"coalmine_rollout_phase{rollout="web",phase="Failed"} 1"#,
            r#"coalmine_rollout_phase{rollout="web",phase="Progressing"} 0"#,
            r#"coalmine_rollout_outcomes_total{rollout="web",outcome="rolled_back"} 1"#,
            r#"coalmine_rollout_duration_seconds_count{rollout="web",outcome="rolled_back"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
