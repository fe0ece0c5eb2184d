//! A `RolloutGroup` decided: from its members' saved statuses, how far each may go (its
//! [`Gate`]), and, once one member has rolled back, which member rolls back next.
//!
//! Pure, like the machine: statuses in, inputs for the members out. The group keeps no state
//! of its own: everything it decides follows from its members' statuses, so a restarted daemon
//! decides the same.

use serde::Serialize;

use coalmine_spec::group::{GroupPolicy, Reached, RolloutGroup};
use coalmine_spec::rollout::Rollout;
use coalmine_spec::Weight;

use crate::machine::{Gate, Input, Outcome, Phase, Status};

/// A group compiled with its members' weight steps.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPlan {
    pub name: String,
    pub policy: GroupPolicy,
    pub members: Vec<MemberPlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemberPlan {
    pub name: String,
    /// Its weight steps (empty for A/B and blue-green, which `policy: order` allows).
    pub ladder: Vec<Weight>,
    /// Earlier members (by position) and how far each must be.
    pub depends_on: Vec<(usize, Reached)>,
}

impl GroupPlan {
    /// The plan of `group`; `rollout_of` gives each member's document (the documents were
    /// checked together: every member is there, dependencies come first).
    pub fn new<'a>(group: &RolloutGroup, rollout_of: impl Fn(&str) -> Option<&'a Rollout>) -> Self {
        let position = |name: &str| group.spec.members.iter().position(|m| m.name == name);
        GroupPlan {
            name: group.metadata.name.clone(),
            policy: group.spec.policy,
            members: group
                .spec
                .members
                .iter()
                .map(|m| MemberPlan {
                    name: m.name.clone(),
                    ladder: rollout_of(&m.name)
                        .and_then(|r| r.spec.analysis.weight_ladder())
                        .unwrap_or_default(),
                    depends_on: m
                        .depends_on
                        .iter()
                        .filter_map(|d| Some((position(&d.name)?, d.reached)))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Where a group stands, as its members' statuses say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GroupPhase {
    Progressing,
    /// A member rolled back; the others are being rolled back, the last listed first.
    RollingBack,
    RolledBack,
    Succeeded,
}

/// What the group decides now.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub phase: GroupPhase,
    /// Why the group rolls back: the member that failed first, and its own reason.
    pub reason: Option<String>,
    /// Inputs for members, by position (only those that change something).
    pub inputs: Vec<(usize, Input)>,
    /// By position: whether the member is in the group's current run (see [`decide`]); a
    /// member that ended in an earlier run is not, and the group's end concerns it no more.
    pub in_run: Vec<bool>,
}

/// Decides the group from its members' last saved statuses (`None`: not started yet).
///
/// Only the group's current run counts: the members whose runs overlap the newest member's
/// run. A member that ended before the newest one started belongs to an earlier run: its
/// rollback rolls nobody back now, and a promoted one is never reverted for a later failure.
pub fn decide(plan: &GroupPlan, statuses: &[Option<&Status>]) -> Decision {
    let in_run = current_run(statuses);
    // An earlier run's rollback left that member's version out: for the run now, it has not
    // started (its dependents and lock-step partners wait for it to be applied again).
    let statuses: Vec<Option<&Status>> = statuses
        .iter()
        .zip(&in_run)
        .map(|(s, current)| s.filter(|s| *current || s.outcome != Some(Outcome::RolledBack)))
        .collect();
    let applied_again = |i: usize| statuses[i].is_none() && !in_run[i];
    // The member that failed: the group's own rollbacks follow it, within the same
    // millisecond when the clock is quick or virtual, so time alone cannot tell.
    let failed_first = statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.filter(|s| s.outcome == Some(Outcome::RolledBack))
                .map(|s| (i, s))
        })
        .min_by_key(|(i, s)| (rolled_back_by(plan, s), s.last_transition_ms, *i));
    if let Some((origin, status)) = failed_first {
        return roll_back(plan, &statuses, &in_run, origin, status);
    }
    let all_promoted = statuses
        .iter()
        .all(|s| s.is_some_and(|s| s.outcome == Some(Outcome::Promoted)));
    let gates = match plan.policy {
        GroupPolicy::Together => together(plan, &statuses, applied_again),
        GroupPolicy::Order => in_order(plan, &statuses, applied_again),
    };
    let inputs = gates
        .into_iter()
        .enumerate()
        .filter(|(i, gate)| {
            statuses[*i].is_some_and(|s| !s.phase.is_final() && s.gate.as_ref() != Some(gate))
        })
        .map(|(i, gate)| (i, Input::Gate(gate)))
        .collect();
    Decision {
        phase: if all_promoted {
            GroupPhase::Succeeded
        } else {
            GroupPhase::Progressing
        },
        reason: None,
        inputs,
        in_run,
    }
}

