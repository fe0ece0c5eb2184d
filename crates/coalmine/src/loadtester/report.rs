//! What a load test did: answers by status, errors by reason, latencies; and the summary that
//! hey would print. Pure: durations come in as values.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde_json::{json, Value};

/// Latencies in microseconds on a log scale: exact below 256 µs, then 256 buckets per power of
/// two (under 0.4 % error), so a long run needs kilobytes, not a sample per request.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u128,
    min_us: u64,
    max_us: u64,
}

const SUB_BITS: u32 = 8;
const SUB: u64 = 1 << SUB_BITS;

fn bucket_of(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // ≥ SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = us >> shift; // in SUB..2*SUB
    (SUB + u64::from(shift) * SUB + (mantissa - SUB)) as usize
}

/// The smallest and largest value a bucket holds.
fn bounds_of(index: usize) -> (u64, u64) {
    let i = index as u64;
    if i < SUB {
        return (i, i);
    }
    let shift = (i - SUB) / SUB;
    let mantissa = SUB + (i - SUB) % SUB;
    let low = mantissa << shift;
    (low, low.saturating_add((1 << shift) - 1))
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let b = bucket_of(us);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        if self.count == 0 || us < self.min_us {
            self.min_us = us;
        }
        self.max_us = self.max_us.max(us);
        self.count += 1;
        self.sum_us += u128::from(us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0 < q ≤ 1): the middle of the bucket holding the ⌈q·n⌉-th value,
    /// clamped to the exact minimum and maximum.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bounds_of(i);
                let mid = low + (high - low) / 2;
                return Some(Duration::from_micros(mid.clamp(self.min_us, self.max_us)));
            }
        }
        Some(Duration::from_micros(self.max_us))
    }

    pub fn min(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.min_us))
    }

    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.max_us))
    }

    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0)
            .then(|| Duration::from_micros((self.sum_us / u128::from(self.count)) as u64))
    }
}

/// Distinct error reasons kept per run; the rest are counted under "other errors".
const ERROR_KINDS: usize = 20;

/// One run's answers so far.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub requests: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    /// Of the requests that got an answer, as hey reports them.
    pub latencies: Latencies,
}

impl RunStats {
    pub fn answered(&mut self, status: u16, latency: Duration) {
        self.requests += 1;
        *self.statuses.entry(status).or_default() += 1;
        self.latencies.record(latency);
    }

    pub fn failed(&mut self, reason: String) {
        self.requests += 1;
        self.errors_total += 1;
        let key = if self.errors.len() < ERROR_KINDS || self.errors.contains_key(&reason) {
            reason
        } else {
            "other errors".to_string()
        };
        *self.errors.entry(key).or_default() += 1;
    }

