//! What the API server does to some built-in objects besides storing them, where the operator
//! or its tests depend on it: a Service gets a cluster IP from the service range (and keeps it)
//! and needs a port, an EndpointSlice's addresses are checked as the API server checks them.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::{json, Value};

use crate::error::{ApiError, Cause, Subject};
use crate::resources::ResourceType;
use crate::store::Store;

/// The service range of every test cluster, fake or real (`--service-cluster-ip-range`). A
/// range of its own, not a common LAN's, so a test can route it to stand-ins for pods in a
/// network namespace without shadowing a real network; large enough for the benchmarks'
/// thousands of Services (three per Canary).
pub const SERVICE_CIDR: &str = "10.231.128.0/17";
const SERVICE_BASE: Ipv4Addr = Ipv4Addr::new(10, 231, 128, 0);
const SERVICE_PREFIX: u32 = 17;

fn is(rt: &ResourceType, group: &str, plural: &str) -> bool {
    rt.crd.is_none() && rt.group == group && rt.plural == plural
}

fn in_service_range(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - SERVICE_PREFIX);
    u32::from(ip) & mask == u32::from(SERVICE_BASE)
}

/// A new object as the API server stores it (defaults, allocations), or why it is refused.
pub fn admit_create(
    store: &Store,
    rt: &ResourceType,
    subject: &Subject,
    object: &mut Value,
) -> Result<(), ApiError> {
    if is(rt, "", "services") {
        default_service(store, rt, subject, object)?;
        check_ports(rt, subject, object)?;
    }
    if is(rt, "discovery.k8s.io", "endpointslices") {
        check_endpoint_slice(rt, subject, object)?;
    }
    Ok(())
}

/// An update as the API server stores it: a Service keeps its cluster IP (one left out of the
/// update is carried over, a changed one is refused).
pub fn admit_update(
    rt: &ResourceType,
    subject: &Subject,
    old: &Value,
    new: &mut Value,
) -> Result<(), ApiError> {
    if is(rt, "", "services") {
        let before = old["spec"]["clusterIP"].clone();
        match new["spec"]["clusterIP"].as_str() {
            None | Some("") if !before.is_null() => {
                new["spec"]["clusterIP"] = before;
                new["spec"]["clusterIPs"] = old["spec"]["clusterIPs"].clone();
            }
            Some(now) if before.as_str().is_some_and(|b| b != now) => {
                return Err(ApiError::invalid(
                    &rt.kind,
                    subject,
                    vec![Cause {
                        reason: "FieldValueInvalid",
                        field: "spec.clusterIPs[0]".into(),
                        message: format!(
                            "Invalid value: {}: may not change once set",
                            Value::from(now)
                        ),
                    }],
                ));
            }
            _ => {}
        }
        default_ports(new);
        check_ports(rt, subject, new)?;
    }
    if is(rt, "discovery.k8s.io", "endpointslices") {
        check_endpoint_slice(rt, subject, new)?;
    }
    Ok(())
}

/// A Service needs a port, unless it is headless or an ExternalName.
fn check_ports(rt: &ResourceType, subject: &Subject, service: &Value) -> Result<(), ApiError> {
    let spec = &service["spec"];
    let exempt = spec["type"] == "ExternalName" || spec["clusterIP"] == "None";
    let has_ports = spec["ports"].as_array().is_some_and(|p| !p.is_empty());
    if exempt || has_ports {
        return Ok(());
    }
    Err(ApiError::invalid(
        &rt.kind,
        subject,
        vec![Cause {
            reason: "FieldValueRequired",
            field: "spec.ports".into(),
            message: "Required value".into(),
        }],
    ))
}

fn default_ports(service: &mut Value) {
    if let Some(ports) = service["spec"]["ports"].as_array_mut() {
        for port in ports {
            if port["protocol"].is_null() {
                port["protocol"] = "TCP".into();
            }
            if port["targetPort"].is_null() {
                port["targetPort"] = port["port"].clone();
            }
        }
    }
}

