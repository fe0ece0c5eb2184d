//! `RolloutGroup`: rollouts of several services released as one — in lock-step or in order —
//! rolled back together, their users kept in one cohort across the services.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rollout::{Metadata, Rollout, API_VERSION};
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
    /// The rollout's name (a Rollout, or a Canary, among the files applied with the group).
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
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
}
