//! Coalmine on Kubernetes.
//!
//! - [`crd`]: Coalmine's own custom resource, `coalmine.dev/v1alpha1` `Rollout` — a Flagger
//!   `Canary` with Coalmine's whole analysis (sequential judges, `noData`, …), which Flagger's
//!   CRD would prune — and its CRD, generated from these types (`coalmine crd`).
//! - [`status`]: the status both resources carry: Flagger's `CanaryStatus` fields, so
//!   `kubectl get`, `kubectl wait` and Flagger's dashboards keep working, plus Coalmine's.
//!
//! Architecture invariant: the types here are the only declaration of the resources' shape; the
//! CRD committed under `deploy/kubernetes/` is their output, kept equal by a test.

pub mod crd;
pub mod flagger;
pub mod leader;
pub mod seams;
pub mod status;
pub mod workload;