/// The defaults and the cluster IP a Service gets when it is created.
fn default_service(
    store: &Store,
    rt: &ResourceType,
    subject: &Subject,
    service: &mut Value,
) -> Result<(), ApiError> {
    if !service["spec"].is_object() {
        service["spec"] = json!({});
    }
    let spec = &mut service["spec"];
    if spec["type"].is_null() {
        spec["type"] = "ClusterIP".into();
    }
    if spec["sessionAffinity"].is_null() {
        spec["sessionAffinity"] = "None".into();
    }
    default_ports(service);
    let spec = &mut service["spec"];
    if spec["type"] == "ExternalName" {
        return Ok(());
    }
    if spec["internalTrafficPolicy"].is_null() {
        spec["internalTrafficPolicy"] = "Cluster".into();
    }
    spec["ipFamilies"] = json!(["IPv4"]);
    spec["ipFamilyPolicy"] = "SingleStack".into();
    let refused = |message: String| {
        ApiError::invalid(
            &rt.kind,
            subject,
            vec![Cause {
                reason: "FieldValueInvalid",
                field: "spec.clusterIPs".into(),
                message,
            }],
        )
    };
    let taken: std::collections::HashSet<Ipv4Addr> = store
        .objects
        .iter()
        .filter(|((group, plural, _, _), _)| group.is_empty() && plural == "services")
        .filter_map(|(_, s)| s["spec"]["clusterIP"].as_str()?.parse().ok())
        .collect();
    let ip = match spec["clusterIP"].as_str() {
        Some("None") => {
            spec["clusterIPs"] = json!(["None"]);
            return Ok(());
        }
        Some(asked) if !asked.is_empty() => {
            let ip: Ipv4Addr = asked.parse().map_err(|_| {
                refused(format!(
                    "Invalid value: [\"{asked}\"]: must be a valid IP address"
                ))
            })?;
            if !in_service_range(ip) {
                return Err(refused(format!("Invalid value: [\"{asked}\"]: failed to allocate IP {asked}: the provided IP ({asked}) is not in the valid range. The range of valid IPs is {SERVICE_CIDR}")));
            }
            if taken.contains(&ip) {
                return Err(refused(format!("Invalid value: [\"{asked}\"]: failed to allocate IP {asked}: provided IP is already allocated")));
            }
            ip
        }
        _ => {
            // Dynamic allocations come from the upper part of the range, as the API server
            // prefers (the lower part is left for addresses users ask for); the first address
            // is the `kubernetes` Service's.
            let size = 1u32 << (32 - SERVICE_PREFIX);
            let base = u32::from(SERVICE_BASE);
            let free = (size / 2..size - 1)
                .chain(2..size / 2)
                .map(|offset| Ipv4Addr::from(base + offset))
                .find(|ip| !taken.contains(ip))
                .ok_or_else(|| {
                    refused(format!(
                        "failed to allocate a serviceIP: range is full ({SERVICE_CIDR})"
                    ))
                })?;
            free
        }
    };
    spec["clusterIP"] = ip.to_string().into();
    spec["clusterIPs"] = json!([ip.to_string()]);
    Ok(())
}

/// `addressType` is required, and an endpoint may not be an address no pod has: the API server
/// refuses unspecified, loopback, link-local and link-local multicast addresses.
fn check_endpoint_slice(
    rt: &ResourceType,
    subject: &Subject,
    slice: &Value,
) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let address_type = slice["addressType"].as_str();
    match address_type {
        None => causes.push(Cause {
            reason: "FieldValueRequired",
            field: "addressType".into(),
            message: "Required value".into(),
        }),
        Some("IPv4" | "IPv6" | "FQDN") => {}
        Some(other) => causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: "addressType".into(),
            message: format!(
                "Unsupported value: {}: supported values: \"FQDN\", \"IPv4\", \"IPv6\"",
                Value::from(other)
            ),
        }),
    }
    let endpoints = slice["endpoints"].as_array().cloned().unwrap_or_default();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let addresses = endpoint["addresses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (j, address) in addresses.iter().enumerate() {
            let text = address.as_str().unwrap_or_default();
            let field = format!("endpoints[{i}].addresses[{j}]");
            let why = match (address_type, text.parse::<IpAddr>()) {
                (Some("FQDN"), _) => None,
                (Some("IPv4"), Ok(IpAddr::V4(ip))) => refused_ip(IpAddr::V4(ip)),
                (Some("IPv6"), Ok(IpAddr::V6(ip))) => refused_ip(IpAddr::V6(ip)),
                (Some("IPv4"), _) => Some("must be a valid IPv4 address".to_string()),
                (Some("IPv6"), _) => Some("must be a valid IPv6 address".to_string()),
                _ => None,
            };
            if let Some(why) = why {
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    field,
                    message: format!("Invalid value: {}: {why}", Value::from(text)),
                });
            }
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&rt.kind, subject, causes))
    }
}

/// Why an endpoint may not have this address (the API server's words), if it may not.
fn refused_ip(ip: IpAddr) -> Option<String> {
    if ip.is_unspecified() {
        return Some(format!("may not be unspecified ({ip})"));
    }
    if ip.is_loopback() {
        return Some("may not be in the loopback range (127.0.0.0/8, ::1/128)".into());
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    if link_local {
        return Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)".into());
    }
    let link_local_multicast = match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [224, 0, 0],
        IpAddr::V6(v6) => v6.segments()[0] & 0xff0f == 0xff02,
    };
    if link_local_multicast {
        return Some(
            "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)".into(),
        );
    }
    None
}
