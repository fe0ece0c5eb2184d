//! The fake API server: HTTP routing, the verbs, watches and CRDs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::apply::{self, Part};
use crate::clock;
use crate::crd;
use crate::error::{ApiError, Cause, Subject};
use crate::patch;
use crate::resources::{self, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{key_of, ChangeKind, Store};

/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

/// An API server on 127.0.0.1 (plain HTTP, a free port) serving from memory; stops on drop.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion, for watches to wake on.
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    /// `apiserver_request_total` by verb, resource and subresource, served at `/metrics` as
    /// the real API server does (benchmarks count an operator's requests with it).
    requests: Mutex<std::collections::BTreeMap<(String, String, String), u64>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FakeApiServer {
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut store = Store::new(resources::builtins());
        let namespaces = store.find_type("", "v1", "namespaces").expect("built in");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let namespace =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            create_object(
                &mut store,
                &namespaces,
                "v1",
                namespace,
                "kube-apiserver",
                false,
            )
            .expect("the initial namespaces are valid");
        }
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changes: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            requests: Mutex::new(Default::default()),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A test hook standing for an etcd compaction that left every open watch behind: the
    /// history so far is dropped, so a watch (or a list `continue`) from an older
    /// resourceVersion gets 410 Expired, and every open watch ends with an ERROR event carrying
    /// a 410 Expired `Status`, as a watch that fell out of the API server's window does.
    pub fn compact(&self) {
        let rv = {
            let mut store = self.shared.lock();
            store.compact();
            store.rv
        };
        self.shared.changes.send_replace(rv);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

struct Target {
    rt: Arc<ResourceType>,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    fn api_version(&self) -> String {
        self.rt.api_version(&self.version)
    }

    fn subject<'a>(&'a self, name: &'a str) -> Subject<'a> {
        Subject {
            group: &self.rt.group,
            resource: &self.rt.plural,
            name,
        }
    }
}

struct Request {
    method: Method,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.param(name), Some("true" | "1"))
    }

    /// The field manager of a write: `fieldManager`, else the User-Agent's product, as the API
    /// server defaults it.
    fn manager(&self) -> String {
        if let Some(m) = self.param("fieldManager") {
            return m.to_owned();
        }
        self.headers
            .get(http::header::USER_AGENT)
            .and_then(|ua| ua.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|ua| !ua.is_empty())
            .unwrap_or("unknown")
            .to_owned()
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
    }

    fn dry_run(&self) -> bool {
        self.param("dryRun") == Some("All")
    }
}

async fn handle(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let request = Request {
        method,
        query,
        headers,
        body,
    };
    match route(&shared, uri.path(), &request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (code, axum::Json(value.clone())).into_response()
}

async fn route(shared: &Arc<Shared>, path: &str, request: &Request) -> Result<Response, ApiError> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => {
            return ok(json!({
                "major": "1", "minor": "34", "gitVersion": "v1.34.0-coalmine-fake",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
                "goVersion": "", "compiler": "", "platform": "linux/amd64",
            }))
        }
        ["healthz" | "readyz" | "livez"] => return Ok((StatusCode::OK, "ok").into_response()),
        ["metrics"] => return Ok((StatusCode::OK, request_metrics(shared)).into_response()),
        ["api"] => {
            return ok(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
            }))
        }
        ["apis"] => return ok(resources::group_list(&shared.lock().types)),
        ["apis", group] => {
            let store = shared.lock();
            let list = resources::group_list(&store.types);
            let found = list["groups"]
                .as_array()
                .and_then(|gs| gs.iter().find(|g| g["name"] == *group).cloned());
            return found.map_or(Err(ApiError::no_route()), ok);
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::no_route()),
    };
    if rest.is_empty() {
        let store = shared.lock();
        return resources::resource_list(&store.types, group, version)
            .map_or(Err(ApiError::no_route()), ok);
    }
    let target = resolve(shared, group, version, rest)?;
    count(shared, &target, request);
    dispatch(shared, target, request).await
}

/// The real API server's verb for a request: LIST and WATCH for collections, APPLY for a
/// server-side apply.
fn verb_of(target: &Target, request: &Request) -> &'static str {
    match (&request.method, target.name.is_some()) {
        (&Method::GET, false) if request.flag("watch") => "WATCH",
        (&Method::GET, false) => "LIST",
        (&Method::GET, true) => "GET",
        (&Method::POST, _) => "POST",
        (&Method::PUT, _) => "PUT",
        (&Method::PATCH, _) if content_type(request) == "application/apply-patch+yaml" => "APPLY",
        (&Method::PATCH, _) => "PATCH",
        (&Method::DELETE, _) => "DELETE",
        _ => "OTHER",
    }
}

fn count(shared: &Shared, target: &Target, request: &Request) {
    let key = (
        verb_of(target, request).to_string(),
        target.rt.plural.clone(),
        target.sub.clone().unwrap_or_default(),
    );
    *shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += 1;
}

/// `apiserver_request_total` in Prometheus' text format.
fn request_metrics(shared: &Shared) -> String {
    let mut text = String::from(
        "# HELP apiserver_request_total Counter of apiserver requests broken out for each verb, resource and subresource.\n# TYPE apiserver_request_total counter\n",
    );
    for ((verb, resource, sub), n) in shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        text.push_str(&format!(
            "apiserver_request_total{{resource=\"{resource}\",subresource=\"{sub}\",verb=\"{verb}\"}} {n}\n"
        ));
    }
    text
}

