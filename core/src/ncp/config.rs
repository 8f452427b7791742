//! NCP's configuration file, `ncp.ini`, with NCP's own section and key names.
//!
//! Parsing is strict where a mistake would hurt and lenient where NCP is: a key we do not
//! support is a warning (with its line), a required key that is missing or a value of the wrong
//! form is an error naming the key and line.

use std::collections::BTreeMap;

/// A configuration error: what is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    #[error("missing required key [{section}] {key}")]
    Missing {
        section: &'static str,
        key: &'static str,
    },
    #[error("line {line}: [{section}] {key} = {value:?}: {reason}")]
    Invalid {
        section: String,
        key: String,
        value: String,
        line: usize,
        reason: String,
    },
}

/// The settings this NCP supports. Names follow `ncp.ini`.
#[derive(Debug, Clone, PartialEq)]
pub struct NcpConfig {
    /// `[coe] cluster`: the `ncp/cluster` tag value; NSX names start with it.
    pub cluster: String,
    /// `[nsx_v3] nsx_api_managers`: one or more `host[:port]` or URLs.
    pub nsx_api_managers: Vec<String>,
    pub nsx_api_user: Option<String>,
    pub nsx_api_password: Option<String>,
    pub nsx_api_cert_file: Option<String>,
    pub nsx_api_private_key_file: Option<String>,
    pub ca_file: Option<String>,
    pub thumbprint: Option<String>,
    pub insecure: bool,
    /// `container_ip_blocks`: IP block ids or names; empty = discover by `ncp/cluster` tag.
    pub container_ip_blocks: Vec<String>,
    /// `external_ip_pools`: SNAT pools (ids or names); empty = discover by tags.
    pub external_ip_pools: Vec<String>,
    pub external_ip_pools_lb: Vec<String>,
    /// `top_tier_router`: the tier-0 router id or name; empty = discover by tag.
    pub top_tier_router: Option<String>,
    /// `overlay_tz`: the overlay transport zone id or name; empty = discover by tag.
    pub overlay_tz: Option<String>,
    /// `edge_cluster`: the edge cluster (id or name) of the load balancer's tier-1, which NSX
    /// requires for a tier-1 with a load balancer; empty = the tier-0's.
    pub edge_cluster: Option<String>,
    /// `subnet_prefix`: prefix length of each namespace's subnet (default 24).
    pub subnet_prefix: u8,
    /// `[k8s] apiserver_host_ip` / `apiserver_host_port`; absent = in-cluster config.
    pub apiserver_host_ip: Option<String>,
    pub apiserver_host_port: Option<u16>,
    pub k8s_ca_file: Option<String>,
    pub client_token_file: Option<String>,
    /// `[ha] master_timeout` etc., seconds.
    pub ha_master_timeout_s: u64,
    pub ha_heartbeat_period_s: u64,
    pub ha_update_timeout_s: u64,
    /// `[nsx_v3] concurrent_connections`: NSX requests in flight at most, as nsxlib's pool
    /// per manager. NCP applies that many independent operations of a plan at once.
    pub concurrent_connections: usize,
    /// `[coe] enable_snat` (default true): whether namespaces get a SNAT rule and address; when
    /// false, pods leave with their own addresses (the container block must be routable).
    pub enable_snat: bool,
    /// `[coe] loglevel`: NCP's log level, unless `RUST_LOG` says otherwise.
    pub loglevel: Option<LogLevel>,
    /// `[k8s] loglevel`: the level of the Kubernetes client's logs.
    pub k8s_loglevel: Option<LogLevel>,
    /// `[nsx_v3] pool_algorithm`, `service_size`, `l4_persistence`.
    pub lb: LbSettings,
}

/// How NCP's load balancer is configured (`[nsx_v3] pool_algorithm`, `service_size`,
/// `l4_persistence`): what every pool, the LB service and every virtual server are written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LbSettings {
    pub algorithm: PoolAlgorithm,
    pub size: LbSize,
    /// `l4_persistence = source_ip`: every virtual server keeps a client on one member (a
    /// service's `sessionAffinity` then only sets the timeout); unset, only services with
    /// `sessionAffinity: ClientIP` get persistence.
    pub l4_persistence: bool,
}

