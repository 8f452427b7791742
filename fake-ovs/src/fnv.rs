//! FNV-1a for the bridge's lookup tables: cheap, and the same on every run (the maps are only
//! looked up, never iterated, but a fixed hasher keeps even their cost deterministic).

use std::hash::{BuildHasherDefault, Hasher};

pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A word at a time: a slice of integers (a classifier key is four u128s) arrives
        // here as one run of bytes.
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.write_u64(u64::from_le_bytes(b));
        }
        for b in words.remainder() {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, n: u128) {
        // Two words at a time: most values are small, so fold rather than walk 16 bytes.
        self.write_u64(n as u64 ^ (n >> 64) as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
}

pub type FnvBuild = BuildHasherDefault<Fnv>;
pub type FnvMap<K, V> = std::collections::HashMap<K, V, FnvBuild>;
