//! Routing by geography end to end: a `coalmine proxy` with a MaxMind DB the test writes (its
//! records checked against MaxMind's own reader in the router's unit tests), real upstreams,
//! clients placed by the `X-Forwarded-For` hop the router is told to trust, or by a CDN's header.

use crate::common;

use std::process::Command;

use coalmine_router::geo::writer::{write, Network};
use common::*;
use serde_json::json;

/// A City-shaped database: Germany, England, two US states.
fn database(dir: &TempDir) -> String {
    let networks = [
        Network::new("198.51.100.0/24", "DE", Some("BY")),
        Network::new("81.2.69.0/24", "GB", Some("ENG")),
        Network::new("203.0.113.0/25", "US", Some("CA")),
        Network::new("203.0.113.128/25", "US", Some("TX")),
    ];
    let path = dir.join("city.mmdb");
    std::fs::write(&path, write(&networks, 6, 28)).unwrap();
    path.display().to_string()
}

/// Who answered a request from `client` (as the proxy in front would append it).
async fn answered(r: &Router, client: &str) -> String {
    let response = common::client()
        .get(format!("{}/", r.base))
        .header("x-forwarded-for", format!("10.0.0.1, {client}"))
        .send()
        .await
        .unwrap();
    response.text().await.unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_from_a_country_or_region_reach_the_canary_and_no_one_else_does() {
    let dir = TempDir::new("geo");
    let db = database(&dir);
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(
        &s,
        &c,
        &[
            "--canary-weight",
            "0",
            "--geoip-db",
            &db,
            "--geo-trusted-hops",
            "1",
            "--match",
            "geo:country=DE",
        ],
    );
    assert_eq!(answered(&r, "198.51.100.7").await, "canary", "Germany");
    assert_eq!(answered(&r, "81.2.69.142").await, "stable", "England");
    assert_eq!(
        answered(&r, "192.0.2.1").await,
        "stable",
        "not in the database"
    );
    // A client that writes its own X-Forwarded-For cannot place itself: one hop is trusted, so
    // only the entry the proxy in front appended counts.
    let spoofed = common::client()
        .get(format!("{}/", r.base))
        .header("x-forwarded-for", "198.51.100.7, 192.0.2.1")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.text().await.unwrap().trim(), "stable");

    // A rollout's rule on regions, through the admin API, as a controller would send it.
    let put = put_routes(
        &r,
        json!({"match": [{"geo": "region", "regex": "US-(CA|WA|OR)"}]}),
    )
    .await;
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    assert_eq!(answered(&r, "203.0.113.5").await, "canary", "California");
    assert_eq!(answered(&r, "203.0.113.200").await, "stable", "Texas");
    assert_eq!(
        answered(&r, "198.51.100.7").await,
        "stable",
        "Germany, no longer matched"
    );
    let table = get_json(&format!("{}/routes", r.admin)).await;
    assert_eq!(
        table["match"],
        json!([{"geo": "region", "regex": "US-(CA|WA|OR)"}]),
        "{table:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdns_country_header_places_the_client_and_a_router_without_a_source_refuses_geo_rules() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(
        &s,
        &c,
        &[
            "--canary-weight",
            "0",
            "--geo-country-header",
            "CF-IPCountry",
            "--match",
            "geo:country~DE|AT|CH",
        ],
    );
    let from = |country: &'static str| {
        let url = format!("{}/", r.base);
        async move {
            let req = common::client().get(url).header("cf-ipcountry", country);
            req.send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .trim()
                .to_string()
        }
    };
    assert_eq!(from("AT").await, "canary");
    assert_eq!(from("FR").await, "stable");
    // The header gives no region: a region rule would never hold, so it is refused.
    let put = put_routes(&r, json!({"match": ["geo:region=US-CA"]})).await;
    assert_eq!(put.status(), 400);
    let said = put.text().await.unwrap();
    assert!(
        said.contains("client's region") && said.contains("--geoip-db"),
        "{said}"
    );
    assert_eq!(
        from("AT").await,
        "canary",
        "the refused change changed nothing"
    );

    // Without any source a country rule is refused at start: exit 2, the flags to use named.
    let out = Command::new(BIN)
        .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--stable", &s.url, "--match", "geo:country=DE"])
        .output()
        .unwrap();
    let (code, printed) = code_and_printed(&out);
    assert_eq!(code, 2, "{printed}");
    assert!(printed.contains("--geoip-db"), "{printed}");
    // A file that is not a MaxMind DB is said at start too.
    let dir = TempDir::new("geo-bad");
    let bad = dir.write("bad.mmdb", "not a database");
    let out = Command::new(BIN)
        .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--stable", &s.url, "--geoip-db"])
        .arg(&bad)
        .output()
        .unwrap();
    let (code, printed) = code_and_printed(&out);
    assert_eq!(code, 2, "{printed}");
    assert!(printed.contains("not a MaxMind DB file"), "{printed}");
}

/// A rollout's `analysis.match` on where clients are: an A/B release for German clients only
/// (the CDN's country header), run by `coalmine run` through the router. German clients reach
/// the canary during the analysis, French ones never do; a router that cannot place clients
/// refuses the rule, and the rollout is rolled back before any traffic moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_matching_a_country_sends_that_countrys_clients_to_the_canary() {
    let analysis = "    interval: 1s
    threshold: 2
    iterations: 4
    match:
      - geo: {country: {exact: DE}}
";
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = common::router(&["--stable", &s.url, "--geo-country-header", "cf-ipcountry"]);
    let file = common::write_rollout(
        "geo-ab",
        &common::rollout_yaml("geo-ab", &r, &s, &c, analysis),
    );
    let run = tokio::spawn(async move { common::coalmine_run(&file, &[]).await });
    let from = |country: &'static str| {
        let url = format!("{}/", r.base);
        async move {
            common::client()
                .get(url)
                .header("cf-ipcountry", country)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .trim()
                .to_string()
        }
    };
    // Wait for the analysis to apply its match, then sample both countries while it runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while from("DE").await != "canary" {
        assert!(
            std::time::Instant::now() < deadline,
            "German clients never reached the canary"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut german = Vec::new();
    let mut french = Vec::new();
    for _ in 0..20 {
        german.push(from("DE").await);
        french.push(from("FR").await);
    }
    let run = run.await.unwrap();
    assert_eq!(run.code, 0, "{:#?}\n{}", common::messages(&run), run.stderr);
    assert!(french.iter().all(|b| b == "stable"), "{french:?}");
    // Until the promotion, every German request went to the canary.
    let promoted_at = german
        .iter()
        .position(|b| b != "canary")
        .unwrap_or(german.len());
    assert!(promoted_at >= 10, "{german:?}");

    // A router that cannot place clients refuses the rule: rolled back, traffic never moved.
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let blind = common::router(&["--stable", &s.url]);
    let file = common::write_rollout(
        "geo-blind",
        &common::rollout_yaml("geo-blind", &blind, &s, &c, analysis),
    );
    let run = common::coalmine_run(&file, &[]).await;
    assert_eq!(run.code, 1, "{:#?}\n{}", common::messages(&run), run.stderr);
    let said = common::messages(&run).join("\n");
    assert!(said.contains("client's country"), "{said}");
    let table = common::get_json(&format!("{}/routes", blind.admin)).await;
    assert!(
        table["match"].as_array().is_none_or(|m| m.is_empty()),
        "{table:#}"
    );
    assert_eq!(table["canaryWeight"].as_f64(), Some(0.0), "{table:#}");
}
