//! Other tools' documents, which Coalmine reads past with a note: what it does instead, written
//! out from the document where it can be (an Istio header match becomes the router's `--match`
//! flag, a Prometheus alert becomes a `rollbackOnAlerts` entry).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::documents::Note;
use crate::schema;
use crate::yaml::parse_yaml;

/// `apps/v1`, `v1`, `networking.istio.io/v1beta1`: an optional DNS-style group, then a
/// Kubernetes version (`v1`, `v2beta3`).
pub(crate) fn is_kubernetes_api_version(api_version: &str) -> bool {
    let (group, version) = match api_version.rsplit_once('/') {
        Some((group, version)) => (Some(group), version),
        None => (None, api_version),
    };
    let group_ok = group.is_none_or(|g| {
        !g.is_empty()
            && g.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    let version_ok = version.strip_prefix('v').is_some_and(|rest| {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let (number, stage) = rest.split_at(digits);
        let stage_ok = stage.is_empty()
            || ["alpha", "beta"].iter().any(|s| {
                stage
                    .strip_prefix(s)
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
            });
        !number.is_empty() && stage_ok
    });
    group_ok && version_ok
}

/// `Deployment`, `HorizontalPodAutoscaler`: a word starting with a capital letter.
pub(crate) fn is_kubernetes_kind(kind: &str) -> bool {
    kind.starts_with(|c: char| c.is_ascii_uppercase())
        && kind.chars().all(|c| c.is_ascii_alphanumeric())
}

/// The note on a Kubernetes document of a kind Coalmine does not act on.
pub(crate) fn note(file: &str, first_line: u64, text: &str, api_version: &str, kind: &str) -> Note {
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    let object: Object = parse_yaml(file, text).unwrap_or_default();
    let mut note = Note {
        file: file.to_string(),
        line: line_of(text, "kind", first_line),
        kind: kind.to_string(),
        name: object.metadata.name.clone().unwrap_or_default(),
        message: String::new(),
        equivalents: Vec::new(),
    };
    match (group, kind) {
        ("networking.istio.io", "VirtualService") => virtual_service(&mut note, text, first_line),
        ("networking.istio.io", "DestinationRule") => destination_rule(&mut note, text, first_line),
        ("monitoring.coreos.com", "PrometheusRule") => {
            let rules: PrometheusRule = parse_yaml(file, text).unwrap_or_default();
            alerts(
                &mut note,
                &rules.spec.groups,
                text,
                "spec.groups",
                first_line,
            );
        }
        ("argoproj.io", "Rollout") => {
            note.message = "Argo Rollouts' Rollout, not read by Coalmine: write Coalmine's own Rollout (apiVersion coalmine.dev/v1alpha1, README \"Rollouts\"), or give Coalmine the service's Flagger Canary as it is".into();
        }
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") | ("", "Pod") => {
            let replicas = object
                .spec
                .get("replicas")
                .and_then(|r| r.as_u64())
                .map(|n| {
                    let replicas = if n == 1 {
                        "replica does"
                    } else {
                        "replicas do"
                    };
                    format!(" (its {n} {replicas} not set a share of traffic)")
                })
                .unwrap_or_default();
            note.message = format!(
                "not read by Coalmine: a Rollout reaches each version at an address (spec.stable.url, spec.canary.url) and the router splits traffic by canaryWeight{replicas}"
            );
        }
        ("", "Service") => {
            let port = object
                .spec
                .get("ports")
                .and_then(|p| p.get(0))
                .and_then(|p| p.get("port"))
                .and_then(|p| p.as_u64());
            let host = match &object.metadata.namespace {
                Some(ns) => format!("{}.{ns}", note.name),
                None => note.name.clone(),
            };
            note.message = match port {
                Some(port) if !note.name.is_empty() => format!(
                    "not read by Coalmine; a Rollout's spec.stable.url or spec.canary.url (or the router's --stable/--canary) can name it: http://{host}:{port}"
                ),
                _ => "not read by Coalmine; a Rollout's spec.stable.url or spec.canary.url can name a Service's address".into(),
            };
        }
        _ => {
            note.message =
                "not read by Coalmine, which acts on Rollout, Canary and MetricTemplate documents"
                    .into();
        }
    }
    note
}

/// The note on a plain Prometheus rule file (`groups:` at the top, no apiVersion).
pub(crate) fn rule_file_note(file: &str, first_line: u64, text: &str) -> Note {
    let rules: RuleGroups = parse_yaml(file, text).unwrap_or_default();
    // The `groups:` key's own line: its value, a block list, starts on the next.
    let groups_line = text
        .lines()
        .position(|l| l.starts_with("groups:"))
        .map_or(first_line, |i| i as u64 + first_line);
    let mut note = Note {
        file: file.to_string(),
        line: groups_line,
        kind: "Prometheus rule file".into(),
        name: String::new(),
        message: String::new(),
        equivalents: Vec::new(),
    };
    alerts(&mut note, &rules.groups, text, "groups", first_line);
    note
}

/// The 1-based line in the file of `field` in a document starting at `first_line`.
fn line_of(text: &str, field: &str, first_line: u64) -> u64 {
    schema::locate(text, field).map_or(first_line, |(line, _)| line + first_line - 1)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Object {
    metadata: ObjectMeta,
    spec: serde_json::Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ObjectMeta {
    name: Option<String>,
    namespace: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Prometheus rules: alerts roll back through `rollbackOnAlerts`.

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RuleGroups {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PrometheusRule {
    spec: RuleGroups,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Rule {
    alert: Option<String>,
}

fn alerts(note: &mut Note, groups: &[RuleGroup], text: &str, path: &str, first_line: u64) {
    note.message = "read by Prometheus, not by Coalmine; to roll a canary back when one of its alerts fires, list the alert in the Rollout's analysis.rollbackOnAlerts and send Alertmanager's webhook to `coalmine serve` (POST /api/v1/alertmanager with its token; README \"Alerts roll back\")".into();
    for (g, group) in groups.iter().enumerate() {
        for (r, rule) in group.rules.iter().enumerate() {
            let Some(alert) = &rule.alert else { continue };
            let line = line_of(text, &format!("{path}[{g}].rules[{r}].alert"), first_line);
            note.equivalents.push(format!(
                "alert {alert} (group {}, line {line}): rollbackOnAlerts: [{{alertname: {}}}]",
                group.name,
                yaml_scalar(alert)
            ));
        }
    }
    if note.equivalents.is_empty() {
        note.message = "read by Prometheus, not by Coalmine; it has no alerts for a Rollout's analysis.rollbackOnAlerts to name".into();
    }
}

// ---------------------------------------------------------------------------------------------
// Istio: the router's match rules, weight and upstreams.

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct VirtualService {
    spec: VirtualServiceSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct VirtualServiceSpec {
    http: Vec<HttpRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct HttpRoute {
    #[serde(rename = "match")]
    matches: Vec<BTreeMap<String, serde_json::Value>>,
    route: Vec<RouteDestination>,
    mirror: Option<Destination>,
    mirror_percentage: Option<MirrorPercentage>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RouteDestination {
    destination: Destination,
    weight: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Destination {
    host: String,
    subset: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MirrorPercentage {
    value: f64,
}

/// Istio's StringMatch: exactly one of these.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StringMatch {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

impl StringMatch {
    fn kind_and_value(&self) -> Option<(&'static str, &str)> {
        match (&self.exact, &self.prefix, &self.regex) {
            (Some(v), None, None) => Some(("exact", v)),
            (None, Some(v), None) => Some(("prefix", v)),
            (None, None, Some(v)) => Some(("regex", v)),
            _ => None,
        }
    }
}

/// Which version a destination serves, from the subset's or host's name (`canary`, `stable`,
/// Flagger's `primary`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    Stable,
    Canary,
    Unknown,
}

impl Destination {
    fn version(&self) -> Version {
        let name = self
            .subset
            .as_deref()
            .unwrap_or(&self.host)
            .to_ascii_lowercase();
        if name.contains("canary") {
            Version::Canary
        } else if name.contains("stable") || name.contains("primary") {
            Version::Stable
        } else {
            Version::Unknown
        }
    }

    fn describe(&self) -> String {
        match &self.subset {
            Some(subset) => format!("subset {subset}"),
            None => format!("host {}", self.host),
        }
    }
}

fn virtual_service(note: &mut Note, text: &str, first_line: u64) {
    note.message = "not applied by Coalmine, whose router does this routing itself (README \"A five-minute tour of the router\"); the equivalent".into();
    let vs: VirtualService = parse_yaml(&note.file, text).unwrap_or_default();
    for (i, route) in vs.spec.http.iter().enumerate() {
        let line = line_of(text, &format!("spec.http[{i}]"), first_line);
        let at = format!("http[{i}] (line {line})");
        let lines = http_route(route);
        note.equivalents
            .extend(lines.into_iter().map(|l| format!("{at}: {l}")));
    }
    if note.equivalents.is_empty() {
        note.message = "not applied by Coalmine, whose router does the routing itself (README \"A five-minute tour of the router\")".into();
    } else {
        note.message.push(':');
    }
}

/// What one of Istio's HTTP routes becomes in Coalmine, a line per part.
fn http_route(route: &HttpRoute) -> Vec<String> {
    let mut out = Vec::new();
    let weighted: Vec<&RouteDestination> = route.route.iter().collect();
    match weighted.as_slice() {
        [] => {}
        [one] if !route.matches.is_empty() => out.push(matched_route(route, &one.destination)),
        [one] => out.push(match one.destination.version() {
            Version::Canary => format!(
                "every other request goes to {}: the router's canaryWeight 100 (--canary-weight 100), which a promoted Rollout reaches",
                one.destination.describe()
            ),
            _ => format!(
                "every other request goes to {}: the router's stable upstream (--stable URL, or a Rollout's spec.stable.url)",
                one.destination.describe()
            ),
        }),
        several => out.push(split(several, !route.matches.is_empty())),
    }
    if let Some(mirror) = &route.mirror {
        let share = route.mirror_percentage.as_ref().map_or(100.0, |m| m.value);
        out.push(format!(
            "mirrors {share} % of requests to {}: the router's --mirror {share} (copies of stable-bound requests to the canary), or a Rollout's analysis.mirror",
            mirror.describe()
        ));
    }
    out
}

fn matched_route(route: &HttpRoute, to: &Destination) -> String {
    let (flags, rollout_match, refused) = translate_matches(&route.matches);
    let what = describe_matches(&route.matches);
    if to.version() == Version::Stable {
        return format!(
            "requests {what} go to {}: Coalmine's match rules send requests to the canary; the others stay on stable by default",
            to.describe()
        );
    }
    let mut line = format!("requests {what} go to {}: ", to.describe());
    let mut ways = Vec::new();
    if !flags.is_empty() {
        ways.push(format!(
            "coalmine proxy {}",
            flags
                .iter()
                .map(|f| format!("--match {}", shell_quote(f)))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    if !rollout_match.is_empty() {
        ways.push(format!(
            "a Rollout's analysis.match: [{}]",
            rollout_match.join(", ")
        ));
    }
    line.push_str(&ways.join(", or "));
    if !refused.is_empty() {
        if !ways.is_empty() {
            line.push_str("; ");
        }
        line.push_str(&format!(
            "{} cannot be matched: Coalmine's router matches headers, query parameters and cookies",
            refused.join(", ")
        ));
    }
    line
}

/// Istio's `match` list (any of them) as router flags (one condition each) and as a Rollout's
/// `analysis.match` entries (headers and query parameters, all of an entry); plus the
/// conditions Coalmine cannot match on.
fn translate_matches(
    matches: &[BTreeMap<String, serde_json::Value>],
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut flags = Vec::new();
    let mut entries = Vec::new();
    let mut refused = Vec::new();
    for request in matches {
        let mut conditions = Vec::new();
        let mut parts = Vec::new();
        let mut unmatchable = false;
        for (field, value) in request {
            match field.as_str() {
                "headers" | "queryParams" => {
                    let Ok(map) =
                        serde_json::from_value::<BTreeMap<String, StringMatch>>(value.clone())
                    else {
                        continue;
                    };
                    let mut items = Vec::new();
                    for (name, test) in &map {
                        let Some((kind, v)) = test.kind_and_value() else {
                            continue;
                        };
                        conditions.push(flag_for(field == "headers", name, kind, v));
                        items.push(format!(
                            "{}: {{{kind}: {}}}",
                            yaml_scalar(name),
                            yaml_scalar(v)
                        ));
                    }
                    parts.push(format!("{field}: {{{}}}", items.join(", ")));
                }
                "name" | "ignoreUriCase" => {}
                other => {
                    refused.push(other.to_string());
                    unmatchable = true;
                }
            }
        }
        // Dropping a condition would send more requests to the canary than Istio does.
        if unmatchable {
            continue;
        }
        // A flag is one condition; a request matching on several needs the Rollout's form.
        if let [Some(flag)] = conditions.as_slice() {
            flags.push(flag.clone());
        }
        if !parts.is_empty() {
            entries.push(format!("{{{}}}", parts.join(", ")));
        }
    }
    refused.sort();
    refused.dedup();
    (flags, entries, refused)
}

/// The router's flag syntax covers header exact (`NAME=VALUE`), header regex (`NAME~REGEX`) and
/// query exact (`query:NAME=VALUE`); the rest only the config file and a Rollout express.
fn flag_for(header: bool, name: &str, kind: &str, value: &str) -> Option<String> {
    match (header, kind) {
        (true, "exact") => Some(format!("{name}={value}")),
        (true, "regex") => Some(format!("{name}~{value}")),
        (false, "exact") => Some(format!("query:{name}={value}")),
        _ => None,
    }
}

fn describe_matches(matches: &[BTreeMap<String, serde_json::Value>]) -> String {
    let mut alternatives = Vec::new();
    for request in matches {
        let mut conditions = Vec::new();
        for (field, value) in request {
            let subject = match field.as_str() {
                "headers" => "header",
                "queryParams" => "query parameter",
                _ => continue,
            };
            let Ok(map) = serde_json::from_value::<BTreeMap<String, StringMatch>>(value.clone())
            else {
                continue;
            };
            for (name, test) in &map {
                if let Some((kind, v)) = test.kind_and_value() {
                    let relation = match kind {
                        "exact" => "equal to",
                        "prefix" => "starting with",
                        _ => "matching",
                    };
                    conditions.push(format!("with {subject} {name} {relation} {v}"));
                }
            }
        }
        if conditions.is_empty() {
            conditions.push("matching other conditions".into());
        }
        alternatives.push(conditions.join(" and "));
    }
    alternatives.join(", or ")
}

/// Several weighted destinations: the canary's share is the router's canaryWeight.
fn split(destinations: &[&RouteDestination], matched: bool) -> String {
    let shares: Vec<String> = destinations
        .iter()
        .map(|d| format!("{} {} %", d.destination.describe(), d.weight.unwrap_or(0.0)))
        .collect();
    let canary: Option<f64> = destinations
        .iter()
        .filter(|d| d.destination.version() == Version::Canary)
        .map(|d| d.weight.unwrap_or(0.0))
        .reduce(|a, b| a + b);
    let prefix = if matched {
        "matching requests are"
    } else {
        "requests are"
    };
    let equivalent = match canary {
        Some(weight) => format!(
            "coalmine proxy --canary-weight {weight} (the router's canaryWeight), or a Rollout's steps (stepWeights: [{weight}, ...], or stepWeight and maxWeight) that set it and raise it as the analysis passes"
        ),
        None => "the new version's share is the router's canaryWeight (--canary-weight), or a Rollout's steps (stepWeights, or stepWeight and maxWeight) that raise it as the analysis passes".into(),
    };
    format!("{prefix} split {}: {equivalent}", shares.join(", "))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DestinationRule {
    spec: DestinationRuleSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct DestinationRuleSpec {
    host: String,
    subsets: Vec<Subset>,
    traffic_policy: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Subset {
    name: String,
    labels: BTreeMap<String, String>,
}

fn destination_rule(note: &mut Note, text: &str, first_line: u64) {
    note.message = "not applied by Coalmine, which reaches each version at its own address instead of picking pods by label; the equivalent:".into();
    let rule: DestinationRule = parse_yaml(&note.file, text).unwrap_or_default();
    for (i, subset) in rule.spec.subsets.iter().enumerate() {
        let line = line_of(text, &format!("spec.subsets[{i}]"), first_line);
        let labels: Vec<String> = subset
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let selects = if labels.is_empty() {
            String::new()
        } else {
            format!(" (pods {})", labels.join(","))
        };
        let version = Destination {
            host: rule.spec.host.clone(),
            subset: Some(subset.name.clone()),
        }
        .version();
        let target = match version {
            Version::Canary => "a Rollout's spec.canary.url (the router's --canary URL)",
            Version::Stable => "a Rollout's spec.stable.url (the router's --stable URL)",
            Version::Unknown => {
                "a Rollout's spec.stable.url or spec.canary.url, whichever version it serves"
            }
        };
        note.equivalents.push(format!(
            "subset {} (line {line}){selects}: {target}: the address serving that version, such as a Service selecting those pods",
            subset.name
        ));
    }
    if rule.spec.traffic_policy.is_some() {
        note.equivalents.push("trafficPolicy: not applied; the router keeps its own pool of HTTP/1.1 connections to each version".into());
    }
    if note.equivalents.is_empty() {
        note.message = "not applied by Coalmine, which reaches each version at its own address (a Rollout's spec.stable.url and spec.canary.url)".into();
    }
}

/// A YAML scalar for a flow mapping: bare when plainly safe, else double-quoted (JSON's string
/// syntax, which YAML reads the same).
fn yaml_scalar(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !matches!(
            text,
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "~"
        )
        && text.parse::<f64>().is_err();
    if plain {
        text.to_string()
    } else {
        serde_json::Value::String(text.to_string()).to_string()
    }
}

/// An argument as a POSIX shell reads it back: bare when safe, else single-quoted.
fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '=' | ':' | '.' | ',' | '/' | '@' | '%' | '+')
        });
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_api_versions_and_kinds_are_recognised() {
        for good in [
            "v1",
            "apps/v1",
            "networking.istio.io/v1alpha3",
            "autoscaling/v2",
            "batch/v1beta1",
        ] {
            assert!(is_kubernetes_api_version(good), "{good}");
        }
        for bad in [
            "",
            "apps",
            "apps/",
            "/v1",
            "Apps/v1",
            "apps/1",
            "apps/v1gamma1",
            "apps/v1alpha",
            "my app/v1",
        ] {
            assert!(!is_kubernetes_api_version(bad), "{bad}");
        }
        assert!(is_kubernetes_kind("HorizontalPodAutoscaler"));
        assert!(!is_kubernetes_kind("deployment"));
        assert!(!is_kubernetes_kind("Deploy ment"));
    }

    #[test]
    fn quoting_reads_back_the_same() {
        assert_eq!(shell_quote("canary=true"), "canary=true");
        assert_eq!(shell_quote("user-id~^(1|2)$"), "'user-id~^(1|2)$'");
        assert_eq!(shell_quote("a'b c"), r"'a'\''b c'");
        assert_eq!(yaml_scalar("user-id"), "user-id");
        assert_eq!(yaml_scalar("true"), "\"true\"");
        assert_eq!(yaml_scalar("^(1|2)$"), "\"^(1|2)$\"");
        assert_eq!(yaml_scalar("5"), "\"5\"");
    }
}
