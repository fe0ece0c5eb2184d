//! The built-in metrics, from router counts over a check's window: the same numbers whether the
//! counts come from real routers (the driver) or from a simulation.

use coalmine_judge::{Counts, Reading};
use coalmine_spec::rollout::{BUILTIN_DURATION, BUILTIN_KAYENTA_SCORE, BUILTIN_SUCCESS_RATE};

/// The reading of built-in metric `name`. `canary` gives the canary's counts over the window;
/// `steps` both versions' counts per sampling step (only `kayenta-score` asks for them).
pub fn builtin_reading(
    name: &str,
    canary: impl FnOnce() -> Counts,
    steps: impl FnOnce() -> (Vec<Counts>, Vec<Counts>),
) -> Reading {
    match name {
        BUILTIN_SUCCESS_RATE => canary().success_rate(),
        BUILTIN_DURATION => canary().latency_quantile_ms(0.99),
        BUILTIN_KAYENTA_SCORE => {
            let (canary, stable) = steps();
            coalmine_judge::kayenta::window_score(&canary, &stable)
        }
        other => Reading::Error {
            reason: format!("{other:?} is not a built-in metric"),
        },
    }
}
