//! A node on turmoil: the node agent (serving the CNI plugin over TCP), nsx-kube-proxy, a
//! watcher of ovs-vswitchd, and the kubelet that calls the CNI plugin for the node's pods and
//! reports them ready. The OVS bridge and the kubelet's memory live outside the host, so an
//! agent restart (a bounce of the host) keeps them, as it does on a real node.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fake_ovs::Bridge;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use nsx_core::agent::kube_pods::WatchedPods;
use nsx_core::agent::server::{AgentService, WaitConfig};
use nsx_core::agent::{Agent, AgentConfig};
use nsx_core::cni::client::Answered;
use nsx_core::cni::wire::{WireRequest, WireResponse};
use nsx_core::proxy::run::{ProxySignals, Synced};
use nsx_core::proxy::{Proxy, ProxyConfig, ServicePort, ServicePortKey};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, Notify};

use crate::net::kube_client;
use crate::trace::Trace;

/// The port the agent serves the CNI plugin on (a Unix socket on a real node).
pub const AGENT_PORT: u16 = 7000;
/// The bridge's uplink (the node VM's NIC): the first port, as on a node NCP set up.
pub const UPLINK: u32 = 1;

/// What the kubelet remembers of a pod it set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletPod {
    pub uid: String,
    pub container_id: String,
    /// The CNI result's address (`a.b.c.d/len`).
    pub ip: String,
    pub mac: String,
    /// The status patch (ready, podIP) was accepted.
    pub reported: bool,
}

/// One node's state that outlives its host's restarts.
pub struct NodeState {
    pub name: String,
    pub vif_id: String,
    /// The node VIF's logical port: where the node's own traffic enters NSX.
    pub port_id: String,
    pub node_ip: u32,
    pub bridge: Arc<Mutex<Bridge>>,
    pub kubelet: RefCell<BTreeMap<(String, String), KubeletPod>>,
    /// Pods whose CNI ADD failed, with the plugin's error (retried).
    pub cni_errors: RefCell<BTreeMap<(String, String), String>>,
    /// What the proxy last installed (the service ports), and the bridge's restart count then.
    pub proxy_installed: RefCell<Option<(BTreeMap<ServicePortKey, ServicePort>, u64)>>,
    /// The bridge's restart count the agent last replayed for.
    pub agent_replayed: RefCell<Option<u64>>,
    pub proxy_round: RefCell<u16>,
    /// Bumped whenever the kubelet, the proxy or the agent's replay changes what the node
    /// reports: with the bridge's generation, a hint that a check's answer may have changed.
    pub events: std::cell::Cell<u64>,
}

impl NodeState {
    pub fn new(name: &str, vif_id: &str, port_id: &str, node_ip: u32) -> Rc<Self> {
        let mut b = Bridge::new("br-int");
        // The uplink exists before any pod (it is the node VM's NIC).
        let _ = b.add_port("eth1", None, BTreeMap::new());
        Rc::new(Self {
            name: name.to_string(),
            vif_id: vif_id.to_string(),
            port_id: port_id.to_string(),
            node_ip,
            bridge: Arc::new(Mutex::new(b)),
            kubelet: RefCell::default(),
            cni_errors: RefCell::default(),
            proxy_installed: RefCell::default(),
            agent_replayed: RefCell::default(),
            proxy_round: RefCell::new(0),
            events: std::cell::Cell::new(0),
        })
    }
}

/// The container id the simulated runtime gives a pod (stable from its uid).
pub fn container_id(uid: &str) -> String {
    format!("{:016x}", nsx_core::hash::stable_hash(uid))
}

/// The round and group ids a previous proxy left on the bridge.
fn previous_proxy(b: &Bridge) -> (Option<u16>, BTreeSet<u32>) {
    let round = nsx_core::ovs::pipeline::previous_round(b.flows().iter().map(|(f, _)| f.cookie));
    (round, b.groups().map(|g| g.group_id).collect())
}