/// Which members are in the group's current run: those whose runs (from `started_ms` to
/// their end, or still going) overlap the run of the member started last. A member not applied
/// yet is in it (it will start in it).
fn current_run(statuses: &[Option<&Status>]) -> Vec<bool> {
    let ended = |s: &Status| s.phase.is_final().then_some(s.last_transition_ms);
    let newest = statuses.iter().flatten().max_by_key(|s| s.started_ms);
    statuses
        .iter()
        .map(|s| match (s, newest) {
            (Some(s), Some(newest)) => {
                ended(s).is_none_or(|end| end >= newest.started_ms)
                    && ended(newest).is_none_or(|end| end >= s.started_ms)
            }
            _ => true,
        })
        .collect()
}

/// One member rolled back: every other one follows, the last listed first (a member's
/// dependencies are listed before it, so nothing new ever calls something old), one at a
/// time: the next only once the one before has rolled back.
fn roll_back(
    plan: &GroupPlan,
    statuses: &[Option<&Status>],
    in_run: &[bool],
    origin: usize,
    status: &Status,
) -> Decision {
    let evidence = status
        .message
        .strip_prefix("Rolling back: ")
        .unwrap_or(&status.message);
    let reason = format!(
        "{}{} rolled back ({evidence})",
        group_reason_start(plan),
        plan.members[origin].name
    );
    let next = statuses
        .iter()
        .enumerate()
        .rev()
        .find(|(i, s)| in_run[*i] && s.is_some_and(|s| s.outcome != Some(Outcome::RolledBack)));
    let inputs = match next {
        Some((i, Some(s))) if s.outcome == Some(Outcome::Promoted) => vec![(
            i,
            Input::Revert {
                reason: reason.clone(),
            },
        )],
        Some((i, _)) => vec![(
            i,
            Input::RollBack {
                reason: reason.clone(),
            },
        )],
        None => Vec::new(),
    };
    Decision {
        phase: if next.is_some() {
            GroupPhase::RollingBack
        } else {
            GroupPhase::RolledBack
        },
        reason: Some(reason),
        inputs,
        in_run: in_run.to_vec(),
    }
}

/// How the reason the group gives the members it rolls back begins.
fn group_reason_start(plan: &GroupPlan) -> String {
    format!("group {}: member ", plan.name)
}

/// Whether a member was rolled back by its group (its rollback's reason is the group's)
/// rather than by its own failure.
fn rolled_back_by(plan: &GroupPlan, status: &Status) -> bool {
    status.message.contains(&group_reason_start(plan))
}

/// How many of its weight steps a member has taken (0 before the first), one past its last
/// step once it promotes.
fn steps_taken(ladder: &[Weight], status: &Status) -> usize {
    if promoting(status) {
        return ladder.len() + 1;
    }
    ladder
        .iter()
        .filter(|w| **w <= status.canary_weight)
        .count()
}

fn promoting(status: &Status) -> bool {
    status.promoted
        || status.outcome == Some(Outcome::Promoted)
        || matches!(status.phase, Phase::Promoting | Phase::Finalising)
}

/// Lock-step: every member may take the step after the one all have taken, once each of them
/// has passed the step it is on (it waits at the gate); all promote when all have passed the
/// last one.
fn together(
    plan: &GroupPlan,
    statuses: &[Option<&Status>],
    applied_again: impl Fn(usize) -> bool,
) -> Vec<Gate> {
    let wanted: Vec<usize> = plan
        .members
        .iter()
        .zip(statuses)
        .map(|(m, s)| match s {
            Some(s) => steps_taken(&m.ladder, s) + usize::from(s.at_gate),
            None => 0,
        })
        .collect();
    let allowed = wanted.iter().copied().min().unwrap_or(0);
    let behind: Vec<String> = plan
        .members
        .iter()
        .zip(&wanted)
        .enumerate()
        .filter(|(_, (_, w))| **w == allowed)
        .map(|(i, (m, _))| member_name(&m.name, applied_again(i)))
        .collect();
    plan.members
        .iter()
        .map(|m| {
            let max_weight = match allowed {
                0 => Weight::ZERO,
                n => m.ladder.get(n - 1).copied().unwrap_or(Weight::FULL),
            };
            Gate {
                start: true,
                max_weight,
                promote: allowed > m.ladder.len(),
                waiting_for: format!(
                    "{} to pass {} (members move in lock-step)",
                    behind.join(", "),
                    match allowed {
                        0 => "their start".to_string(),
                        n if n > m.ladder.len() => "their last step".to_string(),
                        n => format!("{} %", m.ladder[n - 1].percent()),
                    }
                ),
            }
        })
        .collect()
}

