//! A rollout's metric checks made self-contained from the cluster, as Flagger does per tick:
//! a `templateRef` names a `MetricTemplate` (`flagger.app/v1beta1`) in the cluster; an inline
//! `query` without a provider goes to the rollout's `metricsServer`. The placeholders are filled
//! in by the one renderer the file runs use ([`coalmine_spec::templates::resolve_check`]).
//!
//! Resolved once, when a run starts: a template edited mid-run applies from the next run.

use coalmine_spec::alerts::{AlertKind, AlertProviderSpec, SLACK_POST_MESSAGE_URL};
use coalmine_spec::rollout::{Analysis, Metadata};
use coalmine_spec::templates::{
    resolve_check, HeaderValues, MetricTemplate as TemplateDoc, MetricTemplateSpec, Provider,
    TemplateContext, PROMETHEUS,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::flagger::{MetricTemplate, SpecFieldError};

/// Where the checks' placeholders point: the rollout, its workload and Service.
pub struct Subject<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub target: &'a str,
    pub service: &'a str,
    pub metrics_server: Option<&'a str>,
}

/// Why a check could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The spec (or a template it names) is wrong where it says.
    #[error("{0}")]
    Invalid(SpecFieldError),
    /// The API server did not answer: tried again.
    #[error("reading a MetricTemplate: {0}")]
    Kube(#[from] kube::Error),
}

/// Resolves every check of `analysis` that is not built in, in place.
pub async fn resolve_metrics(
    client: &kube::Client,
    subject: &Subject<'_>,
    analysis: &mut Analysis,
) -> Result<(), ResolveError> {
    let ctx = TemplateContext {
        name: subject.name,
        namespace: subject.namespace,
        target: subject.target,
        service: subject.service,
    };
    for (i, check) in analysis.metrics.iter_mut().enumerate() {
        if check.is_builtin() {
            continue;
        }
        let field = format!("spec.analysis.metrics[{i}]");
        if check.query.is_some() && check.provider.is_none() {
            check.provider = subject.metrics_server.map(|address| Provider {
                kind: PROMETHEUS.into(),
                address: Some(address.to_string()),
                ..Provider::default()
            });
        }
        let template = match (&check.query, &check.template_ref) {
            (None, Some(reference)) => {
                let namespace = reference.namespace.as_deref().unwrap_or(subject.namespace);
                let api: Api<MetricTemplate> = Api::namespaced(client.clone(), namespace);
                let Some(found) = api.get_opt(&reference.name).await? else {
                    return Err(ResolveError::Invalid(SpecFieldError {
                        field: format!("{field}.templateRef"),
                        message: format!(
                            "MetricTemplate {namespace}/{} does not exist",
                            reference.name
                        ),
                    }));
                };
                let spec: MetricTemplateSpec = serde_path_to_error::deserialize(&found.spec)
                    .map_err(|e| {
                        ResolveError::Invalid(SpecFieldError {
                            field: format!("{field}.templateRef"),
                            message: format!(
                                "MetricTemplate {namespace}/{}: spec.{}: {}",
                                reference.name,
                                e.path(),
                                e.inner()
                            ),
                        })
                    })?;
                Some(TemplateDoc {
                    api_version: String::new(),
                    kind: String::new(),
                    metadata: Metadata {
                        name: reference.name.clone(),
                        namespace: Some(namespace.to_string()),
                        labels: Default::default(),
                        annotations: Default::default(),
                    },
                    spec,
                })
            }
            _ => None,
        };
        resolve_check(check, template.as_ref(), &ctx).map_err(|e| {
            ResolveError::Invalid(SpecFieldError {
                field: format!("{field}.{}", e.field),
                message: match &template {
                    Some(t) => format!(
                        "MetricTemplate {}/{}: {}",
                        t.metadata.namespace.as_deref().unwrap_or_default(),
                        t.metadata.name,
                        e.message
                    ),
                    None => e.message,
                },
            })
        })?;
        if let Some(provider) = &mut check.provider {
            let namespace = template
                .as_ref()
                .and_then(|t| t.metadata.namespace.clone())
                .unwrap_or_else(|| subject.namespace.to_string());
            with_credentials(client, provider, &namespace)
                .await
                .map_err(|e| match e {
                    ResolveError::Invalid(mut e) => {
                        e.field = format!("{field}.provider.{}", e.field);
                        ResolveError::Invalid(e)
                    }
                    other => other,
                })?;
        }
    }
    Ok(())
}

