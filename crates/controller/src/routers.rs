//! The traffic backend for Coalmine's own routers: their admin API (`GET`/`PUT /routes`,
//! `GET /stats`).
//!
//! A rollout owns only some fields of a router's table: its name, the two upstreams and the
//! canary's weight, plus `match`, `affinity` and `mirror` when its document sets them. It sends
//! only those (the router keeps the fields a `PUT` leaves out), so rules the router was started
//! with — the seed's `--match x-canary=true`, say — stay as they were, during and after.

use std::time::Duration;

use serde_json::Value;

use coalmine_contract::routes::{DEFAULT_AFFINITY_MAX_AGE, DEFAULT_NAME as UNCLAIMED};
use coalmine_contract::{
    Affinity, Condition, Invalid, MatchRule, RoutesDoc, RoutesPatch, ServedRoutes, StatsDoc,
    StrMatch, Subject, UpstreamUrl, OWNER_HEADER,
};
use coalmine_rollout::Traffic;
use coalmine_spec::rollout::{Analysis, HttpMatch, HttpUrl, StringMatch};

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

fn upstream(field: &str, url: &str) -> Result<UpstreamUrl, String> {
    UpstreamUrl::parse(url).map_err(|e| format!("spec.{field}: {e}"))
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
    ) -> Result<Upstreams, String> {
        let rules = |matches: &[HttpMatch],
                     field: &str|
         -> Result<Option<Vec<MatchRule>>, String> {
            if matches.is_empty() {
                return Ok(None);
            }
            matches
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    router_rule(m).map(|rule| rule.map_err(|e| format!("spec.{field}[{i}]: {e}")))
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
            }),
            mirrors: analysis.mirror || analysis.mirror_weight.is_some(),
        })
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
            stable: Some(stable.clone()),
            canary: Some(canary.cloned()),
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

/// Flagger's HTTPMatchRequest as a router rule: every header and query condition must hold.
/// `sourceLabels` needs a mesh and is dropped (`coalmine check` warns about it).
fn router_rule(m: &HttpMatch) -> Option<Result<MatchRule, Invalid>> {
    let test = |test: &StringMatch| match test {
        StringMatch::Exact(v) => Ok(StrMatch::Exact(v.clone())),
        StringMatch::Prefix(v) => Ok(StrMatch::Prefix(v.clone())),
        StringMatch::Suffix(v) => Ok(StrMatch::Suffix(v.clone())),
        StringMatch::Regex(v) => StrMatch::regex(v),
    };
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
    let all: Result<Vec<Condition>, Invalid> = headers.chain(queries).collect();
    match all {
        Ok(all) if all.is_empty() => None,
        all => Some(all.map(|all| MatchRule { all })),
    }
}

/// The canary's observations are its answers to real traffic and to mirrored copies alike
/// (Flagger's dark launch judges a mirrored canary on its own responses): the mirror's counts
/// are folded into the canary's. A copy that got no answer is a failure.
fn with_mirror_as_canary(mut stats: StatsDoc) -> StatsDoc {
    let m = std::mem::take(&mut stats.mirror);
    let c = &mut stats.canary;
    for (status, n) in &m.statuses {
        *c.statuses.entry(*status).or_default() += n;
        c.requests += n;
    }
    if m.failed > 0 {
        *c.statuses.entry(502).or_default() += m.failed;
        c.requests += m.failed;
    }
    c.latency.counts.extend(m.latency.counts);
    stats
}

/// Why a router did not take a route change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// It could not be reached or did not answer in time: worth trying again.
    #[error("{0}")]
    Unreachable(String),
    /// It answered, and no retry will change the answer: it refused the document, or it is not
    /// a Coalmine router's admin API at all.
    #[error("{0}")]
    Refused(String),
}

/// The routers carrying one rollout's traffic, driven on behalf of one controller.
#[derive(Debug, Clone)]
pub struct RouterSet {
    admins: Vec<HttpUrl>,
    client: reqwest::Client,
    /// Who drives them (see [`owner`]): every route change is sent as theirs, and a router
    /// another controller drives refuses it.
    owner: String,
}

/// How a controller names itself to the routers it drives: the rollout, then the controller
/// (`checkout (coalmine run, pid 4242 on build-7)`). Two controllers never share one, even for
/// the same rollout, so a router refuses the second.
pub fn owner(rollout: &str, controller: &str) -> String {
    format!("{rollout} ({controller})")
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
) -> Result<(), RouterError> {
    if table.canary.is_some() && table.name != rollout && table.name != UNCLAIMED {
        return Err(RouterError::Refused(format!(
            "{admin} carries rollout {:?}'s canary ({}% of traffic): another controller drives that router; finish or abort that rollout first",
            table.name,
            table.canary_weight.percent()
        )));
    }
    Ok(())
}

