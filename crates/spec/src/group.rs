//! `RolloutGroup`: rollouts of several services released as one — in lock-step or in order —
//! rolled back together, their users kept in one cohort across the services.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rollout::{Analysis, Metadata, Rollout, API_VERSION};
use crate::Weight;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutGroup {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: GroupSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupSpec {
    /// `together` (default): every member takes each step only when every member passed the
    /// one before, and all promote at once. `order`: a member starts when the members it
    /// `dependsOn` reached the step it names.
    #[serde(default)]
    pub policy: GroupPolicy,
    /// The rollouts, by name, in the order they depend on each other (a member's dependencies
    /// come before it): a joint rollback takes them back in the reverse order.
    pub members: Vec<Member>,
    /// Whether the members' users fall into one cohort (default): a user on one member's canary
    /// is on every member's canary at the same weight, so a request chain never mixes versions.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub shared_cohort: bool,
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GroupPolicy {
    #[default]
    Together,
    Order,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Member {
    /// The rollout's name: a Rollout, or a Canary, among the files applied with the group (on
    /// Kubernetes: in the group's namespace).
    pub name: String,
    /// With `policy: order`: the earlier members this one waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<Dependency>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dependency {
    /// An earlier member.
    pub name: String,
    /// How far it must be: a canary weight (`50`: it has reached 50 %) or `promoted`
    /// (default).
    #[serde(default)]
    pub reached: Reached,
}

/// How far a dependency must have gone before its dependent starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reached {
    Weight(Weight),
    #[default]
    Promoted,
}

impl fmt::Display for Reached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reached::Weight(w) => write!(f, "{} %", w.percent()),
            Reached::Promoted => f.write_str("promoted"),
        }
    }
}

/// In a CRD: a number or `promoted` (a weight may have decimals, which
/// `x-kubernetes-int-or-string` would refuse); read by [`Reached`]'s own deserializer, whose
/// error the operator reports on the group.
impl JsonSchema for Reached {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Reached".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-preserve-unknown-fields": true,
            "description": "A weight step of the dependency (a percentage, as 50) or `promoted` (default)."
        })
    }
}

impl Serialize for Reached {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Reached::Weight(w) => w.serialize(s),
            Reached::Promoted => s.serialize_str("promoted"),
        }
    }
}

impl<'de> Deserialize<'de> for Reached {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) if t == "promoted" => Ok(Reached::Promoted),
            Raw::Number(n) if n > 0.0 => Weight::from_percent(n)
                .map(Reached::Weight)
                .map_err(serde::de::Error::custom),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "reached {n}: a weight above 0 (a percentage, as 50), or `promoted`"
            ))),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "reached {t:?}: a weight (a percentage, as 50) or `promoted`"
            ))),
        }
    }
}

