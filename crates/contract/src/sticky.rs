//! Sticky buckets, declared once: which users a weight sends to the canary. The router buckets
//! a request by its sticky key (a header or cookie); a feature flag buckets an evaluation by its
//! targeting key. Both call these functions, so for the same key, cohort and weight, the router
//! and the flag pick the same users by construction.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::routes::DEFAULT_NAME;

/// Sticky keys hash into this many buckets; a weight in basis points is a bucket threshold.
pub const BUCKETS: u64 = 10_000;

/// The bucket of a sticky key: fixed for a key and salt, so raising the weight only ever adds
/// buckets to the canary (users move stable → canary) and lowering only removes them.
pub fn sticky_bucket(key: &[u8], salt: u64) -> u64 {
    xxh3_64_with_seed(key, salt) % BUCKETS
}

/// The salt of a route's sticky buckets: its name, or, for a route nobody named, its service
/// (so two services' sticky users are not the same users; the default service's salt is what it
/// always was).
pub fn sticky_salt(route_name: &str, service: &str) -> u64 {
    let salted_by = if route_name == DEFAULT_NAME {
        service
    } else {
        route_name
    };
    xxh3_64(salted_by.as_bytes())
}

/// Whether a key in `bucket` goes to the canary at `weight`.
pub fn in_canary(bucket: u64, weight: crate::Weight) -> bool {
    bucket < u64::from(weight.basis_points())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_route_is_salted_by_its_name_and_an_unnamed_one_by_its_service() {
        assert_eq!(sticky_salt("checkout", "web"), xxh3_64(b"checkout"));
        assert_eq!(sticky_salt(DEFAULT_NAME, "web"), xxh3_64(b"web"));
    }

    #[test]
    fn raising_the_weight_only_adds_users() {
        let salt = sticky_salt("checkout", "default");
        for user in 0..2_000u32 {
            let bucket = sticky_bucket(format!("user-{user}").as_bytes(), salt);
            assert!(bucket < BUCKETS);
            if in_canary(bucket, crate::Weight::from_basis_points(500).unwrap()) {
                assert!(in_canary(
                    bucket,
                    crate::Weight::from_basis_points(501).unwrap()
                ));
            }
        }
    }
}
