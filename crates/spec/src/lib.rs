//! Coalmine's documents: how YAML becomes typed values, and how a mistake in it is reported.
//!
//! Architecture invariant: this crate is pure. It never reads files, sockets or the clock; callers
//! hand it the text and the name to report it under.

pub mod documents;
pub mod duration;
pub mod flagger;
mod foreign;
pub mod names;
pub mod redact;
pub mod rollout;
pub mod scenario;
pub mod schema;
pub mod suggest;
pub mod templates;
mod yaml;

pub use duration::{format_duration, parse_duration, Dur};
pub use yaml::{parse_yaml, SpecError};

/// A percentage with at most two decimals (0.5 % works), stored exactly as basis points
/// (hundredths of a percent), so 10,000 means 100 %.
pub mod weight {
    /// Parses a percentage in 0..=100 with at most two decimals into basis points.
    pub fn percent_to_basis_points(pct: f64) -> Result<u32, String> {
        coalmine_contract::Weight::from_percent(pct)
            .map(coalmine_contract::Weight::basis_points)
            .map_err(String::from)
    }

    /// Basis points back to a percentage, for display and JSON.
    pub fn basis_points_to_percent(bp: u32) -> f64 {
        f64::from(bp) / 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::weight::*;

    #[test]
    fn weights_keep_two_decimals_exactly() {
        assert_eq!(percent_to_basis_points(0.5), Ok(50));
        assert_eq!(percent_to_basis_points(5.0), Ok(500));
        assert_eq!(percent_to_basis_points(33.33), Ok(3333));
        assert_eq!(percent_to_basis_points(100.0), Ok(10_000));
        assert!(percent_to_basis_points(0.125).is_err());
        assert!(percent_to_basis_points(-1.0).is_err());
        assert!(percent_to_basis_points(100.01).is_err());
        assert!(percent_to_basis_points(f64::NAN).is_err());
        assert_eq!(basis_points_to_percent(50), 0.5);
    }
}
