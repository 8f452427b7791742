//! The CNI plugin's protocol and main logic (spec 1.0.0 and 1.1.0): the environment and the
//! network configuration kubelet's runtime passes, validated; ADD, DEL, CHECK, VERSION, STATUS
//! and GC answered through the node agent ([`AgentClient`]); results and errors as the spec
//! writes them (errors go to stdout, where libcni reads them, with a non-zero exit).

use std::collections::BTreeMap;

pub mod client;
pub mod wire;

use serde::Deserialize;
use serde_json::{Value, json};

/// The node agent's socket when the configuration names none.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/nsx-node-agent/cni.sock";

/// Spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// Error codes of the spec.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific: the agent could not wire the pod.
    pub const AGENT_FAILED: u32 = 100;
    /// Plugin-specific: CHECK found the pod not wired as its previous result says.
    pub const CHECK_FAILED: u32 = 101;
}

/// A CNI error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON the spec prints on stdout.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// A CNI command. The names are the spec's (`CNI_COMMAND`), and the same names travel on the
/// agent's wire (serde), so the plugin and the agent share one vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub const ALL: [Command; 6] = [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Version,
        Command::Status,
        Command::Gc,
    ];

    /// The name in `CNI_COMMAND` and on the agent's wire.
    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    pub fn from_name(name: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// The environment, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`: `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ...
    pub args: BTreeMap<String, String>,
}

fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
}

impl Env {
    pub fn parse(vars: &BTreeMap<String, String>) -> Result<Env, CniError> {
        let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
        let bad = |msg: String| CniError::new(code::INVALID_ENV, msg, "");
        let command = match get("CNI_COMMAND").as_str() {
            "" => return Err(bad("CNI_COMMAND is not set".into())),
            name => Command::from_name(name)
                .ok_or_else(|| bad(format!("CNI_COMMAND {name:?} is not a CNI command")))?,
        };
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = get("CNI_CONTAINERID");
        if needs_container {
            if container_id.is_empty() {
                return Err(bad("CNI_CONTAINERID is required".into()));
            }
            if !valid_container_id(&container_id) {
                return Err(bad(format!(
                    "CNI_CONTAINERID {container_id:?} must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
                )));
            }
        }
        let netns = get("CNI_NETNS");
        if matches!(command, Command::Add | Command::Check) && netns.is_empty() {
            return Err(bad("CNI_NETNS is required".into()));
        }
        let ifname = get("CNI_IFNAME");
        if needs_container && !valid_ifname(&ifname) {
            return Err(bad(format!(
                "CNI_IFNAME {ifname:?} is not a valid interface name"
            )));
        }
        let mut args = BTreeMap::new();
        for kv in get("CNI_ARGS").split(';').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("CNI_ARGS entry {kv:?} is not KEY=VALUE")))?;
            args.insert(k.to_string(), v.to_string());
        }
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

/// The network configuration on stdin (the fields this plugin reads).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    /// Where the node agent listens (ours; default [`DEFAULT_AGENT_SOCKET`]).
    #[serde(rename = "agentSocket", default)]
    pub agent_socket: Option<String>,
    /// How long to wait for the agent's answer, in seconds (ours; 1 to 600). Without it ADD
    /// waits 75 s (the agent's own wait for NCP, and the wiring) and the others 15 s.
    #[serde(rename = "agentTimeoutSeconds", default)]
    pub agent_timeout_seconds: Option<u64>,
    /// GC: the attachments the runtime still uses.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "the network configuration is not JSON",
                format!("line {}, column {}: {e}", e.line(), e.column()),
            )
        })?;
        let conf: NetConf = serde_json::from_value(v).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                e.to_string(),
            )
        })?;
        if let Some(t) = conf.agent_timeout_seconds
            && !(1..=600).contains(&t)
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                format!("agentTimeoutSeconds must be from 1 to 600, not {t}"),
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                "name is empty",
            ));
        }
        Ok(conf)
    }
}

/// What the agent reports for a wired pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddress {
    /// `a.b.c.d/prefix`.
    pub ip: String,
    pub gateway: String,
    pub mac: String,
    /// The host end of the pod's veth (name, MAC), when the plugin made one: the result lists
    /// it, as the reference plugins do, so that chained plugins (`bandwidth`) find it.
    pub host: Option<(String, String)>,
}

