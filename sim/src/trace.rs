//! The run's event trace: what every host did, when, in simulated time. Two runs of the same
//! (scenario, seed, code) produce the same trace byte for byte; the hash is the short form.

use std::cell::RefCell;
use std::rc::Rc;

/// A shared, append-only log of events. Hosts run on one thread inside turmoil, so an
/// `Rc<RefCell>` is enough and keeps the order in which turmoil ran them.
#[derive(Debug, Clone, Default)]
pub struct Trace(Rc<RefCell<Vec<String>>>);

impl Trace {
    /// Appends `host: event` at the current simulated time.
    pub fn record(&self, host: &str, event: impl AsRef<str>) {
        let ms = turmoil::sim_elapsed().map_or(0, |d| d.as_millis());
        self.record_at(ms, host, event);
    }

    /// Appends an event at an explicit time (for the runner, outside any host).
    pub fn record_at(&self, ms: u128, host: &str, event: impl AsRef<str>) {
        self.0
            .borrow_mut()
            .push(format!("{ms:>9} {host:<12} {}", event.as_ref()));
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.borrow().clone()
    }

    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }

    /// FNV-1a 64 over the lines: stable across platforms, releases and dependency upgrades,
    /// which a std `Hasher` does not promise.
    pub fn hash(&self) -> u64 {
        hash_lines(&self.0.borrow())
    }
}

pub fn hash_lines(lines: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for line in lines {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_content_and_order() {
        let a = vec!["x".to_string(), "y".to_string()];
        let b = vec!["y".to_string(), "x".to_string()];
        assert_eq!(hash_lines(&a), hash_lines(&a.clone()));
        assert_ne!(hash_lines(&a), hash_lines(&b));
        assert_ne!(hash_lines(&["xy".to_string()]), hash_lines(&a));
    }
}
