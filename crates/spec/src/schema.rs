//! Flagger documents checked against the `openAPIV3Schema` of Flagger's own CRDs (served version
//! `v1beta1`, embedded from `schema/flagger-crds.yaml`) the way the Kubernetes API server checks
//! them, so that what passes here is what `kubectl apply` accepts (within the limits below), and a
//! mistake is reported at its line and column with the path of the field.
//!
//! The same checker serves any CRD's schema on JSON objects ([`CrdSchema`]: the fake API server
//! in `coalmine-kube-fake` prunes, defaults and validates custom resources with it), so there is
//! one reading of CRD schemas in Coalmine. A [`Violation`] keeps the broken [`Rule`] apart from
//! its wording: Coalmine's messages below, and the API server's ([`Violation::api_message`]).
//!
//! Checked, because the CRDs use it (also `nullable`, `minItems`, `min/maxProperties`,
//! `exclusiveMinimum/Maximum`, `multipleOf`, `allOf` and non-string `enum`s, for other CRDs):
//! - `type` (`object`, `array`, `string`, `integer`, `number`, `boolean`) and
//!   `x-kubernetes-int-or-string`; an integer field also takes a whole float such as `80.0`;
//! - unknown fields, with the nearest known name as a suggestion, except under
//!   `additionalProperties`, `x-kubernetes-preserve-unknown-fields` and `metadata`;
//! - `required`, `enum`, `pattern`, `minLength`, `maxLength`, `maxItems`, `minimum`, `maximum`;
//! - `oneOf`, `anyOf` and `not`, which the CRD uses to say which fields go together
//!   (`iterations`, `stepWeight` or `stepWeights`; `exact`, `prefix` or `regex`);
//! - `apiVersion` and `kind` must name the document's type, and `metadata` must be a mapping.
//!
//! Deliberately not checked:
//! - `format`: the API server ignores the unknown `url` and `string`, `date-time` only appears
//!   under `status`, and `int32` is not range-checked;
//! - `x-kubernetes-validations`: CEL rules (one, on `service.mirror[].backendRef.port`), for
//!   Flagger documents and for JSON objects alike;
//! - the contents of `metadata`: the API server validates those as ObjectMeta, not by the CRD;
//! - `default` when checking a Flagger document: defaulting never turns a valid document into an
//!   invalid one ([`CrdSchema::apply_defaults`] applies defaults to JSON objects);
//! - YAML that Go's YAML 1.1 parser forgives but YAML 1.2 does not, such as a quoted string
//!   continued on a line indented no deeper than its key, is reported as a syntax error.
//!
//! As in Kubernetes, a field set to `null` counts as absent. The first mistake in document order
//! is reported (the API server lists every one); what a mapping lacks (`required`, `oneOf`) is
//! reported after its contents, since a misspelt key usually explains a missing one. Loading a CRD
//! fails on a schema keyword this module does not know (for Flagger's embedded CRDs, a panic), so a
//! CRD update that starts using one fails the tests instead of being silently ignored.

use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, MessageFormatter, Spanned, UserMessageFormatter};

use crate::suggest::nearest;
use crate::SpecError;

/// Flagger's CRDs, as published in `artifacts/flagger/crd.yaml`, except that the continuation
/// lines of the `apiVersion` and `kind` descriptions are indented two more spaces: YAML 1.2, which
/// serde-saphyr follows, wants them indented past their key, and Go's YAML 1.1 parser does not.
pub const FLAGGER_CRDS: &str = include_str!("../schema/flagger-crds.yaml");
/// The only version the CRDs serve, and the `apiVersion` documents of that version carry.
const VERSION: &str = "v1beta1";
const API_VERSION: &str = "flagger.app/v1beta1";

/// The Flagger document types Coalmine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlaggerKind {
    Canary,
    MetricTemplate,
    AlertProvider,
}

impl FlaggerKind {
    const ALL: [FlaggerKind; 3] = [Self::Canary, Self::MetricTemplate, Self::AlertProvider];

    /// The kind named by a document's `kind:` field.
    pub fn from_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Canary => "Canary",
            Self::MetricTemplate => "MetricTemplate",
            Self::AlertProvider => "AlertProvider",
        }
    }
}

impl fmt::Display for FlaggerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks one YAML document (the caller splits multi-document files) against the CRD of `kind`.
/// `file` only names the document in the error, whose lines and columns count from `text`.
pub fn validate_flagger(file: &str, text: &str, kind: FlaggerKind) -> Result<(), SpecError> {
    let doc = parse_document(file, text)?;
    Checker
        .check_identity(&doc, kind)
        .and_then(|()| Checker.check(schema_for(kind), &doc, "", Fields::Closed))
        .map_err(|v| SpecError {
            file: file.to_owned(),
            line: v.at.line(),
            column: v.at.column(),
            message: v.rule.to_string(),
            field: v.field,
        })
}

/// Where `field`, a path as in [`SpecError::field`] (`spec.analysis.metrics[1].name`), is written
/// in the YAML document `text`: the line and column of its value or, if it is not there, of the
/// nearest enclosing value that is. `None` when `text` does not parse or `field` is no path.
pub fn locate(text: &str, field: &str) -> Option<(u64, u64)> {
    let doc: Spanned<Node> = serde_saphyr::from_str(text).ok()?;
    let mut at = &doc;
    for step in path_steps(field)? {
        let next = match (&at.value, step) {
            (Node::Map(entries), Step::Key(name)) => entries
                .iter()
                .find(|(key, _)| key.value == name)
                .map(|(_, value)| value),
            (Node::Seq(items), Step::Index(i)) => items.get(i),
            _ => None,
        };
        match next {
            Some(node) => at = node,
            None => break,
        }
    }
    Some((at.referenced.line(), at.referenced.column()))
}

/// The value written at `field` of the YAML document `text`, for error messages; `None` unless
/// the whole path is there.
pub(crate) fn written_at(text: &str, field: &str) -> Option<Written> {
    let doc: Spanned<Node> = serde_saphyr::from_str(text).ok()?;
    let mut at = &doc;
    for step in path_steps(field)? {
        at = match (&at.value, step) {
            (Node::Map(entries), Step::Key(name)) => entries
                .iter()
                .find(|(key, _)| key.value == name)
                .map(|(_, value)| value)?,
            (Node::Seq(items), Step::Index(i)) => items.get(i)?,
            _ => return None,
        };
    }
    Some(match &at.value {
        Node::Null => Written::Null,
        Node::Bool(b) => Written::Bool(*b),
        Node::Int(i) => Written::Int(*i),
        Node::Float(f) => Written::Float(*f),
        Node::Str(s) => Written::Str(s.clone()),
        Node::Seq(_) => Written::List,
        Node::Map(_) => Written::Mapping,
    })
}

/// A YAML value as a message shows what was found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Written {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List,
    Mapping,
}

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 40;
        match self {
            Written::Null => f.write_str("nothing (null)"),
            Written::Bool(b) => write!(f, "{b}"),
            Written::Int(i) => write!(f, "{i}"),
            Written::Float(x) => write!(f, "{x}"),
            Written::Str(s) if s.chars().count() > MAX_CHARS => {
                let head: String = s.chars().take(MAX_CHARS).collect();
                write!(f, "{:?}…", head)
            }
            Written::Str(s) => write!(f, "{s:?}"),
            Written::List => f.write_str("a list"),
            Written::Mapping => f.write_str("a mapping"),
        }
    }
}

enum Step {
    Key(String),
    Index(usize),
}

/// The inverse of [`join`]: `a.b[2]["c.d"]` is `a`, `b`, 2, `c.d`.
fn path_steps(path: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix("[\"") {
            let mut key = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => key.push(chars.next()?.1),
                    (_, c) => key.push(c),
                }
            };
            rest = quoted[end + 1..].strip_prefix(']')?;
            steps.push(Step::Key(key));
        } else if let Some(index) = rest.strip_prefix('[') {
            let end = index.find(']')?;
            steps.push(Step::Index(index[..end].parse().ok()?));
            rest = &index[end + 1..];
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            steps.push(Step::Key(rest[..end].to_owned()));
            rest = &rest[end..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Some(steps)
}

// ---------------------------------------------------------------------------------------------
// YAML with locations

/// A YAML node; every child carries the line and column it was written at.
#[derive(Debug)]
enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
}