impl GroupSpec {
    /// The group's mistakes, as (field, message) in member order: a group's members are
    /// rollouts known to `member_of` (their analysis and own cohort), each in one group
    /// (`claimed_by_other`: the other group that already has it), named once; a member depends
    /// only on members before it (so the list is an order to roll back in reverse — no cycle),
    /// and only in `policy: order`; members in lock-step take the same weight steps (at the
    /// same weight, one cohort is the same users on every member); a member keeps no cohort of
    /// its own when the group shares one. `unknown` says a name is no rollout.
    pub fn errors<'a>(
        &self,
        member_of: impl Fn(&str) -> Option<(&'a Analysis, Option<&'a str>)>,
        unknown: impl Fn(&str) -> String,
        mut claimed_by_other: impl FnMut(&str) -> Option<String>,
    ) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        if self.members.is_empty() {
            errors.push((
                "spec.members".to_string(),
                "a group has at least one member".to_string(),
            ));
            return errors;
        }
        let mut first_ladder: Option<(&str, Option<Vec<Weight>>)> = None;
        for (i, member) in self.members.iter().enumerate() {
            let field = format!("spec.members[{i}].name");
            let Some((analysis, cohort)) = member_of(&member.name) else {
                errors.push((field, unknown(&member.name)));
                continue;
            };
            if self.members[..i].iter().any(|m| m.name == member.name) {
                errors.push((field, format!("member {:?} is listed twice", member.name)));
                continue;
            }
            if let Some(other) = claimed_by_other(&member.name) {
                errors.push((field.clone(), format!("{:?} is already a member of group {other:?}: a rollout belongs to one group", member.name)));
            }
            if let (Some(own), true) = (cohort, self.shared_cohort) {
                errors.push((field.clone(), format!("member {:?} names its own cohort {own:?}, but the group's members share one: remove spec.cohort from the rollout, or set the group's sharedCohort: false", member.name)));
            }
            for (j, dep) in member.depends_on.iter().enumerate() {
                let dep_field = format!("spec.members[{i}].dependsOn[{j}].name");
                if self.policy != GroupPolicy::Order {
                    errors.push((dep_field, "dependsOn is for policy: order (policy: together moves every member in lock-step)".into()));
                    break;
                }
                let Some(k) = self.members[..i].iter().position(|m| m.name == dep.name) else {
                    errors.push((dep_field, format!("{:?} is not a member listed before {:?}: list the members in the order they depend on each other", dep.name, member.name)));
                    continue;
                };
                if let Reached::Weight(w) = dep.reached {
                    let ladder =
                        member_of(&self.members[k].name).and_then(|(a, _)| a.weight_ladder());
                    if !ladder.is_some_and(|l| l.contains(&w)) {
                        errors.push((format!("spec.members[{i}].dependsOn[{j}].reached"), format!("{:?} never stops at {} %: reached names one of its weight steps, or promoted", dep.name, w.percent())));
                    }
                }
            }
            if self.policy == GroupPolicy::Together {
                let ladder = analysis.weight_ladder();
                if ladder.is_none() {
                    errors.push((field.clone(), format!("member {:?} has no weight steps (A/B or blue-green): members in lock-step move by weight; use policy: order", member.name)));
                }
                match &first_ladder {
                    None => first_ladder = Some((&member.name, ladder)),
                    Some((first, steps))
                        if *steps != ladder && ladder.is_some() && steps.is_some() =>
                    {
                        let show = |l: &Option<Vec<Weight>>| {
                            l.iter()
                                .flatten()
                                .map(|w| w.percent().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        };
                        errors.push((field, format!("member {:?} steps through [{}], {first:?} through [{}]: members in lock-step take the same weight steps", member.name, show(&ladder), show(steps))));
                    }
                    Some(_) => {}
                }
            }
        }
        errors
    }
}

impl RolloutGroup {
    /// A group's kind and apiVersion.
    pub const KIND: &'static str = "RolloutGroup";
    pub const API_VERSION: &'static str = API_VERSION;

    /// The cohort its members share: their routes' sticky buckets and the flags' buckets.
    pub fn cohort(&self) -> Option<String> {
        self.spec
            .shared_cohort
            .then(|| format!("group/{}", self.metadata.name))
    }

    /// Marks `rollout`, one of its members, as such: the group's annotation, and its cohort
    /// when the members share one.
    pub fn mark_member(&self, rollout: &mut Rollout) {
        rollout.metadata.annotations.insert(
            crate::rollout::GROUP_ANNOTATION.to_string(),
            self.metadata.name.clone(),
        );
        if let Some(cohort) = self.cohort() {
            rollout.spec.cohort = Some(cohort);
        }
    }

