//! Flagger's `Canary` and `MetricTemplate` (flagger.app/v1beta1), as Coalmine reads them.
//!
//! A document is first checked against Flagger's own CRD schema ([`crate::schema`]), so Coalmine
//! accepts exactly what the CRD accepts; then the fields Coalmine acts on are read into these types,
//! and the Kubernetes-only ones (targetRef, service mesh settings) are left alone.

use serde::Deserialize;

use crate::rollout::{Analysis, HttpUrl, Metadata, Rollout, RolloutSpec, Target, API_VERSION};

pub const FLAGGER_API_VERSION: &str = "flagger.app/v1beta1";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Canary {
    pub metadata: Metadata,
    pub spec: CanarySpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    pub target_ref: ObjectRef,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub service: Option<CanaryService>,
    /// Flagger: the Prometheus that built-in and inline-query metrics use. Coalmine reads its
    /// built-in metrics from the routers, and sends inline queries here.
    #[serde(default)]
    pub metrics_server: Option<String>,
    #[serde(default)]
    pub progress_deadline_seconds: Option<u64>,
    #[serde(default)]
    pub skip_analysis: bool,
    #[serde(default)]
    pub suspend: bool,
    pub analysis: Analysis,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CanaryService {
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
}

/// Where a converted Canary's traffic goes: Flagger finds these in the cluster; here they are given.
#[derive(Debug, Clone)]
pub struct Placement {
    pub routers: Vec<HttpUrl>,
    pub stable: Target,
    pub canary: Target,
}

impl Canary {
    /// Flagger's `{{ service }}`: the Service's name, the target's unless given.
    pub fn service_name(&self) -> &str {
        self.spec
            .service
            .as_ref()
            .and_then(|s| s.name.as_deref())
            .unwrap_or(&self.spec.target_ref.name)
    }

    /// The native Rollout with the same analysis, for `coalmine convert`.
    pub fn to_rollout(&self, placement: Placement) -> Rollout {
        Rollout {
            api_version: API_VERSION.to_string(),
            kind: "Rollout".to_string(),
            metadata: self.metadata.clone(),
            spec: RolloutSpec {
                routers: placement.routers,
                router: None,
                service: Some(self.service_name().to_string()),
                stable: Some(placement.stable),
                canary: Some(placement.canary),
                progress_deadline_seconds: self
                    .spec
                    .progress_deadline_seconds
                    .unwrap_or(crate::rollout::DEFAULT_PROGRESS_DEADLINE_SECONDS),
                skip_analysis: self.spec.skip_analysis,
                suspend: self.spec.suspend,
                analysis: self.spec.analysis.clone(),
            },
        }
    }
}
