//! Feature flags that rollouts step (`spec.flag`), as `coalmine serve` serves them over
//! OpenFeature's remote evaluation protocol (`daemon/ofrep.rs`).
//!
//! [`FlagTable`] holds each served flag with what it serves now — written by the flag traffic
//! backend (`traffic/flag.rs`) from the machine's saved `Traffic`, so a restarted daemon serves
//! what its resumed rollouts re-apply.
//!
//! The table is one per process ([`served`]): the seams' registrations open backends and sources
//! from a rollout document alone, and one process serves one daemon's flags.

pub mod evaluate;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

pub use evaluate::{EvaluationError, ServedFlag, Serving};

/// The flags this process serves.
#[derive(Debug, Default)]
pub struct FlagTable {
    inner: RwLock<Table>,
}

#[derive(Debug, Default)]
struct Table {
    flags: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    served: Arc<ServedFlag>,
    /// The rollout's driver has let it go (deleted): another rollout may take the flag.
    released: bool,
}

/// Why a rollout cannot take a flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flag {key:?} is stepped by rollout {holder:?}: one rollout steps a flag")]
pub struct FlagTaken {
    pub key: String,
    pub holder: String,
}

/// This process's flags.
pub fn served() -> &'static FlagTable {
    static TABLE: OnceLock<FlagTable> = OnceLock::new();
    TABLE.get_or_init(FlagTable::default)
}

impl FlagTable {
    /// The flag of `key`, as served now.
    pub fn get(&self, key: &str) -> Option<Arc<ServedFlag>> {
        let table = self.inner.read().expect("flags");
        table.flags.get(key).map(|e| e.served.clone())
    }

    /// Every served flag, by key.
    pub fn all(&self) -> Vec<Arc<ServedFlag>> {
        let table = self.inner.read().expect("flags");
        table.flags.values().map(|e| e.served.clone()).collect()
    }

    /// Refuses `rollout` a flag another rollout steps (and has not let go).
    pub fn claim(&self, key: &str, rollout: &str) -> Result<(), FlagTaken> {
        let table = self.inner.read().expect("flags");
        match table.flags.get(key) {
            Some(e) if !e.released && e.served.rollout != rollout => Err(FlagTaken {
                key: key.to_string(),
                holder: e.served.rollout.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Serves `flag` as given (its rollout's traffic now).
    pub fn serve(&self, flag: ServedFlag) -> Result<(), FlagTaken> {
        let mut table = self.inner.write().expect("flags");
        let key = flag.flag.key.clone();
        match table.flags.get_mut(&key) {
            Some(e) if !e.released && e.served.rollout != flag.rollout => Err(FlagTaken {
                key,
                holder: e.served.rollout.clone(),
            }),
            Some(e) => {
                e.served = Arc::new(flag);
                e.released = false;
                Ok(())
            }
            None => {
                table.flags.insert(
                    key,
                    Entry {
                        served: Arc::new(flag),
                        released: false,
                    },
                );
                Ok(())
            }
        }
    }

    /// `rollout` no longer steps flag `key`: it keeps serving as it was left, and another
    /// rollout may take it.
    pub fn release(&self, key: &str, rollout: &str) {
        let mut table = self.inner.write().expect("flags");
        if let Some(e) = table.flags.get_mut(key) {
            if e.served.rollout == rollout {
                e.released = true;
            }
        }
    }
}
