//! Hashing shared by policies; XXH3 is fast and stable across processes, so every router
//! replica maps a key the same way.

use xxhash_rust::xxh3::xxh3_64_with_seed;

pub fn hash_pair(key: &str, salt: &str) -> u64 {
    xxh3_64_with_seed(key.as_bytes(), xxh3_64_with_seed(salt.as_bytes(), 0))
}