/// The node host: everything the node runs, until the host is stopped.
pub async fn host(node: Rc<NodeState>, trace: Trace) -> turmoil::Result {
    trace.record(&node.name, "agent started");
    let kube = kube_client("http://apiserver:6443")?;
    // The agent: its view from the switch's ports, then every pod's flows again (idempotent),
    // in case OVS restarted while it was down.
    let mut agent = Agent::new(AgentConfig { uplink: UPLINK });
    let (previous_round, groups, restarts) = {
        let mut b = node.bridge.lock().await;
        agent.recover(&*b);
        agent
            .replay(&mut *b)
            .map_err(|e| format!("agent replay: {e}"))?;
        let (r, g) = previous_proxy(&b);
        (r, g, b.restarts)
    };
    *node.agent_replayed.borrow_mut() = Some(restarts);
    let service = Arc::new(AgentService {
        agent: Mutex::new(agent),
        switch: node.bridge.clone(),
        pods: WatchedPods::start(kube.clone(), &node.name),
        wait: WaitConfig {
            timeout: Duration::from_secs(20),
            poll: Duration::from_millis(200),
        },
    });
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", AGENT_PORT)).await?;
    {
        let service = service.clone();
        tokio::task::spawn_local(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = service.clone();
                tokio::task::spawn_local(async move {
                    let _ = s.serve(stream).await;
                });
            }
        });
    }
    // nsx-kube-proxy.
    let round = nsx_core::ovs::pipeline::next_round(previous_round);
    *node.proxy_round.borrow_mut() = round;
    let signals = ProxySignals::default();
    {
        let proxy = Proxy::new(
            ProxyConfig {
                node_name: node.name.clone(),
                node_ips: vec![node.node_ip],
            },
            round,
            previous_round,
            groups,
        );
        let (n, k, s, t) = (node.clone(), kube.clone(), signals.clone(), trace.clone());
        tokio::task::spawn_local(async move {
            let bridge = n.bridge.clone();
            let name = n.name.clone();
            nsx_core::proxy::run::run(
                k,
                proxy,
                name.clone(),
                bridge,
                s,
                nsx_core::proxy::run::Timing {
                    debounce: Duration::from_millis(20),
                    retry: Duration::from_millis(500),
                },
                move |synced: Synced<'_>| {
                    let restarts = n.bridge.try_lock().map_or(u64::MAX, |b| b.restarts);
                    if synced.report.ops > 0 {
                        t.record(
                            &name,
                            format!(
                                "proxy sync: {} service ports, {} ops, {} conntrack entries flushed",
                                synced.report.service_ports, synced.report.ops, synced.report.flushed
                            ),
                        );
                    }
                    *n.proxy_installed.borrow_mut() = Some((synced.want.clone(), restarts));
                    n.events.set(n.events.get() + 1);
                },
            )
            .await;
        });
    }
    // The kubelet.
    {
        let (n, k, t) = (node.clone(), kube.clone(), trace.clone());
        tokio::task::spawn_local(async move { kubelet(n, k, t).await });
    }
    // Watching ovs-vswitchd: a restart wipes flows and groups; the agent and the proxy put
    // theirs back.
    let mut seen = restarts;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = node.bridge.lock().await.restarts;
        if now != seen {
            seen = now;
            trace.record(&node.name, "ovs-vswitchd restarted: replaying");
            {
                let mut agent = service.agent.lock().await;
                let mut b = node.bridge.lock().await;
                if let Err(e) = agent.replay(&mut *b) {
                    trace.record(&node.name, format!("agent replay failed: {e}"));
                    seen = u64::MAX;
                    continue;
                }
            }
            *node.agent_replayed.borrow_mut() = Some(now);
            node.events.set(node.events.get() + 1);
            signals.bridge_restarted.store(true, Ordering::SeqCst);
            signals.changed.notify_one();
        }
    }
}

/// One CNI invocation as kubelet makes it: environment and network config, the plugin's
/// request to the agent over the simulated network, the plugin's own result handling.
async fn cni(node: &NodeState, command: &str, pod: &Pod, cid: &str) -> Result<Value, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let vars: BTreeMap<String, String> = [
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", cid.to_string()),
        ("CNI_NETNS", format!("/var/run/netns/cni-{cid}")),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={cid}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let stdin = json!({"cniVersion": "1.1.0", "name": "nsx", "type": "nsx-cni"}).to_string();
    let env = nsx_core::cni::Env::parse(&vars).map_err(|e| e.msg)?;
    let req = WireRequest::from_env(&env, &[]);
    let answer = match exchange(&node.name, &req).await {
        Ok(a) => a,
        Err(e) => {
            let (_, out) = nsx_core::cni::run(
                &vars,
                stdin.as_bytes(),
                &mut nsx_core::cni::Unreachable(format!("{}: {e}", node.name)),
            );
            return Err(out);
        }
    };
    let (code, out) = nsx_core::cni::run(&vars, stdin.as_bytes(), &mut Answered(answer));
    if code != 0 {
        return Err(out);
    }
    if out.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&out).map_err(|e| format!("the plugin printed bad JSON: {e}"))
}

