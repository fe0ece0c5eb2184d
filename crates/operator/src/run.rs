//! `coalmine operator`: leads through the Lease, watches Rollouts (kube-runtime's controller: a
//! watch and a cache, no polling lists) and drives each run with the controller's own driver
//! through the Kubernetes seams. A replica that loses the lease stops at once (the process ends
//! and is restarted as a follower): two operators never drive one release.
//!
//! It runs `coalmine.dev` Rollouts (and Flagger's Canaries, as Rollouts) with provider
//! `kubernetes` (replicas) or `coalmine` (Coalmine's routers in the cluster), tracking the
//! target's ConfigMaps and Secrets and copying its autoscaler as Flagger does.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coalmine_controller::driver::{Driver, Seams};
use coalmine_controller::observations::{ObservationSource, ObserveError, Sample};
use coalmine_controller::state::StateStore;
use coalmine_controller::time::Clock;
use coalmine_controller::traffic::TrafficBackend;
use coalmine_controller::BoxFuture;
use coalmine_rollout::{EventLevel, Gate, Input, Status, TrafficFault};
use coalmine_spec::rollout::Target;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::WatchStreamExt;
use kube::runtime::{watcher, Controller};
use kube::Resource;
use std::hash::{Hash, Hasher};
use tokio::task::JoinHandle;

use crate::canaries::Origin;
use crate::crd::{Rollout, TrafficProvider};
use crate::events::Recorder;
use crate::flagger::Canary;
use crate::health::Health;
use crate::leader::{Elector, LeaseTimings};
use crate::next::{next, Next, Seen};
use crate::requests::{removal, request_of, Request, REQUEST_ANNOTATION};
use crate::seams::configs::ConfigTracker;
use crate::seams::gateway_api::GatewayApiRoutes;
use crate::seams::ingress::NginxCanaryIngress;
use crate::seams::istio::IstioRoutes;
use crate::seams::replicas::ReplicaRatio;
use crate::seams::routed::{ObjectsBackend, RouteSpec, Routed, ALL_ON_PRIMARY};
use crate::seams::routers::{locate, LocateError};
use crate::seams::status_store::RolloutStatusStore;
use crate::seams::workloads::{Apex, Workloads, WorkloadsSpec};
use crate::templates::ResolveError;
use crate::workload::{
    primary_name, spec_hash, ServicePortSpec, Workload, DEFAULT_READY_THRESHOLD,
};

/// How one operator replica runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    /// This replica's name in the Lease and in Events (the pod's name in a cluster).
    pub identity: String,
    pub lease_namespace: String,
    pub lease_name: String,
    pub timings: LeaseTimings,
    /// What `/healthz`, `/readyz` and `/metrics` report (see [`crate::health`]).
    pub health: Arc<Health>,
    /// The provider of Canaries that name none (Flagger's `-mesh-provider`).
    pub default_provider: TrafficProvider,
    /// The Prometheus of rollouts that name none (Flagger's `-metrics-server`).
    pub metrics_server: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("lost the lease to {0}: stopping so that one operator drives each release")]
    LostLease(String),
    #[error("the lease could not be renewed for {0:?}: stopping so that one operator drives each release")]
    RenewalFailed(Duration),
}

/// Why one reconcile did not finish (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Traffic(#[from] TrafficFault),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// What the reconcilers share: the client, and the runs they drive.
pub(crate) struct Context {
    pub(crate) client: kube::Client,
    /// Events about rollouts the reconciler (not a run) has to say something of.
    recorder: Recorder,
    health: Arc<Health>,
    /// This replica, in Events.
    pub(crate) identity: String,
    /// The operator as a whole, in the claims on what it drives: its lease, which every replica
    /// shares, so the replica that takes over drives on what the dead one claimed, while
    /// another operator (another lease) is refused.
    controller: String,
    runs: Mutex<HashMap<String, Run>>,
    /// Finished runs whose final traffic this process has put in place, or is putting: one
    /// whose operator went before it landed (a router out of reach at the end, then a restart
    /// or another leader) is settled again by the next reconcile.
    finals: Mutex<HashMap<String, FinalTraffic>>,
    /// The Rollouts as the controller's watch last saw them.
    cache: std::sync::OnceLock<Store<Rollout>>,
    /// The provider of Canaries that name none.
    pub(crate) default_provider: TrafficProvider,
    /// The Prometheus of rollouts that name none.
    pub(crate) metrics_server: String,
}

impl Context {
    /// The command channel of the run in progress for `key` (`namespace/name`), if any: what
    /// users ask and what its group decides go through it, and the run saves each before
    /// any traffic moves.
    pub(crate) fn commands_of(&self, key: &str) -> Option<tokio::sync::mpsc::Sender<Input>> {
        self.runs
            .lock()
            .expect("runs lock")
            .get(key)
            .filter(|run| !run.task.is_finished())
            .map(|run| run.commands.clone())
    }
}

/// Where a finished run's final traffic stands in this process.
enum FinalTraffic {
    /// A task is carrying it (until it lands, is refused, or the rollout goes).
    Settling(JoinHandle<()>),
    /// In place (or refused, said in an Event): nothing more to do for this run.
    Landed,
}

/// One release being driven: its task, and the way to tell it what users ask.
struct Run {
    task: JoinHandle<()>,
    commands: tokio::sync::mpsc::Sender<Input>,
    /// Whether it was last told to pause (`spec.suspend`).
    suspended: bool,
    /// The revision (spec hash) it is for.
    revision: String,
}

/// Provider `kubernetes` has no per-version counts (one Service in front of both versions): the
/// built-in metrics are refused for it, and the judges see none.
struct NoCounts;

impl ObservationSource for NoCounts {
    fn sample(&mut self) -> BoxFuture<'_, Result<Sample, ObserveError>> {
        Box::pin(async { Ok(Sample::default()) })
    }
}

/// Returns once the rollout is gone (deleted, or deleted and created again: another uid). Looked
/// up in the watch cache every second — no request — and confirmed by a read before it counts:
/// an API server that does not answer, or a cache still filling, is not a deletion.
async fn deleted(cache: Store<Rollout>, rollouts: &Api<Rollout>, name: &str, uid: Option<&str>) {
    let namespace = rollouts.namespace().map(str::to_string);
    let reference = match &namespace {
        Some(ns) => ObjectRef::<Rollout>::new(name).within(ns),
        None => ObjectRef::new(name),
    };
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cached = cache.get(&reference);
        if cached.is_some_and(|r| r.metadata.uid.as_deref() == uid) {
            continue;
        }
        match rollouts.get_opt(name).await {
            Ok(None) => return,
            Ok(Some(now)) if now.metadata.uid.as_deref() != uid => return,
            _ => {}
        }
    }
}