impl LbSettings {
    /// The `[nsx_v3]` keys these settings come from.
    pub const KEYS: [&str; 3] = ["pool_algorithm", "service_size", "l4_persistence"];

    /// Sets the one of [`Self::KEYS`] that `key` names from its text; `Err` says what is
    /// expected.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let expected = |names: Vec<&str>| format!("expected one of {}", names.join(", "));
        match key {
            "pool_algorithm" => {
                self.algorithm = PoolAlgorithm::parse(value).ok_or_else(|| {
                    expected(PoolAlgorithm::ALL.iter().map(|a| a.nsx_name()).collect())
                })?;
            }
            "service_size" => {
                self.size = LbSize::parse(value)
                    .ok_or_else(|| expected(LbSize::ALL.iter().map(|a| a.nsx_name()).collect()))?;
            }
            "l4_persistence" => {
                self.l4_persistence = match value.trim().to_ascii_lowercase().as_str() {
                    "" | "none" => false,
                    "source_ip" => true,
                    _ => return Err("expected source_ip (or nothing)".into()),
                };
            }
            other => return Err(format!("{other} is not a load balancer setting")),
        }
        Ok(())
    }
}

/// An LB pool's algorithm, as NSX names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolAlgorithm {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnection,
    WeightedLeastConnection,
    IpHash,
}

impl PoolAlgorithm {
    pub const ALL: [Self; 5] = [
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::LeastConnection,
        Self::WeightedLeastConnection,
        Self::IpHash,
    ];

    pub fn nsx_name(self) -> &'static str {
        match self {
            Self::RoundRobin => "ROUND_ROBIN",
            Self::WeightedRoundRobin => "WEIGHTED_ROUND_ROBIN",
            Self::LeastConnection => "LEAST_CONNECTION",
            Self::WeightedLeastConnection => "WEIGHTED_LEAST_CONNECTION",
            Self::IpHash => "IP_HASH",
        }
    }

    /// `ROUND_ROBIN` etc., in any case.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.nsx_name().eq_ignore_ascii_case(text.trim()))
    }
}

/// An LB service's size, which bounds its virtual servers (NSX-T 2.4's limits: 20, 100, 1,000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbSize {
    #[default]
    Small,
    Medium,
    Large,
}

impl LbSize {
    pub const ALL: [Self; 3] = [Self::Small, Self::Medium, Self::Large];

    pub fn nsx_name(self) -> &'static str {
        match self {
            Self::Small => "SMALL",
            Self::Medium => "MEDIUM",
            Self::Large => "LARGE",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.nsx_name().eq_ignore_ascii_case(text.trim()))
    }

    /// Virtual servers an LB service of this size holds at most.
    pub fn virtual_servers(self) -> usize {
        match self {
            Self::Small => 20,
            Self::Medium => 100,
            Self::Large => 1000,
        }
    }
}

/// A log level as `ncp.ini` spells it (Python's logging names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "DEBUG" => Some(Self::Debug),
            "INFO" => Some(Self::Info),
            "WARNING" | "WARN" => Some(Self::Warning),
            "ERROR" | "CRITICAL" => Some(Self::Error),
            _ => None,
        }
    }

    /// The level as a `tracing` filter directive.
    pub fn directive(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warning => "warn",
            Self::Error => "error",
        }
    }
}

impl NcpConfig {
    /// The log filter `ncp.ini` asks for (`[coe] loglevel` for NCP, `[k8s] loglevel` for the
    /// Kubernetes client), for when `RUST_LOG` is not set.
    pub fn log_filter(&self) -> String {
        let mut f = self
            .loglevel
            .unwrap_or(LogLevel::Info)
            .directive()
            .to_string();
        if let Some(k) = self.k8s_loglevel {
            f.push_str(&format!(",kube={0},nsx_core::k8s={0}", k.directive()));
        }
        f
    }
}

