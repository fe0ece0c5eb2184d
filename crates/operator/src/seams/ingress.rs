//! Provider `nginx`: the canary Ingress Flagger's ingress router writes (`pkg/router/ingress.go`)
//! — `<ingress>-canary`, a copy of the user's Ingress named by `ingressRef` whose backends on
//! the apex Service go to `<apex>-canary`, marked `nginx.ingress.kubernetes.io/canary: "true"`
//! and weighed by `canary-weight`. The user's Ingress is only read.
//!
//! As under Coalmine's routers, requests matching `analysis.match` go to the canary — NGINX's
//! `canary-by-header` (with `-value` for an exact value, `-pattern` for a regular expression)
//! and `canary-by-cookie` (a `cookie` header match, Flagger's convention) — and the rest are
//! weighed. NGINX's canary annotations say one header and one cookie, no query parameters, no
//! mirroring and no session affinity: a rollout asking for more is refused by field
//! ([`unsupported`]).

use std::collections::BTreeMap;

use coalmine_controller::BoxFuture;
use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::rollout::{Analysis, StringMatch};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{json, Value};

use crate::seams::istio::regex_escape;
use crate::seams::routed::{apply_route_object, read_object, RouteObjects, RouteSpec};
use crate::seams::workloads::fault;

/// NGINX's canary annotations' prefix.
pub const CANARY_ANNOTATION: &str = "nginx.ingress.kubernetes.io/canary";

/// The canary Ingress of one rollout.
pub struct NginxCanaryIngress {
    ingresses: Api<Ingress>,
    objects: Api<DynamicObject>,
    spec: RouteSpec,
}

impl NginxCanaryIngress {
    pub fn new(client: &kube::Client, spec: RouteSpec) -> NginxCanaryIngress {
        NginxCanaryIngress {
            ingresses: Api::namespaced(client.clone(), &spec.namespace),
            objects: Api::namespaced_with(
                client.clone(),
                &spec.namespace,
                &ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk("networking.k8s.io", "v1", "Ingress"),
                    "ingresses",
                ),
            ),
            spec,
        }
    }

    async fn write(&self, traffic: &Traffic) -> Result<Vec<String>, TrafficFault> {
        let name = self.spec.ingress.clone().unwrap_or_default();
        let theirs = self
            .ingresses
            .get_opt(&name)
            .await
            .map_err(|e| fault(&format!("Ingress {name}"), e))?
            .ok_or_else(|| {
                TrafficFault::Unreachable(format!(
                    "spec.ingressRef: Ingress {}/{name} does not exist",
                    self.spec.namespace
                ))
            })?;
        let canary_name = format!("{name}-canary");
        let before = read_object(&self.objects, "Ingress", &canary_name).await?;
        let ingress = canary_ingress(&self.spec, &theirs, traffic, before.as_ref())
            .map_err(TrafficFault::Refused)?;
        Ok(
            apply_route_object(&self.objects, "Ingress", before.as_ref(), &ingress)
                .await?
                .into_iter()
                .collect(),
        )
    }
}

impl RouteObjects for NginxCanaryIngress {
    fn put<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        Box::pin(self.write(traffic))
    }
}

/// What NGINX's canary annotations cannot say of a rollout: the field and why.
pub fn unsupported(spec: &RouteSpec, analysis: &Analysis) -> Option<(String, String)> {
    if spec.ingress.is_none() {
        return Some((
            "spec.ingressRef".into(),
            "provider nginx copies the user's Ingress: name it (kind Ingress)".into(),
        ));
    }
    if analysis.mirror || analysis.mirror_weight.is_some() {
        return Some((
            "spec.analysis.mirror".into(),
            "NGINX's canary annotations cannot mirror requests".into(),
        ));
    }
    if analysis.session_affinity.is_some() {
        return Some((
            "spec.analysis.sessionAffinity".into(),
            "NGINX's canary annotations keep no session affinity".into(),
        ));
    }
    let headers: usize = analysis
        .match_
        .iter()
        .map(|m| m.headers.keys().filter(|h| !is_cookie(h)).count())
        .sum();
    for (i, m) in analysis.match_.iter().enumerate() {
        if !m.query_params.is_empty() || !m.source_labels.is_empty() {
            return Some((
                format!("spec.analysis.match[{i}]"),
                "NGINX's canary annotations match one header and one cookie, no query parameters or source labels".into(),
            ));
        }
        if let Some((h, _)) = m
            .headers
            .iter()
            .find(|(h, t)| is_cookie(h) && !matches!(t, StringMatch::Exact(_)))
        {
            return Some((
                format!("spec.analysis.match[{i}].headers.{h}"),
                "NGINX's canary-by-cookie names the cookie: give it as exact".into(),
            ));
        }
    }
    (headers > 1).then(|| {
        (
            "spec.analysis.match".into(),
            "NGINX's canary annotations match one header (and one cookie)".into(),
        )
    })
}

