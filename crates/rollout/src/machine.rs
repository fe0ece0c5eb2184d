use serde::{Deserialize, Serialize};

use coalmine_judge::{judge_threshold, Reading, Verdict};
use coalmine_spec::rollout::{FailureCounting, HookKind, NoDataRule};

use coalmine_spec::Weight;

use crate::dark_launch::{DarkLaunchStage, DarkLaunchStatus};
use crate::plan::{Plan, Strategy};

/// Flagger's canary phases, same names, same order (a Canary's `status.phase` is one of these;
/// Flagger's `Terminating`/`Terminated`, its `revertOnDeletion` finalizer path, are not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Phase {
    Initializing,
    Initialized,
    Waiting,
    Progressing,
    WaitingPromotion,
    Promoting,
    Finalising,
    Succeeded,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Initializing,
        Phase::Initialized,
        Phase::Waiting,
        Phase::Progressing,
        Phase::WaitingPromotion,
        Phase::Promoting,
        Phase::Finalising,
        Phase::Succeeded,
        Phase::Failed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Initializing => "Initializing",
            Phase::Initialized => "Initialized",
            Phase::Waiting => "Waiting",
            Phase::Progressing => "Progressing",
            Phase::WaitingPromotion => "WaitingPromotion",
            Phase::Promoting => "Promoting",
            Phase::Finalising => "Finalising",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Promoted,
    RolledBack,
}

/// What the machine waits for before its tick can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "hooks")]
pub enum Question {
    /// Call every webhook of this kind, in order, and report each result.
    Hooks(HookKind),
    /// Read every metric check of the plan, in order.
    Analysis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookResult {
    pub name: String,
    /// Answered with a status ≤ 202 (Flagger's success).
    pub ok: bool,
    pub message: String,
}

/// Why the traffic backend did not carry the machine's traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrafficFault {
    /// It could not be reached or did not answer in time: hold, the next tick tries again.
    Unreachable(String),
    /// It answered, and no retry will change the answer (it refused the change, or it is not
    /// what the rollout was told it is): roll back.
    Refused(String),
}

impl std::fmt::Display for TrafficFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrafficFault::Unreachable(reason) | TrafficFault::Refused(reason) => {
                f.write_str(reason)
            }
        }
    }
}

impl std::error::Error for TrafficFault {}

/// Why a refused route change rolls back, in the rollout's events.
pub(crate) fn refused(reason: &str) -> String {
    format!("the routers refuse the routes: {reason}")
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The interval elapsed. `traffic` says whether the traffic backend took the machine's
    /// traffic: unreachable holds, refused rolls back.
    Tick {
        traffic: Result<(), TrafficFault>,
    },
    Hooks {
        kind: HookKind,
        results: Vec<HookResult>,
    },
    /// One reading per check of the plan, in order.
    Analysis {
        readings: Vec<Reading>,
    },
    /// A user's command; `by` says who, for the history ("alice, signed in to the dashboard").
    Promote {
        by: String,
    },
    Abort {
        reason: String,
    },
    Pause {
        by: String,
    },
    Resume {
        by: String,
    },
    /// Something outside the analysis says the canary is bad (a firing alert, a sequential
    /// judge's verdict): roll back now, not at the next tick.
    RollBack {
        reason: String,
    },
    /// Both versions' counters over the last sampling step, for the sequential judges.
    Observe(crate::sequential::Observation),
    /// How far its group lets the rollout go now (a member of a `RolloutGroup`).
    Gate(Gate),
    /// Its group rolls back after the rollout was promoted: the previous version takes all
    /// the traffic again (the rollout's stable, which the group remembers).
    Revert {
        reason: String,
    },
}

/// How far a member of a group may go now: the group's decision, persisted with the status so
/// a restarted member holds where it held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gate {
    /// Whether it may start its analysis.
    pub start: bool,
    /// The highest weight it may take.
    #[serde(with = "basis_points")]
    pub max_weight: Weight,
    /// Whether it may promote.
    pub promote: bool,
    /// What it waits for, in words ("payments to reach 50 %").
    pub waiting_for: String,
}

