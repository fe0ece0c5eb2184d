//! Files of several YAML documents: which kind each is, typed, validated, with warnings.

use crate::flagger::{Canary, FLAGGER_API_VERSION};
use crate::rollout::{Analysis, Rollout, API_VERSION, BUILTINS};
use crate::schema::{self, FlaggerKind};
use crate::templates::{self, MetricTemplate, Provider, TemplateContext};
use crate::yaml::{parse_yaml, SpecError};

/// One document of a file and where it came from.
#[derive(Debug, Clone)]
pub struct Located<T> {
    pub file: String,
    /// 1-based line of the document's first line in the file.
    pub line: u64,
    /// The document's own text, to point at a field found wrong after parsing.
    pub text: String,
    pub doc: T,
}

impl<T> Located<T> {
    /// An error at `field` (a dotted path) of this document, with its line and column.
    pub fn error_at(&self, field: &str, message: String) -> SpecError {
        let (line, column) = schema::locate(&self.text, field).unwrap_or((1, 1));
        SpecError {
            file: self.file.clone(),
            line: line + self.line - 1,
            column,
            field: field.to_string(),
            message,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Document {
    Rollout(Rollout),
    Canary(Canary),
    MetricTemplate(MetricTemplate),
    /// Flagger's notification provider: valid, not acted on.
    AlertProvider,
}

/// Everything read from the files given to one command.
#[derive(Debug, Default)]
pub struct DocumentSet {
    pub documents: Vec<Located<Document>>,
    pub warnings: Vec<String>,
}

impl DocumentSet {
    pub fn rollouts(&self) -> impl Iterator<Item = &Located<Document>> {
        self.documents
            .iter()
            .filter(|d| matches!(d.doc, Document::Rollout(_) | Document::Canary(_)))
    }

    pub fn template(&self, name: &str) -> Option<&MetricTemplate> {
        self.located_template(name).map(|(t, _)| t)
    }

    fn located_template(&self, name: &str) -> Option<(&MetricTemplate, &Located<Document>)> {
        self.documents.iter().find_map(|d| match &d.doc {
            Document::MetricTemplate(t) if t.metadata.name == name => Some((t, d)),
            _ => None,
        })
    }

    /// For running (not just checking): every `templateRef` must have been found among the
    /// documents, or the check would have nothing to ask.
    pub fn require_templates(&self) -> Result<(), SpecError> {
        for located in self.rollouts() {
            let metrics = analysis_of(&located.doc).map(|a| a.metrics.as_slice());
            for (i, m) in metrics.unwrap_or_default().iter().enumerate() {
                if let (Some(t), None) = (&m.template_ref, &m.query) {
                    return Err(located.error_at(
                        &format!("spec.analysis.metrics[{i}].templateRef"),
                        format!("MetricTemplate {:?} is not in the files given: pass the file that defines it too", t.name),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Resolves every non-built-in check of every Rollout and Canary in place (see
    /// [`templates::resolve_check`]). A `templateRef` to a template not given is left for
    /// [`Self::require_templates`] (a warning for `check`: in Kubernetes it lives in the cluster).
    fn resolve_metrics(&mut self) -> Result<(), SpecError> {
        for index in 0..self.documents.len() {
            let mut located = self.documents[index].clone();
            let (metadata, target, service, metrics_server) = match &located.doc {
                Document::Rollout(r) => {
                    let service = r.spec.service.clone().unwrap_or(r.metadata.name.clone());
                    (r.metadata.clone(), service.clone(), service, None)
                }
                Document::Canary(c) => (
                    c.metadata.clone(),
                    c.spec.target_ref.name.clone(),
                    c.service_name().to_string(),
                    c.spec.metrics_server.clone(),
                ),
                _ => continue,
            };
            let name = metadata.name.as_str();
            let ctx = TemplateContext {
                name,
                namespace: metadata.namespace.as_deref().unwrap_or("default"),
                target: &target,
                service: &service,
            };
            let metrics = match &mut located.doc {
                Document::Rollout(r) => &mut r.spec.analysis.metrics,
                Document::Canary(c) => &mut c.spec.analysis.metrics,
                _ => continue,
            };
            for (i, check) in metrics.iter_mut().enumerate() {
                if check.is_builtin() {
                    continue;
                }
                if check.query.is_some() && check.provider.is_none() {
                    // Flagger's inline query goes to the Canary's metricsServer.
                    check.provider = metrics_server.as_ref().map(|address| Provider {
                        kind: templates::PROMETHEUS.into(),
                        address: Some(address.clone()),
                        ..Provider::default()
                    });
                }
                let template = match (&check.query, &check.template_ref) {
                    (None, Some(t)) => match self.located_template(&t.name) {
                        Some(found) => Some(found),
                        None => continue,
                    },
                    _ => None,
                };
                let field = format!("spec.analysis.metrics[{i}]");
                templates::resolve_check(check, template.map(|t| t.0), &ctx).map_err(|e| {
                    match template {
                        // What is wrong lies in the template: point there.
                        Some((t, at)) if e.field != "templateRef" => at.error_at(
                            &template_field(&e.field),
                            format!(
                                "MetricTemplate {:?} (used by {name}'s metric {:?}): {}",
                                t.metadata.name, check.name, e.message
                            ),
                        ),
                        _ => self.documents[index]
                            .error_at(&format!("{field}.{}", e.field), e.message),
                    }
                })?;
            }
            self.documents[index] = located;
        }
        Ok(())
    }
}

/// A field of a check's resolved template, as a path in the template's document.
fn template_field(field: &str) -> String {
    match field.strip_prefix("templateRef.") {
        Some(provider_field) => format!("spec.provider.{provider_field}"),
        None => format!("spec.{field}"),
    }
}

fn analysis_of(doc: &Document) -> Option<&Analysis> {
    match doc {
        Document::Rollout(r) => Some(&r.spec.analysis),
        Document::Canary(c) => Some(&c.spec.analysis),
        _ => None,
    }
}

/// Reads every document of every `(file name, text)` pair. The first error stops the load: a
/// command never acts on a set of documents that is partly wrong.
pub fn load(files: &[(String, String)]) -> Result<DocumentSet, SpecError> {
    let mut set = DocumentSet::default();
    for (file, text) in files {
        for (line, doc_text) in split_documents(text) {
            let doc = parse_document(file, doc_text).map_err(|e| shift(e, line))?;
            set.documents.push(Located {
                file: file.clone(),
                line: line + 1,
                text: doc_text.to_string(),
                doc,
            });
        }
    }
    if set.documents.is_empty() {
        return Err(SpecError {
            file: files.first().map(|f| f.0.clone()).unwrap_or_default(),
            line: 0,
            column: 0,
            field: String::new(),
            message: "no documents found".into(),
        });
    }
    set.warnings = warnings(&set);
    set.resolve_metrics()?;
    Ok(set)
}

/// Splits on `---` lines; yields each document's text with the 0-based line it starts after.
fn split_documents(text: &str) -> Vec<(u64, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 0u64;
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") || bare == "..." {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = n as u64 + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs.into_iter()
        .filter(|(_, t)| {
            t.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

fn shift(mut e: SpecError, lines: u64) -> SpecError {
    if e.line > 0 {
        e.line += lines;
    }
    e
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

fn parse_document(file: &str, text: &str) -> Result<Document, SpecError> {
    let head: Head = parse_yaml(file, text)?;
    let at = |field: &str, message: String| {
        let (line, column) = schema::locate(text, field).unwrap_or((1, 1));
        SpecError {
            file: file.to_string(),
            line,
            column,
            field: field.to_string(),
            message,
        }
    };
    match (head.api_version.as_str(), head.kind.as_str()) {
        (API_VERSION, "MetricTemplate") => Ok(Document::MetricTemplate(parse_yaml(file, text)?)),
        (API_VERSION, "Rollout") => {
            let rollout: Rollout = parse_yaml(file, text)?;
            check_analysis(&rollout.spec.analysis, "spec.analysis").map_err(|(f, m)| at(&f, m))?;
            Ok(Document::Rollout(rollout))
        }
        (FLAGGER_API_VERSION, kind) => {
            let Some(flagger_kind) = FlaggerKind::from_kind(kind) else {
                return Err(at(
                    "kind",
                    format!("unknown kind {kind:?} for {FLAGGER_API_VERSION}: Coalmine reads Canary, MetricTemplate and AlertProvider"),
                ));
            };
            schema::validate_flagger(file, text, flagger_kind)?;
            match flagger_kind {
                FlaggerKind::Canary => {
                    let canary: Canary = parse_yaml(file, text)?;
                    check_analysis(&canary.spec.analysis, "spec.analysis")
                        .map_err(|(f, m)| at(&f, m))?;
                    Ok(Document::Canary(canary))
                }
                FlaggerKind::MetricTemplate => Ok(Document::MetricTemplate(parse_yaml(file, text)?)),
                FlaggerKind::AlertProvider => Ok(Document::AlertProvider),
            }
        }
        ("", _) => Err(at("apiVersion", format!("missing apiVersion (use {API_VERSION} for a Rollout, {FLAGGER_API_VERSION} for Flagger's kinds)"))),
        (API_VERSION, kind) => Err(at("kind", format!("unknown kind {kind:?}: {API_VERSION} has Rollout and MetricTemplate"))),
        (other, _) => Err(at(
            "apiVersion",
            format!("unknown apiVersion {other:?}: Coalmine reads {API_VERSION} and {FLAGGER_API_VERSION}"),
        )),
    }
}

/// Rules between fields that a single field's type cannot express. Returns the field path and
/// the message.
pub fn check_analysis(a: &Analysis, path: &str) -> Result<(), (String, String)> {
    let err = |field: &str, msg: String| Err((format!("{path}.{field}"), msg));
    if a.interval.0.is_zero() {
        return err("interval", "must be longer than 0s".into());
    }
    for (i, pair) in a.step_weights.windows(2).enumerate() {
        if pair[1].basis_points <= pair[0].basis_points {
            return err(
                &format!("stepWeights[{}]", i + 1),
                "step weights must rise: each step above the one before".into(),
            );
        }
    }
    if let Some(i) = a.step_weights.iter().position(|w| w.basis_points == 0) {
        return err(
            &format!("stepWeights[{i}]"),
            "a step weight is above 0".into(),
        );
    }
    if matches!(a.step_weight, Some(w) if w.basis_points == 0) {
        return err("stepWeight", "must be above 0".into());
    }
    if matches!(a.max_weight, Some(w) if w.basis_points == 0) {
        return err("maxWeight", "must be above 0".into());
    }
    if !a.step_weights.is_empty() && a.step_weight.is_some() {
        return err(
            "stepWeights",
            "give either stepWeights or stepWeight (with maxWeight), not both".into(),
        );
    }
    let canary = a.step_weight.is_some() || !a.step_weights.is_empty();
    if !canary && a.iterations.unwrap_or(0) == 0 {
        return err(
            "stepWeight",
            "the analysis needs stepWeight/maxWeight or stepWeights (canary), or iterations (A/B testing with match, blue-green without)".into(),
        );
    }
    if matches!(a.threshold, Some(0)) {
        return err("threshold", "must be at least 1".into());
    }
    let seq = &a.sequential;
    if !(seq.alpha > 0.0 && seq.alpha <= 0.5) {
        return err(
            "sequential.alpha",
            format!("{} is not a probability in (0, 0.5]", seq.alpha),
        );
    }
    if !(seq.latency_tolerance >= 0.0 && seq.latency_tolerance.is_finite()) {
        return err(
            "sequential.latencyTolerance",
            "must be 0 or more (0.1 = 10 % slower)".into(),
        );
    }
    if let Some(i) = seq.quantiles.iter().position(|q| !(*q > 0.0 && *q < 1.0)) {
        return err(
            &format!("sequential.quantiles[{i}]"),
            "a quantile is between 0 and 1 (0.99 for p99)".into(),
        );
    }
    if let Some(i) = a.rollback_on_alerts.iter().position(|m| m.is_empty()) {
        return err(
            &format!("rollbackOnAlerts[{i}]"),
            "list at least one label (e.g. alertname): an empty entry would match every alert"
                .into(),
        );
    }
    for (i, m) in a.metrics.iter().enumerate() {
        if !BUILTINS.contains(&m.name.as_str()) && m.template_ref.is_none() && m.query.is_none() {
            return err(
                &format!("metrics[{i}]"),
                format!(
                    "metric {:?} is not built in ({}); give it a templateRef or a query",
                    m.name,
                    BUILTINS.join(", ")
                ),
            );
        }
        let range = m.range();
        if let (Some(min), Some(max)) = (range.min, range.max) {
            if min > max {
                return err(
                    &format!("metrics[{i}].thresholdRange"),
                    format!("min {min} is above max {max}"),
                );
            }
        }
    }
    Ok(())
}

fn warnings(set: &DocumentSet) -> Vec<String> {
    let mut out = Vec::new();
    for located in set.rollouts() {
        let (name, analysis) = match &located.doc {
            Document::Rollout(r) => (&r.metadata.name, &r.spec.analysis),
            Document::Canary(c) => (&c.metadata.name, &c.spec.analysis),
            _ => continue,
        };
        for m in &analysis.metrics {
            if let Some(t) = &m.template_ref {
                if set.template(&t.name).is_none() {
                    out.push(format!(
                        "{}:{}: {name}: metric {:?} refers to MetricTemplate {:?}, which is not in the files given (in Kubernetes it lives in the cluster); pass its file too",
                        located.file, located.line, m.name, t.name
                    ));
                }
            }
        }
        if analysis.match_.iter().any(|m| !m.source_labels.is_empty()) {
            out.push(format!(
                "{}:{}: {name}: match.sourceLabels needs a service mesh; Coalmine's router ignores it",
                located.file, located.line
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_with_their_starting_lines() {
        let text = "# head\na: 1\n---\nb: 2\n---\n# only a comment\n---\nc: 3\n";
        let docs = split_documents(text);
        let starts: Vec<u64> = docs.iter().map(|d| d.0).collect();
        assert_eq!(starts, vec![0, 3, 7]);
        assert_eq!(docs[1].1, "b: 2\n");
    }
}
