//! Mirroring: a copy of a stable-bound request goes to the canary, fire-and-forget. The user's
//! answer never waits for it, copies beyond the worker's concurrency limit are dropped, and the
//! canary's answers are counted apart (they judge a dark launch). Only requests without a body
//! are copied: a body would have to be buffered whole; and only safe methods' (GET, HEAD,
//! OPTIONS, TRACE): a canary and its stable share their data, so a copy of a `POST /orders/7/ship`
//! would ship it twice, and a late copy of a `DELETE` could delete what the user made since.
//! Both request paths mirror through here.
//!
//! Each copy sent is paired with the user's answer to the same request: a [`PairSlot`] shared
//! by the two sides, completed by whichever answers second, which counts the pair
//! ([`crate::recorder::Recorder::record_pair`]). No lock, and nothing allocated for a request
//! that is not mirrored.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::hyper_path::{exchange_bodyless, ClientBody, OwnedAnswer};
use crate::recorder::{Recorder, ServiceId};
use crate::rewrite::{is_idempotent, write_upstream_head};
use crate::table::{HeaderChanges, UpstreamUrl};
use crate::upstream::{ExchangeError, UpstreamError};
use crate::worker::{ClientInfo, Worker};

/// One mirrored request's two answers, each written once by its own side.
struct PairSlot {
    service: ServiceId,
    /// Index 0 the user's answer (stable's), 1 the canary's copy's: [`encode`]d.
    sides: [AtomicU64; 2],
    /// Sides done so far: the one that makes it 2 counts the pair.
    done: AtomicU8,
}

/// A side that failed on the router's or the client's account.
const NOBODYS: u64 = u64::MAX;

/// A status and a time until the head in one word: the status in the top 16 bits, the
/// microseconds (capped at 2^48, some 8 years) below.
fn encode(status: u16, took: Duration) -> u64 {
    let micros = took.as_micros().min((1 << 48) - 1) as u64;
    (u64::from(status) << 48) | micros
}

fn decode(word: u64) -> Option<(u16, Duration)> {
    (word != NOBODYS).then(|| {
        (
            (word >> 48) as u16,
            Duration::from_micros(word & ((1 << 48) - 1)),
        )
    })
}

/// One side of a mirrored request's pair. Dropped unanswered (the client went away, the
/// router failed on its own account, the request was handed on), it makes the pair nobody's:
/// a version is never judged on a failure that was not its own.
pub(crate) struct PairSide {
    slot: Arc<PairSlot>,
    side: usize,
    recorder: Arc<Recorder>,
}

impl PairSide {
    /// Both sides of a new pair: the user's (stable's) and the canary's copy's.
    fn new(service: ServiceId, recorder: &Arc<Recorder>) -> (PairSide, PairSide) {
        let slot = Arc::new(PairSlot {
            service,
            sides: [AtomicU64::new(NOBODYS), AtomicU64::new(NOBODYS)],
            done: AtomicU8::new(0),
        });
        let side = |side| PairSide {
            slot: slot.clone(),
            side,
            recorder: recorder.clone(),
        };
        (side(0), side(1))
    }

    /// This side's answer: its status (a version's 502/504 included) and the time until its
    /// head.
    pub(crate) fn answered(self, status: u16, took: Duration) {
        self.slot.sides[self.side].store(encode(status, took), Ordering::Relaxed);
        // Dropping completes it.
    }

    /// This side got no answer: the version's failure, unless the router's own.
    pub(crate) fn failed(self, e: &UpstreamError, took: Duration) {
        if e.local.is_none() {
            self.answered(e.status().as_u16(), took);
        }
    }
}

impl Drop for PairSide {
    fn drop(&mut self) {
        // AcqRel: the second side sees the first side's answer.
        if self.slot.done.fetch_add(1, Ordering::AcqRel) == 1 {
            let [stable, canary] = &self.slot.sides;
            self.recorder.record_pair(
                self.slot.service,
                decode(stable.load(Ordering::Relaxed)),
                decode(canary.load(Ordering::Relaxed)),
            );
        }
    }
}

/// Sends a copy of a bodyless request head (made by `copy` only once a slot is free) to the
/// canary; the user's side of the pair when a copy went.
pub(crate) fn copy_to_canary(
    worker: &Worker,
    client: &ClientInfo,
    (service, changes): (ServiceId, &HeaderChanges),
    canary: &UpstreamUrl,
    copy: impl FnOnce() -> Option<http::request::Parts>,
) -> Option<PairSide> {
    let Ok(permit) = worker.mirror_slots.clone().try_acquire_owned() else {
        worker.recorder.record_mirror_dropped(service);
        return None;
    };
    let mut parts = copy()?;
    let (stable_side, canary_side) = PairSide::new(service, &worker.recorder);
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
                let took = started.elapsed();
                recorder.record_mirror(service, Some((parts.status.as_u16(), took)));
                canary_side.answered(parts.status.as_u16(), took);
                let answer =
                    OwnedAnswer::new(up, canary.id(), resp, None, options.response_timeout);
                let _ = http_body_util::BodyExt::collect(ClientBody::Owned(answer)).await;
            }
            Ok(Err(ExchangeError::Upstream(e))) => {
                copy_failed(&recorder, service, canary_side, &e, started.elapsed());
            }
            Err(_) => {
                recorder.record_mirror(service, None);
                canary_side.answered(504, started.elapsed());
            }
            // Nobody's (the pair unpaired as `canary_side` drops), and no copy of the canary's.
            Ok(Err(ExchangeError::Client(_))) => {}
        }
    });
    Some(stable_side)
}

