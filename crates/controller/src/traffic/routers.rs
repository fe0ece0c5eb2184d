//! The traffic backend for Coalmine's own routers: their admin API (`GET`/`PUT
//! /routes/{service}`, the service the rollout names in `spec.routerService`, else the default
//! one). A rollout uses them when it lists their admin addresses (`spec.routers`), or, under
//! `serve`, has one hosted (`spec.router`). Their counters (`GET /stats/{service}`) are an
//! observation source ([`crate::observations::router_stats`]). Rollouts on different services
//! of one router run side by side; two on one service never do (the router's owner check).
//!
//! A rollout owns only some fields of a router's table: its name, the two upstreams and the
//! canary's weight, plus `match`, `affinity` and `mirror` when its document sets them. It sends
//! only those (the router keeps the fields a `PUT` leaves out), so rules the router was started
//! with — the seed's `--match x-canary=true`, say — stay as they were, during and after.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use coalmine_contract::routes::{
    DEFAULT_AFFINITY_MAX_AGE, DEFAULT_NAME as UNCLAIMED, DEFAULT_SERVICE,
};
use coalmine_contract::{
    Affinity, Condition, GeoField, Invalid, MatchRule, RoutesDoc, RoutesPatch, ServedRoutes,
    Subject, UpstreamUrl, OWNER_HEADER,
};
use coalmine_rollout::{Traffic, TrafficFault};
use coalmine_spec::rollout::{Analysis, GeoKey, HttpMatch, HttpUrl, Rollout, StringMatch, Target};

use super::{Registration, TrafficBackend};
use crate::http::reqwest_reason;
use crate::{host_name, BoxFuture, Runner, Unrunnable};

pub const REGISTERED: Registration = Registration {
    takes,
    wanted,
    check,
    open,
};

fn takes(rollout: &Rollout, runner: Runner) -> bool {
    !rollout.spec.routers.is_empty() || (runner == Runner::Serve && rollout.spec.router.is_some())
}

fn wanted(runner: Runner) -> Unrunnable {
    Unrunnable {
        field: "routers".into(),
        message: match runner {
            Runner::Run => "list the admin address of at least one Coalmine router",
            Runner::Serve => "list at least one router admin address, or host one with spec.router",
        }
        .into(),
    }
}

/// A hosted router's address must parse, and the routes must be ones a router takes.
fn check(rollout: &Rollout, runner: Runner) -> Result<(), Unrunnable> {
    let spec = &rollout.spec;
    if let (Runner::Serve, Some(hosted)) = (runner, &spec.router) {
        hosted
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| Unrunnable {
                field: "router.listen".into(),
                message: e.to_string(),
            })?;
    }
    if let (Some(Target::Url(stable)), Some(Target::Url(canary))) = (&spec.stable, &spec.canary) {
        Upstreams::new(
            &rollout.metadata.name,
            stable.as_str(),
            canary.as_str(),
            &spec.analysis,
            &spec.preview,
        )?;
    }
    Ok(())
}

fn open(rollout: &Rollout, owner: &str) -> Result<Box<dyn TrafficBackend>, Unrunnable> {
    let spec = &rollout.spec;
    let upstreams = Upstreams::new(
        rollout.cohort(),
        &url_of(&spec.stable, "stable")?,
        &url_of(&spec.canary, "canary")?,
        &spec.analysis,
        &spec.preview,
    )?
    .in_group_release(rollout.group_release());
    Ok(Box::new(Routers {
        routers: RouterSet::new(
            spec.routers.clone(),
            spec.router_service().to_string(),
            owner.to_string(),
        ),
        upstreams,
    }))
}

/// Where a version's traffic goes; by now every target is a URL (`serve` has started its
/// processes), so this only says what `run` cannot do.
fn url_of(target: &Option<Target>, field: &str) -> Result<String, Unrunnable> {
    let unrunnable = |message: &str| Unrunnable {
        field: field.to_string(),
        message: message.into(),
    };
    match target {
        Some(Target::Url(u)) => Ok(u.to_string()),
        None => Err(unrunnable("the version's url is needed to run the rollout")),
        Some(Target::Command { .. }) => Err(unrunnable("a command target needs `coalmine serve`, which keeps the process running after the rollout; give a url here")),
    }
}

