//! Kubernetes implementations of the controller's seams (`coalmine_controller::traffic`,
//! `state`, `targets`, `observations`). They live here, not beside the others in the
//! controller, so that the controller and its tests build without a Kubernetes client; the
//! operator chooses them for the resources it runs (a store or backend is chosen by what runs
//! the rollout, not by its document).
//!
//! - [`workloads`]: Flagger's object model both providers run on — the primary, the Services,
//!   the copies of configs and autoscaler, the canary's size, the claim on the target.
//! - [`replicas`]: provider `kubernetes` with weights — the canary's share of replicas.
//! - [`routers`]: provider `coalmine` — Coalmine routers in the cluster weigh, found through a
//!   Service; their `/stats` count both versions.
//! - [`routed`]: what the providers that weigh in front of the Services share — the canary sized
//!   and ready before its share, taken off after — and the route objects' common rules.
//! - [`istio`], [`gateway_api`], [`ingress`]: providers `istio` (VirtualService and
//!   DestinationRules), `gatewayapi:v1` (HTTPRoute) and `nginx` (canary Ingress), Flagger's
//!   objects.
//! - [`configs`]: the target's ConfigMaps and Secrets read, and their `-primary` copies written.
//! - [`status_store`]: the state store in a `Rollout`'s status, with Kubernetes Events.

pub mod configs;
pub mod gateway_api;
pub mod ingress;
pub mod istio;
pub mod replicas;
pub mod routed;
pub mod routers;
pub mod status_store;
pub mod workloads;
