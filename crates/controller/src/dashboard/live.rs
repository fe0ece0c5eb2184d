//! What the dashboard watches: each rollout's row as the list shows it, the series of its
//! current run (one point per saved step) and a broadcast of every change, pushed to the
//! pages over Server-Sent Events.
//!
//! The series is kept in memory for the runs this process drives (bounded per rollout); the
//! state file keeps the status and the events, which a restarted daemon shows again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use coalmine_judge::{Reading, Verdict};
use coalmine_rollout::{Event, Status};
use coalmine_spec::rollout::Rollout;

use crate::report::{event_json, holding_message, Held};
use crate::time::rfc3339;

/// Points kept per rollout: an hour of one-second samples. Older ones are thinned, not
/// dropped, so a long run still shows its start.
const MAX_POINTS: usize = 3600;

/// Changes queued per page before it is sent a fresh snapshot instead.
const CHANNEL_CAPACITY: usize = 4096;

/// One saved step as the charts draw it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// Milliseconds since the Unix epoch.
    t: u64,
    weight: f64,
    phase: &'static str,
    /// The sequential judges' running totals (requests and failures per version), from which
    /// the page draws each interval's failure rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    totals: Option<[u64; 4]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_bayes_factor: Option<f64>,
    /// Per judged quantile: [quantile, canary ms, stable ms, canary lower, canary upper,
    /// stable lower, stable upper] (null where unknown).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    quantiles: Vec<[Option<f64>; 7]>,
    /// Readings taken at this step: [check, value or null, verdict].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    readings: Vec<(String, Option<f64>, &'static str)>,
}

