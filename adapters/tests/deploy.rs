//! The manifests in `deploy/` as a cluster and the binaries would take them: every document
//! is a valid object of its Kubernetes type (no unknown field), NCP's config parses without a
//! warning, every container's arguments are accepted by the binary it runs, the CNI config is
//! what the plugin reads and points at the agent's socket, and the RBAC grants no more than
//! the code uses.

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Secret, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use nsx_core::ncp::config::NcpConfig;
use nsx_sim::scenario::spec::round_trip;
use serde_json::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut out = Vec::new();
    for doc in text.split("\n---\n") {
        if doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let v: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
        out.push(v);
    }
    out
}

fn all() -> Vec<Value> {
    ["rbac.yaml", "ncp.yaml", "nsx-node-agent.yaml"]
        .into_iter()
        .flat_map(documents)
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn every_manifest_is_a_valid_kubernetes_object() {
    let docs = all();
    assert!(docs.len() >= 12, "{} documents", docs.len());
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let name = &d["metadata"]["name"];
        let r = match kind {
            "Namespace" => round_trip::<Namespace>(d),
            "ServiceAccount" => round_trip::<ServiceAccount>(d),
            "ClusterRole" => round_trip::<ClusterRole>(d),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(d),
            "Role" => round_trip::<Role>(d),
            "RoleBinding" => round_trip::<RoleBinding>(d),
            "ConfigMap" => round_trip::<ConfigMap>(d),
            "Secret" => round_trip::<Secret>(d),
            "Deployment" => round_trip::<Deployment>(d),
            "DaemonSet" => round_trip::<DaemonSet>(d),
            other => Err(format!("unexpected kind {other}")),
        };
        r.unwrap_or_else(|e| panic!("{kind} {name}: {e}"));
        if kind != "Namespace" && !kind.starts_with("Cluster") {
            assert_eq!(d["metadata"]["namespace"], "nsx-system", "{kind} {name}");
        }
    }
    // A check that can fail: a misspelt field is caught.
    let mut bad = find(&docs, "DaemonSet", "nsx-node-agent").clone();
    bad["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    assert!(round_trip::<DaemonSet>(&bad).is_err());
}

#[test]
fn ncp_ini_parses_cleanly_and_names_the_lease_and_the_mounted_secret() {
    let docs = all();
    let cm: ConfigMap = typed(find(&docs, "ConfigMap", "ncp-config"));
    let ini = &cm.data.unwrap()["ncp.ini"];
    let parsed = NcpConfig::parse(ini).unwrap();
    assert_eq!(parsed.warnings, Vec::<String>::new());
    let config = parsed.config;
    // The leader Role allows exactly the Lease this cluster's NCP uses.
    let role: Role = typed(find(&docs, "Role", "nsx-ncp-leader"));
    let names: Vec<String> = role
        .rules
        .unwrap_or_default()
        .into_iter()
        .flat_map(|r| r.resource_names.unwrap_or_default())
        .collect();
    assert_eq!(names, [format!("ncp-{}", config.cluster)]);
    // The certificate files are in the mounted Secret.
    let d: Deployment = typed(find(&docs, "Deployment", "nsx-ncp"));
    let pod = d.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "nsx-secret")
        .expect("the secret is mounted");
    for f in [
        config.nsx_api_cert_file.unwrap(),
        config.nsx_api_private_key_file.unwrap(),
        config.ca_file.unwrap(),
    ] {
        let key = f
            .strip_prefix(&format!("{}/", mount.mount_path))
            .unwrap_or_else(|| panic!("{f} is not under {}", mount.mount_path));
        let secret: Secret = typed(find(&docs, "Secret", "nsx-secret"));
        assert!(secret.string_data.unwrap().contains_key(key), "{key}");
    }
}

/// `$(VAR)` in arguments, as the kubelet expands them from the container's env.
fn expand(arg: &str) -> String {
    arg.replace("$(NODE_IP)", "10.0.0.5")
}

