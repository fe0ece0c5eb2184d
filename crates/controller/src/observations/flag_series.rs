//! An app's own per-variant series of a rollout's feature flag in Prometheus (`spec.flag.prometheus`:
//! a request counter and a latency histogram labelled `variant`), read as the Prometheus source
//! reads a traffic provider's series ([`MeshSeries::FlagVariants`]): the canary variant's as the
//! canary's, the stable variant's as stable's. Used when the flag is all the rollout steps and
//! names its series; otherwise the app reports its counts to `serve` ([`super::flag_counts`]).

use coalmine_spec::rollout::Rollout;
use coalmine_spec::templates::{Provider, PROMETHEUS};

use super::prometheus::{self, MeshSeries};
use super::{ObservationSource, Registration};
use crate::Unrunnable;

pub const REGISTERED: Registration = Registration { takes, open };

fn takes(rollout: &Rollout) -> bool {
    crate::traffic::flag::alone(rollout)
        && rollout
            .spec
            .flag
            .as_ref()
            .is_some_and(|f| f.prometheus.is_some())
}

fn open(rollout: &Rollout) -> Result<Box<dyn ObservationSource>, Unrunnable> {
    let (flag, series) = rollout
        .spec
        .flag
        .as_ref()
        .and_then(|f| Some((f, f.prometheus.as_ref()?)))
        .ok_or_else(|| Unrunnable {
            field: "flag.prometheus".into(),
            message: "the rollout's flag names no series".into(),
        })?;
    let server = Provider {
        kind: PROMETHEUS.into(),
        address: Some(series.address.to_string()),
        ..Provider::default()
    };
    prometheus::open(
        &server,
        MeshSeries::FlagVariants {
            requests: series.requests.clone(),
            duration: series.duration.clone(),
            status_label: series.status_label.clone(),
            selector: series.selector.clone(),
            stable: flag.stable.clone(),
            canary: flag.canary.clone(),
        },
    )
    .map_err(|e| Unrunnable {
        field: "flag.prometheus.address".into(),
        message: e.message,
    })
}
