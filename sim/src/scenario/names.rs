//! Small vocabularies of the scenario format: endpoints (`ns/pod`, `svc/ns/name`, ...),
//! protocols, NSX resource types and their collections.

/// A DNS label (RFC 1123): what Kubernetes accepts as a namespace or node name.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `a.b.c.d/len` as (network address, length).
pub fn parse_cidr(s: &str) -> Result<(u32, u8), String> {
    let Some((ip, _)) = s.split_once('/') else {
        return Err(format!("`{s}` is not a CIDR (a.b.c.d/len)"));
    };
    parse_ip(ip).map_err(|_| format!("`{s}` is not a CIDR (a.b.c.d/len)"))?;
    let net: ipnet::Ipv4Net = s.parse().map_err(|_| format!("`{s}`: bad prefix length"))?;
    if net.trunc() != net {
        return Err(format!("`{s}` has host bits set"));
    }
    Ok((u32::from(net.network()), net.prefix_len()))
}

pub fn parse_ip(s: &str) -> Result<u32, String> {
    s.parse::<std::net::Ipv4Addr>()
        .map(u32::from)
        .map_err(|_| format!("`{s}` is not an IPv4 address"))
}

pub fn ip_string(ip: u32) -> String {
    std::net::Ipv4Addr::from(ip).to_string()
}

/// IP protocol number of `TCP`, `UDP`, `SCTP`.
pub fn protocol(p: &str) -> Result<u8, String> {
    match p {
        "TCP" => Ok(6),
        "UDP" => Ok(17),
        "SCTP" => Ok(132),
        _ => Err(format!("protocol `{p}` is not TCP, UDP or SCTP")),
    }
}

/// Where a connectivity check starts or ends.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    Pod {
        namespace: String,
        name: String,
    },
    /// A Service's ClusterIP.
    Service {
        namespace: String,
        name: String,
    },
    /// A LoadBalancer Service's VIP.
    Lb {
        namespace: String,
        name: String,
    },
    External(u32),
    /// A node's own address (its VIF on the node switch): where the kubelet's probes come
    /// from, and as a target the node's NodePorts (or its host).
    Node(String),
}

impl Endpoint {
    /// `ns/pod`, `svc/ns/name`, `lb/ns/name`, `node/name` or `external/a.b.c.d`; a source
    /// must be a pod, a node or external.
    pub fn parse(s: &str, source: bool) -> Result<Endpoint, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let e = match parts.as_slice() {
            ["external", ip] => Endpoint::External(parse_ip(ip)?),
            ["node", name] if is_dns_label(name) => Endpoint::Node(name.to_string()),
            ["svc", ns, name] => Endpoint::Service {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            ["lb", ns, name] => Endpoint::Lb {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            [ns, name] if !ns.is_empty() && !name.is_empty() => Endpoint::Pod {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            _ => {
                return Err(format!(
                    "`{s}` is not ns/pod, svc/ns/name, lb/ns/name, node/name or external/a.b.c.d"
                ));
            }
        };
        if source && matches!(e, Endpoint::Service { .. } | Endpoint::Lb { .. }) {
            return Err(format!(
                "`{s}` cannot be a source (a pod, node/name or external/IP)"
            ));
        }
        Ok(e)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Endpoint::Service { namespace, name } => write!(f, "svc/{namespace}/{name}"),
            Endpoint::Lb { namespace, name } => write!(f, "lb/{namespace}/{name}"),
            Endpoint::External(ip) => write!(f, "external/{}", ip_string(*ip)),
            Endpoint::Node(name) => write!(f, "node/{name}"),
        }
    }
}

/// NSX resource types a scenario can preload or edit, and their API collection.
const COLLECTIONS: &[(&str, &str)] = &[
    ("LogicalSwitch", "/api/v1/logical-switches"),
    ("LogicalPort", "/api/v1/logical-ports"),
    ("LogicalRouter", "/api/v1/logical-routers"),
    ("IpPool", "/api/v1/pools/ip-pools"),
    ("NSGroup", "/api/v1/ns-groups"),
    ("IPSet", "/api/v1/ip-sets"),
    ("FirewallSection", "/api/v1/firewall/sections"),
    ("LbService", "/api/v1/loadbalancer/services"),
    ("LbVirtualServer", "/api/v1/loadbalancer/virtual-servers"),
    ("LbPool", "/api/v1/loadbalancer/pools"),
    (
        "LbSourceIpPersistenceProfile",
        "/api/v1/loadbalancer/persistence-profiles",
    ),
];

pub const PRELOADABLE: &[&str] = &[
    "LogicalSwitch",
    "LogicalPort",
    "LogicalRouter",
    "IpPool",
    "NSGroup",
    "IPSet",
    "FirewallSection",
    "LbService",
    "LbVirtualServer",
    "LbPool",
];

/// Names `expect.nsx.count` takes: resource types, and `LogicalRouterPort` and `NatRule`
/// for all router ports and NAT rules.
pub const COUNTABLE: &[&str] = &[
    "LogicalSwitch",
    "LogicalPort",
    "LogicalRouter",
    "LogicalRouterPort",
    "IpPool",
    "IpBlockSubnet",
    "NatRule",
    "NSGroup",
    "IPSet",
    "FirewallSection",
    "FirewallRule",
    "LbService",
    "LbVirtualServer",
    "LbPool",
    "LbSourceIpPersistenceProfile",
];

/// The resource types `admin_edit` takes.
pub fn editable() -> Vec<&'static str> {
    COLLECTIONS.iter().map(|(r, _)| *r).collect()
}

pub fn collection_of(resource_type: &str) -> Option<&'static str> {
    COLLECTIONS
        .iter()
        .find(|(r, _)| *r == resource_type)
        .map(|(_, c)| *c)
}

/// The `expect.nsx.count` name an object counts under.
pub fn count_name(resource_type: &str) -> &str {
    if resource_type.starts_with("LogicalRouter") && resource_type.ends_with("Port") {
        "LogicalRouterPort"
    } else if resource_type.starts_with("LogicalRouter") && resource_type != "LogicalRouter" {
        // LogicalRouterLinkPortOnTIER0 and friends.
        "LogicalRouterPort"
    } else {
        resource_type
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_alike() {
        for s in [
            "shop/web-1",
            "svc/shop/api",
            "lb/shop/front",
            "external/203.0.113.10",
        ] {
            assert_eq!(Endpoint::parse(s, false).unwrap().to_string(), s);
        }
        assert!(Endpoint::parse("svc/shop/api", true).is_err());
        assert!(Endpoint::parse("shop", false).is_err());
        assert!(Endpoint::parse("external/300.1.1.1", false).is_err());
    }

    #[test]
    fn cidrs_and_labels() {
        assert_eq!(parse_cidr("10.4.0.0/16").unwrap(), (0x0a04_0000, 16));
        assert!(parse_cidr("10.4.0.1/16").unwrap_err().contains("host bits"));
        assert!(parse_cidr("10.4.0.0").is_err());
        assert!(is_dns_label("node-1"));
        assert!(!is_dns_label("Node_1"));
        assert_eq!(
            count_name("LogicalRouterLinkPortOnTIER0"),
            "LogicalRouterPort"
        );
        assert_eq!(count_name("LogicalRouterDownLinkPort"), "LogicalRouterPort");
        assert_eq!(count_name("LogicalRouter"), "LogicalRouter");
    }
}