/// The node agent, as the plugin reaches it (a local socket in production, turmoil in the
/// simulation, a direct call in tests).
pub trait AgentClient {
    fn add(&mut self, env: &Env) -> Result<PodAddress, CniError>;
    /// Succeeds when the pod is unknown.
    fn del(&mut self, env: &Env) -> Result<(), CniError>;
    fn check(&mut self, env: &Env) -> Result<Option<PodAddress>, CniError>;
    fn status(&mut self) -> Result<(), CniError>;
    /// Removes every pod not in `keep`.
    fn gc(&mut self, keep: &[Attachment]) -> Result<(), CniError>;
}

/// The agent could not be reached: every command that needs it fails in the spec's terms
/// (kubelet retries ADD and DEL; STATUS says the plugin is not available).
pub struct Unreachable(pub String);

impl AgentClient for Unreachable {
    fn add(&mut self, _: &Env) -> Result<PodAddress, CniError> {
        Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the node agent is not reachable",
            self.0.clone(),
        ))
    }
    fn del(&mut self, _: &Env) -> Result<(), CniError> {
        Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the node agent is not reachable",
            self.0.clone(),
        ))
    }
    fn check(&mut self, _: &Env) -> Result<Option<PodAddress>, CniError> {
        Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the node agent is not reachable",
            self.0.clone(),
        ))
    }
    fn status(&mut self) -> Result<(), CniError> {
        Err(CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            "the node agent is not reachable",
            self.0.clone(),
        ))
    }
    fn gc(&mut self, _: &[Attachment]) -> Result<(), CniError> {
        Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the node agent is not reachable",
            self.0.clone(),
        ))
    }
}

/// The ADD result: the host end of the veth first (no sandbox) when there is one, then the
/// pod's interface, which the address names by index.
pub fn result_json(version: &str, env: &Env, a: &PodAddress) -> Value {
    let mut interfaces = Vec::new();
    if let Some((name, mac)) = &a.host {
        interfaces.push(json!({"name": name, "mac": mac}));
    }
    let pod = interfaces.len();
    interfaces.push(json!({"name": env.ifname, "mac": a.mac, "sandbox": env.netns}));
    json!({
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": [{"address": a.ip, "gateway": a.gateway, "interface": pod}],
        "routes": [{"dst": "0.0.0.0/0", "gw": a.gateway}],
        "dns": {}
    })
}

/// The `CNI_*` variables of a process environment. The runtime's variables must be UTF-8: one
/// that is not (its name or its value) is error 4 naming it; variables that are not the
/// runtime's are ignored, whatever their bytes.
pub fn cni_vars(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for (k, v) in vars {
        let name = k.to_string_lossy();
        if !name.starts_with("CNI_") {
            continue;
        }
        match (k.to_str(), v.to_str()) {
            (Some(k), Some(v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is not valid UTF-8"),
                    format!("value: {:?}", v.to_string_lossy()),
                ));
            }
        }
    }
    Ok(out)
}

/// The error answer for a failure before [`run`] can start (the environment itself is
/// unreadable): in the configuration's `cniVersion` when stdin names a supported one.
pub fn fail_early(stdin: &[u8], e: &CniError) -> (i32, String) {
    let newest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    let version = NetConf::parse(stdin)
        .ok()
        .map(|c| c.cni_version)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| newest.to_string());
    (1, e.to_json(&version).to_string())
}