fn resolve(shared: &Shared, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let store = shared.lock();
    let (namespace, plural, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            (Some(ns.to_string()), *plural, tail)
        }
        [plural, tail @ ..] => (None, *plural, tail),
        [] => return Err(ApiError::no_route()),
    };
    let rt = store
        .find_type(group, version, plural)
        .ok_or_else(ApiError::no_route)?;
    let (name, sub) = match tail {
        [] => (None, None),
        [name] => (Some(name.to_string()), None),
        [name, sub] => (Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(ApiError::no_route()),
    };
    let served_sub = match sub.as_deref() {
        None => true,
        Some("status") => rt.status,
        Some("scale") => rt.scale,
        Some(_) => false,
    };
    // A namespaced resource's object needs its namespace; a cluster one takes none.
    let shape_ok = if rt.namespaced {
        namespace.is_some() || name.is_none()
    } else {
        namespace.is_none()
    };
    if !served_sub || !shape_ok {
        return Err(ApiError::no_route());
    }
    Ok(Target {
        rt,
        version: version.to_owned(),
        namespace,
        name,
        sub,
    })
}

async fn dispatch(
    shared: &Arc<Shared>,
    target: Target,
    request: &Request,
) -> Result<Response, ApiError> {
    let method = request.method.clone();
    match (&method, target.name.is_some()) {
        (&Method::GET, false) if request.flag("watch") => start_watch(shared, &target, request),
        (&Method::GET, false) => {
            let list = list(&shared.lock(), &target, request)?;
            Ok(json_response(StatusCode::OK, &list))
        }
        (&Method::GET, true) => {
            let store = shared.lock();
            let object = get(&store, &target)?;
            let object = if target.sub.as_deref() == Some("scale") {
                scale_of(&object)
            } else {
                object
            };
            Ok(json_response(StatusCode::OK, &object))
        }
        (&Method::POST, false) | (&Method::PUT, true) => {
            let body = request.json_body()?;
            let creating = method == Method::POST;
            let (object, warnings) = write(shared, |store| {
                if creating {
                    create(store, &target, body, request)
                } else {
                    update(store, &target, body, request)
                }
            })?;
            let code = if creating {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(with_warnings(json_response(code, &object), &warnings))
        }
        (&Method::PATCH, true) => {
            let (code, object, warnings) = write(shared, |store| patch(store, &target, request))?;
            Ok(with_warnings(json_response(code, &object), &warnings))
        }
        (&Method::DELETE, true) => {
            let response = write(shared, |store| delete(store, &target, request))?;
            Ok(json_response(StatusCode::OK, &response))
        }
        (&Method::DELETE, false) => {
            let response = write(shared, |store| delete_collection(store, &target, request))?;
            Ok(json_response(StatusCode::OK, &response))
        }
        _ => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

/// A change under the store's lock, then watchers woken (a failed change wakes nobody).
fn write<T>(
    shared: &Shared,
    change: impl FnOnce(&mut Store) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let done = change(&mut shared.lock())?;
    notify(shared);
    Ok(done)
}

fn notify(shared: &Shared) {
    let rv = shared.lock().rv;
    shared.changes.send_replace(rv);
}

fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    for warning in warnings {
        let text = format!("299 - {}", Value::from(warning.as_str()));
        if let Ok(value) = http::HeaderValue::from_str(&text) {
            response.headers_mut().append(http::header::WARNING, value);
        }
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Reads

/// The object as served at `version`: the one stored, under that `apiVersion`.
fn served(object: &Value, target: &Target) -> Value {
    let mut object = object.clone();
    object["apiVersion"] = target.api_version().into();
    object["kind"] = target.rt.kind.clone().into();
    object
}

fn get(store: &Store, target: &Target) -> Result<Value, ApiError> {
    let name = target.name.as_deref().unwrap_or_default();
    let key = key_of(&target.rt, target.namespace.as_deref().unwrap_or(""), name);
    store
        .objects
        .get(&key)
        .map(|o| served(o, target))
        .ok_or_else(|| ApiError::not_found(&target.subject(name)))
}

fn selectors(
    target: &Target,
    request: &Request,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    Ok((
        LabelSelector::parse(request.param("labelSelector").unwrap_or(""))?,
        FieldSelector::parse(
            request.param("fieldSelector").unwrap_or(""),
            &target.rt.kind,
        )?,
    ))
}

fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    format!("{rv}\n{namespace}\n{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '\n');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, parts.next()?.to_owned(), parts.next()?.to_owned()))
}

/// A list: selectors, `limit` and `continue`. Pages after the first are read from the current
/// objects (the fake keeps no snapshots) but carry the first page's resourceVersion.
fn list(store: &Store, target: &Target, request: &Request) -> Result<Value, ApiError> {
    let (labels, fields) = selectors(target, request)?;
    let limit: usize = request
        .param("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (rv, after) = match request.param("continue") {
        Some(token) => {
            let (rv, ns, name) = decode_continue(token)
                .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
            if rv < store.oldest {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((ns, name)))
        }
        None => (store.rv, None),
    };
    let matching: Vec<(&crate::store::Key, &Value)> = store
        .list(&target.rt, target.namespace.as_deref())
        .filter(|((_, _, ns, name), _)| {
            after
                .as_ref()
                .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
        })
        .filter(|(_, o)| labels.matches(o) && fields.matches(o))
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .take(limit)
        .map(|(_, o)| served(o, target))
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if matching.len() > page.len() {
        let ((_, _, ns, name), _) = matching[page.len() - 1];
        metadata["continue"] = encode_continue(rv, ns, name).into();
        if labels.is_empty() && request.param("fieldSelector").is_none() {
            metadata["remainingItemCount"] = (matching.len() - page.len()).into();
        }
    }
    Ok(json!({
        "kind": format!("{}List", target.rt.kind),
        "apiVersion": target.api_version(),
        "metadata": metadata,
        "items": page,
    }))
}

/// `autoscaling/v1` `Scale` of a workload.
fn scale_of(object: &Value) -> Value {
    let labels = object["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let metadata = &object["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": metadata["name"], "namespace": metadata["namespace"], "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"],
        },
        "spec": {"replicas": object["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": object["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": labels,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Writes

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// Names are DNS subdomains; namespaces and services are DNS labels.
fn name_causes(rt: &ResourceType, name: &str) -> Vec<Cause> {
    let label = rt.group.is_empty() && matches!(rt.plural.as_str(), "namespaces" | "services");
    let ok = if label {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if ok {
        return Vec::new();
    }
    let rule = if label {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
         and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', \
         regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
    } else {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' \
         or '.', and must start and end with an alphanumeric character (e.g. 'example.com', \
         regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
    };
    vec![Cause {
        reason: "FieldValueInvalid",
        field: "metadata.name".into(),
        message: format!("Invalid value: {}: {rule}", Value::from(name)),
    }]
}

/// What every write of a custom resource goes through, as in the API server: unknown fields
/// pruned (a warning each, or a 400 with `fieldValidation=Strict`), defaults applied, then the
/// schema checked (422 naming the field).
fn admit_custom(
    target: &Target,
    object: &mut Value,
    request: Option<&Request>,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = target.rt.schema(&target.version) else {
        return Ok(Vec::new());
    };
    let pruned = schema.prune(object);
    let strict = request.and_then(|r| r.param("fieldValidation")) == Some("Strict");
    let ignore = request.and_then(|r| r.param("fieldValidation")) == Some("Ignore");
    if strict && !pruned.is_empty() {
        let kind = &target.rt.kind;
        let unknown: Vec<String> = pruned
            .iter()
            .map(|p| format!("unknown field {}", Value::from(p.as_str())))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{kind} in version {:?} cannot be handled as a {kind}: strict decoding error: {}",
            target.version,
            unknown.join(", ")
        )));
    }
    schema.apply_defaults(object);
    if let Err(violation) = schema.validate(object) {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let cause = Cause {
            reason: violation.api_reason(),
            field: violation.api_field().to_owned(),
            message: violation.api_message(),
        };
        return Err(ApiError::invalid(
            &target.rt.kind,
            &target.subject(&name),
            vec![cause],
        ));
    }
    Ok(if ignore {
        Vec::new()
    } else {
        pruned
            .iter()
            .map(|p| format!("unknown field {}", Value::from(p.as_str())))
            .collect()
    })
}

fn list_keys(
    rt: &ResourceType,
    version: &str,
) -> impl Fn(&[String], &[&Value]) -> Option<Vec<String>> {
    let schema = rt.schema(version).map(|_| ());
    let rt_schemas = rt.schemas.clone();
    let version = version.to_owned();
    move |names: &[String], items: &[&Value]| {
        if schema.is_some() {
            let schema = rt_schemas.iter().find(|(v, _)| *v == version)?.1.clone();
            let path: Vec<&str> = names.iter().map(String::as_str).collect();
            match schema.list_type_at(&path) {
                Some(("map", keys)) => Some(keys.to_vec()),
                _ => None,
            }
        } else {
            let field = names.last()?;
            patch::merge_key(field, items).map(|k| vec![k.to_owned()])
        }
    }
}

/// Everything but `metadata` and `status`: what `generation` counts changes of.
fn content(object: &Value) -> Value {
    let mut content = object.clone();
    if let Some(map) = content.as_object_mut() {
        for field in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(field);
        }
    }
    content
}

fn ensure_namespace(store: &Store, target: &Target, namespace: &str) -> Result<(), ApiError> {
    if !target.rt.namespaced {
        return Ok(());
    }
    let key = (
        "".to_owned(),
        "namespaces".to_owned(),
        String::new(),
        namespace.to_owned(),
    );
    match store.objects.get(&key) {
        None => Err(ApiError::not_found(&Subject {
            group: "",
            resource: "namespaces",
            name: namespace,
        })),
        Some(ns) if !ns["metadata"]["deletionTimestamp"].is_null() => Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "{} is forbidden: unable to create new content in namespace {namespace} because \
                 it is being terminated",
                target.rt.plural
            ),
        )),
        Some(_) => Ok(()),
    }
}

fn create(
    store: &mut Store,
    target: &Target,
    mut object: Value,
    request: &Request,
) -> Result<(Value, Vec<String>), ApiError> {
    if target.sub.is_some() {
        return Err(ApiError::method_not_allowed("POST"));
    }
    if !object.is_object() {
        return Err(ApiError::bad_request("the request body must be an object"));
    }
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    if let Some(ns) = &target.namespace {
        match object["metadata"]["namespace"].as_str() {
            Some(given) if !given.is_empty() && given != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on \
                     the request",
                ))
            }
            _ => object["metadata"]["namespace"] = ns.clone().into(),
        }
        ensure_namespace(store, target, ns)?;
    } else if target.rt.namespaced {
        return Err(ApiError::no_route());
    }
    check_identity(target, &object)?;
    let warnings = admit_custom(target, &mut object, Some(request))?;
    let manager = request.manager();
    let created = create_object(
        store,
        &target.rt,
        &target.version,
        object,
        &manager,
        request.dry_run(),
    )?;
    Ok((served(&created, target), warnings))
}

