//! Coalmine on Kubernetes.
//!
//! - [`crd`]: Coalmine's own custom resource, `coalmine.dev/v1alpha1` `Rollout` — a Flagger
//!   `Canary` with Coalmine's whole analysis (sequential judges, `noData`, …), which Flagger's
//!   CRD would prune — and its CRD, generated from these types (`coalmine crd`).
//! - [`status`]: the status both resources carry: Flagger's `CanaryStatus` fields, so
//!   `kubectl get`, `kubectl wait` and Flagger's dashboards keep working, plus Coalmine's.
//!
//! - [`flagger`]: Flagger's `Canary`, `MetricTemplate`, `AlertProvider` as watched, their spec
//!   read per object (a Canary Coalmine cannot run gets the field's path, the watch goes on).
//! - [`canaries`]: a Canary runs as the Rollout it describes (owned by it); the Rollout's
//!   status is mirrored onto the Canary in Flagger's fields, its Events go to the Canary.
//! - [`gateway`]: the router as a Gateway API implementation (`coalmine proxy --kubernetes`):
//!   GatewayClasses, Gateways, HTTPRoutes, Services and EndpointSlices as its route table, and
//!   their status conditions.
//! - [`groups`]: `RolloutGroup`s decided from their members' statuses (the same decision as
//!   `coalmine serve`), each member's gate or rollback handed to its run.
//! - [`events`]: Kubernetes Events, one per message (a repeat counted on it).
//! - [`requests`]: promote and abort through a `coalmine.dev/request` annotation. Pure.
//! - [`templates`]: checks resolved from the cluster's MetricTemplates (and their Secrets).
//! - [`workload`]: the objects a rollout runs on, built as Flagger builds them, and Flagger's
//!   readiness rules. Pure.
//! - [`configs`]: the ConfigMaps and Secrets a target's pods read, tracked as Flagger does (a
//!   change of their data is a new revision; the primary runs on `-primary` copies). Pure.
//! - [`next`]: Flagger's change detection — initialise, start, resume, restart, adopt. Pure.
//! - [`leader`]: one leader among the replicas through a Lease (a pure rule and its edge).
//! - [`seams`]: the Kubernetes implementations of the controller's seams (replica-ratio traffic,
//!   the state store in a Rollout's status).
//!
//! Architecture invariant: the types here are the only declaration of the resources' shape; the
//! CRD committed under `deploy/kubernetes/` is their output, kept equal by a test.

pub mod canaries;
pub mod configs;
pub mod crd;
pub mod dashboard;
pub mod events;
pub mod flagger;
pub mod gateway;
pub mod groups;
pub mod health;
pub mod leader;
pub mod next;
pub mod requests;
pub mod revert;
pub mod run;
pub mod seams;
pub mod status;
pub mod templates;
pub mod workload;