impl Node {
    fn is_null(&self) -> bool {
        matches!(self, Node::Null)
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A field of a mapping; `null` counts as absent, as Kubernetes prunes it.
    fn field(&self, name: &str) -> Option<&Spanned<Node>> {
        match self {
            Node::Map(entries) => entries
                .iter()
                .find(|(key, value)| key.value == name && !value.value.is_null())
                .map(|(_, value)| value),
            _ => None,
        }
    }

    fn has_field(&self, name: &str) -> bool {
        self.field(name).is_some()
    }

    fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => i64::try_from(*i)
                .map(Value::from)
                .or_else(|_| u64::try_from(*i).map(Value::from))
                .unwrap_or_else(|_| Value::from(*i as f64)),
            Node::Float(f) => Value::from(*f),
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(items.iter().map(|i| i.value.to_json()).collect()),
            Node::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.value.clone(), v.value.to_json()))
                    .collect(),
            ),
        }
    }

    /// A JSON value as a tree of nodes with no location, so the checker can read it.
    fn from_json(value: &serde_json::Value) -> Spanned<Node> {
        use serde_json::Value;
        let unplaced = |node| Spanned::new(node, Location::UNKNOWN, Location::UNKNOWN);
        unplaced(match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Node::Int(i.into()),
                (None, Some(u)) => Node::Int(u.into()),
                _ => Node::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Node::Str(s.clone()),
            Value::Array(items) => Node::Seq(items.iter().map(Node::from_json).collect()),
            Value::Object(entries) => Node::Map(
                entries
                    .iter()
                    .map(|(k, v)| (unplaced_key(k), Node::from_json(v)))
                    .collect(),
            ),
        })
    }

    /// The JSON type name the API server's messages use.
    fn type_name(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "boolean",
            Node::Int(_) => "integer",
            Node::Float(_) => "number",
            Node::Str(_) => "string",
            Node::Seq(_) => "array",
            Node::Map(_) => "object",
        }
    }

    /// What a type error says was found: `string "abc"`, `integer 5`, `object`.
    fn describe(&self) -> String {
        const MAX_CHARS: usize = 40;
        match self {
            Node::Null => "null".into(),
            Node::Bool(b) => format!("boolean {b}"),
            Node::Int(i) => format!("integer {i}"),
            Node::Float(f) => format!("number {f}"),
            Node::Str(s) if s.chars().count() > MAX_CHARS => {
                let head: String = s.chars().take(MAX_CHARS).collect();
                format!("string {:?}", head + "…")
            }
            Node::Str(s) => format!("string {s:?}"),
            Node::Seq(_) => "array".into(),
            Node::Map(_) => "object".into(),
        }
    }
}

fn unplaced_key(key: &str) -> Spanned<String> {
    Spanned::new(key.to_owned(), Location::UNKNOWN, Location::UNKNOWN)
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        Node::deserialize(deserializer)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        i128::try_from(v)
            .map(Node::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        // Keys are read as strings, as Kubernetes' YAML-to-JSON conversion does (`80:` is "80").
        let mut entries = Vec::new();
        while let Some(key) = map.next_key()? {
            entries.push((key, map.next_value()?));
        }
        Ok(Node::Map(entries))
    }
}

fn parse_document(file: &str, text: &str) -> Result<Spanned<Node>, SpecError> {
    serde_saphyr::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |at| (at.line(), at.column()));
        SpecError {
            file: file.to_owned(),
            line,
            column,
            field: String::new(),
            message: UserMessageFormatter
                .format_message(e.without_snippet())
                .into_owned(),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The schema tree

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
}

impl Type {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "object" => Self::Object,
            "array" => Self::Array,
            "string" => Self::String,
            "integer" => Self::Integer,
            "number" => Self::Number,
            "boolean" => Self::Boolean,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Object => "object",
            Self::Array => "array",
            Self::String => "string",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::Boolean => "boolean",
        }
    }
}

/// The part of an OpenAPI schema that CRDs use.
#[derive(Debug, Default)]
struct Schema {
    /// `None` in the branches of `oneOf`/`anyOf`/`allOf`/`not`, which only constrain fields.
    ty: Option<Type>,
    int_or_string: bool,
    nullable: bool,
    /// In CRD order, which is also the order an "expected one of" message lists them in.
    properties: Vec<(String, Schema)>,
    additional_properties: Option<Box<Schema>>,
    preserve_unknown_fields: bool,
    /// `x-kubernetes-embedded-resource`: `apiVersion`, `kind` and `metadata` are kept unpruned.
    embedded_resource: bool,
    required: Vec<String>,
    items: Option<Box<Schema>>,
    min_items: Option<usize>,
    max_items: Option<usize>,
    min_properties: Option<usize>,
    max_properties: Option<usize>,
    enum_values: Vec<serde_json::Value>,
    pattern: Option<regex::Regex>,
    min_length: Option<usize>,
    max_length: Option<usize>,
    minimum: Option<f64>,
    exclusive_minimum: bool,
    maximum: Option<f64>,
    exclusive_maximum: bool,
    multiple_of: Option<f64>,
    one_of: Vec<Schema>,
    any_of: Vec<Schema>,
    all_of: Vec<Schema>,
    not: Option<Box<Schema>>,
    default: Option<serde_json::Value>,
    /// `x-kubernetes-list-type` (`atomic`, `set`, `map`) and, for `map`, its keys.
    list_type: Option<String>,
    list_map_keys: Vec<String>,
    /// `x-kubernetes-map-type` (`atomic`, `granular`).
    map_type: Option<String>,
}

impl Schema {
    fn property(&self, name: &str) -> Option<&Schema> {
        self.properties
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, schema)| schema)
    }

    fn property_names(&self) -> impl Iterator<Item = &str> {
        self.properties.iter().map(|(name, _)| name.as_str())
    }

    fn expected(&self) -> &'static str {
        match self.ty {
            _ if self.int_or_string => "integer or string",
            Some(ty) => ty.name(),
            None => "any value",
        }
    }
}

fn schema_for(kind: FlaggerKind) -> &'static Schema {
    static SCHEMAS: OnceLock<Vec<(FlaggerKind, Schema)>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| load_schemas(FLAGGER_CRDS));
    schemas
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, schema)| schema)
        .unwrap_or_else(|| panic!("flagger-crds.yaml has no CRD for {kind}"))
}

// The CRD text is compiled in and covered by the tests, so a mistake in it is a bug: panic.
fn load_schemas(crds: &str) -> Vec<(FlaggerKind, Schema)> {
    let docs: Vec<Node> = serde_saphyr::from_multiple(crds)
        .unwrap_or_else(|e| panic!("flagger-crds.yaml does not parse: {e}"));
    docs.iter()
        .map(|crd| {
            let spec = get(crd, "spec");
            let kind_name = get(get(spec, "names"), "kind")
                .as_str()
                .expect("flagger-crds.yaml: spec.names.kind is not a string");
            let kind = FlaggerKind::from_kind(kind_name)
                .unwrap_or_else(|| panic!("flagger-crds.yaml: unexpected CRD kind {kind_name}"));
            let Node::Seq(versions) = get(spec, "versions") else {
                panic!("flagger-crds.yaml: spec.versions is not a list");
            };
            let version = versions
                .iter()
                .map(|v| &v.value)
                .find(|v| {
                    v.field("name").and_then(|n| n.value.as_str()) == Some(VERSION)
                        && matches!(v.field("served").map(|s| &s.value), Some(Node::Bool(true)))
                })
                .unwrap_or_else(|| panic!("flagger-crds.yaml: {kind} does not serve {VERSION}"));
            let mut schema = object_schema(
                get(get(version, "schema"), "openAPIV3Schema"),
                kind.as_str(),
            )
            .unwrap_or_else(|e| panic!("flagger-crds.yaml: {e}"));
            // The API server needs these to pick the schema at all.
            schema
                .required
                .extend(["apiVersion".to_owned(), "kind".to_owned()]);
            (kind, schema)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Any CRD's schema, for JSON objects

/// One version's `openAPIV3Schema` of any CustomResourceDefinition, to treat a JSON object the
/// way the API server's structural-schema handling does before it stores it: [`prune`]
/// unknown fields, [`apply_defaults`], then [`validate`]. Checks the same rules, with the same
/// code, as [`validate_flagger`] (see the module documentation for what is not checked).
///
/// [`prune`]: CrdSchema::prune
/// [`apply_defaults`]: CrdSchema::apply_defaults
/// [`validate`]: CrdSchema::validate
#[derive(Debug)]
pub struct CrdSchema {
    root: Schema,
}

impl CrdSchema {
    /// Loads `openAPIV3Schema`; an error names the keyword or value this module cannot use.
    pub fn from_openapi(openapi: &serde_json::Value) -> Result<Self, String> {
        let node = Node::from_json(openapi);
        let mut root = object_schema(&node.value, "openAPIV3Schema")?;
        // Every object has these, whether or not the CRD lists them.
        for implicit in ["apiVersion", "kind", "metadata"] {
            if root.property(implicit).is_none() {
                let schema = Schema {
                    ty: Some(if implicit == "metadata" {
                        Type::Object
                    } else {
                        Type::String
                    }),
                    preserve_unknown_fields: implicit == "metadata",
                    ..Schema::default()
                };
                root.properties.push((implicit.to_owned(), schema));
            }
        }
        Ok(Self { root })
    }

    /// The schema of a top-level field (`status`), if the CRD declares one.
    pub fn declares(&self, field: &str) -> bool {
        self.root.property(field).is_some()
    }

    /// Checks `object`; the first violation in document order.
    pub fn validate(&self, object: &serde_json::Value) -> Result<(), Violation> {
        Checker.check(&self.root, &Node::from_json(object), "", Fields::Closed)
    }

    /// Removes the fields the schema does not declare, as the API server prunes them, and
    /// returns their paths (`spec.colour`). `apiVersion`, `kind` and
    /// `metadata` are never pruned here: the API server handles those as ObjectMeta.
    pub fn prune(&self, object: &mut serde_json::Value) -> Vec<String> {
        let mut pruned = Vec::new();
        if let serde_json::Value::Object(fields) = object {
            for (name, value) in fields.iter_mut() {
                if let Some(sub) = self.root.property(name).filter(|_| name != "metadata") {
                    prune(sub, value, name, &mut pruned);
                }
            }
            let root = &self.root;
            fields.retain(|name, _| {
                let keep = matches!(name.as_str(), "apiVersion" | "kind" | "metadata")
                    || root.property(name).is_some()
                    || root.preserve_unknown_fields;
                if !keep {
                    pruned.push(join("", name));
                }
                keep
            });
        }
        pruned
    }

    /// Fills in `default`s where a field is absent, or `null` and not nullable; a `null` that
    /// has no default and is not nullable is dropped, as the API server does.
    pub fn apply_defaults(&self, object: &mut serde_json::Value) {
        apply_defaults(&self.root, object);
    }

    /// `x-kubernetes-list-type` and `x-kubernetes-list-map-keys` of the list at `path`
    /// (field names; list items are stepped over with `[]`), for server-side apply.
    pub fn list_type_at(&self, path: &[&str]) -> Option<(&str, &[String])> {
        let mut at = &self.root;
        for step in path {
            at = if *step == "[]" {
                at.items.as_deref()?
            } else {
                at.property(step).or(at.additional_properties.as_deref())?
            };
        }
        at.list_type
            .as_deref()
            .map(|ty| (ty, at.list_map_keys.as_slice()))
    }
}

fn prune(schema: &Schema, value: &mut serde_json::Value, path: &str, pruned: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(fields) => {
            let open = schema.preserve_unknown_fields;
            let embedded = schema.embedded_resource;
            fields.retain(|name, _| {
                let keep = open
                    || schema.property(name).is_some()
                    || schema.additional_properties.is_some()
                    || (embedded && matches!(name.as_str(), "apiVersion" | "kind" | "metadata"));
                if !keep {
                    pruned.push(join(path, name));
                }
                keep
            });
            for (name, sub_value) in fields.iter_mut() {
                let sub = schema
                    .property(name)
                    .or(schema.additional_properties.as_deref());
                if let Some(sub) = sub {
                    prune(sub, sub_value, &join(path, name), pruned);
                }
            }
        }
        serde_json::Value::Array(items) => {
            if let Some(item_schema) = &schema.items {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item_schema, item, &format!("{path}[{i}]"), pruned);
                }
            }
        }
        _ => {}
    }
}

