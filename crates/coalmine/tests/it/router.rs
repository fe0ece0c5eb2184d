//! The router end to end: real `coalmine proxy` and `coalmine upstream` processes on 127.0.0.1.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::json;

fn canary_share(bodies: &[String]) -> f64 {
    bodies.iter().filter(|b| b.trim() == "canary").count() as f64 / bodies.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_within_binomial_bounds() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(&s, &c, &["--canary-weight", "5"]);
    let n = 20_000;
    let got = bodies(&format!("{}/", r.base), n, 16).await;
    assert_eq!(got.len(), n);
    // Binomial(20000, 0.05): sd = 30.8 requests = 0.154 %; ±0.5 % is ±3.2 sd (p ≈ 0.0014).
    let share = canary_share(&got);
    assert!((0.045..=0.055).contains(&share), "canary share {share}");
    // The router's own counts agree with what clients saw.
    let st = stats(&r).await;
    let canary = st["canary"]["statuses"]["200"].as_u64().unwrap();
    assert_eq!(
        canary as usize,
        got.iter().filter(|b| b.trim() == "canary").count()
    );
    assert_eq!(
        st["stable"]["requests"].as_u64().unwrap() + canary,
        n as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_match_kind_sends_to_canary_at_weight_zero() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(
        &s,
        &c,
        &[
            "--canary-weight",
            "0",
            "--match",
            "x-canary=true",
            "--match",
            "user-id~^(1|2|3|4|5)$",
            "--match",
            "cookie:canary=always",
            "--match",
            "query:beta=on",
        ],
    );
    let cl = client();
    let send =
        |req: reqwest::RequestBuilder| async move { req.text_body().await.trim().to_string() };
    let url = format!("{}/x", r.base);
    assert_eq!(
        send(cl.get(&url).header("x-canary", "true")).await,
        "canary"
    );
    assert_eq!(
        send(cl.get(&url).header("x-canary", "false")).await,
        "stable"
    );
    for user in 1..=5 {
        assert_eq!(
            send(cl.get(&url).header("user-id", user.to_string())).await,
            "canary"
        );
    }
    for user in ["6", "15", "0"] {
        assert_eq!(send(cl.get(&url).header("user-id", user)).await, "stable");
    }
    assert_eq!(
        send(cl.get(&url).header("cookie", "a=1; canary=always")).await,
        "canary"
    );
    assert_eq!(
        send(cl.get(&url).header("cookie", "canary=never")).await,
        "stable"
    );
    assert_eq!(send(cl.get(format!("{url}?q=1&beta=on"))).await, "canary");
    assert_eq!(send(cl.get(format!("{url}?beta=off"))).await, "stable");
    assert_eq!(send(cl.get(&url)).await, "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_keep_their_version_and_only_move_to_canary_as_weight_rises() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(
        &s,
        &c,
        &["--canary-weight", "5", "--sticky-header", "x-user"],
    );
    let cl = client();
    let users = 400;
    let mut on_canary = vec![false; users];
    let mut seen_counts = Vec::new();
    let mut previous_weight = 0.0;
    for weight in [5.0, 10.0, 25.0, 50.0, 25.0, 5.0] {
        assert!(put_routes(&r, json!({"canaryWeight": weight}))
            .await
            .status()
            .is_success());
        let mut count = 0;
        for (user, was) in on_canary.iter_mut().enumerate() {
            let mut versions = Vec::new();
            for _ in 0..2 {
                let b = cl
                    .get(format!("{}/", r.base))
                    .header("x-user", format!("u{user}"))
                    .text_body()
                    .await;
                versions.push(b.trim() == "canary");
            }
            assert_eq!(
                versions[0], versions[1],
                "user {user} flipped at a fixed weight {weight}"
            );
            let now = versions[0];
            if weight > previous_weight {
                assert!(
                    !*was || now,
                    "user {user} left the canary when weight rose to {weight}"
                );
            } else {
                assert!(
                    *was || !now,
                    "user {user} joined the canary when weight fell to {weight}"
                );
            }
            *was = now;
            count += usize::from(now);
        }
        previous_weight = weight;
        seen_counts.push((weight, count));
    }
    // Shares near the weights: 400 users, sd ≤ 10 users, bounds at 5 sd.
    for (w, count) in &seen_counts {
        let expected = users as f64 * w / 100.0;
        assert!(
            (*count as f64 - expected).abs() <= 50.0,
            "weight {w}: {count} users on canary"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_cookie_pins_users_who_got_the_canary() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(
        &s,
        &c,
        &[
            "--canary-weight",
            "50",
            "--affinity-cookie",
            "coalmine-canary",
        ],
    );
    let cl = client();
    let mut cookie = None;
    for _ in 0..200 {
        let resp = cl.get(format!("{}/", r.base)).send().await.unwrap();
        let set = resp
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.text().await.unwrap();
        assert_eq!(
            set.is_some(),
            body.trim() == "canary",
            "only canary answers set the cookie"
        );
        if let Some(set) = set {
            assert!(set.contains("Max-Age=86400"), "{set}");
            cookie = Some(set.split(';').next().unwrap().to_string());
        }
    }
    let cookie = cookie.expect("some request reached the canary at 50 %");
    for _ in 0..100 {
        let body = cl
            .get(format!("{}/", r.base))
            .header("cookie", &cookie)
            .text_body()
            .await;
        assert_eq!(body.trim(), "canary");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_route_swaps_under_load_fail_no_request() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(&s, &c, &["--canary-weight", "5"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (cl, url, stop) = (client(), format!("{}/", r.base), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            // Bounded: stops when told, and never runs past 60,000 requests.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok < 60_000 {
                match cl.get(&url).send().await {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.bytes().await.unwrap();
                        ok += 1;
                    }
                    Ok(resp) => failed.push(resp.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let weights = [0.0, 5.0, 10.0, 25.0, 50.0, 100.0, 50.0, 0.5, 33.33, 1.0];
    for i in 0..100 {
        let mut doc = json!({"canaryWeight": weights[i % weights.len()]});
        if i % 10 == 9 {
            doc["match"] = json!(["x-canary=true"]); // whole-document changes too
        }
        let resp = put_routes(&r, doc).await;
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        let (ok, failed) = t.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during swaps: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 500, "load too light to mean anything: {total}");
    let routes: serde_json::Value = get_json(&format!("{}/routes", r.admin)).await;
    assert_eq!(routes["generation"], 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_route_document_is_refused_and_changes_nothing() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(&s, &c, &["--canary-weight", "5"]);
    let before: serde_json::Value = get_json(&format!("{}/routes", r.admin)).await;
    for (bad, mentions) in [
        (json!({"canaryWeight": 150}), "canaryWeight"),
        (json!({"canaryWeight": 5, "stable": "not a url"}), "stable"),
        (json!({"match": ["user-id~(unclosed"]}), "regex"),
        (json!({"canaryWieght": 5}), "canaryWieght"),
        (json!({"mirror": -1}), "mirror"),
    ] {
        let resp = put_routes(&r, bad.clone()).await;
        assert_eq!(resp.status(), 400, "{bad}");
        let err: serde_json::Value = resp.json().await.unwrap();
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains(mentions), "{bad} → {msg}");
    }
    let resp = client()
        .put(format!("{}/routes", r.admin))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let after: serde_json::Value = get_json(&format!("{}/routes", r.admin)).await;
    assert_eq!(before, after);
    assert_eq!(after["canaryWeight"], 5.0);
    // Re-sending the current table (the controller does, every interval) is not a swap.
    let resp = put_routes(&r, json!({"canaryWeight": 5})).await;
    assert_eq!(resp.status(), 200);
    let again: serde_json::Value = get_json(&format!("{}/routes", r.admin)).await;
    assert_eq!(again["generation"], before["generation"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2c_reach_http1_upstream_with_host_kept_and_xff_appended() {
    let s = upstream("stable", &[]);
    let r = router(&["--stable", &s.url]);
    for h2 in [false, true] {
        let cl = if h2 {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap()
        } else {
            client()
        };
        let resp = cl
            .post(format!("{}/echo?a=1", r.base))
            .header("x-forwarded-for", "10.1.2.3")
            .header("connection", "keep-alive")
            .body(vec![7u8; 300_000])
            .send()
            .await
            .unwrap();
        let expected_version = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(resp.version(), expected_version);
        let echo: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(echo["uri"], "/echo?a=1");
        assert_eq!(echo["bodyBytes"], 300_000);
        let host = r.base.trim_start_matches("http://");
        assert_eq!(
            echo["headers"]["host"], host,
            "Host kept (h2: from :authority)"
        );
        assert_eq!(echo["headers"]["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
        assert!(
            echo["headers"].get("connection").is_none(),
            "hop-by-hop header forwarded"
        );
    }
    // A large response streams back intact.
    let big = client()
        .get(format!("{}/bytes/5000000", r.base))
        .send()
        .await
        .unwrap();
    assert_eq!(big.bytes().await.unwrap().len(), 5_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_request_headers_reach_the_upstream_on_every_request_path() {
    // HTTP/1.1 takes the fast path, HTTP/2 without a body the router's own upstream
    // connections, HTTP/2 with a body hyper's client: the route's header changes on each.
    let s = upstream("stable", &[]);
    let r = router(&["--stable", &s.url]);
    let changes = serde_json::json!({"requestHeaders": {
        "set": [{"name": "x-env", "value": "shop"}],
        "remove": ["x-debug"],
    }});
    let put = client()
        .put(format!("{}/routes/default", r.admin))
        .json(&changes)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let paths = [
        ("HTTP/1.1", client(), None),
        ("HTTP/2 without a body", h2.clone(), None),
        ("HTTP/2 with a body", h2, Some(vec![7u8; 1000])),
    ];
    for (path, cl, body) in paths {
        let mut request = match &body {
            Some(b) => cl.post(format!("{}/echo", r.base)).body(b.clone()),
            None => cl.get(format!("{}/echo", r.base)),
        };
        request = request.header("x-env", "client").header("x-debug", "1");
        let echo: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
        let headers = &echo["headers"];
        assert_eq!(headers["x-env"], "shop", "{path}: {echo}");
        assert!(headers.get("x-debug").is_none(), "{path}: {echo}");
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{path}: {echo}");
        assert_eq!(echo["bodyBytes"], body.map_or(0, |b| b.len()), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    // A real WebSocket echo server as the upstream.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let r = router(&["--stable", &format!("http://{ws_addr}")]);
    let url = format!("{}/chat", r.base.replace("http://", "ws://"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade through router");
    assert_eq!(resp.status(), 101);
    for i in 0..50 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    ws.send(Message::binary(vec![1u8; 100_000])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().len(), 100_000);
    let st = stats(&r).await;
    assert_eq!(st["stable"]["statuses"]["101"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_canary_answers_502_counted_as_canary_5xx() {
    let s = upstream("stable", &[]);
    // A port that was just free: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = router(&[
        "--stable",
        &s.url,
        "--canary",
        &format!("http://{dead}"),
        "--canary-weight",
        "100",
    ]);
    let cl = client();
    for _ in 0..20 {
        let resp = cl.get(format!("{}/", r.base)).send().await.unwrap();
        assert_eq!(resp.status(), 502);
    }
    let st = stats(&r).await;
    assert_eq!(st["canary"]["statuses"]["502"], 20);
    assert_eq!(st["canary"]["failures"]["connect"], 20);
    assert_eq!(st["stable"]["requests"], 0);
    let metrics = metrics_text(&r.admin).await;
    assert!(
        metrics.contains(
            "http_requests_total{service=\"default\",version=\"canary\",status=\"502\"} 20\n"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_answers_504_after_the_response_timeout() {
    let s = upstream("stable", &[]);
    let r = router(&["--stable", &s.url, "--response-timeout", "300ms"]);
    let started = std::time::Instant::now();
    let resp = client()
        .get(format!("{}/sleep/3000", r.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(2500));
    let st = stats(&r).await;
    assert_eq!(st["stable"]["statuses"]["504"], 1);
    assert_eq!(st["stable"]["failures"]["timeout"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_copies_to_canary_and_leaves_responses_unchanged() {
    let (s, c) = (
        upstream("stable", &[]),
        upstream("canary", &["--error-rate", "1"]),
    );
    let r = split_router(&s, &c, &["--canary-weight", "0", "--mirror", "100"]);
    let got = bodies(&format!("{}/", r.base), 400, 4).await;
    assert!(
        got.iter().all(|b| b == "stable\n"),
        "a user saw something other than stable"
    );
    // Copies are fire-and-forget: give the last ones a moment to land.
    let mut mirrored = 0;
    for _ in 0..50 {
        let st = stats(&r).await;
        mirrored = st["mirror"]["statuses"]["500"].as_u64().unwrap_or(0);
        if mirrored + st["mirror"]["dropped"].as_u64().unwrap() >= 400 {
            assert_eq!(
                st["canary"]["requests"], 0,
                "mirrored copies are not canary traffic"
            );
            assert_eq!(st["stable"]["statuses"]["200"], 400);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        mirrored >= 300,
        "only {mirrored} of 400 copies reached the canary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_that_change_nothing_are_mirrored_over_http1_and_http2() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(&s, &c, &["--canary-weight", "0", "--mirror", "100"]);
    let http2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (client, url) in [
        (client(), format!("{}/orders/7/ship", r.base)),
        (http2, format!("{}/orders/8/ship", r.base)),
    ] {
        // Bodyless, yet each would change what both versions share: a copy would do it twice.
        for method in ["POST", "DELETE", "PATCH", "PUT"] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let answer = client.request(method, &url).send().await.unwrap();
            assert_eq!(answer.status(), 200, "the user is answered as ever");
        }
        for _ in 0..3 {
            assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
        }
    }
    for _ in 0..100 {
        if stats(&r).await["mirror"]["requests"] == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give a late copy the time to land, were one sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let received = get_json(&format!("{}/_coalmine/received", c.url)).await;
    assert_eq!(
        received["mirrored"], 6,
        "only the GETs reached the canary: {received}"
    );
    let mirror = stats(&r).await["mirror"].clone();
    assert_eq!(mirror["skippedUnsafeMethod"], 8, "{mirror}");
    assert!(metrics_text(&r.admin)
        .await
        .contains("coalmine_router_mirror_dropped_total{service=\"default\",reason=\"method\"} 8"));
}

/// `n` requests on each of `users` connections to `url`; the answers that were 200, and the
/// slowest answer.
async fn timed_users(url: &str, users: usize, n: usize) -> (usize, Duration) {
    let tasks: Vec<_> = (0..users)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let c = client();
                let (mut ok, mut slowest) = (0, Duration::ZERO);
                for _ in 0..n {
                    let started = std::time::Instant::now();
                    let r = c.get(&url).send().await.unwrap();
                    ok += usize::from(r.status() == 200 && r.text().await.unwrap() == "stable\n");
                    slowest = slowest.max(started.elapsed());
                }
                (ok, slowest)
            })
        })
        .collect();
    let (mut ok, mut slowest) = (0, Duration::ZERO);
    for t in tasks {
        let (o, s) = t.await.unwrap();
        ok += o;
        slowest = slowest.max(s);
    }
    (ok, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_or_resetting_canary_never_slows_a_user_and_is_blamed_only_for_its_own_failures() {
    let s = upstream("stable", &[]);
    let hung = upstream("canary", &["--latency", "20s"]);
    let resetting = upstream("canary", &["--reset-rate", "1"]);
    let extra = [
        "--canary-weight",
        "0",
        "--mirror",
        "100",
        "--response-timeout",
        "1s",
    ];
    let mut figures = Vec::new();
    for (what, canary) in [("hung", &hung), ("resetting", &resetting)] {
        let r = split_router(&s, canary, &extra);
        let (ok, slowest) = timed_users(&format!("{}/", r.base), 4, 150).await;
        assert_eq!(ok, 600, "{what}: every user answered by stable");
        assert!(slowest < Duration::from_millis(500), "{what}: {slowest:?}");
        // Let the last copies time out (1 s) before reading their pairs.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let m = stats(&r).await["mirror"].clone();
        let p = &m["pairs"];
        let count = |k: &str| m[k].as_u64().unwrap();
        let pair = |k: &str| p[k].as_u64().unwrap();
        let paired = pair("bothOk")
            + pair("canaryOnlyFailed")
            + pair("stableOnlyFailed")
            + pair("bothFailed");
        // Each copy sent is paired once, and every pair's failure is the canary's alone;
        // copies past the concurrency limit are dropped, never queued.
        assert_eq!(
            paired + pair("unpaired") + count("dropped"),
            600,
            "{what}: {m:#}"
        );
        assert_eq!(pair("canaryOnlyFailed"), paired, "{what}: {m:#}");
        assert_eq!(pair("unpaired"), 0, "{what}: {m:#}");
        figures.push(format!(
            "{what}: slowest user answer {slowest:?}; {paired} copies paired (all canary-only failures), {} dropped at the limit",
            count("dropped")
        ));
    }
    eprintln!("{}", figures.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check_metrics() {
    let (s, c) = (
        upstream("stable", &[]),
        upstream("canary", &["--error-rate", "0.5"]),
    );
    let r = split_router(&s, &c, &["--canary-weight", "50", "--mirror", "10"]);
    bodies(&format!("{}/", r.base), 200, 4).await;
    let text = metrics_text(&r.admin).await;
    for needle in [
        "http_requests_total{service=\"default\",version=\"canary\",status=\"500\"}",
        "http_requests_total{service=\"default\",version=\"stable\",status=\"200\"}",
        "http_request_duration_seconds_bucket{service=\"default\",version=\"canary\",le=\"+Inf\"}",
        "http_request_duration_seconds_sum{service=\"default\",version=\"stable\"}",
        "coalmine_router_canary_weight_ratio{service=\"default\"} 0.5",
        "coalmine_router_mirror_pairs_total{service=\"default\",stable=\"ok\",canary=\"ok\"}",
        "coalmine_router_mirror_pair_latency_difference_total{service=\"default\",canary=\"slower\",more_than=\"0.01\"}",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    let out = output_with_stdin(
        std::process::Command::new("promtool").args(["check", "metrics"]),
        text.as_bytes(),
    )
    .expect("promtool (scripts/test installs Debian's prometheus package)");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}",
        printed(&out)
    );
}

/// Writes raw bytes to the router and returns what it answers before closing or going quiet.
fn raw_exchange(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if out.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_oversized_requests_get_4xx_not_forwarded() {
    let s = upstream("stable", &[]);
    let r = router(&["--stable", &s.url, "--header-read-timeout", "1s"]);
    let addr = r.base.trim_start_matches("http://").to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("CL and TE together", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), " 400 "),
        ("conflicting CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(), " 400 "),
        ("TE not ending in chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_vec(), " 400 "),
        ("two TE headers", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), " 400 "),
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), " 400 "),
    ];
    for (what, req, expect) in cases {
        let answer = raw_exchange(&addr, &req);
        assert!(
            answer.starts_with("HTTP/1.1") && answer.contains(expect),
            "{what}: {answer:?}"
        );
    }
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let answer = raw_exchange(&addr, huge.as_bytes());
    assert!(answer.contains(" 431 "), "oversized head: {answer:?}");
    // Slow headers: the router gives up after the header read timeout.
    let started = std::time::Instant::now();
    let answer = raw_exchange(&addr, b"GET / HTTP/1.1\r\nHost: a\r\n");
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "slow client held the connection"
    );
    assert!(answer.is_empty() || answer.contains(" 408 "), "{answer:?}");
    // Nothing reached the upstream, nothing was counted as a version's request.
    let st = stats(&r).await;
    assert_eq!(st["stable"]["requests"], 0);
    // A broken chunk arrives after the head was forwarded (bodies stream): the exchange dies
    // instead of being answered 200.
    let answer = raw_exchange(
        &addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
    assert!(
        !answer.contains(" 200 "),
        "broken chunk answered: {answer:?}"
    );
    // And the router still serves.
    assert_eq!(
        client()
            .get(format!("{}/", r.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let s = upstream("stable", &[]);
    let mut r = router(&["--stable", &s.url]);
    let url = format!("{}/sleep/1000", r.base);
    let slow = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    unsafe_kill(r.proc.pid(), 15);
    let status = slow.await.unwrap().expect("in-flight request finished");
    assert_eq!(status, 200);
    let exit = wait_exit(&mut r.proc.child, Duration::from_secs(10));
    assert_eq!(exit, Some(0));
    // After draining, the port no longer accepts.
    assert!(TcpStream::connect(r.base.trim_start_matches("http://")).is_err());
}

fn unsafe_kill(pid: i32, signal: i32) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_threads_share_one_port_and_one_route_table() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(&s, &c, &["--canary-weight", "50", "--threads", "3"]);
    let got = bodies(&format!("{}/", r.base), 2000, 16).await;
    // Binomial(2000, 0.5): sd = 22 requests; ±5 sd.
    let share = canary_share(&got);
    assert!((0.445..=0.555).contains(&share), "{share}");
    let st = stats(&r).await;
    let total =
        st["stable"]["requests"].as_u64().unwrap() + st["canary"]["requests"].as_u64().unwrap();
    assert_eq!(total, 2000, "every worker's recorder is summed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_h2_and_http11_through_alpn() {
    let s = upstream("stable", &[]);
    let cert = self_signed("tls");
    let r = router(&[&["--stable", &s.url][..], &cert.tls_flags()].concat());
    let addr: std::net::SocketAddr = r.base.trim_start_matches("http://").parse().unwrap();
    let root = reqwest::Certificate::from_pem(cert.certified.cert.pem().as_bytes()).unwrap();
    for h1 in [false, true] {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(root.clone())
            .resolve("localhost", addr);
        if h1 {
            b = b.http1_only();
        }
        let resp = b
            .build()
            .unwrap()
            .get(format!("https://localhost:{}/echo", addr.port()))
            .send()
            .await
            .unwrap();
        let expected = if h1 {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };
        assert_eq!(resp.version(), expected);
        let echo: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    }
    // Plain HTTP on the TLS port is not served.
    assert!(client().get(format!("{}/", r.base)).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_said_once() {
    let s = upstream("stable", &[]);
    let first = router(&["--stable", &s.url]);
    let taken = first.base.trim_start_matches("http://");
    let out = std::process::Command::new(BIN)
        .args([
            "proxy",
            "--listen",
            taken,
            "--admin",
            "127.0.0.1:0",
            "--stable",
            &s.url,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
}
