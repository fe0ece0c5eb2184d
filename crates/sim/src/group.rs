//! A `RolloutGroup` simulated as one release: each member's machine over its own synthetic
//! traffic, on one virtual clock, and the group decided between steps as `serve` decides it —
//! the rollout crate's [`decide`] on the members' statuses, its inputs handed to the members,
//! again until the group has nothing more to say at that moment (the daemon decides again
//! after every saved step, within milliseconds).

use serde::Serialize;

use coalmine_rollout::group::{decide, Decision, GroupPhase, GroupPlan};
use coalmine_rollout::{EventLevel, Gate, Input, Status};
use coalmine_spec::rollout::Analysis;
use coalmine_spec::scenario::Scenario;
use coalmine_spec::Weight;

use crate::{Decision as RunDecision, Rng, Simulated, STEP_MS};

/// One member as the simulation runs it (in the group's order).
pub struct MemberSetup<'a> {
    /// Its analysis as [`crate::simulated_analysis`] leaves it.
    pub analysis: &'a Analysis,
    pub progress_deadline_seconds: u64,
    /// Its traffic and how its versions behave.
    pub scenario: &'a Scenario,
}

/// What one simulated run of a group did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupRun {
    pub group: String,
    /// Where the group stands at the end: `Succeeded`, `RolledBack`, or still going when the
    /// longest scenario's duration ran out.
    pub phase: GroupPhase,
    /// Why it rolls back: the member that failed first, and its reason.
    pub reason: Option<String>,
    /// When the group ended (virtual ms since its start).
    pub decided_ms: Option<u64>,
    pub members: Vec<MemberEnd>,
    /// Every member's events and the group's phase changes, oldest first.
    pub timeline: Vec<Moment>,
}

/// A member at the end of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberEnd {
    pub name: String,
    pub decision: RunDecision,
    pub canary_requests: u64,
    pub canary_failures: u64,
}

/// One line of the group's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Moment {
    pub time_ms: u64,
    /// The member it happened to; `None` for the group itself (its phase changed).
    pub member: Option<String>,
    /// The member's canary weight then.
    pub weight: Weight,
    /// The member's gate then: how far its group lets it go.
    pub gate: Option<Gate>,
    pub level: EventLevel,
    pub message: String,
}

/// Runs `plan`'s members (`members`, in the plan's order) until the group has succeeded or
/// rolled back, or the longest scenario ends. Member `i` draws from `Rng::for_run(seed, i)`:
/// its traffic does not change when another member's scenario does.
pub fn run_group(plan: &GroupPlan, members: &[MemberSetup], seed: u64) -> GroupRun {
    let mut run = GroupSim {
        plan,
        sims: members
            .iter()
            .map(|m| Simulated::new(m.analysis, m.progress_deadline_seconds, m.scenario, true))
            .collect(),
        timeline: Vec::new(),
        phase: None,
    };
    let mut rngs: Vec<Rng> = (0..members.len())
        .map(|i| Rng::for_run(seed, i as u64))
        .collect();
    let duration_ms = members
        .iter()
        .map(|m| m.scenario.duration.0.as_millis() as u64)
        .max()
        .unwrap_or(0);
    // Every member starts behind a closed gate, as `serve` starts them.
    for i in 0..run.sims.len() {
        run.feed(i, 0, Input::Gate(Gate::closed(&plan.name)));
    }
    let mut now = 0;
    let mut decision = run.settle(now);
    while !ended(&decision) && now < duration_ms {
        for i in 0..run.sims.len() {
            run.sims[i].tick_if_due(now);
            run.record_events(i);
        }
        decision = run.settle(now);
        if ended(&decision) {
            break;
        }
        for (i, rng) in rngs.iter_mut().enumerate() {
            // A member that has ended serves its users from one version: nothing to judge.
            if run.sims[i].machine.outcome().is_none() {
                run.sims[i].serve(now, rng);
                run.record_events(i);
            }
        }
        now += STEP_MS;
        decision = run.settle(now);
    }
    GroupRun {
        group: plan.name.clone(),
        phase: decision.phase,
        decided_ms: ended(&decision).then_some(now),
        reason: decision.reason,
        members: plan
            .members
            .iter()
            .zip(&run.sims)
            .map(|(m, sim)| {
                let result = sim.result(None);
                MemberEnd {
                    name: m.name.clone(),
                    decision: result.decision,
                    canary_requests: result.canary_requests,
                    canary_failures: result.canary_failures,
                }
            })
            .collect(),
        timeline: run.timeline,
    }
}

fn ended(decision: &Decision) -> bool {
    matches!(
        decision.phase,
        GroupPhase::Succeeded | GroupPhase::RolledBack
    )
}

struct GroupSim<'p, 's> {
    plan: &'p GroupPlan,
    sims: Vec<Simulated<'s>>,
    timeline: Vec<Moment>,
    phase: Option<GroupPhase>,
}

impl GroupSim<'_, '_> {
    fn feed(&mut self, member: usize, now: u64, input: Input) {
        self.sims[member].feed(now, input);
        self.record_events(member);
    }

    /// The member's new events onto the timeline.
    fn record_events(&mut self, member: usize) {
        let sim = &mut self.sims[member];
        let gate = sim.machine.status().gate.clone();
        for event in sim.take_events() {
            self.timeline.push(Moment {
                time_ms: event.time_ms,
                member: Some(self.plan.members[member].name.clone()),
                weight: event.weight,
                gate: gate.clone(),
                level: event.level,
                message: event.message,
            });
        }
    }