async fn exchange(host: &str, req: &WireRequest) -> Result<WireResponse, String> {
    let stream = turmoil::net::TcpStream::connect((host, AGENT_PORT))
        .await
        .map_err(|e| e.to_string())?;
    let (r, mut w) = tokio::io::split(stream);
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    w.write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let n = tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(r).read_line(&mut answer),
    )
    .await
    .map_err(|_| "the agent did not answer in 30 s".to_string())?
    .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the agent closed the connection".into());
    }
    serde_json::from_str(&answer).map_err(|e| e.to_string())
}

/// The kubelet: ADD for every pod scheduled here that it has not set up, then the pod's
/// status (ready, with the address the plugin returned); DEL for pods that are gone.
async fn kubelet(node: Rc<NodeState>, kube: kube::Client, trace: Trace) {
    let changed = Arc::new(Notify::new());
    let (pods, _h) =
        nsx_core::k8s::watch::watch(Api::<Pod>::all(kube.clone()), changed.clone(), None, |_| {});
    let _ = pods.wait_until_ready().await;
    // Pods whose worker is running.
    let in_flight: Rc<RefCell<BTreeSet<(String, String)>>> = Rc::default();
    loop {
        node.events.set(node.events.get() + 1);
        let mine: BTreeMap<(String, String), Arc<Pod>> = pods
            .state()
            .into_iter()
            .filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name.as_str())
                    && !p
                        .spec
                        .as_ref()
                        .and_then(|s| s.host_network)
                        .unwrap_or(false)
            })
            .map(|p| {
                (
                    (
                        p.metadata.namespace.clone().unwrap_or_default(),
                        p.metadata.name.clone().unwrap_or_default(),
                    ),
                    p,
                )
            })
            .collect();
        let mut retry = false;
        // Gone (or replaced by a pod of the same name): DEL.
        let stale: Vec<((String, String), KubeletPod)> = node
            .kubelet
            .borrow()
            .iter()
            .filter(|(k, kp)| {
                mine.get(*k).and_then(|p| p.metadata.uid.as_deref()) != Some(kp.uid.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, kp) in stale {
            if in_flight.borrow().contains(&key) {
                // Its worker is still at it: the next round looks again.
                retry = true;
                continue;
            }
            let mut p = Pod::default();
            p.metadata.namespace = Some(key.0.clone());
            p.metadata.name = Some(key.1.clone());
            match cni(&node, "DEL", &p, &kp.container_id).await {
                Ok(_) => {
                    trace.record(&node.name, format!("kubelet: CNI DEL {}/{}", key.0, key.1));
                    node.kubelet.borrow_mut().remove(&key);
                }
                Err(e) => {
                    trace.record(
                        &node.name,
                        format!("kubelet: CNI DEL {}/{} failed: {e}", key.0, key.1),
                    );
                    retry = true;
                }
            }
        }
        // Each pod has its own worker, as in the real kubelet: one pod waiting for its network
        // does not hold up the others.
        for (key, pod) in &mine {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let done = node
                .kubelet
                .borrow()
                .get(key)
                .is_some_and(|kp| kp.uid == uid && kp.reported);
            if done || !in_flight.borrow_mut().insert(key.clone()) {
                continue;
            }
            let (n, k, t, f, c) = (
                node.clone(),
                kube.clone(),
                trace.clone(),
                in_flight.clone(),
                changed.clone(),
            );
            let (key, pod) = (key.clone(), pod.clone());
            tokio::task::spawn_local(async move {
                let ok = pod_worker(&n, &k, &t, &key, &pod).await;
                // What the kubelet holds changed: the harness's cached checks look again.
                n.events.set(n.events.get() + 1);
                if !ok {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                f.borrow_mut().remove(&key);
                if !ok {
                    c.notify_one();
                }
            });
        }
        if retry {
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        } else {
            changed.notified().await;
        }
    }
}

/// One pod's worker: CNI ADD unless done for this pod (uid), then the status (ready, with the
/// address the plugin returned). `false` when something failed and the pod needs another try.
async fn pod_worker(
    node: &NodeState,
    kube: &kube::Client,
    trace: &Trace,
    key: &(String, String),
    pod: &Pod,
) -> bool {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let known = node.kubelet.borrow().get(key).cloned();
    let kp = match known {
        Some(kp) if kp.uid == uid => kp,
        _ => {
            let cid = container_id(&uid);
            match cni(node, "ADD", pod, &cid).await {
                Ok(result) => {
                    let ip = result["ips"][0]["address"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    let mac = result["interfaces"][0]["mac"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    trace.record(
                        &node.name,
                        format!("kubelet: CNI ADD {}/{} -> {ip}", key.0, key.1),
                    );
                    node.cni_errors.borrow_mut().remove(key);
                    let kp = KubeletPod {
                        uid: uid.clone(),
                        container_id: cid,
                        ip,
                        mac,
                        reported: false,
                    };
                    node.kubelet.borrow_mut().insert(key.clone(), kp.clone());
                    kp
                }
                Err(e) => {
                    let first = !node.cni_errors.borrow().contains_key(key);
                    if first {
                        trace.record(
                            &node.name,
                            format!("kubelet: CNI ADD {}/{} failed: {e}", key.0, key.1),
                        );
                    }
                    node.cni_errors.borrow_mut().insert(key.clone(), e);
                    return false;
                }
            }
        }
    };
    if kp.reported {
        return true;
    }
    let ip = kp.ip.split('/').next().unwrap_or("").to_string();
    // Ready at once, unless a readiness probe must pass first (the harness's prober runs it
    // through the dataplane and reports what it finds).
    let ready = if crate::scenario::probes::has_readiness_probe(pod) {
        "False"
    } else {
        "True"
    };
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": crate::scenario::names::ip_string(node.node_ip),
        "conditions": [{"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": ready}]}});
    let api: Api<Pod> = Api::namespaced(kube.clone(), &key.0);
    match api
        .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        Ok(_) => {
            if let Some(k) = node.kubelet.borrow_mut().get_mut(key) {
                k.reported = true;
            }
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsx_core::agent::server::PodSource;

    struct NoPods;

    impl PodSource for NoPods {
        async fn annotation(&self, _: &str, _: &str) -> Option<String> {
            None
        }
    }

    /// The agent's wire speaks the spec's command names, typed: a line naming a command the
    /// agent does not know is a decode error (6), VERSION is the plugin's to answer (4), and a
    /// known command is served.
    #[tokio::test]
    async fn the_wire_carries_typed_commands() {
        let service = AgentService {
            agent: Mutex::new(Agent::new(AgentConfig { uplink: UPLINK })),
            switch: Arc::new(Mutex::new(Bridge::new("br-int"))),
            pods: NoPods,
            wait: WaitConfig::default(),
        };
        let (ours, theirs) = tokio::io::duplex(4096);
        let server = async move {
            let _ = service.serve(theirs).await;
        };
        let client = async move {
            let (r, mut w) = tokio::io::split(ours);
            let mut lines = BufReader::new(r).lines();
            let mut ask = async |line: String| -> WireResponse {
                w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
                let answer = lines.next_line().await.unwrap().unwrap();
                serde_json::from_str(&answer).unwrap()
            };
            let req = |command: &str| {
                json!({"command": command, "container_id": "c1", "netns": "/x", "ifname": "eth0",
                       "args": {}})
                .to_string()
            };
            let code = |a: &WireResponse| match a {
                WireResponse::Error { code, .. } => Some(*code),
                _ => None,
            };
            assert_eq!(code(&ask(req("FROB")).await), Some(6));
            assert_eq!(code(&ask(req("add")).await), Some(6));
            assert_eq!(code(&ask(req("VERSION")).await), Some(4));
            assert_eq!(ask(req("DEL")).await, WireResponse::Done);
            // What the plugin sends is what the agent reads.
            let env = nsx_core::cni::Env {
                command: nsx_core::cni::Command::Status,
                container_id: String::new(),
                netns: String::new(),
                ifname: String::new(),
                args: BTreeMap::new(),
            };
            let line = serde_json::to_string(&WireRequest::from_env(&env, &[])).unwrap();
            assert!(line.contains(r#""command":"STATUS""#), "{line}");
            assert_eq!(ask(line).await, WireResponse::Done);
        };
        tokio::join!(server, client);
    }
}
