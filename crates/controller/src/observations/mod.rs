//! The observation source seam: both versions' counts (requests, 5xx, latency histogram) step by
//! step — what the sequential judges see every step and the built-in metrics read over their
//! windows: the routers' own counters ([`router_stats`]), an app's per-variant series of a
//! feature flag in Prometheus ([`flag_series`]) or the per-variant counts it reports
//! ([`flag_counts`]), or a traffic provider's series in Prometheus ([`prometheus`]).
//!
//! A source is found for a rollout document by its registration in [`SOURCES`]: the first that
//! takes the rollout is used. A new source is a file here that defines its `REGISTERED` value,
//! and its name in the `implementations!` line below. [`prometheus`] is opened by the operator
//! instead, which knows the Canary's traffic provider (a rollout document names no mesh).

use coalmine_rollout::Observation;
use coalmine_spec::rollout::Rollout;

use crate::{BoxFuture, Unrunnable};

crate::implementations!(SOURCES: Registration = [router_stats, flag_series, flag_counts]);
pub mod prometheus;

/// One step's counts, and whether the traffic backend was seen to restart during it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Both versions' counts since the sample before (none for the first: it only starts
    /// counting).
    pub counts: Observation,
    /// The backend restarted and may have lost the rollout's traffic (a router started again
    /// from its command line): the driver re-applies the traffic at once.
    pub restarted: bool,
}

/// Why a sample could not be taken. The driver goes on: a missed sample only widens the next
/// step, and the built-in metrics read no data meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObserveError {
    /// No answer.
    #[error("{0}")]
    Unreachable(String),
    /// An answer that is not the counts.
    #[error("{0}")]
    Unreadable(String),
}

/// Counts both versions' answers, step by step.
pub trait ObservationSource: Send {
    /// The counts since the last sample.
    fn sample(&mut self) -> BoxFuture<'_, Result<Sample, ObserveError>>;
}

/// How a source is found for a rollout and opened.
pub struct Registration {
    /// Whether this source counts the rollout's traffic.
    pub takes: fn(&Rollout) -> bool,
    /// Opens the source for a rollout it takes.
    pub open: fn(&Rollout) -> Result<Box<dyn ObservationSource>, Unrunnable>,
}

/// The source counting the rollout's traffic.
pub fn open(rollout: &Rollout) -> Result<Box<dyn ObservationSource>, Unrunnable> {
    let registration = SOURCES
        .iter()
        .find(|s| (s.takes)(rollout))
        .ok_or_else(|| Unrunnable {
            field: "routers".into(),
            message: "nothing counts this rollout's traffic: list the admin address of at least one Coalmine router, or step a feature flag (spec.flag)".into(),
        })?;
    (registration.open)(rollout)
}
