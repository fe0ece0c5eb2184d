//! Where a client is: its country and region, for routing by geography (seed 001: "route by user
//! ID, geography, or random sampling").
//!
//! Two sources, as the user configures them: a MaxMind-format database (`.mmdb`: GeoIP2,
//! GeoLite2, DB-IP lite and other files in the MaxMind DB format) looked up by the client's
//! address — the connection's peer, or the `X-Forwarded-For` hop the user says to trust — or
//! headers a CDN sets (`CF-IPCountry`, `CloudFront-Viewer-Country`, …).
//!
//! The reader is written here rather than taken from a crate because a lookup runs on the request
//! path: it walks the search tree and decodes only `country.iso_code` and
//! `subdivisions[0].iso_code`, into fixed-size codes, without allocating. The format is
//! MaxMind DB 2.0 (<https://maxmind.github.io/MaxMind-DB/>); every read is bounds-checked, so a
//! corrupt file gives "no location", never a panic.

mod mmdb;
#[cfg(any(test, feature = "test-support"))]
pub mod writer;

use std::net::IpAddr;
use std::path::Path;

use coalmine_contract::{GeoField, MatchRule, Subject};

use crate::route::Headers;

pub use mmdb::{Database, OpenError};

/// A short ASCII code (a country's ISO 3166-1 alpha-2 code, a region's ISO 3166-2 code such as
/// `US-CA`), held inline so that a lookup does not allocate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Code {
    len: u8,
    bytes: [u8; Code::MAX],
}

impl Code {
    /// ISO 3166-2 codes are a country code, `-` and up to three characters.
    pub const MAX: usize = 6;

    /// `None` if `text` is empty, too long or not printable ASCII without spaces.
    pub fn new(text: &[u8]) -> Option<Code> {
        if text.is_empty() || text.len() > Code::MAX || !text.iter().all(u8::is_ascii_graphic) {
            return None;
        }
        let mut bytes = [0; Code::MAX];
        bytes[..text.len()].copy_from_slice(text);
        Some(Code {
            len: text.len() as u8,
            bytes,
        })
    }

    /// `country-region` (`US` and `CA` → `US-CA`), the form a region is matched in: a region's
    /// own code is only unique within its country.
    fn joined(country: Code, region: &[u8]) -> Option<Code> {
        let mut text = [0; Code::MAX * 2 + 1];
        let c = country.as_str().as_bytes();
        let len = c.len() + 1 + region.len();
        if len > text.len() {
            return None;
        }
        text[..c.len()].copy_from_slice(c);
        text[c.len()] = b'-';
        text[c.len() + 1..len].copy_from_slice(region);
        Code::new(&text[..len])
    }

    pub fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Where a client is, as far as the sources know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Location {
    /// ISO 3166-1 alpha-2, upper case as the sources write it (`DE`).
    pub country: Option<Code>,
    /// ISO 3166-2: the country, `-`, the subdivision's code (`US-CA`).
    pub region: Option<Code>,
}

/// Which address is the client's when the router sits behind other proxies: the one
/// `trusted_hops` entries from the right of `X-Forwarded-For` (the proxies in front append
/// what they saw), as Envoy's `xff_num_trusted_hops` reads it. With 0, or when the header has
/// fewer entries than that or a garbled one, the connection's peer is the client: a client can
/// write any `X-Forwarded-For` it likes, so only hops the user vouches for are believed.
pub fn client_address<'a, I: Iterator<Item = &'a [u8]>>(
    peer: IpAddr,
    forwarded_for: impl Fn() -> I,
    trusted_hops: u8,
) -> IpAddr {
    if trusted_hops == 0 {
        return peer;
    }
    // Several X-Forwarded-For fields are one comma-separated list, in order.
    let entries = || forwarded_for().flat_map(|field| field.split(|&b| b == b','));
    let count = entries().count();
    match count.checked_sub(usize::from(trusted_hops)) {
        Some(index) => entries()
            .nth(index)
            .and_then(parse_forwarded)
            .unwrap_or(peer),
        None => peer,
    }
}

/// One `X-Forwarded-For` entry: an address, trimmed; IPv6 may be bracketed (some proxies write
/// `[2001:db8::1]`).
fn parse_forwarded(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    text.parse().ok()
}

/// The router's geography sources, as the user configured them.
#[derive(Default)]
pub struct Geo {
    database: Option<Database>,
    pub trusted_hops: u8,
    /// A header a CDN sets with the client's country (`cf-ipcountry`), lower case.
    pub country_header: Option<String>,
    /// A header a CDN sets with the client's region: ISO 3166-2 (`US-CA`) or the subdivision
    /// alone (`CA`, CloudFront's `CloudFront-Viewer-Country-Region`), lower case.
    pub region_header: Option<String>,
}

impl std::fmt::Debug for Geo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Geo")
            .field(
                "database",
                &self.database.as_ref().map(|d| d.database_type.as_str()),
            )
            .field("trusted_hops", &self.trusted_hops)
            .field("country_header", &self.country_header)
            .field("region_header", &self.region_header)
            .finish()
    }
}