/// nsxlib's default for `concurrent_connections`.
pub const DEFAULT_CONCURRENT_CONNECTIONS: usize = 10;

/// A parsed config and the warnings it produced (unknown keys), each with its line.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub config: NcpConfig,
    pub warnings: Vec<String>,
}

struct Entry {
    value: String,
    line: usize,
}

type Sections = BTreeMap<String, BTreeMap<String, Entry>>;

fn parse_ini(text: &str) -> Result<Sections, ConfigError> {
    let mut sections: Sections = BTreeMap::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(rest) = t.strip_prefix('[') {
            let name = rest.strip_suffix(']').ok_or_else(|| ConfigError::Syntax {
                line,
                reason: format!("section header {t:?} is not closed"),
            })?;
            current = Some(name.trim().to_string());
            sections.entry(name.trim().to_string()).or_default();
            continue;
        }
        let (k, v) = t
            .split_once('=')
            .or_else(|| t.split_once(':'))
            .ok_or_else(|| ConfigError::Syntax {
                line,
                reason: format!("expected `key = value`, got {t:?}"),
            })?;
        let section = current.clone().ok_or_else(|| ConfigError::Syntax {
            line,
            reason: format!("key {:?} before any [section]", k.trim()),
        })?;
        sections.entry(section).or_default().insert(
            k.trim().to_string(),
            Entry {
                value: v.trim().to_string(),
                line,
            },
        );
    }
    Ok(sections)
}

const KNOWN: &[(&str, &[&str])] = &[
    ("DEFAULT", &[]),
    (
        "coe",
        &["cluster", "adaptor", "node_type", "enable_snat", "loglevel"],
    ),
    (
        "nsx_v3",
        &[
            "nsx_api_managers",
            "nsx_api_user",
            "nsx_api_password",
            "nsx_api_cert_file",
            "nsx_api_private_key_file",
            "ca_file",
            "thumbprint",
            "insecure",
            "container_ip_blocks",
            "external_ip_pools",
            "external_ip_pools_lb",
            "top_tier_router",
            "overlay_tz",
            "edge_cluster",
            "subnet_prefix",
            "concurrent_connections",
            "pool_algorithm",
            "service_size",
            "l4_persistence",
        ],
    ),
    (
        "k8s",
        &[
            "apiserver_host_ip",
            "apiserver_host_port",
            "ca_file",
            "client_token_file",
            "loglevel",
        ],
    ),
    (
        "ha",
        &["master_timeout", "heartbeat_period", "update_timeout"],
    ),
];

/// NSX credentials given outside the file (a Kubernetes Secret in the environment); they
/// override `[nsx_v3] nsx_api_user` / `nsx_api_password`.
#[derive(Debug, Clone, Default)]
pub struct CredentialOverrides {
    pub user: Option<String>,
    pub password: Option<String>,
}

impl NcpConfig {
    /// Parses `ncp.ini` text.
    pub fn parse(text: &str) -> Result<Parsed, ConfigError> {
        Self::parse_with(text, &CredentialOverrides::default())
    }

