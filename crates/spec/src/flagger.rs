//! Flagger's `Canary` and `MetricTemplate` (flagger.app/v1beta1), as Coalmine reads them.
//!
//! A document is first checked against Flagger's own CRD schema ([`crate::schema`]), so Coalmine
//! accepts exactly what the CRD accepts; then the fields Coalmine acts on are read into these types,
//! and the Kubernetes-only ones (targetRef, service mesh settings) are left alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollout::{
    Analysis, HostedRouter, HttpMatch, HttpUrl, Metadata, Rollout, RolloutSpec, Target, API_VERSION,
};

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

/// Where a converted Canary's traffic goes: Flagger finds these in the cluster; here they are
/// given, by `--router/--stable/--canary` or by a `Placement` document (coalmine.dev/v1alpha1)
/// of the Canary's name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routers: Vec<HttpUrl>,
    /// A router `coalmine serve` runs itself for this rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<HostedRouter>,
    /// As a Rollout's `spec.routerService`.
    #[serde(
        default,
        deserialize_with = "crate::rollout::router_service",
        skip_serializing_if = "Option::is_none"
    )]
    pub router_service: Option<String>,
    pub stable: Option<Target>,
    pub canary: Option<Target>,
    /// Host names in the Canary's webhook and metric addresses, and the `host:port` that
    /// reaches each here (what cluster DNS would resolve): `flagger-loadtester:
    /// 127.0.0.1:8089`. A key may carry a port (`prometheus:9090`) to map only that one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hosts: BTreeMap<String, HostPort>,
    /// As a Rollout's `spec.preview`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preview: Vec<HttpMatch>,
}

/// The `Placement` document: a Canary's placement, named after the Canary.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementDoc {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Placement,
}

/// `host:port`: where a mapped host name is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort(String);

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} is not host:port (such as 127.0.0.1:8089)"))?;
        let valid_host = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
        match port.parse::<u16>() {
            Ok(p) if p > 0 && valid_host => Ok(HostPort(text)),
            Ok(_) | Err(_) if valid_host => Err(format!(
                "{text:?}: port {port:?} is not a port (1 to 65535)"
            )),
            _ => Err(format!(
                "{text:?} is not host:port (such as 127.0.0.1:8089)"
            )),
        }
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.0
    }
}

/// `url` with its host (and port) replaced when `hosts` maps them: `host:port` first, then the
/// bare host. The path, query and credentials stay.
pub fn map_host(url: &str, hosts: &BTreeMap<String, HostPort>) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let default_port = if scheme == "https" { "443" } else { "80" };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (h, p),
        _ => (hostport, default_port),
    };
    let mapped = hosts
        .get(&format!("{host}:{port}"))
        .or_else(|| hosts.get(host));
    match mapped {
        Some(to) => {
            let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            format!("{scheme}://{userinfo}{}{tail}", to.0)
        }
        None => url.to_string(),
    }
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

    /// The native Rollout with the same analysis, its webhook and metric addresses mapped
    /// through the placement's `hosts`.
    pub fn to_rollout(&self, placement: Placement) -> Rollout {
        let mut analysis = self.spec.analysis.clone();
        if !placement.hosts.is_empty() {
            for hook in &mut analysis.webhooks {
                let mapped = map_host(hook.url.as_str(), &placement.hosts);
                // A mapped URL keeps the scheme and path of a valid one.
                if let Ok(url) = HttpUrl::parse(&mapped) {
                    hook.url = url;
                }
            }
            for metric in &mut analysis.metrics {
                if let Some(provider) = &mut metric.provider {
                    if let Some(address) = &mut provider.address {
                        *address = map_host(address, &placement.hosts);
                    }
                }
            }
        }
        Rollout {
            api_version: API_VERSION.to_string(),
            kind: "Rollout".to_string(),
            metadata: self.metadata.clone(),
            spec: RolloutSpec {
                routers: placement.routers,
                router: placement.router,
                router_service: placement.router_service,
                cohort: None,
                service: Some(self.service_name().to_string()),
                stable: placement.stable,
                canary: placement.canary,
                preview: placement.preview,
                flag: None,
                progress_deadline_seconds: self
                    .spec
                    .progress_deadline_seconds
                    .unwrap_or(crate::rollout::DEFAULT_PROGRESS_DEADLINE_SECONDS),
                skip_analysis: self.spec.skip_analysis,
                suspend: self.spec.suspend,
                analysis,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_hosts_replace_host_and_port_and_keep_the_rest() {
        let hosts: BTreeMap<String, HostPort> = [
            ("flagger-loadtester", "127.0.0.1:8089"),
            ("prometheus:9090", "127.0.0.1:19090"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), HostPort::try_from(v.to_string()).unwrap()))
        .collect();
        for (url, mapped) in [
            ("http://flagger-loadtester/", "http://127.0.0.1:8089/"),
            (
                "http://flagger-loadtester.test:80/",
                "http://flagger-loadtester.test:80/",
            ),
            (
                "http://u:p@prometheus:9090/api?x=1",
                "http://u:p@127.0.0.1:19090/api?x=1",
            ),
            ("http://prometheus:9091", "http://prometheus:9091"),
        ] {
            assert_eq!(map_host(url, &hosts), mapped, "{url}");
        }
        assert!(HostPort::try_from("127.0.0.1".to_string()).is_err());
        assert!(HostPort::try_from("h:99999".to_string()).is_err());
    }
}