impl Gate {
    /// The gate a member of group `group` starts behind: nothing moves before its group has
    /// decided.
    pub fn closed_for(group: &str) -> Gate {
        Gate {
            start: false,
            max_weight: Weight::ZERO,
            promote: false,
            waiting_for: format!("group {group} to decide"),
        }
    }

    /// No limit.
    pub fn open() -> Gate {
        Gate {
            start: true,
            max_weight: Weight::FULL,
            promote: true,
            waiting_for: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLevel {
    Info,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub time_ms: u64,
    pub level: EventLevel,
    pub phase: Phase,
    /// Canary weight when the event happened.
    #[serde(with = "basis_points")]
    pub weight: Weight,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Answer with [`Input::Hooks`] or [`Input::Analysis`].
    Ask(Question),
    /// Call these webhooks; their answers do not matter (post-rollout).
    Notify(HookKind),
    Event(Event),
    Finished(Outcome),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricStatus {
    pub name: String,
    pub reading: Reading,
    pub verdict: Verdict,
    pub time_ms: u64,
}

/// Where traffic should go now. The driver makes the routers agree after every input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    /// The new version has been promoted: it is the stable upstream and there is no canary.
    pub promoted: bool,
    /// Whether the canary upstream is in the route table at all.
    pub canary: bool,
    pub canary_weight: Weight,
    pub apply_match: bool,
    pub mirror_weight: Weight,
}

/// The whole persisted state of one rollout: enough to continue after a crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub phase: Phase,
    #[serde(with = "basis_points")]
    pub canary_weight: Weight,
    pub failed_checks: u32,
    pub iterations: u32,
    pub mirrored: bool,
    pub promoted: bool,
    pub paused: bool,
    pub last_transition_ms: u64,
    pub started_ms: u64,
    /// Since when the rollout has been held without a verdict (no data, routers unreachable).
    pub stalled_since_ms: Option<u64>,
    pub next_tick_ms: Option<u64>,
    pub message: String,
    pub metrics: Vec<MetricStatus>,
    pub pending: Option<Question>,
    pub outcome: Option<Outcome>,
    /// The sequential judges, from the first observation while the canary is analysed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequential: Option<crate::sequential::SequentialState>,
    /// Its group's gate (a member of a `RolloutGroup`); none: nothing holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Gate>,
    /// It would go on (start, raise its weight, promote) and its group's gate holds it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub at_gate: bool,
    /// The dark launch, from its start (`analysis.darkLaunch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dark_launch: Option<DarkLaunchStatus>,
}

/// One rollout's state machine. Its state changes only through [`Machine::handle`] (and the
/// driving loop built on it, [`Machine::drive`]).
#[derive(Debug, Clone)]
pub struct Machine {
    plan: Plan,
    status: Status,
}

impl Machine {
    /// A new rollout; its first tick is due at `now`.
    pub fn new(plan: Plan, now: u64) -> Machine {
        Machine {
            plan,
            status: Status {
                phase: Phase::Initializing,
                canary_weight: Weight::ZERO,
                failed_checks: 0,
                iterations: 0,
                mirrored: false,
                promoted: false,
                paused: false,
                last_transition_ms: now,
                started_ms: now,
                stalled_since_ms: None,
                next_tick_ms: Some(now),
                message: String::new(),
                metrics: Vec::new(),
                pending: None,
                outcome: None,
                sequential: None,
                gate: None,
                at_gate: false,
                dark_launch: None,
            },
        }
    }

    /// A new rollout that starts paused (`spec.suspend`) or not.
    pub fn paused(mut self, paused: bool) -> Machine {
        self.status.paused = paused;
        self
    }

    /// Continues a persisted rollout.
    pub fn resume(plan: Plan, status: Status) -> Machine {
        Machine { plan, status }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The whole state, as persisted.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// When the next tick is due (None once the rollout has ended).
    pub fn next_tick_ms(&self) -> Option<u64> {
        self.status.next_tick_ms
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.status.outcome
    }

    /// Puts back the status of before a step that could not be saved: that step never happened.
    pub(crate) fn undo(&mut self, before: Status) {
        self.status = before;
    }

    /// The question to ask again after a restart, if the machine was waiting for an answer.
    pub fn pending(&self) -> Option<Question> {
        self.status.pending
    }

    pub fn traffic(&self) -> Traffic {
        let s = &self.status;
        let none = Traffic {
            promoted: false,
            canary: false,
            canary_weight: Weight::ZERO,
            apply_match: false,
            mirror_weight: Weight::ZERO,
        };
        match s.phase {
            Phase::Initializing | Phase::Initialized | Phase::Waiting | Phase::Failed => none,
            _ if s.promoted => Traffic {
                promoted: true,
                ..none
            },
            Phase::Succeeded => Traffic {
                promoted: true,
                ..none
            },
            _ => {
                let in_analysis = s.canary_weight > Weight::ZERO || s.iterations > 0 || s.mirrored;
                Traffic {
                    promoted: false,
                    canary: true,
                    canary_weight: s.canary_weight,
                    apply_match: self.plan.uses_match && in_analysis,
                    mirror_weight: if s.mirrored {
                        self.plan.mirror_weight.unwrap_or(Weight::FULL)
                    } else {
                        Weight::ZERO
                    },
                }
            }
        }
    }

    pub fn handle(&mut self, now: u64, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.status.phase.is_final() {
            if let Input::Revert { reason } = input {
                self.revert(now, &reason, &mut out);
            }
            return out;
        }
        match input {
            Input::Tick { traffic } => self.tick(now, traffic, &mut out),
            Input::Hooks { kind, results } => {
                if self.status.pending == Some(Question::Hooks(kind)) {
                    self.status.pending = None;
                    self.hooks_answered(now, kind, &results, &mut out);
                }
            }
            Input::Analysis { readings } => {
                if self.status.pending == Some(Question::Analysis) {
                    self.status.pending = None;
                    self.analysis_answered(now, readings, &mut out);
                }
            }
            Input::Promote { by } => {
                if !matches!(self.status.phase, Phase::Promoting | Phase::Finalising) {
                    self.status.pending = None;
                    self.enter(now, Phase::Promoting);
                    self.event(
                        now,
                        EventLevel::Info,
                        &format!("Promotion requested by {by}"),
                        &mut out,
                    );
                    self.status.next_tick_ms = Some(now);
                }
            }
            Input::Abort { reason } => self.roll_back(now, &format!("aborted: {reason}"), &mut out),
            Input::RollBack { reason } => self.roll_back(now, &reason, &mut out),
            Input::Observe(observation) => self.observe(now, &observation, &mut out),
            Input::Pause { by } => {
                self.status.paused = true;
                self.event(now, EventLevel::Info, &format!("Paused by {by}"), &mut out);
            }
            Input::Gate(gate) => self.gate(now, gate),
            // Not promoted yet: an ordinary rollback.
            Input::Revert { reason } => self.roll_back(now, &reason, &mut out),
            Input::Resume { by } => {
                if self.status.paused {
                    self.status.paused = false;
                    self.status.stalled_since_ms = None;
                    self.status.next_tick_ms = Some(now);
                    self.event(now, EventLevel::Info, &format!("Resumed by {by}"), &mut out);
                }
            }
        }
        out
    }

    fn tick(&mut self, now: u64, traffic: Result<(), TrafficFault>, out: &mut Vec<Action>) {
        if let Err(TrafficFault::Refused(reason)) = &traffic {
            // No retry will help, whatever the machine was waiting for.
            return self.roll_back(now, &refused(reason), out);
        }
        if self.status.next_tick_ms.is_some_and(|due| now < due) || self.status.pending.is_some() {
            return;
        }
        self.status.next_tick_ms = Some(now + self.plan.interval_ms);
        if self.status.paused {
            return;
        }
        match self.status.phase {
            Phase::Initializing => {
                self.enter(now, Phase::Initialized);
                self.event(now, EventLevel::Info, "Initialization done", out);
                self.ask_or(now, HookKind::ConfirmRollout, out, Self::start_progressing);
            }
            Phase::Initialized | Phase::Waiting => {
                self.ask_or(now, HookKind::ConfirmRollout, out, Self::start_progressing)
            }
            Phase::Progressing | Phase::WaitingPromotion => match traffic {
                Err(reason) => self.stall(now, &format!("traffic: {reason}"), out),
                Ok(()) => self.ask_or(now, HookKind::Rollback, out, Self::analyse_or_gate),
            },
            Phase::Promoting => match traffic {
                Err(reason) => self.stall(now, &format!("traffic: {reason}"), out),
                Ok(()) => self.promoting_step(now, out),
            },
            Phase::Finalising => match traffic {
                Err(reason) => self.stall(now, &format!("traffic: {reason}"), out),
                Ok(()) => {
                    self.enter(now, Phase::Succeeded);
                    self.status.outcome = Some(Outcome::Promoted);
                    self.status.next_tick_ms = None;
                    self.event(now, EventLevel::Info, "Promotion completed", out);
                    out.push(Action::Notify(HookKind::PostRollout));
                    out.push(Action::Finished(Outcome::Promoted));
                }
            },
            Phase::Succeeded | Phase::Failed => {}
        }
    }

    /// Flagger's "New revision detected": weights, checks and iterations start from zero.
    fn start_progressing(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.held_at_gate(now, |g| g.start, Phase::Waiting, out) {
            return;
        }
        self.enter(now, Phase::Progressing);
        self.status.canary_weight = Weight::ZERO;
        self.status.failed_checks = 0;
        self.status.iterations = 0;
        self.status.mirrored = false;
        self.status.stalled_since_ms = None;
        self.status.dark_launch = None;
        self.event(
            now,
            EventLevel::Info,
            "New revision detected, progressing canary analysis",
            out,
        );
    }

    /// After the rollback hooks said nothing: the threshold check, then the analysis.
    fn analyse_or_gate(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.status.failed_checks >= self.plan.threshold {
            let reason = format!(
                "Canary failed {} checks (threshold {})",
                self.status.failed_checks, self.plan.threshold
            );
            return self.roll_back(now, &reason, out);
        }
        if self.plan.skip_analysis {
            self.enter(now, Phase::Promoting);
            self.event(now, EventLevel::Info, "Analysis skipped, promoting", out);
            return;
        }
        let s = &self.status;
        if s.canary_weight == Weight::ZERO && s.iterations == 0 && !s.mirrored {
            // Flagger runs no metric checks at weight 0: there is nothing to measure yet.
            self.ask_or(now, HookKind::PreRollout, out, |m, now, out| {
                m.event(now, EventLevel::Info, "Starting canary analysis", out);
                m.strategy_step(now, out);
            });
        } else {
            self.ask_or(now, HookKind::Rollout, out, Self::ask_analysis);
        }
    }

    fn ask_analysis(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.plan.checks.is_empty() {
            return self.analysis_passed(now, out);
        }
        self.status.pending = Some(Question::Analysis);
        out.push(Action::Ask(Question::Analysis));
    }

    fn analysis_answered(&mut self, now: u64, readings: Vec<Reading>, out: &mut Vec<Action>) {
        let mut failures = Vec::new();
        let mut inconclusive = Vec::new();
        self.status.metrics.clear();
        for (i, check) in self.plan.checks.iter().enumerate() {
            let reading = readings.get(i).cloned().unwrap_or(Reading::Error {
                reason: "no reading was taken".into(),
            });
            let verdict = judge_threshold(&reading, check.range.min, check.range.max);
            match &verdict {
                Verdict::Fail { reason } => failures.push(format!("{}: {reason}", check.name)),
                Verdict::Inconclusive { reason } => {
                    inconclusive.push(format!("{}: {reason}", check.name))
                }
                Verdict::Pass => {}
            }
            self.status.metrics.push(MetricStatus {
                name: check.name.clone(),
                reading,
                verdict,
                time_ms: now,
            });
        }
        if !failures.is_empty() {
            self.failed_check(now, &failures.join("; "), out);
        } else if !inconclusive.is_empty() {
            let reason = inconclusive.join("; ");
            match self.plan.no_data {
                NoDataRule::Fail => self.failed_check(now, &reason, out),
                NoDataRule::Hold => self.stall(now, &reason, out),
            }
        } else {
            self.analysis_passed(now, out);
        }
    }

    fn analysis_passed(&mut self, now: u64, out: &mut Vec<Action>) {
        self.status.stalled_since_ms = None;
        if self.plan.failure_counting == FailureCounting::Consecutive {
            self.status.failed_checks = 0;
        }
        self.strategy_step(now, out);
    }

    fn failed_check(&mut self, now: u64, reason: &str, out: &mut Vec<Action>) {
        // It no longer asks its group to go on.
        self.status.at_gate = false;
        self.status.failed_checks += 1;
        self.status.stalled_since_ms = None;
        let message = format!(
            "Halt advancement: {reason} (failed checks {}/{})",
            self.status.failed_checks, self.plan.threshold
        );
        self.status.message = message.clone();
        self.event(now, EventLevel::Warning, &message, out);
    }

    /// Held without a verdict. The progress deadline bounds how long.
    fn stall(&mut self, now: u64, reason: &str, out: &mut Vec<Action>) {
        self.status.at_gate = false;
        let since = *self.status.stalled_since_ms.get_or_insert(now);
        if now.saturating_sub(since) >= self.plan.progress_deadline_ms {
            let reason = format!(
                "no progress for {}s (progressDeadlineSeconds): {reason}",
                self.plan.progress_deadline_ms / 1000
            );
            return self.roll_back(now, &reason, out);
        }
        let message = format!("Holding weight: {reason}");
        self.status.message = message.clone();
        self.event(now, EventLevel::Warning, &message, out);
    }

    /// The analysis passed: move the canary on by its strategy.
    fn strategy_step(&mut self, now: u64, out: &mut Vec<Action>) {
        match self.plan.strategy.clone() {
            Strategy::Canary { mirror_first, .. } => {
                if self.dark_launch_holds(now, out) {
                    return;
                }
                let s = &self.status;
                if mirror_first && !s.mirrored && s.canary_weight == Weight::ZERO {
                    self.status.mirrored = true;
                    self.event(now, EventLevel::Info, "Starting traffic mirroring", out);
                } else if s.canary_weight < self.plan.max_weight() {
                    self.ask_or(
                        now,
                        HookKind::ConfirmTrafficIncrease,
                        out,
                        Self::raise_weight,
                    );
                } else {
                    self.ask_or(now, HookKind::ConfirmPromotion, out, Self::start_promotion);
                }
            }
            Strategy::AbTesting { iterations } => {
                if self.status.iterations < iterations {
                    self.next_iteration(now, iterations, out);
                } else {
                    self.ask_or(now, HookKind::ConfirmPromotion, out, Self::start_promotion);
                }
            }
            Strategy::BlueGreen { iterations, mirror } => {
                if self.status.iterations < iterations {
                    self.status.mirrored = mirror;
                    self.next_iteration(now, iterations, out);
                } else if self.status.iterations == iterations {
                    self.ask_or(now, HookKind::ConfirmPromotion, out, |m, now, out| {
                        m.status.canary_weight = Weight::FULL;
                        m.status.mirrored = false;
                        m.status.iterations += 1;
                        m.event(now, EventLevel::Info, "Routing all traffic to canary", out);
                    });
                } else {
                    self.start_promotion(now, out);
                }
            }
        }
    }

    /// The dark launch before the first weight step: started here, held here until it has
    /// lasted its duration and paired its requests, and then passed. Whether it holds the
    /// canary at weight 0 for now.
    fn dark_launch_holds(&mut self, now: u64, out: &mut Vec<Action>) -> bool {
        let Some(plan) = self.plan.dark_launch.clone() else {
            return false;
        };
        if self.status.canary_weight > Weight::ZERO {
            return false;
        }
        let Some(dark) = &mut self.status.dark_launch else {
            self.status.mirrored = true;
            self.status.dark_launch = Some(DarkLaunchStatus::new(&plan, now));
            let message = format!(
                "Dark launch: mirroring {} % of stable's requests to the canary (its answers discarded), comparing its answer to each with stable's, for at least {}s and {} paired requests",
                percent(plan.mirror_weight),
                plan.duration_ms / 1000,
                plan.min_requests,
            );
            self.event(now, EventLevel::Info, &message, out);
            return true;
        };
        if dark.stage != DarkLaunchStage::Running {
            return false;
        }
        let (pairs, ends) = (dark.pairs(), dark.started_ms + plan.duration_ms);
        if now < ends {
            self.status.message = format!(
                "Dark launch: {pairs} paired requests, {}s to go",
                (ends - now).div_ceil(1000)
            );
            return true;
        }
        if pairs < plan.min_requests {
            // Too little traffic to judge: held, as long as the progress deadline allows.
            let reason = format!(
                "dark launch: {pairs} of {} paired requests after {}s",
                plan.min_requests,
                (now - dark.started_ms) / 1000
            );
            if now - ends >= self.plan.progress_deadline_ms {
                let reason = format!(
                    "no progress for {}s (progressDeadlineSeconds): {reason}",
                    self.plan.progress_deadline_ms / 1000
                );
                self.roll_back(now, &reason, out);
            } else {
                let message = format!("Holding weight: {reason}");
                self.status.message = message.clone();
                self.event(now, EventLevel::Warning, &message, out);
            }
            return true;
        }
        let message = dark.pass(now);
        self.event(now, EventLevel::Info, &message, out);
        false
    }

    fn next_iteration(&mut self, now: u64, of: u32, out: &mut Vec<Action>) {
        self.status.iterations += 1;
        let message = format!("Advance canary iteration {}/{of}", self.status.iterations);
        self.event(now, EventLevel::Info, &message, out);
    }

    fn raise_weight(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(next) = self.plan.next_weight(self.status.canary_weight) else {
            return;
        };
        let phase = self.status.phase;
        if self.held_at_gate(now, |g| next <= g.max_weight, phase, out) {
            return;
        }
        self.status.canary_weight = next;
        self.status.mirrored = false;
        let message = format!("Advance canary weight {}", percent(next));
        self.event(now, EventLevel::Info, &message, out);
    }

    fn start_promotion(&mut self, now: u64, out: &mut Vec<Action>) {
        let phase = self.status.phase;
        if self.held_at_gate(now, |g| g.promote, phase, out) {
            return;
        }
        self.enter(now, Phase::Promoting);
        self.event(
            now,
            EventLevel::Info,
            "Analysis passed, promoting the canary",
            out,
        );
    }

    /// Promoting: shift the rest of the traffic, at once or by `stepWeightPromotion` per tick.
    fn promoting_step(&mut self, now: u64, out: &mut Vec<Action>) {
        if let Some(step) = self.plan.step_weight_promotion {
            let next = self.status.canary_weight.basis_points() + step.basis_points();
            if let Some(next) = Weight::from_basis_points(next)
                .ok()
                .filter(|w| *w < Weight::FULL)
            {
                self.status.canary_weight = next;
                let message = format!("Promotion: canary weight {}", percent(next));
                self.event(now, EventLevel::Info, &message, out);
                return;
            }
        }
        self.status.promoted = true;
        self.status.canary_weight = Weight::ZERO;
        self.status.mirrored = false;
        self.enter(now, Phase::Finalising);
        self.event(
            now,
            EventLevel::Info,
            "Routing all traffic to the new version",
            out,
        );
    }

    /// The sequential judges see every step while the canary is analysed (canary, A/B and
    /// blue-green alike); a rejection rolls back at once.
    fn observe(
        &mut self,
        now: u64,
        observation: &crate::sequential::Observation,
        out: &mut Vec<Action>,
    ) {
        let analysing = matches!(
            self.status.phase,
            Phase::Progressing | Phase::WaitingPromotion
        );
        if !analysing || self.status.outcome.is_some() || self.status.paused {
            return;
        }
        if let Some(dark) = &mut self.status.dark_launch {
            if dark.stage == DarkLaunchStage::Running {
                if let Some(reason) = dark.observe(&observation.pairs, now) {
                    return self.roll_back(now, &reason, out);
                }
            }
        }
        let Some(plan) = &self.plan.sequential else {
            return;
        };
        // A sample without a request tells the judges nothing; it is not a step to record.
        if observation.canary.requests == 0 && observation.stable.requests == 0 {
            return;
        }
        let state = self
            .status
            .sequential
            .get_or_insert_with(|| crate::sequential::SequentialState::new(plan));
        if let Some(reason) = state.observe(observation) {
            self.roll_back(now, &reason, out);
        }
    }

    /// Its group's new gate. A member held at the old one goes on at once if the new one lets
    /// it (its next tick comes now; the analysis runs before the step, as on any tick).
    fn gate(&mut self, now: u64, gate: Gate) {
        if self.status.gate.as_ref() == Some(&gate) {
            return;
        }
        self.status.gate = Some(gate);
        if self.status.at_gate && !self.status.paused && self.status.pending.is_none() {
            self.status.next_tick_ms = Some(now);
        }
    }

    /// Whether its group's gate holds it from going on (`lets` says what the gate allows);
    /// held, it says so once, in `phase`.
    fn held_at_gate(
        &mut self,
        now: u64,
        lets: impl Fn(&Gate) -> bool,
        phase: Phase,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(gate) = &self.status.gate else {
            return false;
        };
        if lets(gate) {
            self.status.at_gate = false;
            return false;
        }
        let message = format!("Waiting for the group: {}", gate.waiting_for);
        self.enter(now, phase);
        if !self.status.at_gate || self.status.message != message {
            self.status.at_gate = true;
            self.event(now, EventLevel::Info, &message, out);
        }
        true
    }

    /// Its group rolls back after it was promoted: the previous version takes everything again.
    fn revert(&mut self, now: u64, reason: &str, out: &mut Vec<Action>) {
        if self.status.outcome != Some(Outcome::Promoted) {
            return;
        }
        self.status.promoted = false;
        self.status.canary_weight = Weight::ZERO;
        self.status.outcome = Some(Outcome::RolledBack);
        let message = format!("Rolling back the promoted version: {reason}");
        self.status.message = message.clone();
        self.enter(now, Phase::Failed);
        self.event(now, EventLevel::Warning, &message, out);
        out.push(Action::Finished(Outcome::RolledBack));
    }

    fn roll_back(&mut self, now: u64, reason: &str, out: &mut Vec<Action>) {
        if self.status.phase.is_final() {
            return;
        }
        self.status.at_gate = false;
        self.status.pending = None;
        self.status.canary_weight = Weight::ZERO;
        self.status.mirrored = false;
        self.status.promoted = false;
        if let Some(dark) = &mut self.status.dark_launch {
            if dark.stage == DarkLaunchStage::Running {
                dark.stage = DarkLaunchStage::Failed;
                dark.ended_ms = Some(now);
            }
        }
        self.status.next_tick_ms = None;
        self.status.outcome = Some(Outcome::RolledBack);
        let message = format!("Rolling back: {reason}");
        self.status.message = message.clone();
        self.enter(now, Phase::Failed);
        self.event(now, EventLevel::Warning, &message, out);
        out.push(Action::Notify(HookKind::PostRollout));
        out.push(Action::Finished(Outcome::RolledBack));
    }

    /// Asks for the webhooks of `kind` when the plan has any; otherwise goes on at once.
    fn ask_or(
        &mut self,
        now: u64,
        kind: HookKind,
        out: &mut Vec<Action>,
        then: impl FnOnce(&mut Self, u64, &mut Vec<Action>),
    ) {
        if self.plan.has_hooks(kind) {
            self.status.pending = Some(Question::Hooks(kind));
            out.push(Action::Ask(Question::Hooks(kind)));
        } else {
            then(self, now, out);
        }
    }

    fn hooks_answered(
        &mut self,
        now: u64,
        kind: HookKind,
        results: &[HookResult],
        out: &mut Vec<Action>,
    ) {
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.ok)
            .map(|r| format!("{} ({})", r.name, r.message))
            .collect();
        let passed = failed.is_empty();
        let why = failed.join(", ");
        match kind {
            HookKind::ConfirmRollout if passed => self.start_progressing(now, out),
            HookKind::ConfirmRollout => {
                self.enter(now, Phase::Waiting);
                let message = format!("Halt: confirm-rollout check {why} has not passed");
                self.status.message = message.clone();
                self.event(now, EventLevel::Info, &message, out);
            }
            HookKind::Rollback => {
                if let Some(hook) = results.iter().find(|r| r.ok) {
                    let reason = format!("rollback webhook {} asked for it", hook.name);
                    self.roll_back(now, &reason, out);
                } else {
                    self.analyse_or_gate(now, out);
                }
            }
            HookKind::PreRollout if passed => {
                self.event(now, EventLevel::Info, "Starting canary analysis", out);
                self.strategy_step(now, out);
            }
            HookKind::PreRollout => self.failed_check(now, &format!("pre-rollout {why}"), out),
            HookKind::Rollout if passed => self.ask_analysis(now, out),
            HookKind::Rollout => self.failed_check(now, &format!("rollout webhook {why}"), out),
            HookKind::ConfirmTrafficIncrease if passed => self.raise_weight(now, out),
            HookKind::ConfirmTrafficIncrease => {
                let message = format!("Halt: confirm-traffic-increase {why} has not passed");
                self.status.message = message.clone();
                self.event(now, EventLevel::Info, &message, out);
            }
            HookKind::ConfirmPromotion if passed => self.start_promotion(now, out),
            HookKind::ConfirmPromotion => {
                if self.status.phase != Phase::WaitingPromotion {
                    self.enter(now, Phase::WaitingPromotion);
                }
                let message = format!("Halt: confirm-promotion {why} has not passed");
                self.status.message = message.clone();
                self.event(now, EventLevel::Info, &message, out);
            }
            HookKind::PostRollout | HookKind::Event => {}
        }
    }

    fn enter(&mut self, now: u64, phase: Phase) {
        if self.status.phase != phase {
            self.status.phase = phase;
            self.status.last_transition_ms = now;
        }
    }

    fn event(&mut self, now: u64, level: EventLevel, message: &str, out: &mut Vec<Action>) {
        if level == EventLevel::Info {
            self.status.message = message.to_string();
        }
        out.push(Action::Event(Event {
            time_ms: now,
            level,
            phase: self.status.phase,
            weight: self.status.canary_weight,
            message: message.to_string(),
        }));
    }
}

/// A weight as a percentage for messages: 5 % → "5", 0.5 % → "0.5".
fn percent(weight: Weight) -> String {
    let s = format!("{:.2}", weight.percent());
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Weights as the state file has always held them: basis points (documents write percentages).
mod basis_points {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use coalmine_spec::Weight;

    pub fn serialize<S: Serializer>(weight: &Weight, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(weight.basis_points())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Weight, D::Error> {
        Weight::from_basis_points(u32::deserialize(d)?).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_keeps_its_weights_in_basis_points_as_state_files_always_have() {
        let analysis = coalmine_spec::parse_yaml("a.yaml", "interval: 1m\nstepWeight: 10\n")
            .expect("analysis");
        let mut status = Machine::new(Plan::new(&analysis, 600, false), 0)
            .status()
            .clone();
        status.canary_weight = Weight::from_percent(12.5).unwrap();
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["canaryWeight"], 1250);
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
        let event = Event {
            time_ms: 0,
            level: EventLevel::Info,
            phase: Phase::Progressing,
            weight: Weight::from_percent(0.5).unwrap(),
            message: String::new(),
        };
        assert_eq!(serde_json::to_value(&event).unwrap()["weight"], 50);
    }
}