fn accepted(c: &Container) -> Result<(), String> {
    let command = c.command.clone().unwrap_or_default();
    let program = command.first().map(String::as_str).unwrap_or_default();
    let exe = match program {
        "/usr/local/bin/ncp" => env!("CARGO_BIN_EXE_ncp"),
        "/usr/local/bin/nsx-node-agent" => env!("CARGO_BIN_EXE_nsx-node-agent"),
        "/bin/sh" => return Ok(()),
        other => return Err(format!("unknown program {other}")),
    };
    let mut args: Vec<String> = c.args.iter().flatten().map(|a| expand(a)).collect();
    args.push("--help".into());
    let out = Command::new(exe).args(&args).output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn pod_of(docs: &[Value], kind: &str, name: &str) -> PodSpec {
    let v = find(docs, kind, name);
    serde_json::from_value(v["spec"]["template"]["spec"].clone()).unwrap()
}

#[test]
fn every_container_runs_a_binary_that_accepts_its_arguments() {
    let docs = all();
    let mut checked = 0;
    for (kind, name) in [("Deployment", "nsx-ncp"), ("DaemonSet", "nsx-node-agent")] {
        let pod = pod_of(&docs, kind, name);
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            accepted(c).unwrap_or_else(|e| panic!("{kind} {name} container {}: {e}", c.name));
            // Every mount names a volume of the pod.
            for m in c.volume_mounts.iter().flatten() {
                assert!(
                    pod.volumes.iter().flatten().any(|v| v.name == m.name),
                    "{}: no volume {}",
                    c.name,
                    m.name
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
    // A check that can fail: an argument the binary does not know.
    let mut pod = pod_of(&docs, "DaemonSet", "nsx-node-agent");
    pod.containers[0]
        .args
        .get_or_insert_with(Vec::new)
        .push("--uplink-port=eth1".into());
    assert!(accepted(&pod.containers[0]).is_err());
}

#[test]
fn the_cni_config_is_what_the_plugin_reads_and_points_at_the_agents_socket() {
    let docs = all();
    let cm: ConfigMap = typed(find(&docs, "ConfigMap", "nsx-cni-config"));
    let list: Value = serde_json::from_str(&cm.data.unwrap()["10-nsx.conflist"]).unwrap();
    let plugin = &list["plugins"][0];
    // The runtime hands each plugin its entry with the list's name and version.
    let mut conf = plugin.clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    let parsed = nsx_core::cni::NetConf::parse(conf.to_string().as_bytes()).unwrap();
    assert_eq!(parsed.plugin_type, "nsx-cni");
    let socket = parsed.agent_socket.unwrap();
    let pod = pod_of(&docs, "DaemonSet", "nsx-node-agent");
    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "nsx-node-agent")
        .unwrap();
    assert!(
        agent
            .args
            .iter()
            .flatten()
            .any(|a| *a == format!("--cni-socket={socket}")),
        "{:?}",
        agent.args
    );
    // The socket's directory is the host's, so kubelet's plugin reaches it.
    let dir = Path::new(&socket)
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .expect("the socket directory is mounted");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some(dir.as_str())
    );
    // The init container installs the plugin the conflist names.
    let init = &pod.init_containers.unwrap()[0];
    assert!(
        init.args
            .iter()
            .flatten()
            .any(|a| a.contains("/host/opt/cni/bin/nsx-cni"))
    );
}

fn verbs(rules: &[PolicyRule]) -> Vec<(String, String)> {
    rules
        .iter()
        .flat_map(|r| {
            r.resources
                .iter()
                .flatten()
                .flat_map(move |res| r.verbs.iter().map(move |v| (res.clone(), v.clone())))
        })
        .collect()
}

#[test]
fn rbac_grants_reads_to_the_node_and_only_the_writes_ncp_makes() {
    let docs = all();
    let node: ClusterRole = typed(find(&docs, "ClusterRole", "nsx-node-agent"));
    for (res, verb) in verbs(&node.rules.unwrap_or_default()) {
        assert!(
            ["get", "list", "watch"].contains(&verb.as_str()),
            "the node agent may {verb} {res}"
        );
    }
    let ncp: ClusterRole = typed(find(&docs, "ClusterRole", "nsx-ncp"));
    let granted = verbs(&ncp.rules.unwrap_or_default());
    let writes: Vec<&(String, String)> = granted
        .iter()
        .filter(|(_, v)| !["get", "list", "watch"].contains(&v.as_str()))
        .collect();
    let expected = [
        ("pods", "patch"),
        ("namespaces", "patch"),
        ("services/status", "patch"),
        ("events", "create"),
    ];
    assert_eq!(writes.len(), expected.len(), "{writes:?}");
    for (res, verb) in expected {
        assert!(
            writes.iter().any(|(r, v)| r == res && v == verb),
            "{verb} {res} missing: {writes:?}"
        );
    }
    assert!(!granted.iter().any(|(r, _)| r == "secrets"), "{granted:?}");
}
