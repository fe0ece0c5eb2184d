//! Feature flags that rollouts step (`spec.flag`), as `coalmine serve` serves them over
//! OpenFeature's remote evaluation protocol (`daemon/ofrep.rs`).
//!
//! [`FlagTable`] holds each served flag with what it serves now — written by the flag traffic
//! backend (`traffic/flag.rs`) from the machine's saved `Traffic`, so a restarted daemon serves
//! what its resumed rollouts re-apply — and the per-variant counts apps report, which the flag
//! observation source (`observations/flag_counts.rs`) takes step by step.
//!
//! The table is one per process ([`served`]): the seams' registrations open backends and sources
//! from a rollout document alone, and one process serves one daemon's flags.

pub mod evaluate;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

use coalmine_contract::FlagCountsDoc;
use coalmine_judge::counts::Counts;

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
    /// Counts reported since the observation source last took them, per variant.
    counts: BTreeMap<String, Counts>,
}

/// Why a rollout cannot take a flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flag {key:?} is stepped by rollout {holder:?}: one rollout steps a flag")]
pub struct FlagTaken {
    pub key: String,
    pub holder: String,
}

/// Why reported counts were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CountsRefused {
    #[error("no flag {0:?} is served here")]
    NoSuchFlag(String),
    #[error("flag {key:?} has no variant {variant:?} (its variants: {known})")]
    NoSuchVariant {
        key: String,
        variant: String,
        known: String,
    },
    #[error("flag {key:?}'s variant {variant:?} would count more than 2^64 - 1 requests since the last step: the report is refused")]
    TooLarge { key: String, variant: String },
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

    /// Serves `flag` as given (its rollout's traffic now); the counts reported so far stay.
    pub fn serve(&self, flag: ServedFlag) -> Result<(), FlagTaken> {
        let mut table = self.inner.write().expect("flags");
        let key = flag.flag.key.clone();
        match table.flags.get_mut(&key) {
            Some(e) if !e.released && e.served.rollout != flag.rollout => Err(FlagTaken {
                key,
                holder: e.served.rollout.clone(),
            }),
            Some(e) => {
                if e.served.rollout != flag.rollout {
                    e.counts.clear();
                }
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
                        counts: BTreeMap::new(),
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

    /// Adds an app's report to flag `key`'s counts while it has a canary. All or nothing: a
    /// report naming a variant the flag does not have changes nothing.
    pub fn report(&self, key: &str, doc: &FlagCountsDoc) -> Result<(), CountsRefused> {
        let mut table = self.inner.write().expect("flags");
        let entry = table
            .flags
            .get_mut(key)
            .ok_or_else(|| CountsRefused::NoSuchFlag(key.to_string()))?;
        let variants = &entry.served.flag.variants;
        if let Some(unknown) = doc.variants.keys().find(|v| !variants.contains_key(*v)) {
            return Err(CountsRefused::NoSuchVariant {
                key: key.to_string(),
                variant: unknown.clone(),
                known: variants.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        // Only a canary being judged needs counts; others are accepted and let go, so a
        // finished rollout's app that keeps reporting holds no memory.
        if !matches!(entry.served.serving, Serving::Split(_)) {
            entry.counts.clear();
            return Ok(());
        }
        // Summed aside first: a report that does not fit changes nothing (a panic here would
        // poison the table and stop every evaluation).
        let mut sums = Vec::with_capacity(doc.variants.len());
        for (variant, reported) in &doc.variants {
            let mut latency = BTreeMap::new();
            for &(micros, n) in &reported.latency_micros {
                // The contract checked that a variant's latencies add up to its requests.
                *latency.entry(latency_bucket(micros)).or_insert(0) += n;
            }
            let report = Counts {
                requests: reported.requests,
                server_errors: reported.errors,
                latency,
            };
            let sum = entry
                .counts
                .get(variant)
                .map_or(Some(report.clone()), |so_far| so_far.checked_sum(&report))
                .ok_or_else(|| CountsRefused::TooLarge {
                    key: key.to_string(),
                    variant: variant.clone(),
                })?;
            sums.push((variant.clone(), sum));
        }
        entry.counts.extend(sums);
        Ok(())
    }

    /// Takes the counts reported for `variant` of flag `key` since the last take.
    pub fn take_counts(&self, key: &str, variant: &str) -> Counts {
        let mut table = self.inner.write().expect("flags");
        table
            .flags
            .get_mut(key)
            .and_then(|e| e.counts.remove(variant))
            .unwrap_or_default()
    }
}

/// `micros` rounded up to three significant digits (under 1 % more): an app that reports each
/// request's own time as its bound keeps at most some 900 buckets a decade, not one a request,
/// between two steps.
fn latency_bucket(micros: u64) -> u64 {
    if micros < 1_000 {
        return micros;
    }
    let unit = 10u64.pow(micros.ilog10() - 2);
    micros.div_ceil(unit).saturating_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_contract::Weight;
    use coalmine_spec::flag::Flag;

    fn flag(rollout: &str, serving: Serving) -> ServedFlag {
        let flag: Flag = serde_json::from_value(serde_json::json!({
            "key": "k", "variants": {"on": true, "off": false}, "canary": "on", "stable": "off",
        }))
        .unwrap();
        ServedFlag::new(rollout, rollout, "default", &flag, serving).unwrap()
    }

    fn report(requests: u64) -> FlagCountsDoc {
        serde_json::from_value(serde_json::json!({"variants": {"on": {"requests": requests}}}))
            .unwrap()
    }

    #[test]
    fn counts_are_kept_while_a_canary_is_judged_and_taken_once() {
        let table = FlagTable::default();
        assert!(matches!(
            table.report("k", &report(1)),
            Err(CountsRefused::NoSuchFlag(_))
        ));
        table.serve(flag("a", Serving::Stable)).unwrap();
        table.report("k", &report(5)).unwrap();
        assert_eq!(table.take_counts("k", "on").requests, 0, "no canary yet");
        table
            .serve(flag(
                "a",
                Serving::Split(Weight::from_basis_points(1000).unwrap()),
            ))
            .unwrap();
        table.report("k", &report(5)).unwrap();
        table.report("k", &report(2)).unwrap();
        assert_eq!(table.take_counts("k", "on").requests, 7);
        assert_eq!(table.take_counts("k", "on").requests, 0, "taken once");
        let wrong: FlagCountsDoc = serde_json::from_value(
            serde_json::json!({"variants": {"on": {"requests": 1}, "blue": {"requests": 1}}}),
        )
        .unwrap();
        assert!(matches!(
            table.report("k", &wrong),
            Err(CountsRefused::NoSuchVariant { .. })
        ));
        assert_eq!(table.take_counts("k", "on").requests, 0, "all or nothing");
    }

    #[test]
    fn counts_that_would_overflow_are_refused_changing_nothing_and_the_table_serves_on() {
        let table = FlagTable::default();
        table
            .serve(flag(
                "a",
                Serving::Split(Weight::from_basis_points(1000).unwrap()),
            ))
            .unwrap();
        let half: FlagCountsDoc = serde_json::from_value(serde_json::json!({"variants": {
            "off": {"requests": 3},
            "on": {"requests": 1u64 << 63, "errors": 1u64 << 63, "latencyMicros": [[100, 1u64 << 63]]},
        }}))
        .unwrap();
        table.report("k", &half).unwrap();
        assert_eq!(
            table.report("k", &half),
            Err(CountsRefused::TooLarge {
                key: "k".into(),
                variant: "on".into()
            })
        );
        assert!(table.get("k").is_some(), "the table still serves");
        assert_eq!(table.take_counts("k", "off").requests, 3, "all or nothing");
        assert_eq!(table.take_counts("k", "on").requests, 1 << 63);
    }

    #[test]
    fn an_app_reporting_each_requests_own_latency_keeps_the_buckets_few_and_the_quantiles_right() {
        let table = FlagTable::default();
        table
            .serve(flag(
                "a",
                Serving::Split(Weight::from_basis_points(1000).unwrap()),
            ))
            .unwrap();
        // 10 reports of 20,000 requests, each timed to the microsecond: 1 ms to 201 ms.
        for r in 0..10u64 {
            let latency: Vec<(u64, u64)> = (0..20_000u64)
                .map(|i| (1_000 + (r * 20_000 + i), 1))
                .collect();
            let doc: FlagCountsDoc = serde_json::from_value(serde_json::json!({"variants": {
                "on": {"requests": 20_000, "latencyMicros": latency},
            }}))
            .unwrap();
            table.report("k", &doc).unwrap();
        }
        let counts = table.take_counts("k", "on");
        assert_eq!(counts.requests, 200_000);
        assert_eq!(counts.latency.values().sum::<u64>(), 200_000);
        assert!(
            counts.latency.len() <= 2_000,
            "{} buckets",
            counts.latency.len()
        );
        // The median is 101 ms: read within 1 %, never under.
        let coalmine_judge::threshold::Reading::Value { value } = counts.latency_quantile_ms(0.5)
        else {
            panic!("no median")
        };
        assert!((101.0..=101.0 * 1.01).contains(&value), "{value} ms");
        assert_eq!(latency_bucket(999), 999);
        assert_eq!(latency_bucket(1_001), 1_010);
        assert_eq!(latency_bucket(u64::MAX), u64::MAX);
    }

    #[test]
    fn one_rollout_steps_a_flag_until_it_lets_go() {
        let table = FlagTable::default();
        table.serve(flag("a", Serving::Promoted)).unwrap();
        assert!(table.claim("k", "b").is_err());
        assert!(table.serve(flag("b", Serving::Stable)).is_err());
        assert_eq!(table.get("k").unwrap().serving, Serving::Promoted);
        table.release("k", "a");
        table.claim("k", "b").unwrap();
        table.serve(flag("b", Serving::Stable)).unwrap();
        assert_eq!(table.get("k").unwrap().rollout, "b");
    }
}