/// Puts all traffic on the primary, trying for a while if the API server does not answer.
async fn take_canary_off(traffic: &dyn TrafficBackend) {
    for attempt in 0..30 {
        match traffic.apply(&ALL_ON_PRIMARY).await {
            Ok(()) => return,
            Err(TrafficFault::Refused(e)) => {
                tracing::error!(error = %e, "the canary could not be taken off");
                return;
            }
            Err(e) => tracing::warn!(attempt, error = %e, "the canary is not off yet"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The longest wait between two tries of a finished run's final traffic.
const SETTLE_RETRY_MAX: Duration = Duration::from_secs(10);

/// Carries a finished run's final traffic (its rollback's or its promotion's) until it lands,
/// once the driver's own retries have not made it: a router out of reach may be cut off rather
/// than dead, still sending the canary its share, and the canary keeps its pods until no router
/// does. The routers are found afresh each try (a router pod replaced meanwhile is its
/// successor). Ends when the traffic lands or is refused, or with the run's task (a new
/// revision restarts the run; a deletion takes the canary off). Returns the backend it landed
/// on, to let go.
async fn settle(
    context: &Context,
    rollout: &Rollout,
    traffic: coalmine_rollout::Traffic,
    status: &Status,
    store: &mut RolloutStatusStore,
) -> Option<Arc<dyn TrafficBackend>> {
    let tell = |level, message: String| coalmine_rollout::Event {
        time_ms: coalmine_controller::driver::now_ms(),
        level,
        phase: status.phase,
        weight: status.canary_weight,
        message,
    };
    let mut wait = Duration::from_secs(1);
    let mut told = false;
    loop {
        let tried = async {
            let (backend, _) = seams_of(context, rollout, &mut rollout.to_document(), None).await?;
            backend.apply(&traffic).await?;
            Ok::<_, ReconcileError>(backend)
        }
        .await;
        let why = match tried {
            Ok(backend) => {
                if told {
                    let said = "Final traffic in place".to_string();
                    let _ = store.save(status, &[tell(EventLevel::Info, said)]).await;
                }
                return Some(backend);
            }
            Err(ReconcileError::Traffic(TrafficFault::Refused(why))) => {
                tracing::error!(rollout = %key(rollout), %why, "final traffic refused");
                return None;
            }
            // Nothing to carry it to (the routers' Service is gone, say): trying again would
            // not change that; the rollout's next run says what to fix.
            Err(ReconcileError::Invalid { field, message }) => {
                tracing::error!(rollout = %key(rollout), %field, %message, "final traffic has nowhere to go");
                return None;
            }
            Err(other) => other.to_string(),
        };
        if !told {
            let said = format!(
                "Final traffic not in place yet ({why}): trying again until it is; the canary keeps its pods until then"
            );
            let _ = store.save(status, &[tell(EventLevel::Warning, said)]).await;
            told = true;
        }
        tracing::warn!(rollout = %key(rollout), %why, "final traffic not in place yet");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(SETTLE_RETRY_MAX);
    }
}

/// Drops what this process knew of a run's final traffic: a new run is starting.
fn forget_final(context: &Context, key: &str) {
    if let Some(FinalTraffic::Settling(task)) =
        context.finals.lock().expect("finals lock").remove(key)
    {
        task.abort();
    }
}

/// A finished run's final traffic, put in place once by this process unless its own run did:
/// the operator that ran it may have gone while a router was out of reach (a restart, another
/// leader), and the canary must not keep a share, or its pods, with nobody watching. Everything
/// goes to the primary: the final traffic of a rollback, and of a promotion (the primary then
/// runs the promoted revision; its template is not touched here).
fn settle_unless_landed(context: &Arc<Context>, rollout: &Rollout, key: &str, status: &Status) {
    let mut finals = context.finals.lock().expect("finals lock");
    let needed = match finals.get(key) {
        Some(FinalTraffic::Landed) => false,
        Some(FinalTraffic::Settling(task)) => task.is_finished(),
        None => true,
    };
    if !needed {
        return;
    }
    let Some(cache) = context.cache.get().cloned() else {
        return;
    };
    let (task_context, task_rollout, task_key, status) = (
        context.clone(),
        rollout.clone(),
        key.to_string(),
        status.clone(),
    );
    let task = tokio::spawn(async move {
        let namespace = task_rollout.metadata.namespace.clone().unwrap_or_default();
        let rollouts: Api<Rollout> = Api::namespaced(task_context.client.clone(), &namespace);
        let name = task_rollout.metadata.name.clone().unwrap_or_default();
        let uid = task_rollout.metadata.uid.clone();
        // Its Events are said with the finished run's status, which keeps the revisions it
        // recorded: a write without them would read as a new revision, and start it.
        let recorded = task_rollout.status.clone().unwrap_or_default().canary;
        let mut store = RolloutStatusStore::new(
            task_context.client.clone(),
            &task_rollout,
            task_rollout.to_document(),
            &task_context.identity,
        );
        if let Some(applied) = &recorded.last_applied_spec {
            store = store.with_specs(applied, recorded.last_promoted_spec.as_deref());
        }
        let settled = async {
            settle(
                &task_context,
                &task_rollout,
                ALL_ON_PRIMARY,
                &status,
                &mut store,
            )
            .await
        };
        tokio::select! {
            landed = settled => {
                tracing::info!(rollout = %task_key, "a finished run's final traffic is in place");
                task_context
                    .finals
                    .lock()
                    .expect("finals lock")
                    .insert(task_key, FinalTraffic::Landed);
                if let Some(backend) = landed {
                    let _ = backend.release().await;
                }
            }
            () = deleted(cache, &rollouts, &name, uid.as_deref()) => {}
        }
    });
    finals.insert(key.to_string(), FinalTraffic::Settling(task));
}

/// Leads, then reconciles until the lease is lost (an error) or the watch ends.
pub async fn run(client: kube::Client, settings: Settings) -> Result<(), OperatorError> {
    let elector = Elector::new(
        client.clone(),
        &settings.lease_namespace,
        &settings.lease_name,
        &settings.identity,
        settings.timings,
    );
    let health = settings.health.clone();
    loop {
        let tried = elector.try_once(Timestamp::now()).await;
        health.api_reachable.store(tried.is_ok(), Relaxed);
        match tried {
            Ok(None) => break,
            Ok(Some(holder)) => tracing::info!(%holder, "another replica leads; waiting"),
            Err(e) => tracing::warn!(error = %e, "could not reach the lease"),
        }
        tokio::time::sleep(settings.timings.retry_period).await;
    }
    tracing::info!(identity = %settings.identity, "leading");
    health.leading.store(true, Relaxed);
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "coalmine".into(),
                instance: Some(settings.identity.clone()),
            },
        ),
        health: health.clone(),
        identity: settings.identity.clone(),
        controller: format!(
            "coalmine operator, lease {}/{}",
            settings.lease_namespace, settings.lease_name
        ),
        runs: Mutex::new(HashMap::new()),
        finals: Mutex::new(HashMap::new()),
        cache: std::sync::OnceLock::new(),
        default_provider: settings.default_provider,
        metrics_server: settings.metrics_server.clone(),
    });
    let rollouts: Api<Rollout> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let canaries: Api<Canary> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // A cluster without Flagger's CRD runs Rollouts only (said once, not retried forever).
    let canaries = match canaries.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::warn!("Flagger's Canary CRD is not installed: watching Rollouts only (install deploy/kubernetes/crds/flagger.yaml and restart to run Canaries)");
            None
        }
        _ => Some(canaries),
    };
    // A rollout is looked at when a user changes it, its workloads (a new revision) or its
    // Canary (a request, a deletion); else every interval or so. Not on the status writes the
    // runs make every step: each would cost a reconcile's reads.
    let (cached, writer) = reflector::store();
    let _ = context.cache.set(cached.clone());
    // The cache keeps what the mappers and the deletion check read (names, targets, uid), not
    // the status (the machine's state, the evidence) nor managedFields: every decision reads
    // the Rollout afresh, and a thousand statuses are most of an operator's memory.
    let rollout_changes = changed_by_users(
        watcher(rollouts, watcher::Config::default())
            .default_backoff()
            .modify(|rollout| {
                rollout.status = None;
                rollout.metadata.managed_fields = None;
            })
            .reflect(writer),
    );
    let controller = Controller::for_stream(rollout_changes, cached.clone());
    let deployments: Api<Deployment> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let daemon_sets: Api<DaemonSet> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let deployment_changes = changed_by_users_or_rolled_out(
        watcher(deployments, watcher::Config::default()).default_backoff(),
    );
    let daemon_set_changes = changed_by_users_or_rolled_out(
        watcher(daemon_sets, watcher::Config::default()).default_backoff(),
    );
    // Provider coalmine's routers Service, made (or deleted) after its rollout: looked at at
    // once rather than at the next requeue. Only metadata is watched (names, not specs).
    let services: Api<PartialObjectMeta<Service>> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let service_changes = changed_by_users(
        watcher(services, watcher::Config::default())
            .default_backoff()
            .modify(|service| {
                service.metadata.managed_fields = None;
                service.metadata.annotations = None;
            }),
    );
    let mut controller = controller
        .watches_stream(deployment_changes, rollouts_of_workload(cached.clone()))
        .watches_stream(daemon_set_changes, rollouts_of_workload(cached.clone()))
        .watches_stream(service_changes, rollouts_routed_by(cached));
    if let Some(api) = &canaries {
        let canary_changes =
            changed_by_users(watcher(api.clone(), watcher::Config::default()).default_backoff());
        controller = controller.watches_stream(canary_changes, |canary| {
            let name = canary.metadata.name.clone().unwrap_or_default();
            let reference = ObjectRef::<Rollout>::new(&name);
            Some(match &canary.metadata.namespace {
                Some(ns) => reference.within(ns),
                None => reference,
            })
        });
    }
    let rollouts_reconciled = controller
        .run(reconcile, error_policy, context.clone())
        .for_each(|_| futures::future::ready(()));
    let groups_reconciled = reconcile_groups(&client, &settings, context.clone());
    let canaries_reconciled = async {
        if let Some(api) = canaries {
            let (cached, writer) = reflector::store();
            // As the Rollouts' cache: the reconciler reads each Canary afresh.
            let changes = changed_by_users(
                watcher(api, watcher::Config::default())
                    .default_backoff()
                    .modify(|canary| {
                        canary.status = None;
                        canary.metadata.managed_fields = None;
                    })
                    .reflect(writer),
            );
            Controller::for_stream(changes, cached)
                .run(crate::canaries::reconcile, error_policy, context)
                .for_each(|_| futures::future::ready(()))
                .await;
        }
    };
    let reconciling =
        futures::future::join3(rollouts_reconciled, canaries_reconciled, groups_reconciled);
    let ended = tokio::select! {
        _ = reconciling => Ok(()),
        lost = keep_leading(&elector) => Err(lost),
    };
    health.leading.store(false, Relaxed);
    ended
}

