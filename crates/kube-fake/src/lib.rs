//! A Kubernetes API server for tests, following controller-runtime's envtest convention:
//! [`TestCluster::start`] runs the real `etcd` and `kube-apiserver` when `KUBEBUILDER_ASSETS`
//! names a folder holding them, and otherwise [`FakeApiServer`], an in-process fake that serves
//! what kube-rs clients and `kube::runtime` use, with the API's documented semantics (see
//! `ARCHITECTURE.md` for what it covers and its known gaps). Where the two differ, the fake is
//! wrong.
//!
//! Like envtest, neither runs a controller manager: no garbage collection by ownerReferences, no
//! Deployment controller, no kubelet. Tests mark workloads ready by writing their status.

mod apply;
pub mod builtins;
mod clock;
pub mod cluster;
mod crd;
pub mod error;
mod patch;
mod resources;
mod selector;
mod server;
mod store;

pub use builtins::SERVICE_CIDR;
pub use cluster::{install_crds, ClusterError, TestCluster};
pub use server::FakeApiServer;
