//! Metric templates and providers: where a non-built-in check gets its number.
//!
//! Flagger's `MetricTemplate` (flagger.app/v1beta1) and Coalmine's own (coalmine.dev/v1alpha1,
//! which adds the `web` provider) share one shape. A check refers to a template with
//! `templateRef`, or carries an inline `query` with a `provider`. Before a rollout runs, every
//! such check is *resolved*: the template's provider and query are copied into the check and the
//! query's `{{ ... }}` placeholders are filled in, so the stored rollout needs no other document.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Dur;
use crate::rollout::{Metadata, MetricCheck};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricTemplate {
    #[serde(default, skip_serializing)]
    pub api_version: String,
    #[serde(default, skip_serializing)]
    pub kind: String,
    pub metadata: Metadata,
    pub spec: MetricTemplateSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricTemplateSpec {
    pub provider: Provider,
    /// PromQL for `prometheus`; for `web`, the JSONPath (RFC 9535) that picks the number out of
    /// the answer.
    #[serde(default)]
    pub query: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    /// `prometheus` or `web` (Coalmine). Flagger's other types parse but cannot run here.
    #[serde(rename = "type")]
    pub kind: String,
    /// Prometheus' base URL, or the URL the `web` provider calls (placeholders allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Flagger writes each header's values as a list; a single string is read as one value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "any_value_map")]
    pub headers: BTreeMap<String, HeaderValues>,
    #[serde(default, skip_serializing_if = "crate::rollout::is_false")]
    pub insecure_skip_verify: bool,
    /// Flagger's Kubernetes secret with credentials: there is no cluster to read it from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub secret_ref: Option<serde_json::Value>,
    /// Coalmine: how long one query may take (default 5s); a slower answer fails the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Coalmine, `web` only: GET (default) or POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<WebMethod>,
    /// Coalmine, `web` only: the POST body (placeholders allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// A CRD's schema must be structural: a value that is a string or a list is kept as written.
fn any_value_map(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": { "x-kubernetes-preserve-unknown-fields": true }
    })
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    One(String),
    Many(Vec<String>),
}

