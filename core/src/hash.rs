//! Two fixed hashes. [`stable_hash`] names things (NSX display names, OVS cookies, watch
//! jitter seeds): its value is part of what the system writes, so it must not change with the
//! compiler or the platform. [`WordHasher`] is a fixed, fast hash for lookup tables keyed by what this system makes itself (endpoints,
//! service port keys, classifier keys): multiplicative, a word at a time. SipHash's DoS
//! resistance buys little for keys from the cluster's own objects, and these tables take a
//! lookup per endpoint and per flow. Fixed, not seeded: no map hashed with it may be iterated
//! into output (the determinism rules in the README), and a fixed hash keeps even an accident of order reproducible.

/// FNV-1a 64: stable across builds and platforms (names must not change with the compiler).
pub fn stable_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Builds [`WordHasher`]s.
pub type WordBuild = std::hash::BuildHasherDefault<WordHasher>;

/// A hash map with [`WordHasher`]: for lookups only, never iterated into output.
pub type WordMap<K, V> = std::collections::HashMap<K, V, WordBuild>;

/// See the module documentation.
#[derive(Default)]
pub struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}