    /// One line: what a log reader needs.
    pub fn line(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64();
        let statuses = if self.statuses.is_empty() {
            "no answers".to_string()
        } else {
            self.statuses
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut line = format!(
            "{} requests in {secs:.2}s ({:.1}/s); {statuses}; {} errors",
            self.requests,
            rate(self.requests, secs),
            self.errors_total
        );
        if let (Some(p50), Some(p99)) =
            (self.latencies.quantile(0.5), self.latencies.quantile(0.99))
        {
            let _ = write!(line, "; latency p50 {} p99 {}", ms(p50), ms(p99));
        }
        if let Some((reason, n)) = self.errors.iter().max_by_key(|(_, n)| **n) {
            let _ = write!(line, "; most frequent error: {reason} ({n})");
        }
        line
    }

    /// hey's summary, in hey's layout (the parts that apply).
    pub fn report(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64();
        let l = &self.latencies;
        let s =
            |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.4} secs", d.as_secs_f64()));
        let mut out = String::new();
        let _ = writeln!(out, "\nSummary:");
        let _ = writeln!(out, "  Total:\t{secs:.4} secs");
        let _ = writeln!(out, "  Slowest:\t{}", s(l.max()));
        let _ = writeln!(out, "  Fastest:\t{}", s(l.min()));
        let _ = writeln!(out, "  Average:\t{}", s(l.mean()));
        let _ = writeln!(out, "  Requests/sec:\t{:.4}", rate(self.requests, secs));
        if l.count() > 0 {
            let _ = writeln!(out, "\nLatency distribution:");
            for p in [10, 25, 50, 75, 90, 95, 99] {
                if let Some(d) = l.quantile(f64::from(p) / 100.0) {
                    let _ = writeln!(out, "  {p}% in {:.4} secs", d.as_secs_f64());
                }
            }
        }
        let _ = writeln!(out, "\nStatus code distribution:");
        for (status, n) in &self.statuses {
            let _ = writeln!(out, "  [{status}]\t{n} responses");
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\nError distribution:");
            for (reason, n) in &self.errors {
                let _ = writeln!(out, "  [{n}]\t{reason}");
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        let q = |p: f64| self.latencies.quantile(p).map(|d| d.as_secs_f64() * 1000.0);
        json!({
            "requests": self.requests,
            "statusCodes": self.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "errors": self.errors_total,
            "errorReasons": self.errors,
            "latencyMs": {"p50": q(0.5), "p99": q(0.99)},
        })
    }
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order_and_hold_it() {
        let mut last = 0;
        for us in (0..5000u64).chain([1 << 20, (1 << 20) + 4095, u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(us);
            assert!(b >= last || us > 5000, "bucket order at {us}");
            last = b;
            let (low, high) = bounds_of(b);
            assert!(
                low <= us && us <= high,
                "{us} outside bucket {b} = {low}..={high}"
            );
            // Under 0.4 % wide relative to the value.
            assert!(
                (high - low) as f64 <= us as f64 / 255.0 + 1.0,
                "{us}: {low}..={high}"
            );
        }
    }

    #[test]
    fn quantiles_are_within_the_buckets_error_of_the_exact_ones() {
        let mut l = Latencies::default();
        // 1 ms .. 1000 ms, one each.
        for ms in 1..=1000u64 {
            l.record(Duration::from_millis(ms));
        }
        for (q, exact_ms) in [(0.5, 500.0), (0.99, 990.0), (0.1, 100.0), (1.0, 1000.0)] {
            let got = l.quantile(q).unwrap().as_secs_f64() * 1000.0;
            assert!(
                (got - exact_ms).abs() <= exact_ms * 0.004,
                "q{q}: {got} vs {exact_ms}"
            );
        }
        assert_eq!(l.min(), Some(Duration::from_millis(1)));
        assert_eq!(l.max(), Some(Duration::from_millis(1000)));
        assert_eq!(l.mean(), Some(Duration::from_micros(500_500)));
        assert_eq!(Latencies::default().quantile(0.5), None);
    }

    #[test]
    fn a_summary_names_counts_statuses_errors_and_latency() {
        let mut s = RunStats::default();
        for _ in 0..38 {
            s.answered(200, Duration::from_millis(2));
        }
        s.answered(503, Duration::from_millis(40));
        s.failed("connection refused or unreachable".into());
        let line = s.line(Duration::from_secs(2));
        assert_eq!(
            line,
            "40 requests in 2.00s (20.0/s); 200: 38, 503: 1; 1 errors; latency p50 2.0ms \
             p99 40.0ms; most frequent error: connection refused or unreachable (1)"
        );
        let report = s.report(Duration::from_secs(2));
        assert!(report.contains("  [200]\t38 responses"), "{report}");
        assert!(report.contains("  [1]\tconnection refused"), "{report}");
        assert!(report.contains("  Requests/sec:\t20.0000"), "{report}");
        let j = s.json();
        assert_eq!(j["requests"], 40);
        assert_eq!(j["statusCodes"]["503"], 1);
        assert_eq!(j["errors"], 1);
    }

    #[test]
    fn error_reasons_are_bounded() {
        let mut s = RunStats::default();
        for i in 0..100 {
            s.failed(format!("reason {i}"));
        }
        assert_eq!(s.errors.len(), ERROR_KINDS + 1);
        assert_eq!(s.errors["other errors"], 100 - ERROR_KINDS as u64);
        assert_eq!(s.errors_total, 100);
    }
}
