//! The admin API: read and swap the route table, metrics for Prometheus, stats for the
//! controller, health. It runs on its own thread so it answers even when workers are saturated.

use std::net::TcpListener as StdListener;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::table::{
    check_service_name, Invalid, RouteTable, RoutesDoc, ServiceTable, DEFAULT_SERVICE, OWNER_HEADER,
};
use crate::worker::Shared;

#[derive(Clone)]
struct Admin {
    shared: Arc<Shared>,
}

pub(crate) fn run(listener: StdListener, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded tokio runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("admin listener");
        let app = router(Admin { shared });
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.changed().await;
            })
            .await;
    });
}

fn router(admin: Admin) -> Router {
    Router::new()
        .route("/routes", get(get_routes).put(put_default))
        .route(
            "/routes/{service}",
            get(get_service).put(put_service).delete(delete_service),
        )
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .route("/stats/{service}", get(service_stats))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(admin)
}

/// The whole table: every service, and the default one's fields at the top.
async fn get_routes(State(a): State<Admin>) -> Json<serde_json::Value> {
    Json(a.shared.table.load().to_json())
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn bad_request(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

fn no_such_service(service: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("this router has no service {service:?} (GET /routes lists them)"),
    )
}

async fn get_service(State(a): State<Admin>, Path(service): Path<String>) -> Response {
    let table = a.shared.table.load();
    match table.service(&service) {
        Some(s) => Json(table.service_json(s)).into_response(),
        None => no_such_service(&service),
    }
}

/// `PUT /routes`: the default service's, as before there were services.
async fn put_default(State(a): State<Admin>, headers: HeaderMap, body: Bytes) -> Response {
    change_service(&a, DEFAULT_SERVICE, &headers, &body)
}

async fn put_service(
    State(a): State<Admin>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    change_service(&a, &service, &headers, &body)
}

/// Who a change is sent on behalf of ([`OWNER_HEADER`]), if anyone.
fn writer(headers: &HeaderMap) -> Result<Option<&str>, Invalid> {
    match headers.get(OWNER_HEADER).map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(w)) => Ok(Some(w)),
        Some(Err(_)) => Err(Invalid(format!("{OWNER_HEADER} is not visible ASCII"))),
    }
}

/// 409 when a change for `writer` meets a service another controller drives.
fn refused_for_another_owner(service: &ServiceTable, writer: Option<&str>) -> Option<Response> {
    let (writer, owner) = (writer?, service.doc.owner.as_deref()?);
    if writer == owner {
        return None;
    }
    let name = &service.doc.service;
    let path = if name == DEFAULT_SERVICE {
        "/routes".to_string()
    } else {
        format!("/routes/{name}")
    };
    let message = format!(
        "service {name:?} of this router is driven by {owner}, so a route change for {writer} is refused: one service carries one rollout. If that controller is gone, free the service with PUT {path} {{\"owner\": null}}"
    );
    Some(
        (
            StatusCode::CONFLICT,
            Json(serde_json::json!({ "error": message, "owner": owner, "service": name })),
        )
            .into_response(),
    )
}

/// Takes a whole or partial route document for one service; omitted fields keep their values.
/// A service the table does not have is added at its end, from a whole document (not on behalf
/// of a controller: controllers drive services, people and config files make them). The new
/// table is swapped in atomically: requests already routed finish where they were sent. A
/// document equal to the current one changes nothing (the controller re-sends its routes every
/// interval). A change sent on behalf of a controller ([`OWNER_HEADER`]) is refused (409)
/// while another controller drives the service.
fn change_service(a: &Admin, service: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let patch: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("body is not JSON: {e}")),
    };
    let writer = match writer(headers) {
        Ok(w) => w,
        Err(e) => return bad_request(e.0),
    };
    if let Some(refused) = written_elsewhere(a) {
        return refused;
    }
    let _writer = a.shared.writer.lock().expect("route table writer lock");
    let current = a.shared.table.load_full();
    let doc = match current.service(service) {
        Some(existing) => {
            if let Some(refused) = refused_for_another_owner(existing, writer) {
                return refused;
            }
            match existing.doc.patched(&patch) {
                Ok(doc) if doc == existing.doc => {
                    return Json(current.service_json(existing)).into_response()
                }
                Ok(doc) => doc,
                Err(e) => return bad_request(e.to_string()),
            }
        }
        None if writer.is_some() => return no_such_service(service),
        None => {
            if let Err(e) = check_service_name(service) {
                return bad_request(e.to_string());
            }
            match RoutesDoc::created(service, &patch) {
                Ok(doc) => doc,
                Err(e) => return bad_request(e.to_string()),
            }
        }
    };
    if let Some(why) = a
        .shared
        .options
        .geo
        .unserved(doc.matches.iter().chain(&doc.preview))
    {
        return bad_request(why);
    }
    if doc.service != service {
        return bad_request(format!(
            "service: the path names service {service:?}, the document {:?}; a service is renamed by adding it under its new name and deleting the old one",
            doc.service
        ));
    }
    let mut docs = current.docs();
    match docs.iter_mut().find(|d| d.service == service) {
        Some(slot) => *slot = doc,
        None => docs.push(doc),
    }
    match swap(a, &current, docs) {
        Ok(table) => {
            let changed = table.service(service).expect("the service just put");
            tracing::info!(
                generation = table.generation,
                service,
                canary_weight = changed.doc.canary_weight.percent(),
                "route table swapped"
            );
            Json(table.service_json(changed)).into_response()
        }
        Err(e) => bad_request(e.0),
    }
}