impl HeaderValues {
    pub fn values(&self) -> &[String] {
        match self {
            HeaderValues::One(v) => std::slice::from_ref(v),
            HeaderValues::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum WebMethod {
    Get,
    Post,
}

pub const PROMETHEUS: &str = "prometheus";
pub const WEB: &str = "web";
/// A provider's default query timeout.
pub const DEFAULT_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The names a query's placeholders stand for, as Flagger defines them.
#[derive(Debug, Clone)]
pub struct TemplateContext<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// Flagger: the target Deployment's name.
    pub target: &'a str,
    /// Flagger: the Service's name (the target's unless given).
    pub service: &'a str,
}

/// Fills in `{{ name }}`, `{{ namespace }}`, `{{ target }}`, `{{ service }}`, `{{ interval }}`
/// and `{{ variables.X }}` (spaces inside the braces optional). An unknown placeholder is an
/// error naming the ones there are, never an empty string in the query.
pub fn render(
    text: &str,
    ctx: &TemplateContext,
    interval: &str,
    variables: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("`{{{{` without a closing `}}}}` in {text:?}"))?;
        let key = after[..close].trim();
        // Go template style `.name` is accepted too: Flagger's own docs use both.
        let key = key.strip_prefix('.').unwrap_or(key);
        let value = match key {
            "name" => ctx.name,
            "namespace" => ctx.namespace,
            "target" => ctx.target,
            "service" => ctx.service,
            "interval" => interval,
            _ => match key.strip_prefix("variables.") {
                Some(var) => variables.get(var).map(String::as_str).ok_or_else(|| {
                    let known: Vec<&str> = variables.keys().map(String::as_str).collect();
                    format!(
                        "{{{{ {key} }}}} has no value: add `{var}` to the metric's templateVariables (it has: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    )
                })?,
                None => {
                    return Err(format!(
                        "unknown placeholder {{{{ {key} }}}}: use name, namespace, target, service, interval or variables.NAME"
                    ))
                }
            },
        };
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Where resolving a check failed: the field under the check, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolveError {
    pub field: String,
    pub message: String,
}

fn fail<T>(field: &str, message: impl Into<String>) -> Result<T, ResolveError> {
    Err(ResolveError {
        field: field.to_string(),
        message: message.into(),
    })
}

/// Makes a non-built-in check self-contained: provider and query inline, placeholders filled.
/// `template` is the MetricTemplate its `templateRef` names (None when it has an inline query).
pub fn resolve_check(
    check: &mut MetricCheck,
    template: Option<&MetricTemplate>,
    ctx: &TemplateContext,
) -> Result<(), ResolveError> {
    let (mut provider, query) = match (&check.query, template) {
        // Already inline (written so, or resolved before: resolving twice changes nothing).
        (Some(query), _) => match &check.provider {
            Some(p) => (p.clone(), query.clone()),
            None => {
                return fail(
                    "provider",
                    "an inline query needs a provider (type and address), or use a templateRef",
                )
            }
        },
        (None, Some(t)) => (t.spec.provider.clone(), t.spec.query.clone()),
        (None, None) => {
            return fail(
                "templateRef",
                "the MetricTemplate it names is not among the documents given",
            )
        }
    };
    let prefix = if check.query.is_some() {
        "provider"
    } else {
        "templateRef"
    };
    let interval = Dur(check.window()).to_string();
    let render = |field: &str, text: &str| {
        render(text, ctx, &interval, &check.template_variables).map_err(|message| ResolveError {
            field: field.to_string(),
            message,
        })
    };
    if provider.secret_ref.is_some() {
        return fail(
            &format!("{prefix}.secretRef"),
            "a Kubernetes secret cannot be read outside a cluster: put the credentials in headers",
        );
    }
    let address = match &provider.address {
        Some(a) if !a.trim().is_empty() => a.clone(),
        _ => return fail(&format!("{prefix}.address"), "the provider needs an address (Flagger would find the mesh's Prometheus; Coalmine has to be told)"),
    };
    let address = render(&format!("{prefix}.address"), &address)?;
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        return fail(
            &format!("{prefix}.address"),
            format!("{address:?} is not an http:// or https:// URL"),
        );
    }
    if let Err(message) = crate::rollout::url_port(&address) {
        return fail(&format!("{prefix}.address"), message);
    }
    provider.address = Some(address);
    let query = render("query", &query)?;
    match provider.kind.as_str() {
        PROMETHEUS => {
            if provider.method.is_some() || provider.body.is_some() {
                return fail(&format!("{prefix}.method"), "method and body are for the web provider; Prometheus is asked with GET /api/v1/query");
            }
            if query.trim().is_empty() {
                return fail("query", "the PromQL query is empty");
            }
        }
        WEB => {
            serde_json_path::JsonPath::parse(&query).map_err(|e| ResolveError {
                field: "query".into(),
                message: format!("for the web provider the query is a JSONPath such as `$.data.errorRate`: {e}"),
            })?;
            if let Some(body) = &provider.body {
                provider.body = Some(render(&format!("{prefix}.body"), body)?);
            }
        }
        other => {
            return fail(
                &format!("{prefix}.type"),
                format!("provider type {other:?} cannot run here: Coalmine queries `prometheus` and `web` (HTTP returning JSON)"),
            )
        }
    }
    check.provider = Some(provider);
    check.query = Some(query);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> TemplateContext<'static> {
        TemplateContext {
            name: "payment",
            namespace: "shop",
            target: "payment-deploy",
            service: "payment-svc",
        }
    }

    #[test]
    fn placeholders_are_filled_with_or_without_spaces() {
        let vars = BTreeMap::from([("code".to_string(), "5..".to_string())]);
        let out = render(
            r#"rate(x{ns="{{ namespace }}",svc="{{service}}",t="{{ .target }}",n="{{ name }}",s=~"{{ variables.code }}"}[{{ interval }}])"#,
            &ctx(),
            "30s",
            &vars,
        )
        .unwrap();
        assert_eq!(
            out,
            r#"rate(x{ns="shop",svc="payment-svc",t="payment-deploy",n="payment",s=~"5.."}[30s])"#
        );
    }

    #[test]
    fn unknown_placeholders_and_missing_variables_are_errors() {
        let none = BTreeMap::new();
        let err = render("{{ variables.code }}", &ctx(), "1m", &none).unwrap_err();
        assert!(
            err.contains("add `code` to the metric's templateVariables"),
            "{err}"
        );
        let err = render("{{ pod }}", &ctx(), "1m", &none).unwrap_err();
        assert!(err.contains("unknown placeholder {{ pod }}"), "{err}");
        assert!(render("{{ name", &ctx(), "1m", &none).is_err());
    }
}
