//! The traffic backend seam: what makes user requests go where the rollout machine says
//! ([`Traffic`]) — Coalmine's own routers ([`routers`]), a feature flag served over OFREP
//! ([`flag`]), or both together.
//!
//! A backend applies a whole `Traffic` at a time, idempotently: applying the same one again
//! changes nothing, and puts right a backend that lost it. Its faults say what the rollout does
//! next: [`TrafficFault::Unreachable`] holds (the next tick tries again, up to the progress
//! deadline), [`TrafficFault::Refused`] rolls back at once.
//!
//! A backend is found for a rollout by its registration in [`BACKENDS`]: the first that takes
//! the rollout carries its traffic. A new backend is a file here that defines its
//! `REGISTERED` value, and its name in the `implementations!` line below.

use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::rollout::Rollout;

use crate::{BoxFuture, Runner, Unrunnable};

crate::implementations!(BACKENDS: Registration = [routers, flag]);

/// Carries one rollout's traffic, on behalf of one controller (its owner: see [`owner`]).
pub trait TrafficBackend: Send + Sync {
    /// Before the rollout moves anything: checks that the backend can be driven by this
    /// rollout (no other controller drives it, no other rollout's canary is on it). What cannot
    /// be reached yet is left to the ticks.
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>>;

    /// Makes the backend carry `traffic`. Idempotent.
    fn apply<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<(), TrafficFault>>;

    /// Checks that the backend still carries `traffic` and puts it back where it was lost (a
    /// router restarted with its old command line); names what it put right. Like `apply`, it
    /// succeeds only once all of the backend carries `traffic`.
    fn reconcile<'a>(
        &'a self,
        traffic: &'a Traffic,
    ) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>>;

    /// Lets the backend go once nothing will drive it any more (`run` ends, `delete`): it keeps
    /// the rollout's final traffic, and another rollout may take it.
    fn release(&self) -> BoxFuture<'_, Result<(), TrafficFault>>;
}

/// How a backend is found for a rollout and opened.
pub struct Registration {
    /// Whether this backend carries the rollout's traffic when `runner` runs it.
    pub takes: fn(&Rollout, Runner) -> bool,
    /// What a rollout must give to use this backend, said when no backend takes it.
    pub wanted: fn(Runner) -> Unrunnable,
    /// Checks a rollout it takes, without starting or reaching anything.
    pub check: fn(&Rollout, Runner) -> Result<(), Unrunnable>,
    /// Opens the backend for a rollout it takes (whose targets are URLs by now), driven on
    /// behalf of `owner`.
    pub open: Open,
}

/// Opens a backend for a rollout, driven on behalf of an owner.
pub type Open = fn(&Rollout, &str) -> Result<Box<dyn TrafficBackend>, Unrunnable>;

/// How a controller names itself to the backends it drives: the rollout, then the controller
/// (`checkout (coalmine run, pid 4242 on build-7)`). Two controllers never share one, even for
/// the same rollout, so a backend refuses the second.
pub fn owner(rollout: &str, controller: &str) -> String {
    format!("{rollout} ({controller})")
}

fn registration(rollout: &Rollout, runner: Runner) -> Result<&'static Registration, Unrunnable> {
    BACKENDS
        .iter()
        .find(|b| (b.takes)(rollout, runner))
        .ok_or_else(|| {
            let wanted: Vec<Unrunnable> = BACKENDS.iter().map(|b| (b.wanted)(runner)).collect();
            Unrunnable {
                field: wanted[0].field.clone(),
                message: wanted
                    .iter()
                    .map(|w| w.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; or "),
            }
        })
}

/// Checks, without starting or reaching anything, that a backend carries the rollout's
/// traffic and that the rollout is right for it.
pub fn check(rollout: &Rollout, runner: Runner) -> Result<(), Unrunnable> {
    // A flag first: whichever backend carries the rest, only `serve` can serve it.
    flag::check(rollout, runner)?;
    (registration(rollout, runner)?.check)(rollout, runner)
}

/// The backend carrying the rollout's traffic, driven on behalf of `owner`.
pub fn open(
    rollout: &Rollout,
    runner: Runner,
    owner: &str,
) -> Result<Box<dyn TrafficBackend>, Unrunnable> {
    flag::check(rollout, runner)?;
    let registration = registration(rollout, runner)?;
    (registration.check)(rollout, runner)?;
    flag::alongside(rollout, (registration.open)(rollout, owner)?)
}
