//! The `/stats` document: a router's counters since it started, per version, with a mergeable
//! latency histogram. Counters never reset while the router lives, so a reader takes the
//! difference of two documents, and notices a restart by `instance` and `startedUnixMs`.
//!
//! Counts are per service (`/stats/{service}`); `/stats` answers the default service's, with
//! every service's in `services`.
//!
//! A reader needs only the counts it judges on (`instance`, `startedUnixMs`, and per version
//! `requests`, `statuses`, `latency.counts`); every other field defaults when absent, so a
//! controller reads an older router's document too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `/stats`: per version, counts by status, failures by kind, and a mergeable latency histogram
/// (hdrhistogram buckets as `[microseconds, count]` pairs; equal values add across routers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsDoc {
    /// Random per process start: a reader that sees it change knows the counters restarted.
    pub instance: String,
    pub started_unix_ms: u64,
    /// The route table's generation when the counters were read.
    #[serde(default)]
    pub generation: u64,
    /// The service these counts are of (`/stats/{service}`; `/stats` shows the default
    /// service's at the top).
    #[serde(default = "default_service")]
    pub service: String,
    pub stable: VersionStats,
    pub canary: VersionStats,
    /// The canary's answers to mirrored copies: what it would have answered, never seen by
    /// a client. Flagger's dark launch judges the canary on these.
    #[serde(default)]
    pub mirror: MirrorStats,
    /// What the router failed on its own account: never a version's failure.
    #[serde(default)]
    pub router: LocalStats,
    /// `GET /stats` only: every service's counts, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceStats>,
}

fn default_service() -> String {
    crate::DEFAULT_SERVICE.to_string()
}

/// One service's counts in `GET /stats`' `services`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStats {
    pub stable: VersionStats,
    pub canary: VersionStats,
    #[serde(default)]
    pub mirror: MirrorStats,
}

/// One version's answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionStats {
    pub requests: u64,
    /// Answers by status code, the router's own 502/504 for this version included.
    pub statuses: BTreeMap<u16, u64>,
    /// Upstream failures by kind: `connect`, `timeout`, `protocol`, `body`.
    #[serde(default)]
    pub failures: BTreeMap<String, u64>,
    /// Requests sent again on a new connection (never a non-idempotent one the upstream may
    /// have read).
    #[serde(default)]
    pub retries: u64,
    pub latency: Latency,
}

/// Mirrored copies of stable-bound requests, as the canary answered them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorStats {
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub statuses: BTreeMap<u16, u64>,
    /// Copies that got no answer (connect error, timeout).
    #[serde(default)]
    pub failed: u64,
    /// Copies not sent because the mirror concurrency limit was reached.
    #[serde(default)]
    pub dropped: u64,
    /// Requests picked for mirroring but not copied because they carried a body.
    #[serde(default)]
    pub skipped_with_body: u64,
    /// Requests picked for mirroring but not copied because their method is not safe (only
    /// GET, HEAD, OPTIONS and TRACE are: a copy must change nothing).
    #[serde(default)]
    pub skipped_unsafe_method: u64,
    /// Time until each answered copy's response head.
    #[serde(default)]
    pub latency: Latency,
    /// Each copy paired with the user's answer to the same request: what a dark launch is
    /// judged on. Absent from older routers: all zero.
    #[serde(default)]
    pub pairs: MirrorPairs,
}

/// Mirrored requests paired with stable's answer to the same request. A failure is a 5xx
/// (the router's 502/504 for a version that gave no answer included); a pair one side of which
/// failed on the router's or the client's account is `unpaired`, never either version's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorPairs {
    #[serde(default)]
    pub both_ok: u64,
    /// The canary's copy failed where stable answered the user well.
    #[serde(default)]
    pub canary_only_failed: u64,
    /// Stable failed the user where the canary's copy was answered well.
    #[serde(default)]
    pub stable_only_failed: u64,
    #[serde(default)]
    pub both_failed: u64,
    #[serde(default)]
    pub unpaired: u64,
    /// Of the pairs both answered well, `[microseconds, count]`: how many the canary's copy
    /// answered more than that much later than stable answered the user (the bounds are the
    /// router's latency buckets', from 0; cumulative, so a reader picks its tolerance).
    #[serde(default)]
    pub canary_slower_by: Vec<(u64, u64)>,
    /// Likewise, how many it answered more than that much sooner.
    #[serde(default)]
    pub canary_faster_by: Vec<(u64, u64)>,
}

impl MirrorPairs {
    /// Pairs in which both versions answered (well or not).
    pub fn answered(&self) -> u64 {
        self.both_ok + self.canary_only_failed + self.stable_only_failed + self.both_failed
    }
}

/// What the router failed on its own account.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalStats {
    /// Requests failed before any version could answer, by reason (`resources`).
    #[serde(default)]
    pub local_failures: BTreeMap<String, u64>,
    /// Connections the listener could not accept (out of descriptors, memory).
    #[serde(default)]
    pub accept_errors: u64,
}

/// A latency histogram: time until the response head.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// `microseconds`.
    #[serde(default)]
    pub unit: String,
    #[serde(default)]
    pub significant_digits: u8,
    #[serde(default)]
    pub sum_micros: u64,
    /// `[microseconds, count]`; equal values add up across routers and over time.
    pub counts: Vec<(u64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_with_only_the_judged_counts_reads_with_the_rest_defaulted() {
        let doc: StatsDoc = serde_json::from_value(serde_json::json!({
            "instance": "i", "startedUnixMs": 5,
            "stable": {"requests": 1, "statuses": {"200": 1}, "latency": {"counts": [[100, 1]]}},
            "canary": {"requests": 0, "statuses": {}, "latency": {"counts": []}}
        }))
        .unwrap();
        assert_eq!(doc.stable.statuses[&200], 1);
        assert_eq!(doc.stable.latency.counts, vec![(100, 1)]);
        assert_eq!(doc.mirror, MirrorStats::default());
        assert_eq!(doc.mirror.pairs.answered(), 0);
        assert!(serde_json::from_value::<StatsDoc>(serde_json::json!({"instance": "i"})).is_err());
    }

    #[test]
    fn field_names_are_camel_case_as_served() {
        let json = serde_json::to_value(StatsDoc::default()).unwrap();
        for field in [
            "instance",
            "startedUnixMs",
            "generation",
            "stable",
            "canary",
            "mirror",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert!(json["mirror"].get("skippedWithBody").is_some());
        for field in [
            "canaryOnlyFailed",
            "stableOnlyFailed",
            "canarySlowerBy",
            "unpaired",
        ] {
            assert!(json["mirror"]["pairs"].get(field).is_some(), "{field}");
        }
        assert!(json["router"].get("localFailures").is_some());
        assert!(json["router"].get("acceptErrors").is_some());
        assert!(json["stable"]["latency"].get("significantDigits").is_some());
        assert!(json["stable"]["latency"].get("sumMicros").is_some());
    }
}
