//! Mirroring: a copy of a stable-bound request goes to the canary, fire-and-forget. The user's
//! answer never waits for it, copies beyond the worker's concurrency limit are dropped, and the
//! canary's answers are counted apart (they judge a dark launch). Only requests without a body
//! are copied: a body would have to be buffered whole. Both request paths mirror through here.

use std::time::Instant;

use http::HeaderValue;

use crate::hyper_path::{exchange_bodyless, ClientBody, OwnedAnswer};
use crate::recorder::ServiceId;
use crate::rewrite::{is_idempotent, write_upstream_head};
use crate::table::{HeaderChanges, UpstreamUrl};
use crate::worker::{ClientInfo, Worker};

/// Sends a copy of a bodyless request head (made by `copy` only once a slot is free) to the
/// canary.
pub(crate) fn copy_to_canary(
    worker: &Worker,
    client: &ClientInfo,
    (service, changes): (ServiceId, &HeaderChanges),
    canary: &UpstreamUrl,
    copy: impl FnOnce() -> Option<http::request::Parts>,
) {
    let Ok(permit) = worker.mirror_slots.clone().try_acquire_owned() else {
        worker.recorder.record_mirror_dropped(service);
        return;
    };
    let Some(mut parts) = copy() else {
        return;
    };
    parts
        .headers
        .insert("x-coalmine-mirror", HeaderValue::from_static("true"));
    let mut head = Vec::with_capacity(512);
    write_upstream_head(&parts, client, false, changes, &mut head);
    let head_method = parts.method == http::Method::HEAD;
    let idempotent = is_idempotent(parts.method.as_str());
    let recorder = worker.recorder.clone();
    let options = worker.shared.options.clone();
    let canary = canary.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let started = Instant::now();
        let sent = tokio::time::timeout(
            options.response_timeout,
            exchange_bodyless(&canary, &head, head_method, idempotent, &options, || {}),
        );
        match sent.await {
            Ok(Ok((parts, resp, up))) => {
                recorder.record_mirror(service, Some((parts.status.as_u16(), started.elapsed())));
                let answer =
                    OwnedAnswer::new(up, canary.id(), resp, None, options.response_timeout);
                let _ = http_body_util::BodyExt::collect(ClientBody::Owned(answer)).await;
            }
            _ => recorder.record_mirror(service, None),
        }
    });
}

/// A request picked for mirroring that is not copied because it carries a body.
pub(crate) fn skipped_with_body(worker: &Worker, service: ServiceId) {
    worker.recorder.record_mirror_skipped_body(service);
}
