//! The MaxMind DB format, read: a binary search tree over address bits whose leaves point into a
//! data section of typed values, and a metadata map at the end of the file
//! (<https://maxmind.github.io/MaxMind-DB/>). Only what a location needs is decoded.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::{Code, Location};

/// Where the metadata begins: after the last occurrence of this marker.
pub(super) const METADATA_MARKER: &[u8] = b"\xAB\xCD\xEFMaxMind.com";
/// The metadata is within this many bytes of the end of the file.
const METADATA_MAX: usize = 128 * 1024;
/// Zero bytes between the search tree and the data section.
pub(super) const DATA_SEPARATOR: usize = 16;
/// Nesting a well-formed location record never needs; deeper is a corrupt file.
const MAX_DEPTH: u8 = 32;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a MaxMind DB file: {why}")]
    Format { path: PathBuf, why: String },
}

/// A MaxMind DB file, held in memory (country databases are a few MB).
pub struct Database {
    bytes: Vec<u8>,
    node_count: u32,
    record_size: u16,
    ip_version: u16,
    /// Where IPv4 addresses start in an IPv6 tree (`::/96`), found once.
    ipv4_start: u32,
    data_start: usize,
    pub database_type: String,
}

impl Database {
    pub fn open(path: &Path) -> Result<Database, OpenError> {
        let bytes = std::fs::read(path).map_err(|source| OpenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Database::from_bytes(bytes).map_err(|why| OpenError::Format {
            path: path.to_path_buf(),
            why,
        })
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Database, String> {
        let tail = bytes.len().saturating_sub(METADATA_MAX);
        let at = memchr::memmem::rfind(&bytes[tail..], METADATA_MARKER)
            .map(|i| tail + i + METADATA_MARKER.len())
            .ok_or("no metadata marker")?;
        let meta = Decoder {
            data: &bytes[at..],
            base: 0,
        };
        let mut node_count = None;
        let mut record_size = None;
        let mut ip_version = None;
        let mut major = None;
        let mut database_type = String::new();
        let (pairs, mut pos) = meta.map_header(0).ok_or("the metadata is not a map")?;
        for _ in 0..pairs {
            let (key, after_key) = meta.string(pos).ok_or("a metadata key is not a string")?;
            pos = after_key;
            match key {
                b"node_count" => node_count = meta.uint(pos).map(|(v, _)| v),
                b"record_size" => record_size = meta.uint(pos).map(|(v, _)| v),
                b"ip_version" => ip_version = meta.uint(pos).map(|(v, _)| v),
                b"binary_format_major_version" => major = meta.uint(pos).map(|(v, _)| v),
                b"database_type" => {
                    if let Some((t, _)) = meta.string(pos) {
                        database_type = String::from_utf8_lossy(t).into_owned();
                    }
                }
                _ => {}
            }
            pos = meta.skip(pos, 0).ok_or("a metadata value is cut short")?;
        }
        if major != Some(2) {
            return Err(format!(
                "binary format version {major:?}; only version 2 is known"
            ));
        }
        let node_count = u32::try_from(node_count.ok_or("no node_count")?)
            .map_err(|_| "node_count out of range")?;
        let record_size = match record_size {
            Some(s @ (24 | 28 | 32)) => s as u16,
            other => return Err(format!("record size {other:?}; 24, 28 or 32 expected")),
        };
        let ip_version = match ip_version {
            Some(v @ (4 | 6)) => v as u16,
            other => return Err(format!("ip_version {other:?}; 4 or 6 expected")),
        };
        let tree_size = node_count as usize * usize::from(record_size) / 4;
        let data_start = tree_size + DATA_SEPARATOR;
        if data_start > at - METADATA_MARKER.len() {
            return Err(format!("{node_count} nodes do not fit before the metadata"));
        }
        let mut db = Database {
            bytes,
            node_count,
            record_size,
            ip_version,
            ipv4_start: 0,
            data_start,
            database_type,
        };
        if ip_version == 6 {
            let mut node = 0;
            for _ in 0..96 {
                if node >= node_count {
                    break;
                }
                node = db.record(node, 0);
            }
            db.ipv4_start = node;
        }
        Ok(db)
    }

    /// Record `side` (0 left, 1 right) of node `node`.
    fn record(&self, node: u32, side: u8) -> u32 {
        let b = &self.bytes;
        let be = |at: usize, n: usize| {
            b.get(at..at + n)
                .map(|s| s.iter().fold(0u32, |v, &x| (v << 8) | u32::from(x)))
                // Out of the file: as if no data (the tree was checked to fit, so never).
                .unwrap_or(self.node_count)
        };
        match self.record_size {
            24 => be(node as usize * 6 + usize::from(side) * 3, 3),
            28 => {
                let at = node as usize * 7;
                let middle = u32::from(b.get(at + 3).copied().unwrap_or(0));
                if side == 0 {
                    ((middle & 0xF0) << 20) | be(at, 3)
                } else {
                    ((middle & 0x0F) << 24) | be(at + 4, 3)
                }
            }
            _ => be(node as usize * 8 + usize::from(side) * 4, 4),
        }
    }

    /// The data section offset of the record for `ip`, if any.
    fn find(&self, ip: IpAddr) -> Option<usize> {
        // A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`: look them up as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        // The address's bits from the top; IPv4 walks 32 of them, from `::/96` in an IPv6 tree.
        let (bits, depth, mut node): (u128, u32, u32) = match (ip, self.ip_version) {
            (IpAddr::V4(v4), 4) => (u128::from(u32::from(v4)) << 96, 32, 0),
            (IpAddr::V4(v4), _) => (u128::from(u32::from(v4)) << 96, 32, self.ipv4_start),
            (IpAddr::V6(v6), 6) => (u128::from(v6), 128, 0),
            (IpAddr::V6(_), _) => return None,
        };
        for i in 0..depth {
            if node >= self.node_count {
                break;
            }
            let side = ((bits >> (127 - i)) & 1) as u8;
            node = self.record(node, side);
        }
        if node > self.node_count {
            let offset = (node - self.node_count) as usize;
            offset.checked_sub(DATA_SEPARATOR)
        } else {
            None
        }
    }

    /// The location recorded for `ip`: `country.iso_code` (else `registered_country.iso_code`)
    /// and `subdivisions[0].iso_code`.
    pub fn locate(&self, ip: IpAddr) -> Location {
        let Some(offset) = self.find(ip) else {
            return Location::default();
        };
        let data = Decoder {
            data: self.bytes.get(self.data_start..).unwrap_or_default(),
            base: 0,
        };
        data.location(offset).unwrap_or_default()
    }
}

/// Reads values of the data section format. Positions are offsets into `data`; a pointer's
/// target is an offset from `base`. Every read is checked: `None` is a corrupt file.
struct Decoder<'a> {
    data: &'a [u8],
    base: usize,
}

const POINTER: u8 = 1;
const STRING: u8 = 2;
const MAP: u8 = 7;
const ARRAY: u8 = 11;
const BOOLEAN: u8 = 14;

impl<'a> Decoder<'a> {
    /// The type and size of the value at `pos`, and where its payload starts.
    fn control(&self, pos: usize) -> Option<(u8, usize, usize)> {
        let ctrl = *self.data.get(pos)?;
        let mut at = pos + 1;
        let mut kind = ctrl >> 5;
        if kind == POINTER {
            // A pointer's size bits are part of its value; `follow` reads them.
            return Some((POINTER, usize::from(ctrl & 0x1F), at));
        }
        if kind == 0 {
            kind = 7u8.checked_add(*self.data.get(at)?)?;
            at += 1;
        }
        let short = usize::from(ctrl & 0x1F);
        let be = |at: usize, n: usize| {
            self.data
                .get(at..at + n)
                .map(|s| s.iter().fold(0usize, |v, &x| (v << 8) | usize::from(x)))
        };
        let size = match short {
            29 => 29 + be(at, 1)?,
            30 => 285 + be(at, 2)?,
            31 => 65_821 + be(at, 3)?,
            s => s,
        };
        at += match short {
            29 => 1,
            30 => 2,
            31 => 3,
            _ => 0,
        };
        Some((kind, size, at))
    }

