//! The traffic backend for a rollout's feature flag (`spec.flag`): what the flag serves is the
//! machine's `Traffic` — no canary: the stable variant; a canary: its weight as the canary
//! variant's share of users (and the targeted users); promoted: the canary variant — written
//! into this process's [`FlagTable`](crate::flags::FlagTable), which `serve` answers OFREP
//! evaluations from. Applying the saved traffic is all a restarted daemon needs to serve the same
//! share again.
//!
//! A rollout with a flag and no routers uses this backend alone; one with routers too steps
//! both together ([`alongside`]): the routers first, then the flag, each idempotently.

use std::sync::Arc;

use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::flag::Flag;
use coalmine_spec::rollout::Rollout;

use super::{Registration, TrafficBackend};
use crate::flags::{self, ServedFlag, Serving};
use crate::{BoxFuture, Runner, Unrunnable};

pub const REGISTERED: Registration = Registration {
    takes,
    wanted,
    check,
    open,
};

/// A flag without routers: the flag is all the rollout steps.
fn takes(rollout: &Rollout, runner: Runner) -> bool {
    runner == Runner::Serve && alone(rollout)
}

/// Whether the rollout steps its flag and nothing else.
pub fn alone(rollout: &Rollout) -> bool {
    let spec = &rollout.spec;
    spec.flag.is_some() && spec.routers.is_empty() && spec.router.is_none()
}

fn wanted(runner: Runner) -> Unrunnable {
    Unrunnable {
        field: "flag".into(),
        message: match runner {
            Runner::Run => "step a feature flag (spec.flag) under `coalmine serve`, which serves it",
            Runner::Serve => "give a feature flag to step (spec.flag)",
        }
        .into(),
    }
}

/// A flag is served only by `serve`; its targeting rules must compile.
pub fn check(rollout: &Rollout, runner: Runner) -> Result<(), Unrunnable> {
    let Some(flag) = &rollout.spec.flag else {
        return Ok(());
    };
    if runner != Runner::Serve {
        return Err(Unrunnable {
            field: "flag".into(),
            message: "a feature flag is served by `coalmine serve`: apply the rollout there".into(),
        });
    }
    served_flag(rollout, flag, Serving::Stable)?;
    Ok(())
}

fn served_flag(rollout: &Rollout, flag: &Flag, serving: Serving) -> Result<ServedFlag, Unrunnable> {
    ServedFlag::new(
        &rollout.metadata.name,
        rollout.cohort(),
        rollout.spec.router_service(),
        flag,
        serving,
    )
    .map_err(|e| Unrunnable {
        field: "flag.targeting".into(),
        message: e.to_string(),
    })
}

fn open(rollout: &Rollout, _owner: &str) -> Result<Box<dyn TrafficBackend>, Unrunnable> {
    Ok(Box::new(FlagBackend::new(rollout)?))
}

/// The backend carrying `rollout`'s traffic: `inner` (the registered backend that took it),
/// with its flag stepped alongside when it has one and `inner` is not already the flag's.
pub fn alongside(
    rollout: &Rollout,
    inner: Box<dyn TrafficBackend>,
) -> Result<Box<dyn TrafficBackend>, Unrunnable> {
    if rollout.spec.flag.is_none() || alone(rollout) {
        return Ok(inner);
    }
    Ok(Box::new(Both {
        inner: inner.into(),
        flag: FlagBackend::new(rollout)?,
    }))
}

/// One rollout's flag in this process's table.
struct FlagBackend {
    /// The flag compiled, serving nothing yet (`apply` sets what it serves).
    flag: ServedFlag,
}

impl FlagBackend {
    fn new(rollout: &Rollout) -> Result<FlagBackend, Unrunnable> {
        let flag = rollout.spec.flag.as_ref().ok_or_else(|| Unrunnable {
            field: "flag".into(),
            message: "the rollout has no flag".into(),
        })?;
        Ok(FlagBackend {
            flag: served_flag(rollout, flag, Serving::Stable)?,
        })
    }

    fn key(&self) -> &str {
        &self.flag.flag.key
    }

    fn serve(&self, traffic: &Traffic) -> Result<(), TrafficFault> {
        let serving = if traffic.promoted {
            Serving::Promoted
        } else if traffic.canary {
            Serving::Split(traffic.canary_weight)
        } else {
            Serving::Stable
        };
        flags::served()
            .serve(ServedFlag {
                serving,
                ..self.flag.clone()
            })
            .map_err(|e| TrafficFault::Refused(e.to_string()))
    }
}

impl TrafficBackend for FlagBackend {
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        let claimed = flags::served()
            .claim(self.key(), &self.flag.rollout)
            .map_err(|e| TrafficFault::Refused(e.to_string()));
        Box::pin(async move { claimed })
    }

    fn apply<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<(), TrafficFault>> {
        Box::pin(async move { self.serve(traffic) })
    }

    fn reconcile<'a>(
        &'a self,
        traffic: &'a Traffic,
    ) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        // The table is in this process: nothing else changes it, so nothing was lost.
        Box::pin(async move { self.serve(traffic).map(|()| Vec::new()) })
    }

    fn release(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        flags::served().release(self.key(), &self.flag.rollout);
        Box::pin(async { Ok(()) })
    }
}

/// Routers and a flag stepped together.
struct Both {
    inner: Arc<dyn TrafficBackend>,
    flag: FlagBackend,
}

impl TrafficBackend for Both {
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async move {
            self.flag.claim().await?;
            self.inner.claim().await
        })
    }

    fn apply<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<(), TrafficFault>> {
        Box::pin(async move {
            self.inner.apply(traffic).await?;
            self.flag.apply(traffic).await
        })
    }

    fn reconcile<'a>(
        &'a self,
        traffic: &'a Traffic,
    ) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        Box::pin(async move {
            let corrected = self.inner.reconcile(traffic).await?;
            self.flag.reconcile(traffic).await?;
            Ok(corrected)
        })
    }

    fn release(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(async move {
            self.flag.release().await?;
            self.inner.release().await
        })
    }
}
