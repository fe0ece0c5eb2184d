//! The route table in force: the contract's [`RoutesDoc`] (declared in `coalmine-contract`, the
//! document users and controllers write) compiled for the hot path, with the numbers derived
//! once per swap.

use xxhash_rust::xxh3::xxh3_64;

pub use coalmine_contract::{
    Affinity, Condition, HeaderName, MatchRule, RoutesDoc, ServedRoutes, StickyKey, StrMatch,
    Subject, UpstreamUrl, Weight, OWNER_HEADER,
};

/// A validated table, ready for the hot path, with the numbers derived once per swap.
#[derive(Debug)]
pub struct RouteTable {
    pub doc: RoutesDoc,
    /// Bumped by every swap; lets clients tell which table served them.
    pub generation: u64,
    pub(crate) salt: u64,
    /// Value of the affinity cookie for this canary: a new canary URL invalidates old pins.
    pub(crate) affinity_token: String,
}

impl RouteTable {
    pub fn new(doc: RoutesDoc, generation: u64) -> Self {
        let salt = xxh3_64(doc.name.as_bytes());
        let affinity_token = match &doc.canary {
            Some(c) => format!("{:016x}", xxh3_64(c.as_str().as_bytes())),
            None => String::new(),
        };
        RouteTable {
            doc,
            generation,
            salt,
            affinity_token,
        }
    }

    /// The document plus read-only fields, as `GET /routes` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        ServedRoutes::json(&self.doc, self.generation)
    }
}