fn apply_defaults(schema: &Schema, value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            for (name, sub) in &schema.properties {
                let absent = fields
                    .get(name)
                    .is_none_or(|v| v.is_null() && !sub.nullable);
                if !absent {
                    continue;
                }
                match &sub.default {
                    Some(default) => {
                        fields.insert(name.clone(), default.clone());
                    }
                    None if fields.get(name).is_some_and(|v| v.is_null()) => {
                        fields.remove(name);
                    }
                    None => {}
                }
            }
            for (name, sub_value) in fields.iter_mut() {
                let sub = schema
                    .property(name)
                    .or(schema.additional_properties.as_deref());
                if let Some(sub) = sub {
                    apply_defaults(sub, sub_value);
                }
            }
        }
        serde_json::Value::Array(items) => {
            if let Some(item_schema) = &schema.items {
                for item in items {
                    apply_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// The schema of a whole object (a CRD version's `openAPIV3Schema`).
fn object_schema(node: &Node, at: &str) -> Result<Schema, String> {
    let mut schema = parse_schema(node, at)?;
    // The API server validates metadata as ObjectMeta itself; the CRD only says "object".
    if let Some((_, metadata)) = schema.properties.iter_mut().find(|(n, _)| n == "metadata") {
        metadata.preserve_unknown_fields = true;
    }
    Ok(schema)
}

fn get<'a>(node: &'a Node, name: &str) -> &'a Node {
    node.field(name)
        .map(|v| &v.value)
        .unwrap_or_else(|| panic!("flagger-crds.yaml: no `{name}`"))
}

fn str_of<'a>(node: &'a Node, at: &str) -> Result<&'a str, String> {
    node.as_str().ok_or_else(|| format!("{at} is not a string"))
}

fn seq_of<'a>(node: &'a Node, at: &str) -> Result<&'a [Spanned<Node>], String> {
    match node {
        Node::Seq(items) => Ok(items),
        _ => Err(format!("{at} is not a list")),
    }
}

fn strings_of(node: &Node, at: &str) -> Result<Vec<String>, String> {
    seq_of(node, at)?
        .iter()
        .map(|s| str_of(&s.value, at).map(str::to_owned))
        .collect()
}

fn number_of(node: &Node, at: &str) -> Result<f64, String> {
    match *node {
        Node::Int(i) => Ok(i as f64),
        Node::Float(f) => Ok(f),
        _ => Err(format!("{at} is not a number")),
    }
}

fn count_of(node: &Node, at: &str) -> Result<usize, String> {
    match *node {
        Node::Int(i) => usize::try_from(i).ok(),
        _ => None,
    }
    .ok_or_else(|| format!("{at} is not a count"))
}

fn flag_of(node: &Node, at: &str) -> Result<bool, String> {
    match *node {
        Node::Bool(b) => Ok(b),
        _ => Err(format!("{at} is not a boolean")),
    }
}

fn branches_of(node: &Node, at: &str) -> Result<Vec<Schema>, String> {
    seq_of(node, at)?
        .iter()
        .map(|branch| parse_schema(&branch.value, at))
        .collect()
}

/// `at` names the schema in errors, e.g. `Canary.spec.analysis`. A keyword this module does not
/// know is an error, so that a CRD using one is refused rather than silently half-checked.
fn parse_schema(node: &Node, at: &str) -> Result<Schema, String> {
    let Node::Map(entries) = node else {
        return Err(format!("{at} is not a schema"));
    };
    let mut schema = Schema::default();
    for (key, value) in entries {
        let here = format!("{at}.{}", key.value);
        let value = &value.value;
        match key.value.as_str() {
            "type" => {
                let name = str_of(value, &here)?;
                let ty = Type::parse(name).ok_or_else(|| format!("{here}: unknown type {name}"))?;
                schema.ty = Some(ty);
            }
            "x-kubernetes-int-or-string" => schema.int_or_string = flag_of(value, &here)?,
            "x-kubernetes-preserve-unknown-fields" => {
                schema.preserve_unknown_fields = flag_of(value, &here)?;
            }
            "x-kubernetes-embedded-resource" => schema.embedded_resource = flag_of(value, &here)?,
            "nullable" => schema.nullable = flag_of(value, &here)?,
            "properties" => {
                let Node::Map(properties) = value else {
                    return Err(format!("{here} is not a mapping"));
                };
                schema.properties = properties
                    .iter()
                    .map(|(name, sub)| {
                        let sub = parse_schema(&sub.value, &format!("{at}.{}", name.value))?;
                        Ok((name.value.clone(), sub))
                    })
                    .collect::<Result<_, String>>()?;
            }
            // `additionalProperties: true|false` says nothing a structural schema does not.
            "additionalProperties" if matches!(value, Node::Bool(_)) => {}
            "additionalProperties" => {
                schema.additional_properties = Some(Box::new(parse_schema(value, &here)?));
            }
            "required" => schema.required = strings_of(value, &here)?,
            "items" => schema.items = Some(Box::new(parse_schema(value, &format!("{at}[]"))?)),
            "minItems" => schema.min_items = Some(count_of(value, &here)?),
            "maxItems" => schema.max_items = Some(count_of(value, &here)?),
            "minProperties" => schema.min_properties = Some(count_of(value, &here)?),
            "maxProperties" => schema.max_properties = Some(count_of(value, &here)?),
            "enum" => {
                schema.enum_values = seq_of(value, &here)?
                    .iter()
                    .map(|v| v.value.to_json())
                    .collect();
            }
            "pattern" => {
                let source = str_of(value, &here)?;
                let pattern = regex::Regex::new(source)
                    .map_err(|e| format!("{here}: unsupported pattern {source:?}: {e}"))?;
                schema.pattern = Some(pattern);
            }
            "minLength" => schema.min_length = Some(count_of(value, &here)?),
            "maxLength" => schema.max_length = Some(count_of(value, &here)?),
            "minimum" => schema.minimum = Some(number_of(value, &here)?),
            "maximum" => schema.maximum = Some(number_of(value, &here)?),
            "exclusiveMinimum" => schema.exclusive_minimum = flag_of(value, &here)?,
            "exclusiveMaximum" => schema.exclusive_maximum = flag_of(value, &here)?,
            "multipleOf" => schema.multiple_of = Some(number_of(value, &here)?),
            "oneOf" => schema.one_of = branches_of(value, &here)?,
            "anyOf" => schema.any_of = branches_of(value, &here)?,
            "allOf" => schema.all_of = branches_of(value, &here)?,
            "not" => schema.not = Some(Box::new(parse_schema(value, &here)?)),
            "default" => schema.default = Some(value.to_json()),
            "x-kubernetes-list-type" => schema.list_type = Some(str_of(value, &here)?.to_owned()),
            "x-kubernetes-list-map-keys" => schema.list_map_keys = strings_of(value, &here)?,
            "x-kubernetes-map-type" => schema.map_type = Some(str_of(value, &here)?.to_owned()),
            // See the module documentation for why these are not checked.
            "description"
            | "format"
            | "title"
            | "example"
            | "externalDocs"
            | "uniqueItems"
            | "x-kubernetes-validations" => {}
            other => return Err(format!("{at}: unsupported schema keyword `{other}`")),
        }
    }
    Ok(schema)
}

