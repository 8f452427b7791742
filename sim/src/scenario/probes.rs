//! The kubelet's readiness and liveness probes, run from the pod's node through the realized
//! dataplane (the node's own address, into NSX at its VIF's logical port, through the
//! distributed firewall to the pod's port and back), never read off the pod's spec.
//!
//! What the simulated kubelet does, as the real one does by default:
//! - a probe runs first `initialDelaySeconds` after the container started, then every
//!   `periodSeconds` (default 10); `successThreshold` (default 1) passes in a row make a
//!   container ready, `failureThreshold` (default 3) failures in a row make it not ready;
//! - `tcpSocket` passes when a connection to the port is established; `httpGet` the same (the
//!   simulated container answers any GET on a port it listens on with 200); `exec` passes;
//! - a pod is Ready when every container with a readiness probe is ready; until its first
//!   passes, it is not (and not an endpoint);
//! - `failureThreshold` liveness failures in a row restart the container: its `restartCount`
//!   grows, its probes start over after `initialDelaySeconds`, and it is not ready until its
//!   readiness probe passes again. There is no CrashLoopBackOff: a container whose liveness
//!   probe always fails restarts once per `initialDelaySeconds + (failureThreshold - 1) *
//!   periodSeconds`.
//!
//! The port may be a number or the name of one of the container's ports. Probe results are
//! written to the pod's status (conditions `Ready`/`ContainersReady`, `containerStatuses`),
//! which the endpoints controller reads; a transition is recorded in the trace.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::names::Endpoint;
use super::world::World;

/// What a probe does.
#[derive(Debug, Clone, PartialEq)]
enum Check {
    /// `tcpSocket` or `httpGet`: a connection to the port.
    Connect(PortRef),
    Exec,
}

