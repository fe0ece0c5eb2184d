//! Coalmine's documents: how YAML becomes typed values, and how a mistake in it is reported.
//!
//! Architecture invariant: this crate is pure. It never reads files, sockets or the clock; callers
//! hand it the text and the name to report it under.

pub mod alerts;
pub mod documents;
pub mod duration;
pub mod flag;
pub mod flagger;
mod foreign;
pub mod group;
pub mod names;
pub mod redact;
pub mod rollout;
pub mod scenario;
pub mod schema;
pub mod suggest;
pub mod templates;
mod yaml;

/// A traffic share: one weight type from the documents through the rollout to the router.
pub use coalmine_contract::{check_service_name, Weight};
pub use duration::{format_duration, parse_duration, Dur};
pub use yaml::{parse_yaml, SpecError};