/// `apiVersion` and `kind` in a body must name the resource written to.
fn check_identity(target: &Target, object: &Value) -> Result<(), ApiError> {
    let api_version = target.api_version();
    for (field, expected) in [
        ("apiVersion", api_version.as_str()),
        ("kind", target.rt.kind.as_str()),
    ] {
        if let Some(given) = object[field].as_str() {
            if given != expected {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({}) does not match the expected API version \
                     ({api_version}) or kind ({})",
                    object["apiVersion"].as_str().unwrap_or_default(),
                    object["kind"].as_str().unwrap_or_default()
                )));
            }
        } else if object.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request(format!("{field} must be a string")));
        }
    }
    Ok(())
}

/// Stores a new object: name (or `generateName`), uid, resourceVersion, timestamps,
/// generation, managedFields; status dropped where it is a subresource.
fn create_object(
    store: &mut Store,
    rt: &Arc<ResourceType>,
    version: &str,
    mut object: Value,
    manager: &str,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let api_version = rt.api_version(version);
    object["apiVersion"] = api_version.clone().into();
    object["kind"] = rt.kind.clone().into();
    let metadata = &mut object["metadata"];
    let mut name = metadata["name"].as_str().unwrap_or_default().to_owned();
    if name.is_empty() {
        match metadata["generateName"].as_str() {
            Some(prefix) if !prefix.is_empty() => {
                name = format!("{prefix}{}", clock::name_suffix())
            }
            _ => {
                let subject = Subject {
                    group: &rt.group,
                    resource: &rt.plural,
                    name: "",
                };
                return Err(ApiError::invalid(
                    &rt.kind,
                    &subject,
                    vec![Cause {
                        reason: "FieldValueRequired",
                        field: "metadata.name".into(),
                        message: "Required value: name or generateName is required".into(),
                    }],
                ));
            }
        }
    }
    let subject = Subject {
        group: &rt.group,
        resource: &rt.plural,
        name: &name,
    };
    let causes = name_causes(rt, &name);
    if !causes.is_empty() {
        return Err(ApiError::invalid(&rt.kind, &subject, causes));
    }
    let namespace = metadata["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let key = key_of(rt, &namespace, &name);
    if store.objects.contains_key(&key) {
        return Err(ApiError::already_exists(&subject));
    }
    let now = clock::now_rfc3339();
    let metadata = object["metadata"].as_object_mut().expect("made an object");
    metadata.insert("name".into(), name.clone().into());
    metadata.insert("uid".into(), clock::uuid().into());
    metadata.insert("creationTimestamp".into(), now.clone().into());
    for server_set in [
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "resourceVersion",
        "generation",
        "selfLink",
    ] {
        metadata.remove(server_set);
    }
    if rt.generation {
        metadata.insert("generation".into(), 1.into());
    }
    if rt.status {
        if let Some(map) = object.as_object_mut() {
            map.remove("status");
        }
    }
    if rt.group.is_empty() && rt.plural == "namespaces" {
        object["spec"] = json!({"finalizers": ["kubernetes"]});
        object["status"] = json!({"phase": "Active"});
    }
    if rt.crd.is_none() && rt.plural == "customresourcedefinitions" {
        crd::admit(&mut object, &subject)?;
    }
    if object["metadata"].get("managedFields").is_none() {
        let keys = list_keys(rt, version);
        apply::record_update(
            None,
            &mut object,
            manager,
            &api_version,
            Part::Whole,
            &keys,
            &now,
        );
    }
    crate::builtins::admit_create(store, rt, &subject, &mut object)?;
    if dry_run {
        return Ok(object);
    }
    let rv = store.next_rv();
    object["metadata"]["resourceVersion"] = rv.to_string().into();
    store.objects.insert(key, object.clone());
    store.record(rt, ChangeKind::Added, object.clone(), None);
    if rt.crd.is_none() && rt.plural == "customresourcedefinitions" {
        crd::register(store, &object);
    }
    Ok(object)
}

/// Which part of the object a write may change.
fn part_of(target: &Target) -> Part {
    match (target.rt.status, target.sub.as_deref()) {
        (_, Some("status")) => Part::Status,
        (true, _) => Part::MainWithoutStatus,
        (false, _) => Part::Whole,
    }
}

fn update(
    store: &mut Store,
    target: &Target,
    body: Value,
    request: &Request,
) -> Result<(Value, Vec<String>), ApiError> {
    let name = target.name.clone().unwrap_or_default();
    let old = get(store, target)?;
    if target.sub.as_deref() == Some("scale") {
        let replicas = body["spec"]["replicas"].clone();
        let mut new = old.clone();
        new["spec"]["replicas"] = replicas;
        check_rv(target, &name, &old, &body)?;
        let manager = request.manager();
        let stored = commit(store, target, &old, new, &manager, None, request.dry_run())?;
        return Ok((scale_of(&stored), Vec::new()));
    }
    if !body.is_object() {
        return Err(ApiError::bad_request("the request body must be an object"));
    }
    if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            body["metadata"]["name"].as_str().unwrap_or_default()
        )));
    }
    check_identity(target, &body)?;
    check_rv(target, &name, &old, &body)?;
    let mut new = body;
    let warnings = merge_parts(target, &old, &mut new, Some(request))?;
    let manager = request.manager();
    let stored = commit(store, target, &old, new, &manager, None, request.dry_run())?;
    Ok((served(&stored, target), warnings))
}