#[derive(Debug, Clone, PartialEq)]
enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Probe {
    check: Check,
    initial_delay_ms: u64,
    period_ms: u64,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Probe {
    fn parse(v: &Value) -> Option<Probe> {
        if !v.is_object() {
            return None;
        }
        let port = |p: &Value| match p {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .map(PortRef::Number),
            Value::String(s) => Some(PortRef::Name(s.clone())),
            _ => None,
        };
        let check = if let Some(p) = v["tcpSocket"].get("port") {
            Check::Connect(port(p)?)
        } else if let Some(p) = v["httpGet"].get("port") {
            Check::Connect(port(p)?)
        } else {
            Check::Exec
        };
        let secs = |k: &str, default: u64| v[k].as_u64().unwrap_or(default);
        let count = |k: &str, default: u32| {
            v[k].as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        Some(Probe {
            check,
            initial_delay_ms: secs("initialDelaySeconds", 0) * 1000,
            period_ms: secs("periodSeconds", 10).max(1) * 1000,
            success_threshold: count("successThreshold", 1),
            failure_threshold: count("failureThreshold", 3),
        })
    }
}

/// One container's probes and what they found so far.
#[derive(Debug, Clone)]
struct ContainerProbes {
    name: String,
    /// The container's spec (for named ports).
    spec: Value,
    readiness: Option<Probe>,
    liveness: Option<Probe>,
    ready: bool,
    passes: u32,
    failures: u32,
    liveness_failures: u32,
    next_readiness_ms: u64,
    next_liveness_ms: u64,
    restarts: u32,
}

impl ContainerProbes {
    fn start(&mut self, now: u64) {
        self.ready = self.readiness.is_none();
        self.passes = 0;
        self.failures = 0;
        self.liveness_failures = 0;
        if let Some(p) = &self.readiness {
            self.next_readiness_ms = now + p.initial_delay_ms;
        }
        if let Some(p) = &self.liveness {
            self.next_liveness_ms = now + p.initial_delay_ms;
        }
    }

    fn port(&self, r: &PortRef) -> Option<u16> {
        match r {
            PortRef::Number(n) => Some(*n),
            PortRef::Name(name) => self.spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"].as_str() == Some(name.as_str()))
                .and_then(|p| p["containerPort"].as_u64())
                .and_then(|n| u16::try_from(n).ok()),
        }
    }
}

/// A pod the kubelet probes.
#[derive(Debug, Clone)]
pub struct PodProbes {
    uid: String,
    node: String,
    containers: Vec<ContainerProbes>,
}

impl PodProbes {
    fn ready(&self) -> bool {
        self.containers.iter().all(|c| c.ready)
    }

    /// The status the kubelet reports for what its probes found.
    fn status(&self) -> Value {
        let ready = if self.ready() { "True" } else { "False" };
        json!({"status": {
            "conditions": [{"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": ready}],
            "containerStatuses": self.containers.iter().map(|c| json!({
                "name": c.name, "ready": c.ready, "started": true, "restartCount": c.restarts,
            })).collect::<Vec<_>>(),
        }})
    }
}

/// Whether a pod's containers ask for any probe (then its kubelet reports it not ready until
/// the readiness probes pass).
pub fn has_readiness_probe(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(|s| s.containers.iter().any(|c| c.readiness_probe.is_some()))
}

impl World {
    /// Runs the probes that are due, and starts probing pods the kubelet has just set up.
    pub fn kubelet_probes(&self) {
        let rv = self.api.revision();
        if self.probes_seen.get() != rv {
            self.probes_seen.set(rv);
            self.discover_probed_pods();
        }
        let now = self.now_ms();
        let keys: Vec<(String, String)> = self
            .probes
            .borrow()
            .iter()
            .filter(|(_, p)| {
                p.containers.iter().any(|c| {
                    (c.readiness.is_some() && c.next_readiness_ms <= now)
                        || (c.liveness.is_some() && c.next_liveness_ms <= now)
                })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.probe_pod(&key, now);
        }
    }

    /// Pods with probes that their node's kubelet has set up (the uid it set up): probed from
    /// now on; pods gone or replaced: forgotten.
    fn discover_probed_pods(&self) {
        let now = self.now_ms();
        let mut seen = BTreeMap::new();
        let _: Result<(), ()> = self.api.try_each("pods", |doc| {
            let (Some(ns), Some(name), Some(uid)) = (
                doc["metadata"]["namespace"].as_str(),
                doc["metadata"]["name"].as_str(),
                doc["metadata"]["uid"].as_str(),
            ) else {
                return Ok(());
            };
            let containers = doc["spec"]["containers"].as_array();
            let probed = containers
                .into_iter()
                .flatten()
                .any(|c| c.get("readinessProbe").is_some() || c.get("livenessProbe").is_some());
            if !probed {
                return Ok(());
            }
            let node = doc["spec"]["nodeName"].as_str().unwrap_or("");
            let key = (ns.to_string(), name.to_string());
            let set_up = self.nodes.get(node).is_some_and(|n| {
                n.kubelet
                    .borrow()
                    .get(&key)
                    .is_some_and(|k| k.uid == uid && k.reported)
            });
            if set_up {
                seen.insert(key, (uid.to_string(), node.to_string(), doc.clone()));
            }
            Ok(())
        });
        let mut probes = self.probes.borrow_mut();
        probes.retain(|k, p| seen.get(k).is_some_and(|(uid, _, _)| *uid == p.uid));
        for (key, (uid, node, doc)) in seen {
            if probes.contains_key(&key) {
                continue;
            }
            let containers = doc["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let mut cp = ContainerProbes {
                        name: c["name"].as_str().unwrap_or("").to_string(),
                        spec: c.clone(),
                        readiness: Probe::parse(&c["readinessProbe"]),
                        liveness: Probe::parse(&c["livenessProbe"]),
                        ready: false,
                        passes: 0,
                        failures: 0,
                        liveness_failures: 0,
                        next_readiness_ms: 0,
                        next_liveness_ms: 0,
                        restarts: 0,
                    };
                    cp.start(now);
                    cp
                })
                .collect();
            probes.insert(
                key,
                PodProbes {
                    uid,
                    node,
                    containers,
                },
            );
        }
    }

    /// One probe from the node to the pod's port: whether a connection is established.
    fn probe_passes(
        &self,
        key: &(String, String),
        node: &str,
        c: &ContainerProbes,
        p: &Probe,
    ) -> bool {
        let port = match &p.check {
            Check::Exec => return true,
            Check::Connect(r) => match c.port(r) {
                Some(port) => port,
                // A named port the container does not declare: the probe cannot connect.
                None => return false,
            },
        };
        let Ok(pod) = self.pod_at(&key.0, &key.1) else {
            return false;
        };
        self.connect(
            &Endpoint::Node(node.to_string()),
            pod.ip,
            6,
            self.ephemeral_port(),
            port,
        )
        .is_ok_and(|o| o.works())
    }

    fn probe_pod(&self, key: &(String, String), now: u64) {
        let Some(mut pod) = self.probes.borrow().get(key).cloned() else {
            return;
        };
        let was_ready = pod.ready();
        let mut restarted = Vec::new();
        let mut changed = false;
        let node = pod.node.as_str();
        for c in pod.containers.iter_mut() {
            // The probe is copied out: a restart resets the container it belongs to.
            if let Some(p) = c.liveness.clone()
                && c.next_liveness_ms <= now
            {
                let ok = self.probe_passes(key, node, c, &p);
                c.next_liveness_ms = now + p.period_ms;
                if ok {
                    c.liveness_failures = 0;
                } else {
                    c.liveness_failures += 1;
                    if c.liveness_failures >= p.failure_threshold {
                        c.restarts += 1;
                        c.start(now);
                        restarted.push((c.name.clone(), c.restarts));
                        changed = true;
                        continue;
                    }
                }
            }
            if let Some(p) = c.readiness.clone()
                && c.next_readiness_ms <= now
            {
                let ok = self.probe_passes(key, node, c, &p);
                c.next_readiness_ms = now + p.period_ms;
                if ok {
                    c.passes += 1;
                    c.failures = 0;
                    if !c.ready && c.passes >= p.success_threshold {
                        c.ready = true;
                        changed = true;
                    }
                } else {
                    c.failures += 1;
                    c.passes = 0;
                    if c.ready && c.failures >= p.failure_threshold {
                        c.ready = false;
                        changed = true;
                    }
                }
            }
        }
        for (container, n) in &restarted {
            self.trace.record_at(
                u128::from(now),
                &pod.node,
                format!(
                    "kubelet: {}/{} container {container} failed its liveness probe: restarted ({n})",
                    key.0, key.1
                ),
            );
        }
        if pod.ready() != was_ready {
            self.trace.record_at(
                u128::from(now),
                &pod.node,
                format!(
                    "kubelet: {}/{} readiness: {}",
                    key.0,
                    key.1,
                    if pod.ready() { "Ready" } else { "not ready" }
                ),
            );
        }
        if changed {
            // The pod went or was replaced since: the uid in the patch makes it miss.
            let mut patch = pod.status();
            patch["metadata"] = json!({"uid": pod.uid});
            let _ = self.api.patch("pods", &key.0, &key.1, &patch);
        }
        self.probes.borrow_mut().insert(key.clone(), pod);
    }
}