/// Decides the RolloutGroups: when a user changes one, when one of its members writes a step
/// (a metadata-only watch of the Rollouts: every write, no status kept), or every couple of
/// seconds while it moves. A cluster without the RolloutGroup CRD has none (said once).
async fn reconcile_groups(client: &kube::Client, settings: &Settings, context: Arc<Context>) {
    let groups: Api<crate::groups::GroupObject> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    if let Err(kube::Error::Api(e)) = groups.list(&ListParams::default().limit(1)).await {
        if e.code == 404 {
            tracing::warn!("the RolloutGroup CRD is not installed: no groups (install deploy/kubernetes/crds/coalmine.yaml and restart to run them)");
            return;
        }
    }
    let steps: Api<PartialObjectMeta<Rollout>> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (cached, writer) = reflector::store();
    let released = context.clone();
    let changes = changed_by_users(
        watcher(groups, watcher::Config::default())
            .default_backoff()
            .modify(|group| {
                group.status = None;
                group.metadata.managed_fields = None;
            })
            .reflect(writer)
            // A deleted group holds its members no more (the controller never reconciles an
            // object gone from its cache).
            .inspect_ok(move |event| {
                if let watcher::Event::Delete(group) = event {
                    crate::groups::let_members_go(&released, group);
                }
            }),
    );
    let member_steps = watcher(steps, watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let listed = cached.clone();
    Controller::for_stream(changes, cached)
        .watches_stream(member_steps, move |rollout: PartialObjectMeta<Rollout>| {
            let groups = listed.state();
            crate::groups::groups_listing(
                groups.iter().map(|g| g.as_ref()),
                rollout.metadata.namespace.as_deref(),
                rollout.metadata.name.as_deref().unwrap_or_default(),
            )
        })
        .run(crate::groups::reconcile, error_policy, context)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// The rollouts of provider coalmine whose routers a Service is.
fn rollouts_routed_by(
    cached: Store<Rollout>,
) -> impl Fn(PartialObjectMeta<Service>) -> Vec<ObjectRef<Rollout>> + Send + Sync + 'static {
    move |service| {
        let name = service.metadata.name.clone().unwrap_or_default();
        let namespace = service.metadata.namespace.clone();
        cached
            .state()
            .into_iter()
            .filter(|r| {
                r.metadata.namespace == namespace
                    && r.spec.provider == TrafficProvider::Coalmine
                    && r.spec.routers.clone().unwrap_or_default().service == name
            })
            .map(|r| ObjectRef::from_obj(r.as_ref()))
            .collect()
    }
}

/// The rollouts whose target (or primary) a workload is.
fn rollouts_of_workload<W: Workload>(
    cached: Store<Rollout>,
) -> impl Fn(W) -> Vec<ObjectRef<Rollout>> + Send + Sync + 'static {
    move |workload| {
        let name = workload.meta().name.clone().unwrap_or_default();
        let namespace = workload.meta().namespace.clone();
        cached
            .state()
            .into_iter()
            .filter(|r| {
                r.metadata.namespace == namespace
                    && r.spec.target_ref.kind == W::KIND
                    && (r.spec.target_ref.name == name
                        || primary_name(&r.spec.target_ref.name) == name)
            })
            .map(|r| ObjectRef::from_obj(r.as_ref()))
            .collect()
    }
}

/// The objects of a watch that a user changed (their spec — the generation — or their
/// annotations, where requests are written) or deleted; not the status writes, which the
/// operator itself makes every step.
fn changed_by_users<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    changed(events, |_| [0; 4])
}

/// The workloads a user changed, and those whose rollout moved (readiness, from their
/// status): a primary that becomes ready lets its initialisation go on without polling.
fn changed_by_users_or_rolled_out<W: Workload>(
    events: impl futures::Stream<Item = Result<watcher::Event<W>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<W, watcher::Error>> + Send + 'static {
    changed(events, W::rollout_progress)
}

/// The objects of a watch whose uid, generation, annotations, deletion or `also` changed.
fn changed<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    also: impl Fn(&K) -> [i64; 4] + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    let mut seen: HashMap<(Option<String>, Option<String>), u64> = HashMap::new();
    events.try_filter_map(move |event| {
        let changed = match event {
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => {
                let meta = object.meta();
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                (
                    meta.uid.as_ref(),
                    meta.generation,
                    meta.annotations.as_ref(),
                    meta.deletion_timestamp.is_some(),
                    also(&object),
                )
                    .hash(&mut hasher);
                let key = (meta.namespace.clone(), meta.name.clone());
                (seen.insert(key, hasher.finish()) != Some(hasher.finish())).then_some(object)
            }
            watcher::Event::Delete(object) => {
                let meta = object.meta();
                seen.remove(&(meta.namespace.clone(), meta.name.clone()));
                Some(object)
            }
            watcher::Event::Init | watcher::Event::InitDone => None,
        };
        futures::future::ready(Ok(changed))
    })
}

/// Renews the lease; returns when it is lost or was not renewed within the renew deadline. A
/// renewal that hangs counts as failed once the deadline passes (it is cut off then), so this
/// replica stops before the lease can expire for the others — never two leaders.
async fn keep_leading(elector: &Elector) -> OperatorError {
    let timings = elector.timings();
    let mut renewed = tokio::time::Instant::now();
    loop {
        let deadline = renewed + timings.renew_deadline;
        tokio::time::sleep_until(
            (tokio::time::Instant::now() + timings.retry_period).min(deadline),
        )
        .await;
        // Counted from when the request left: the lease says "renewed" from about then.
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout_at(deadline, elector.try_once(Timestamp::now())).await {
            Ok(Ok(None)) => renewed = sent,
            Ok(Ok(Some(holder))) => return OperatorError::LostLease(holder),
            Ok(Err(e)) => tracing::warn!(error = %e, "the lease was not renewed"),
            Err(_) => tracing::warn!("the lease renewal did not answer in time"),
        }
        if tokio::time::Instant::now() >= renewed + timings.renew_deadline {
            return OperatorError::RenewalFailed(timings.renew_deadline);
        }
    }
}

fn error_policy<K>(_: Arc<K>, error: &ReconcileError, _: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed; trying again");
    Action::requeue(Duration::from_secs(5))
}