/// Optimistic concurrency: a `resourceVersion` in the body must be the current one. Custom
/// resources need one (their strategy forbids unconditional updates); built-ins do not.
fn check_rv(target: &Target, name: &str, old: &Value, body: &Value) -> Result<(), ApiError> {
    match body["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
    {
        Some(rv) if Some(rv) != old["metadata"]["resourceVersion"].as_str() => {
            Err(ApiError::stale(&target.subject(name)))
        }
        None if target.rt.crd.is_some() => Err(ApiError::invalid(
            &target.rt.kind,
            &target.subject(name),
            vec![Cause {
                reason: "FieldValueInvalid",
                field: "metadata.resourceVersion".into(),
                message: "Invalid value: 0x0: must be specified for an update".into(),
            }],
        )),
        _ => Ok(()),
    }
}

/// Carries over what this endpoint may not change (status on the main resource; everything
/// but status on `/status`) and, for custom resources, prunes, defaults and validates.
fn merge_parts(
    target: &Target,
    old: &Value,
    new: &mut Value,
    request: Option<&Request>,
) -> Result<Vec<String>, ApiError> {
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    match part_of(target) {
        Part::Status => {
            let status = new.get("status").cloned();
            let managed = new["metadata"].get("managedFields").cloned();
            *new = old.clone();
            match status {
                Some(status) => new["status"] = status,
                None => {
                    new.as_object_mut().map(|m| m.remove("status"));
                }
            }
            if let Some(managed) = managed {
                new["metadata"]["managedFields"] = managed;
            }
        }
        Part::MainWithoutStatus => match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                new.as_object_mut().map(|m| m.remove("status"));
            }
        },
        Part::Whole => {}
    }
    if target.rt.group.is_empty()
        && target.rt.plural == "namespaces"
        && part_of(target) != Part::Status
    {
        new["status"] = old["status"].clone();
    }
    admit_custom(target, new, request)
}