fn is_cookie(header: &str) -> bool {
    header.eq_ignore_ascii_case("cookie")
}

/// `<ingress>-canary` carrying `traffic`, copied from the user's Ingress `theirs`; an error
/// says why it cannot be (no backend on the apex Service).
pub fn canary_ingress(
    spec: &RouteSpec,
    theirs: &Ingress,
    traffic: &Traffic,
    existing: Option<&DynamicObject>,
) -> Result<Value, String> {
    let name = theirs.metadata.name.clone().unwrap_or_default();
    let mut copy = serde_json::to_value(theirs.spec.clone().unwrap_or_default())
        .expect("an Ingress serializes");
    let mut found = false;
    for rule in copy["rules"].as_array_mut().into_iter().flatten() {
        for path in rule["http"]["paths"].as_array_mut().into_iter().flatten() {
            if path["backend"]["service"]["name"] == spec.apex.as_str() {
                path["backend"]["service"]["name"] = spec.canary().into();
                found = true;
            }
        }
    }
    if !found {
        return Err(format!(
            "spec.ingressRef: Ingress {name} has no backend on Service {}: the canary Ingress sends that backend's share to {}",
            spec.apex,
            spec.canary()
        ));
    }
    let mut annotations: BTreeMap<String, String> = theirs
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| {
            !k.starts_with(CANARY_ANNOTATION)
                && k != "kubectl.kubernetes.io/last-applied-configuration"
        })
        .collect();
    let (_, weight) = RouteSpec::weights(traffic);
    annotations.insert(CANARY_ANNOTATION.into(), "true".into());
    annotations.insert(format!("{CANARY_ANNOTATION}-weight"), weight.to_string());
    if traffic.apply_match && traffic.canary {
        for m in &spec.matches {
            for (header, test) in &m.headers {
                match test {
                    StringMatch::Exact(v) if is_cookie(header) => {
                        annotations.insert(format!("{CANARY_ANNOTATION}-by-cookie"), v.clone());
                    }
                    StringMatch::Exact(v) => {
                        annotations
                            .insert(format!("{CANARY_ANNOTATION}-by-header"), header.clone());
                        annotations
                            .insert(format!("{CANARY_ANNOTATION}-by-header-value"), v.clone());
                    }
                    other => {
                        let pattern = match other {
                            StringMatch::Prefix(v) => format!("^{}", regex_escape(v)),
                            StringMatch::Suffix(v) => format!("{}$", regex_escape(v)),
                            // Coalmine's (and Istio's) regex matches the whole value.
                            StringMatch::Regex(v) | StringMatch::Exact(v) => format!("^(?:{v})$"),
                        };
                        annotations
                            .insert(format!("{CANARY_ANNOTATION}-by-header"), header.clone());
                        annotations
                            .insert(format!("{CANARY_ANNOTATION}-by-header-pattern"), pattern);
                    }
                }
            }
        }
    }
    let mut metadata = spec.metadata(&format!("{name}-canary"), existing);
    metadata["annotations"] = json!(annotations);
    if let Some(labels) = &theirs.metadata.labels {
        metadata["labels"] = json!(labels);
    }
    Ok(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": metadata,
        "spec": copy,
    }))
}