fn point(status: &Status, now_ms: u64, previous: Option<&Status>) -> Point {
    let evidence = status.sequential.as_ref().map(|s| s.evidence());
    let readings = status
        .metrics
        .iter()
        .filter(|m| {
            // A reading is new when its time differs from the one the last step showed.
            previous.is_none_or(|p| {
                !p.metrics
                    .iter()
                    .any(|old| old.name == m.name && old.time_ms == m.time_ms)
            })
        })
        .map(|m| {
            let value = match m.reading {
                Reading::Value { value } if value.is_finite() => Some(value),
                _ => None,
            };
            let verdict = match m.verdict {
                Verdict::Pass => "pass",
                Verdict::Fail { .. } => "fail",
                Verdict::Inconclusive { .. } => "inconclusive",
            };
            (m.name.clone(), value, verdict)
        })
        .collect();
    Point {
        t: now_ms,
        weight: status.canary_weight.percent(),
        phase: status.phase.as_str(),
        totals: evidence.as_ref().map(|e| {
            let t = &e.errors.totals;
            [
                t.canary_requests,
                t.canary_failures,
                t.stable_requests,
                t.stable_failures,
            ]
        }),
        log_bayes_factor: evidence
            .as_ref()
            .map(|e| e.errors.log_bayes_factor)
            .filter(|v| v.is_finite()),
        quantiles: evidence
            .as_ref()
            .map(|e| {
                e.latency
                    .quantiles
                    .iter()
                    .map(|q| {
                        [
                            Some(q.quantile),
                            q.canary_ms,
                            q.stable_ms,
                            q.canary_lower_ms,
                            q.canary_upper_ms,
                            q.stable_lower_ms,
                            q.stable_upper_ms,
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default(),
        readings,
    }
}

/// A rollout's row in the list; `key` names it in the dashboard's URLs (`namespace/name` on
/// Kubernetes).
pub fn row(key: &str, rollout: &Rollout, status: &Status, last_event: Option<&Event>) -> Value {
    let (event_message, event_time) = match last_event {
        Some(e) => (e.message.as_str(), e.time_ms),
        None => (status.message.as_str(), status.last_transition_ms),
    };
    json!({
        "key": key,
        "name": rollout.metadata.name,
        "namespace": rollout.metadata.namespace,
        "service": rollout.spec.router_service(),
        "group": rollout.group(),
        "phase": status.phase.as_str(),
        "canaryWeight": status.canary_weight.percent(),
        "paused": status.paused,
        "startedAt": rfc3339(status.started_ms),
        "startedMs": status.started_ms,
        // Set once the run ended: the page shows how long it took rather than a running clock.
        "endedMs": status.outcome.map(|_| status.last_transition_ms),
        "lastEvent": event_message,
        "lastEventMs": event_time,
    })
}

/// A row of a rollout whose last step could not be saved: `held` says so (the list and the
/// page show it before the last event, which is older than the trouble).
pub fn with_held(mut row: Value, held: Option<&Held>) -> Value {
    if let Some(held) = held {
        row["held"] = json!(holding_message(held));
    }
    row
}

struct Series {
    run: i64,
    points: VecDeque<Point>,
    last_status: Option<Status>,
    last_event: Option<Event>,
}

/// One change, as sent to every page.
#[derive(Debug, Clone)]
pub enum Change {
    /// A rollout's row changed; `point` and `events` belong to its current run.
    Rollout {
        name: String,
        run: i64,
        row: Value,
        point: Option<Value>,
        events: Vec<Value>,
    },
    Deleted {
        name: String,
    },
    /// A `RolloutGroup`'s row changed (its phase, or one of its members).
    Group {
        name: String,
        row: Value,
    },
    /// A `RolloutGroup` was deleted (its members stay).
    GroupDeleted {
        name: String,
    },
}

impl Change {
    pub fn json(&self) -> Value {
        match self {
            Change::Rollout {
                name,
                run,
                row,
                point,
                events,
            } => {
                json!({"type": "rollout", "key": name, "run": run, "row": row, "point": point, "events": events})
            }
            Change::Deleted { name } => json!({"type": "deleted", "key": name}),
            Change::Group { name, row } => json!({"type": "group", "key": name, "row": row}),
            Change::GroupDeleted { name } => json!({"type": "groupDeleted", "key": name}),
        }
    }
}

pub struct Live {
    series: Mutex<HashMap<String, Series>>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Set when the server shuts down: the pages' streams end, or a graceful shutdown would
    /// wait for them for ever.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            series: Mutex::new(HashMap::new()),
            changes: broadcast::channel(CHANNEL_CAPACITY).0,
            closing: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Live {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Ends every page's stream, now and from now on.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Live::close`] has been called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closed| *closed).await;
        }
    }

    /// A saved step of run `run` of the rollout `key`: its point goes on the rollout's series
    /// (a new run starts a new one) and every page hears of it.
    pub fn saved(
        &self,
        key: &str,
        rollout: &Rollout,
        run: i64,
        status: &Status,
        events: &[Event],
        now_ms: u64,
    ) {
        let name = key.to_string();
        let (point, last_event) = {
            let mut all = self.series.lock().expect("series");
            let series = all.entry(name.clone()).or_insert_with(|| Series {
                run,
                points: VecDeque::new(),
                last_status: None,
                last_event: None,
            });
            if series.run != run {
                *series = Series {
                    run,
                    points: VecDeque::new(),
                    last_status: None,
                    last_event: None,
                };
            }
            let point = point(status, now_ms, series.last_status.as_ref());
            if series.points.len() >= MAX_POINTS {
                thin(&mut series.points);
            }
            series.points.push_back(point.clone());
            series.last_status = Some(status.clone());
            if let Some(e) = events.last() {
                series.last_event = Some(e.clone());
            }
            (point, series.last_event.clone())
        };
        let change = Change::Rollout {
            row: row(key, rollout, status, last_event.as_ref()),
            point: Some(serde_json::to_value(point).expect("a point serializes")),
            events: events
                .iter()
                .map(|e| event_json(&rollout.metadata.name, Some(run), e))
                .collect(),
            name,
            run,
        };
        // No page listening is fine.
        let _ = self.changes.send(Arc::new(change));
    }

    /// A step of run `run` that could not be saved: the rollout holds at `status` (the last
    /// one saved), and every page hears of it.
    pub fn held(&self, key: &str, rollout: &Rollout, run: i64, status: &Status, held: &Held) {
        let row = with_held(
            row(key, rollout, status, self.last_event(key, run).as_ref()),
            Some(held),
        );
        let _ = self.changes.send(Arc::new(Change::Rollout {
            name: key.to_string(),
            run,
            row,
            point: None,
            events: Vec::new(),
        }));
    }

    pub fn deleted(&self, name: &str) {
        self.series.lock().expect("series").remove(name);
        let _ = self.changes.send(Arc::new(Change::Deleted {
            name: name.to_string(),
        }));
    }

    /// A group's row changed: every page hears of it.
    pub fn group(&self, name: &str, row: Value) {
        let _ = self.changes.send(Arc::new(Change::Group {
            name: name.to_string(),
            row,
        }));
    }

    /// A group was deleted: every page drops its row.
    pub fn group_deleted(&self, name: &str) {
        let _ = self.changes.send(Arc::new(Change::GroupDeleted {
            name: name.to_string(),
        }));
    }

    /// The series of a rollout's run, oldest first (empty when this process saw no step of it).
    pub fn points(&self, name: &str, run: i64) -> Vec<Point> {
        self.series
            .lock()
            .expect("series")
            .get(name)
            .filter(|s| s.run == run)
            .map(|s| s.points.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The last event this process saw of a rollout's run.
    pub fn last_event(&self, name: &str, run: i64) -> Option<Event> {
        self.series
            .lock()
            .expect("series")
            .get(name)
            .filter(|s| s.run == run)
            .and_then(|s| s.last_event.clone())
    }
}

/// Halves the older half of a full series (every other point goes), keeping the newest half
/// whole: the charts keep the run's shape from its start at a coarser grain.
fn thin(points: &mut VecDeque<Point>) {
    let half = points.len() / 2;
    let mut i = 0usize;
    points.retain(|_| {
        let keep = i >= half || i.is_multiple_of(2);
        i += 1;
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64) -> Point {
        Point {
            t,
            weight: 0.0,
            phase: "Progressing",
            totals: None,
            log_bayes_factor: None,
            quantiles: Vec::new(),
            readings: Vec::new(),
        }
    }

    #[test]
    fn a_full_series_keeps_its_first_point_and_its_newest_half() {
        let mut points: VecDeque<Point> = (0..MAX_POINTS as u64).map(at).collect();
        thin(&mut points);
        assert_eq!(points.len(), MAX_POINTS / 2 + MAX_POINTS / 4);
        assert_eq!(points.front().unwrap().t, 0, "the run's start stays");
        let newest: Vec<u64> = points
            .iter()
            .rev()
            .take(MAX_POINTS / 2)
            .map(|p| p.t)
            .collect();
        assert_eq!(newest[0], MAX_POINTS as u64 - 1);
        assert!(
            newest.windows(2).all(|w| w[0] == w[1] + 1),
            "the newest half is whole"
        );
    }
}
