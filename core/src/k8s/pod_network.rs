//! NCP's pod annotation (`ncp/network`): what NSX gave a pod's logical port, written by NCP
//! and read by the node agent, which wires the pod with it. Its only home: NCP writes it, the
//! agent, NCP's policy code and the harness read it, all through [`PodNetwork`].
//!
//! The text is a JSON object with the keys in this order (serde writes them as the fields
//! are declared, which is the order NCP has always written): `gateway`, `ip` (with the
//! subnet's prefix), `logical_port_id`, `mac`, `vlan`.

use serde::{Deserialize, Serialize};

/// The value of the `ncp/network` annotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The namespace subnet's gateway, `a.b.c.d`.
    pub gateway: String,
    /// The pod's address and its subnet's prefix, `a.b.c.d/len`.
    pub ip: String,
    /// The NSX logical port the pod is attached to.
    pub logical_port_id: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The VLAN that tells the pod's traffic apart under its node's VIF (1-4094).
    pub vlan: u16,
}

/// Why an annotation cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadPodNetwork(pub String);

impl PodNetwork {
    /// The annotation's text.
    pub fn to_json(&self) -> String {
        debug_assert!(
            (1..=4094).contains(&self.vlan),
            "NCP writes a real VLAN, not {}",
            self.vlan
        );
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads an annotation as the agent must before wiring a pod with it: every field there
    /// and well-formed.
    pub fn parse(text: &str) -> Result<Self, BadPodNetwork> {
        let n: PodNetwork = serde_json::from_str(text).map_err(|e| BadPodNetwork(e.to_string()))?;
        if !(1..=4094).contains(&n.vlan) {
            return Err(BadPodNetwork(format!("vlan {} is not 1-4094", n.vlan)));
        }
        n.address()?;
        n.mac_address()?;
        Ok(n)
    }

    /// The pod's address and prefix length.
    pub fn address(&self) -> Result<(u32, u8), BadPodNetwork> {
        let (a, p) = self
            .ip
            .split_once('/')
            .ok_or_else(|| BadPodNetwork(format!("ip {:?} has no prefix", self.ip)))?;
        let a = a
            .parse::<std::net::Ipv4Addr>()
            .map_err(|_| BadPodNetwork(format!("ip {:?}", self.ip)))?;
        let p: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| BadPodNetwork(format!("prefix in {:?}", self.ip)))?;
        Ok((u32::from(a), p))
    }

    /// The pod's MAC as a number (what the hairpin flows write into `eth_dst`).
    pub fn mac_address(&self) -> Result<u64, BadPodNetwork> {
        let bad = || BadPodNetwork(format!("mac {:?}", self.mac));
        let mut v: u64 = 0;
        let mut n = 0;
        for part in self.mac.split(':') {
            if part.len() != 2 {
                return Err(bad());
            }
            v = (v << 8) | u64::from(u8::from_str_radix(part, 16).map_err(|_| bad())?);
            n += 1;
        }
        if n != 6 {
            return Err(bad());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PodNetwork {
        PodNetwork {
            gateway: "10.4.0.1".into(),
            ip: "10.4.0.7/24".into(),
            logical_port_id: "lp-1".into(),
            mac: "02:50:56:00:00:07".into(),
            vlan: 12,
        }
    }

    #[test]
    fn the_text_is_the_contract() {
        // What NCP wrote before this type existed, byte for byte: agents already running read it.
        let text = r#"{"gateway":"10.4.0.1","ip":"10.4.0.7/24","logical_port_id":"lp-1","mac":"02:50:56:00:00:07","vlan":12}"#;
        assert_eq!(sample().to_json(), text);
        assert_eq!(PodNetwork::parse(text), Ok(sample()));
    }

    #[test]
    fn a_malformed_annotation_says_what_is_wrong() {
        let mut n = sample();
        n.vlan = 0;
        let e = PodNetwork::parse(&serde_json::to_string(&n).unwrap()).unwrap_err();
        assert!(e.0.contains("vlan 0"), "{e}");
        let mut n = sample();
        n.ip = "10.4.0.7".into();
        let e = PodNetwork::parse(&serde_json::to_string(&n).unwrap()).unwrap_err();
        assert!(e.0.contains("no prefix"), "{e}");
        let mut n = sample();
        n.mac = "02:50:56:00:07".into();
        assert!(PodNetwork::parse(&serde_json::to_string(&n).unwrap()).is_err());
        let e = PodNetwork::parse(r#"{"ip":"10.4.0.7/24"}"#).unwrap_err();
        assert!(e.0.contains("missing field"), "{e}");
        assert_eq!(sample().address(), Ok((0x0a04_0007, 24)));
        assert_eq!(sample().mac_address(), Ok(0x0250_5600_0007));
    }
}
