//! Verdicts from observations.
//!
//! Architecture invariant: the judge never does IO and never reads the clock. Observations come
//! in as values (a metric reading, counts); a verdict goes out as a value.

pub mod counts;
pub mod threshold;

pub use counts::Counts;

pub use threshold::{judge_threshold, Reading, Verdict};
