//! Kubernetes implementations of the controller's seams (`coalmine_controller::traffic`,
//! `state`, `targets`, `observations`). They live here, not beside the others in the
//! controller, so that the controller and its tests build without a Kubernetes client; the
//! operator chooses them for the resources it runs (a store or backend is chosen by what runs
//! the rollout, not by its document).
//!
//! - [`replicas`]: provider `kubernetes` with weights — the canary's share of replicas.
//! - [`configs`]: the target's ConfigMaps and Secrets read, and their `-primary` copies written.
//! - [`status_store`]: the state store in a `Rollout`'s status, with Kubernetes Events.

pub mod configs;
pub mod replicas;
pub mod status_store;