// ---------------------------------------------------------------------------------------------
// Checking a document

/// A rule of the schema that a document breaks, at `field` (`spec.analysis.interval`; for a
/// missing field, the missing field itself). What the rule was and what was found are kept apart
/// from any wording, so that Coalmine's messages (`Display`) and the API server's
/// ([`Violation::api_message`]) come from the same check.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub field: String,
    pub rule: Rule,
    at: Location,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// `found` describes the value (`string "abc"`); `found_type` is its JSON type name.
    Type {
        expected: &'static str,
        found: String,
        found_type: &'static str,
        quote_hint: bool,
    },
    UnknownField {
        name: String,
        message: String,
    },
    Required {
        name: String,
    },
    Enum {
        value: serde_json::Value,
        allowed: Vec<serde_json::Value>,
    },
    Pattern {
        value: String,
        pattern: String,
    },
    MinLength {
        value: String,
        min: usize,
    },
    MaxLength {
        value: String,
        max: usize,
    },
    MinItems {
        count: usize,
        min: usize,
    },
    MaxItems {
        count: usize,
        max: usize,
    },
    MinProperties {
        count: usize,
        min: usize,
    },
    MaxProperties {
        count: usize,
        max: usize,
    },
    Minimum {
        value: f64,
        min: f64,
        exclusive: bool,
    },
    Maximum {
        value: f64,
        max: f64,
        exclusive: bool,
    },
    MultipleOf {
        value: f64,
        factor: f64,
    },
    /// `object` is the path of the value the `oneOf` is on; `message` names the fields that
    /// tell its forms apart (Coalmine reports at the clashing field).
    OneOf {
        object: String,
        matched: usize,
        message: String,
    },
    AnyOf,
    Not,
    /// `apiVersion` or `kind` names another type.
    Identity {
        expected: String,
        found: String,
    },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Type {
                expected,
                found,
                quote_hint,
                ..
            } => {
                write!(f, "expected {expected}, found {found}")?;
                if *quote_hint {
                    f.write_str("; put it in quotes to make it a string")?;
                }
                Ok(())
            }
            Rule::UnknownField { message, .. } | Rule::OneOf { message, .. } => {
                f.write_str(message)
            }
            Rule::Required { name } => write!(f, "missing required field `{name}`"),
            Rule::Enum { value, allowed } => match value.as_str() {
                Some(text) if allowed.iter().all(|a| a.is_string()) => {
                    let allowed: Vec<String> = allowed
                        .iter()
                        .filter_map(|a| a.as_str().map(str::to_owned))
                        .collect();
                    f.write_str(&unsupported_value_message(text, &allowed))
                }
                _ => write!(
                    f,
                    "unsupported value {value}; supported values: {}",
                    json_list(allowed)
                ),
            },
            Rule::Pattern { value, pattern } => {
                write!(f, "{value:?} does not match the pattern {pattern}")
            }
            Rule::MinLength { value, min } => write!(
                f,
                "must have at least {}, found {}",
                counted(*min, "character"),
                value.chars().count()
            ),
            Rule::MaxLength { value, max } => write!(
                f,
                "must have at most {}, found {}",
                counted(*max, "character"),
                value.chars().count()
            ),
            Rule::MinItems { count, min } => write!(
                f,
                "must have at least {}, found {count}",
                counted(*min, "item")
            ),
            Rule::MaxItems { count, max } => {
                write!(
                    f,
                    "must have at most {}, found {count}",
                    counted(*max, "item")
                )
            }
            Rule::MinProperties { count, min } => write!(
                f,
                "must have at least {}, found {count}",
                counted(*min, "field")
            ),
            Rule::MaxProperties { count, max } => write!(
                f,
                "must have at most {}, found {count}",
                counted(*max, "field")
            ),
            Rule::Minimum {
                value,
                min,
                exclusive: false,
            } => write!(f, "must be at least {min}, found {value}"),
            Rule::Minimum { value, min, .. } => {
                write!(f, "must be greater than {min}, found {value}")
            }
            Rule::Maximum {
                value,
                max,
                exclusive: false,
            } => write!(f, "must be at most {max}, found {value}"),
            Rule::Maximum { value, max, .. } => write!(f, "must be less than {max}, found {value}"),
            Rule::MultipleOf { value, factor } => {
                write!(f, "must be a multiple of {factor}, found {value}")
            }
            // In the Flagger CRDs, `anyOf` and `not` only appear inside `oneOf` branches, so
            // these generic messages are never the one a Flagger user sees.
            Rule::AnyOf => f.write_str("matches none of the allowed forms"),
            Rule::Not => f.write_str("matches a forbidden form"),
            Rule::Identity { expected, found } => write!(f, "expected {expected:?}, found {found}"),
        }
    }
}

impl Violation {
    /// The field the API server names for this violation: where Coalmine points at the field
    /// that clashes inside a `oneOf`, the API server names the object the `oneOf` is on.
    pub fn api_field(&self) -> &str {
        match &self.rule {
            Rule::OneOf { object, .. } => object,
            _ => &self.field,
        }
    }

    /// The `reason` of the API server's `StatusCause` (`FieldValueInvalid`, ...).
    pub fn api_reason(&self) -> &'static str {
        match self.rule {
            Rule::Required { .. } => "FieldValueRequired",
            Rule::Enum { .. } => "FieldValueNotSupported",
            Rule::MaxLength { .. } => "FieldValueTooLong",
            Rule::MaxItems { .. } => "FieldValueTooMany",
            Rule::UnknownField { .. } => "FieldValueNotFound",
            _ => "FieldValueInvalid",
        }
    }

    /// The message the Kubernetes API server gives for this violation (kube-openapi's wording,
    /// as apiextensions-apiserver turns it into a field error), without the leading field path:
    /// `Invalid value: "1x": spec.analysis.interval in body should match '^[0-9]+(m|s)'`.
    pub fn api_message(&self) -> String {
        let field = self.api_field();
        let invalid = |value: &dyn fmt::Display, detail: String| {
            format!("Invalid value: {value}: {field} in body {detail}")
        };
        let quoted = |s: &str| serde_json::Value::from(s).to_string();
        match &self.rule {
            Rule::Type {
                expected,
                found_type,
                ..
            } => {
                let expected = if *expected == "integer or string" {
                    "integer,string"
                } else {
                    expected
                };
                invalid(
                    &quoted(found_type),
                    format!("must be of type {expected}: {}", quoted(found_type)),
                )
            }
            Rule::UnknownField { name, .. } => format!("Not found: {}", quoted(name)),
            Rule::Required { .. } => "Required value".to_owned(),
            Rule::Enum { value, allowed } => {
                format!(
                    "Unsupported value: {value}: supported values: {}",
                    json_list(allowed)
                )
            }
            Rule::Pattern { value, pattern } => {
                invalid(&quoted(value), format!("should match '{pattern}'"))
            }
            Rule::MinLength { value, min } => invalid(
                &quoted(value),
                format!("should be at least {min} chars long"),
            ),
            Rule::MaxLength { max, .. } => format!("Too long: may not be more than {max} bytes"),
            Rule::MinItems { count, min } => {
                invalid(count, format!("should have at least {min} items"))
            }
            Rule::MaxItems { count, max } => {
                format!("Too many: {count}: must have at most {max} items")
            }
            Rule::MinProperties { count, min } => {
                invalid(count, format!("should have at least {min} properties"))
            }
            Rule::MaxProperties { count, max } => {
                invalid(count, format!("should have at most {max} properties"))
            }
            Rule::Minimum {
                value,
                min,
                exclusive,
            } => {
                let or_equal = if *exclusive { "" } else { " or equal to" };
                invalid(value, format!("should be greater than{or_equal} {min}"))
            }
            Rule::Maximum {
                value,
                max,
                exclusive,
            } => {
                let or_equal = if *exclusive { "" } else { " or equal to" };
                invalid(value, format!("should be less than{or_equal} {max}"))
            }
            Rule::MultipleOf { value, factor } => {
                invalid(value, format!("should be a multiple of {factor}"))
            }
            Rule::OneOf { matched, .. } => {
                let found = if *matched == 0 {
                    "Found none valid".to_owned()
                } else {
                    format!("Found {matched} valid alternatives")
                };
                invalid(
                    &quoted("object"),
                    format!("must validate one and only one schema (oneOf). {found}"),
                )
            }
            Rule::AnyOf => invalid(
                &quoted("object"),
                "must validate at least one schema (anyOf)".to_owned(),
            ),
            Rule::Not => invalid(
                &quoted("object"),
                "must not validate the schema (not)".to_owned(),
            ),
            Rule::Identity { expected, found } => {
                format!("Invalid value: {found}: must be {}", quoted(expected))
            }
        }
    }
}

