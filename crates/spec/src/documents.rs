//! Files of several YAML documents: which kind each is, typed, validated, with warnings, and
//! notes on the documents of other tools that Coalmine reads past.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::alerts::{self, AlertProvider};
use crate::flagger::{Canary, Placement, PlacementDoc, FLAGGER_API_VERSION};
use crate::group::RolloutGroup;
use crate::names::{check_name, NameRule};
use crate::rollout::{Analysis, Metadata, Rollout, TemplateRef, API_VERSION, BUILTINS};
use crate::schema::{self, FlaggerKind};
use crate::templates::{self, MetricTemplate, Provider, TemplateContext};
use crate::yaml::{parse_yaml, SpecError};
use crate::Weight;

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
    /// Boxed, as `Canary`: the two large kinds.
    Rollout(Box<Rollout>),
    Canary(Box<Canary>),
    MetricTemplate(MetricTemplate),
    /// Where a rollout's alerts are posted (Flagger's, or Coalmine's with `addressFrom`).
    AlertProvider(AlertProvider),
    /// Where the Canary of the same name sends its traffic (what Kubernetes would say).
    Placement(PlacementDoc),
    /// Rollouts released as one.
    RolloutGroup(RolloutGroup),
}

impl Document {
    /// The kind as documents write it.
    pub fn kind(&self) -> &'static str {
        match self {
            Document::Rollout(_) => "Rollout",
            Document::Canary(_) => "Canary",
            Document::MetricTemplate(_) => "MetricTemplate",
            Document::AlertProvider(_) => "AlertProvider",
            Document::Placement(_) => "Placement",
            Document::RolloutGroup(_) => RolloutGroup::KIND,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Document::Rollout(r) => &r.metadata,
            Document::Canary(c) => &c.metadata,
            Document::MetricTemplate(t) => &t.metadata,
            Document::AlertProvider(p) => &p.metadata,
            Document::Placement(p) => &p.metadata,
            Document::RolloutGroup(g) => &g.metadata,
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata().name
    }
}

/// A document Coalmine reads past: another tool's (a Deployment, an Istio VirtualService, a
/// Prometheus rule file), with what Coalmine does instead, concretely where it can say.
///
/// These are notes, not errors: `coalmine check` on a directory of a service's existing
/// manifests should pass (exit 0) and say, for each document it does not act on, what it would
/// use in its place. An error would force users to sort their files before Coalmine would look
/// at any of them; silence would leave them guessing whether a VirtualService they passed is
/// being applied. The documents Coalmine owns (`coalmine.dev`, `flagger.app`) stay strict: a
/// mistake in one of those is an error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Note {
    pub file: String,
    /// 1-based line of the document's `kind` (or, for a Prometheus rule file, `groups`).
    pub line: u64,
    /// `Deployment`, `VirtualService`, or `Prometheus rule file`.
    pub kind: String,
    /// `metadata.name`; empty when the document has none.
    pub name: String,
    pub message: String,
    /// Coalmine's equivalent of each part of the document, one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub equivalents: Vec<String>,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.kind)?;
        if !self.name.is_empty() {
            write!(f, " {}", self.name)?;
        }
        write!(f, ": {}", self.message)?;
        for line in &self.equivalents {
            write!(f, "\n  {line}")?;
        }
        Ok(())
    }
}

/// Everything read from the files given to one command.
#[derive(Debug, Default)]
pub struct DocumentSet {
    pub documents: Vec<Located<Document>>,
    pub warnings: Vec<String>,
    pub notes: Vec<Note>,
}

/// The namespace a document without one lands in (`kubectl`'s default context).
const DEFAULT_NAMESPACE: &str = "default";

