//! Anytime-valid sequential tests: they may be looked at after every observation, and the
//! probability that they *ever* declare a regression of an A/A rollout stays below α.
//!
//! - [`counts`]: which arm the failures come from, given the traffic split (Lindon & Malek 2022).
//! - [`quantiles`]: time-uniform confidence bands on each arm's latency quantiles
//!   (Howard & Ramdas 2022), compared as a ratio against a relative tolerance.
//! - [`dkw`]: the time-uniform Dvoretzky–Kiefer–Wolfowitz band the latency test is built on.
//! - [`paired`]: a dark launch's mirrored requests, stable's and the canary's answer to each,
//!   compared pair by pair (a sequential McNemar test on failures, a sign test on latency).

pub mod counts;
pub mod dkw;
pub mod paired;
pub mod quantiles;

use std::fmt;

/// A test configuration that cannot describe a valid test (a share outside (0, 1), α outside
/// (0, 1), …). The message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn check_alpha(alpha: f64) -> Result<(), ConfigError> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "alpha: must be in (0, 1), got {alpha}"
        )))
    }
}
