//! Verdicts from observations.
//!
//! Architecture invariant: the judge never does IO and never reads the clock. Observations come
//! in as values (a metric reading, counts); a verdict goes out as a value.
//!
//! # Modules
//!
//! - [`counts`]: one version's request counters over a window (requests, server errors, latency
//!   histogram), whether from routers or from a simulation; the built-in metrics come from them.
//! - [`threshold`]: Flagger's `thresholdRange` — one number against fixed bounds, once per
//!   interval. What Flagger and Argo Rollouts do; blind below the bound and noisy at low traffic.
//! - [`sequential`]: anytime-valid tests that compare the canary with stable as data arrives and
//!   may be evaluated after every observation without inflating false alarms (Ville's inequality;
//!   Johari, Pekelis & Walsh, "Always Valid Inference", Operations Research 2022):
//!   - [`sequential::counts`]: which arm the failures come from, given the traffic split at that
//!     moment — a beta-binomial / Dirichlet mixture Bayes factor on a grid of failure-rate ratios
//!     (Lindon & Malek, NeurIPS 2022; Lindon, Sanden & Shirikian, KDD 2022);
//!   - [`sequential::quantiles`]: time-uniform DKW bands on each arm's latency distribution
//!     (Howard & Ramdas, Bernoulli 2022), declaring a regression when a lower confidence bound on
//!     canary p50/p95/p99 ÷ stable's exceeds 1 + tolerance;
//!   - [`sequential::dkw`]: that band and its constant;
//!   - [`sequential::paired`]: a dark launch's mirrored requests compared pair by pair with
//!     stable's answers to the same requests — the failure-origin test at share ½ on the pairs
//!     only one version failed, and a sign test on their latency.
//! - [`kayenta`]: Kayenta's fixed-window judge (Mann–Whitney U at 98 % confidence, Hodges–Lehmann
//!   effect, Pass/High/Low/Nodata, weighted score) for users who know Kayenta. Not anytime-valid:
//!   run it once per window.
//!
//! Test states and evidence serialize with serde: the controller persists the state between
//! ticks and shows the evidence.

pub mod counts;
pub mod kayenta;
mod math;
pub mod sequential;
pub mod threshold;

pub use counts::Counts;
pub use sequential::counts::{Batch, CountsConfig, CountsEvidence, CountsTest};
pub use sequential::paired::{PairedBatch, PairedEvidence, PairedRejection, PairedTest};
pub use sequential::quantiles::{LatencyConfig, LatencyEvidence, LatencyHistogram, LatencyTest};
pub use threshold::{judge_threshold, Reading, Verdict};
