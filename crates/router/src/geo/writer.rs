//! Writes small MaxMind DB files, for tests: networks with a country and a region, in the
//! shape GeoIP2-City records have (`country.iso_code`, `subdivisions[0].iso_code`). A file it
//! writes is checked against MaxMind's own reader (`mmdblookup`, libmaxminddb) in the
//! integration tests, so the reader here is not only checked against itself.

use std::net::IpAddr;

use super::mmdb::{DATA_SEPARATOR, METADATA_MARKER};

/// One network's record.
#[derive(Clone, Debug)]
pub struct Network {
    pub address: IpAddr,
    pub prefix: u8,
    pub country: String,
    /// The subdivision's own code (`CA` for California), as MaxMind writes it.
    pub region: Option<String>,
}

impl Network {
    /// `"203.0.113.0/24"`, `"DE"`, `Some("BY")`.
    pub fn new(cidr: &str, country: &str, region: Option<&str>) -> Network {
        let (address, prefix) = cidr.split_once('/').expect("address/prefix");
        Network {
            address: address.parse().expect("an address"),
            prefix: prefix.parse().expect("a prefix length"),
            country: country.into(),
            region: region.map(Into::into),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Slot {
    Empty,
    Node(usize),
    Data(usize),
}

/// The bytes of a database with `networks` (later ones win where they overlap), an IPv6 tree
/// (IPv4 at `::/96`, as MaxMind's files are) when `ip_version` is 6, records of `record_size`
/// bits (24, 28 or 32).
pub fn write(networks: &[Network], ip_version: u16, record_size: u16) -> Vec<u8> {
    let mut nodes: Vec<[Slot; 2]> = vec![[Slot::Empty; 2]];
    let mut data = Vec::new();
    for net in networks {
        let (bits, len): (u128, u32) = match (net.address, ip_version) {
            (IpAddr::V4(v4), 4) => (u128::from(u32::from(v4)) << 96, u32::from(net.prefix)),
            (IpAddr::V4(v4), _) => (u128::from(u32::from(v4)), 96 + u32::from(net.prefix)),
            (IpAddr::V6(v6), 6) => (u128::from(v6), u32::from(net.prefix)),
            (IpAddr::V6(_), _) => panic!("an IPv6 network in an IPv4 database"),
        };
        let record = data.len();
        encode_record(&mut data, net);
        let mut node = 0;
        for depth in 0..len {
            let side = ((bits >> (127 - depth)) & 1) as usize;
            if depth + 1 == len {
                nodes[node][side] = Slot::Data(record);
                break;
            }
            node = match nodes[node][side] {
                Slot::Node(n) => n,
                other => {
                    // Splitting a shorter network's leaf: both halves keep its record.
                    nodes.push([other; 2]);
                    let n = nodes.len() - 1;
                    nodes[node][side] = Slot::Node(n);
                    n
                }
            };
        }
    }
    let node_count = nodes.len() as u32;
    let value = |slot: Slot| -> u32 {
        match slot {
            Slot::Empty => node_count,
            Slot::Node(n) => n as u32,
            Slot::Data(offset) => node_count + DATA_SEPARATOR as u32 + offset as u32,
        }
    };
    let mut out = Vec::new();
    for [left, right] in &nodes {
        let (l, r) = (value(*left), value(*right));
        match record_size {
            24 => {
                out.extend_from_slice(&l.to_be_bytes()[1..]);
                out.extend_from_slice(&r.to_be_bytes()[1..]);
            }
            28 => {
                out.extend_from_slice(&l.to_be_bytes()[1..]);
                out.push((((l >> 24) & 0x0F) << 4) as u8 | ((r >> 24) & 0x0F) as u8);
                out.extend_from_slice(&r.to_be_bytes()[1..]);
            }
            32 => {
                out.extend_from_slice(&l.to_be_bytes());
                out.extend_from_slice(&r.to_be_bytes());
            }
            other => panic!("record size {other}"),
        }
    }
    out.extend_from_slice(&[0; DATA_SEPARATOR]);
    out.extend_from_slice(&data);
    out.extend_from_slice(METADATA_MARKER);
    let meta: [(&str, Value); 9] = [
        ("binary_format_major_version", Value::U16(2)),
        ("binary_format_minor_version", Value::U16(0)),
        ("build_epoch", Value::U64(1_764_806_400)),
        ("database_type", Value::Str("Coalmine-Test-City")),
        (
            "description",
            Value::Map(vec![("en", Value::Str("Coalmine test data"))]),
        ),
        ("ip_version", Value::U16(ip_version)),
        ("languages", Value::Array(vec![Value::Str("en")])),
        ("node_count", Value::U32(node_count)),
        ("record_size", Value::U16(record_size)),
    ];
    Value::Map(meta.into_iter().collect()).encode(&mut out);
    out
}

fn encode_record(out: &mut Vec<u8>, net: &Network) {
    let mut record = vec![(
        "country",
        Value::Map(vec![("iso_code", Value::Str(&net.country))]),
    )];
    if let Some(region) = &net.region {
        record.push((
            "subdivisions",
            Value::Array(vec![Value::Map(vec![("iso_code", Value::Str(region))])]),
        ));
    }
    Value::Map(record).encode(out);
}

enum Value<'a> {
    Str(&'a str),
    U16(u16),
    U32(u32),
    U64(u64),
    Map(Vec<(&'a str, Value<'a>)>),
    Array(Vec<Value<'a>>),
}

impl Value<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        let uint = |out: &mut Vec<u8>, kind: u8, v: u64| {
            let bytes = v.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            control(out, kind, bytes.len() - skip);
            out.extend_from_slice(&bytes[skip..]);
        };
        match self {
            Value::Str(s) => {
                control(out, 2, s.len());
                out.extend_from_slice(s.as_bytes());
            }
            Value::U16(v) => uint(out, 5, u64::from(*v)),
            Value::U32(v) => uint(out, 6, u64::from(*v)),
            Value::U64(v) => uint(out, 9, *v),
            Value::Map(pairs) => {
                control(out, 7, pairs.len());
                for (k, v) in pairs {
                    Value::Str(k).encode(out);
                    v.encode(out);
                }
            }
            Value::Array(items) => {
                control(out, 11, items.len());
                for v in items {
                    v.encode(out);
                }
            }
        }
    }
}

/// A control byte (and the extended type byte, and size bytes) for a value of `kind` and
/// `size`.
fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
    let (short, extra): (u8, Vec<u8>) = match size {
        0..=28 => (size as u8, vec![]),
        29..=284 => (29, vec![(size - 29) as u8]),
        285..=65_820 => (30, ((size - 285) as u16).to_be_bytes().to_vec()),
        _ => (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec()),
    };
    if kind <= 7 {
        out.push((kind << 5) | short);
    } else {
        out.push(short);
        out.push(kind - 7);
    }
    out.extend_from_slice(&extra);
}