/// Flagger's `secretRef`: the named Secret (in the template's namespace) gives the provider's
/// `address`, and `username` + `password` (basic authentication, carried in the address) or a
/// bearer `token`. Everything Coalmine shows hides them (`coalmine_spec::redact`).
async fn with_credentials(
    client: &kube::Client,
    provider: &mut Provider,
    namespace: &str,
) -> Result<(), ResolveError> {
    let Some(reference) = provider.secret_ref.take() else {
        return Ok(());
    };
    let invalid = |message: String| {
        ResolveError::Invalid(SpecFieldError {
            field: "secretRef".into(),
            message,
        })
    };
    let Some(name) = reference.get("name").and_then(|n| n.as_str()) else {
        return Err(invalid("secretRef needs a name".into()));
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = secrets.get_opt(name).await? else {
        return Err(invalid(format!("Secret {namespace}/{name} does not exist")));
    };
    let data = secret.data.unwrap_or_default();
    let text = |key: &str| -> Result<Option<String>, ResolveError> {
        data.get(key)
            .map(|v| {
                String::from_utf8(v.0.clone()).map_err(|_| {
                    invalid(format!(
                        "Secret {namespace}/{name}: {key} is not UTF-8 text"
                    ))
                })
            })
            .transpose()
    };
    if let Some(address) = text("address")? {
        provider.address = Some(address);
    }
    if let (Some(username), Some(password)) = (text("username")?, text("password")?) {
        let address = provider.address.clone().unwrap_or_default();
        let mut url = url::Url::parse(&address).map_err(|e| {
            invalid(format!(
                "Secret {namespace}/{name} gives credentials for an address that is not a URL: {e}"
            ))
        })?;
        // Percent-encoded by the URL; sent as basic authentication.
        let _ = url.set_username(&username);
        let _ = url.set_password(Some(&password));
        provider.address = Some(url.to_string());
    }
    if let Some(token) = text("token")? {
        provider.headers.insert(
            "Authorization".into(),
            HeaderValues::One(format!("Bearer {token}")),
        );
    }
    Ok(())
}

/// Resolves a rollout's `analysis.alerts` from the cluster, in place, as Flagger does: each
/// `providerRef` names an `AlertProvider` (in its namespace, or the rollout's), whose spec is
/// copied into the alert; its `secretRef` Secret gives the `address` (and `proxy`, and Slack's
/// `token`: a bearer token, to Slack's `chat.postMessage` without an address), read now and
/// held in memory only, never written back. An alert that cannot be sent (no such provider, a
/// spec or Secret Coalmine cannot use) is left unresolved, and said in the returned warnings (a
/// Warning Event each, when the run starts): a notification never holds a release.
pub async fn resolve_alerts(
    client: &kube::Client,
    namespace: &str,
    analysis: &mut Analysis,
) -> Result<Vec<String>, kube::Error> {
    let mut warnings = Vec::new();
    for (i, alert) in analysis.alerts.iter_mut().enumerate() {
        alert.provider = None;
        let reference = &alert.provider_ref;
        let at = reference.namespace.as_deref().unwrap_or(namespace);
        let providers: Api<crate::flagger::AlertProvider> = Api::namespaced(client.clone(), at);
        let found = match providers.get_opt(&reference.name).await {
            Ok(found) => found,
            // Flagger's CRD not installed: no AlertProvider exists.
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(e) => return Err(e),
        };
        let Some(found) = found else {
            warnings.push(format!(
                "spec.analysis.alerts[{i}].providerRef: AlertProvider {at}/{} does not exist: alert {:?} is not sent",
                reference.name, alert.name
            ));
            continue;
        };
        let mut spec: AlertProviderSpec = match serde_path_to_error::deserialize(&found.spec) {
            Ok(spec) => spec,
            Err(e) => {
                warnings.push(format!(
                    "spec.analysis.alerts[{i}].providerRef: AlertProvider {at}/{}: spec.{}: {}: alert {:?} is not sent",
                    reference.name,
                    e.path(),
                    e.inner(),
                    alert.name
                ));
                continue;
            }
        };
        if let Some(secret) = spec.secret_ref.take() {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), at);
            let data = match secrets.get_opt(&secret.name).await? {
                Some(found) => found.data.unwrap_or_default(),
                None => {
                    warnings.push(format!(
                        "spec.analysis.alerts[{i}].providerRef: AlertProvider {at}/{}: spec.secretRef: Secret {at}/{} does not exist: alert {:?} is not sent",
                        reference.name, secret.name, alert.name
                    ));
                    continue;
                }
            };
            let text = |key: &str| {
                data.get(key)
                    .and_then(|v| String::from_utf8(v.0.clone()).ok())
                    .map(|v| v.trim().to_string())
            };
            if let Some(address) = text("address") {
                spec.address = Some(address);
            }
            if let Some(proxy) = text("proxy") {
                spec.proxy = Some(proxy);
            }
            // Only Slack's API takes a token (as Flagger reads it).
            if let Some(token) = text("token").filter(|_| spec.kind == AlertKind::Slack) {
                if spec.address.is_none() {
                    spec.address = Some(SLACK_POST_MESSAGE_URL.to_string());
                }
                spec.token = Some(token);
            }
        }
        if spec.address.is_none() {
            warnings.push(format!(
                "spec.analysis.alerts[{i}].providerRef: AlertProvider {at}/{} has no address (spec.address, or the key `address` of its secretRef Secret): alert {:?} is not sent",
                reference.name, alert.name
            ));
            continue;
        }
        // On Kubernetes the address comes from the cluster, not the operator's files or
        // environment.
        spec.address_from = None;
        alert.provider = Some(spec);
    }
    Ok(warnings)
}
