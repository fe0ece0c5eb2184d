//! One router, many services: each service chosen by host and path, its own split, its own
//! counts; two rollouts on two services of one router side by side; a rollout on a service
//! another drives refused by `serve`'s apply, by the controller's claim and by the router.

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::promstack::*;
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

/// A rollout of `service` on `router`, its canary climbing `steps` every second, judged on
/// its success rate.
fn rollout(
    name: &str,
    service: &str,
    router: &Router,
    stable: &Upstream,
    canary: &Upstream,
    steps: &str,
) -> String {
    let analysis = format!(
        "    interval: 1s
    threshold: 2
    stepWeights: {steps}
    sequential: {{enabled: false}}
    metrics:
      - name: request-success-rate
        thresholdRange: {{min: 99}}
        interval: 5s
"
    );
    rollout_yaml(name, router, stable, canary, &analysis)
        .replace("spec:\n", &format!("spec:\n  routerService: {service}\n"))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_promql_with_a_service_matcher_reads_one_service_of_a_router() {
    let dir = TempDir::new("services-promql");
    let (checkout1, checkout2) = (
        upstream("checkout-v1", &[]),
        upstream("checkout-v2", &["--error-rate", "0.5", "--seed", "7"]),
    );
    let (cart1, cart2) = (upstream("cart-v1", &[]), upstream("cart-v2", &[]));
    let config = dir.write(
        "router.yaml",
        &format!(
            "services:
  - service: checkout
    hosts: [checkout.test]
    stable: {}
    canary: {}
    canaryWeight: 50
  - service: cart
    hosts: [cart.test]
    stable: {}
    canary: {}
    canaryWeight: 50
",
            checkout1.url, checkout2.url, cart1.url, cart2.url
        ),
    );
    let router = router(&["--config", config.to_str().unwrap()]);
    // No `service` target label: the router's own label names each series' service.
    let scrape = vec![ScrapeTarget::new("coalmine-router", &router.admin)];
    let prometheus = tokio::task::spawn_blocking(move || {
        Prometheus::start(PrometheusSetup {
            scrape,
            ..PrometheusSetup::default()
        })
    })
    .await
    .unwrap();
    prometheus
        .wait_for_targets_up(1, Duration::from_secs(20))
        .await;
    // Users of both services until Prometheus has seen their counts rise (a rate needs a
    // series' two scrapes, and a series that first appears already counted has risen by none).
    let (stop, seen): (_, Seen) = (Arc::new(AtomicBool::new(false)), Default::default());
    let users = users_of(
        &router,
        &[("checkout.test", "/"), ("cart.test", "/")],
        &stop,
        &seen,
    );
    let total = |service: &str| format!("sum(http_requests_total{{service=\"{service}\"}})");
    for service in ["checkout", "cart"] {
        prometheus
            .wait_until(&total(service), |n| n >= 200.0, Duration::from_secs(30))
            .await;
    }
    // The seed's query, with a service matcher: checkout's failing canary is seen, and only it.
    let errors = |service: &str| {
        format!("rate(http_requests_total{{service=\"{service}\",status=~\"5..\",version=\"canary\"}}[5m])")
    };
    // (A rate needs two scrapes of the series.)
    prometheus
        .wait_until(
            &format!("sum({})", errors("checkout")),
            |r| r > 0.0,
            Duration::from_secs(20),
        )
        .await;
    stop.store(true, Relaxed);
    for u in users {
        u.await.unwrap();
    }
    let failing = prometheus.query_vector(&errors("checkout")).await;
    assert_eq!(failing.len(), 1, "{failing:?}");
    assert_eq!(failing[0].labels["service"], "checkout");
    assert_eq!(failing[0].labels["status"], "500");
    assert!(failing[0].value > 0.0, "{failing:?}");
    assert!(prometheus.query_vector(&errors("cart")).await.is_empty());
    // Its 5xx ratio: about half of ~100 canary requests (binomial: 0.5 ± 4 × 0.05).
    let ratio = prometheus
        .value(&format!(
            "sum({}) / sum(rate(http_requests_total{{service=\"checkout\",version=\"canary\"}}[5m]))",
            errors("checkout")
        ))
        .await
        .unwrap();
    assert!((0.3..=0.7).contains(&ratio), "{ratio}");
    // Every per-version series carries its service.
    for metric in [
        "http_request_duration_seconds_count",
        "coalmine_router_upstream_failures_total",
        "coalmine_router_upstream_retries_total",
    ] {
        let samples = prometheus.query_vector(metric).await;
        assert!(!samples.is_empty(), "{metric}");
        assert!(
            samples
                .iter()
                .all(|s| ["checkout", "cart"].contains(&s.labels["service"].as_str())),
            "{metric}: {samples:?}"
        );
    }
}

/// The body a request with this Host gets.
async fn answer(router: &Router, host: &str) -> String {
    let resp = client()
        .get(format!("{}/", router.base))
        .header("host", host)
        .send()
        .await
        .unwrap();
    format!(
        "{} {}",
        resp.status().as_u16(),
        resp.text().await.unwrap().trim()
    )
}

/// `PUT /routes/{service}` (on behalf of `owner`, if given): the status and the JSON answer.
async fn put_service(
    router: &Router,
    service: &str,
    owner: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut put = client().put(format!("{}/routes/{service}", router.admin));
    if let Some(owner) = owner {
        put = put.header("x-coalmine-owner", owner);
    }
    let resp = put.json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn delete_service(router: &Router, service: &str, owner: Option<&str>) -> u16 {
    let mut delete = client().delete(format!("{}/routes/{service}", router.admin));
    if let Some(owner) = owner {
        delete = delete.header("x-coalmine-owner", owner);
    }
    delete.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_adds_changes_and_deletes_services_and_refuses_what_is_wrong() {
    let (v1, v2) = (upstream("v1", &[]), upstream("v2", &[]));
    let router = router(&["--stable", &v1.url]);
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(
        routes["stable"],
        v1.url.as_str(),
        "the default service at the top"
    );
    assert_eq!(routes["services"].as_array().unwrap().len(), 1);
    assert_eq!(routes["services"][0]["service"], "default");

    // A new service from a whole document, at the end of the table.
    let (status, cart) = put_service(
        &router,
        "cart",
        None,
        serde_json::json!({"stable": v2.url, "hosts": ["cart.test"]}),
    )
    .await;
    assert_eq!(status, 200, "{cart}");
    assert_eq!(
        (cart["service"].as_str(), cart["generation"].as_u64()),
        (Some("cart"), Some(2))
    );
    assert_eq!(answer(&router, "Cart.Test").await, "200 v2");
    assert_eq!(
        answer(&router, "shop.test").await,
        "200 v1",
        "the default takes the rest"
    );
    // A partial document keeps the rest of the service.
    let (status, cart) = put_service(
        &router,
        "cart",
        None,
        serde_json::json!({"canaryWeight": 10}),
    )
    .await;
    assert_eq!(status, 200, "{cart}");
    assert_eq!(cart["hosts"], serde_json::json!(["cart.test"]));

    // Owners are per service: one controller's claim on cart leaves the default free.
    let (status, _) = put_service(
        &router,
        "cart",
        Some("ctl-a"),
        serde_json::json!({"owner": "ctl-a"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, refused) = put_service(
        &router,
        "cart",
        Some("ctl-b"),
        serde_json::json!({"canaryWeight": 50}),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(
        (refused["owner"].as_str(), refused["service"].as_str()),
        (Some("ctl-a"), Some("cart"))
    );
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("PUT /routes/cart"),
        "{refused}"
    );
    assert_eq!(delete_service(&router, "cart", Some("ctl-b")).await, 409);
    let (status, _) = put_service(
        &router,
        "default",
        Some("ctl-b"),
        serde_json::json!({"owner": "ctl-b"}),
    )
    .await;
    assert_eq!(
        status, 200,
        "another service is another controller's to drive"
    );

    // Refusals change nothing.
    let before = get_json(&format!("{}/routes", router.admin)).await;
    for (service, owner, body, status, says) in [
        (
            "new",
            Some("ctl-a"),
            serde_json::json!({"stable": v1.url}),
            404,
            "no service \"new\"",
        ),
        (
            "Bad!",
            None,
            serde_json::json!({"stable": v1.url}),
            400,
            "not a service name",
        ),
        (
            "x",
            None,
            serde_json::json!({"service": "y", "stable": v1.url}),
            400,
            "the path names service \"x\"",
        ),
        (
            "x",
            None,
            serde_json::json!({"canaryWeight": 5}),
            400,
            "stable",
        ),
        (
            "x",
            None,
            serde_json::json!({"stable": v1.url, "hosts": ["x.test:80"]}),
            400,
            "hosts[0]",
        ),
        (
            "x",
            None,
            serde_json::json!({"stable": v1.url, "paths": ["x"]}),
            400,
            "paths[0]",
        ),
    ] {
        let (got, answer) = put_service(&router, service, owner, body).await;
        assert_eq!(got, status, "{service}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(says), "{service}: {error}");
    }
    assert_eq!(get_json(&format!("{}/routes", router.admin)).await, before);

    // Deleted, a service's requests go to the next service that takes them; its counts stay.
    assert_eq!(delete_service(&router, "cart", Some("ctl-a")).await, 200);
    assert_eq!(answer(&router, "cart.test").await, "200 v1");
    let gone = client()
        .get(format!("{}/routes/cart", router.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    let counted = get_json(&format!("{}/stats/cart", router.admin)).await;
    assert_eq!(counted["stable"]["requests"], 1);
    // With no service left, every request is the router's 404, no version's.
    assert_eq!(delete_service(&router, "default", None).await, 200);
    assert!(answer(&router, "cart.test")
        .await
        .starts_with("404 coalmine router: no service"));
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["services"], serde_json::json!([]));
    assert!(routes.get("stable").is_none(), "{routes}");
    let stats = get_json(&format!("{}/stats", router.admin)).await;
    assert_eq!(stats["router"]["localFailures"]["no_service"], 1);

    // A rollout for a service the router lacks is refused before anything moves, naming the
    // services it has; the controller adds none.
    let (status, _) = put_service(
        &router,
        "shop",
        None,
        serde_json::json!({"stable": v1.url, "hosts": ["shop.test"]}),
    )
    .await;
    assert_eq!(status, 200);
    let steps = "    interval: 1s\n    stepWeights: [50]\n";
    for (yaml, says) in [
        (
            rollout_yaml("shop", &router, &v1, &v2, steps),
            "has no service \"default\" (its services: shop): name the rollout's with spec.routerService",
        ),
        (
            rollout_yaml("shop", &router, &v1, &v2, steps)
                .replace("spec:\n", "spec:\n  routerService: cart\n"),
            "this router has no service \"cart\"",
        ),
    ] {
        let file = write_rollout("services-missing", &yaml);
        let run = coalmine_run(&file, &[]).await;
        assert_ne!(run.code, 0, "{}", run.stderr);
        let said = format!("{}{}", run.stderr, messages(&run).join("\n"));
        assert!(said.contains(says), "{said}");
    }
    let routes = get_json(&format!("{}/routes", router.admin)).await;
    assert_eq!(routes["services"].as_array().unwrap().len(), 1, "{routes}");
    assert!(routes["services"][0]["canary"].is_null(), "{routes}");
}

#[test]
fn a_config_file_names_each_service_once_and_route_flags_need_the_default_service() {
    let dir = TempDir::new("services-config");
    let proxy = |args: &[&str]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(args);
        code_and_printed(&cmd.output().unwrap())
    };
    let twice = dir.write(
        "twice.yaml",
        "stable: http://127.0.0.1:1
services:
  - service: cart
    stable: http://127.0.0.1:2
  - service: default
    stable: http://127.0.0.1:3
",
    );
    let (code, out) = proxy(&["--config", twice.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(
            "twice.yaml: services[2].service: \"default\" is already the name of services[0]"
        ) && out.contains("the top-level routes are service \"default\""),
        "{out}"
    );
    let bad_host = dir.write(
        "host.yaml",
        "services:
  - service: cart
    hosts: [cart.test, 'cart test']
    stable: http://127.0.0.1:2
",
    );
    let (code, out) = proxy(&["--config", bad_host.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("host.yaml:3:") && out.contains("not a host name"),
        "{out}"
    );
    let (code, out) = proxy(&[
        "--config",
        bad_host.to_str().unwrap(),
        "--canary",
        "http://127.0.0.1:4",
    ]);
    assert_eq!(code, 2, "{out}");
    let no_stable = dir.write(
        "no-stable.yaml",
        "services:\n  - service: cart\n    stable: http://127.0.0.1:2\n",
    );
    let (code, out) = proxy(&[
        "--config",
        no_stable.to_str().unwrap(),
        "--canary",
        "http://127.0.0.1:4",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("canary sets the default service's routes, which needs --stable"),
        "{out}"
    );
}

/// `n` HTTP/2 requests of `method` to `http://{host}/x` over one connection to the router (at
/// most 8 in flight), with `body`: each answer's status, 0 for a stream that broke.
async fn h2_statuses(
    router: &Router,
    host: &str,
    method: &str,
    body: &'static [u8],
    n: usize,
) -> Vec<u16> {
    use http_body_util::{BodyExt, Full};
    let sender = h2c::<Full<bytes::Bytes>>(router).await;
    let mut statuses = Vec::with_capacity(n);
    for batch in (0..n).collect::<Vec<_>>().chunks(8) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|_| {
                let mut sender = sender.clone();
                let request = hyper::Request::builder()
                    .method(method)
                    .uri(format!("http://{host}/x"))
                    .body(Full::new(bytes::Bytes::from_static(body)))
                    .unwrap();
                tokio::spawn(async move {
                    let resp = sender.send_request(request).await?;
                    let status = resp.status().as_u16();
                    resp.into_body().collect().await?;
                    Ok::<_, hyper::Error>(status)
                })
            })
            .collect();
        for t in tasks {
            statuses.push(t.await.unwrap().unwrap_or(0));
        }
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_count_for_the_service_that_took_them_on_every_upstream_path() {
    // HTTP/2 requests without a body go upstream on the router's own connections, those with
    // one over hyper's client: answers, retries, failures and mirrored copies are all the
    // service's, none the default service's. cart's stable resets 5 % of connections after
    // reading a request (a GET on a reused connection is then sent again, once).
    let (v1, v2, v3) = (
        upstream("v1", &[]),
        upstream("v2", &["--reset-rate", "0.05", "--seed", "17"]),
        upstream("v3", &[]),
    );
    let router = router(&["--stable", &v1.url]);
    let cart = serde_json::json!({
        "stable": v2.url, "canary": v3.url, "canaryWeight": 0, "mirror": 100,
        "hosts": ["cart.test"],
    });
    assert_eq!(put_service(&router, "cart", None, cart).await.0, 200);
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let gone = serde_json::json!({"stable": nowhere, "hosts": ["gone.test"]});
    assert_eq!(put_service(&router, "gone", None, gone).await.0, 200);

    let gets = h2_statuses(&router, "cart.test", "GET", b"", 400).await;
    let posts = h2_statuses(&router, "cart.test", "POST", b"hello", 100).await;
    let refused = h2_statuses(&router, "gone.test", "GET", b"", 20).await;
    let seen = |s: &[u16], pred: fn(u16) -> bool| s.iter().filter(|c| pred(**c)).count() as u64;
    assert_eq!(
        seen(&gets, |c| c == 0) + seen(&posts, |c| c == 0),
        0,
        "no stream broke"
    );
    assert_eq!(seen(&refused, |c| c == 502), 20, "{refused:?}");

    // Mirrored copies are counted when their answers have been read: wait (bounded) for all.
    let deadline = Instant::now() + Duration::from_secs(10);
    let cart = loop {
        let st = get_json(&format!("{}/stats/cart", router.admin)).await;
        let m = &st["mirror"];
        let settled = ["requests", "failed", "dropped"]
            .iter()
            .map(|k| m[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        if settled == 400 || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stable = &cart["stable"];
    let failed = |s: &[u16]| seen(s, |c| c >= 500);
    assert_eq!(stable["requests"], 500, "{cart}");
    assert_eq!(
        stable["statuses"]["200"].as_u64().unwrap_or(0),
        seen(&gets, |c| c == 200) + seen(&posts, |c| c == 200),
        "{cart}"
    );
    assert_eq!(
        server_errors(stable),
        failed(&gets) + failed(&posts),
        "{cart}"
    );
    // P(no reset among 400 GETs) = 0.95^400 < 1e-8; after the first batch every GET starts
    // on a reused connection, so a reset is retried.
    assert!(stable["retries"].as_u64().unwrap() > 0, "{cart}");
    assert_eq!(cart["canary"]["requests"], 0, "{cart}");
    let mirror = &cart["mirror"];
    assert_eq!(mirror["skippedWithBody"], 100, "{cart}");
    assert_eq!(
        mirror["requests"].as_u64().unwrap()
            + mirror["failed"].as_u64().unwrap()
            + mirror["dropped"].as_u64().unwrap(),
        400,
        "{cart}"
    );
    assert!(mirror["requests"].as_u64().unwrap() > 0, "{cart}");

    let gone = get_json(&format!("{}/stats/gone", router.admin)).await;
    assert_eq!(gone["stable"]["statuses"]["502"], 20, "{gone}");
    assert_eq!(gone["stable"]["failures"]["connect"], 20, "{gone}");

    // Nothing of it is the default service's.
    let default = get_json(&format!("{}/stats/default", router.admin)).await;
    for version in ["stable", "canary"] {
        assert_eq!(default[version]["requests"], 0, "{default}");
        assert_eq!(default[version]["retries"], 0, "{default}");
    }
    assert_eq!(default["mirror"]["requests"], 0, "{default}");
    assert_eq!(default["mirror"]["skippedWithBody"], 0, "{default}");
}
