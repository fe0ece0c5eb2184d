//! The admin API: read and swap the route table, metrics for Prometheus, stats for the
//! controller, health. It runs on its own thread so it answers even when workers are saturated.

use std::net::TcpListener as StdListener;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::table::{RouteTable, OWNER_HEADER};
use crate::worker::Shared;

#[derive(Clone)]
struct Admin {
    shared: Arc<Shared>,
    /// Serializes read-modify-write of the table so two PUTs cannot lose each other's fields.
    writer: Arc<Mutex<()>>,
}

pub(crate) fn run(listener: StdListener, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded tokio runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("admin listener");
        let app = router(Admin {
            shared,
            writer: Arc::new(Mutex::new(())),
        });
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.changed().await;
            })
            .await;
    });
}

fn router(admin: Admin) -> Router {
    Router::new()
        .route("/routes", get(get_routes).put(put_routes))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(admin)
}

async fn get_routes(State(a): State<Admin>) -> Json<serde_json::Value> {
    Json(a.shared.table.load().to_json())
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// Takes a whole or partial route document; omitted fields keep their values. The new table is
/// swapped in atomically: requests already routed finish where they were sent. A document equal
/// to the current one changes nothing (the controller re-sends its routes every interval).
/// A change sent on behalf of a controller ([`OWNER_HEADER`]) is refused (409) while another
/// controller drives the router.
async fn put_routes(State(a): State<Admin>, headers: HeaderMap, body: Bytes) -> Response {
    let patch: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("body is not JSON: {e}")),
    };
    let writer = match headers.get(OWNER_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(w)) => Some(w),
        Some(Err(_)) => return bad_request(format!("{OWNER_HEADER} is not visible ASCII")),
    };
    let _writer = a.writer.lock().expect("admin writer lock");
    let current = a.shared.table.load_full();
    if let (Some(writer), Some(owner)) = (writer, current.doc.owner.as_deref()) {
        if writer != owner {
            let message = format!(
                "this router is driven by {owner}, so a route change for {writer} is refused: one router carries one rollout. If that controller is gone, free the router with PUT /routes {{\"owner\": null}}"
            );
            return (
                StatusCode::CONFLICT,
                Json(serde_json::json!({ "error": message, "owner": owner })),
            )
                .into_response();
        }
    }
    let doc = match current.doc.patched(&patch) {
        Ok(doc) => doc,
        Err(e) => return bad_request(e.to_string()),
    };
    if let Some(why) = a
        .shared
        .options
        .geo
        .unserved(doc.matches.iter().chain(&doc.preview))
    {
        return bad_request(why);
    }
    if doc == current.doc {
        return Json(current.to_json()).into_response();
    }
    let table = RouteTable::new(doc, current.generation + 1);
    let json = table.to_json();
    tracing::info!(
        generation = table.generation,
        canary_weight = table.doc.canary_weight.percent(),
        "route table swapped"
    );
    a.shared.table.store(Arc::new(table));
    a.shared.metrics.route_swaps.fetch_add(1, Relaxed);
    Json(json).into_response()
}

async fn metrics(State(a): State<Admin>) -> Response {
    let table = a.shared.table.load();
    let weight = if table.doc.canary.is_some() {
        table.doc.canary_weight.percent() / 100.0
    } else {
        0.0
    };
    let text =
        a.shared
            .metrics
            .snapshot()
            .prometheus_text(&a.shared.metrics, weight, table.generation);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn stats(State(a): State<Admin>) -> Response {
    let generation = a.shared.table.load().generation;
    let m = &a.shared.metrics;
    Json(m.snapshot().stats_doc(m, generation)).into_response()
}