/// Removes a service: its requests are then no service's (404) unless another takes them. Its
/// counters stay. Refused (409) on behalf of a controller while another drives it.
async fn delete_service(
    State(a): State<Admin>,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Response {
    let writer = match writer(&headers) {
        Ok(w) => w,
        Err(e) => return bad_request(e.0),
    };
    if let Some(refused) = written_elsewhere(&a) {
        return refused;
    }
    let _writer = a.shared.writer.lock().expect("route table writer lock");
    let current = a.shared.table.load_full();
    let Some(existing) = current.service(&service) else {
        return no_such_service(&service);
    };
    if let Some(refused) = refused_for_another_owner(existing, writer) {
        return refused;
    }
    let docs = current
        .docs()
        .into_iter()
        .filter(|d| d.service != service)
        .collect();
    match swap(&a, &current, docs) {
        Ok(table) => {
            tracing::info!(generation = table.generation, service, "service deleted");
            Json(table.to_json()).into_response()
        }
        Err(e) => bad_request(e.0),
    }
}

/// Compiles and swaps in the next table (under the writer lock).
fn swap(a: &Admin, current: &RouteTable, docs: Vec<RoutesDoc>) -> Result<Arc<RouteTable>, Invalid> {
    a.shared.swap(current, docs)
}

/// Ready for traffic: 503 until a router whose table is written elsewhere (Gateway API mode)
/// has had it written once, so a new router pod gets no user before it knows their routes.
async fn readyz(State(a): State<Admin>) -> Response {
    if a.shared.ready() {
        "ok\n".into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the route table has not been programmed yet".into(),
        )
    }
}

/// Refuses (409) a change through the API when something else writes the table.
fn written_elsewhere(a: &Admin) -> Option<Response> {
    let by = a.shared.options.routes_written_by.as_ref()?;
    Some(error(
        StatusCode::CONFLICT,
        format!("this router's routes are written by {by}; change them there"),
    ))
}

async fn metrics(State(a): State<Admin>) -> Response {
    let table = a.shared.table.load();
    let text = a
        .shared
        .metrics
        .snapshot(table.services.iter().map(|s| s.doc.service.as_str()))
        .prometheus_text(&a.shared.metrics, &table);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The default service's counts at the top (what single-service readers read), every
/// service's in `services`.
async fn stats(State(a): State<Admin>) -> Response {
    let table = a.shared.table.load();
    let m = &a.shared.metrics;
    let names = table.services.iter().map(|s| s.doc.service.as_str());
    let snapshot = m.snapshot(names.chain([DEFAULT_SERVICE]));
    Json(snapshot.stats_doc(m, table.generation, DEFAULT_SERVICE, true)).into_response()
}

/// One service's counts: of a service in the table, or one that was and counted something.
async fn service_stats(State(a): State<Admin>, Path(service): Path<String>) -> Response {
    let table = a.shared.table.load();
    let m = &a.shared.metrics;
    let in_table = table.service(&service).is_some();
    let snapshot = m.service_snapshot(&service, in_table);
    if !snapshot.services.contains_key(&service) {
        return no_such_service(&service);
    }
    Json(snapshot.stats_doc(m, table.generation, &service, false)).into_response()
}
