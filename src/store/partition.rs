//! Which partition a key belongs to.
//!
//! `partition = xxh3_64(key) mod partitions`, where xxh3_64 is the XXH3
//! 64-bit hash with seed 0 over the key's raw bytes. This is part of the file
//! format: every replica must compute the same partition for a key, and the
//! metadata records the scheme (`HASH_SCHEME`) so that a store made with
//! another cannot be opened by mistake.

/// Name of the key-to-partition scheme, recorded in store metadata.
pub const HASH_SCHEME: &str = "xxh3-64-mod";

/// The number of partitions a new store gets unless told otherwise.
pub const DEFAULT_PARTITIONS: u16 = 256;

pub fn partition_of(key: &[u8], partitions: u16) -> u16 {
    debug_assert!(partitions > 0);
    (xxhash_rust::xxh3::xxh3_64(key) % u64::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable() {
        // Pinned values: changing them breaks every existing store.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2d06800538d394c2);
        assert_eq!(
            partition_of(b"hello", 256),
            (xxhash_rust::xxh3::xxh3_64(b"hello") % 256) as u16
        );
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = [0u32; 16];
        for i in 0..16_000u32 {
            counts[partition_of(&i.to_be_bytes(), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