/// This machine's name, for telling controllers apart.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "unknown host".to_string(),
    }
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
    pub fn new(admins: Vec<HttpUrl>, owner: String) -> RouterSet {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("a TLS-less client always builds");
        RouterSet {
            admins,
            client,
            owner,
        }
    }

    pub fn admins(&self) -> &[HttpUrl] {
        &self.admins
    }

    /// Reads an answer that must be a route table (`GET` or `PUT /routes`).
    async fn table(
        &self,
        admin: &HttpUrl,
        resp: reqwest::Response,
    ) -> Result<RoutesDoc, RouterError> {
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
            .map_err(|e| RouterError::Unreachable(format!("{admin}: {}", reqwest_reason(&e))))?;
        let json: Option<Value> = serde_json::from_str(&body).ok();
        if status.is_client_error() {
            if let Some(why) = json.as_ref().and_then(|j| j["error"].as_str()) {
                return Err(RouterError::Refused(format!(
                    "{admin} refused the routes ({status}): {why}"
                )));
            }
        }
        match json.and_then(ServedRoutes::from_json) {
            Some(served) if status.is_success() => Ok(served.doc),
            _ => Err(RouterError::Refused(format!(
                "{admin} is not a Coalmine router's admin API: /routes {} (is it the traffic port? give the router's --admin address)",
                describe_answer(status, &content_type, &body)
            ))),
        }
    }

    async fn get_table(&self, admin: &HttpUrl) -> Result<RoutesDoc, RouterError> {
        let resp = self
            .client
            .get(format!("{admin}/routes"))
            .send()
            .await
            .map_err(|e| RouterError::Unreachable(format!("{admin}: {}", reqwest_reason(&e))))?;
        self.table(admin, resp).await
    }

    /// Sends a route change as this controller's: the router makes it only if no other
    /// controller drives it (it answers 409 otherwise, a refusal).
    async fn put_patch(
        &self,
        admin: &HttpUrl,
        patch: &RoutesPatch,
    ) -> Result<RoutesDoc, RouterError> {
        self.put_patch_as(admin, &self.owner, patch).await
    }

    /// Sends a route change on behalf of `owner`: made only while the router is driven by
    /// `owner` or by nobody (a compare-and-swap on the router's owner).
    async fn put_patch_as(
        &self,
        admin: &HttpUrl,
        owner: &str,
        patch: &RoutesPatch,
    ) -> Result<RoutesDoc, RouterError> {
        let resp = self
            .client
            .put(format!("{admin}/routes"))
            .header(OWNER_HEADER, owner)
            .json(patch)
            .send()
            .await
            .map_err(|e| RouterError::Unreachable(format!("{admin}: {}", reqwest_reason(&e))))?;
        self.table(admin, resp).await
    }

    /// Whether a router's table carries the patch, driven by this controller.
    fn carries(&self, patch: &RoutesPatch, table: &RoutesDoc) -> bool {
        patch.agrees_with(table) && table.owner.as_deref() == Some(self.owner.as_str())
    }

    async fn put_table(&self, admin: &HttpUrl, patch: &RoutesPatch) -> Result<(), RouterError> {
        let signed = RoutesPatch {
            owner: Some(Some(self.owner.clone())),
            ..patch.clone()
        };
        let table = self.put_patch(admin, &signed).await?;
        if self.carries(patch, &table) {
            Ok(())
        } else {
            Err(RouterError::Refused(format!(
                "{admin} answered the route change with a table that does not carry it"
            )))
        }
    }

    /// Lets the routers go once the rollout is over and nothing will drive them any more (they
    /// keep its final routes): another rollout may then take them. A router this controller
    /// no longer drives is left as it is.
    pub async fn release(&self) -> Result<(), RouterError> {
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
    pub async fn claim(&self, rollout: &str) -> Result<(), RouterError> {
        for admin in &self.admins {
            let table = match self.get_table(admin).await {
                Ok(t) => t,
                Err(RouterError::Unreachable(_)) => continue,
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
                return Err(RouterError::Refused(format!(
                    "{admin} is driven by {}: one router carries one rollout; finish or abort that rollout first (if its controller is gone, free the router: curl -X PUT {admin}/routes -H 'content-type: application/json' -d '{{\"owner\": null}}')",
                    describe_owner(owner)
                )));
            }
            refuse_another_rollouts_canary(&table, admin, rollout)?;
        }
        Ok(())
    }

    /// Applies the same patch to every router. All must take it; the first refusal is the
    /// error, else the first router that could not be reached.
    pub async fn apply(&self, patch: &RoutesPatch) -> Result<(), RouterError> {
        let mut unreachable = None;
        for admin in &self.admins {
            match self.put_table(admin, patch).await {
                Ok(()) => {}
                Err(refused @ RouterError::Refused(_)) => return Err(refused),
                Err(e) => {
                    unreachable.get_or_insert(e);
                }
            }
        }
        unreachable.map_or(Ok(()), Err)
    }

    /// Puts the patch back on every router whose table no longer carries it (a router
    /// restarted with its old command line, say). Returns the routers put right.
    pub async fn reconcile(&self, patch: &RoutesPatch) -> Result<Vec<HttpUrl>, RouterError> {
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
            Some(e) if corrected.is_empty() => Err(e),
            _ => Ok(corrected),
        }
    }

    /// Every router's `/stats`, in the order of `admins`, mirrored answers counted as the
    /// canary's.
    pub async fn stats(&self) -> Result<Vec<StatsDoc>, String> {
        let mut out = Vec::with_capacity(self.admins.len());
        for admin in &self.admins {
            let url = format!("{admin}/stats");
            let resp = self
                .client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("{admin}: {}", reqwest_reason(&e)))?;
            if !resp.status().is_success() {
                return Err(format!("{admin}/stats answered {}", resp.status()));
            }
            let stats = resp
                .json::<StatsDoc>()
                .await
                .map_err(|e| format!("{admin}/stats is not a stats document: {e}"))?;
            out.push(with_mirror_as_canary(stats));
        }
        Ok(out)
    }
}

/// reqwest's Display omits the cause ("error sending request"); the cause is what users need.
/// URLs in it are shown without credentials.
pub fn reqwest_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    if e.is_connect() {
        return "connection refused or unreachable".into();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    coalmine_spec::redact::text(&text)
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
            err,
            r#"spec.analysis.match[1]: "bad header" is not a valid header name"#
        );
    }
}