/// Whether `new` is `old` but for the times in `metadata.managedFields`.
fn unchanged_but_field_times(old: &Value, new: &Value) -> bool {
    let without_times = |object: &Value| {
        let mut object = object.clone();
        if let Some(entries) = object["metadata"]["managedFields"].as_array_mut() {
            for entry in entries {
                if let Some(entry) = entry.as_object_mut() {
                    entry.remove("time");
                }
            }
        }
        object
    };
    new == old || without_times(old) == without_times(new)
}

/// Stores an update of `old` to `new`: identity and server-set metadata kept, generation bumped
/// when content changed, managedFields recorded (unless `applied` already did), finalizer rules;
/// an object being deleted whose finalizers are now empty is deleted.
fn commit(
    store: &mut Store,
    target: &Target,
    old: &Value,
    mut new: Value,
    manager: &str,
    applied: Option<()>,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let name = target.name.clone().unwrap_or_default();
    let subject = target.subject(&name);
    new["apiVersion"] = target.api_version().into();
    new["kind"] = target.rt.kind.clone().into();
    for kept in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(kept) {
            Some(v) => new["metadata"][kept] = v.clone(),
            None => {
                new["metadata"].as_object_mut().map(|m| m.remove(kept));
            }
        }
    }
    let finalizers = |o: &Value| -> Vec<String> {
        o["metadata"]["finalizers"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let deleting = !old["metadata"]["deletionTimestamp"].is_null();
    if deleting {
        let before = finalizers(old);
        if finalizers(&new).iter().any(|f| !before.contains(f)) {
            return Err(ApiError::invalid(
                &target.rt.kind,
                &subject,
                vec![Cause {
                    reason: "FieldValueForbidden",
                    field: "metadata.finalizers".into(),
                    message:
                        "Forbidden: no new finalizers can be added if the object is being deleted"
                            .into(),
                }],
            ));
        }
    }
    if target.rt.generation && content(old) != content(&new) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        new["metadata"]["generation"] = generation.into();
    }
    let now = clock::now_rfc3339();
    if applied.is_none() {
        let keys = list_keys(&target.rt, &target.version);
        new["metadata"]
            .as_object_mut()
            .map(|m| m.remove("managedFields"));
        if let Some(m) = old["metadata"].get("managedFields") {
            new["metadata"]["managedFields"] = m.clone();
        }
        let old_for_fields = old.clone();
        apply::record_update(
            Some(&old_for_fields),
            &mut new,
            manager,
            &target.api_version(),
            part_of(target),
            &keys,
            &now,
        );
    }
    if target.rt.crd.is_none() && target.rt.plural == "customresourcedefinitions" {
        crd::admit(&mut new, &subject)?;
    }
    if part_of(target) != Part::Status {
        crate::builtins::admit_update(&target.rt, &subject, old, &mut new)?;
    }
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    if unchanged_but_field_times(old, &new) {
        // The API server drops a write that changes nothing but managedFields' timestamps (a
        // repeated apply): no new resourceVersion, no watch event.
        return Ok(old.clone());
    }
    if dry_run {
        return Ok(new);
    }
    let namespace = target.namespace.clone().unwrap_or_default();
    let key = key_of(&target.rt, &namespace, &name);
    let rv = store.next_rv();
    new["metadata"]["resourceVersion"] = rv.to_string().into();
    let namespace_pending = target.rt.group.is_empty()
        && target.rt.plural == "namespaces"
        && new["spec"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
    if deleting && finalizers(&new).is_empty() && !namespace_pending {
        store.objects.remove(&key);
        store.record(
            &target.rt,
            ChangeKind::Deleted,
            new.clone(),
            Some(old.clone()),
        );
        return Ok(new);
    }
    store.objects.insert(key, new.clone());
    store.record(
        &target.rt,
        ChangeKind::Modified,
        new.clone(),
        Some(old.clone()),
    );
    if target.rt.crd.is_none() && target.rt.plural == "customresourcedefinitions" {
        crd::register(store, &new);
    }
    Ok(new)
}

fn content_type(request: &Request) -> String {
    request
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

fn patch(
    store: &mut Store,
    target: &Target,
    request: &Request,
) -> Result<(StatusCode, Value, Vec<String>), ApiError> {
    let kind = content_type(request);
    let name = target.name.clone().unwrap_or_default();
    let is_custom = target.rt.crd.is_some();
    if kind == "application/apply-patch+yaml" {
        return server_side_apply(store, target, request);
    }
    let parse = || request.json_body();
    let old = get(store, target)?;
    let base = if target.sub.as_deref() == Some("scale") {
        scale_of(&old)
    } else {
        old.clone()
    };
    let mut patched = base.clone();
    match kind.as_str() {
        "application/merge-patch+json" => patch::merge_patch(&mut patched, &parse()?),
        "application/json-patch+json" => patch::json_patch(&mut patched, &parse()?)?,
        "application/strategic-merge-patch+json" if !is_custom => {
            patch::strategic_merge_patch(&mut patched, &parse()?)?;
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    // A resourceVersion the patch sets is a precondition, as in the API server.
    let patched_rv = patched["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_owned);
    if patched_rv.is_some() && patched_rv.as_deref() != base["metadata"]["resourceVersion"].as_str()
    {
        return Err(ApiError::stale(&target.subject(&name)));
    }
    let manager = request.manager();
    if target.sub.as_deref() == Some("scale") {
        let mut new = old.clone();
        new["spec"]["replicas"] = patched["spec"]["replicas"].clone();
        let stored = commit(store, target, &old, new, &manager, None, request.dry_run())?;
        return Ok((StatusCode::OK, scale_of(&stored), Vec::new()));
    }
    if patched["metadata"]["name"].as_str() != Some(name.as_str()) {
        return Err(ApiError::bad_request(
            "metadata.name cannot be changed by a patch",
        ));
    }
    let warnings = merge_parts(target, &old, &mut patched, Some(request))?;
    let stored = commit(
        store,
        target,
        &old,
        patched,
        &manager,
        None,
        request.dry_run(),
    )?;
    Ok((StatusCode::OK, served(&stored, target), warnings))
}

fn server_side_apply(
    store: &mut Store,
    target: &Target,
    request: &Request,
) -> Result<(StatusCode, Value, Vec<String>), ApiError> {
    let name = target.name.clone().unwrap_or_default();
    let manager = request
        .param("fieldManager")
        .ok_or_else(|| {
            ApiError::bad_request(
                "PATCH, application/apply-patch+yaml requires fieldManager to be set",
            )
        })?
        .to_owned();
    let text = std::str::from_utf8(&request.body)
        .map_err(|_| ApiError::bad_request("the apply body is not UTF-8"))?;
    let mut config: Value = serde_saphyr::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    if !config.is_object() {
        return Err(ApiError::bad_request("the apply body must be an object"));
    }
    if config["apiVersion"].as_str().is_none() || config["kind"].as_str().is_none() {
        return Err(ApiError::bad_request(
            "invalid object type: apiVersion and kind must be set in an applied configuration",
        ));
    }
    check_identity(target, &config)?;
    if config["metadata"]["name"].as_str() != Some(name.as_str()) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            config["metadata"]["name"].as_str().unwrap_or_default()
        )));
    }
    if let Some(ns) = &target.namespace {
        config["metadata"]["namespace"] = ns.clone().into();
    }
    // The configuration is pruned and defaulted like any object, so unknown fields are neither
    // owned nor stored.
    let warnings = admit_custom_config(target, &mut config, request)?;
    let force = request.flag("force");
    let keys = list_keys(&target.rt, &target.version);
    let now = clock::now_rfc3339();
    let api_version = target.api_version();
    let part = part_of(target);
    let existing = get(store, target).ok();
    let applied = apply::apply(
        existing.as_ref(),
        &config,
        &manager,
        force,
        &api_version,
        part,
        &keys,
        &now,
    )
    .map_err(|conflicts| conflict_error(target, &name, &conflicts))?;
    match existing {
        None => {
            if part == Part::Status {
                return Err(ApiError::not_found(&target.subject(&name)));
            }
            let mut object = applied;
            if let Some(ns) = &target.namespace {
                ensure_namespace(store, target, ns)?;
            }
            admit_custom(target, &mut object, None)?;
            let created = create_object(
                store,
                &target.rt,
                &target.version,
                object,
                &manager,
                request.dry_run(),
            )?;
            Ok((StatusCode::CREATED, served(&created, target), warnings))
        }
        Some(old) => {
            let mut new = applied;
            merge_parts(target, &old, &mut new, None)?;
            let stored = commit(
                store,
                target,
                &old,
                new,
                &manager,
                Some(()),
                request.dry_run(),
            )?;
            Ok((StatusCode::OK, served(&stored, target), warnings))
        }
    }
}

/// Prunes and defaults an applied configuration without requiring what only the whole object
/// must have: validation waits for the merged object.
fn admit_custom_config(
    target: &Target,
    config: &mut Value,
    request: &Request,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = target.rt.schema(&target.version) else {
        return Ok(Vec::new());
    };
    let pruned = schema.prune(config);
    if request.param("fieldValidation") == Some("Strict") && !pruned.is_empty() {
        let kind = &target.rt.kind;
        let unknown: Vec<String> = pruned
            .iter()
            .map(|p| format!("unknown field {}", Value::from(p.as_str())))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{kind} in version {:?} cannot be handled as a {kind}: strict decoding error: {}",
            target.version,
            unknown.join(", ")
        )));
    }
    Ok(pruned
        .iter()
        .map(|p| format!("unknown field {}", Value::from(p.as_str())))
        .collect())
}