fn json_list(values: &[serde_json::Value]) -> String {
    values
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether fields a schema does not list are mistakes. They are in the schema proper; the
/// branches of `oneOf`/`anyOf`/`allOf`/`not` only test the fields they name, as in Kubernetes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fields {
    Closed,
    Open,
}

type Checked = Result<(), Violation>;

struct Checker;

fn violation(at: &Location, field: &str, rule: Rule) -> Violation {
    Violation {
        field: field.to_owned(),
        rule,
        at: *at,
    }
}

impl Checker {
    /// `apiVersion` and `kind` say which schema applies, so they must say this one; checked
    /// first, as checking a document against another kind's schema explains nothing. (That they
    /// are there at all is checked with the rest, so that a misspelt key gets its suggestion.)
    fn check_identity(&self, doc: &Spanned<Node>, kind: FlaggerKind) -> Checked {
        for (field, expected) in [("apiVersion", API_VERSION), ("kind", kind.as_str())] {
            if let Some(value) = doc.value.field(field) {
                if value.value.as_str() != Some(expected) {
                    let rule = Rule::Identity {
                        expected: expected.to_owned(),
                        found: value.value.describe(),
                    };
                    return Err(violation(&value.referenced, field, rule));
                }
            }
        }
        Ok(())
    }

    fn check(&self, schema: &Schema, node: &Spanned<Node>, path: &str, fields: Fields) -> Checked {
        self.check_type(schema, node, path)?;
        match &node.value {
            Node::Map(entries) => self.check_map(schema, node, entries, path, fields)?,
            Node::Seq(items) => self.check_seq(schema, node, items, path, fields)?,
            Node::Str(text) => self.check_str(schema, node, text, path)?,
            Node::Int(i) => self.check_number(schema, node, *i as f64, path)?,
            Node::Float(f) => self.check_number(schema, node, *f, path)?,
            Node::Null | Node::Bool(_) => {}
        }
        self.check_enum(schema, node, path)?;
        self.check_junctions(schema, node, path)
    }

    fn check_type(&self, schema: &Schema, node: &Spanned<Node>, path: &str) -> Checked {
        // JSON has one number type; the API server takes `80.0` where an integer is due.
        let whole = |f: f64| f.fract() == 0.0;
        let ok = if schema.int_or_string {
            match node.value {
                Node::Int(_) | Node::Str(_) => true,
                Node::Float(f) => whole(f),
                _ => false,
            }
        } else {
            match (&node.value, schema.ty) {
                (_, None) => true,
                (Node::Null, Some(_)) => schema.nullable,
                (Node::Map(_), Some(Type::Object))
                | (Node::Seq(_), Some(Type::Array))
                | (Node::Str(_), Some(Type::String))
                | (Node::Bool(_), Some(Type::Boolean))
                | (Node::Int(_), Some(Type::Integer | Type::Number))
                | (Node::Float(_), Some(Type::Number)) => true,
                (Node::Float(f), Some(Type::Integer)) => whole(*f),
                _ => false,
            }
        };
        if ok {
            return Ok(());
        }
        let scalar = matches!(node.value, Node::Bool(_) | Node::Int(_) | Node::Float(_));
        let rule = Rule::Type {
            expected: schema.expected(),
            found: node.value.describe(),
            found_type: node.value.type_name(),
            quote_hint: scalar && (schema.ty == Some(Type::String) || schema.int_or_string),
        };
        Err(violation(&node.referenced, path, rule))
    }

    fn check_map(
        &self,
        schema: &Schema,
        node: &Spanned<Node>,
        entries: &[(Spanned<String>, Spanned<Node>)],
        path: &str,
        fields: Fields,
    ) -> Checked {
        for (key, value) in entries {
            let field = join(path, &key.value);
            let sub = schema
                .property(&key.value)
                .or(schema.additional_properties.as_deref());
            match sub {
                Some(_) if value.value.is_null() => {}
                Some(sub) => self.check(sub, value, &field, fields)?,
                None if fields == Fields::Open
                    || schema.preserve_unknown_fields
                    || schema.ty != Some(Type::Object) => {}
                None => {
                    let rule = Rule::UnknownField {
                        name: key.value.clone(),
                        message: unknown_field_message(&key.value, schema),
                    };
                    return Err(violation(&key.referenced, &field, rule));
                }
            }
        }
        if let Some(missing) = schema.required.iter().find(|r| !node.value.has_field(r)) {
            let rule = Rule::Required {
                name: missing.clone(),
            };
            return Err(violation(&node.referenced, &join(path, missing), rule));
        }
        let count = entries.len();
        if let Some(min) = schema.min_properties.filter(|min| count < *min) {
            let rule = Rule::MinProperties { count, min };
            return Err(violation(&node.referenced, path, rule));
        }
        if let Some(max) = schema.max_properties.filter(|max| count > *max) {
            let rule = Rule::MaxProperties { count, max };
            return Err(violation(&node.referenced, path, rule));
        }
        Ok(())
    }

    fn check_seq(
        &self,
        schema: &Schema,
        node: &Spanned<Node>,
        items: &[Spanned<Node>],
        path: &str,
        fields: Fields,
    ) -> Checked {
        let count = items.len();
        if let Some(max) = schema.max_items.filter(|max| count > *max) {
            let rule = Rule::MaxItems { count, max };
            return Err(violation(&node.referenced, path, rule));
        }
        if let Some(min) = schema.min_items.filter(|min| count < *min) {
            let rule = Rule::MinItems { count, min };
            return Err(violation(&node.referenced, path, rule));
        }
        let Some(item_schema) = &schema.items else {
            return Ok(());
        };
        for (i, item) in items.iter().enumerate() {
            self.check(item_schema, item, &format!("{path}[{i}]"), fields)?;
        }
        Ok(())
    }

    fn check_enum(&self, schema: &Schema, node: &Spanned<Node>, path: &str) -> Checked {
        if schema.enum_values.is_empty() || node.value.is_null() {
            return Ok(());
        }
        let value = node.value.to_json();
        if schema
            .enum_values
            .iter()
            .any(|allowed| same_json(allowed, &value))
        {
            return Ok(());
        }
        let rule = Rule::Enum {
            value,
            allowed: schema.enum_values.clone(),
        };
        Err(violation(&node.referenced, path, rule))
    }

    fn check_str(&self, schema: &Schema, node: &Spanned<Node>, text: &str, path: &str) -> Checked {
        let fail = |rule: Rule| Err(violation(&node.referenced, path, rule));
        // An enum says everything a pattern or length would; its message is the useful one
        // (`check_enum`, next).
        if !schema.enum_values.is_empty() {
            return Ok(());
        }
        if let Some(pattern) = schema.pattern.as_ref().filter(|p| !p.is_match(text)) {
            return fail(Rule::Pattern {
                value: text.to_owned(),
                pattern: pattern.as_str().to_owned(),
            });
        }
        let chars = text.chars().count();
        if let Some(min) = schema.min_length.filter(|min| chars < *min) {
            return fail(Rule::MinLength {
                value: text.to_owned(),
                min,
            });
        }
        if let Some(max) = schema.max_length.filter(|max| chars > *max) {
            return fail(Rule::MaxLength {
                value: text.to_owned(),
                max,
            });
        }
        Ok(())
    }

    fn check_number(
        &self,
        schema: &Schema,
        node: &Spanned<Node>,
        value: f64,
        path: &str,
    ) -> Checked {
        let fail = |rule: Rule| Err(violation(&node.referenced, path, rule));
        if let Some(min) = schema.minimum {
            let exclusive = schema.exclusive_minimum;
            if value < min || (exclusive && value == min) {
                return fail(Rule::Minimum {
                    value,
                    min,
                    exclusive,
                });
            }
        }
        if let Some(max) = schema.maximum {
            let exclusive = schema.exclusive_maximum;
            if value > max || (exclusive && value == max) {
                return fail(Rule::Maximum {
                    value,
                    max,
                    exclusive,
                });
            }
        }
        if let Some(factor) = schema.multiple_of.filter(|f| *f != 0.0) {
            if (value / factor).fract() != 0.0 {
                return fail(Rule::MultipleOf { value, factor });
            }
        }
        Ok(())
    }

    fn matches(&self, schema: &Schema, node: &Spanned<Node>, path: &str) -> bool {
        self.check(schema, node, path, Fields::Open).is_ok()
    }

    fn check_junctions(&self, schema: &Schema, node: &Spanned<Node>, path: &str) -> Checked {
        if !schema.one_of.is_empty() {
            self.check_one_of(&schema.one_of, node, path)?;
        }
        for branch in &schema.all_of {
            self.check(branch, node, path, Fields::Open)?;
        }
        if !schema.any_of.is_empty() && !schema.any_of.iter().any(|b| self.matches(b, node, path)) {
            return Err(violation(&node.referenced, path, Rule::AnyOf));
        }
        if let Some(not) = &schema.not {
            if self.matches(not, node, path) {
                return Err(violation(&node.referenced, path, Rule::Not));
            }
        }
        Ok(())
    }