    /// Parses `ncp.ini` text, with credentials from elsewhere taking the keys' place.
    pub fn parse_with(text: &str, overrides: &CredentialOverrides) -> Result<Parsed, ConfigError> {
        // A byte-order mark (Windows editors write one) is not part of the first line, as
        // Python's configparser reading `utf-8-sig` has it.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let sections = parse_ini(text)?;
        let mut warnings = Vec::new();
        for (name, entries) in &sections {
            match KNOWN.iter().find(|(s, _)| s == name) {
                None => {
                    let line = entries.values().map(|e| e.line).min().unwrap_or(0);
                    warnings.push(format!(
                        "line {line}: section [{name}] is not supported and is ignored"
                    ));
                }
                Some((_, keys)) => {
                    for (k, e) in entries {
                        if !keys.contains(&k.as_str()) {
                            warnings.push(format!(
                                "line {}: [{name}] {k} is not supported and is ignored",
                                e.line
                            ));
                        }
                    }
                }
            }
        }
        let get = |s: &str, k: &str| sections.get(s).and_then(|m| m.get(k));
        let text_of =
            |s: &str, k: &str| get(s, k).map(|e| e.value.clone()).filter(|v| !v.is_empty());
        let list = |s: &str, k: &str| -> Vec<String> {
            text_of(s, k)
                .map(|v| {
                    v.split(',')
                        .map(|x| x.trim().to_string())
                        .filter(|x| !x.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let invalid = |s: &str, k: &str, e: &Entry, reason: &str| ConfigError::Invalid {
            section: s.into(),
            key: k.into(),
            value: e.value.clone(),
            line: e.line,
            reason: reason.into(),
        };
        let boolean = |s: &str, k: &str, default: bool| -> Result<bool, ConfigError> {
            match get(s, k) {
                None => Ok(default),
                Some(e) => match e.value.to_ascii_lowercase().as_str() {
                    "true" | "yes" | "1" | "on" => Ok(true),
                    "false" | "no" | "0" | "off" => Ok(false),
                    _ => Err(invalid(s, k, e, "expected true or false")),
                },
            }
        };
        let number = |s: &str, k: &str, default: u64, max: u64| -> Result<u64, ConfigError> {
            match get(s, k) {
                None => Ok(default),
                Some(e) => match e.value.parse::<u64>() {
                    Ok(n) if n <= max => Ok(n),
                    _ => Err(invalid(
                        s,
                        k,
                        e,
                        &format!("expected a whole number up to {max}"),
                    )),
                },
            }
        };
        let cluster = text_of("coe", "cluster").ok_or(ConfigError::Missing {
            section: "coe",
            key: "cluster",
        })?;
        if let Some(e) = get("coe", "cluster")
            && (cluster.len() > 40
                || !cluster
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        {
            return Err(invalid(
                "coe",
                "cluster",
                e,
                "use at most 40 letters, digits, '-', '_' or '.'",
            ));
        }
        let managers = list("nsx_v3", "nsx_api_managers");
        if managers.is_empty() {
            return Err(ConfigError::Missing {
                section: "nsx_v3",
                key: "nsx_api_managers",
            });
        }
        let prefix = number("nsx_v3", "subnet_prefix", 24, 32)?;
        if !(16..=30).contains(&prefix) {
            let e = get("nsx_v3", "subnet_prefix").expect("present when not the default");
            return Err(invalid(
                "nsx_v3",
                "subnet_prefix",
                e,
                "a namespace subnet prefix must be 16-30",
            ));
        }
        let concurrent = number(
            "nsx_v3",
            "concurrent_connections",
            DEFAULT_CONCURRENT_CONNECTIONS as u64,
            100,
        )?;
        if concurrent == 0 {
            let e = get("nsx_v3", "concurrent_connections").expect("0 is not the default");
            return Err(invalid(
                "nsx_v3",
                "concurrent_connections",
                e,
                "at least one connection is needed",
            ));
        }
        // Keys whose only supported value is the one this NCP implements: anything else is
        // refused by name rather than accepted and ignored.
        let only = |s: &str, k: &str, allowed: &str, why: &str| -> Result<(), ConfigError> {
            match get(s, k) {
                Some(e) if !e.value.eq_ignore_ascii_case(allowed) => Err(invalid(s, k, e, why)),
                _ => Ok(()),
            }
        };
        only(
            "coe",
            "adaptor",
            "kubernetes",
            "only kubernetes is supported (NCP's openshift4 and pcf adaptors are not)",
        )?;
        only(
            "coe",
            "node_type",
            "HOSTVM",
            "only HOSTVM is supported (pods in VMs, VLAN-tagged under the node's VIF); BAREMETAL is not",
        )?;
        let level = |s: &str| -> Result<Option<LogLevel>, ConfigError> {
            match get(s, "loglevel") {
                None => Ok(None),
                Some(e) => LogLevel::parse(&e.value).map(Some).ok_or_else(|| {
                    invalid(s, "loglevel", e, "expected DEBUG, INFO, WARNING or ERROR")
                }),
            }
        };
        let port =
            match get("k8s", "apiserver_host_port") {
                None => None,
                Some(e) => Some(e.value.parse::<u16>().map_err(|_| {
                    invalid("k8s", "apiserver_host_port", e, "expected a port number")
                })?),
            };
        let mut lb = LbSettings::default();
        for key in LbSettings::KEYS {
            if let Some(e) = get("nsx_v3", key) {
                lb.set(key, &e.value)
                    .map_err(|reason| invalid("nsx_v3", key, e, &reason))?;
            }
        }
        let mut config = NcpConfig {
            cluster,
            nsx_api_managers: managers,
            nsx_api_user: text_of("nsx_v3", "nsx_api_user"),
            nsx_api_password: text_of("nsx_v3", "nsx_api_password"),
            nsx_api_cert_file: text_of("nsx_v3", "nsx_api_cert_file"),
            nsx_api_private_key_file: text_of("nsx_v3", "nsx_api_private_key_file"),
            ca_file: text_of("nsx_v3", "ca_file"),
            thumbprint: text_of("nsx_v3", "thumbprint"),
            insecure: boolean("nsx_v3", "insecure", false)?,
            container_ip_blocks: list("nsx_v3", "container_ip_blocks"),
            external_ip_pools: list("nsx_v3", "external_ip_pools"),
            external_ip_pools_lb: list("nsx_v3", "external_ip_pools_lb"),
            top_tier_router: text_of("nsx_v3", "top_tier_router"),
            overlay_tz: text_of("nsx_v3", "overlay_tz"),
            edge_cluster: text_of("nsx_v3", "edge_cluster"),
            subnet_prefix: prefix as u8,
            apiserver_host_ip: text_of("k8s", "apiserver_host_ip"),
            apiserver_host_port: port,
            k8s_ca_file: text_of("k8s", "ca_file"),
            client_token_file: text_of("k8s", "client_token_file"),
            ha_master_timeout_s: number("ha", "master_timeout", 18, 3600)?,
            ha_heartbeat_period_s: number("ha", "heartbeat_period", 6, 3600)?,
            ha_update_timeout_s: number("ha", "update_timeout", 12, 3600)?,
            concurrent_connections: concurrent as usize,
            enable_snat: boolean("coe", "enable_snat", true)?,
            loglevel: level("coe")?,
            k8s_loglevel: level("k8s")?,
            lb,
        };
        if let Some(u) = &overrides.user {
            config.nsx_api_user = Some(u.clone());
        }
        if let Some(p) = &overrides.password {
            config.nsx_api_password = Some(p.clone());
        }
        if config.nsx_api_user.is_some() != config.nsx_api_password.is_some() {
            return Err(ConfigError::Missing {
                section: "nsx_v3",
                key: if config.nsx_api_user.is_some() {
                    "nsx_api_password"
                } else {
                    "nsx_api_user"
                },
            });
        }
        if config.nsx_api_user.is_none() && config.nsx_api_cert_file.is_none() {
            return Err(ConfigError::Missing {
                section: "nsx_v3",
                key: "nsx_api_user",
            });
        }
        Ok(Parsed { config, warnings })
    }

    /// A config for tests and the simulation.
    pub fn for_cluster(cluster: &str) -> Self {
        Self {
            cluster: cluster.into(),
            nsx_api_managers: vec!["nsx-manager".into()],
            nsx_api_user: Some("admin".into()),
            nsx_api_password: Some("admin".into()),
            nsx_api_cert_file: None,
            nsx_api_private_key_file: None,
            ca_file: None,
            thumbprint: None,
            insecure: false,
            container_ip_blocks: Vec::new(),
            external_ip_pools: Vec::new(),
            external_ip_pools_lb: Vec::new(),
            top_tier_router: None,
            overlay_tz: None,
            edge_cluster: None,
            subnet_prefix: 24,
            apiserver_host_ip: None,
            apiserver_host_port: None,
            k8s_ca_file: None,
            client_token_file: None,
            ha_master_timeout_s: 18,
            ha_heartbeat_period_s: 6,
            ha_update_timeout_s: 12,
            concurrent_connections: DEFAULT_CONCURRENT_CONNECTIONS,
            enable_snat: true,
            loglevel: None,
            k8s_loglevel: None,
            lb: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
# NCP configuration
[coe]
cluster = k8s-a
adaptor = kubernetes

[nsx_v3]
nsx_api_managers = 10.0.0.10, 10.0.0.11:443
nsx_api_user = admin
nsx_api_password = secret
insecure = true
container_ip_blocks = block-1
subnet_prefix = 26
overlay_tz = tz-1
frobnicate = 3

[k8s]
apiserver_host_ip = 10.0.0.1
apiserver_host_port = 6443

[dhcp]
x = 1
";

    #[test]
    fn the_load_balancer_keys_are_read_and_bad_values_refused_by_line() {
        let base = "[coe]\ncluster = a\n[nsx_v3]\nnsx_api_managers = m\nnsx_api_user = u\nnsx_api_password = p\n";
        let c = NcpConfig::parse(base).unwrap().config;
        assert_eq!(c.lb, LbSettings::default());
        assert_eq!(c.lb.algorithm.nsx_name(), "ROUND_ROBIN");
        assert_eq!(c.lb.size.nsx_name(), "SMALL");
        assert!(!c.lb.l4_persistence);
        let p = NcpConfig::parse(&format!(
            "{base}pool_algorithm = least_connection\nservice_size = MEDIUM\nl4_persistence = source_ip\n"
        ))
        .unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.config.lb.algorithm, PoolAlgorithm::LeastConnection);
        assert_eq!(p.config.lb.size, LbSize::Medium);
        assert_eq!(p.config.lb.size.virtual_servers(), 100);
        assert!(p.config.lb.l4_persistence);
        for (line, key) in [
            ("pool_algorithm = FASTEST", "pool_algorithm"),
            ("service_size = HUGE", "service_size"),
            ("l4_persistence = cookie", "l4_persistence"),
        ] {
            let e = NcpConfig::parse(&format!("{base}{line}\n")).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { key: k, line: 7, .. } if k == key),
                "{line}: {e:?}"
            );
        }
    }

    #[test]
    fn a_full_config_parses_with_warnings_for_unknown_keys() {
        let p = NcpConfig::parse(GOOD).unwrap();
        let c = p.config;
        assert_eq!(c.cluster, "k8s-a");
        assert_eq!(c.nsx_api_managers, ["10.0.0.10", "10.0.0.11:443"]);
        assert!(c.insecure);
        assert_eq!(c.subnet_prefix, 26);
        assert_eq!(c.container_ip_blocks, ["block-1"]);
        assert_eq!(c.overlay_tz.as_deref(), Some("tz-1"));
        assert_eq!(c.apiserver_host_port, Some(6443));
        assert_eq!(c.ha_master_timeout_s, 18);
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("[dhcp]") || p.warnings[1].contains("[dhcp]"));
        assert!(
            p.warnings
                .iter()
                .any(|w| w.starts_with("line 14:") && w.contains("frobnicate")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn every_coe_key_read_has_an_effect_or_is_refused_by_name() {
        let with = |extra: &str| {
            NcpConfig::parse(&GOOD.replace(
                "adaptor = kubernetes\n",
                &format!("adaptor = kubernetes\n{extra}\n"),
            ))
        };
        // enable_snat: read, default true.
        assert!(NcpConfig::parse(GOOD).unwrap().config.enable_snat);
        assert!(!with("enable_snat = False").unwrap().config.enable_snat);
        assert!(matches!(
            with("enable_snat = maybe"),
            Err(ConfigError::Invalid { ref key, line: 5, .. }) if key == "enable_snat"
        ));
        // What this NCP does not implement is an error naming the key, not a silent default.
        let err = NcpConfig::parse(&GOOD.replace("adaptor = kubernetes", "adaptor = openshift4"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 4: [coe] adaptor") && err.contains("openshift4"),
            "{err}"
        );
        let err = with("node_type = BAREMETAL").unwrap_err().to_string();
        assert!(
            err.contains("[coe] node_type") && err.contains("BAREMETAL"),
            "{err}"
        );
        assert!(with("node_type = HOSTVM").is_ok());
        // Log levels become the log filter (RUST_LOG still wins in the binary).
        let c = with("loglevel = WARNING").unwrap().config;
        assert_eq!(c.log_filter(), "warn");
        let c = NcpConfig::parse(&GOOD.replace("[k8s]\n", "[k8s]\nloglevel = DEBUG\n"))
            .unwrap()
            .config;
        assert_eq!(c.log_filter(), "info,kube=debug,nsx_core::k8s=debug");
        let err = with("loglevel = LOUD").unwrap_err().to_string();
        assert!(
            err.contains("[coe] loglevel") && err.contains("LOUD"),
            "{err}"
        );
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_line() {
        let with_bom = format!("\u{feff}{GOOD}");
        let p = NcpConfig::parse(&with_bom).expect("a BOM is accepted");
        assert_eq!(p.config, NcpConfig::parse(GOOD).unwrap().config);
        assert_eq!(p.warnings, NcpConfig::parse(GOOD).unwrap().warnings);
    }

    #[test]
    fn missing_and_malformed_values_name_the_key_and_line() {
        assert_eq!(
            NcpConfig::parse(
                "[nsx_v3]\nnsx_api_managers = a\nnsx_api_user = u\nnsx_api_password = p\n"
            ),
            Err(ConfigError::Missing {
                section: "coe",
                key: "cluster"
            })
        );
        assert_eq!(
            NcpConfig::parse("[coe]\ncluster = a\n"),
            Err(ConfigError::Missing {
                section: "nsx_v3",
                key: "nsx_api_managers"
            })
        );
        let e = NcpConfig::parse("[coe]\ncluster = a\n[nsx_v3]\nnsx_api_managers = m\nnsx_api_user = u\nnsx_api_password = p\ninsecure = maybe\n").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, line: 7, .. } if key == "insecure"),
            "{e}"
        );
        let e = NcpConfig::parse("[coe]\ncluster = a\n[nsx_v3]\nnsx_api_managers = m\nnsx_api_user = u\nnsx_api_password = p\nsubnet_prefix = 8\n").unwrap_err();
        assert!(e.to_string().contains("subnet_prefix"), "{e}");
        let e = NcpConfig::parse(
            "[coe]\ncluster = a\n[nsx_v3]\nnsx_api_managers = m\nnsx_api_user = u\n",
        )
        .unwrap_err();
        assert_eq!(
            e,
            ConfigError::Missing {
                section: "nsx_v3",
                key: "nsx_api_password"
            }
        );
        assert!(matches!(
            NcpConfig::parse("cluster = a\n"),
            Err(ConfigError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            NcpConfig::parse("[coe\n"),
            Err(ConfigError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            NcpConfig::parse("[coe]\njunk\n"),
            Err(ConfigError::Syntax { line: 2, .. })
        ));
        let e = NcpConfig::parse("[coe]\ncluster = bad name!\n").unwrap_err();
        assert!(e.to_string().contains("cluster"));
    }

    #[test]
    fn concurrent_connections_defaults_to_nsxlibs_and_refuses_zero() {
        let base = "[coe]\ncluster = a\n[nsx_v3]\nnsx_api_managers = m\nnsx_api_user = u\nnsx_api_password = p\n";
        assert_eq!(
            NcpConfig::parse(base)
                .unwrap()
                .config
                .concurrent_connections,
            10
        );
        let four = NcpConfig::parse(&format!("{base}concurrent_connections = 4\n")).unwrap();
        assert_eq!(four.config.concurrent_connections, 4);
        assert!(four.warnings.is_empty(), "{:?}", four.warnings);
        for bad in ["0", "many", "101"] {
            let e =
                NcpConfig::parse(&format!("{base}concurrent_connections = {bad}\n")).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { key, line: 7, .. } if key == "concurrent_connections"),
                "{bad}: {e}"
            );
        }
    }
}