/// One rollout's routers: the routes it owns, on every router it lists.
struct Routers {
    upstreams: Upstreams,
    routers: RouterSet,
}

impl TrafficBackend for Routers {
    fn claim(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(self.routers.claim(&self.upstreams.name))
    }

    fn apply<'a>(&'a self, traffic: &'a Traffic) -> BoxFuture<'a, Result<(), TrafficFault>> {
        Box::pin(async move { self.routers.apply(&self.upstreams.routes(traffic)).await })
    }

    fn reconcile<'a>(
        &'a self,
        traffic: &'a Traffic,
    ) -> BoxFuture<'a, Result<Vec<String>, TrafficFault>> {
        Box::pin(async move {
            let corrected = self
                .routers
                .reconcile(&self.upstreams.routes(traffic))
                .await?;
            Ok(corrected.iter().map(ToString::to_string).collect())
        })
    }

    fn release(&self) -> BoxFuture<'_, Result<(), TrafficFault>> {
        Box::pin(self.routers.release())
    }
}

/// What a rollout's routers serve, apart from the weights the state machine decides.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub name: String,
    pub stable: UpstreamUrl,
    pub canary: UpstreamUrl,
    /// Flagger's `match` as router rules; `None` when the rollout has none (the router's own
    /// rules are left alone).
    pub match_rules: Option<Vec<MatchRule>>,
    /// `spec.preview` as router rules; `None` when the rollout has none.
    pub preview_rules: Option<Vec<MatchRule>>,
    /// `None` when the rollout does not use session affinity.
    pub affinity: Option<Affinity>,
    /// Whether the rollout ever mirrors (then it owns the router's `mirror`).
    pub mirrors: bool,
}

fn upstream(field: &str, url: &str) -> Result<UpstreamUrl, Unrunnable> {
    UpstreamUrl::parse(url).map_err(|e| Unrunnable {
        field: field.to_string(),
        message: e.to_string(),
    })
}

