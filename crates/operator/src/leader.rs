//! One leader among the operator's replicas, through a `coordination.k8s.io/v1` Lease, as
//! client-go's leader election does it: the holder renews the lease before it expires; another
//! replica takes it only once it has gone a lease duration without a renewal *it saw* (its own
//! clock, not the holder's: skew between nodes cannot depose a live leader); every write carries the
//! `resourceVersion` it read, so of two replicas racing for it the API server accepts one (the
//! other gets 409 Conflict). A leader that cannot renew within its deadline stops leading before
//! the lease can expire — two operators never drive one release.
//!
//! [`decide`] is the pure rule; [`Elector`] is its edge.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// How long a lease holds and how the holder keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long others wait, after the last renewal they saw, before taking over.
    pub lease_duration: Duration,
    /// The holder stops leading if it has not renewed within this (< lease_duration).
    pub renew_deadline: Duration,
    /// How often a replica tries: the holder to renew, the others to acquire.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    /// client-go's defaults are 15 s / 10 s / 2 s; a canary controller that is gone for 15 s
    /// leaves a canary unwatched that long, so shorter: a takeover within 8–10 s.
    fn default() -> Self {
        LeaseTimings {
            lease_duration: Duration::from_secs(8),
            renew_deadline: Duration::from_secs(6),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a replica does about the lease it read.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No lease yet: create it, held by us.
    Create(Lease),
    /// Ours, or expired: write it back held by us (with the read `resourceVersion`).
    Acquire(Lease),
    /// Someone else holds it until then.
    Wait { holder: String, until: Timestamp },
}

/// The rule, on the lease as read (`None`: there is none) at `now`. `unchanged_since` is when
/// this replica first saw the lease's current record (holder and renew time): as in client-go,
/// a lease expires a duration after *this replica* last saw it change, never by comparing the
/// holder's clock with ours, so a holder whose clock runs behind is not deposed while it renews.
pub fn decide(
    current: Option<&Lease>,
    name: &str,
    namespace: &str,
    identity: &str,
    timings: LeaseTimings,
    now: Timestamp,
    unchanged_since: Timestamp,
) -> Decision {
    let duration_secs = i32::try_from(timings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(lease) = current else {
        return Decision::Create(Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_string()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        });
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == identity;
    // The holder's terms (the duration it wrote), counted on our clock from when we saw its
    // last renewal.
    let held_for = Duration::from_secs(
        u64::try_from(spec.lease_duration_seconds.unwrap_or(duration_secs)).unwrap_or(0),
    );
    let expires = unchanged_since.checked_add(held_for).ok();
    let free = holder.is_empty() || expires.is_none_or(|e| e <= now);
    if !ours && !free {
        return Decision::Wait {
            holder,
            until: expires.unwrap_or(now),
        };
    }
    let mut next = lease.clone();
    let transitions = spec.lease_transitions.unwrap_or(0);
    next.spec = Some(LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(duration_secs),
        acquire_time: if ours {
            spec.acquire_time
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        ..spec
    });
    Decision::Acquire(next)
}

/// Tries for, and keeps, one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    timings: LeaseTimings,
    /// The lease record (holder, renew time) last seen, and when it was first seen so.
    observed: std::sync::Mutex<Option<(String, Timestamp)>>,
}

/// Why a try did not end with us holding the lease.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("the API server did not answer about lease {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Elector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: LeaseTimings,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            namespace: namespace.to_string(),
            identity: identity.to_string(),
            timings,
            observed: std::sync::Mutex::new(None),
        }
    }

    /// When this replica first saw the lease as it is now (`now` if it just changed).
    fn unchanged_since(&self, lease: Option<&Lease>, now: Timestamp) -> Timestamp {
        let record = lease
            .and_then(|l| l.spec.as_ref())
            .map(|s| format!("{:?}|{:?}", s.holder_identity, s.renew_time))
            .unwrap_or_default();
        let mut observed = self.observed.lock().expect("observed lock");
        match observed.as_ref() {
            Some((seen, since)) if *seen == record => *since,
            _ => {
                *observed = Some((record, now));
                now
            }
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timings(&self) -> LeaseTimings {
        self.timings
    }

    /// One try at `now`: `Ok(None)` when we hold the lease now (created, renewed or taken
    /// over), `Ok(Some(holder))` when another does (including losing a race: 409).
    pub async fn try_once(&self, now: Timestamp) -> Result<Option<String>, ElectionError> {
        let api_error = |source| ElectionError::Api {
            name: self.name.clone(),
            source,
        };
        let current = self.api.get_opt(&self.name).await.map_err(api_error)?;
        let decision = decide(
            current.as_ref(),
            &self.name,
            &self.namespace,
            &self.identity,
            self.timings,
            now,
            self.unchanged_since(current.as_ref(), now),
        );
        let written = match decision {
            Decision::Wait { holder, .. } => return Ok(Some(holder)),
            Decision::Create(lease) => self.api.create(&PostParams::default(), &lease).await,
            Decision::Acquire(lease) => {
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(None),
            // Another replica wrote first (AlreadyExists on create, Conflict on replace).
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let holder = self
                    .api
                    .get_opt(&self.name)
                    .await
                    .map_err(api_error)?
                    .and_then(|l| l.spec?.holder_identity)
                    .unwrap_or_default();
                Ok(Some(holder))
            }
            Err(e) => Err(api_error(e)),
        }
    }

    /// Gives the lease up (on a clean shutdown) so another replica takes over at once rather
    /// than after the lease expires.
    pub async fn release(&self) -> Result<(), ElectionError> {
        let api_error = |source| ElectionError::Api {
            name: self.name.clone(),
            source,
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(api_error)? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        // A conflict means someone else already took it: nothing of ours to give up.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(api_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(T0 + secs).unwrap()
    }

    /// At `secs`, having seen the lease as it is since `seen`.
    fn decide_seen(current: Option<&Lease>, who: &str, secs: i64, seen: i64) -> Decision {
        decide(
            current,
            "coalmine-operator",
            "coalmine-system",
            who,
            LeaseTimings::default(),
            at(secs),
            at(seen),
        )
    }

    fn decide_at(current: Option<&Lease>, who: &str, secs: i64) -> Decision {
        decide_seen(current, who, secs, secs)
    }

    fn held(decision: Decision) -> Lease {
        match decision {
            Decision::Create(l) | Decision::Acquire(l) => l,
            Decision::Wait { holder, .. } => panic!("waits for {holder}"),
        }
    }

    #[test]
    fn the_first_replica_creates_the_lease_and_renews_it() {
        let lease = held(decide_at(None, "a", 0));
        let spec = lease.spec.clone().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(8));
        assert_eq!(lease.metadata.namespace.as_deref(), Some("coalmine-system"));
        let renewed = held(decide_at(Some(&lease), "a", 3)).spec.unwrap();
        assert_eq!(renewed.renew_time, Some(MicroTime(at(3))));
        assert_eq!(
            renewed.acquire_time,
            Some(MicroTime(at(0))),
            "still the same term"
        );
        assert_eq!(renewed.lease_transitions, Some(0));
    }

    #[test]
    fn another_replica_waits_a_lease_duration_after_it_last_saw_a_renewal() {
        let lease = held(decide_at(None, "a", 0));
        assert_eq!(
            decide_seen(Some(&lease), "b", 7, 0),
            Decision::Wait {
                holder: "a".into(),
                until: at(8)
            }
        );
        // The holder's clock is not ours: a renewal stamped an hour ago (its clock behind),
        // just seen, holds the lease a full duration.
        let mut skewed = lease.clone();
        skewed.spec.as_mut().unwrap().renew_time = Some(MicroTime(at(-3600)));
        assert!(matches!(
            decide_seen(Some(&skewed), "b", 7, 7),
            Decision::Wait { .. }
        ));
        let taken = held(decide_seen(Some(&lease), "b", 8, 0)).spec.unwrap();
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(8))));
        assert_eq!(taken.lease_transitions, Some(1));
        // A holder that wrote a longer duration is waited for that long.
        let mut long = lease.clone();
        long.spec.as_mut().unwrap().lease_duration_seconds = Some(30);
        assert!(matches!(
            decide_at(Some(&long), "b", 20),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut lease = held(decide_at(None, "a", 0));
        lease.spec.as_mut().unwrap().holder_identity = None;
        let taken = held(decide_at(Some(&lease), "b", 1)).spec.unwrap();
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
    }
}