    /// A pointer at `pos` (its control byte's size bits in `bits`): where it points, and where
    /// the stream goes on after it.
    fn follow(&self, bits: usize, at: usize) -> Option<(usize, usize)> {
        let (ss, vvv) = ((bits >> 3) & 0x3, bits & 0x7);
        let be = |n: usize| {
            self.data
                .get(at..at + n)
                .map(|s| s.iter().fold(0usize, |v, &x| (v << 8) | usize::from(x)))
        };
        let (target, len) = match ss {
            0 => ((vvv << 8) | be(1)?, 1),
            1 => (((vvv << 16) | be(2)?) + 2048, 2),
            2 => (((vvv << 24) | be(3)?) + 526_336, 3),
            _ => (be(4)?, 4),
        };
        Some((self.base + target, at + len))
    }

    /// The value at `pos` with a pointer resolved: its type, size, payload start; and where
    /// the stream continues after the value as written at `pos`.
    fn resolve(&self, pos: usize) -> Option<(u8, usize, usize, Option<usize>)> {
        let (kind, size, at) = self.control(pos)?;
        if kind != POINTER {
            return Some((kind, size, at, None));
        }
        let (target, after) = self.follow(size, at)?;
        let (kind, size, at) = self.control(target)?;
        // A pointer to a pointer is invalid in the format.
        (kind != POINTER).then_some((kind, size, at, Some(after)))
    }