fn conflict_error(target: &Target, name: &str, conflicts: &apply::Conflicts) -> ApiError {
    let mut by_manager: Vec<(&str, Vec<&str>)> = Vec::new();
    for (manager, field) in &conflicts.0 {
        match by_manager.iter_mut().find(|(m, _)| m == manager) {
            Some((_, fields)) => fields.push(field),
            None => by_manager.push((manager, vec![field])),
        }
    }
    let count = conflicts.0.len();
    let described: Vec<String> = by_manager
        .iter()
        .map(|(manager, fields)| match fields.as_slice() {
            [one] => format!("conflict with {}: {one}", Value::from(*manager)),
            many => format!(
                "conflicts with {}:\n{}",
                Value::from(*manager),
                many.iter()
                    .map(|f| format!("- {f}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        })
        .collect();
    let plural = if count == 1 { "" } else { "s" };
    let causes: Vec<Value> = conflicts
        .0
        .iter()
        .map(|(manager, field)| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {}", Value::from(manager.as_str())),
                "field": field,
            })
        })
        .collect();
    ApiError {
        code: 409,
        reason: "Conflict",
        message: format!(
            "Apply failed with {count} conflict{plural}: {}",
            described.join("\n")
        ),
        details: Some(json!({
            "name": name,
            "group": target.rt.group,
            "kind": target.rt.plural,
            "causes": causes,
        })),
    }
}

fn delete(store: &mut Store, target: &Target, request: &Request) -> Result<Value, ApiError> {
    if target.sub.is_some() {
        return Err(ApiError::method_not_allowed("DELETE"));
    }
    let name = target.name.clone().unwrap_or_default();
    let old = get(store, target)?;
    let options: Value = if request.body.is_empty() {
        json!({})
    } else {
        request.json_body()?
    };
    let preconditions = &options["preconditions"];
    for (field, current) in [
        ("uid", &old["metadata"]["uid"]),
        ("resourceVersion", &old["metadata"]["resourceVersion"]),
    ] {
        if let Some(expected) = preconditions[field].as_str() {
            if Some(expected) != current.as_str() {
                return Err(ApiError::conflict(
                    &target.subject(&name),
                    &format!(
                        "the object has been modified; please apply your changes to the latest \
                         version and try again: Precondition failed: {field}: {expected}, \
                         {field} in object meta: {}",
                        current.as_str().unwrap_or_default()
                    ),
                ));
            }
        }
    }
    if request.dry_run() || options["dryRun"].as_array().is_some_and(|d| !d.is_empty()) {
        return Ok(served(&old, target));
    }
    let namespace = target.namespace.clone().unwrap_or_default();
    let key = key_of(&target.rt, &namespace, &name);
    if !old["metadata"]["deletionTimestamp"].is_null() {
        return Ok(served(&old, target));
    }
    let has_finalizers = old["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    let is_namespace = target.rt.group.is_empty() && target.rt.plural == "namespaces";
    if has_finalizers || is_namespace {
        // Held until the finalizers are removed; nothing here removes them (no controllers).
        let mut new = old.clone();
        new["metadata"]["deletionTimestamp"] = clock::now_rfc3339().into();
        new["metadata"]["deletionGracePeriodSeconds"] = 0.into();
        if is_namespace {
            new["status"]["phase"] = "Terminating".into();
        }
        let rv = store.next_rv();
        new["metadata"]["resourceVersion"] = rv.to_string().into();
        store.objects.insert(key, new.clone());
        store.record(&target.rt, ChangeKind::Modified, new.clone(), Some(old));
        return Ok(served(&new, target));
    }
    if target.rt.crd.is_none() && target.rt.plural == "customresourcedefinitions" {
        crd::unregister(store, &old);
    }
    store.objects.remove(&key);
    let rv = store.next_rv();
    let mut gone = old.clone();
    gone["metadata"]["resourceVersion"] = rv.to_string().into();
    store.record(
        &target.rt,
        ChangeKind::Deleted,
        gone.clone(),
        Some(old.clone()),
    );
    if target.rt.group.is_empty() && target.rt.plural == "pods" {
        return Ok(served(&gone, target));
    }
    Ok(json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": name,
            "group": target.rt.group,
            "kind": target.rt.plural,
            "uid": old["metadata"]["uid"],
        },
    }))
}