    /// The CRDs use `oneOf` over mappings to say which fields go together, each branch
    /// requiring some fields (`interval`, `threshold` and one of `iterations`, `stepWeight`,
    /// `stepWeights`). The message names fields rather than branches.
    fn check_one_of(&self, branches: &[Schema], node: &Spanned<Node>, path: &str) -> Checked {
        let results: Vec<Checked> = branches
            .iter()
            .map(|branch| self.check(branch, node, path, Fields::Open))
            .collect();
        let matched = results.iter().filter(|r| r.is_ok()).count();
        if matched == 1 {
            return Ok(());
        }
        let one_of = |message: String| Rule::OneOf {
            object: path.to_owned(),
            matched,
            message,
        };
        let Node::Map(entries) = &node.value else {
            let message = format!("expected exactly one of {} allowed forms", branches.len());
            return Err(violation(&node.referenced, path, one_of(message)));
        };

        // Fields every branch requires are simply required; the others tell branches apart.
        let common: Vec<&str> = branches[0]
            .required
            .iter()
            .map(String::as_str)
            .filter(|r| branches.iter().all(|b| b.required.iter().any(|o| o == r)))
            .collect();
        let own = |branch: &Schema| -> Vec<String> {
            branch
                .required
                .iter()
                .filter(|r| !common.contains(&r.as_str()))
                .cloned()
                .collect()
        };
        let mut choices: Vec<String> = Vec::new();
        for name in branches.iter().flat_map(own) {
            if !choices.contains(&name) {
                choices.push(name);
            }
        }
        let choice_list = backticked(&choices);

        if matched == 0 {
            if let Some(missing) = common.iter().find(|r| !node.value.has_field(r)) {
                let rule = Rule::Required {
                    name: (*missing).to_owned(),
                };
                return Err(violation(&node.referenced, &join(path, missing), rule));
            }
            // A branch whose fields are all there failed on something deeper: say what.
            let chosen = branches.iter().zip(&results).find(|(branch, _)| {
                let own = own(branch);
                !own.is_empty() && branch.required.iter().all(|r| node.value.has_field(r))
            });
            if let Some((_, Err(deeper))) = chosen {
                return Err(deeper.clone());
            }
            let message = format!("missing one of {choice_list}");
            return Err(violation(&node.referenced, path, one_of(message)));
        }

        // More than one branch fits: the fields that tell them apart clash.
        let clashing: Vec<&Spanned<String>> = entries
            .iter()
            .filter(|(key, value)| !value.value.is_null() && choices.contains(&key.value))
            .map(|(key, _)| key)
            .collect();
        match clashing.as_slice() {
            [earlier @ .., last] if !earlier.is_empty() => {
                let earlier: Vec<String> = earlier.iter().map(|k| k.value.clone()).collect();
                let message = format!(
                    "`{}` cannot be combined with {}; set only one of {choice_list}",
                    last.value,
                    backticked(&earlier)
                );
                let field = join(path, &last.value);
                Err(violation(&last.referenced, &field, one_of(message)))
            }
            _ => {
                let message = format!("set only one of {choice_list}");
                Err(violation(&node.referenced, path, one_of(message)))
            }
        }
    }
}

/// JSON equality with numbers compared by value (`80` is `80.0`), as the API server does.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a, b) {
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn unknown_field_message(name: &str, schema: &Schema) -> String {
    if let Some(near) = nearest(name, schema.property_names()) {
        return format!("unknown field `{name}`, did you mean `{near}`?");
    }
    let known: Vec<String> = schema.property_names().map(str::to_owned).collect();
    if known.is_empty() {
        format!("unknown field `{name}`: this object takes no fields")
    } else {
        format!(
            "unknown field `{name}`, expected one of {}",
            backticked(&known)
        )
    }
}

fn unsupported_value_message(value: &str, allowed: &[String]) -> String {
    let list = allowed
        .iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    // The empty value some enums allow is never a plausible correction.
    let candidates = allowed.iter().map(String::as_str).filter(|v| !v.is_empty());
    match nearest(value, candidates) {
        Some(near) => {
            format!("unsupported value {value:?}, did you mean {near:?}? Supported values: {list}")
        }
        None => format!("unsupported value {value:?}; supported values: {list}"),
    }
}

fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn backticked(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `spec.analysis` + `interval`; keys that would make the dotted path ambiguous are quoted
/// in brackets: `metadata.labels["app.kubernetes.io/name"]`.
fn join(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{key:?}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO: &str = include_str!("../../../tests/fixtures/flagger/istio-canary.yaml");
    const LINKERD: &str = include_str!("../../../tests/fixtures/flagger/linkerd-canary.yaml");
    const LINKERD_STEPS: &str =
        include_str!("../../../tests/fixtures/flagger/linkerd-canary-steps.yaml");
    const PAYMENT: &str = include_str!("../../../tests/fixtures/seed/flagger-payment-service.yaml");
    const WEB_APP: &str = include_str!("../../../tests/fixtures/seed/flagger-web-app.yaml");

    /// The payment-service canary with its analysis block replaced by `analysis`.
    fn canary_with_analysis(analysis: &str) -> String {
        format!(
            "apiVersion: flagger.app/v1beta1
kind: Canary
metadata:
  name: payment-service
spec:
  targetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: payment-service
  service:
    port: 8080
  analysis:
{analysis}"
        )
    }

    fn canary_error(text: &str) -> SpecError {
        validate_flagger("c.yaml", text, FlaggerKind::Canary).unwrap_err()
    }

    #[test]
    fn every_crd_loads_and_the_embedded_copy_only_differs_in_indentation() {
        for kind in FlaggerKind::ALL {
            assert!(schema_for(kind).property("spec").is_some(), "{kind}");
        }
        let fixture = include_str!("../../../tests/fixtures/flagger/crd.yaml");
        let words = |text: &'static str| text.split_whitespace().collect::<Vec<_>>();
        assert_eq!(words(FLAGGER_CRDS), words(fixture));
    }

    #[test]
    fn kinds_round_trip() {
        for kind in FlaggerKind::ALL {
            assert_eq!(FlaggerKind::from_kind(kind.as_str()), Some(kind));
        }
        assert_eq!(FlaggerKind::from_kind("canary"), None);
        assert_eq!(FlaggerKind::from_kind("Deployment"), None);
    }

    #[test]
    fn the_example_canaries_validate() {
        for (name, text) in [
            ("istio-canary.yaml", ISTIO),
            ("linkerd-canary.yaml", LINKERD),
            ("linkerd-canary-steps.yaml", LINKERD_STEPS),
            ("flagger-payment-service.yaml", PAYMENT),
            ("flagger-web-app.yaml", WEB_APP),
        ] {
            if let Err(e) = validate_flagger(name, text, FlaggerKind::Canary) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn a_misspelt_field_is_located_and_the_right_one_suggested() {
        let text = canary_with_analysis(
            "    interval: 2m
    threshold: 3
    stepWieght: 10
",
        );
        let err = canary_error(&text);
        assert_eq!((err.line, err.column), (15, 5), "{err}");
        assert_eq!(err.field, "spec.analysis.stepWieght");
        assert_eq!(
            err.message,
            "unknown field `stepWieght`, did you mean `stepWeight`?"
        );
        assert_eq!(
            err.to_string(),
            "c.yaml:15:5: spec.analysis.stepWieght: unknown field `stepWieght`, did you mean `stepWeight`?"
        );
    }

    #[test]
    fn an_unknown_field_with_no_near_name_lists_the_known_ones() {
        let text = canary_with_analysis(
            "    interval: 2m
    threshold: 3
    stepWeight: 10
    metrics:
      - name: request-success-rate
        colour: red
",
        );
        let err = canary_error(&text);
        assert_eq!((err.line, err.column), (18, 9), "{err}");
        assert_eq!(err.field, "spec.analysis.metrics[0].colour");
        assert!(
            err.message.starts_with(
                "unknown field `colour`, expected one of `name`, `interval`, `threshold`,"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_type_names_the_field_and_what_was_found() {
        let text = canary_with_analysis(
            "    interval: 2m
    threshold: lots
    stepWeight: 10
",
        );
        let err = canary_error(&text);
        assert_eq!(err.field, "spec.analysis.threshold");
        assert_eq!((err.line, err.column), (14, 16), "{err}");
        assert_eq!(err.message, "expected number, found string \"lots\"");
    }

    #[test]
    fn numbers_integers_and_int_or_string() {
        let port = |port: &str| {
            let text =
                PAYMENT.replace("port: 8080", &format!("port: 8080\n    targetPort: {port}"));
            validate_flagger("c.yaml", &text, FlaggerKind::Canary)
        };
        assert_eq!(port("9898"), Ok(()));
        assert_eq!(port("http"), Ok(()));
        let err = port("true").unwrap_err();
        assert_eq!(err.field, "spec.service.targetPort");
        assert_eq!(
            err.message,
            "expected integer or string, found boolean true; put it in quotes to make it a string"
        );

        // `number` takes integers and floats; `integer` only whole numbers.
        assert_eq!(
            validate_flagger("c.yaml", PAYMENT, FlaggerKind::Canary),
            Ok(())
        );
        let replicas = |n: &str| {
            let text = ISTIO.replace(
                "    name: podinfo\n  service:",
                &format!("    name: podinfo\n    primaryScalerReplicas:\n      minReplicas: {n}\n  service:"),
            );
            validate_flagger("c.yaml", &text, FlaggerKind::Canary)
        };
        assert_eq!(replicas("2"), Ok(()));
        assert_eq!(replicas("2.0"), Ok(()));
        let err = replicas("2.5").unwrap_err();
        assert_eq!(
            err.field,
            "spec.autoscalerRef.primaryScalerReplicas.minReplicas"
        );
        assert_eq!(err.message, "expected integer, found number 2.5");
        let err = replicas("0").unwrap_err();
        assert_eq!(err.message, "must be at least 1, found 0");
    }

    #[test]
    fn a_bad_enum_value_lists_the_allowed_ones() {
        let text = canary_with_analysis(
            "    interval: 2m
    threshold: 3
    stepWeight: 10
    webhooks:
      - name: load-test
        type: prerollout
        url: http://flagger-loadtester/
",
        );
        let err = canary_error(&text);
        assert_eq!(err.field, "spec.analysis.webhooks[0].type");
        assert_eq!((err.line, err.column), (18, 15), "{err}");
        assert_eq!(
            err.message,
            "unsupported value \"prerollout\", did you mean \"pre-rollout\"? Supported values: \
             \"\", \"confirm-rollout\", \"pre-rollout\", \"rollout\", \"confirm-promotion\", \
             \"post-rollout\", \"event\", \"rollback\", \"confirm-traffic-increase\""
        );

        let err = canary_error(&ISTIO.replace("provider: istio", "provider: envoy"));
        assert_eq!(err.field, "spec.provider");
        assert!(
            err.message
                .starts_with("unsupported value \"envoy\"; supported values: \"apisix\","),
            "{err}"
        );
    }

    #[test]
    fn a_missing_required_field_is_named_at_its_parent() {
        let text = PAYMENT.replace(
            "  targetRef:\n    apiVersion: apps/v1\n    kind: Deployment\n    name: payment-service\n",
            "",
        );
        let err = canary_error(&text);
        assert_eq!(err.field, "spec.targetRef");
        assert_eq!(err.message, "missing required field `targetRef`");
        // `spec:` is on line 6; its mapping starts at `service:` on line 7.
        assert_eq!((err.line, err.column), (7, 3), "{err}");

        let err =
            canary_error(&PAYMENT.replace("    name: payment-service\n  service", "  service"));
        assert_eq!(err.field, "spec.targetRef.name");

        // `null` counts as absent, as in Kubernetes.
        let err = canary_error(&PAYMENT.replace("    port: 8080", "    port: ~"));
        assert_eq!(err.field, "spec.service.port");
    }

    #[test]
    fn analysis_needs_exactly_one_way_to_progress() {
        let err = canary_error(&canary_with_analysis(
            "    interval: 2m\n    threshold: 3\n",
        ));
        assert_eq!(err.field, "spec.analysis");
        assert_eq!(
            err.message,
            "missing one of `iterations`, `stepWeight`, `stepWeights`"
        );
        assert_eq!((err.line, err.column), (13, 5), "{err}");

        let err = canary_error(&canary_with_analysis(
            "    interval: 2m\n    stepWeight: 5\n",
        ));
        assert_eq!(err.field, "spec.analysis.threshold");
        assert_eq!(err.message, "missing required field `threshold`");

        let err = canary_error(&canary_with_analysis(
            "    interval: 2m\n    threshold: 3\n    iterations: 10\n    stepWeight: 5\n",
        ));
        assert_eq!(err.field, "spec.analysis.stepWeight");
        assert_eq!((err.line, err.column), (16, 5), "{err}");
        assert_eq!(
            err.message,
            "`stepWeight` cannot be combined with `iterations`; \
             set only one of `iterations`, `stepWeight`, `stepWeights`"
        );

        let blue_green =
            canary_with_analysis("    interval: 1m\n    threshold: 3\n    iterations: 10\n");
        assert_eq!(
            validate_flagger("c.yaml", &blue_green, FlaggerKind::Canary),
            Ok(())
        );
    }

    #[test]
    fn a_misspelling_is_reported_before_the_field_it_leaves_missing() {
        let text = canary_with_analysis("    interval: 2m\n    threshold: 3\n    stepweight: 5\n");
        let err = canary_error(&text);
        assert_eq!(
            err.message,
            "unknown field `stepweight`, did you mean `stepWeight`?"
        );
    }

    #[test]
    fn match_conditions_take_one_of_exact_prefix_regex() {
        let uri = |condition: &str| {
            ISTIO.replace("        prefix: /\n", &format!("        {condition}\n"))
        };
        assert_eq!(
            validate_flagger("c.yaml", &uri("regex: ^/api"), FlaggerKind::Canary),
            Ok(())
        );
        let err = canary_error(&uri("prefix: /\n        exact: /api"));
        assert_eq!(err.field, "spec.service.match[0].uri.exact");
        assert_eq!(
            err.message,
            "`exact` cannot be combined with `prefix`; set only one of `exact`, `prefix`, `regex`"
        );
    }

    #[test]
    fn a_nested_one_of_reports_the_deeper_mistake() {
        let lb = |body: &str| {
            ISTIO.replace(
                "      tls:\n        mode: DISABLE\n",
                &format!("      loadBalancer:\n{body}"),
            )
        };
        let sticky = lb("        consistentHash:\n          httpHeaderName: x-user\n");
        assert_eq!(
            validate_flagger("c.yaml", &sticky, FlaggerKind::Canary),
            Ok(())
        );
        assert_eq!(
            validate_flagger(
                "c.yaml",
                &lb("        simple: LEAST_REQUEST\n"),
                FlaggerKind::Canary
            ),
            Ok(())
        );
        let err = canary_error(&lb(
            "        consistentHash:\n          httpHeaderName: x-user\n          useSourceIp: true\n",
        ));
        assert_eq!(
            err.field,
            "spec.service.trafficPolicy.loadBalancer.consistentHash.useSourceIp"
        );
        assert!(
            err.message
                .starts_with("`useSourceIp` cannot be combined with `httpHeaderName`"),
            "{err}"
        );
    }

    #[test]
    fn patterns_lengths_and_item_counts() {
        let err = canary_error(&canary_with_analysis(
            "    interval: 1h\n    threshold: 3\n    stepWeight: 5\n",
        ));
        assert_eq!(err.field, "spec.analysis.interval");
        assert_eq!(
            err.message,
            "\"1h\" does not match the pattern ^[0-9]+(m|s)"
        );

        let gateway = |name: &str| {
            ISTIO.replace(
                "    trafficPolicy:",
                &format!("    gatewayRefs:\n    - name: {name}\n      namespace: Istio_System\n    trafficPolicy:"),
            )
        };
        let err = canary_error(&gateway("public"));
        assert_eq!(err.field, "spec.service.gatewayRefs[0].namespace");
        assert!(err.message.contains("does not match the pattern"), "{err}");
        let err = canary_error(&gateway("''"));
        assert_eq!(err.field, "spec.service.gatewayRefs[0].name");
        assert_eq!(err.message, "must have at least 1 character, found 0");
    }

    #[test]
    fn identity_and_metadata_are_checked_like_kubernetes() {
        // Anything goes inside metadata, but it must be a mapping.
        let labelled = PAYMENT.replace(
            "  name: payment-service\nspec",
            "  name: payment-service\n  labels:\n    app.kubernetes.io/name: payment\n  finalizers: [x]\nspec",
        );
        assert_eq!(
            validate_flagger("c.yaml", &labelled, FlaggerKind::Canary),
            Ok(())
        );
        let err = canary_error(
            &PAYMENT.replace("metadata:\n  name: payment-service", "metadata: payment"),
        );
        assert_eq!(err.field, "metadata");
        assert_eq!(err.message, "expected object, found string \"payment\"");

        let err = canary_error(&PAYMENT.replace("kind: Canary", "kind: MetricTemplate"));
        assert_eq!(err.field, "kind");
        assert_eq!(
            err.message,
            "expected \"Canary\", found string \"MetricTemplate\""
        );
        let err = canary_error(&PAYMENT.replace("flagger.app/v1beta1", "flagger.app/v1alpha3"));
        assert_eq!(err.field, "apiVersion");
        let err = canary_error(&PAYMENT.replace("kind: Canary\n", ""));
        assert_eq!(err.message, "missing required field `kind`");

        let err = canary_error(&PAYMENT.replace("spec:", "spce:"));
        assert_eq!(err.message, "unknown field `spce`, did you mean `spec`?");
        assert_eq!((err.line, err.column), (6, 1), "{err}");
    }

    #[test]
    fn string_maps_want_strings_and_quote_keys_in_paths() {
        let text = ISTIO.replace(
            "        cmd: \"hey",
            "        app.kubernetes.io/retries: 3\n        cmd: \"hey",
        );
        let err = canary_error(&text);
        assert_eq!(
            err.field,
            "spec.analysis.webhooks[1].metadata[\"app.kubernetes.io/retries\"]"
        );
        assert_eq!(
            err.message,
            "expected string, found integer 3; put it in quotes to make it a string"
        );
    }

    #[test]
    fn fields_are_located_by_their_path() {
        let at = |field: &str| locate(ISTIO, field);
        assert_eq!(at("kind"), Some((2, 7)));
        assert_eq!(at("spec.analysis.threshold"), Some((40, 16)));
        assert_eq!(at("spec.analysis.metrics[1].name"), Some((48, 13)));
        assert_eq!(
            at("spec.analysis.webhooks[0].metadata[\"cmd\"]"),
            Some((59, 14))
        );
        // What is not there is located at its nearest enclosing value.
        assert_eq!(at("spec.analysis.stepWeights[3]"), at("spec.analysis"));
        assert_eq!(
            at("spec.analysis.metrics[7].name"),
            at("spec.analysis.metrics")
        );
        assert_eq!(at("spec.analysis"), Some((39, 5)));
        assert_eq!(at("spec.analysis.metrics[x]"), None);
        assert_eq!(locate("a: [", "a"), None);

        let text = "metadata:\n  labels:\n    app.kubernetes.io/name: web\n";
        let field = join("metadata.labels", "app.kubernetes.io/name");
        assert_eq!(locate(text, &field), Some((3, 29)));
    }

    #[test]
    fn yaml_syntax_errors_have_a_location() {
        let err = canary_error("apiVersion: flagger.app/v1beta1\nkind: [Canary\n");
        assert!(err.line >= 2, "{err}");
        assert!(err.field.is_empty());
        assert!(!err.message.contains('\n'), "{err}");

        let err = canary_error("apiVersion: a\napiVersion: b\n");
        assert_eq!(err.line, 2, "{err}");
    }

    #[test]
    fn a_prometheus_metric_template_validates() {
        let template = "apiVersion: flagger.app/v1beta1
kind: MetricTemplate
metadata:
  name: error-rate
  namespace: test
spec:
  provider:
    type: prometheus
    address: http://prometheus.monitoring:9090
  query: |
    100 - sum(rate(http_requests_total{status!~\"5.*\"}[{{ interval }}]))
";
        assert_eq!(
            validate_flagger("m.yaml", template, FlaggerKind::MetricTemplate),
            Ok(())
        );

        let err = validate_flagger(
            "m.yaml",
            &template.replace("type: prometheus", "type: promethues"),
            FlaggerKind::MetricTemplate,
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.provider.type");
        assert!(
            err.message.contains("did you mean \"prometheus\"?"),
            "{err}"
        );

        let err = validate_flagger(
            "m.yaml",
            &template.replace("  query: |", "  qurey: |"),
            FlaggerKind::MetricTemplate,
        )
        .unwrap_err();
        assert_eq!(err.message, "unknown field `qurey`, did you mean `query`?");
    }

    #[test]
    fn an_alert_provider_needs_an_address_or_a_secret() {
        let provider = |body: &str| {
            let text = format!(
                "apiVersion: flagger.app/v1beta1\nkind: AlertProvider\nmetadata:\n  name: on-call\nspec:\n  type: slack\n{body}"
            );
            validate_flagger("a.yaml", &text, FlaggerKind::AlertProvider)
        };
        assert_eq!(provider("  address: https://hooks.slack.com/x\n"), Ok(()));
        assert_eq!(provider("  secretRef:\n    name: slack-url\n"), Ok(()));
        let err = provider("  channel: on-call\n").unwrap_err();
        assert_eq!(err.message, "missing one of `address`, `secretRef`");
        let err = provider("  address: https://x\n  secretRef:\n    name: s\n").unwrap_err();
        assert_eq!(err.field, "spec.secretRef");
    }

    /// Every version schema of the CRDs in a multi-document YAML text.
    fn crd_schemas(text: &str) -> Vec<(String, CrdSchema)> {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).unwrap();
        let mut schemas = Vec::new();
        for crd in docs.iter().filter(|d| !d.is_null()) {
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap();
            for version in crd["spec"]["versions"].as_array().unwrap() {
                let at = format!("{kind}/{}", version["name"]);
                let schema = CrdSchema::from_openapi(&version["schema"]["openAPIV3Schema"])
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
                schemas.push((at, schema));
            }
        }
        schemas
    }

    #[test]
    fn the_gateway_api_istio_and_flagger_crds_load_for_json_objects() {
        let mut loaded = 0;
        for text in [
            FLAGGER_CRDS,
            include_str!("../../../tests/fixtures/crds/gateway-api/gateways.yaml"),
            include_str!("../../../tests/fixtures/crds/gateway-api/httproutes.yaml"),
            include_str!("../../../tests/fixtures/crds/gateway-api/grpcroutes.yaml"),
            include_str!("../../../tests/fixtures/crds/gateway-api/gatewayclasses.yaml"),
            include_str!("../../../tests/fixtures/crds/gateway-api/referencegrants.yaml"),
            include_str!("../../../tests/fixtures/crds/istio/networking.yaml"),
        ] {
            loaded += crd_schemas(text).len();
        }
        assert!(loaded >= 12, "{loaded}");
    }

    fn canary_schema() -> CrdSchema {
        crd_schemas(FLAGGER_CRDS)
            .into_iter()
            .find(|(at, _)| at.starts_with("Canary/"))
            .unwrap()
            .1
    }

    fn payment_json() -> serde_json::Value {
        serde_saphyr::from_str(PAYMENT).unwrap()
    }

    #[test]
    fn a_json_object_is_checked_with_the_same_rules_and_api_server_wording() {
        let schema = canary_schema();
        let mut canary = payment_json();
        assert_eq!(schema.validate(&canary), Ok(()));

        canary["spec"]["analysis"]["interval"] = "1x".into();
        let v = schema.validate(&canary).unwrap_err();
        assert_eq!(v.api_field(), "spec.analysis.interval");
        assert_eq!(v.api_reason(), "FieldValueInvalid");
        assert_eq!(
            v.api_message(),
            "Invalid value: \"1x\": spec.analysis.interval in body should match '^[0-9]+(m|s)'"
        );
        // The same violation, in Coalmine's words.
        assert_eq!(
            v.rule.to_string(),
            "\"1x\" does not match the pattern ^[0-9]+(m|s)"
        );

        let mut canary = payment_json();
        canary["spec"]["analysis"]["threshold"] = "lots".into();
        let v = schema.validate(&canary).unwrap_err();
        assert_eq!(
            v.api_message(),
            "Invalid value: \"string\": spec.analysis.threshold in body must be of type number: \"string\""
        );

        let mut canary = payment_json();
        canary["spec"].as_object_mut().unwrap().remove("targetRef");
        let v = schema.validate(&canary).unwrap_err();
        assert_eq!(
            (v.api_field(), v.api_reason()),
            ("spec.targetRef", "FieldValueRequired")
        );
        assert_eq!(v.api_message(), "Required value");

        let mut canary = payment_json();
        canary["spec"]["provider"] = "envoy".into();
        let v = schema.validate(&canary).unwrap_err();
        assert_eq!(v.api_reason(), "FieldValueNotSupported");
        assert!(
            v.api_message()
                .starts_with("Unsupported value: \"envoy\": supported values: \"apisix\""),
            "{}",
            v.api_message()
        );

        let mut canary = payment_json();
        canary["spec"]["analysis"]["iterations"] = 10.into();
        let v = schema.validate(&canary).unwrap_err();
        assert_eq!(v.api_field(), "spec.analysis");
        assert_eq!(
            v.api_message(),
            "Invalid value: \"object\": spec.analysis in body must validate one and only one \
             schema (oneOf). Found 2 valid alternatives"
        );
    }

    #[test]
    fn unknown_fields_are_pruned_and_defaults_filled_in_as_the_api_server_does() {
        let schema = CrdSchema::from_openapi(&serde_json::json!({
            "type": "object",
            "properties": {
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "properties": {
                        "replicas": {"type": "integer", "default": 1},
                        "strategy": {
                            "type": "object",
                            "default": {},
                            "properties": {"kind": {"type": "string", "default": "Canary"}}
                        },
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "steps": {"type": "array", "items": {
                            "type": "object", "properties": {"weight": {"type": "integer"}}
                        }}
                    }
                }
            }
        }))
        .unwrap();
        let mut object = serde_json::json!({
            "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a", "anything": 1},
            "colour": "red",
            "spec": {
                "replicas": null,
                "labels": {"a": "b"},
                "extra": {"free": {"form": true}},
                "steps": [{"weight": 5, "colour": "blue"}],
                "colour": "green"
            }
        });
        let mut pruned = schema.prune(&mut object);
        pruned.sort();
        assert_eq!(pruned, ["colour", "spec.colour", "spec.steps[0].colour"]);
        schema.apply_defaults(&mut object);
        assert_eq!(
            object,
            serde_json::json!({
                "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a", "anything": 1},
                "spec": {
                    "replicas": 1,
                    "strategy": {"kind": "Canary"},
                    "labels": {"a": "b"},
                    "extra": {"free": {"form": true}},
                    "steps": [{"weight": 5}]
                }
            })
        );
        assert_eq!(schema.validate(&object), Ok(()));
    }
}
