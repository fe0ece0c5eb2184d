//! What the operator does about one rollout when it looks at it: Flagger's change detection
//! (`pkg/canary/spec.go`, `pkg/controller/scheduler.go`) as a pure rule over what the cluster
//! shows — no IO, no clock.

/// What the operator saw of one rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen<'a> {
    /// Whether `<target>-primary` exists.
    pub primary_exists: bool,
    /// The digest of the target's pod template and tracked configs now.
    pub spec_hash: &'a str,
    /// `status.lastAppliedSpec` and `status.lastPromotedSpec`.
    pub last_applied: Option<&'a str>,
    pub last_promoted: Option<&'a str>,
    /// A run's saved state exists and has not ended (`status.state` without an outcome).
    pub unfinished_run: bool,
    /// The revision (spec hash) of the run this operator is driving now, if any. Its own
    /// record, not the status: a run that has just started has not written its revision yet,
    /// and reading the old one from the status would restart it (and lose it).
    pub driving: Option<&'a str>,
}

/// The operator's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// No primary yet, or not yet recorded as ready: create it and the Services, then scale
    /// the target to 0 (Flagger's
    /// `Initializing` → `Initialized`); the current template counts as promoted.
    Initialize,
    /// A run was under way when its operator went (a restart, another leader): drive it on
    /// from its saved state.
    Resume,
    /// A new revision: start a run for it.
    Start,
    /// A new revision while a run is under way (or saved unfinished): stop that run, its traffic
    /// back on the primary, then look again (Flagger restarts its analysis on a new revision).
    Restart,
    /// The template is back at the promoted revision (a manual rollback): record it as applied,
    /// start nothing.
    Adopt,
    /// Nothing to do.
    Idle,
}

pub fn next(seen: &Seen<'_>) -> Next {
    // Initialised once the primary exists *and* that was recorded: a primary created by an
    // initialisation still waiting for it to be ready is not yet a baseline to compare with.
    if !seen.primary_exists || seen.last_applied.is_none() {
        return Next::Initialize;
    }
    let changed = seen.last_applied != Some(seen.spec_hash);
    if let Some(revision) = seen.driving {
        return if revision != seen.spec_hash {
            Next::Restart
        } else {
            Next::Idle
        };
    }
    if seen.unfinished_run && !changed {
        return Next::Resume;
    }
    if !changed {
        return Next::Idle;
    }
    if seen.unfinished_run {
        // The revision changed while nobody drove the run: that run's canary must still be
        // taken off (never leave traffic on a canary nobody watches), then the new revision
        // is looked at again.
        return Next::Restart;
    }
    if seen.last_promoted == Some(seen.spec_hash) {
        return Next::Adopt;
    }
    Next::Start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(hash: &'static str) -> Seen<'static> {
        Seen {
            primary_exists: true,
            spec_hash: hash,
            last_applied: Some("v1"),
            last_promoted: Some("v1"),
            unfinished_run: false,
            driving: None,
        }
    }

    #[test]
    fn flaggers_change_detection() {
        let cases = [
            (
                Seen {
                    primary_exists: false,
                    ..seen("v1")
                },
                Next::Initialize,
            ),
            (
                Seen {
                    last_applied: None,
                    last_promoted: None,
                    ..seen("v1")
                },
                Next::Initialize,
            ),
            (seen("v1"), Next::Idle),
            (seen("v2"), Next::Start),
            (
                Seen {
                    driving: Some("v2"),
                    last_applied: Some("v2"),
                    ..seen("v2")
                },
                Next::Idle,
            ),
            (
                Seen {
                    driving: Some("v2"),
                    last_applied: Some("v2"),
                    ..seen("v3")
                },
                Next::Restart,
            ),
            // A run just started has not written its revision to the status yet: it goes on.
            (
                Seen {
                    driving: Some("v2"),
                    last_applied: Some("v1"),
                    ..seen("v2")
                },
                Next::Idle,
            ),
            (
                Seen {
                    unfinished_run: true,
                    last_applied: Some("v2"),
                    ..seen("v2")
                },
                Next::Resume,
            ),
            (
                Seen {
                    unfinished_run: true,
                    last_applied: Some("v2"),
                    ..seen("v3")
                },
                Next::Restart,
            ),
            // `kubectl rollout undo` back to the promoted template starts nothing...
            (
                Seen {
                    last_applied: Some("v2"),
                    ..seen("v1")
                },
                Next::Adopt,
            ),
            // ...but an unfinished run of the abandoned revision is stopped first.
            (
                Seen {
                    unfinished_run: true,
                    last_applied: Some("v2"),
                    ..seen("v1")
                },
                Next::Restart,
            ),
        ];
        for (seen, expected) in cases {
            assert_eq!(next(&seen), expected, "{seen:?}");
        }
    }
}