    fn string(&self, pos: usize) -> Option<(&'a [u8], usize)> {
        let (kind, size, at, after) = self.resolve(pos)?;
        if kind != STRING {
            return None;
        }
        let text = self.data.get(at..at.checked_add(size)?)?;
        Some((text, after.unwrap_or(at + size)))
    }

    fn uint(&self, pos: usize) -> Option<(u64, usize)> {
        let (kind, size, at, after) = self.resolve(pos)?;
        // uint16, uint32, uint64 (and int32 for leniency): big-endian, leading zeros dropped.
        if !matches!(kind, 5 | 6 | 8 | 9) || size > 8 {
            return None;
        }
        let bytes = self.data.get(at..at + size)?;
        let v = bytes.iter().fold(0u64, |v, &x| (v << 8) | u64::from(x));
        Some((v, after.unwrap_or(at + size)))
    }

    fn map_header(&self, pos: usize) -> Option<(usize, usize)> {
        // A map reached through a pointer is read where it lies; the caller's stream goes on
        // after the pointer, which `skip` handles.
        let (kind, size, at, _) = self.resolve(pos)?;
        (kind == MAP).then_some((size, at))
    }

    fn array_header(&self, pos: usize) -> Option<(usize, usize)> {
        let (kind, size, at, _) = self.resolve(pos)?;
        (kind == ARRAY).then_some((size, at))
    }

    /// Where the value at `pos` ends.
    fn skip(&self, pos: usize, depth: u8) -> Option<usize> {
        if depth > MAX_DEPTH {
            return None;
        }
        let (kind, size, at) = self.control(pos)?;
        match kind {
            POINTER => self.follow(size, at).map(|(_, after)| after),
            MAP => {
                let mut p = at;
                for _ in 0..size {
                    p = self.skip(p, depth + 1)?;
                    p = self.skip(p, depth + 1)?;
                }
                Some(p)
            }
            ARRAY => {
                let mut p = at;
                for _ in 0..size {
                    p = self.skip(p, depth + 1)?;
                }
                Some(p)
            }
            BOOLEAN => Some(at),
            // The data cache container and the end marker never appear in records.
            12 | 13 => None,
            3 => Some(at + 8),
            15 => Some(at + 4),
            _ => {
                let end = at.checked_add(size)?;
                (end <= self.data.len()).then_some(end)
            }
        }
    }

    /// In the map at `pos`, the position of `key`'s value.
    fn get(&self, pos: usize, key: &[u8]) -> Option<usize> {
        let (pairs, mut p) = self.map_header(pos)?;
        for _ in 0..pairs {
            let (k, after_key) = self.string(p)?;
            if k == key {
                return Some(after_key);
            }
            p = self.skip(after_key, 1)?;
        }
        None
    }

    fn iso_code(&self, pos: usize) -> Option<&'a [u8]> {
        let code = self.get(pos, b"iso_code")?;
        self.string(code).map(|(s, _)| s)
    }

    fn location(&self, record: usize) -> Option<Location> {
        let country = ["country".as_bytes(), b"registered_country"]
            .iter()
            .find_map(|key| self.get(record, key).and_then(|c| self.iso_code(c)))
            .and_then(Code::new);
        let region = country.and_then(|country| {
            let subdivisions = self.get(record, b"subdivisions")?;
            let (n, first) = self.array_header(subdivisions)?;
            if n == 0 {
                return None;
            }
            Code::joined(country, self.iso_code(first)?)
        });
        Some(Location { country, region })
    }
}
