//! IPv4 arithmetic for blocks, pools and address sets: CIDRs, ranges and allocation.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

/// An IPv4 network in canonical form (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub network: u32,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`; host bits must be zero, as NSX requires of a block or pool CIDR.
    pub fn parse_strict(s: &str) -> Result<Self, String> {
        let c = Self::parse_loose(s)?;
        let (ip, _) = s.split_once('/').unwrap_or((s, ""));
        if parse_ip(ip)? != c.network {
            return Err(format!("{s} is not a network address: host bits are set"));
        }
        Ok(c)
    }

    /// Parses `a.b.c.d/n` (host bits cleared) or a bare address (`/32`).
    pub fn parse_loose(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            // Digits only, without a leading zero: `u8::from_str` alone would take `+8`
            // and `08`, which NSX refuses.
            Some((ip, p)) => (
                ip,
                Some(p)
                    .filter(|p| {
                        !p.is_empty()
                            && p.bytes().all(|b| b.is_ascii_digit())
                            && (p.len() == 1 || !p.starts_with('0'))
                    })
                    .and_then(|p| p.parse::<u8>().ok())
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("{s} has an invalid prefix length"))?,
            ),
            None => (s, 32),
        };
        let addr = parse_ip(ip)?;
        Ok(Self {
            network: addr & mask(prefix),
            prefix,
        })
    }

    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn first(&self) -> u32 {
        self.network
    }

    pub fn last(&self) -> u32 {
        (u64::from(self.network) + self.size() - 1) as u32
    }

    pub fn contains(&self, ip: u32) -> bool {
        ip & mask(self.prefix) == self.network
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

pub fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// A dotted-quad IPv4 address, exactly: no surrounding blanks and no leading zeros (which
/// NSX refuses rather than guess whether they are octal).
pub fn parse_ip(s: &str) -> Result<u32, String> {
    s.parse::<Ipv4Addr>()
        .map(u32::from)
        .map_err(|_| format!("'{s}' is not a valid IPv4 address"))
}

pub fn ip_to_string(ip: u32) -> String {
    Ipv4Addr::from(ip).to_string()
}

/// An inclusive address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u32,
    pub end: u32,
}

impl Range {
    /// Number of addresses (never zero: a range holds at least its start).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        u64::from(self.end) - u64::from(self.start) + 1
    }
}

/// One element of an IPSet's `ip_addresses`: an address, a CIDR, or `a-b`.
pub fn parse_ip_element(s: &str) -> Result<Range, String> {
    if let Some((a, b)) = s.split_once('-') {
        let (start, end) = (parse_ip(a)?, parse_ip(b)?);
        if start > end {
            return Err(format!("range {s} ends before it starts"));
        }
        return Ok(Range { start, end });
    }
    let c = Cidr::parse_loose(s)?;
    Ok(Range {
        start: c.first(),
        end: c.last(),
    })
}

/// Allocated addresses of one pool or subnet, each with its owner (an object id, or
/// `"api"` for an explicit `?action=ALLOCATE`).
pub type Allocations = BTreeMap<u32, String>;

/// The lowest free address of `ranges`, skipping `reserved` (gateways).
pub fn first_free(ranges: &[Range], allocated: &Allocations, reserved: &[u32]) -> Option<u32> {
    for r in ranges {
        // Walk allocated addresses inside the range in order; the first gap is free.
        let mut candidate = u64::from(r.start);
        let end = u64::from(r.end);
        for (&ip, _) in allocated.range(r.start..=r.end) {
            while candidate < u64::from(ip) {
                if !reserved.contains(&(candidate as u32)) {
                    return Some(candidate as u32);
                }
                candidate += 1;
            }
            candidate = u64::from(ip) + 1;
        }
        while candidate <= end {
            if !reserved.contains(&(candidate as u32)) {
                return Some(candidate as u32);
            }
            candidate += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_cidr_rejects_host_bits_and_loose_clears_them() {
        assert!(Cidr::parse_strict("10.0.0.1/24").is_err());
        let c = Cidr::parse_loose("10.0.0.1/24").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/24");
        assert_eq!(c.size(), 256);
        assert!(c.contains(parse_ip("10.0.0.255").unwrap()));
        assert!(!c.contains(parse_ip("10.0.1.0").unwrap()));
        assert!(Cidr::parse_strict("10.0.0.0/33").is_err());
        assert!(Cidr::parse_strict("300.0.0.0/8").is_err());
        assert_eq!(Cidr::parse_strict("0.0.0.0/0").unwrap().size(), 1 << 32);
    }

    #[test]
    fn first_free_skips_allocated_and_reserved() {
        let r = [Range { start: 10, end: 14 }];
        let mut a = Allocations::new();
        assert_eq!(first_free(&r, &a, &[10]), Some(11));
        a.insert(11, "x".into());
        a.insert(12, "y".into());
        assert_eq!(first_free(&r, &a, &[10]), Some(13));
        a.insert(13, "z".into());
        a.insert(14, "w".into());
        assert_eq!(first_free(&r, &a, &[10]), None);
    }

    #[test]
    fn ip_elements_accept_address_cidr_and_range() {
        assert_eq!(parse_ip_element("1.2.3.4").unwrap().len(), 1);
        assert_eq!(parse_ip_element("1.2.3.0/30").unwrap().len(), 4);
        assert_eq!(parse_ip_element("1.2.3.4-1.2.3.9").unwrap().len(), 6);
        assert!(parse_ip_element("1.2.3.9-1.2.3.4").is_err());
        assert!(parse_ip_element("bogus").is_err());
    }
}
