//! Prefix-cache keys: each full block is keyed by XXH3-64 of its parent block's key and
//! its own token ids, so a key identifies the whole prefix up to that block.

use xxhash_rust::xxh3::xxh3_64;

/// Key of a block given its parent's key (None for the first block) and its tokens.
pub fn hash_block(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(9 + tokens.len() * 4);
    match parent {
        Some(p) => {
            bytes.push(1);
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        None => bytes.push(0),
    }
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// Extends `hashes` (keys of the first blocks of `tokens`) to cover every full block.
pub fn hash_full_blocks(tokens: &[u32], block_size: usize, hashes: &mut Vec<u64>) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = i.checked_sub(1).map(|p| hashes[p]);
        hashes.push(hash_block(parent, &tokens[i * block_size..(i + 1) * block_size]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_the_whole_prefix() {
        let a = [1, 2, 3, 4, 5, 6, 7, 8];
        let b = [9, 2, 3, 4, 5, 6, 7, 8];
        let (mut ha, mut hb) = (Vec::new(), Vec::new());
        hash_full_blocks(&a, 4, &mut ha);
        hash_full_blocks(&b, 4, &mut hb);
        assert_eq!(ha.len(), 2);
        assert_ne!(ha[1], hb[1], "same tokens after a different prefix must not share a key");
        let mut again = Vec::new();
        hash_full_blocks(&a[..7], 4, &mut again);
        assert_eq!(again, vec![ha[0]], "a partial block has no key");
    }
}