fn namespace_of(m: &Metadata) -> &str {
    m.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

impl DocumentSet {
    pub fn rollouts(&self) -> impl Iterator<Item = &Located<Document>> {
        self.documents
            .iter()
            .filter(|d| matches!(d.doc, Document::Rollout(_) | Document::Canary(_)))
    }

    pub fn template(&self, name: &str) -> Option<&MetricTemplate> {
        self.templates_named(name).first().map(|(t, _)| *t)
    }

    fn templates_named(&self, name: &str) -> Vec<(&MetricTemplate, &Located<Document>)> {
        self.documents
            .iter()
            .filter_map(|d| match &d.doc {
                Document::MetricTemplate(t) if t.metadata.name == name => Some((t, d)),
                _ => None,
            })
            .collect()
    }

    /// The template a check of `rollout` refers to. Flagger looks in the reference's namespace,
    /// or the rollout's; a template given without a namespace is taken when it is the only one
    /// of its name (the files are usually applied to one namespace together).
    fn template_for(
        &self,
        rollout: &Metadata,
        reference: &TemplateRef,
    ) -> Option<(&MetricTemplate, &Located<Document>)> {
        let named = self.templates_named(&reference.name);
        if let [only] = named.as_slice() {
            return Some(*only);
        }
        let wanted = reference
            .namespace
            .as_deref()
            .unwrap_or_else(|| namespace_of(rollout));
        named
            .into_iter()
            .find(|(t, _)| namespace_of(&t.metadata) == wanted)
    }

    /// For running (not just checking): every `templateRef` must have been found among the
    /// documents, or the check would have nothing to ask.
    pub fn require_templates(&self) -> Result<(), SpecError> {
        match self.missing_templates().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every `templateRef` not found among the documents, as errors at the reference.
    pub fn missing_templates(&self) -> Vec<SpecError> {
        let mut errors = Vec::new();
        for located in self.rollouts() {
            let metrics = analysis_of(&located.doc).map(|a| a.metrics.as_slice());
            for (i, m) in metrics.unwrap_or_default().iter().enumerate() {
                if let (Some(t), None) = (&m.template_ref, &m.query) {
                    errors.push(located.error_at(
                        &format!("spec.analysis.metrics[{i}].templateRef"),
                        format!("MetricTemplate {:?} is not in the files given: pass the file that defines it too", t.name),
                    ));
                }
            }
        }
        errors
    }

    /// What running or applying needs beyond what `check` asks: every template found, and no
    /// two rollouts of one name even in different namespaces, since Coalmine addresses a
    /// rollout by its name alone (`status NAME`, the daemon's API, its state).
    pub fn require_runnable(&self) -> Result<(), SpecError> {
        match self.runnable_errors().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The rollouts to run: each Rollout as written, each Canary placed by the Placement
    /// document of its name (and namespace) or, for a single Canary without one, by `flags`
    /// (`--router/--stable/--canary`). A Canary with no placement, or a Placement that places
    /// nothing, is an error at its name.
    pub fn placed_rollouts(&self, flags: Option<&Placement>) -> Result<Vec<Rollout>, SpecError> {
        let key = |m: &Metadata| (namespace_of(m).to_string(), m.name.clone());
        let placements: Vec<&Located<Document>> = self
            .documents
            .iter()
            .filter(|d| matches!(d.doc, Document::Placement(_)))
            .collect();
        let unplaced: Vec<&Located<Document>> = self
            .rollouts()
            .filter(|d| {
                matches!(d.doc, Document::Canary(_))
                    && !placements
                        .iter()
                        .any(|p| key(p.doc.metadata()) == key(d.doc.metadata()))
            })
            .collect();
        if flags.is_some() && unplaced.len() > 1 {
            return Err(unplaced[1].error_at(
                "metadata.name",
                "several Canaries without a Placement document: the command-line placement can place only one; give each a Placement".into(),
            ));
        }
        let mut out = Vec::new();
        for located in self.rollouts() {
            match &located.doc {
                Document::Rollout(r) => out.push((**r).clone()),
                Document::Canary(c) => {
                    let placement = placements.iter().find_map(|p| match &p.doc {
                        Document::Placement(doc) if key(&doc.metadata) == key(&c.metadata) => {
                            Some(doc.spec.clone())
                        }
                        _ => None,
                    });
                    match placement.or_else(|| flags.cloned()) {
                        Some(placement) => out.push(c.to_rollout(placement)),
                        None => {
                            return Err(located.error_at(
                                "metadata.name",
                                format!("Canary {:?} needs to know where its traffic goes (Kubernetes would say): give a coalmine.dev/v1alpha1 Placement named {:?} (routers, stable, canary, hosts), or --router, --stable and --canary", c.metadata.name, c.metadata.name),
                            ))
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(orphan) = placements.iter().find(|p| {
            !self.rollouts().any(|d| {
                matches!(d.doc, Document::Canary(_))
                    && key(d.doc.metadata()) == key(p.doc.metadata())
            })
        }) {
            return Err(orphan.error_at(
                "metadata.name",
                format!(
                    "Placement {:?} places no Canary among the files (a Placement is named after the Canary it places)",
                    orphan.doc.name()
                ),
            ));
        }
        for group in self.groups() {
            group.mark_members(&mut out);
        }
        Ok(out)
    }

    /// The RolloutGroups among the documents.
    pub fn groups(&self) -> impl Iterator<Item = &RolloutGroup> {
        self.documents.iter().filter_map(|d| match &d.doc {
            Document::RolloutGroup(g) => Some(g),
            _ => None,
        })
    }

    /// Each group's mistakes, with the group's position among the documents.
    /// A group's members are rollouts among the files, each in one group, named once; a
    /// member depends only on members before it (so the list is an order to roll back in
    /// reverse), and only in `policy: order`; members in lock-step take the same weight steps
    /// (at the same weight, one cohort is the same users on every member); a member keeps
    /// no cohort of its own when the group shares one.
    fn group_errors(&self) -> Vec<(usize, SpecError)> {
        let mut errors = Vec::new();
        let mut grouped: HashMap<String, String> = HashMap::new();
        let analysis_of_member = |name: &str| {
            self.rollouts().find_map(|d| match &d.doc {
                Document::Rollout(r) if r.metadata.name == name => {
                    Some((&r.spec.analysis, r.spec.cohort.as_deref(), d))
                }
                Document::Canary(c) if c.metadata.name == name => Some((&c.spec.analysis, None, d)),
                _ => None,
            })
        };
        let known: Vec<&str> = self.rollouts().map(|d| d.doc.name()).collect();
        for (index, located) in self.documents.iter().enumerate() {
            let Document::RolloutGroup(group) = &located.doc else {
                continue;
            };
            let unknown = |name: &str| {
                let hint = crate::suggest::nearest(name, known.iter().copied())
                    .map(|n| format!(" (did you mean {n:?}?)"))
                    .unwrap_or_default();
                format!("member {name:?} is not a Rollout or Canary among the files{hint}: a group is applied with its members")
            };
            let claimed =
                |name: &str| grouped.insert(name.to_string(), group.metadata.name.clone());
            let member_analysis = |name: &str| analysis_of_member(name).map(|(a, c, _)| (a, c));
            for (field, message) in group.spec.errors(member_analysis, unknown, claimed) {
                errors.push((index, located.error_at(&field, message)));
            }
            let mut first_affinity: Option<(&str, Option<(&str, u64)>)> = None;
            for member in &group.spec.members {
                let Some((analysis, _, member_doc)) = analysis_of_member(&member.name) else {
                    continue;
                };
                if group.cohort().is_some() {
                    // One cookie pins a user on every member's canary, so the members set the
                    // same one, or none does.
                    let affinity = analysis.session_affinity.as_ref().map(|a| {
                        (
                            a.cookie_name.as_str(),
                            a.max_age
                                .unwrap_or(coalmine_contract::routes::DEFAULT_AFFINITY_MAX_AGE),
                        )
                    });
                    match first_affinity {
                        None => first_affinity = Some((&member.name, affinity)),
                        Some((first, theirs)) if theirs != affinity => {
                            let (at, says) = match (affinity, theirs) {
                                (Some((name, _)), Some((their_name, _))) if name != their_name => (
                                    "spec.analysis.sessionAffinity.cookieName",
                                    format!("member {:?} pins users with cookie {name:?}, {first:?} with {their_name:?}: the members of a group sharing a cohort share one affinity cookie, so a user pinned on one member's canary is on every member's canary; give them the same cookieName", member.name),
                                ),
                                (Some((_, age)), Some((_, their_age))) => (
                                    "spec.analysis.sessionAffinity.maxAge",
                                    format!("member {:?} keeps its affinity cookie {age} s, {first:?} {their_age} s: the members of a group sharing a cohort share one affinity cookie; give them the same maxAge", member.name),
                                ),
                                (Some((name, _)), None) => (
                                    "spec.analysis.sessionAffinity",
                                    format!("member {:?} pins users with cookie {name:?}, {first:?} pins none: the members of a group sharing a cohort all pin users with one cookie, or none does", member.name),
                                ),
                                (None, _) => (
                                    "spec.analysis",
                                    format!("member {:?} has no sessionAffinity, {first:?} pins users with one: the members of a group sharing a cohort all pin users with one cookie, or none does; add the same sessionAffinity", member.name),
                                ),
                            };
                            errors.push((index, member_doc.error_at(at, says)));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        errors
    }

    /// Everything [`Self::require_runnable`] refuses, in file order.
    pub fn runnable_errors(&self) -> Vec<SpecError> {
        let mut errors = self.missing_templates();
        errors.extend(self.unsendable_alerts());
        let mut seen: HashMap<&str, &Located<Document>> = HashMap::new();
        for located in self.rollouts() {
            let meta = located.doc.metadata();
            match seen.get(meta.name.as_str()) {
                Some(first) => errors.push(located.error_at(
                    "metadata.name",
                    format!(
                        "{} {:?} (namespace {}) has the same name as the {} at {} (namespace {}): Coalmine addresses rollouts by name alone, so one command takes one rollout of each name",
                        located.doc.kind(),
                        meta.name,
                        namespace_of(meta),
                        first.doc.kind(),
                        first.name_position(),
                        namespace_of(first.doc.metadata()),
                    ),
                )),
                None => {
                    seen.insert(&meta.name, located);
                }
            }
        }
        errors.sort_by_key(|e| (self.file_index(&e.file), e.line));
        errors
    }

    /// The AlertProvider an alert of `rollout` refers to, found as templates are (see
    /// [`Self::template_for`]).
    fn alert_provider_for(
        &self,
        rollout: &Metadata,
        reference: &TemplateRef,
    ) -> Option<&Located<Document>> {
        let named: Vec<&Located<Document>> = self
            .documents
            .iter()
            .filter(|d| {
                matches!(&d.doc, Document::AlertProvider(p) if p.metadata.name == reference.name)
            })
            .collect();
        if let [only] = named.as_slice() {
            return Some(only);
        }
        let wanted = reference
            .namespace
            .as_deref()
            .unwrap_or_else(|| namespace_of(rollout));
        named
            .into_iter()
            .find(|d| namespace_of(d.doc.metadata()) == wanted)
    }

    /// Copies each alert's AlertProvider spec into the alert, so the rollout is self-contained
    /// (an alert resolved before, or written with its provider, is kept). One whose provider is
    /// not among the files is left for [`Self::unsendable_alerts`].
    fn resolve_alerts(&mut self) {
        for index in 0..self.documents.len() {
            let Some(analysis) = analysis_of(&self.documents[index].doc) else {
                continue;
            };
            let metadata = self.documents[index].doc.metadata().clone();
            let found: Vec<Option<alerts::AlertProviderSpec>> = analysis
                .alerts
                .iter()
                .map(|alert| match &alert.provider {
                    Some(p) => Some(p.clone()),
                    None => self
                        .alert_provider_for(&metadata, &alert.provider_ref)
                        .and_then(|d| match &d.doc {
                            Document::AlertProvider(p) => Some(p.spec.clone()),
                            _ => None,
                        }),
                })
                .collect();
            let analysis = match &mut self.documents[index].doc {
                Document::Rollout(r) => &mut r.spec.analysis,
                Document::Canary(c) => &mut c.spec.analysis,
                _ => continue,
            };
            for (alert, provider) in analysis.alerts.iter_mut().zip(found) {
                alert.provider = provider;
            }
        }
    }

    /// For running: every alert's provider found, with an address Coalmine can read without a
    /// cluster. Errors point at the alert's reference, or at the provider's field.
    pub fn unsendable_alerts(&self) -> Vec<SpecError> {
        let mut errors = Vec::new();
        for located in self.rollouts() {
            let Some(analysis) = analysis_of(&located.doc) else {
                continue;
            };
            for (i, alert) in analysis.alerts.iter().enumerate() {
                let field = format!("spec.analysis.alerts[{i}].providerRef");
                let Some(spec) = &alert.provider else {
                    errors.push(located.error_at(
                        &field,
                        format!("AlertProvider {:?} is not in the files given: pass the file that defines it too", alert.provider_ref.name),
                    ));
                    continue;
                };
                if let Err((provider_field, message)) = alerts::check_sendable(spec) {
                    let provider =
                        self.alert_provider_for(located.doc.metadata(), &alert.provider_ref);
                    errors.push(match provider {
                        Some(at) => at.error_at(
                            &provider_field,
                            format!(
                                "AlertProvider {:?} (used by {}'s alert {:?}): {message}",
                                alert.provider_ref.name,
                                located.doc.name(),
                                alert.name
                            ),
                        ),
                        None => located
                            .error_at(&format!("spec.analysis.alerts[{i}].provider"), message),
                    });
                }
            }
        }
        errors
    }

    /// Where `file` is among the files given, for reporting in their order.
    fn file_index(&self, file: &str) -> usize {
        self.documents
            .iter()
            .position(|d| d.file == file)
            .unwrap_or(usize::MAX)
    }

    /// Resolves every non-built-in check of every Rollout and Canary in place (see
    /// [`templates::resolve_check`]). A `templateRef` to a template not given is left for
    /// [`Self::require_templates`] (a warning for `check`: in Kubernetes it lives in the cluster).
    /// A document that cannot be resolved leaves the set, with its first error returned.
    fn resolve_metrics(&mut self) -> Vec<SpecError> {
        let mut errors = Vec::new();
        let mut failed = Vec::new();
        'documents: for index in 0..self.documents.len() {
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
                    (None, Some(t)) => match self.template_for(&metadata, t) {
                        Some(found) => Some(found),
                        None => continue,
                    },
                    _ => None,
                };
                let field = format!("spec.analysis.metrics[{i}]");
                if let Err(e) = templates::resolve_check(check, template.map(|t| t.0), &ctx) {
                    errors.push(match template {
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
                    });
                    failed.push(index);
                    continue 'documents;
                }
            }
            self.documents[index] = located;
        }
        for index in failed.into_iter().rev() {
            self.documents.remove(index);
        }
        errors
    }
}

impl<T> Located<T> {
    /// `file:line` of this document's `metadata.name`, to name it in another's error.
    fn name_position(&self) -> String {
        let line = schema::locate(&self.text, "metadata.name").map_or(1, |(line, _)| line);
        format!("{}:{}", self.file, line + self.line - 1)
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

/// Reads every document of every `(file name, text)` pair and fails with the first error, in
/// file order: a command never acts on a set of documents that is partly wrong.
pub fn load(files: &[(String, String)]) -> Result<DocumentSet, SpecError> {
    let (set, errors) = read(files);
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(set),
    }
}

/// Reads every document of every `(file name, text)` pair, going on past mistakes so that all
/// of them can be reported at once: returns the documents that are right (with the warnings
/// and notes on them) and an error for each document that is not, in file order.
pub fn read(files: &[(String, String)]) -> (DocumentSet, Vec<SpecError>) {
    let mut set = DocumentSet::default();
    let mut errors = Vec::new();
    let mut any_document = false;
    for (file, text) in files {
        for (line, doc_text) in split_documents(text) {
            any_document = true;
            match parse_document(file, line + 1, doc_text) {
                Ok(Parsed::Document(doc)) => set.documents.push(Located {
                    file: file.clone(),
                    line: line + 1,
                    text: doc_text.to_string(),
                    doc: *doc,
                }),
                Ok(Parsed::Note(note)) => set.notes.push(note),
                Err(e) => errors.push(shift(e, line)),
            }
        }
    }
    if !any_document {
        errors.push(SpecError {
            file: files.first().map(|f| f.0.clone()).unwrap_or_default(),
            line: 0,
            column: 0,
            field: String::new(),
            message: "no documents found".into(),
        });
        return (set, errors);
    }
    errors.extend(remove_duplicates(&mut set));
    errors.extend(remove_wrong_groups(&mut set));
    errors.extend(set.resolve_metrics());
    set.resolve_alerts();
    set.warnings = warnings(&set);
    let order: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
    let index = |file: &str| order.iter().position(|f| *f == file);
    errors.sort_by_key(|e| (index(&e.file), e.line));
    (set, errors)
}

/// Which documents share one space of names: a Rollout and a Canary both become a rollout.
fn name_space(doc: &Document) -> &'static str {
    match doc {
        Document::Rollout(_) | Document::Canary(_) => "rollout",
        Document::MetricTemplate(_) => "MetricTemplate",
        Document::AlertProvider(_) => "AlertProvider",
        Document::Placement(_) => "Placement",
        Document::RolloutGroup(_) => RolloutGroup::KIND,
    }
}

/// Two documents of one name (and namespace) among the files of one command would silently
/// replace each other (a second `apply` of the name restarts the first; a `templateRef` could
/// not tell them apart): the second is an error naming both places, and leaves the set.
fn remove_duplicates(set: &mut DocumentSet) -> Vec<SpecError> {
    let mut errors = Vec::new();
    let mut first_of: HashMap<(&'static str, String, String), usize> = HashMap::new();
    let mut duplicates = Vec::new();
    for (index, located) in set.documents.iter().enumerate() {
        let meta = located.doc.metadata();
        let key = (
            name_space(&located.doc),
            namespace_of(meta).to_string(),
            meta.name.clone(),
        );
        match first_of.get(&key) {
            Some(&first) => {
                let first = &set.documents[first];
                let namespace = match &meta.namespace {
                    Some(ns) => format!(" in namespace {ns}"),
                    None => String::new(),
                };
                errors.push(located.error_at(
                    "metadata.name",
                    format!(
                        "{} {:?}{namespace} has the same name as the {} at {}: each is defined once among the files of one command (the second would replace the first); rename or remove one",
                        located.doc.kind(),
                        meta.name,
                        first.doc.kind(),
                        first.name_position(),
                    ),
                ));
                duplicates.push(index);
            }
            None => {
                first_of.insert(key, index);
            }
        }
    }
    for index in duplicates.into_iter().rev() {
        set.documents.remove(index);
    }
    errors
}

/// A group with a mistake leaves the set, as a duplicate does: nothing runs it.
fn remove_wrong_groups(set: &mut DocumentSet) -> Vec<SpecError> {
    let found = set.group_errors();
    let mut wrong: Vec<usize> = found.iter().map(|(i, _)| *i).collect();
    wrong.sort_unstable();
    wrong.dedup();
    for index in wrong.into_iter().rev() {
        set.documents.remove(index);
    }
    found.into_iter().map(|(_, e)| e).collect()
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    /// A Prometheus rule file has `groups` and no apiVersion.
    #[serde(default)]
    groups: Option<serde::de::IgnoredAny>,
}

enum Parsed {
    Document(Box<Document>),
    Note(Note),
}

/// The kinds of the two API groups Coalmine reads.
const OWN_KINDS: [&str; 6] = [
    "Rollout",
    "RolloutGroup",
    "Canary",
    "MetricTemplate",
    "AlertProvider",
    "Placement",
];

/// One document; `first_line` is where it starts in `file` (errors count from the document,
/// the caller shifts them; notes are placed here).
fn parse_document(file: &str, first_line: u64, text: &str) -> Result<Parsed, SpecError> {
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
    let named = |meta: &Metadata, rule: NameRule| -> Result<(), SpecError> {
        check_name(&meta.name, rule).map_err(|m| at("metadata.name", m))?;
        if let Some(namespace) = &meta.namespace {
            check_name(namespace, NameRule::Namespace).map_err(|m| at("metadata.namespace", m))?;
        }
        Ok(())
    };
    let (api_version, kind) = (head.api_version.as_str(), head.kind.as_str());
    let doc = match (api_version, kind) {
        (API_VERSION, "MetricTemplate") => {
            let template: MetricTemplate = parse_yaml(file, text)?;
            named(&template.metadata, NameRule::Object)?;
            Document::MetricTemplate(template)
        }
        (API_VERSION, "Placement") => {
            let placement: PlacementDoc = parse_yaml(file, text)?;
            named(&placement.metadata, NameRule::Rollout)?;
            Document::Placement(placement)
        }
        (API_VERSION, "AlertProvider") => {
            let provider: AlertProvider = parse_yaml(file, text)?;
            named(&provider.metadata, NameRule::Object)?;
            Document::AlertProvider(provider)
        }
        (API_VERSION, RolloutGroup::KIND) => {
            let group: RolloutGroup = parse_yaml(file, text)?;
            named(&group.metadata, NameRule::Rollout)?;
            Document::RolloutGroup(group)
        }
        (API_VERSION, "Rollout") => {
            let rollout: Rollout = parse_yaml(file, text)?;
            named(&rollout.metadata, NameRule::Rollout)?;
            check_analysis(&rollout.spec.analysis, "spec.analysis").map_err(|(f, m)| at(&f, m))?;
            Document::Rollout(Box::new(rollout))
        }
        (FLAGGER_API_VERSION, kind) => {
            let Some(flagger_kind) = FlaggerKind::from_kind(kind) else {
                return Err(at("kind", unknown_kind(kind, FLAGGER_API_VERSION, &["Canary", "MetricTemplate", "AlertProvider"])));
            };
            schema::validate_flagger(file, text, flagger_kind)?;
            match flagger_kind {
                FlaggerKind::Canary => {
                    let canary: Canary = parse_yaml(file, text)?;
                    named(&canary.metadata, NameRule::Rollout)?;
                    check_analysis(&canary.spec.analysis, "spec.analysis")
                        .map_err(|(f, m)| at(&f, m))?;
                    Document::Canary(Box::new(canary))
                }
                FlaggerKind::MetricTemplate => {
                    let template: MetricTemplate = parse_yaml(file, text)?;
                    named(&template.metadata, NameRule::Object)?;
                    Document::MetricTemplate(template)
                }
                FlaggerKind::AlertProvider => {
                    let provider: AlertProvider = parse_yaml(file, text)?;
                    named(&provider.metadata, NameRule::Object)?;
                    Document::AlertProvider(provider)
                }
            }
        }
        (API_VERSION, kind) => return Err(at("kind", unknown_kind(kind, API_VERSION, &["Rollout", "RolloutGroup", "MetricTemplate", "AlertProvider", "Placement"]))),
        ("", _) if head.groups.is_some() => {
            return Ok(Parsed::Note(crate::foreign::rule_file_note(file, first_line, text)))
        }
        ("", _) => return Err(at("apiVersion", format!("missing apiVersion: not a Kubernetes document (Coalmine reads {API_VERSION} Rollouts and MetricTemplates, {FLAGGER_API_VERSION} Canaries, and notes other Kubernetes kinds)"))),
        (_, "") => return Err(at("kind", "missing kind: not a Kubernetes document".into())),
        (other, kind) => {
            if let Some(message) = own_kind_elsewhere(other, kind) {
                return Err(at("apiVersion", message));
            }
            if !crate::foreign::is_kubernetes_api_version(other) {
                return Err(at("apiVersion", format!("{other:?} is not a Kubernetes apiVersion (GROUP/VERSION such as apps/v1, or v1)")));
            }
            if !crate::foreign::is_kubernetes_kind(kind) {
                return Err(at("kind", format!("{kind:?} is not a Kubernetes kind (a CamelCase word such as Deployment)")));
            }
            return Ok(Parsed::Note(crate::foreign::note(file, first_line, text, other, kind)));
        }
    };
    Ok(Parsed::Document(Box::new(doc)))
}

fn unknown_kind(kind: &str, api_version: &str, kinds: &[&str]) -> String {
    let hint = match crate::suggest::nearest(kind, kinds.iter().copied()) {
        Some(near) => format!("did you mean {near}? "),
        None => String::new(),
    };
    format!(
        "unknown kind {kind:?} for {api_version}: {hint}Coalmine reads {} there",
        kinds.join(", ")
    )
}

/// A mistake in the apiVersion of a document meant for Coalmine: an apiVersion of its own API
/// groups it does not serve, one a typo away from them, or one of its kinds under another
/// group. (Argo Rollouts' `Rollout` is a different product's document, not a mistake.)
fn own_kind_elsewhere(api_version: &str, kind: &str) -> Option<String> {
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    let own_groups = [API_VERSION, FLAGGER_API_VERSION].map(|v| v.split('/').next().unwrap_or(v));
    let near = crate::suggest::nearest(api_version, [API_VERSION, FLAGGER_API_VERSION]);
    if own_groups.contains(&group) || near.is_some() {
        let hint = near.map_or(":".to_string(), |n| format!(", did you mean {n}?"));
        return Some(format!(
            "unknown apiVersion {api_version:?}{hint} Coalmine reads {API_VERSION} (Rollout, MetricTemplate, AlertProvider) and {FLAGGER_API_VERSION} (Canary, MetricTemplate, AlertProvider)"
        ));
    }
    if OWN_KINDS.contains(&kind) && group != "argoproj.io" {
        let expected = match kind {
            "Rollout" | "Placement" | "RolloutGroup" => API_VERSION.to_string(),
            "MetricTemplate" | "AlertProvider" => format!("{API_VERSION} or {FLAGGER_API_VERSION}"),
            _ => FLAGGER_API_VERSION.to_string(),
        };
        return Some(format!(
            "a {kind} has apiVersion {expected}, not {api_version:?}"
        ));
    }
    None
}

/// Rules between fields that a single field's type cannot express. Returns the field path and
/// the message.
pub fn check_analysis(a: &Analysis, path: &str) -> Result<(), (String, String)> {
    let err = |field: &str, msg: String| Err((format!("{path}.{field}"), msg));
    if a.interval.0.is_zero() {
        return err("interval", "must be longer than 0s".into());
    }
    for (i, pair) in a.step_weights.windows(2).enumerate() {
        if pair[1] <= pair[0] {
            return err(
                &format!("stepWeights[{}]", i + 1),
                "step weights must rise: each step above the one before".into(),
            );
        }
    }
    if let Some(i) = a.step_weights.iter().position(|w| *w == Weight::ZERO) {
        return err(
            &format!("stepWeights[{i}]"),
            "a step weight is above 0".into(),
        );
    }
    if matches!(a.step_weight, Some(w) if w == Weight::ZERO) {
        return err("stepWeight", "must be above 0".into());
    }
    if matches!(a.max_weight, Some(w) if w == Weight::ZERO) {
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
    if let Some(dark) = &a.dark_launch {
        if !canary {
            return err(
                "darkLaunch",
                "a dark launch comes before the first weight step: it needs stepWeight/maxWeight or stepWeights".into(),
            );
        }
        if a.mirror || a.mirror_weight.is_some() {
            let field = if a.mirror { "mirror" } else { "mirrorWeight" };
            return err(
                field,
                "a dark launch mirrors already: give the share as darkLaunch.mirrorWeight, and leave out mirror and mirrorWeight".into(),
            );
        }
        if dark.mirror_weight == Weight::ZERO {
            return err(
                "darkLaunch.mirrorWeight",
                "must be above 0: the dark launch judges the canary on mirrored requests".into(),
            );
        }
        if dark.duration.0.is_zero() {
            return err("darkLaunch.duration", "must be longer than 0s".into());
        }
        if dark.min_requests == 0 {
            return err(
                "darkLaunch.minRequests",
                "must be at least 1 paired request".into(),
            );
        }
        if !(dark.alpha > 0.0 && dark.alpha <= 0.5) {
            return err(
                "darkLaunch.alpha",
                format!("{} is not a probability in (0, 0.5]", dark.alpha),
            );
        }
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
    for located in &set.documents {
        if let Document::AlertProvider(p) = &located.doc {
            if p.spec.address.is_some() {
                out.push(format!(
                    "{}: AlertProvider {}: spec.address is a secret written in the document (whoever reads the file or the state can post to the channel); give it with addressFrom ({{file: PATH}} or {{env: NAME}}) on a coalmine.dev/v1alpha1 AlertProvider, or secretRef on Kubernetes",
                    located.name_position(),
                    p.metadata.name
                ));
            }
        }
    }
    for located in set.rollouts() {
        let (name, analysis) = match &located.doc {
            Document::Rollout(r) => (&r.metadata.name, &r.spec.analysis),
            Document::Canary(c) => (&c.metadata.name, &c.spec.analysis),
            _ => continue,
        };
        for m in &analysis.metrics {
            if let Some(t) = &m.template_ref {
                if set.template_for(located.doc.metadata(), t).is_none() {
                    out.push(format!(
                        "{}:{}: {name}: metric {:?} refers to MetricTemplate {:?}, which is not in the files given (in Kubernetes it lives in the cluster); pass its file too",
                        located.file, located.line, m.name, t.name
                    ));
                }
            }
        }
        for alert in &analysis.alerts {
            if alert.provider.is_none() {
                out.push(format!(
                    "{}:{}: {name}: alert {:?} refers to AlertProvider {:?}, which is not in the files given (in Kubernetes it lives in the cluster); pass its file too",
                    located.file, located.line, alert.name, alert.provider_ref.name
                ));
            }
        }
        if analysis.match_.iter().any(|m| !m.source_labels.is_empty()) {
            out.push(format!(
                "{}:{}: {name}: match.sourceLabels needs a service mesh; Coalmine's router ignores it",
                located.file, located.line
            ));
        }
        // Blue-green: no step weights, no match, no mirror — users never reach the canary.
        let blue_green = analysis.step_weight.is_none()
            && analysis.step_weights.is_empty()
            && analysis.match_.is_empty()
            && !analysis.mirror;
        let previewed = matches!(&located.doc, Document::Rollout(r) if !r.spec.preview.is_empty())
            || set.documents.iter().any(|d| {
                matches!(&d.doc, Document::Placement(p)
                if p.metadata.name == *name && !p.spec.preview.is_empty())
            });
        if blue_green && !previewed {
            out.push(format!(
                "{}:{}: {name}: blue-green: the canary gets no user traffic before it is switched to, so its checks have nothing to measure; give it spec.preview (a header that reaches it) and point the load test at it, or mirror",
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
