//! The dark launch: before the canary's first weight step, a share of stable's requests is
//! copied to it (its answers discarded) and the paired test compares its answer to each copy
//! with stable's answer to the same request ([`coalmine_judge::PairedTest`]). The machine
//! drives it (`machine.rs`): the canary's weight stays 0 throughout, a rejection rolls back at
//! once, and passing moves on to the first weight step.

use serde::{Deserialize, Serialize};

use coalmine_judge::{PairedBatch, PairedEvidence, PairedRejection, PairedTest};
use coalmine_spec::rollout::DarkLaunch;
use coalmine_spec::Weight;

/// `analysis.darkLaunch`, as a plan carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DarkLaunchPlan {
    pub mirror_weight: Weight,
    pub duration_ms: u64,
    pub min_requests: u64,
    pub latency_tolerance_micros: u64,
    pub alpha: f64,
}

impl DarkLaunchPlan {
    pub fn from_settings(d: &DarkLaunch) -> DarkLaunchPlan {
        DarkLaunchPlan {
            mirror_weight: d.mirror_weight,
            duration_ms: d.duration.0.as_millis() as u64,
            min_requests: d.min_requests,
            latency_tolerance_micros: d.latency_tolerance.0.as_micros() as u64,
            alpha: d.alpha,
        }
    }
}

/// Where a dark launch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DarkLaunchStage {
    /// Mirroring, the canary judged on its answers to the copies.
    Running,
    /// Done: the canary goes on to its weight steps.
    Passed,
    /// The canary was worse than stable on the same requests: rolled back.
    Failed,
}

/// A dark launch's state, persisted with the rollout's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DarkLaunchStatus {
    pub stage: DarkLaunchStage,
    pub started_ms: u64,
    /// When it passed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    test: PairedTest,
}

impl DarkLaunchStatus {
    pub fn new(plan: &DarkLaunchPlan, now: u64) -> DarkLaunchStatus {
        DarkLaunchStatus {
            stage: DarkLaunchStage::Running,
            started_ms: now,
            ended_ms: None,
            // The spec crate validated alpha.
            test: PairedTest::new(plan.alpha, plan.latency_tolerance_micros)
                .expect("valid dark launch settings"),
        }
    }

    /// Takes one step's pairs; why the canary must be rolled back, once the test rejects.
    pub(crate) fn observe(&mut self, pairs: &PairedBatch, now: u64) -> Option<String> {
        self.test.observe(pairs);
        let why = self.test.rejected()?;
        self.stage = DarkLaunchStage::Failed;
        self.ended_ms = Some(now);
        let e = self.test.evidence();
        let t = e.totals;
        let seconds = (now.saturating_sub(self.started_ms)) as f64 / 1000.0;
        Some(match why {
            PairedRejection::Failures => format!(
                "Dark launch failed after {seconds:.1}s: of {} mirrored requests the canary failed {} that stable answered well, stable {} that the canary answered well; Bayes factor {:.0} ≥ {:.0}",
                t.pairs,
                t.canary_only_failed,
                t.stable_only_failed,
                e.failures_log_bayes_factor.exp(),
                2.0 / e.alpha,
            ),
            PairedRejection::Latency => format!(
                "Dark launch failed after {seconds:.1}s: of {} mirrored requests the canary answered {} more than {}ms later than stable and {} sooner; Bayes factor {:.0} ≥ {:.0}",
                t.pairs,
                t.canary_slower,
                e.latency_tolerance_micros as f64 / 1000.0,
                t.canary_faster,
                e.latency_log_bayes_factor.exp(),
                2.0 / e.alpha,
            ),
        })
    }

    /// Paired requests so far.
    pub fn pairs(&self) -> u64 {
        self.test.totals().pairs
    }

    pub(crate) fn pass(&mut self, now: u64) -> String {
        self.stage = DarkLaunchStage::Passed;
        self.ended_ms = Some(now);
        let t = self.test.totals();
        format!(
            "Dark launch passed: {} paired requests over {:.0}s; the canary alone failed {}, stable alone {}; the canary slower on {}, faster on {}",
            t.pairs,
            now.saturating_sub(self.started_ms) as f64 / 1000.0,
            t.canary_only_failed,
            t.stable_only_failed,
            t.canary_slower,
            t.canary_faster,
        )
    }

    pub fn evidence(&self) -> PairedEvidence {
        self.test.evidence()
    }
}