    /// Decides the group and hands its inputs to the members, until it has none left at `now`
    /// (each input is a saved step the daemon would decide again on). Bounded: each round
    /// either ends a member or gives one a gate it then holds.
    fn settle(&mut self, now: u64) -> Decision {
        let rounds = 2 * self.sims.len() + 2;
        let mut decision = self.decide();
        for _ in 0..rounds {
            if decision.inputs.is_empty() {
                break;
            }
            for (i, input) in std::mem::take(&mut decision.inputs) {
                self.feed(i, now, input);
            }
            // A member its new gate lets go on ticks at once, as the driver does.
            for i in 0..self.sims.len() {
                self.sims[i].tick_if_due(now);
                self.record_events(i);
            }
            decision = self.decide();
        }
        if self.phase != Some(decision.phase) {
            self.phase = Some(decision.phase);
            self.timeline.push(Moment {
                time_ms: now,
                member: None,
                weight: Weight::ZERO,
                gate: None,
                level: match decision.phase {
                    GroupPhase::RollingBack | GroupPhase::RolledBack => EventLevel::Warning,
                    GroupPhase::Progressing | GroupPhase::Succeeded => EventLevel::Info,
                },
                message: match &decision.reason {
                    Some(reason) => format!("Group {:?}: {reason}", decision.phase),
                    None => format!("Group {:?}", decision.phase),
                },
            });
        }
        decision
    }

    fn decide(&self) -> Decision {
        let statuses: Vec<Option<&Status>> =
            self.sims.iter().map(|s| Some(s.machine.status())).collect();
        decide(self.plan, &statuses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_spec::group::{GroupPolicy, RolloutGroup};
    use coalmine_spec::rollout::Rollout;

    const MEMBER: &str = "interval: 30s
threshold: 2
stepWeights: [10, 50]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}, interval: 30s}
";

    fn scenario(canary_error_rate: f64) -> Scenario {
        coalmine_spec::scenario::parse_scenario(
            "s.yaml",
            &format!(
                "traffic: {{rps: 100}}
duration: 20m
stable: {{errorRate: 0.001, latency: {{median: 50ms, sigma: 0.5}}}}
canary: {{errorRate: {canary_error_rate}, latency: {{median: 50ms, sigma: 0.5}}}}
"
            ),
        )
        .unwrap()
    }

    fn plan() -> GroupPlan {
        let group: RolloutGroup = coalmine_spec::parse_yaml(
            "g.yaml",
            "apiVersion: coalmine.dev/v1alpha1
kind: RolloutGroup
metadata: {name: release}
spec:
  members: [{name: ledger}, {name: payments}, {name: orders}]
",
        )
        .unwrap();
        let rollouts: Vec<Rollout> = ["ledger", "payments", "orders"]
            .iter()
            .map(|name| {
                coalmine_spec::parse_yaml(
                    "r.yaml",
                    &format!(
                        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata: {{name: {name}}}
spec:
  analysis:
    interval: 30s
    stepWeights: [10, 50]
"
                    ),
                )
                .unwrap()
            })
            .collect();
        let plan = GroupPlan::new(&group, |n| rollouts.iter().find(|r| r.metadata.name == n));
        assert_eq!(plan.policy, GroupPolicy::Together);
        plan
    }

    fn run(scenarios: [&Scenario; 3]) -> GroupRun {
        let analysis: Analysis = coalmine_spec::parse_yaml("a.yaml", MEMBER).unwrap();
        let (analysis, _) = crate::simulated_analysis(&analysis, crate::Semantics::Coalmine);
        let members: Vec<MemberSetup> = scenarios
            .iter()
            .map(|s| MemberSetup {
                analysis: &analysis,
                progress_deadline_seconds: 600,
                scenario: s,
            })
            .collect();
        run_group(&plan(), &members, 7)
    }

    /// When each member first had `weight` (ms), in the group's order.
    fn reached(run: &GroupRun, message: &str) -> Vec<u64> {
        ["ledger", "payments", "orders"]
            .iter()
            .map(|m| {
                run.timeline
                    .iter()
                    .find(|t| t.member.as_deref() == Some(*m) && t.message == message)
                    .unwrap_or_else(|| panic!("{m}: no {message:?} in {:#?}", run.timeline))
                    .time_ms
            })
            .collect()
    }

    #[test]
    fn a_healthy_group_takes_every_step_together_and_promotes() {
        let healthy = scenario(0.001);
        let run = run([&healthy; 3]);
        assert_eq!(run.phase, GroupPhase::Succeeded, "{:#?}", run.timeline);
        assert!(run
            .members
            .iter()
            .all(|m| m.decision == RunDecision::Promoted));
        let at_10 = reached(&run, "Advance canary weight 10");
        let at_50 = reached(&run, "Advance canary weight 50");
        // Lock-step: nobody takes 50 % before everybody has taken 10 %.
        assert!(
            at_10.iter().max() < at_50.iter().min(),
            "{at_10:?} {at_50:?}"
        );
        assert!(at_10.iter().all(|t| *t == at_10[0]), "{at_10:?}");
    }

    #[test]
    fn a_failing_last_member_takes_the_others_back_last_listed_first() {
        let (healthy, failing) = (scenario(0.001), scenario(0.2));
        let run = run([&healthy, &healthy, &failing]);
        assert_eq!(run.phase, GroupPhase::RolledBack, "{:#?}", run.timeline);
        let reason = run.reason.as_deref().unwrap();
        assert!(
            reason.starts_with("group release: member orders rolled back (Sequential test"),
            "{reason}"
        );
        let order: Vec<&str> = run
            .timeline
            .iter()
            .filter(|t| t.message.starts_with("Rolling back"))
            .filter_map(|t| t.member.as_deref())
            .collect();
        assert_eq!(order, ["orders", "payments", "ledger"]);
        assert!(run
            .members
            .iter()
            .all(|m| m.decision == RunDecision::RolledBack));
    }
}