fn delete_collection(
    store: &mut Store,
    target: &Target,
    request: &Request,
) -> Result<Value, ApiError> {
    let listed = list(store, target, request)?;
    let mut deleted = Vec::new();
    for item in listed["items"].as_array().cloned().unwrap_or_default() {
        let one = Target {
            rt: target.rt.clone(),
            version: target.version.clone(),
            namespace: item["metadata"]["namespace"].as_str().map(str::to_owned),
            name: item["metadata"]["name"].as_str().map(str::to_owned),
            sub: None,
        };
        let no_options = Request {
            method: Method::DELETE,
            query: request.query.clone(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        delete(store, &one, &no_options)?;
        deleted.push(item);
    }
    Ok(json!({
        "kind": format!("{}List", target.rt.kind),
        "apiVersion": target.api_version(),
        "metadata": {"resourceVersion": store.rv.to_string()},
        "items": deleted,
    }))
}

// ---------------------------------------------------------------------------------------------
// Watch

/// A response body fed by a channel: one watch event per chunk.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn expired_event(from: u64, oldest: u64) -> Bytes {
    let status = ApiError::expired(format!("too old resource version: {from} ({oldest})")).status();
    event_line("ERROR", &status)
}

fn bookmark(target: &Target, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": target.rt.kind, "apiVersion": target.api_version(), "metadata": metadata}),
    )
}