impl Upstreams {
    /// Everything is checked here, before any router sees it: a URL the router would refuse is
    /// the rollout's error at once, not a refusal in the middle of a run.
    pub fn new(
        name: &str,
        stable: &str,
        canary: &str,
        analysis: &Analysis,
        preview: &[HttpMatch],
    ) -> Result<Upstreams, Unrunnable> {
        let rules = |matches: &[HttpMatch],
                     field: &str|
         -> Result<Option<Vec<MatchRule>>, Unrunnable> {
            if matches.is_empty() {
                return Ok(None);
            }
            matches
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    router_rule(m).map(|rule| {
                        rule.map_err(|e| Unrunnable {
                            field: format!("{field}[{i}]"),
                            message: e.to_string(),
                        })
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        };
        let match_rules = rules(&analysis.match_, "analysis.match")?;
        let preview_rules = rules(preview, "preview")?;
        Ok(Upstreams {
            name: name.to_string(),
            stable: upstream("stable", stable)?,
            canary: upstream("canary", canary)?,
            match_rules,
            preview_rules,
            affinity: analysis.session_affinity.as_ref().map(|a| Affinity {
                cookie_name: a.cookie_name.clone(),
                max_age: a.max_age.unwrap_or(DEFAULT_AFFINITY_MAX_AGE),
                release: None,
            }),
            mirrors: analysis.mirror
                || analysis.mirror_weight.is_some()
                || analysis.dark_launch.is_some(),
        })
    }

    /// A member of a rollout group's release (its cohort shared): its affinity cookie is the
    /// group's, the same on every member's router (`Affinity::token`).
    pub fn in_group_release(mut self, release: Option<&str>) -> Self {
        if let Some(affinity) = self.affinity.as_mut() {
            affinity.release = release.map(str::to_string);
        }
        self
    }

    /// The fields of a router's table that make it do what `traffic` says: only those the
    /// rollout owns (name, upstreams, weight; `match`, `preview`, `affinity`, `mirror` when its
    /// document uses them), so the router keeps the rest.
    pub fn routes(&self, traffic: &Traffic) -> RoutesPatch {
        let (stable, canary) = if traffic.promoted {
            (&self.canary, None)
        } else if traffic.canary {
            (&self.stable, Some(&self.canary))
        } else {
            (&self.stable, None)
        };
        let matches = self.match_rules.as_ref().map(|rules| {
            if traffic.apply_match && canary.is_some() {
                rules.clone()
            } else {
                Vec::new()
            }
        });
        let preview = self.preview_rules.as_ref().map(|rules| {
            if canary.is_some() {
                rules.clone()
            } else {
                Vec::new()
            }
        });
        RoutesPatch {
            name: Some(self.name.clone()),
            stable: Some(stable.clone().into()),
            canary: Some(canary.cloned().map(Into::into)),
            canary_weight: Some(traffic.canary_weight),
            matches,
            preview,
            affinity: self
                .affinity
                .as_ref()
                .map(|a| canary.is_some().then(|| a.clone())),
            mirror: self.mirrors.then_some(traffic.mirror_weight),
            ..RoutesPatch::default()
        }
    }
}

/// Flagger's HTTPMatchRequest as a router rule: every header, query and geography condition
/// must hold.
/// `sourceLabels` needs a mesh and is dropped (`coalmine check` warns about it).
fn router_rule(m: &HttpMatch) -> Option<Result<MatchRule, Invalid>> {
    let test = StringMatch::to_str_match;
    let headers = m.headers.iter().map(|(name, t)| {
        Ok(Condition {
            subject: Subject::header(name)?,
            test: test(t)?,
        })
    });
    let queries = m.query_params.iter().map(|(name, t)| {
        Ok(Condition {
            subject: Subject::Query(name.clone()),
            test: test(t)?,
        })
    });
    let places = m.geo.iter().map(|(key, t)| {
        Ok(Condition {
            subject: Subject::Geo(match key {
                GeoKey::Country => GeoField::Country,
                GeoKey::Region => GeoField::Region,
            }),
            test: test(t)?,
        })
    });
    let all: Result<Vec<Condition>, Invalid> = headers.chain(queries).chain(places).collect();
    match all {
        Ok(all) if all.is_empty() => None,
        all => Some(all.map(|all| MatchRule { all })),
    }
}

/// The routers carrying one rollout's traffic, driven on behalf of one controller. A router
/// that cannot be reached is [`TrafficFault::Unreachable`]; one that answered and will not
/// change its answer (it refused the document, or it is not a Coalmine router's admin API at
/// all) is [`TrafficFault::Refused`].
#[derive(Debug, Clone)]
struct RouterSet {
    admins: Vec<HttpUrl>,
    /// The service of their tables the rollout drives.
    service: String,
    client: reqwest::Client,
    /// Who drives them (see [`super::owner`]): every route change is sent as theirs, and a
    /// router another controller drives refuses it.
    owner: String,
}

/// An owner as people read it: `rollout "checkout" (coalmine run, pid 4242 on build-7)`.
fn describe_owner(owner: &str) -> String {
    match owner.split_once(' ') {
        Some((rollout, controller)) => format!("rollout {rollout:?} {controller}"),
        None => format!("{owner:?}"),
    }
}

/// The process id of a `coalmine run` on this machine that no longer exists, if `owner` names
/// one: its router is driven by nobody. A live process, a reused pid or another machine's
/// controller is never taken for gone.
fn gone_local_run(owner: &str) -> Option<i32> {
    let (_, controller) = owner.rsplit_once("(coalmine run, pid ")?;
    let (pid, host) = controller.strip_suffix(')')?.split_once(" on ")?;
    let pid: i32 = pid.parse().ok().filter(|p| *p > 0)?;
    if host != host_name() {
        return None;
    }
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let gone = unsafe { libc::kill(pid, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    gone.then_some(pid)
}

/// The part of a claim that does not depend on who drives a router: it must not carry another
/// rollout's canary.
fn refuse_another_rollouts_canary(
    table: &RoutesDoc,
    admin: &HttpUrl,
    rollout: &str,
) -> Result<(), TrafficFault> {
    if table.canary.is_some() && table.name != rollout && table.name != UNCLAIMED {
        return Err(TrafficFault::Refused(format!(
            "{admin} carries rollout {:?}'s canary ({}% of traffic): another controller drives that router; finish or abort that rollout first",
            table.name,
            table.canary_weight.percent()
        )));
    }
    Ok(())
}

/// The path of a service's routes on a router's admin API. The default service's is `/routes`,
/// which routers served before they had services: a controller upgraded before its routers
/// keeps driving them.
pub fn routes_path(service: &str) -> String {
    if service == DEFAULT_SERVICE {
        "/routes".to_string()
    } else {
        format!("/routes/{service}")
    }
}

/// The URL of a service's routes on a router.
pub fn routes_url(admin: &HttpUrl, service: &str) -> String {
    format!("{admin}{}", routes_path(service))
}

/// What an answer that is not a route table looks like, for the error message.
fn describe_answer(status: reqwest::StatusCode, content_type: &str, body: &str) -> String {
    let cut = body.char_indices().nth(80).map_or(body.len(), |(i, _)| i);
    let more = if cut < body.len() { "…" } else { "" };
    format!(
        "answered {status} ({}) {:?}{more}",
        if content_type.is_empty() {
            "no content type"
        } else {
            content_type
        },
        &body[..cut]
    )
}

impl RouterSet {
    fn new(admins: Vec<HttpUrl>, service: String, owner: String) -> RouterSet {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("a TLS-less client always builds");
        RouterSet {
            admins,
            service,
            client,
            owner,
        }
    }

    /// The service's routes on a router.
    fn routes_url(&self, admin: &HttpUrl) -> String {
        routes_url(admin, &self.service)
    }

    /// Reads an answer that must be a route table (`GET` or `PUT /routes`).
    async fn table(
        &self,
        admin: &HttpUrl,
        resp: reqwest::Response,
    ) -> Result<RoutesDoc, TrafficFault> {
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp
            .text()
            .await
            .map_err(|e| TrafficFault::Unreachable(format!("{admin}: {}", reqwest_reason(&e))))?;
        let json: Option<Value> = serde_json::from_str(&body).ok();
        if status.is_client_error() {
            if let Some(why) = json.as_ref().and_then(|j| j["error"].as_str()) {
                return Err(TrafficFault::Refused(format!(
                    "{admin} refused the routes ({status}): {why}"
                )));
            }
        }
        // `GET /routes` of a router whose table has no default service: its services, no
        // default's fields.
        let services: Option<Vec<String>> = json.as_ref().and_then(|j| {
            let listed = j.get("services")?.as_array()?;
            Some(
                listed
                    .iter()
                    .filter_map(|s| s["service"].as_str().map(str::to_string))
                    .collect(),
            )
        });
        match json.and_then(ServedRoutes::from_json) {
            Some(served) if status.is_success() => Ok(served.doc),
            None if status.is_success() && services.is_some() => {
                Err(TrafficFault::Refused(format!(
                    "{admin} has no service {:?} (its services: {}): name the rollout's with spec.routerService",
                    self.service,
                    services.unwrap_or_default().join(", ")
                )))
            }
            _ => Err(TrafficFault::Refused(format!(
                "{admin} is not a Coalmine router's admin API: {} {} (is it the traffic port? give the router's --admin address)",
                routes_path(&self.service),
                describe_answer(status, &content_type, &body)
            ))),
        }
    }

    async fn get_table(&self, admin: &HttpUrl) -> Result<RoutesDoc, TrafficFault> {
        let resp = self
            .client
            .get(self.routes_url(admin))
            .send()
            .await
            .map_err(|e| TrafficFault::Unreachable(format!("{admin}: {}", reqwest_reason(&e))))?;
        self.table(admin, resp).await
    }

    /// Sends a route change as this controller's: the router makes it only if no other
    /// controller drives it (it answers 409 otherwise, a refusal).
    async fn put_patch(
        &self,
        admin: &HttpUrl,
        patch: &RoutesPatch,
    ) -> Result<RoutesDoc, TrafficFault> {
        self.put_patch_as(admin, &self.owner, patch).await
    }

    /// Sends a route change on behalf of `owner`: made only while the router is driven by
    /// `owner` or by nobody (a compare-and-swap on the router's owner).
    async fn put_patch_as(
        &self,
        admin: &HttpUrl,
        owner: &str,
        patch: &RoutesPatch,
    ) -> Result<RoutesDoc, TrafficFault> {
        let resp = self
            .client
            .put(self.routes_url(admin))
            .header(OWNER_HEADER, owner)
            .json(patch)
            .send()
            .await
            .map_err(|e| TrafficFault::Unreachable(format!("{admin}: {}", reqwest_reason(&e))))?;
        self.table(admin, resp).await
    }

    /// Whether a router's table carries the patch, driven by this controller.
    fn carries(&self, patch: &RoutesPatch, table: &RoutesDoc) -> bool {
        patch.agrees_with(table) && table.owner.as_deref() == Some(self.owner.as_str())
    }

    async fn put_table(&self, admin: &HttpUrl, patch: &RoutesPatch) -> Result<(), TrafficFault> {
        let signed = RoutesPatch {
            owner: Some(Some(self.owner.clone())),
            ..patch.clone()
        };
        let table = self.put_patch(admin, &signed).await?;
        if self.carries(patch, &table) {
            Ok(())
        } else {
            Err(TrafficFault::Refused(format!(
                "{admin} answered the route change with a table that does not carry it"
            )))
        }
    }

    /// Lets the routers go once the rollout is over and nothing will drive them any more (they
    /// keep its final routes): another rollout may then take them. A router this controller
    /// no longer drives is left as it is.
    async fn release(&self) -> Result<(), TrafficFault> {
        let mut failed = None;
        for admin in &self.admins {
            let released = self.put_patch(admin, &RoutesPatch::release()).await;
            if let Err(e) = released {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Checks, before a rollout starts, that every router it can reach is a Coalmine router
    /// that no other controller drives and that carries no other rollout's canary: two
    /// controllers must never drive one router. A router that cannot be reached yet is left to
    /// the ticks; every route change is refused by a router another controller drives.
    async fn claim(&self, rollout: &str) -> Result<(), TrafficFault> {
        for admin in &self.admins {
            let table = match self.get_table(admin).await {
                Ok(t) => t,
                Err(TrafficFault::Unreachable(_)) => continue,
                Err(refused) => return Err(refused),
            };
            if let Some(owner) = table.owner.as_deref().filter(|o| *o != self.owner) {
                if let Some(pid) = gone_local_run(owner) {
                    // Its process is gone, so nothing drives the router: free it, unless
                    // someone took it in the meantime (then the router refuses, 409).
                    self.put_patch_as(admin, owner, &RoutesPatch::release())
                        .await?;
                    tracing::warn!(
                        router = %admin,
                        "{admin} was driven by {}, whose process {pid} is gone: taking the router over",
                        describe_owner(owner)
                    );
                    refuse_another_rollouts_canary(&table, admin, rollout)?;
                    continue;
                }
                return Err(TrafficFault::Refused(format!(
                    "{admin}: service {:?} is driven by {}: one service carries one rollout; finish or abort that rollout first (if its controller is gone, free the service: curl -X PUT {} -H 'content-type: application/json' -d '{{\"owner\": null}}')",
                    self.service,
                    describe_owner(owner),
                    self.routes_url(admin)
                )));
            }
            refuse_another_rollouts_canary(&table, admin, rollout)?;
        }
        Ok(())
    }

    /// Applies the same patch to every router. All must take it; the first refusal is the
    /// error, else the first router that could not be reached.
    async fn apply(&self, patch: &RoutesPatch) -> Result<(), TrafficFault> {
        let mut unreachable = None;
        for admin in &self.admins {
            match self.put_table(admin, patch).await {
                Ok(()) => {}
                Err(refused @ TrafficFault::Refused(_)) => return Err(refused),
                Err(e) => {
                    unreachable.get_or_insert(e);
                }
            }
        }
        unreachable.map_or(Ok(()), Err)
    }

    /// Puts the patch back on every router whose table no longer carries it (a router
    /// restarted with its old command line, say). Returns the routers put right; fails while
    /// any router does not carry it (one out of reach), even when others were put right: until
    /// every router carries it, the traffic is not what the rollout says.
    async fn reconcile(&self, patch: &RoutesPatch) -> Result<Vec<HttpUrl>, TrafficFault> {
        let mut corrected = Vec::new();
        let mut failed = None;
        for admin in &self.admins {
            let agrees = match self.get_table(admin).await {
                Ok(table) => self.carries(patch, &table),
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            if !agrees {
                match self.put_table(admin, patch).await {
                    Ok(()) => corrected.push(admin.clone()),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        match failed {
            Some(e) => {
                if !corrected.is_empty() {
                    let put_right: Vec<String> = corrected.iter().map(ToString::to_string).collect();
                    tracing::warn!("routes put back on {}; not on every router: {e}", put_right.join(", "));
                }
                Err(e)
            }
            None => Ok(corrected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_contract::Weight;
    use serde_json::json;

    fn upstreams(analysis: Value) -> Upstreams {
        let analysis: Analysis = serde_json::from_value(analysis).unwrap();
        let preview =
            [serde_json::from_value(json!({"headers": {"x-preview": {"exact": "1"}}})).unwrap()];
        Upstreams::new(
            "checkout",
            "http://127.0.0.1:9001",
            "http://127.0.0.1:9002",
            &analysis,
            &preview,
        )
        .unwrap()
    }

    #[test]
    fn a_rollout_sends_the_fields_it_owns_as_the_router_reads_them() {
        let up = upstreams(json!({
            "match": [
                {"headers": {"X-Canary": {"exact": "insider"}, "user-id": {"regex": "1|2"}},
                 "queryParams": {"beta": {"prefix": "on"}}},
                {"sourceLabels": {"app": "front"}}
            ],
            "sessionAffinity": {"cookieName": "pin"}
        }));
        let traffic = Traffic {
            promoted: false,
            canary: true,
            canary_weight: Weight::from_basis_points(550).unwrap(),
            apply_match: true,
            mirror_weight: Weight::ZERO,
        };
        let patch = up.routes(&traffic);
        assert_eq!(
            patch.to_json(),
            json!({
                "name": "checkout",
                "stable": "http://127.0.0.1:9001",
                "canary": "http://127.0.0.1:9002",
                "canaryWeight": 5.5,
                // A Flagger match is one rule of every condition; one only of source labels
                // is dropped (it needs a mesh).
                "match": [{"all": [
                    {"header": "x-canary", "exact": "insider"},
                    {"header": "user-id", "regex": "1|2"},
                    {"query": "beta", "prefix": "on"}
                ]}],
                "preview": [{"header": "x-preview", "exact": "1"}],
                "affinity": {"cookieName": "pin", "maxAge": 86400}
            })
        );
        let rule = &patch.matches.as_ref().unwrap()[0];
        assert!(rule.all[1].test.matches("2") && !rule.all[1].test.matches("12"));

        // What the router makes of it is what the rollout asked for, and the router's own
        // fields stay.
        let router: RoutesDoc = serde_json::from_value(json!({
            "stable": "http://127.0.0.1:9001", "sticky": {"header": "x-user"}
        }))
        .unwrap();
        let applied = router.patched(&patch.to_json()).unwrap();
        assert!(patch.agrees_with(&applied));
        assert_eq!(applied.sticky, router.sticky);

        // Promoted: no canary, so no rules and no affinity, and still no mirror field.
        let done = up.routes(&Traffic {
            promoted: true,
            canary: false,
            canary_weight: Weight::ZERO,
            ..traffic
        });
        assert_eq!(
            done.to_json(),
            json!({"name": "checkout", "stable": "http://127.0.0.1:9002", "canary": null,
                   "canaryWeight": 0.0, "match": [], "preview": [], "affinity": null})
        );
    }

    #[test]
    fn the_default_service_is_driven_where_routers_before_services_had_their_routes() {
        let admin = HttpUrl::parse("http://127.0.0.1:9901").unwrap();
        assert_eq!(routes_url(&admin, "default"), "http://127.0.0.1:9901/routes");
        assert_eq!(routes_url(&admin, "cart"), "http://127.0.0.1:9901/routes/cart");
    }

    #[test]
    fn a_match_the_router_would_refuse_is_the_rollouts_error_naming_the_rule() {
        let analysis: Analysis = serde_json::from_value(json!({
            "match": [{"headers": {"x-a": {"exact": "1"}}}, {"headers": {"bad header": {"exact": "1"}}}]
        }))
        .unwrap();
        let err = Upstreams::new(
            "c",
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            &analysis,
            &[],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"spec.analysis.match[1]: "bad header" is not a valid header name"#
        );
    }
}
