//! What `serve` runs itself for its rollouts: the versions of command targets (through the
//! targets seam) and routers (`spec.router`, through the [`RouterHost`] the binary gives), kept
//! across runs of a rollout and stopped when they leave service.

use std::collections::HashMap;
use std::net::{AddrParseError, SocketAddr};
use std::sync::{Arc, Mutex};

use coalmine_contract::{Invalid, RoutesDoc, UpstreamUrl};
use coalmine_rollout::Outcome;
use coalmine_spec::rollout::{HttpUrl, Rollout, Target};

use crate::targets::{self, TargetError, Version};

/// Runs routers inside `serve`'s process for the rollouts that ask for one (`spec.router`).
/// The binary provides it, so the controller does not link the router's server.
pub trait RouterHost: Send + Sync {
    /// Starts a router carrying `routes`, serving traffic on `listen` and its admin API on
    /// `admin` (port 0: any free one).
    fn start(
        &self,
        listen: SocketAddr,
        admin: SocketAddr,
        routes: RoutesDoc,
    ) -> Result<Box<dyn HostedRouter>, Box<dyn std::error::Error + Send + Sync>>;
}

/// A router `serve` runs.
pub trait HostedRouter: Send {
    /// Where its admin API listens.
    fn admin(&self) -> SocketAddr;
    /// Drains it and joins its threads (blocking).
    fn shut_down(self: Box<Self>);
}

/// Why a hosted router did not start.
#[derive(Debug, thiserror::Error)]
pub(super) enum HostError {
    #[error("spec.stable: a hosted router needs a url")]
    NeedsUrl,
    #[error("spec.router.listen: {0}")]
    Listen(AddrParseError),
    #[error("spec.router.admin: {0}")]
    Admin(AddrParseError),
    #[error("{0}")]
    Stable(Invalid),
    #[error("spec.router: {0}")]
    Start(Box<dyn std::error::Error + Send + Sync>),
    #[error("spec.router: this daemon cannot host routers")]
    NoHost,
}

/// Why a rollout's versions or hosted router did not start.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    #[error("spec.{field}: {source}")]
    Target {
        field: &'static str,
        source: TargetError,
    },
    #[error(transparent)]
    Host(#[from] HostError),
}

/// The processes and routers `serve` runs, by rollout.
pub(super) struct Hosted {
    host: Option<Arc<dyn RouterHost>>,
    routers: Mutex<HashMap<String, Running>>,
    /// Held across awaits (starting a version waits for its readiness), hence tokio's mutex.
    versions: tokio::sync::Mutex<HashMap<String, Versions>>,
}

/// A router `serve` runs itself for a rollout, and where it serves traffic.
struct Running {
    listen: String,
    router: Box<dyn HostedRouter>,
}

/// The versions serving one rollout.
#[derive(Default)]
struct Versions {
    stable: Option<Box<dyn Version>>,
    canary: Option<Box<dyn Version>>,
}

