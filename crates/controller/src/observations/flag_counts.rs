//! The counts an app reports per variant of a rollout's feature flag (`POST
//! /api/v1/flags/{key}/counts` on `serve`) as an observation source: each sample takes what was
//! reported since the one before, the canary variant's as the canary's and the stable variant's
//! as stable's. Used when the flag is all the rollout steps; with routers too, the routers count
//! the same users' requests.

use coalmine_rollout::Observation;
use coalmine_spec::rollout::Rollout;

use super::{ObservationSource, ObserveError, Registration, Sample};
use crate::flags;
use crate::{BoxFuture, Unrunnable};

pub const REGISTERED: Registration = Registration { takes, open };

fn takes(rollout: &Rollout) -> bool {
    crate::traffic::flag::alone(rollout)
}

fn open(rollout: &Rollout) -> Result<Box<dyn ObservationSource>, Unrunnable> {
    let flag = rollout.spec.flag.as_ref().ok_or_else(|| Unrunnable {
        field: "flag".into(),
        message: "the rollout has no flag".into(),
    })?;
    Ok(Box::new(FlagCounts {
        key: flag.key.clone(),
        canary: flag.canary.clone(),
        stable: flag.stable.clone(),
        started: false,
    }))
}

struct FlagCounts {
    key: String,
    canary: String,
    stable: String,
    /// The first sample only starts counting: what was reported before belongs to no step.
    started: bool,
}

impl ObservationSource for FlagCounts {
    fn sample(&mut self) -> BoxFuture<'_, Result<Sample, ObserveError>> {
        let table = flags::served();
        let counts = Observation {
            canary: table.take_counts(&self.key, &self.canary),
            stable: table.take_counts(&self.key, &self.stable),
            // An app's counts pair no request with another.
            ..Observation::default()
        };
        let started = std::mem::replace(&mut self.started, true);
        Box::pin(async move {
            Ok(Sample {
                counts: if started { counts } else { Observation::default() },
                restarted: false,
            })
        })
    }
}