/// A copy that got no answer. A failed copy counts as the canary's failure in every check of
/// a dark launch (its metrics too, not only its pairs), so one that failed on the router's own
/// account (out of descriptors) is counted as the router's, as a user's request is: the
/// canary never saw it.
fn copy_failed(
    recorder: &Recorder,
    service: ServiceId,
    canary_side: PairSide,
    e: &UpstreamError,
    took: Duration,
) {
    match e.local {
        Some(own) => recorder.record_local_failure(own),
        None => recorder.record_mirror(service, None),
    }
    canary_side.failed(e, took);
}

/// A request picked for mirroring that is not copied because it carries a body.
pub(crate) fn skipped_with_body(worker: &Worker, service: ServiceId) {
    worker.recorder.record_mirror_skipped_body(service);
}

/// Whether a request of `method` may be copied: RFC 9110's safe methods only (see above).
pub(crate) fn may_copy(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE")
}

/// A request picked for mirroring that is not copied because its method is not safe.
pub(crate) fn skipped_unsafe_method(worker: &Worker, service: ServiceId) {
    worker.recorder.record_mirror_skipped_method(service);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::Metrics;
    use crate::upstream::UpstreamError;

    #[test]
    fn a_pair_is_counted_once_by_its_second_side_and_a_routers_failure_blames_nobody() {
        let m = Metrics::new("i".into(), 0);
        let r = m.new_recorder();
        let service = m.service_id("default").unwrap();
        let ms = Duration::from_millis;
        let outcomes = || m.snapshot([]).services["default"].mirror.pairs.clone();

        // The canary answers first; nothing is counted until stable has answered too.
        let (stable, canary) = PairSide::new(service, &r);
        canary.answered(500, ms(4));
        assert!(!m.snapshot([]).services.contains_key("default"));
        stable.answered(200, ms(3));
        assert_eq!(outcomes().outcomes, [[0, 1], [0, 0]]);

        // A version that gave no answer failed (502/504); the router's own failure is nobody's.
        let (stable, canary) = PairSide::new(service, &r);
        canary.failed(
            &UpstreamError::timed_out(crate::upstream::TimedOut::Answer),
            ms(9),
        );
        stable.answered(200, ms(3));
        assert_eq!(outcomes().outcomes, [[0, 2], [0, 0]]);
        let (stable, canary) = PairSide::new(service, &r);
        let mut own = UpstreamError::protocol("out of descriptors");
        own.local = Some(crate::recorder::LocalFailure::Resources);
        canary.failed(&own, ms(1));
        stable.answered(200, ms(3));
        // The client went away before stable's answer was counted: dropped unanswered.
        let (stable, canary) = PairSide::new(service, &r);
        drop(stable);
        canary.answered(200, ms(2));
        let p = outcomes();
        assert_eq!(p.outcomes, [[0, 2], [0, 0]]);
        assert_eq!(p.unpaired, 2);
    }

    #[test]
    fn a_copy_the_router_failed_on_its_own_account_is_not_the_canarys_failure() {
        let m = Metrics::new("i".into(), 0);
        let r = m.new_recorder();
        let service = m.service_id("default").unwrap();
        let mut own = UpstreamError::protocol("out of descriptors");
        own.local = Some(crate::recorder::LocalFailure::Resources);
        let (stable, canary) = PairSide::new(service, &r);
        copy_failed(&r, service, canary, &own, Duration::from_millis(1));
        stable.answered(200, Duration::from_millis(3));
        let s = m.snapshot([]);
        assert_eq!(s.local_failures["resources"], 1, "the router's own");
        let mirror = &s.services["default"].mirror;
        assert_eq!(
            mirror.failed, 0,
            "not a failed copy: the canary never saw it"
        );
        assert_eq!(mirror.pairs.unpaired, 1);

        // The canary refusing the connection is its own failure.
        let (stable, canary) = PairSide::new(service, &r);
        let refused = UpstreamError::new(
            crate::recorder::UpstreamFailure::Connect,
            "connection refused",
        );
        copy_failed(&r, service, canary, &refused, Duration::from_millis(1));
        stable.answered(200, Duration::from_millis(3));
        let mirror = m.snapshot([]).services.remove("default").unwrap().mirror;
        assert_eq!(mirror.failed, 1);
        assert_eq!(mirror.pairs.outcomes, [[0, 1], [0, 0]]);
    }

    #[test]
    fn a_sides_answer_fits_one_word() {
        let took = Duration::from_micros(123_456);
        assert_eq!(decode(encode(503, took)), Some((503, took)));
        assert_eq!(decode(NOBODYS), None);
    }
}