impl Geo {
    pub fn with_database(mut self, path: &Path) -> Result<Geo, OpenError> {
        self.database = Some(Database::open(path)?);
        Ok(self)
    }

    /// Why these rules cannot be served here: a rule reads a country or region that no
    /// configured source gives (it would never hold, silently).
    pub fn unserved<'r>(&self, rules: impl IntoIterator<Item = &'r MatchRule>) -> Option<String> {
        let serves = |field: GeoField| match field {
            GeoField::Country => self.database.is_some() || self.country_header.is_some(),
            GeoField::Region => self.database.is_some() || self.region_header.is_some(),
        };
        let field = rules
            .into_iter()
            .flat_map(|rule| &rule.all)
            .find_map(|c| match c.subject {
                Subject::Geo(field) if !serves(field) => Some(field),
                _ => None,
            })?;
        let flag = match field {
            GeoField::Country => "--geo-country-header",
            GeoField::Region => "--geo-region-header",
        };
        Some(format!(
            "a match rule reads the client's {}, but this router has no source for it: start it with --geoip-db FILE (a MaxMind DB) or {flag} NAME (a CDN's header)",
            field.as_str()
        ))
    }

    /// The client's location: the CDN's headers when configured and present (the CDN saw the
    /// client; the router may see only the CDN), else the database at the client's address.
    pub fn locate<H: Headers + ?Sized>(&self, client: IpAddr, headers: &H) -> Location {
        fn first<'a, H: Headers + ?Sized>(headers: &'a H, name: &'a str) -> Option<&'a [u8]> {
            headers.values(name).next()
        }
        let header = |name| first(headers, name);
        if let Some(country) = self
            .country_header
            .as_deref()
            .and_then(header)
            .and_then(|v| Code::new(v.trim_ascii()))
        {
            let region = self
                .region_header
                .as_deref()
                .and_then(header)
                .map(<[u8]>::trim_ascii)
                .and_then(|r| {
                    if r.contains(&b'-') {
                        Code::new(r)
                    } else {
                        Code::joined(country, r)
                    }
                });
            return Location {
                country: Some(country),
                region,
            };
        }
        self.database
            .as_ref()
            .map(|db| db.locate(client))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_hop_the_user_trusts_counted_from_the_right() {
        let peer = ip("10.0.0.9");
        let xff: [&[u8]; 2] = [b"203.0.113.7, 198.51.100.2", b"192.0.2.1"];
        assert_eq!(client_address(peer, || xff.iter().copied(), 0), peer);
        assert_eq!(
            client_address(peer, || xff.iter().copied(), 1),
            ip("192.0.2.1")
        );
        assert_eq!(
            client_address(peer, || xff.iter().copied(), 2),
            ip("198.51.100.2")
        );
        assert_eq!(
            client_address(peer, || xff.iter().copied(), 3),
            ip("203.0.113.7")
        );
        // Fewer entries than trusted hops: the chain is not what the user said; the peer.
        assert_eq!(client_address(peer, || xff.iter().copied(), 4), peer);
        // A garbled entry is not believed.
        let bad: [&[u8]; 1] = [b"somewhere, 192.0.2.1"];
        assert_eq!(client_address(peer, || bad.iter().copied(), 2), peer);
        let v6: [&[u8]; 1] = [b"[2001:db8::1]"];
        assert_eq!(
            client_address(peer, || v6.iter().copied(), 1),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn a_cdn_header_wins_over_the_database_and_a_bare_region_is_joined_to_its_country() {
        let geo = Geo {
            country_header: Some("cloudfront-viewer-country".into()),
            region_header: Some("cloudfront-viewer-country-region".into()),
            ..Geo::default()
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("cloudfront-viewer-country", "US".parse().unwrap());
        headers.insert("cloudfront-viewer-country-region", " CA ".parse().unwrap());
        let at = geo.locate(IpAddr::V4(Ipv4Addr::LOCALHOST), &headers);
        assert_eq!(at.country.unwrap().as_str(), "US");
        assert_eq!(at.region.unwrap().as_str(), "US-CA");
        // No header, no database: nowhere.
        let at = geo.locate(IpAddr::V4(Ipv4Addr::LOCALHOST), &http::HeaderMap::new());
        assert_eq!(at, Location::default());
    }

    #[test]
    fn codes_refuse_what_no_source_writes() {
        assert!(Code::new(b"").is_none());
        assert!(Code::new(b"TOOLONG").is_none());
        assert!(Code::new(b"D E").is_none());
        assert_eq!(Code::new(b"DE").unwrap().as_str(), "DE");
    }

    fn sample() -> Vec<writer::Network> {
        use writer::Network;
        vec![
            Network::new("81.2.69.0/24", "GB", Some("ENG")),
            Network::new("203.0.113.0/24", "US", Some("CA")),
            // A more specific network inside the one before: it wins there, the rest keeps CA.
            Network::new("203.0.113.128/25", "US", Some("WA")),
            Network::new("198.51.100.7/32", "DE", None),
            Network::new("2001:db8::/32", "FR", Some("IDF")),
        ]
    }

    #[test]
    fn lookups_find_the_most_specific_network_in_every_record_size_and_tree() {
        for (ip_version, networks) in [(6, sample()), (4, sample()[..4].to_vec())] {
            for record_size in [24, 28, 32] {
                let bytes = writer::write(&networks, ip_version, record_size);
                let db = Database::from_bytes(bytes).unwrap();
                let at = |a: &str| {
                    let l = db.locate(ip(a));
                    (
                        l.country.map(|c| c.as_str().to_string()),
                        l.region.map(|r| r.as_str().to_string()),
                    )
                };
                let some = |c: &str, r: Option<&str>| (Some(c.to_string()), r.map(String::from));
                let case = format!("IPv{ip_version} tree, {record_size}-bit records");
                assert_eq!(at("81.2.69.142"), some("GB", Some("GB-ENG")), "{case}");
                assert_eq!(at("203.0.113.5"), some("US", Some("US-CA")), "{case}");
                assert_eq!(at("203.0.113.200"), some("US", Some("US-WA")), "{case}");
                assert_eq!(at("198.51.100.7"), some("DE", None), "{case}");
                assert_eq!(at("198.51.100.8"), (None, None), "{case}");
                assert_eq!(at("10.1.2.3"), (None, None), "{case}");
                // A dual-stack listener's view of an IPv4 client.
                assert_eq!(
                    at("::ffff:81.2.69.142"),
                    some("GB", Some("GB-ENG")),
                    "{case}"
                );
                if ip_version == 6 {
                    assert_eq!(at("2001:db8:1::9"), some("FR", Some("FR-IDF")), "{case}");
                    assert_eq!(at("2001:db9::1"), (None, None), "{case}");
                } else {
                    assert_eq!(at("2001:db8:1::9"), (None, None), "{case}");
                }
            }
        }
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_and_a_corrupt_one_never_panics() {
        for (bytes, says) in [
            (b"hello".to_vec(), "no metadata marker"),
            (mmdb::METADATA_MARKER.to_vec(), "the metadata is not a map"),
        ] {
            let e = Database::from_bytes(bytes).err().unwrap();
            assert!(e.contains(says), "{e}");
        }
        // Bytes flipped all over a good file (a fixed seed): lookups answer or say nowhere.
        let good = writer::write(&sample(), 6, 28);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut opened = 0;
        for _ in 0..2_000 {
            let mut bytes = good.clone();
            for _ in 0..4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            if let Ok(db) = Database::from_bytes(bytes) {
                opened += 1;
                for a in ["81.2.69.142", "203.0.113.200", "2001:db8::1", "0.0.0.0"] {
                    let _ = db.locate(ip(a));
                }
            }
        }
        assert!(
            opened > 1_000,
            "most corruptions leave the metadata readable: {opened}"
        );
    }

    /// MaxMind's own reader (libmaxminddb's `mmdblookup`) reads what the writer writes as this
    /// reader does: the tests above do not only check the reader against its own writer.
    #[test]
    fn maxminds_reader_agrees_on_the_test_databases() {
        let dir = std::env::temp_dir().join(format!("coalmine-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (ip_version, record_size) in [(6, 24), (6, 28), (6, 32), (4, 24)] {
            let networks = if ip_version == 6 {
                sample()
            } else {
                sample()[..4].to_vec()
            };
            let path = dir.join(format!("v{ip_version}-{record_size}.mmdb"));
            std::fs::write(&path, writer::write(&networks, ip_version, record_size)).unwrap();
            let db = Database::open(&path).unwrap();
            for a in [
                "81.2.69.142",
                "203.0.113.5",
                "203.0.113.200",
                "198.51.100.7",
                "10.1.2.3",
            ] {
                let lookup = |keys: &[&str]| {
                    let out = std::process::Command::new("mmdblookup")
                        .arg("--file")
                        .arg(&path)
                        .args(["--ip", a])
                        .args(keys)
                        .output()
                        .expect(
                            "mmdblookup runs (scripts/test installs it: apt-get install mmdb-bin)",
                        );
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    // `  "GB" <utf8_string>` when found; nothing (or an error) when not.
                    text.split('"').nth(1).map(String::from)
                };
                let theirs = (
                    lookup(&["country", "iso_code"]),
                    lookup(&["subdivisions", "0", "iso_code"]),
                );
                let l = db.locate(ip(a));
                let ours = (
                    l.country.map(|c| c.as_str().to_string()),
                    l.region
                        .map(|r| r.as_str().split_once('-').unwrap().1.to_string()),
                );
                assert_eq!(ours, theirs, "{a} in {}", path.display());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
