//! What a rollout will do, compiled once from its document: the strategy, the weight ladder, the
//! checks and which webhook kinds exist.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use coalmine_spec::rollout::{Analysis, FailureCounting, HookKind, NoDataRule, ThresholdRange};
use coalmine_spec::Weight;

/// How traffic reaches the canary while it is analysed (Flagger's three deployment strategies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Strategy {
    /// Progressive weights. `ladder` holds each weight, rising, ending at the maximum: `stepWeights` as given, or `stepWeight` multiples capped at `maxWeight` (Flagger
    /// overshoots `maxWeight` when it is not a multiple; Coalmine stops at it).
    Canary {
        ladder: Vec<Weight>,
        mirror_first: bool,
    },
    /// Requests matching `match` go to the canary for `iterations` checks.
    AbTesting { iterations: u32 },
    /// No user traffic (or a mirrored copy) for `iterations` checks, then all at once.
    BlueGreen { iterations: u32, mirror: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    pub name: String,
    pub range: ThresholdRange,
    /// The window a built-in metric is computed over.
    pub window_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub interval_ms: u64,
    pub threshold: u32,
    pub strategy: Strategy,
    pub step_weight_promotion: Option<Weight>,
    pub checks: Vec<Check>,
    pub hook_kinds: BTreeSet<HookKind>,
    pub no_data: NoDataRule,
    pub failure_counting: FailureCounting,
    pub progress_deadline_ms: u64,
    pub skip_analysis: bool,
    /// Whether `match` rules send requests to the canary during the analysis.
    pub uses_match: bool,
    pub mirror_weight: Option<Weight>,
    /// The sequential judges' settings; None when `analysis.sequential.enabled` is false.
    #[serde(default)]
    pub sequential: Option<crate::sequential::SequentialPlan>,
    /// `analysis.darkLaunch`: before the first weight step (canary strategy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dark_launch: Option<crate::dark_launch::DarkLaunchPlan>,
}

impl Plan {
    pub fn new(analysis: &Analysis, progress_deadline_seconds: u64, skip_analysis: bool) -> Plan {
        let iterations = analysis.iterations.unwrap_or(0);
        let has_match = !analysis.match_.is_empty();
        let strategy = if let Some(ladder) = analysis.weight_ladder() {
            Strategy::Canary {
                ladder,
                mirror_first: analysis.mirror,
            }
        } else if has_match {
            Strategy::AbTesting {
                iterations: iterations.max(1),
            }
        } else {
            Strategy::BlueGreen {
                iterations: iterations.max(1),
                mirror: analysis.mirror,
            }
        };
        Plan {
            interval_ms: analysis.interval.0.as_millis() as u64,
            threshold: analysis.threshold.unwrap_or(1).max(1),
            strategy,
            step_weight_promotion: analysis.step_weight_promotion,
            checks: analysis
                .metrics
                .iter()
                .map(|m| Check {
                    name: m.name.clone(),
                    range: m.range(),
                    window_ms: m.window().as_millis() as u64,
                })
                .collect(),
            hook_kinds: analysis.webhooks.iter().map(|w| w.kind).collect(),
            no_data: analysis.no_data,
            failure_counting: analysis.failure_counting,
            progress_deadline_ms: progress_deadline_seconds.saturating_mul(1000),
            skip_analysis,
            uses_match: has_match,
            // A dark launch's share is the mirror share (the spec refuses both together).
            mirror_weight: match &analysis.dark_launch {
                Some(dark) => Some(dark.mirror_weight),
                None => analysis.mirror_weight,
            },
            sequential: crate::sequential::SequentialPlan::from_settings(&analysis.sequential),
            dark_launch: analysis
                .dark_launch
                .as_ref()
                .map(crate::dark_launch::DarkLaunchPlan::from_settings),
        }
    }

    /// Whether the machine wants every sampling step's counts ([`crate::Input::Observe`]):
    /// its sequential judges or its dark launch decide between ticks.
    pub fn observes(&self) -> bool {
        self.sequential.is_some() || self.dark_launch.is_some()
    }

    /// The weight the canary ends its analysis at.
    pub fn max_weight(&self) -> Weight {
        match &self.strategy {
            Strategy::Canary { ladder, .. } => ladder.last().copied().unwrap_or(Weight::FULL),
            _ => Weight::ZERO,
        }
    }

    /// The next rung above `weight`, if any.
    pub fn next_weight(&self, weight: Weight) -> Option<Weight> {
        match &self.strategy {
            Strategy::Canary { ladder, .. } => ladder.iter().copied().find(|w| *w > weight),
            _ => None,
        }
    }

    pub fn has_hooks(&self, kind: HookKind) -> bool {
        self.hook_kinds.contains(&kind)
    }
}