fn key(rollout: &Rollout) -> String {
    format!(
        "{}/{}",
        rollout.metadata.namespace.as_deref().unwrap_or_default(),
        rollout.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The apex Service's name.
fn apex(rollout: &Rollout) -> String {
    rollout
        .spec
        .service
        .name
        .clone()
        .unwrap_or_else(|| rollout.spec.target_ref.name.clone())
}

/// Whether the rollout's target is a DaemonSet (else a Deployment: [`check`] refuses others).
fn targets_daemon_set(rollout: &Rollout) -> bool {
    rollout.spec.target_ref.kind == "DaemonSet"
}

/// The rollout's workloads (of kind `W`) as its provider runs them.
fn workloads<W: Workload>(context: &Context, rollout: &Rollout) -> Workloads<W> {
    let apex_selects = match rollout.spec.provider {
        TrafficProvider::Kubernetes => Apex::BothVersions,
        _ => Apex::Primary,
    };
    Workloads::new(
        context.client.clone(),
        workloads_spec(context, rollout),
        apex_selects,
    )
}

fn workloads_spec(context: &Context, rollout: &Rollout) -> WorkloadsSpec {
    let spec = &rollout.spec;
    let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
    let name = rollout.metadata.name.clone().unwrap_or_default();
    WorkloadsSpec {
        namespace,
        target: spec.target_ref.name.clone(),
        autoscaler: spec.autoscaler_ref.as_ref().map(|a| a.name.clone()),
        port: ServicePortSpec {
            name: spec.service.name.clone(),
            port: i32::from(spec.service.port),
            target_port: spec.service.target_port.clone(),
            port_name: spec.service.port_name.clone(),
        },
        owner: coalmine_controller::traffic::owner(&name, &context.controller),
        owner_reference: rollout
            .controller_owner_ref(&())
            .expect("a Rollout from the API server has a name and uid"),
        canary_ready_threshold: spec
            .analysis
            .canary_ready_threshold
            .unwrap_or(DEFAULT_READY_THRESHOLD),
        primary_ready_threshold: spec
            .analysis
            .primary_ready_threshold
            .unwrap_or(DEFAULT_READY_THRESHOLD),
        progress_deadline_seconds: u64::from(spec.progress_deadline_seconds.unwrap_or(600)),
        promoted_revision: rollout
            .status
            .as_ref()
            .and_then(|s| s.canary.last_promoted_spec.clone()),
    }
}

/// A group's joint rollback of a promoted member: its primary back on the template it ran
/// before ([`Workloads::take_primary_back`]); the revision that was, or none if not remembered.
pub(crate) async fn take_primary_back(
    context: &Context,
    rollout: &Rollout,
) -> Result<Option<String>, TrafficFault> {
    if targets_daemon_set(rollout) {
        workloads::<DaemonSet>(context, rollout)
            .take_primary_back()
            .await
    } else {
        workloads::<Deployment>(context, rollout)
            .take_primary_back()
            .await
    }
}

/// Flagger's initialisation of the rollout's workloads, then of its route objects (everything
/// on the primary), if its provider writes any.
async fn initialize(context: &Context, rollout: &Rollout) -> Result<(), TrafficFault> {
    if targets_daemon_set(rollout) {
        workloads::<DaemonSet>(context, rollout)
            .initialize()
            .await?;
    } else {
        workloads::<Deployment>(context, rollout)
            .initialize()
            .await?;
    }
    match route_objects(context, rollout, RouteSpec::of(rollout, None)) {
        Some(routes) => routes.apply(&ALL_ON_PRIMARY).await,
        None => Ok(()),
    }
}

/// The route objects a rollout's provider writes, saying `spec` (none for `kubernetes` and
/// `coalmine`).
fn route_objects(
    context: &Context,
    rollout: &Rollout,
    spec: RouteSpec,
) -> Option<Arc<dyn TrafficBackend>> {
    let client = &context.client;
    Some(match rollout.spec.provider {
        TrafficProvider::Kubernetes | TrafficProvider::Coalmine => return None,
        TrafficProvider::Istio => Arc::new(ObjectsBackend(IstioRoutes::new(client, spec))),
        TrafficProvider::GatewayApi => {
            Arc::new(ObjectsBackend(GatewayApiRoutes::new(client, "v1", spec)))
        }
        TrafficProvider::GatewayApiV1beta1 => Arc::new(ObjectsBackend(GatewayApiRoutes::new(
            client, "v1beta1", spec,
        ))),
        TrafficProvider::Nginx => Arc::new(ObjectsBackend(NginxCanaryIngress::new(client, spec))),
    })
}

/// The rollout's workloads, weighed by `routes`.
fn routed(
    context: &Context,
    rollout: &Rollout,
    routes: Arc<dyn TrafficBackend>,
) -> Arc<dyn TrafficBackend> {
    if targets_daemon_set(rollout) {
        Arc::new(Routed::new(
            workloads::<DaemonSet>(context, rollout),
            routes,
        ))
    } else {
        Arc::new(Routed::new(
            workloads::<Deployment>(context, rollout),
            routes,
        ))
    }
}

/// The target's pod template as its revision (as the user wrote it), and whether its primary
/// exists.
async fn target_of<W: Workload>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(k8s_openapi::api::core::v1::PodTemplateSpec, bool), kube::Error> {
    let api: Api<W> = Api::namespaced(client.clone(), namespace);
    let target = api.get(name).await?;
    let primary_exists = api.get_opt(&primary_name(name)).await?.is_some();
    Ok((target.revision_template(), primary_exists))
}

/// The versions' counts under a mesh or ingress provider: its own series in the rollout's
/// Prometheus (`spec.metricsServer`, else `--metrics-server`), named as Flagger's observers name
/// them; the built-in checks are Flagger's queries on them, so they read what Flagger would.
fn mesh_counts(
    context: &Context,
    rollout: &Rollout,
    document: &mut coalmine_spec::rollout::Rollout,
    coalmine_gateway: bool,
) -> Result<Box<dyn ObservationSource>, ReconcileError> {
    use coalmine_controller::observations::prometheus::{self, MeshSeries};
    let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
    let target = &rollout.spec.target_ref.name;
    let series = match rollout.spec.provider {
        TrafficProvider::Istio => MeshSeries::istio(&namespace, target),
        TrafficProvider::Nginx => {
            let ingress = rollout.spec.ingress_ref.as_ref().map(|i| i.name.as_str());
            MeshSeries::nginx(&namespace, ingress.unwrap_or_default())
        }
        // Coalmine's routers as the Gateway: their own series, the HTTPRoute's services
        // (one per rule and match; versions in backendRefs order, primary then canary).
        _ if coalmine_gateway => {
            let prefix =
                crate::gateway::translate::route_service_prefix(&namespace, &apex(rollout));
            MeshSeries::coalmine(&format!(
                r#"service=~"{}\\..+""#,
                crate::seams::istio::regex_escape(&prefix).replace('\\', "\\\\")
            ))
        }
        _ => MeshSeries::gateway_api(&namespace, &apex(rollout)),
    };
    let server = coalmine_spec::templates::Provider {
        kind: "prometheus".into(),
        address: Some(
            rollout
                .spec
                .metrics_server
                .clone()
                .unwrap_or_else(|| context.metrics_server.clone()),
        ),
        ..Default::default()
    };
    prometheus::with_builtin_queries(&mut document.spec.analysis.metrics, &server, &series);
    prometheus::open(&server, series).map_err(|u| ReconcileError::Invalid {
        field: format!("spec.{}", u.field),
        message: u.message,
    })
}

/// Whether a Gateway API rollout's Gateways are Coalmine's routers (their GatewayClass names
/// [`crate::gateway::translate::CONTROLLER_NAME`]): then its counts are the routers' own
/// series. A Gateway or class that cannot be read is not Coalmine's (Envoy's series are read).
async fn coalmine_gateway(context: &Context, rollout: &Rollout) -> bool {
    use gateway_api::gatewayclasses::GatewayClass;
    use gateway_api::gateways::Gateway;
    if !matches!(
        rollout.spec.provider,
        TrafficProvider::GatewayApi | TrafficProvider::GatewayApiV1beta1
    ) {
        return false;
    }
    let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
    for reference in &rollout.spec.service.gateway_refs {
        let ns = reference
            .namespace
            .clone()
            .unwrap_or_else(|| namespace.clone());
        let gateways: Api<Gateway> = Api::namespaced(context.client.clone(), &ns);
        let Ok(Some(gateway)) = gateways.get_opt(&reference.name).await else {
            continue;
        };
        let classes: Api<GatewayClass> = Api::all(context.client.clone());
        if let Ok(Some(class)) = classes.get_opt(&gateway.spec.gateway_class_name).await {
            if class.spec.controller_name == crate::gateway::translate::CONTROLLER_NAME {
                return true;
            }
        }
    }
    false
}

/// The traffic backend and the counts of the rollout's provider. For provider `coalmine`, the
/// document learns where the routers and the versions are (found now: a run drives the routers
/// that were ready when it started). `revision` is the run's (its session cookie).
async fn seams_of(
    context: &Context,
    rollout: &Rollout,
    document: &mut coalmine_spec::rollout::Rollout,
    revision: Option<&str>,
) -> Result<(Arc<dyn TrafficBackend>, Box<dyn ObservationSource>), ReconcileError> {
    if let Some(routes) = route_objects(context, rollout, RouteSpec::of(rollout, revision)) {
        let coalmine_gateway = coalmine_gateway(context, rollout).await;
        let counts = mesh_counts(context, rollout, document, coalmine_gateway)?;
        return Ok((routed(context, rollout, routes), counts));
    }
    match rollout.spec.provider {
        TrafficProvider::Kubernetes => Ok((
            Arc::new(ReplicaRatio::new(
                context.client.clone(),
                workloads_spec(context, rollout),
            )),
            Box::new(NoCounts),
        )),
        TrafficProvider::Coalmine => {
            let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
            let routers = rollout.spec.routers.clone().unwrap_or_default();
            let located = locate(
                &context.client,
                &namespace,
                &routers,
                &apex(rollout),
                rollout.spec.service.port,
            )
            .await
            .map_err(|e| match e {
                LocateError::Invalid { field, message } => {
                    ReconcileError::Invalid { field, message }
                }
                LocateError::Waiting(why) => TrafficFault::Unreachable(why).into(),
                LocateError::Kube(e) => e.into(),
            })?;
            document.spec.routers = located.admins;
            document.spec.stable = Some(Target::Url(located.primary));
            document.spec.canary = Some(Target::Url(located.canary));
            let name = rollout.metadata.name.clone().unwrap_or_default();
            let owner = coalmine_controller::traffic::owner(&name, &context.controller);
            let unrunnable = |u: coalmine_controller::Unrunnable| ReconcileError::Invalid {
                field: format!("spec.{}", u.field),
                message: u.message,
            };
            let routers = coalmine_controller::traffic::open(
                document,
                coalmine_controller::Runner::Run,
                &owner,
            )
            .map_err(unrunnable)?;
            let observations =
                coalmine_controller::observations::open(document).map_err(unrunnable)?;
            Ok((routed(context, rollout, routers.into()), observations))
        }
        _ => unreachable!("route_objects covers the other providers"),
    }
}

/// What Coalmine cannot run, named by field.
fn check(rollout: &Rollout) -> Result<(), ReconcileError> {
    let invalid = |field: &str, message: String| ReconcileError::Invalid {
        field: field.into(),
        message,
    };
    match (rollout.spec.target_ref.kind.as_str(), rollout.spec.provider) {
        ("DaemonSet", TrafficProvider::Kubernetes) => {
            return Err(invalid(
                "spec.provider",
                "provider kubernetes weighs by replicas, and a DaemonSet runs one pod per node: use provider coalmine".into(),
            ))
        }
        ("Deployment" | "DaemonSet", _) => {}
        (other, _) => {
            return Err(invalid(
                "spec.targetRef.kind",
                format!("{other:?}: this operator rolls out Deployments and DaemonSets"),
            ))
        }
    }
    if targets_daemon_set(rollout) && rollout.spec.autoscaler_ref.is_some() {
        return Err(invalid(
            "spec.autoscalerRef",
            "a DaemonSet is not autoscaled: it runs one pod per node".into(),
        ));
    }
    if let Some(autoscaler) = &rollout.spec.autoscaler_ref {
        if autoscaler.kind != "HorizontalPodAutoscaler" {
            return Err(ReconcileError::Invalid {
                field: "spec.autoscalerRef.kind".into(),
                message: format!(
                    "{:?}: this operator copies HorizontalPodAutoscalers (autoscaling/v2)",
                    autoscaler.kind
                ),
            });
        }
    }
    let builtin = rollout
        .spec
        .analysis
        .metrics
        .iter()
        .enumerate()
        .find(|(_, m)| m.is_builtin());
    if let (false, Some((i, m))) = (rollout.spec.provider.counts_versions(), builtin) {
        return Err(ReconcileError::Invalid {
            field: format!("spec.analysis.metrics[{i}]"),
            message: format!(
                "{:?} needs each version's requests, which provider {} cannot tell apart (one Service in front of both): give it a templateRef (Prometheus), or use provider coalmine, istio, gatewayapi:v1 or nginx",
                m.name,
                rollout.spec.provider.name()
            ),
        });
    }
    check_routes(rollout)?;
    coalmine_spec::documents::check_analysis(&rollout.spec.analysis, "spec.analysis")
        .map_err(|(field, message)| ReconcileError::Invalid { field, message })
}

/// What the rollout's provider cannot route, named by field.
fn check_routes(rollout: &Rollout) -> Result<(), ReconcileError> {
    let spec = &rollout.spec;
    let routes = || RouteSpec::of(rollout, None);
    // Only Coalmine's routers pair a mirrored request with stable's answer to it, what a dark
    // launch is judged on.
    if spec.provider != TrafficProvider::Coalmine && spec.analysis.dark_launch.is_some() {
        return Err(ReconcileError::Invalid {
            field: "spec.analysis.darkLaunch".into(),
            message: format!(
                "provider {} does not pair mirrored requests with stable's answers, which a dark launch is judged on; only Coalmine's routers (provider coalmine) do",
                spec.provider.name()
            ),
        });
    }
    // Only Coalmine's routers know where a client is.
    if spec.provider != TrafficProvider::Coalmine {
        if let Some(i) = spec.analysis.match_.iter().position(|m| !m.geo.is_empty()) {
            return Err(ReconcileError::Invalid {
                field: format!("spec.analysis.match[{i}].geo"),
                message: format!(
                    "provider {} cannot match on where the client is; only Coalmine's routers (provider coalmine) can",
                    spec.provider.name()
                ),
            });
        }
    }
    let unsupported = match spec.provider {
        TrafficProvider::GatewayApi | TrafficProvider::GatewayApiV1beta1 => {
            crate::seams::gateway_api::unsupported(&routes())
        }
        TrafficProvider::Nginx => match &spec.ingress_ref {
            Some(r) if r.kind != "Ingress" => Some((
                "spec.ingressRef.kind".into(),
                format!(
                    "{:?}: provider nginx copies an Ingress (networking.k8s.io/v1)",
                    r.kind
                ),
            )),
            _ => crate::seams::ingress::unsupported(&routes(), &spec.analysis),
        },
        _ => None,
    };
    match unsupported {
        Some((field, message)) => Err(ReconcileError::Invalid { field, message }),
        None => Ok(()),
    }
}

async fn write_status(
    client: &kube::Client,
    rollout: &Rollout,
    status: serde_json::Value,
) -> Result<(), ReconcileError> {
    let api: Api<Rollout> = Api::namespaced(
        client.clone(),
        rollout.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    crate::canaries::mirror_status(client, rollout, &status).await?;
    Ok(())
}

/// Flagger's `Promoted` condition saying why Coalmine cannot run a spec.
fn invalid_condition(said: &str) -> serde_json::Value {
    serde_json::json!([{
        "type": "Promoted", "status": "Unknown", "reason": "InvalidSpec", "message": said,
    }])
}

/// A Warning Event `InvalidSpec` on what the user wrote (a Canary, a Rollout).
async fn warn_invalid(context: &Context, regarding: &ObjectReference, said: String) {
    tell(context, regarding, EventType::Warning, "InvalidSpec", said).await;
}

/// An Event from the reconciler (not a run) on what the user wrote.
pub(crate) async fn tell(
    context: &Context,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    said: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(said),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = context.recorder.publish(&event, regarding).await {
        tracing::warn!(error = %e, "an Event was not written");
    }
}

/// Says where kubectl shows it (a condition on `object`, an Event regarding it) why Coalmine
/// cannot run it; other rollouts go on.
pub(crate) async fn say_invalid<K>(
    context: &Context,
    api: &Api<K>,
    object: &K,
    regarding: ObjectReference,
    said: String,
) -> Result<(), ReconcileError>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let patch = serde_json::json!({"status": {"conditions": invalid_condition(&said)}});
    api.patch_status(
        object.meta().name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    warn_invalid(context, &regarding, said).await;
    Ok(())
}

async fn reconcile(cached: Arc<Rollout>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    // Decided on the object as it is now, not as the watch cache last saw it: a status this
    // operator just wrote (Initialized, a run's end) may not be in the cache yet, and a stale
    // one would start a run for a revision already applied.
    let rollouts: Api<Rollout> = Api::namespaced(
        context.client.clone(),
        cached.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let Some(rollout) = rollouts
        .get_opt(cached.metadata.name.as_deref().unwrap_or_default())
        .await?
    else {
        return Ok(Action::await_change());
    };
    let origin = crate::canaries::origin(&context.client, &rollout).await?;
    if let Origin::Gone = origin {
        // Its Canary is gone: so is the Rollout made for it (its run sees that and takes the
        // canary off), garbage collector or not.
        tracing::info!(rollout = %key(&rollout), "its Canary is gone: deleting it");
        rollouts
            .delete(
                rollout.metadata.name.as_deref().unwrap_or_default(),
                &Default::default(),
            )
            .await?;
        return Ok(Action::await_change());
    }
    let written = match &origin {
        Origin::Canary(canary) => &canary.metadata,
        _ => &rollout.metadata,
    };
    if written.deletion_timestamp.is_some() {
        if crate::revert::holds(written) {
            return revert_then_let_go(&rollout, &origin, &context).await;
        }
        return Ok(Action::await_change());
    }
    if let Some(finalizers) =
        crate::revert::finalizers_for(written, rollout.spec.revert_on_deletion)
    {
        let patch = Patch::Merge(crate::revert::finalizers_patch(written, finalizers));
        patch_written(&context.client, &rollout, &origin, &patch).await?;
    }
    match drive(&rollout, &origin, &context).await {
        Err(ReconcileError::Invalid { field, message }) => {
            // Said where kubectl shows it (a condition, an Event); other rollouts go on, and
            // this one is looked at again when it (or a template it names) changes.
            let said = format!("{field}: {message}");
            write_status(
                &context.client,
                &rollout,
                serde_json::json!({"conditions": invalid_condition(&said)}),
            )
            .await?;
            warn_invalid(&context, &crate::canaries::regarding(&rollout), said).await;
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        other => other,
    }
}

/// Patches what the user wrote: the Canary, or the Rollout.
async fn patch_written(
    client: &kube::Client,
    rollout: &Rollout,
    origin: &Origin,
    patch: &Patch<serde_json::Value>,
) -> Result<(), kube::Error> {
    let namespace = rollout.metadata.namespace.as_deref().unwrap_or_default();
    match origin {
        Origin::Canary(canary) => {
            let api: Api<Canary> = Api::namespaced(client.clone(), namespace);
            let name = canary.metadata.name.as_deref().unwrap_or_default();
            api.patch(name, &PatchParams::default(), patch).await?;
        }
        _ => {
            let api: Api<Rollout> = Api::namespaced(client.clone(), namespace);
            let name = rollout.metadata.name.as_deref().unwrap_or_default();
            api.patch(name, &PatchParams::default(), patch).await?;
        }
    }
    Ok(())
}

/// `revertOnDeletion` ([`crate::revert`]): the run stops, the service is put back as it was
/// before Coalmine, then the finalizer goes and the deletion proceeds. Held (tried again) while
/// the target is not serving yet; a revert that cannot finish is told in an Event, which says
/// how to delete without it.
async fn revert_then_let_go(
    rollout: &Rollout,
    origin: &Origin,
    context: &Arc<Context>,
) -> Result<Action, ReconcileError> {
    let key = key(rollout);
    // Nothing else moves traffic while the service is put back.
    if let Some(run) = context.runs.lock().expect("runs lock").remove(&key) {
        run.task.abort();
    }
    let reverted = if targets_daemon_set(rollout) {
        revert_workloads::<DaemonSet>(context, rollout).await
    } else {
        revert_workloads::<Deployment>(context, rollout).await
    };
    let regarding = crate::canaries::regarding(rollout);
    match reverted {
        Ok(()) => {
            let written = match origin {
                Origin::Canary(canary) => &canary.metadata,
                _ => &rollout.metadata,
            };
            let finalizers = crate::revert::finalizers_for(written, false).unwrap_or_default();
            let patch = Patch::Merge(crate::revert::finalizers_patch(written, finalizers));
            patch_written(&context.client, rollout, origin, &patch).await?;
            let said = format!(
                "Reverted on deletion: {} {} serves, Service {} selects it",
                rollout.spec.target_ref.kind,
                rollout.spec.target_ref.name,
                apex(rollout)
            );
            tell(context, &regarding, EventType::Normal, "Reverted", said).await;
            Ok(Action::await_change())
        }
        Err(TrafficFault::Unreachable(why)) => {
            tracing::info!(rollout = %key, %why, "reverting on deletion");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(TrafficFault::Refused(why)) => {
            let said = format!(
                "revertOnDeletion cannot finish: {why}; the deletion waits (remove the finalizer {} to delete without reverting)",
                crate::revert::REVERT_FINALIZER
            );
            tell(
                context,
                &regarding,
                EventType::Warning,
                "RevertFailed",
                said,
            )
            .await;
            Ok(Action::requeue(Duration::from_secs(10)))
        }
    }
}

/// The workloads reverted, then the route objects (providers `istio`, `gatewayapi`, `nginx`) or
/// Coalmine's routers (provider `coalmine`) sent to the apex, which now selects the target, and
/// let go.
async fn revert_workloads<W: Workload>(
    context: &Context,
    rollout: &Rollout,
) -> Result<(), TrafficFault> {
    workloads::<W>(context, rollout).revert().await?;
    let reverted = RouteSpec {
        reverted: true,
        ..RouteSpec::of(rollout, None)
    };
    if let Some(routes) = route_objects(context, rollout, reverted) {
        return routes.apply(&ALL_ON_PRIMARY).await;
    }
    if rollout.spec.provider != TrafficProvider::Coalmine {
        return Ok(());
    }
    let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
    let routers = rollout.spec.routers.clone().unwrap_or_default();
    let located = async {
        let admins =
            crate::seams::routers::find_routers(&context.client, &namespace, &routers).await?;
        let apex_url = crate::seams::routers::service_url(
            &context.client,
            &namespace,
            &apex(rollout),
            rollout.spec.service.port,
        )
        .await?;
        Ok::<_, LocateError>((admins, apex_url))
    };
    let (admins, apex_url) = located.await.map_err(|e| match e {
        LocateError::Waiting(why) => TrafficFault::Unreachable(why),
        other => TrafficFault::Refused(other.to_string()),
    })?;
    let mut document = rollout.to_document();
    document.spec.routers = admins;
    document.spec.stable = Some(Target::Url(apex_url.clone()));
    document.spec.canary = Some(Target::Url(apex_url));
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let owner = coalmine_controller::traffic::owner(&name, &context.controller);
    let routers =
        coalmine_controller::traffic::open(&document, coalmine_controller::Runner::Run, &owner)
            .map_err(|u| TrafficFault::Refused(format!("spec.{}: {}", u.field, u.message)))?;
    routers.apply(&ALL_ON_PRIMARY).await?;
    routers.release().await
}

/// Tells the run what users ask: `spec.suspend` pauses and resumes it; a `coalmine.dev/request`
/// annotation (on the Canary, or on a Rollout the user wrote) promotes or aborts it, once, and
/// is then removed. With no run in progress a request is told so and removed.
async fn carry_out_requests(
    context: &Context,
    rollout: &Rollout,
    origin: &Origin,
    key: &str,
    driving: bool,
) -> Result<(), ReconcileError> {
    let mut inputs = Vec::new();
    let (meta, written) = match origin {
        Origin::Canary(canary) => (&canary.metadata, "Canary"),
        _ => (&rollout.metadata, "Rollout"),
    };
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_default();
    let sender = match context.runs.lock().expect("runs lock").get_mut(key) {
        Some(run) if driving => {
            if run.suspended != rollout.spec.suspend {
                run.suspended = rollout.spec.suspend;
                let writer = crate::requests::writer_of(meta, &["spec", "suspend"])
                    .map(|m| format!(" (written by {m})"))
                    .unwrap_or_default();
                let by = format!("spec.suspend on {written} {namespace}/{name}{writer}");
                inputs.push(if run.suspended {
                    Input::Pause { by }
                } else {
                    Input::Resume { by }
                });
            }
            Some(run.commands.clone())
        }
        _ => None,
    };
    let request = request_of(meta);
    if let Some((request, by)) = &request {
        let who = format!(
            "the {REQUEST_ANNOTATION} annotation on {written} {namespace}/{name}{}",
            by.as_ref()
                .map(|m| format!(" (written by {m})"))
                .unwrap_or_default()
        );
        match request {
            Request::Promote => inputs.push(Input::Promote { by: who.clone() }),
            Request::Abort => inputs.push(Input::Abort {
                reason: format!("requested through {who}"),
            }),
            Request::Unknown(value) => {
                warn_invalid(
                    context,
                    &crate::canaries::regarding(rollout),
                    format!("metadata.annotations.{REQUEST_ANNOTATION}: {value:?} is not a request: use promote or abort"),
                )
                .await;
            }
        }
    }
    let mut delivered = sender.is_some();
    if let Some(sender) = sender {
        for input in inputs {
            delivered &= sender.send(input).await.is_ok();
        }
    }
    if request.is_some() {
        if !delivered {
            warn_invalid(
                context,
                &crate::canaries::regarding(rollout),
                format!("metadata.annotations.{REQUEST_ANNOTATION}: no release of {namespace}/{name} is in progress"),
            )
            .await;
        }
        // Removed once handed over: the run records it in the step it takes.
        let patch = Patch::Merge(removal());
        match origin {
            Origin::Canary(_) => {
                let api: Api<Canary> = Api::namespaced(context.client.clone(), &namespace);
                api.patch(&name, &PatchParams::default(), &patch).await?;
            }
            _ => {
                let api: Api<Rollout> = Api::namespaced(context.client.clone(), &namespace);
                api.patch(&name, &PatchParams::default(), &patch).await?;
            }
        }
    }
    Ok(())
}

/// `status.trackedConfigs` becoming `now`, as a merge patch: the keys no longer tracked are
/// removed (a merge patch would keep them).
fn tracked_configs_patch(
    before: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> serde_json::Value {
    let mut patch: serde_json::Map<String, serde_json::Value> = before
        .keys()
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    patch.extend(now.iter().map(|(k, v)| (k.clone(), v.clone().into())));
    patch.into()
}

/// Initialises, starts, resumes or restarts the rollout's run, as its state says.
async fn drive(
    rollout: &Rollout,
    origin: &Origin,
    context: &Arc<Context>,
) -> Result<Action, ReconcileError> {
    let rollout = rollout.clone();
    let key = key(&rollout);
    check(&rollout)?;
    let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
    let target_name = &rollout.spec.target_ref.name;
    let (template, primary_exists) = if targets_daemon_set(&rollout) {
        target_of::<DaemonSet>(&context.client, &namespace, target_name).await?
    } else {
        target_of::<Deployment>(&context.client, &namespace, target_name).await?
    };
    // The configs are part of the revision: an edit of one starts a run like a new image.
    let tracker = ConfigTracker::new(context.client.clone(), &namespace);
    let tracked = match tracker.read(&template).await {
        Ok(tracked) => tracked.hashes(),
        Err(TrafficFault::Unreachable(why)) => {
            // A required config is missing: nothing can be judged (or started) without it.
            tracing::info!(rollout = %key, %why, "holding");
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        Err(refused) => return Err(refused.into()),
    };
    let hash = spec_hash(&template, &tracked);
    let status = rollout.status.clone().unwrap_or_default();
    let tracked_configs = tracked_configs_patch(&status.canary.tracked_configs, &tracked);
    let saved: Option<Status> = status
        .state
        .clone()
        .and_then(|s| serde_json::from_value(s).ok());
    let driving = context
        .runs
        .lock()
        .expect("runs lock")
        .get(&key)
        .filter(|run| !run.task.is_finished())
        .map(|run| run.revision.clone());
    carry_out_requests(context, &rollout, origin, &key, driving.is_some()).await?;
    let seen = Seen {
        primary_exists,
        spec_hash: &hash,
        last_applied: status.canary.last_applied_spec.as_deref(),
        last_promoted: status.canary.last_promoted_spec.as_deref(),
        unfinished_run: saved.as_ref().is_some_and(|s| s.outcome.is_none()),
        driving: driving.as_deref(),
    };
    let decision = next(&seen);
    tracing::debug!(rollout = %key, ?seen, ?decision, "reconciling");
    match decision {
        Next::Initialize => match initialize(context, &rollout).await {
            Ok(()) => {
                write_status(
                        &context.client,
                        &rollout,
                        serde_json::json!({
                            "phase": "Initialized", "canaryWeight": 0,
                            "lastAppliedSpec": hash, "lastPromotedSpec": hash,
                            "trackedConfigs": tracked_configs,
                            "conditions": [{"type": "Promoted", "status": "True", "reason": "Initialized",
                                "message": "Deployment initialization completed."}],
                        }),
                    )
                    .await?;
            }
            Err(TrafficFault::Unreachable(why)) => {
                // The primary's readiness is watched: its change wakes this sooner.
                tracing::info!(rollout = %key, %why, "initialising");
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            Err(refused) => return Err(refused.into()),
        },
        Next::Start | Next::Resume => {
            let resume = decision == Next::Resume;
            forget_final(context, &key);
            let mut document = rollout.to_document();
            // A member of a group runs in its group's cohort, and starts behind its gate.
            let member_of =
                crate::groups::member_of(&context.client, &namespace, &document.metadata.name)
                    .await?;
            if let Some(member_of) = &member_of {
                member_of.mark(&mut document);
            }
            let subject = crate::templates::Subject {
                name: &document.metadata.name,
                namespace: &namespace,
                target: target_name,
                service: document.spec.service.as_deref().unwrap_or(target_name),
                metrics_server: rollout.spec.metrics_server.as_deref(),
            };
            let mut analysis = document.spec.analysis.clone();
            crate::templates::resolve_metrics(&context.client, &subject, &mut analysis)
                .await
                .map_err(|e| match e {
                    ResolveError::Invalid(e) => ReconcileError::Invalid {
                        field: e.field,
                        message: e.message,
                    },
                    ResolveError::Kube(e) => ReconcileError::Kube(e),
                })?;
            let alert_warnings =
                crate::templates::resolve_alerts(&context.client, &namespace, &mut analysis)
                    .await?;
            document.spec.analysis = analysis;
            let (traffic, observations) =
                seams_of(context, &rollout, &mut document, Some(&hash)).await?;
            if !resume {
                let regarding = crate::canaries::regarding(&rollout);
                for said in alert_warnings {
                    tell(
                        context,
                        &regarding,
                        EventType::Warning,
                        "AlertNotSent",
                        said,
                    )
                    .await;
                }
            }
            traffic.claim().await?;
            // The configs this run is for (the run's own writes carry the rest).
            write_status(
                &context.client,
                &rollout,
                serde_json::json!({ "trackedConfigs": tracked_configs }),
            )
            .await?;
            let store = RolloutStatusStore::new(
                context.client.clone(),
                &rollout,
                document.clone(),
                &context.identity,
            )
            .with_specs(&hash, status.canary.last_promoted_spec.as_deref());
            let store = match rollout.spec.provider {
                // The weight in force is the replicas'.
                TrafficProvider::Kubernetes => store.with_replica_split(&primary_name(target_name)),
                _ => store,
            };
            let seams = Seams {
                traffic,
                observations,
                clock: Clock::Wall,
            };
            let saved = if resume { saved } else { None };
            let held_by_a_group = saved.as_ref().is_some_and(|s| s.gate.is_some());
            let suspended = saved.as_ref().map_or(rollout.spec.suspend, |s| s.paused);
            let mut driver =
                Driver::new(&document, saved, seams).map_err(|u| ReconcileError::Invalid {
                    field: format!("spec.{}", u.field),
                    message: u.message,
                })?;
            match (&member_of, resume) {
                (Some(member_of), false) => driver.gate_before_start(member_of.closed_gate()),
                // Its group was deleted while no operator ran: nothing holds it any more.
                (None, true) if held_by_a_group => driver.gate_before_start(Gate::open()),
                _ => {}
            }
            let task_key = key.clone();
            let rollouts: Api<Rollout> = Api::namespaced(context.client.clone(), &namespace);
            let (name, uid) = (
                rollout.metadata.name.clone().unwrap_or_default(),
                rollout.metadata.uid.clone(),
            );
            let (commands, mut control) = tokio::sync::mpsc::channel(8);
            let cache = context
                .cache
                .get()
                .cloned()
                .expect("the cache is set before the controller runs");
            let (task_context, task_rollout) = (context.clone(), rollout.clone());
            let task = tokio::spawn(async move {
                let mut store = store;
                let traffic = driver.traffic();
                let ended = async {
                    let outcome = driver.run(&mut control, &mut store).await;
                    let settled_on = if driver.settled() {
                        traffic.clone()
                    } else {
                        let (wanted, status) = (driver.wanted_traffic(), driver.status().clone());
                        settle(&task_context, &task_rollout, wanted, &status, &mut store)
                            .await
                            .unwrap_or_else(|| traffic.clone())
                    };
                    (outcome, settled_on)
                };
                let outcome = tokio::select! {
                    ended = ended => Some(ended),
                    () = deleted(cache, &rollouts, &name, uid.as_deref()) => None,
                };
                match outcome {
                    Some((outcome, settled_on)) => {
                        tracing::info!(rollout = %task_key, ?outcome, "run ended");
                        task_context
                            .finals
                            .lock()
                            .expect("finals lock")
                            .insert(task_key.clone(), FinalTraffic::Landed);
                        let _ = settled_on.release().await;
                    }
                    None => {
                        // Nobody watches this canary any more: its traffic goes.
                        tracing::warn!(rollout = %task_key, "deleted mid-run: taking the canary off");
                        take_canary_off(traffic.as_ref()).await;
                        let _ = traffic.release().await;
                    }
                }
            });
            let mut runs = context.runs.lock().expect("runs lock");
            runs.insert(
                key,
                Run {
                    task,
                    commands,
                    suspended,
                    revision: hash.clone(),
                },
            );
            runs.retain(|_, run| !run.task.is_finished());
            context.health.runs.store(runs.len() as i64, Relaxed);
        }
        Next::Restart => {
            if let Some(run) = context.runs.lock().expect("runs lock").remove(&key) {
                run.task.abort();
            }
            forget_final(context, &key);
            // The old run's canary off before anything else.
            let (traffic, _) =
                seams_of(context, &rollout, &mut rollout.to_document(), None).await?;
            traffic.apply(&ALL_ON_PRIMARY).await?;
            write_status(
                &context.client,
                &rollout,
                serde_json::json!({"state": null, "canaryWeight": 0}),
            )
            .await?;
            return Ok(Action::requeue(Duration::from_millis(100)));
        }
        Next::Adopt => {
            write_status(
                &context.client,
                &rollout,
                serde_json::json!({"lastAppliedSpec": hash, "trackedConfigs": tracked_configs}),
            )
            .await?;
        }
        Next::Idle => {
            let finished = saved.as_ref().filter(|s| s.outcome.is_some());
            if let (Some(finished), None) = (finished, &driving) {
                settle_unless_landed(context, &rollout, &key, finished);
            }
        }
    }
    // Workloads and Canaries are watched; this catches what is not (a tracked config), about
    // once an interval like Flagger's tick, neither hammering the API server nor sleeping long.
    Ok(Action::requeue(
        rollout
            .spec
            .analysis
            .interval
            .0
            .clamp(Duration::from_secs(5), Duration::from_secs(60)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_configs_no_longer_read_are_removed_from_the_status() {
        let before = BTreeMap::from([
            ("configmap/payment-config".to_string(), "a1".to_string()),
            ("secret/payment-db".to_string(), "b2".to_string()),
        ]);
        let now = BTreeMap::from([("configmap/payment-config".to_string(), "c3".to_string())]);
        // A merge patch (RFC 7386) removes a key only when told to with null.
        assert_eq!(
            tracked_configs_patch(&before, &now),
            serde_json::json!({"configmap/payment-config": "c3", "secret/payment-db": null})
        );
    }

    #[test]
    fn an_autoscaler_other_than_an_hpa_is_refused_by_field() {
        let mut rollout: Rollout = serde_saphyr::from_str(include_str!(
            "../tests/fixtures/payment-service-rollout.yaml"
        ))
        .unwrap();
        rollout.spec.analysis.metrics.clear();
        check(&rollout).unwrap();
        rollout.spec.autoscaler_ref = Some(crate::crd::WorkloadRef {
            api_version: Some("keda.sh/v1alpha1".into()),
            kind: "ScaledObject".into(),
            name: "payment-service".into(),
        });
        let refused = check(&rollout).unwrap_err();
        assert!(
            matches!(&refused, ReconcileError::Invalid { field, message } if field == "spec.autoscalerRef.kind" && message.contains("ScaledObject")),
            "{refused}"
        );
    }

    #[test]
    fn a_daemon_set_under_provider_kubernetes_is_refused_by_field() {
        let mut rollout: Rollout = serde_saphyr::from_str(include_str!(
            "../tests/fixtures/payment-service-rollout.yaml"
        ))
        .unwrap();
        rollout.spec.analysis.metrics.clear();
        rollout.spec.autoscaler_ref = None;
        rollout.spec.target_ref.kind = "DaemonSet".into();
        let refused = check(&rollout).unwrap_err();
        assert!(
            matches!(&refused, ReconcileError::Invalid { field, message } if field == "spec.provider" && message.contains("one pod per node")),
            "{refused}"
        );
        rollout.spec.provider = TrafficProvider::Coalmine;
        check(&rollout).unwrap();
        rollout.spec.target_ref.kind = "StatefulSet".into();
        let refused = check(&rollout).unwrap_err();
        assert!(
            matches!(&refused, ReconcileError::Invalid { field, .. } if field == "spec.targetRef.kind"),
            "{refused}"
        );
    }

    /// The field a refused rollout names.
    fn refused_field(rollout: &Rollout) -> String {
        match check(rollout) {
            Err(ReconcileError::Invalid { field, .. }) => field,
            other => panic!("not refused by field: {other:?}"),
        }
    }

    #[test]
    fn what_a_provider_cannot_route_is_refused_by_field() {
        let mut rollout: Rollout = serde_saphyr::from_str(include_str!(
            "../tests/fixtures/payment-service-rollout.yaml"
        ))
        .unwrap();
        // The built-in checks need per-version counts: Coalmine's routers and a mesh's series
        // in Prometheus give them; replicas behind one Service do not.
        rollout.spec.provider = TrafficProvider::Kubernetes;
        assert_eq!(refused_field(&rollout), "spec.analysis.metrics[0]");
        rollout.spec.provider = TrafficProvider::Istio;
        check(&rollout).unwrap();
        rollout.spec.analysis.metrics.clear();
        check(&rollout).unwrap();
        // Gateway API attaches the HTTPRoute to Gateways.
        rollout.spec.provider = TrafficProvider::GatewayApi;
        assert_eq!(refused_field(&rollout), "spec.service.gatewayRefs");
        rollout.spec.service.gateway_refs =
            vec![serde_json::from_value(serde_json::json!({"name": "public"})).unwrap()];
        check(&rollout).unwrap();
        // NGINX copies an Ingress, matches one header and cannot mirror.
        rollout.spec.provider = TrafficProvider::Nginx;
        assert_eq!(refused_field(&rollout), "spec.ingressRef");
        rollout.spec.ingress_ref = Some(crate::crd::WorkloadRef {
            api_version: None,
            kind: "Ingress".into(),
            name: "web".into(),
        });
        check(&rollout).unwrap();
        rollout.spec.analysis.match_ = serde_json::from_value(serde_json::json!([
            {"headers": {"x-canary": {"exact": "true"}, "x-beta": {"exact": "1"}}}
        ]))
        .unwrap();
        assert_eq!(refused_field(&rollout), "spec.analysis.match");
        rollout.spec.analysis.match_ = serde_json::from_value(serde_json::json!([
            {"headers": {"x-canary": {"exact": "true"}, "cookie": {"exact": "canary"}}}
        ]))
        .unwrap();
        check(&rollout).unwrap();
        rollout.spec.analysis.mirror = true;
        assert_eq!(refused_field(&rollout), "spec.analysis.mirror");
        // Only Coalmine's routers know where a client is.
        rollout.spec.analysis.mirror = false;
        // Only Coalmine's routers pair a mirrored request with stable's answer.
        rollout.spec.analysis.dark_launch =
            Some(serde_json::from_value(serde_json::json!({})).unwrap());
        assert_eq!(refused_field(&rollout), "spec.analysis.darkLaunch");
        rollout.spec.analysis.dark_launch = None;
        rollout.spec.analysis.match_ = serde_json::from_value(serde_json::json!([
            {"headers": {"x-canary": {"exact": "true"}}},
            {"geo": {"country": {"exact": "DE"}}}
        ]))
        .unwrap();
        for provider in [
            TrafficProvider::Nginx,
            TrafficProvider::Istio,
            TrafficProvider::GatewayApi,
        ] {
            rollout.spec.provider = provider;
            assert_eq!(refused_field(&rollout), "spec.analysis.match[1].geo");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_hangs_stops_the_leader_within_the_renew_deadline() {
        // An API server that takes the connection and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let timings = LeaseTimings::default();
        let elector = Elector::new(client, "shop", "coalmine-operator", "operator-a", timings);
        let started = tokio::time::Instant::now();
        let stopped = keep_leading(&elector).await;
        assert!(
            matches!(stopped, OperatorError::RenewalFailed(_)),
            "{stopped}"
        );
        // Before the lease (8 s) can have expired for the others.
        assert!(
            started.elapsed() <= timings.renew_deadline,
            "{:?}",
            started.elapsed()
        );
    }
}