impl Hosted {
    pub(super) fn new(host: Option<Arc<dyn RouterHost>>) -> Hosted {
        Hosted {
            host,
            routers: Mutex::new(HashMap::new()),
            versions: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The rollout as it runs: each version started and ready (the stable one is kept across
    /// runs while its target is unchanged: after a promotion it is the canary of the run
    /// before), each target replaced by the URL its version serves on, and its hosted router
    /// (if any) started and added to its routers.
    pub(super) async fn start(&self, rollout: &Rollout) -> Result<Rollout, StartError> {
        let mut effective = rollout.clone();
        let name = &rollout.metadata.name;
        {
            let mut all = self.versions.lock().await;
            let versions = all.entry(name.clone()).or_default();
            if let Some(target) = &rollout.spec.stable {
                if versions.stable.as_ref().is_none_or(|v| !v.runs(target)) {
                    versions.stable = Some(start("stable", target).await?);
                }
            }
            if let Some(target) = &rollout.spec.canary {
                versions.canary = Some(start("canary", target).await?);
            }
            for (version, target) in [
                (&versions.stable, &mut effective.spec.stable),
                (&versions.canary, &mut effective.spec.canary),
            ] {
                if let (Some(version), Some(_)) = (version, &*target) {
                    *target = Some(Target::Url(version.url().clone()));
                }
            }
        }
        if let Some(hosted) = &rollout.spec.router {
            let admin = self.router(&effective, &hosted.listen, hosted.admin.as_deref())?;
            effective.spec.routers.push(admin);
        }
        Ok(effective)
    }

    /// The run ended: the version that lost stops serving.
    pub(super) async fn retire(&self, name: &str, outcome: Outcome) {
        let mut all = self.versions.lock().await;
        if let Some(versions) = all.get_mut(name) {
            // Said again (a group's end after a restart) it stops nothing more.
            let lost = match outcome {
                Outcome::Promoted => match versions.canary.take() {
                    Some(new) => versions.stable.replace(new),
                    None => None,
                },
                Outcome::RolledBack => versions.canary.take(),
            };
            if let Some(lost) = lost {
                lost.stop().await;
            }
        }
    }

    /// The rollout is forgotten: its versions and router stop.
    pub(super) async fn forget(&self, name: &str) {
        if let Some(hosted) = self.routers.lock().expect("routers").remove(name) {
            // Shutting down joins its threads after a drain: not on an async worker.
            tokio::task::spawn_blocking(move || hosted.router.shut_down());
        }
        if let Some(versions) = self.versions.lock().await.remove(name) {
            for version in [versions.stable, versions.canary].into_iter().flatten() {
                version.stop().await;
            }
        }
    }

    /// The daemon stops: so do its routers (versions stop as they are dropped).
    pub(super) fn shut_down(&self) {
        for (_, hosted) in self.routers.lock().expect("routers").drain() {
            hosted.router.shut_down();
        }
    }

    /// The admin address of the rollout's hosted router, started unless it already runs on
    /// `listen`.
    fn router(
        &self,
        rollout: &Rollout,
        listen: &str,
        admin: Option<&str>,
    ) -> Result<HttpUrl, HostError> {
        let name = &rollout.metadata.name;
        let mut routers = self.routers.lock().expect("routers");
        if let Some(r) = routers.get(name).filter(|r| r.listen == listen) {
            return Ok(admin_url(r.router.admin()));
        }
        if let Some(old) = routers.remove(name) {
            // Shutting down joins its threads after a drain: not on an async worker.
            tokio::task::spawn_blocking(move || old.router.shut_down());
        }
        let host = self.host.as_ref().ok_or(HostError::NoHost)?;
        let Some(Target::Url(stable)) = &rollout.spec.stable else {
            return Err(HostError::NeedsUrl);
        };
        let stable = UpstreamUrl::parse(stable.as_str()).map_err(HostError::Stable)?;
        let mut routes = RoutesDoc::stable_only(stable.into());
        routes.name = name.clone();
        // Its own router's one service, taking every request: the one the rollout drives.
        routes.service = rollout.spec.router_service().to_string();
        let router = host
            .start(
                listen.parse().map_err(HostError::Listen)?,
                admin
                    .unwrap_or("127.0.0.1:0")
                    .parse()
                    .map_err(HostError::Admin)?,
                routes,
            )
            .map_err(HostError::Start)?;
        let admin = admin_url(router.admin());
        routers.insert(
            name.clone(),
            Running {
                listen: listen.to_string(),
                router,
            },
        );
        Ok(admin)
    }
}

async fn start(field: &'static str, target: &Target) -> Result<Box<dyn Version>, StartError> {
    targets::start(target)
        .await
        .map_err(|source| StartError::Target { field, source })
}

fn admin_url(admin: SocketAddr) -> HttpUrl {
    HttpUrl::parse(&format!("http://{admin}")).expect("a socket address makes an HTTP URL")
}
