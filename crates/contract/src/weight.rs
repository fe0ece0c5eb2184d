//! A traffic share: a percentage with at most two decimals (0.5 % works), kept exactly as basis
//! points (hundredths of a percent), so 10,000 is 100 %. Written as a percentage in documents.

use serde::{Deserialize, Serialize};

use crate::Invalid;

/// A percentage with two decimals, kept as basis points (10,000 = 100 %).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "f64", into = "f64")]
pub struct Weight(u32);

/// In a CRD: the percentage as written, bounded as [`Weight::from_percent`] checks it.
impl schemars::JsonSchema for Weight {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Weight".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "number",
            "minimum": 0,
            "maximum": 100,
            "description": "A percentage (0 to 100, at most two decimals)."
        })
    }
}

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(10_000);

    /// A percentage in 0..=100 with at most two decimals.
    pub fn from_percent(pct: f64) -> Result<Self, Invalid> {
        if !pct.is_finite() || !(0.0..=100.0).contains(&pct) {
            return Err(Invalid(format!(
                "{pct} is not a percentage between 0 and 100"
            )));
        }
        let scaled = pct * 100.0;
        let rounded = scaled.round();
        if (scaled - rounded).abs() > 1e-6 {
            return Err(Invalid(format!("{pct} has more than two decimals")));
        }
        Ok(Weight(rounded as u32))
    }

    /// Basis points, at most 10,000.
    pub fn from_basis_points(basis_points: u32) -> Result<Self, Invalid> {
        if basis_points > Weight::FULL.0 {
            return Err(Invalid(format!(
                "{basis_points} basis points is more than 100 %"
            )));
        }
        Ok(Weight(basis_points))
    }

    pub fn basis_points(self) -> u32 {
        self.0
    }

    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl TryFrom<f64> for Weight {
    type Error = Invalid;
    fn try_from(pct: f64) -> Result<Self, Invalid> {
        Weight::from_percent(pct)
    }
}

impl From<Weight> for f64 {
    fn from(w: Weight) -> f64 {
        w.percent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_keep_two_decimals_exactly() {
        let bp = |pct| Weight::from_percent(pct).map(Weight::basis_points);
        assert_eq!(bp(0.5), Ok(50));
        assert_eq!(bp(33.33), Ok(3333));
        assert_eq!(bp(100.0), Ok(10_000));
        assert_eq!(
            bp(0.125).unwrap_err().to_string(),
            "0.125 has more than two decimals"
        );
        assert_eq!(
            bp(100.01).unwrap_err().to_string(),
            "100.01 is not a percentage between 0 and 100"
        );
        assert!(bp(f64::NAN).is_err() && bp(-1.0).is_err());
        assert_eq!(Weight::from_basis_points(50).unwrap().percent(), 0.5);
        assert!(Weight::from_basis_points(10_001).is_err());
    }

    #[test]
    fn a_weight_is_a_percentage_in_json() {
        let w: Weight = serde_json::from_str("12.5").unwrap();
        assert_eq!(w.basis_points(), 1250);
        assert_eq!(serde_json::to_string(&w).unwrap(), "12.5");
        assert!(serde_json::from_str::<Weight>("101").is_err());
    }
}
