//! One router, many services: each service chosen by host and path, its own split, its own
//! counts; two rollouts on two services of one router side by side; a rollout on a service
//! another drives refused by `serve`'s apply, by the controller's claim and by the router.

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

/// Answers by body (the upstream's name), per host, of requests sent until stopped.
type Seen = Arc<Mutex<BTreeMap<(String, String), u64>>>;

/// Users of every `(host, path)`: a request each 10 ms per pair, until `stop`.
fn users_of(
    router: &Router,
    targets: &[(&str, &str)],
    stop: &Arc<AtomicBool>,
    seen: &Seen,
) -> Vec<tokio::task::JoinHandle<()>> {
    targets
        .iter()
        .map(|(host, path)| {
            let (stop, seen) = (stop.clone(), seen.clone());
            let (host, url) = (host.to_string(), format!("{}{path}", router.base));
            tokio::spawn(async move {
                let c = client();
                // Bounded: at most 90 s of traffic.
                let deadline = Instant::now() + Duration::from_secs(90);
                while !stop.load(Relaxed) && Instant::now() < deadline {
                    let answer = c.get(&url).header("host", &host).send().await;
                    let body = match answer {
                        Ok(r) => format!(
                            "{} {}",
                            r.status().as_u16(),
                            r.text().await.unwrap_or_default().trim()
                        ),
                        Err(e) => format!("error {e}"),
                    };
                    *seen
                        .lock()
                        .unwrap()
                        .entry((host.clone(), body))
                        .or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect()
}

fn rollout(
    name: &str,
    service: &str,
    router: &Router,
    stable: &Upstream,
    canary: &Upstream,
    steps: &str,
) -> String {
    format!(
        "apiVersion: coalmine.dev/v1alpha1
kind: Rollout
metadata:
  name: {name}
spec:
  routers: [{}]
  routerService: {service}
  stable: {{url: {}}}
  canary: {{url: {}}}
  analysis:
    interval: 1s
    threshold: 2
    stepWeights: {steps}
    sequential: {{enabled: false}}
    metrics:
      - name: request-success-rate
        thresholdRange: {{min: 99}}
        interval: 5s
",
        router.admin, stable.url, canary.url
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rollouts_on_two_services_of_one_router_are_promoted_side_by_side() {
    let dir = scratch("services");
    let (shop1, shop2) = (upstream("shop-v1", &[]), upstream("shop-v2", &[]));
    let (api1, api2) = (upstream("api-v1", &[]), upstream("api-v2", &[]));
    let config = dir.write(
        "router.yaml",
        &format!(
            "services:
  - service: shop
    hosts: [shop.test]
    stable: {}
  - service: api
    hosts: ['*.api.test']
    paths: [/v1]
    stable: {}
",
            shop1.url, api1.url
        ),
    );
    let router = router(&["--config", config.to_str().unwrap()]);
    let daemon = serve(&dir);
    let (stop, seen): (_, Seen) = (Arc::new(AtomicBool::new(false)), Default::default());
    let users = users_of(
        &router,
        &[
            ("shop.test", "/cart"),
            ("eu.api.test", "/v1/pay"),
            ("elsewhere.test", "/"),
        ],
        &stop,
        &seen,
    );

    // The shop's canary climbs five steps while the api's takes half at once: each service's
    // split is its own.
    let shop = dir.write(
        "shop.yaml",
        &rollout(
            "shop-canary",
            "shop",
            &router,
            &shop1,
            &shop2,
            "[10, 20, 30, 40, 50]",
        ),
    );
    let api = dir.write(
        "api.yaml",
        &rollout("api-canary", "api", &router, &api1, &api2, "[50]"),
    );
    let started = Instant::now();
    for file in [&shop, &api] {
        let (code, out) = cli(&daemon, &["apply", file.to_str().unwrap()], Some(TOKEN));
        assert_eq!(code, 0, "{out}");
    }

    // A third rollout on the shop's service: `serve` refuses it up front, naming the service
    // and the rollout that drives it; nothing of it is stored.
    let again = dir.write(
        "again.yaml",
        &rollout("shop-again", "shop", &router, &shop1, &shop2, "[10]"),
    );
    let (code, out) = cli(&daemon, &["apply", again.to_str().unwrap()], Some(TOKEN));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(&format!("service \"shop\" of router {}", router.admin))
            && out.contains("already carries rollout \"shop-canary\""),
        "{out}"
    );
    let (_, listed) = cli(&daemon, &["status", "--output", "json"], None);
    assert!(!listed.contains("shop-again"), "{listed}");

    // `coalmine run` of it (another controller) is refused by the router's owner check, before
    // it moves anything.
    let run = coalmine_run(again.to_str().unwrap(), &[]).await;
    assert_ne!(run.code, 0, "{}", run.stderr);
    let said = format!("{}{}", run.stderr, messages(&run).join("\n"));
    assert!(
        said.contains("service \"shop\" is driven by") && said.contains("shop-canary"),
        "{said}"
    );
    // And the router itself: 409 naming the owner, for a change on another's behalf.
    let refused = client()
        .put(format!("{}/routes/shop", router.admin))
        .header("x-coalmine-owner", "someone else")
        .json(&serde_json::json!({"canaryWeight": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let refused: serde_json::Value = refused.json().await.unwrap();
    assert!(
        refused["owner"].as_str().unwrap().contains("shop-canary"),
        "{refused}"
    );

    // Both run at once: at some moment the two services have different canary weights.
    let mut pairs = Vec::new();
    let mut done = false;
    while !done {
        let routes = get_json(&format!("{}/routes", router.admin)).await;
        let weight = |i: usize| routes["services"][i]["canaryWeight"].as_f64().unwrap();
        let canary = |i: usize| !routes["services"][i]["canary"].is_null();
        if canary(0) || canary(1) {
            pairs.push((weight(0), weight(1)));
        }
        let phases: Vec<_> = ["shop-canary", "api-canary"]
            .iter()
            .map(|n| status(&daemon, n)["phase"].as_str().unwrap().to_string())
            .collect();
        done = phases.iter().all(|p| p == "Succeeded");
        assert!(
            !phases.iter().any(|p| p == "Failed"),
            "{phases:?}: {:#}",
            status(&daemon, "shop-canary")
        );
        assert!(started.elapsed() < Duration::from_secs(60), "{phases:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Relaxed);
    for u in users {
        u.await.unwrap();
    }
    assert!(
        pairs.iter().any(|(shop, api)| shop != api),
        "the two services moved together: {pairs:?}"
    );

    // Each service promoted its own canary, and only its own.
    let shop_routes = get_json(&format!("{}/routes/shop", router.admin)).await;
    let api_routes = get_json(&format!("{}/routes/api", router.admin)).await;
    assert_eq!(shop_routes["stable"], shop2.url.as_str());
    assert_eq!(api_routes["stable"], api2.url.as_str());
    assert!(shop_routes["canary"].is_null() && api_routes["canary"].is_null());

    // Every answer a host got came from its own service's versions (both of them), and a host
    // no service takes got the router's 404.
    let seen = seen.lock().unwrap().clone();
    let bodies = |host: &str| -> Vec<String> {
        seen.keys()
            .filter(|(h, _)| h == host)
            .map(|(_, b)| b.clone())
            .collect()
    };
    assert_eq!(
        bodies("shop.test"),
        ["200 shop-v1", "200 shop-v2"],
        "{seen:?}"
    );
    assert_eq!(
        bodies("eu.api.test"),
        ["200 api-v1", "200 api-v2"],
        "{seen:?}"
    );
    let elsewhere = bodies("elsewhere.test");
    assert!(
        elsewhere.len() == 1 && elsewhere[0].starts_with("404 coalmine router: no service"),
        "{elsewhere:?}"
    );

    // The counts are per service; the 404s are the router's own, no version's.
    let shop_stats = get_json(&format!("{}/stats/shop", router.admin)).await;
    let api_stats = get_json(&format!("{}/stats/api", router.admin)).await;
    let answered = |s: &serde_json::Value, v: &str| s[v]["requests"].as_u64().unwrap();
    let per_host = |host: &str| -> u64 {
        seen.iter()
            .filter(|((h, b), _)| h == host && b.starts_with("200 "))
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(
        answered(&shop_stats, "stable") + answered(&shop_stats, "canary"),
        per_host("shop.test")
    );
    assert_eq!(
        answered(&api_stats, "stable") + answered(&api_stats, "canary"),
        per_host("eu.api.test")
    );
    assert!(answered(&shop_stats, "canary") > 0 && answered(&api_stats, "canary") > 0);
    let all = get_json(&format!("{}/stats", router.admin)).await;
    let not_found: u64 = seen
        .iter()
        .filter(|((h, _), _)| h == "elsewhere.test")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        all["router"]["localFailures"]["no_service"].as_u64(),
        Some(not_found)
    );
    assert_eq!(all["services"]["shop"]["stable"], shop_stats["stable"]);
}
