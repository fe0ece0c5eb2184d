//! Routing a request allocates nothing, with a table of a thousand services as with one: the
//! choice of service (host lowercased on the stack, maps and sorted candidate lists built at the
//! swap) and the decision within it. Counted by a global allocator that counts this thread's
//! allocations while asked to (a test binary of its own, so no other test is counted).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use coalmine_router::geo::writer::{write, Network};
use coalmine_router::geo::Geo;
use coalmine_router::recorder::Metrics;
use coalmine_router::{route, RequestView, RouteTable, RoutesDoc, Version};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: passes every call to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

fn service(json: serde_json::Value) -> RoutesDoc {
    serde_json::from_value(json).unwrap()
}

/// 999 decoys (an exact host, a wildcard, two prefixes and a header rule each) and the measured
/// services: a sticky one on an exact host, one under a wildcard, and a catch-all.
fn thousand_services() -> RouteTable {
    let mut docs: Vec<RoutesDoc> = (1..1000)
        .map(|i| {
            service(serde_json::json!({
                "service": format!("decoy-{i}"),
                "hosts": [format!("decoy-{i}.test"), format!("*.decoy-{i}.test")],
                "paths": ["/api", "/static"],
                "headers": ["x-tenant=blue"],
                "stable": "http://127.0.0.1:1",
            }))
        })
        .collect();
    docs.push(service(serde_json::json!({
        "service": "shop", "hosts": ["Shop.Test"], "paths": ["/cart"],
        "stable": "http://127.0.0.1:2", "canary": "http://127.0.0.1:3", "canaryWeight": 50,
        "sticky": {"header": "user-id"}, "match": ["x-canary=true"],
    })));
    docs.push(service(serde_json::json!({
        "service": "api", "hosts": ["*.api.test"],
        "stable": "http://127.0.0.1:4", "canary": "http://127.0.0.1:5", "canaryWeight": 5,
        "match": ["geo:country=DE", "geo:region~US-(CA|WA)"],
    })));
    docs.push(service(
        serde_json::json!({"service": "default", "stable": "http://127.0.0.1:6"}),
    ));
    RouteTable::new(docs, 1, &Metrics::new("i".into(), 0)).unwrap()
}

#[test]
fn choosing_a_service_and_a_version_allocates_nothing() {
    let table = thousand_services();
    let one = RouteTable::new(
        vec![service(serde_json::json!({
            "stable": "http://127.0.0.1:2", "canary": "http://127.0.0.1:3", "canaryWeight": 50
        }))],
        1,
        &Metrics::new("i".into(), 0),
    )
    .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("user-id", "42".parse().unwrap());
    headers.insert("x-tenant", "red".parse().unwrap());
    let requests: [(&[u8], &[u8], &str); 6] = [
        (b"SHOP.test:8080", b"/cart/checkout", "shop"),
        (b"eu.api.test", b"/v1/pay", "api"),
        (b"a.b.decoy-7.test", b"/api/x", "default"), // its header rule does not hold
        (b"decoy-500.test", b"/static", "default"),
        (b"nowhere.test", b"/", "default"),
        (b"x".repeat(300).leak(), b"/", "default"),
    ];
    // Geography looked up in a MaxMind DB (the api service's rules read it).
    let db = std::env::temp_dir().join(format!("coalmine-noalloc-{}.mmdb", std::process::id()));
    let networks = [Network::new("198.51.100.0/24", "US", Some("CA"))];
    std::fs::write(&db, write(&networks, 6, 28)).unwrap();
    let mut geo = Geo::default().with_database(&db).unwrap();
    std::fs::remove_file(&db).unwrap();
    geo.trusted_hops = 1;
    headers.insert("x-forwarded-for", "10.0.0.1, 198.51.100.9".parse().unwrap());
    let peer: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    let mut picked = Vec::with_capacity(requests.len() * 2);
    // A regex keeps a per-thread matching cache, made on its first use: a worker's first
    // request pays for it, the others do not. So once before counting.
    let mut warm = Vec::with_capacity(requests.len() * 2);
    for (host, path, _) in &requests {
        let view = RequestView {
            headers: &headers,
            query: Some("a=1"),
            client: Some((peer, &geo)),
            host: Some(host),
            path,
            method: b"POST",
        };
        for t in [&table, &one] {
            let s = t.select(&view).expect("every request has a service here");
            warm.push(route(s, &view, 12_345).version);
        }
    }
    let n = allocations(|| {
        for (host, path, _) in &requests {
            let view = RequestView {
                headers: &headers,
                query: Some("a=1"),
                client: Some((peer, &geo)),
                host: Some(host),
                path,
                method: b"POST",
            };
            for t in [&table, &one] {
                let s = t.select(&view).expect("every request has a service here");
                let decision = route(s, &view, 12_345);
                picked.push((s.doc.service.as_str(), decision.version));
            }
        }
    });
    assert_eq!(n, 0, "routing allocated {n} times");
    // The Californian reached the api service's canary through its geography rule.
    assert_eq!(picked[2], ("api", Version::Canary));
    let services: Vec<&str> = picked.iter().step_by(2).map(|p| p.0).collect();
    let wanted: Vec<&str> = requests.iter().map(|r| r.2).collect();
    assert_eq!(services, wanted);
    // The counter counts: the same work with an allocation in it is seen.
    assert_eq!(allocations(|| drop(format!("{}", picked.len()))), 1);
}