    /// Marks its members among `rollouts` (see [`Self::mark_member`]) and, when they share a
    /// cohort and pin users with `sessionAffinity`, with the release they make together: each
    /// member's canary as its document gives it, hashed ([`coalmine_contract::group_release`]).
    /// Their affinity cookie derives from the cohort and this release, so it is one cookie on
    /// every member, and a new canary of any member is a new cookie that pins nobody from the
    /// release before.
    pub fn mark_members(&self, rollouts: &mut [Rollout]) {
        let release = self.cohort().map(|_| {
            let canaries: Vec<(&str, String)> = self
                .spec
                .members
                .iter()
                .filter_map(|m| {
                    let r = rollouts.iter().find(|r| r.metadata.name == m.name)?;
                    let canary = serde_json::to_string(&r.spec.canary).unwrap_or_default();
                    Some((m.name.as_str(), canary))
                })
                .collect();
            coalmine_contract::group_release(canaries.iter().map(|(m, c)| (*m, c.as_str())))
        });
        for r in rollouts
            .iter_mut()
            .filter(|r| self.member(&r.metadata.name).is_some())
        {
            self.mark_member(r);
            // Only a member pinning users needs it (a changed document would restart the rest).
            if let (Some(release), Some(_)) = (&release, &r.spec.analysis.session_affinity) {
                r.metadata.annotations.insert(
                    crate::rollout::GROUP_RELEASE_ANNOTATION.to_string(),
                    release.clone(),
                );
            }
        }
    }

    /// The member of this name, with its position.
    pub fn member(&self, name: &str) -> Option<(usize, &Member)> {
        self.spec
            .members
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dependency_is_reached_at_a_weight_or_at_promotion() {
        let g: GroupSpec = crate::parse_yaml(
            "g.yaml",
            "policy: order\nmembers:\n- name: ledger\n- name: payments\n  dependsOn: [{name: ledger, reached: 50}]\n- name: orders\n  dependsOn: [{name: payments}]\n",
        )
        .unwrap();
        assert_eq!(g.policy, GroupPolicy::Order);
        assert_eq!(
            g.members[1].depends_on[0].reached,
            Reached::Weight(Weight::from_percent(50.0).unwrap())
        );
        assert_eq!(g.members[2].depends_on[0].reached, Reached::Promoted);
        assert!(g.shared_cohort);
        let bad = crate::parse_yaml::<GroupSpec>(
            "g.yaml",
            "members:\n- name: a\n  dependsOn: [{name: b, reached: soon}]\n",
        )
        .unwrap_err();
        assert!(bad.to_string().contains("`promoted`"), "{bad}");
        assert_eq!(bad.line, 3, "{bad}");
    }

    #[test]
    fn a_group_is_checked_against_its_members_by_field() {
        let analysis = |steps: &str| -> Analysis {
            crate::parse_yaml("a.yaml", &format!("interval: 1m\nstepWeights: {steps}\n")).unwrap()
        };
        let (ledger, payments) = (analysis("[10, 20]"), analysis("[10, 50]"));
        let spec: GroupSpec = crate::parse_yaml(
            "g.yaml",
            "members:\n- name: ledger\n- name: payments\n  dependsOn: [{name: ledger}]\n- name: inventory\n- name: ledger\n",
        )
        .unwrap();
        let errors = spec.errors(
            |name| match name {
                "ledger" => Some((&ledger, None)),
                "payments" => Some((&payments, Some("own"))),
                _ => None,
            },
            |name| format!("no rollout {name}"),
            |name| (name == "payments").then(|| "older".to_string()),
        );
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.members[1].name",
                "spec.members[1].name",
                "spec.members[1].dependsOn[0].name",
                "spec.members[1].name",
                "spec.members[2].name",
                "spec.members[3].name",
            ],
            "{errors:#?}"
        );
        assert!(errors[0].1.contains("already a member of group \"older\""));
        assert!(errors[1].1.contains("names its own cohort \"own\""));
        assert!(errors[2].1.starts_with("dependsOn is for policy: order"));
        assert!(errors[3]
            .1
            .contains("steps through [10, 50], \"ledger\" through [10, 20]"));
        assert_eq!(errors[4].1, "no rollout inventory");
        assert_eq!(errors[5].1, "member \"ledger\" is listed twice");
    }
}