struct WatchSpec {
    target: Target,
    labels: LabelSelector,
    fields: FieldSelector,
    bookmarks: bool,
}

impl WatchSpec {
    fn selects(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }
}

/// `?watch=true`: newline-delimited events. Without a resourceVersion (or with `0`), or with
/// `sendInitialEvents=true`, the current objects come first as ADDED (the latter closed by a
/// BOOKMARK annotated `k8s.io/initial-events-end`); from a resourceVersion, the changes after
/// it, or one ERROR event with a 410 Expired `Status` when it is older than the history kept.
fn start_watch(
    shared: &Arc<Shared>,
    target: &Target,
    request: &Request,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(target, request)?;
    let spec = WatchSpec {
        target: Target {
            rt: target.rt.clone(),
            version: target.version.clone(),
            namespace: target.namespace.clone(),
            name: None,
            sub: None,
        },
        labels,
        fields,
        bookmarks: request.flag("allowWatchBookmarks"),
    };
    let send_initial = request.flag("sendInitialEvents");
    if send_initial && request.param("resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiError::invalid(
            "WatchList",
            &target.subject(""),
            vec![Cause {
                reason: "FieldValueForbidden",
                field: "resourceVersionMatch".into(),
                message: "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan".into(),
            }],
        ));
    }
    let timeout = request
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let requested_rv = request.param("resourceVersion").map(str::to_owned);

    let (sender, receiver) = mpsc::channel::<Bytes>(256);
    let mut initial = Vec::new();
    let (mut position, epoch) = {
        let store = shared.lock();
        let from_now = send_initial || matches!(requested_rv.as_deref(), None | Some("0"));
        if from_now {
            for (_, object) in store.list(&spec.target.rt, spec.target.namespace.as_deref()) {
                if spec.selects(object) {
                    initial.push(event_line("ADDED", &served(object, &spec.target)));
                }
            }
            if send_initial {
                initial.push(bookmark(&spec.target, store.rv, true));
            }
            (store.rv, store.epoch)
        } else {
            let from: u64 = requested_rv
                .as_deref()
                .and_then(|rv| rv.parse().ok())
                .ok_or_else(|| ApiError::bad_request("resourceVersion is not a number"))?;
            if from < store.oldest {
                initial.push(expired_event(from, store.oldest));
                (u64::MAX, store.epoch)
            } else {
                (from, store.epoch)
            }
        }
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        for line in initial {
            if sender.send(line).await.is_err() {
                return;
            }
        }
        if position == u64::MAX {
            return;
        }
        let mut changes = shared.changes.subscribe();
        let mut shutdown = shared.shutdown.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (lines, expired) = {
                let store = shared.lock();
                if store.epoch != epoch || position < store.oldest {
                    (vec![expired_event(position, store.oldest)], true)
                } else {
                    let mut lines = Vec::new();
                    let from = position;
                    for change in store.history.iter().filter(|c| c.rv > from) {
                        position = change.rv;
                        if let Some(line) = watch_line(&spec, change) {
                            lines.push(line);
                        }
                    }
                    position = position.max(store.rv);
                    (lines, false)
                }
            };
            for line in lines {
                if sender.send(line).await.is_err() {
                    return;
                }
            }
            if expired {
                return;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(BOOKMARK_EVERY), if spec.bookmarks => {
                    if sender.send(bookmark(&spec.target, position, false)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = shutdown.changed() => return,
            }
        }
    });
    let body = Body::new(ChannelBody(receiver));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .expect("a valid response"))
}

fn watch_line(spec: &WatchSpec, change: &crate::store::Change) -> Option<Bytes> {
    let target = &spec.target;
    if !target.rt.same_resource(&change.group, &change.plural) {
        return None;
    }
    if target
        .namespace
        .as_deref()
        .is_some_and(|ns| ns != change.namespace)
    {
        return None;
    }
    let now = spec.selects(&change.object);
    let before = change.old.as_ref().is_some_and(|o| spec.selects(o));
    let kind = match change.kind {
        ChangeKind::Added if now => "ADDED",
        ChangeKind::Modified if now && before => "MODIFIED",
        ChangeKind::Modified if now => "ADDED",
        ChangeKind::Modified if before => "DELETED",
        ChangeKind::Deleted if before || now => "DELETED",
        _ => return None,
    };
    Some(event_line(kind, &served(&change.object, target)))
}