/// A member as a gate's reason names it; one that rolled back in an earlier run of the group
/// waits to be applied again, and the reason says so.
fn member_name(name: &str, applied_again: bool) -> String {
    if applied_again {
        format!("{name} (rolled back in an earlier run: apply it again)")
    } else {
        name.to_string()
    }
}

/// In order: a member starts once each member it depends on has reached the step it names,
/// never takes more than a dependency not yet promoted has (its users are a subset of the
/// dependency's), and promotes only after its dependencies did.
fn in_order(
    plan: &GroupPlan,
    statuses: &[Option<&Status>],
    applied_again: impl Fn(usize) -> bool,
) -> Vec<Gate> {
    plan.members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut gate = Gate::open();
            let mut waits = Vec::new();
            let started = statuses[i].is_some_and(|s| {
                !matches!(
                    s.phase,
                    Phase::Initializing | Phase::Initialized | Phase::Waiting
                )
            });
            for &(dep, reached) in &m.depends_on {
                let name = &plan.members[dep].name;
                let Some(s) = statuses[dep] else {
                    gate.start = started;
                    gate.max_weight = Weight::ZERO;
                    gate.promote = false;
                    waits.push(format!(
                        "{} to start",
                        member_name(name, applied_again(dep))
                    ));
                    continue;
                };
                let done = s.outcome == Some(Outcome::Promoted);
                let far_enough = done
                    || match reached {
                        Reached::Promoted => false,
                        Reached::Weight(w) => promoting(s) || s.canary_weight >= w,
                    };
                if !far_enough {
                    gate.start &= started;
                    waits.push(format!("{name} to reach {reached}"));
                }
                if !done {
                    gate.promote = false;
                    if !promoting(s) {
                        gate.max_weight = gate.max_weight.min(s.canary_weight);
                    }
                    if far_enough {
                        waits.push(format!("{name} to promote"));
                    }
                }
            }
            gate.waiting_for = waits.join(", ");
            gate
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Machine, Plan};

    fn w(p: f64) -> Weight {
        Weight::from_percent(p).unwrap()
    }

    fn plan(policy: GroupPolicy, deps: &[&[(usize, Reached)]]) -> GroupPlan {
        GroupPlan {
            name: "payment-change".into(),
            policy,
            members: ["ledger", "payments", "orders"]
                .iter()
                .zip(deps)
                .map(|(n, d)| MemberPlan {
                    name: n.to_string(),
                    ladder: vec![w(10.0), w(50.0)],
                    depends_on: d.to_vec(),
                })
                .collect(),
        }
    }

    /// Three machines on one virtual clock with a passing analysis, driven as the daemon
    /// drives them: each tick, then the group's decision handed to each member.
    struct Members {
        machines: Vec<Machine>,
        plan: Plan,
        now: u64,
    }

    impl Members {
        fn new() -> Members {
            let analysis = coalmine_spec::parse_yaml(
                "a.yaml",
                "interval: 10s\nstepWeights: [10, 50]\nsequential: {enabled: false}\n",
            )
            .unwrap();
            let plan = Plan::new(&analysis, 600, false);
            Members {
                machines: (0..3).map(|_| Machine::new(plan.clone(), 0)).collect(),
                plan,
                now: 0,
            }
        }

        fn decide(&mut self, group: &GroupPlan) -> Decision {
            let statuses: Vec<Status> = self.machines.iter().map(|m| m.status().clone()).collect();
            let refs: Vec<Option<&Status>> = statuses.iter().map(Some).collect();
            let decision = decide(group, &refs);
            for (i, input) in decision.inputs.clone() {
                self.machines[i].handle(self.now, input);
            }
            decision
        }

        /// Ticks member `i` (answering its analysis with a pass) and lets the group decide.
        fn tick(&mut self, i: usize, group: &GroupPlan) {
            let m = &mut self.machines[i];
            let now = self.now.max(m.next_tick_ms().unwrap_or(self.now));
            self.now = now;
            for action in m.handle(now, Input::Tick { traffic: Ok(()) }) {
                if action == crate::Action::Ask(crate::Question::Analysis) {
                    m.handle(now, Input::Analysis { readings: vec![] });
                }
            }
            self.decide(group);
        }

        /// Member `i` applied again: a new run, started now, behind a closed gate (as the
        /// daemon starts a member).
        fn apply_again(&mut self, i: usize) {
            self.now += 60_000;
            let mut machine = Machine::new(self.plan.clone(), self.now);
            machine.handle(self.now, Input::Gate(Gate::closed("payment-change")));
            self.machines[i] = machine;
        }

        fn fail(&mut self, i: usize) {
            self.now += 1;
            let now = self.now;
            self.machines[i].handle(
                now,
                Input::RollBack {
                    reason: "canary 5xx 3.1 %".into(),
                },
            );
        }

        fn weights(&self) -> Vec<f64> {
            self.machines
                .iter()
                .map(|m| m.status().canary_weight.percent())
                .collect()
        }
    }

    #[test]
    fn members_in_lock_step_take_each_step_only_when_every_member_passed_the_one_before() {
        let group = plan(GroupPolicy::Together, &[&[], &[], &[]]);
        let mut members = Members::new();
        members.decide(&group);
        // Member 0 runs ahead alone: it may not pass 0 % while the others have not started.
        for _ in 0..4 {
            members.tick(0, &group);
        }
        assert_eq!(members.weights(), vec![0.0, 0.0, 0.0]);
        assert!(members.machines[0].status().at_gate);
        members.tick(1, &group);
        members.tick(1, &group);
        assert_eq!(
            members.weights(),
            vec![0.0, 0.0, 0.0],
            "orders still behind"
        );
        members.tick(2, &group);
        members.tick(2, &group);
        // The last one asked: the gate opened, each takes 10 % at its next tick.
        for i in 0..3 {
            members.tick(i, &group);
        }
        assert_eq!(members.weights(), vec![10.0, 10.0, 10.0]);
        for _ in 0..3 {
            for i in 0..3 {
                members.tick(i, &group);
            }
        }
        assert_eq!(members.weights(), vec![50.0, 50.0, 50.0]);
        for _ in 0..6 {
            for i in 0..3 {
                members.tick(i, &group);
            }
        }
        assert!(members
            .machines
            .iter()
            .all(|m| m.outcome() == Some(Outcome::Promoted)));
        assert_eq!(members.decide(&group).phase, GroupPhase::Succeeded);
    }

    #[test]
    fn one_failure_rolls_back_every_member_last_listed_first_a_promoted_one_too() {
        let group = plan(
            GroupPolicy::Order,
            &[
                &[],
                &[(0, Reached::Promoted)],
                &[(1, Reached::Weight(w(10.0)))],
            ],
        );
        let mut members = Members::new();
        members.decide(&group);
        for _ in 0..8 {
            members.tick(0, &group);
        }
        assert_eq!(members.machines[0].outcome(), Some(Outcome::Promoted));
        // payments started after ledger promoted; orders waits for payments' 10 %.
        for _ in 0..3 {
            members.tick(1, &group);
            members.tick(2, &group);
        }
        assert_eq!(members.weights()[1], 50.0);
        assert!(members.weights()[2] > 0.0 && members.weights()[2] <= 50.0);
        // orders' canary fails.
        members.now += 1;
        let now = members.now;
        members.machines[2].handle(
            now,
            Input::RollBack {
                reason: "sequential error test: canary 5xx 3.1 % vs stable 0.1 %, Bayes factor 212 > 100".into(),
            },
        );
        let first = members.decide(&group);
        assert_eq!(first.phase, GroupPhase::RollingBack);
        let reason = first.reason.unwrap();
        assert!(reason.contains("member orders rolled back"), "{reason}");
        assert!(reason.contains("Bayes factor 212"), "{reason}");
        // payments went first (the last listed still on), then ledger, reverted.
        assert!(matches!(first.inputs[..], [(1, Input::RollBack { .. })]));
        let second = members.decide(&group);
        assert!(matches!(second.inputs[..], [(0, Input::Revert { .. })]));
        let last = members.decide(&group);
        assert_eq!(last.phase, GroupPhase::RolledBack);
        // All three rolled back within one millisecond: the reason still names the one that
        // failed, not a member the group took back.
        let reason = last.reason.unwrap();
        assert!(
            reason.starts_with("group payment-change: member orders rolled back (sequential"),
            "{reason}"
        );
        for m in &members.machines {
            assert_eq!(m.outcome(), Some(Outcome::RolledBack));
            assert!(!m.traffic().promoted && !m.traffic().canary);
        }
    }

    #[test]
    fn in_order_a_dependent_waits_for_its_step_and_never_takes_more_than_its_dependency() {
        let group = plan(
            GroupPolicy::Order,
            &[&[], &[(0, Reached::Weight(w(10.0)))], &[]],
        );
        let mut members = Members::new();
        members.decide(&group);
        for _ in 0..3 {
            members.tick(1, &group);
        }
        assert_eq!(members.machines[1].status().phase, Phase::Waiting);
        assert!(members.machines[1]
            .status()
            .message
            .contains("ledger to reach 10 %"));
        for _ in 0..2 {
            members.tick(0, &group);
        }
        assert_eq!(members.weights()[0], 10.0);
        for _ in 0..5 {
            members.tick(1, &group);
        }
        assert_eq!(members.weights()[1], 10.0, "capped at ledger's weight");
        assert!(members.machines[1].status().at_gate);
    }

    #[test]
    fn a_member_applied_again_after_a_joint_rollback_is_not_blamed_for_the_earlier_run() {
        let group = plan(GroupPolicy::Together, &[&[], &[], &[]]);
        let mut members = Members::new();
        members.decide(&group);
        for _ in 0..3 {
            for i in 0..3 {
                members.tick(i, &group);
            }
        }
        assert_eq!(members.weights(), vec![10.0, 10.0, 10.0]);
        members.fail(2);
        while members.decide(&group).phase != GroupPhase::RolledBack {}
        // orders fixed and applied again alone: it is not rolled back for the old failure, and
        // waits at its start for the members that rolled back with it.
        members.apply_again(2);
        let decision = members.decide(&group);
        assert_eq!(decision.phase, GroupPhase::Progressing);
        assert_eq!(decision.in_run, vec![false, false, true]);
        for _ in 0..4 {
            members.tick(2, &group);
        }
        let orders = members.machines[2].status();
        assert_eq!(orders.outcome, None, "{}", orders.message);
        assert_eq!(orders.canary_weight, Weight::ZERO);
        let waiting = &orders.gate.as_ref().unwrap().waiting_for;
        assert!(
            waiting.contains("ledger (rolled back in an earlier run: apply it again)")
                && waiting.contains("payments (rolled back"),
            "{waiting}"
        );
        // The others applied again: the three go on in lock-step.
        members.apply_again(0);
        members.apply_again(1);
        assert_eq!(members.decide(&group).in_run, vec![true, true, true]);
        for _ in 0..3 {
            for i in 0..3 {
                members.tick(i, &group);
            }
        }
        assert_eq!(members.weights(), vec![10.0, 10.0, 10.0]);
    }

    #[test]
    fn a_later_release_of_one_member_never_reverts_members_an_earlier_run_promoted() {
        let group = plan(GroupPolicy::Together, &[&[], &[], &[]]);
        let mut members = Members::new();
        members.decide(&group);
        for _ in 0..12 {
            for i in 0..3 {
                members.tick(i, &group);
            }
        }
        assert_eq!(members.decide(&group).phase, GroupPhase::Succeeded);
        // A new version of orders alone, later: the promoted members do not hold it back...
        members.apply_again(2);
        members.decide(&group);
        for _ in 0..3 {
            members.tick(2, &group);
        }
        assert_eq!(members.weights()[2], 10.0);
        // ...and its failure rolls back only itself.
        members.fail(2);
        let decision = members.decide(&group);
        assert_eq!(decision.phase, GroupPhase::RolledBack);
        assert!(decision.inputs.is_empty(), "{:?}", decision.inputs);
        assert_eq!(decision.in_run, vec![false, false, true]);
        for m in &members.machines[..2] {
            assert_eq!(m.outcome(), Some(Outcome::Promoted));
        }
    }
}