/// Runs one plugin invocation: `(exit code, stdout)`.
pub fn run<A: AgentClient>(
    vars: &BTreeMap<String, String>,
    stdin: &[u8],
    agent: &mut A,
) -> (i32, String) {
    let newest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    let fail = |version: &str, e: CniError| (1, e.to_json(version).to_string());
    let env = match Env::parse(vars) {
        Ok(e) => e,
        Err(e) => return fail(newest, e),
    };
    if env.command == Command::Version {
        return (
            0,
            json!({"cniVersion": newest, "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return fail(newest, e),
    };
    let version = conf.cni_version.as_str();
    if !SUPPORTED_VERSIONS.contains(&version) {
        return fail(
            newest,
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {version} is not supported"),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ),
        );
    }
    if matches!(env.command, Command::Status | Command::Gc) && version == "1.0.0" {
        return fail(
            version,
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("{:?} needs cniVersion 1.1.0", env.command),
                "",
            ),
        );
    }
    let r = match env.command {
        Command::Add => agent
            .add(&env)
            .map(|a| result_json(version, &env, &a).to_string()),
        Command::Del => agent.del(&env).map(|()| String::new()),
        Command::Check => {
            let Some(prev) = conf.prev_result.as_ref() else {
                return fail(
                    version,
                    CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult", ""),
                );
            };
            let want_ip = prev["ips"][0]["address"].as_str().unwrap_or("").to_string();
            match agent.check(&env) {
                Ok(Some(a)) if a.ip == want_ip => Ok(String::new()),
                Ok(Some(a)) => Err(CniError::new(
                    code::CHECK_FAILED,
                    "the pod's address differs from its previous result",
                    format!("now {}, was {want_ip}", a.ip),
                )),
                Ok(None) => Err(CniError::new(
                    code::UNKNOWN_CONTAINER,
                    format!("container {} is not wired", env.container_id),
                    "",
                )),
                Err(e) => Err(e),
            }
        }
        Command::Status => agent.status().map(|()| String::new()),
        Command::Gc => agent
            .gc(conf.valid_attachments.as_deref().unwrap_or(&[]))
            .map(|()| String::new()),
        Command::Version => unreachable!("answered above"),
    };
    match r {
        Ok(out) => (0, out),
        Err(e) => fail(version, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn command_names_are_the_same_in_the_environment_and_on_the_wire() {
        for c in Command::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), json!(c.name()));
            assert_eq!(Command::from_name(c.name()), Some(c));
            let wire: Command = serde_json::from_value(json!(c.name())).unwrap();
            assert_eq!(wire, c);
        }
        assert_eq!(Command::from_name("add"), None);
        assert!(serde_json::from_value::<Command>(json!("Add")).is_err());
    }

    #[test]
    fn runtime_variables_must_be_utf8_and_others_are_ignored() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = || OsString::from_vec(vec![0x66, 0xff, 0xfe]);
        let ok = |k: &str, v: &str| (OsString::from(k), OsString::from(v));
        let vars = cni_vars([ok("CNI_COMMAND", "ADD"), (OsString::from("LANG"), bad())])
            .expect("an unrelated variable is ignored");
        assert_eq!(vars.len(), 1);
        for (k, v) in [
            (OsString::from("CNI_ARGS"), bad()),
            (OsString::from("CNI_CONTAINERID"), bad()),
            (
                OsString::from_vec(b"CNI_\xff".to_vec()),
                OsString::from("x"),
            ),
        ] {
            let e = cni_vars([ok("CNI_COMMAND", "ADD"), (k, v)]).expect_err("not UTF-8");
            assert_eq!(e.code, code::INVALID_ENV, "{e:?}");
        }
        let e = cni_vars([(OsString::from("CNI_ARGS"), bad())]).unwrap_err();
        let (rc, out) = fail_early(
            br#"{"cniVersion": "1.0.0", "name": "n", "type": "nsx-cni"}"#,
            &e,
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (rc, v["code"].as_u64(), v["cniVersion"].as_str()),
            (1, Some(4), Some("1.0.0"))
        );
        assert!(v["msg"].as_str().unwrap().contains("CNI_ARGS"), "{v}");
    }

    #[test]
    fn the_environment_is_validated_per_command() {
        let ok = Env::parse(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1.2_3"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1"),
        ]))
        .unwrap();
        assert_eq!(ok.args["K8S_POD_NAME"], "web-1");
        for (kv, why) in [
            (vec![], "CNI_COMMAND"),
            (vec![("CNI_COMMAND", "FROB")], "FROB"),
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_NETNS", "n"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_CONTAINERID",
            ),
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "-x"),
                    ("CNI_NETNS", "n"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "must start",
            ),
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "x"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_NETNS",
            ),
            (
                vec![
                    ("CNI_COMMAND", "CHECK"),
                    ("CNI_CONTAINERID", "x"),
                    ("CNI_NETNS", "n"),
                    ("CNI_IFNAME", "a/b"),
                ],
                "CNI_IFNAME",
            ),
            (
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "x"),
                    ("CNI_IFNAME", "waytoolonginterface"),
                ],
                "CNI_IFNAME",
            ),
            (
                vec![("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "novalue")],
                "KEY=VALUE",
            ),
        ] {
            let e = Env::parse(&vars(&kv)).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV);
            assert!(e.msg.contains(why), "{kv:?}: {e}");
        }
        // DEL without a netns is fine (the sandbox may be gone).
        Env::parse(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        Env::parse(&vars(&[("CNI_COMMAND", "VERSION")])).unwrap();
    }

    #[test]
    fn the_configuration_errors_name_the_place() {
        let e = NetConf::parse(b"{\"cniVersion\": \"1.0.0\",\n \"name\": }").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        assert!(e.details.contains("line 2"), "{e:?}");
        let e = NetConf::parse(br#"{"cniVersion": "1.0.0", "type": "nsx"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("name"), "{e:?}");
    }
}
