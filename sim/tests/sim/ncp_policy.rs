//! NetworkPolicy end to end: NCP realizes policies in the fake NSX, and the fake's dataplane
//! model must then allow exactly the connections Kubernetes allows.
//!
//! The expected answer comes from `oracle`, a direct reading of the Kubernetes NetworkPolicy
//! rules written here independently of NCP's translation. The connectivity checks are those
//! of the Kubernetes network-policy conformance tests (default deny, pod and namespace
//! selectors alone and together, match expressions, ipBlock with except, ports by number,
//! range and name, protocols, egress, policy types, several policies as a union), then a
//! property test over random clusters and policies.

use crate::common;

use std::collections::BTreeMap;

use common::World;
use fake_nsx_manager::store::{Entry, Packet, Protocol, Verdict};
use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nsx_core::k8s::{ClusterView, fixture};
use nsx_core::ncp::vocab::Key;
use proptest::prelude::*;

fn labels(kv: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    (!kv.is_empty()).then(|| {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn namespace(name: &str, kv: &[(&str, &str)]) -> Namespace {
    let mut ns = fixture::namespace(name, &format!("uid-{name}"));
    ns.metadata.labels = labels(kv);
    ns
}

/// A pod with container ports `http` (TCP 80) and `dns` (UDP 53), as the conformance tests'
/// server pods have.
fn pod(ns: &str, name: &str, node: usize, kv: &[(&str, &str)]) -> Pod {
    let mut p = fixture::pod(
        ns,
        name,
        &format!("uid-{ns}-{name}"),
        &format!("node-{node}"),
        kv,
    );
    let port = |name: &str, n: i32, proto: &str| ContainerPort {
        name: Some(name.into()),
        container_port: n,
        protocol: Some(proto.into()),
        ..Default::default()
    };
    p.spec.as_mut().unwrap().containers = vec![Container {
        name: "c".into(),
        ports: Some(vec![port("http", 80, "TCP"), port("dns", 53, "UDP")]),
        ..Default::default()
    }];
    p
}

fn sel(kv: &[(&str, &str)], exprs: &[(&str, &str, &[&str])]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(kv),
        match_expressions: (!exprs.is_empty()).then(|| {
            exprs
                .iter()
                .map(|(k, op, vs)| LabelSelectorRequirement {
                    key: k.to_string(),
                    operator: op.to_string(),
                    values: (!vs.is_empty()).then(|| vs.iter().map(|v| v.to_string()).collect()),
                })
                .collect()
        }),
    }
}

fn policy(ns: &str, name: &str, spec: NetworkPolicySpec) -> NetworkPolicy {
    let mut p = NetworkPolicy {
        spec: Some(spec),
        ..Default::default()
    };
    p.metadata.name = Some(name.into());
    p.metadata.namespace = Some(ns.into());
    p.metadata.uid = Some(format!("uid-np-{ns}-{name}"));
    p
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        end_port: None,
    }
}

/// The basic cluster of the conformance tests: namespaces x, y, z, each with pods a, b, c.
fn xyz() -> ClusterView {
    let mut v = ClusterView::default();
    for (i, ns) in ["x", "y", "z"].iter().enumerate() {
        v.add_namespace(namespace(ns, &[("ns", ns)]));
        for (j, p) in ["a", "b", "c"].iter().enumerate() {
            v.add_pod(pod(ns, p, (i + j) % 3 + 1, &[("pod", p)]));
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The oracle: Kubernetes NetworkPolicy semantics, read straight from the API reference.

fn oracle_selects(s: &LabelSelector, l: Option<&BTreeMap<String, String>>) -> bool {
    let empty = BTreeMap::new();
    let l = l.unwrap_or(&empty);
    s.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| l.get(k) == Some(v))
        && s.match_expressions.iter().flatten().all(|e| {
            let vs = e.values.clone().unwrap_or_default();
            match e.operator.as_str() {
                "In" => l.get(&e.key).is_some_and(|v| vs.contains(v)),
                "NotIn" => !l.get(&e.key).is_some_and(|v| vs.contains(v)),
                "Exists" => l.contains_key(&e.key),
                "DoesNotExist" => !l.contains_key(&e.key),
                _ => false,
            }
        })
}

fn in_cidr(ip: u32, cidr: &str) -> bool {
    let (a, p) = cidr.split_once('/').unwrap();
    let a = u32::from(a.parse::<std::net::Ipv4Addr>().unwrap());
    let p: u32 = p.parse().unwrap();
    let m = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    ip & m == a & m
}

/// One end of a connection: a pod (namespace, pod) and its address.
#[derive(Clone)]
struct End<'a> {
    pod: &'a Pod,
    ns: &'a Namespace,
    ip: u32,
}

fn peer_matches(peer: &NetworkPolicyPeer, policy_ns: &str, other: &End) -> bool {
    if let Some(b) = &peer.ip_block {
        return in_cidr(other.ip, &b.cidr)
            && !b.except.iter().flatten().any(|e| in_cidr(other.ip, e));
    }
    let ns_ok = match &peer.namespace_selector {
        Some(s) => oracle_selects(s, other.ns.metadata.labels.as_ref()),
        None => other.ns.metadata.name.as_deref() == Some(policy_ns),
    };
    let pod_ok = match &peer.pod_selector {
        Some(s) => oracle_selects(s, other.pod.metadata.labels.as_ref()),
        None => true,
    };
    ns_ok && pod_ok
}

fn port_matches(
    ports: Option<&Vec<NetworkPolicyPort>>,
    server: &Pod,
    proto: &str,
    port: u16,
) -> bool {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return true;
    };
    ports.iter().any(|p| {
        let pp = p.protocol.as_deref().unwrap_or("TCP");
        pp == proto
            && match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => match p.end_port {
                    Some(e) => (*n..=e).contains(&i32::from(port)),
                    None => *n == i32::from(port),
                },
                Some(IntOrString::String(name)) => server
                    .spec
                    .iter()
                    .flat_map(|s| &s.containers)
                    .flat_map(|c| c.ports.iter().flatten())
                    .any(|cp| {
                        cp.name.as_deref() == Some(name.as_str())
                            && cp.protocol.as_deref().unwrap_or("TCP") == proto
                            && cp.container_port == i32::from(port)
                    }),
            }
    })
}

fn types(spec: &NetworkPolicySpec) -> Vec<String> {
    match &spec.policy_types {
        Some(t) if !t.is_empty() => t.clone(),
        _ => {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".into());
            }
            t
        }
    }
}

fn oracle(view: &ClusterView, client: &End, server: &End, proto: &str, port: u16) -> bool {
    let applying = |who: &End, t: &str| -> Vec<&NetworkPolicy> {
        view.network_policies
            .values()
            .filter(|p| p.metadata.namespace == who.ns.metadata.name)
            .filter(|p| {
                let s = p.spec.as_ref().unwrap();
                types(s).iter().any(|x| x == t)
                    && oracle_selects(
                        &s.pod_selector.clone().unwrap_or_default(),
                        who.pod.metadata.labels.as_ref(),
                    )
            })
            .collect()
    };
    let egress = applying(client, "Egress");
    let egress_ok =
        egress.is_empty()
            || egress.iter().any(|p| {
                let ns = p.metadata.namespace.as_deref().unwrap();
                p.spec.as_ref().unwrap().egress.iter().flatten().any(
                    |r: &NetworkPolicyEgressRule| {
                        let peers_ok = match r.to.as_ref().filter(|t| !t.is_empty()) {
                            None => true,
                            Some(to) => to.iter().any(|peer| peer_matches(peer, ns, server)),
                        };
                        peers_ok && port_matches(r.ports.as_ref(), server.pod, proto, port)
                    },
                )
            });
    let ingress = applying(server, "Ingress");
    let ingress_ok =
        ingress.is_empty()
            || ingress.iter().any(|p| {
                let ns = p.metadata.namespace.as_deref().unwrap();
                p.spec.as_ref().unwrap().ingress.iter().flatten().any(
                    |r: &NetworkPolicyIngressRule| {
                        let peers_ok = match r.from.as_ref().filter(|t| !t.is_empty()) {
                            None => true,
                            Some(from) => from.iter().any(|peer| peer_matches(peer, ns, client)),
                        };
                        peers_ok && port_matches(r.ports.as_ref(), server.pod, proto, port)
                    },
                )
            });
    egress_ok && ingress_ok
}

// ---------------------------------------------------------------------------------------------
// The model side.

/// Where each pod is in NSX: its port, parent VIF, VLAN and address.
struct Wiring {
    ports: BTreeMap<String, (String, String, u16, u32)>,
}

async fn wiring(w: &World) -> Wiring {
    let o = w.observe("k8s-a").await;
    let addrs = w.nsx.inspect(|s| s.port_addresses());
    let mut ports = BTreeMap::new();
    for (k, docs) in &o.objects {
        if let Key::PodPort(uid) = k {
            let d = &docs[0];
            let id = d["id"].as_str().unwrap().to_string();
            let ip: std::net::Ipv4Addr = addrs[&id][0].parse().unwrap();
            ports.insert(
                uid.clone(),
                (
                    id,
                    d["attachment"]["context"]["parent_vif_id"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    d["attachment"]["context"]["traffic_tag"].as_u64().unwrap() as u16,
                    u32::from(ip),
                ),
            );
        }
    }
    Wiring { ports }
}

/// Whether the model lets a connection through both ways: the client's packet enters at its
/// node VIF with its VLAN and must be delivered to the server's port, and the reply back.
fn model(
    w: &World,
    wiring: &Wiring,
    client: &Pod,
    server: &Pod,
    proto: Protocol,
    port: u16,
) -> bool {
    let c = &wiring.ports[client.metadata.uid.as_ref().unwrap()];
    let s = &wiring.ports[server.metadata.uid.as_ref().unwrap()];
    let packet = Packet {
        src_ip: c.3,
        dst_ip: s.3,
        protocol: proto,
        src_port: 40000,
        dst_port: port,
    };
    let entry = Entry::Vif {
        parent_vif_id: c.1.clone(),
        vlan: c.2,
    };
    let (fwd, reply) = w.nsx.inspect(|st| st.trace_connection(&entry, &packet));
    match &fwd.verdict {
        Verdict::Delivered { logical_port, .. } => {
            assert_eq!(logical_port, &s.0, "{fwd:?}");
            let reply = reply.expect("a delivered packet has a reply trace");
            assert!(
                reply.delivered(),
                "a reply of an allowed connection must pass: {reply:?}"
            );
            true
        }
        Verdict::Dropped { reason } => {
            assert!(
                reason.starts_with("dfw"),
                "dropped by something else than the firewall: {fwd:?}"
            );
            false
        }
        Verdict::External { .. } => panic!("pod to pod left NSX: {fwd:?}"),
    }
}

const PROBES: &[(Protocol, &str, u16)] = &[
    (Protocol::Tcp, "TCP", 80),
    (Protocol::Tcp, "TCP", 81),
    (Protocol::Tcp, "TCP", 8050),
    (Protocol::Udp, "UDP", 53),
    (Protocol::Udp, "UDP", 80),
];

/// Reconciles `view`, checks that a second pass is a no-op, and compares model and oracle on
/// every ordered pair of pods and every probe. Returns the allowed count (for the tests'
/// own sanity) or the first disagreement.
async fn check(w: &World, view: &ClusterView) -> Result<usize, String> {
    check_with(w, view, &mut None).await
}

/// The same for a running NCP whose `cache` holds what the previous pass left: the pass
/// plans against it, a second cached pass must find nothing to do (the cache describes
/// NSX as NCP left it), and so must a pass that reads NSX afresh.
async fn check_with(
    w: &World,
    view: &ClusterView,
    cache: &mut Option<nsx_core::ncp::observe::Cache>,
) -> Result<usize, String> {
    let infra = w.infra("k8s-a").await;
    let first = w
        .reconcile_cached("k8s-a", &infra, view, cache)
        .await
        .map_err(|e| format!("{e:?}"))?;
    if !first.report.failed.is_empty() {
        return Err(format!("NSX refused: {:?}", first.report.failed));
    }
    // NCP writes each pod's address back into its network annotation, and reads it again (an
    // ipBlock peer's named ports resolve on the pods whose addresses the block holds).
    let view = &annotated(view, &wiring(w).await);
    let second = w
        .reconcile_cached("k8s-a", &infra, view, cache)
        .await
        .map_err(|e| format!("{e:?}"))?;
    if !second.report.failed.is_empty() {
        return Err(format!("NSX refused: {:?}", second.report.failed));
    }
    let cached = w
        .reconcile_cached("k8s-a", &infra, view, cache)
        .await
        .map_err(|e| format!("{e:?}"))?;
    if !cached.plan.is_empty() || cached.observe_calls != 0 {
        return Err(format!(
            "the cache disagrees with itself: {:?}",
            cached.plan.ops
        ));
    }
    let again = w
        .reconcile("k8s-a", view, None)
        .await
        .map_err(|e| format!("{e:?}"))?;
    if !again.plan.is_empty() {
        return Err(format!("not converged: {:?}", again.plan.ops));
    }
    w.invariants();
    let wiring = wiring(w).await;
    let mut allowed = 0;
    for ((cns, _), cp) in &view.pods {
        for ((sns, _), sp) in &view.pods {
            if cp.metadata.uid == sp.metadata.uid {
                continue;
            }
            let client = End {
                pod: cp,
                ns: &view.namespaces[cns],
                ip: wiring.ports[cp.metadata.uid.as_ref().unwrap()].3,
            };
            let server = End {
                pod: sp,
                ns: &view.namespaces[sns],
                ip: wiring.ports[sp.metadata.uid.as_ref().unwrap()].3,
            };
            for (proto, name, port) in PROBES {
                let want = oracle(view, &client, &server, name, *port);
                let got = model(w, &wiring, cp, sp, *proto, *port);
                if want != got {
                    return Err(format!(
                        "{cns}/{} -> {sns}/{} {name}/{port}: Kubernetes says {want}, NSX does {got}",
                        cp.metadata.name.as_deref().unwrap(),
                        sp.metadata.name.as_deref().unwrap()
                    ));
                }
                allowed += usize::from(got);
            }
        }
    }
    Ok(allowed)
}

/// `view` with each pod's address in its network annotation, as NCP's write-back leaves it.
fn annotated(view: &ClusterView, wiring: &Wiring) -> ClusterView {
    let mut v = view.clone();
    for pod in v.pods.values_mut() {
        let Some((port, _, vlan, ip)) = pod.metadata.uid.as_ref().and_then(|u| wiring.ports.get(u))
        else {
            continue;
        };
        let net = nsx_core::k8s::pod_network::PodNetwork {
            gateway: std::net::Ipv4Addr::from((*ip & 0xffff_ff00) | 1).to_string(),
            ip: format!("{}/24", std::net::Ipv4Addr::from(*ip)),
            logical_port_id: port.clone(),
            // Not what NSX allocated: the firewall does not look at it.
            mac: format!(
                "02:00:{:02x}:{:02x}:{:02x}:{:02x}",
                ip >> 24,
                (ip >> 16) & 0xff,
                (ip >> 8) & 0xff,
                ip & 0xff
            ),
            vlan: *vlan,
        };
        pod.metadata.annotations.get_or_insert_default().insert(
            nsx_core::k8s::annotation::POD_NETWORK.to_string(),
            net.to_json(),
        );
    }
    v
}

fn pairs(view: &ClusterView) -> usize {
    let n = view.pods.len();
    n * (n - 1) * PROBES.len()
}

async fn run(view: ClusterView) -> usize {
    let w = World::new(&["k8s-a"]).await;
    match check(&w, &view).await {
        Ok(n) => n,
        Err(e) => panic!("{e}"),
    }
}

fn ingress(
    from: Option<Vec<NetworkPolicyPeer>>,
    ports: Option<Vec<NetworkPolicyPort>>,
) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule { from, ports }
}

fn pods_peer(kv: &[(&str, &str)]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(sel(kv, &[])),
        ..Default::default()
    }
}

fn ns_peer(kv: &[(&str, &str)]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(sel(kv, &[])),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_policies_everything_connects() {
    let v = xyz();
    assert_eq!(run(v.clone()).await, pairs(&v));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_ingress_isolates_only_the_namespace() {
    let mut v = xyz();
    v.add_network_policy(policy(
        "x",
        "deny-all",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[], &[])),
            policy_types: Some(vec!["Ingress".into()]),
            ..Default::default()
        },
    ));
    let allowed = run(v.clone()).await;
    // Nothing reaches the 3 pods of x (8 clients each): 24 pairs lost, every probe.
    assert_eq!(allowed, pairs(&v) - 24 * PROBES.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_and_namespace_selectors_alone_and_together() {
    let mut v = xyz();
    v.add_network_policy(policy(
        "x",
        "allow",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[("pod", "a")], &[])),
            ingress: Some(vec![ingress(
                Some(vec![
                    pods_peer(&[("pod", "b")]),
                    ns_peer(&[("ns", "y")]),
                    NetworkPolicyPeer {
                        namespace_selector: Some(sel(&[("ns", "z")], &[])),
                        pod_selector: Some(sel(&[("pod", "c")], &[])),
                        ip_block: None,
                    },
                ]),
                None,
            )]),
            ..Default::default()
        },
    ));
    let allowed = run(v.clone()).await;
    // x/a admits x/b, y/{a,b,c}, z/c: 5 of its 8 clients.
    assert_eq!(allowed, pairs(&v) - 3 * PROBES.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_expressions_including_negations() {
    let mut v = xyz();
    v.add_network_policy(policy(
        "y",
        "expr",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[], &[("pod", "NotIn", &["a"])])),
            ingress: Some(vec![ingress(
                Some(vec![
                    NetworkPolicyPeer {
                        namespace_selector: Some(sel(&[], &[("ns", "In", &["x", "z"])])),
                        pod_selector: Some(sel(
                            &[],
                            &[("pod", "DoesNotExist", &[]), ("pod", "NotIn", &["zz"])],
                        )),
                        ip_block: None,
                    },
                    NetworkPolicyPeer {
                        pod_selector: Some(sel(
                            &[],
                            &[("pod", "Exists", &[]), ("pod", "In", &["a", "c"])],
                        )),
                        ..Default::default()
                    },
                ]),
                Some(vec![tcp(80)]),
            )]),
            ..Default::default()
        },
    ));
    run(v).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_blocks_with_exceptions() {
    let mut v = xyz();
    // The container block is 10.4.0.0/14; each namespace has a /24 of it. Allow the block
    // except one /24 (whichever namespace got it).
    v.add_network_policy(policy(
        "z",
        "cidr",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[], &[])),
            ingress: Some(vec![ingress(
                Some(vec![NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: "10.4.0.0/14".into(),
                        except: Some(vec!["10.4.0.0/24".into()]),
                    }),
                    ..Default::default()
                }]),
                None,
            )]),
            ..Default::default()
        },
    ));
    let allowed = run(v.clone()).await;
    assert!(allowed < pairs(&v), "the exception must block someone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_by_number_range_and_name_and_protocols() {
    let mut v = xyz();
    v.add_network_policy(policy(
        "x",
        "ports",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[], &[])),
            ingress: Some(vec![ingress(
                None,
                Some(vec![
                    NetworkPolicyPort {
                        port: Some(IntOrString::Int(8000)),
                        end_port: Some(8100),
                        protocol: Some("TCP".into()),
                    },
                    NetworkPolicyPort {
                        port: Some(IntOrString::String("dns".into())),
                        protocol: Some("UDP".into()),
                        end_port: None,
                    },
                    NetworkPolicyPort {
                        port: Some(IntOrString::String("http".into())),
                        protocol: None,
                        end_port: None,
                    },
                ]),
            )]),
            ..Default::default()
        },
    ));
    let allowed = run(v.clone()).await;
    // Into x: TCP 80 (http), TCP 8050 (range), UDP 53 (dns) pass; TCP 81 and UDP 80 do not.
    assert_eq!(allowed, pairs(&v) - 24 * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policies_and_the_union_of_several() {
    let mut v = xyz();
    v.add_network_policy(policy(
        "x",
        "egress-y",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[("pod", "a")], &[])),
            egress: Some(vec![NetworkPolicyEgressRule {
                to: Some(vec![ns_peer(&[("ns", "y")])]),
                ports: Some(vec![tcp(80)]),
            }]),
            policy_types: Some(vec!["Egress".into()]),
            ..Default::default()
        },
    ));
    v.add_network_policy(policy(
        "x",
        "egress-z-udp",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[("pod", "a")], &[])),
            egress: Some(vec![NetworkPolicyEgressRule {
                to: Some(vec![ns_peer(&[("ns", "z")])]),
                ports: Some(vec![NetworkPolicyPort {
                    protocol: Some("UDP".into()),
                    port: None,
                    end_port: None,
                }]),
            }]),
            ..Default::default()
        },
    ));
    v.add_network_policy(policy(
        "y",
        "in-and-out",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[("pod", "b")], &[])),
            ingress: Some(vec![ingress(Some(vec![ns_peer(&[])]), None)]),
            egress: Some(vec![]),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
        },
    ));
    run(v).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_and_deletion_are_followed_and_leave_nothing_behind() {
    let w = World::new(&["k8s-a"]).await;
    let plain = xyz();
    let before = w.docs().len();
    let base = check(&w, &plain).await.unwrap();
    let mut v = plain.clone();
    v.add_network_policy(policy(
        "x",
        "p",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[("pod", "a")], &[])),
            ingress: Some(vec![ingress(
                Some(vec![pods_peer(&[("pod", "b")])]),
                Some(vec![tcp(80)]),
            )]),
            ..Default::default()
        },
    ));
    let one = check(&w, &v).await.unwrap();
    assert!(one < base);
    // Change the peer: a new selection, the section's rules rewritten.
    v.add_network_policy(policy(
        "x",
        "p",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[("pod", "a")], &[])),
            ingress: Some(vec![ingress(
                Some(vec![pods_peer(&[("pod", "c")]), ns_peer(&[("ns", "z")])]),
                Some(vec![tcp(80), tcp(81)]),
            )]),
            ..Default::default()
        },
    ));
    check(&w, &v).await.unwrap();
    // A pod whose labels change moves in and out of selections.
    let mut moved = v.clone();
    let b = moved.pods.get_mut(&("x".into(), "b".into())).unwrap();
    b.metadata.labels = labels(&[("pod", "c")]);
    check(&w, &moved).await.unwrap();
    // Deleting the policy removes its sections, groups and markers.
    assert_eq!(check(&w, &plain).await.unwrap(), base);
    let after = w.docs();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for d in after.values() {
        *kinds
            .entry(d["resource_type"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    assert_eq!(after.len(), before + w_objects_for(&plain), "{kinds:?}");
    assert!(
        after.values().all(|d| d["resource_type"] != "IPSet"
            && !(d["resource_type"] == "FirewallSection"
                && d["display_name"].as_str().unwrap().starts_with("k8s-a"))),
        "policy objects left behind"
    );
}

/// NSX objects NCP keeps for a cluster without policies: 10 per namespace (subnet, pool,
/// switch, tier-1, two link ports, downlink and its switch port, SNAT rule, NSGroup) and one
/// per pod.
fn w_objects_for(v: &ClusterView) -> usize {
    10 * v.namespaces.len() + v.pods.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_rule_is_put_back_and_an_admin_section_is_left_alone() {
    let w = World::new(&["k8s-a"]).await;
    let mut v = xyz();
    v.add_network_policy(policy(
        "x",
        "deny",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[], &[])),
            policy_types: Some(vec!["Ingress".into()]),
            ..Default::default()
        },
    ));
    let want = check(&w, &v).await.unwrap();
    // An admin disables NCP's isolation rule, and adds a section of their own.
    let (section, rule) = w.nsx.inspect(|s| {
        let sec = s
            .sections()
            .find(|o| o.doc["display_name"] == "is-k8s-a-x-deny")
            .unwrap();
        let rule = s.rules(sec.id).next().unwrap();
        (sec.id.to_string(), rule.id.to_string())
    });
    let admin = |method: &'static str, path: String, body: serde_json::Value| {
        let body = (method != "GET").then_some(body);
        w.nsx.as_admin(method, &path, &[], body.as_ref())
    };
    let r = admin(
        "GET",
        format!("/api/v1/firewall/sections/{section}/rules/{rule}"),
        serde_json::json!({}),
    );
    let mut doc = r.body;
    doc["disabled"] = serde_json::json!(true);
    let r = admin(
        "PUT",
        format!("/api/v1/firewall/sections/{section}/rules/{rule}"),
        doc,
    );
    assert!(r.status < 300, "{:?}", r.body);
    let r = admin(
        "POST",
        "/api/v1/firewall/sections".into(),
        serde_json::json!({"display_name": "admin-section", "section_type": "LAYER3", "stateful": true}),
    );
    assert!(r.status < 300, "{:?}", r.body);
    let wiring = wiring(&w).await;
    let xa = &v.pods[&("x".to_string(), "a".to_string())];
    let ya = &v.pods[&("y".to_string(), "a".to_string())];
    assert!(
        model(&w, &wiring, ya, xa, Protocol::Tcp, 80),
        "tampering opened x"
    );
    assert_eq!(check(&w, &v).await.unwrap(), want, "NCP puts the rule back");
    assert!(
        w.docs()
            .values()
            .any(|d| d["display_name"] == "admin-section")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sctp_ports_are_reported_and_widened_to_the_protocol() {
    let w = World::new(&["k8s-a"]).await;
    let mut v = xyz();
    v.add_network_policy(policy(
        "x",
        "sctp",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[], &[])),
            ingress: Some(vec![ingress(
                None,
                Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(9000)),
                    protocol: Some("SCTP".into()),
                    end_port: None,
                }]),
            )]),
            ..Default::default()
        },
    ));
    let out = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
    assert!(out.problems[0].message.contains("SCTP"));
    let wiring = wiring(&w).await;
    let xa = &v.pods[&("x".to_string(), "a".to_string())];
    let ya = &v.pods[&("y".to_string(), "a".to_string())];
    assert!(model(&w, &wiring, ya, xa, Protocol::Sctp, 9000));
    assert!(!model(&w, &wiring, ya, xa, Protocol::Tcp, 9000));
}

// ---------------------------------------------------------------------------------------------
// Random clusters and policies.

#[derive(Debug, Clone)]
struct Gen {
    ns_labels: Vec<(u8, u8)>,
    pods: Vec<(u8, u8, u8)>,
    policies: Vec<GenPolicy>,
}

#[derive(Debug, Clone)]
struct GenPolicy {
    ns: u8,
    selector: GenSel,
    types: u8,
    ingress: Vec<(Vec<GenPeer>, u8)>,
    egress: Vec<(Vec<GenPeer>, u8)>,
}

#[derive(Debug, Clone)]
enum GenSel {
    All,
    Label(u8),
    In(u8, u8),
    NotIn(u8),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone)]
enum GenPeer {
    Pods(GenSel),
    Namespaces(GenSel),
    Both(GenSel, GenSel),
    Block(u8),
}

fn gen_sel() -> impl Strategy<Value = GenSel> {
    prop_oneof![
        Just(GenSel::All),
        (0u8..3).prop_map(GenSel::Label),
        (0u8..3, 0u8..3).prop_map(|(a, b)| GenSel::In(a, b)),
        (0u8..3).prop_map(GenSel::NotIn),
        Just(GenSel::Exists),
        Just(GenSel::DoesNotExist),
    ]
}

fn gen_peer() -> impl Strategy<Value = GenPeer> {
    prop_oneof![
        3 => gen_sel().prop_map(GenPeer::Pods),
        2 => gen_sel().prop_map(GenPeer::Namespaces),
        2 => (gen_sel(), gen_sel()).prop_map(|(a, b)| GenPeer::Both(a, b)),
        1 => (0u8..4).prop_map(GenPeer::Block),
    ]
}

fn gen_rule() -> impl Strategy<Value = (Vec<GenPeer>, u8)> {
    (prop::collection::vec(gen_peer(), 0..3), 0u8..6)
}

fn arb_cluster() -> impl Strategy<Value = Gen> {
    let policy = (
        0u8..3,
        gen_sel(),
        0u8..4,
        prop::collection::vec(gen_rule(), 0..3),
        prop::collection::vec(gen_rule(), 0..2),
    )
        .prop_map(|(ns, selector, types, ingress, egress)| GenPolicy {
            ns,
            selector,
            types,
            ingress,
            egress,
        });
    (
        prop::collection::vec((0u8..3, 0u8..3), 3),
        prop::collection::vec((0u8..3, 0u8..4, 0u8..3), 3..6),
        prop::collection::vec(policy, 0..4),
    )
        .prop_map(|(ns_labels, pods, policies)| Gen {
            ns_labels,
            pods,
            policies,
        })
}

const VALUES: [&str; 3] = ["red", "green", "blue"];

/// Pods carry `app` (or not, when the generated value is 3); namespaces carry `team`.
fn to_selector(s: &GenSel, key: &str) -> LabelSelector {
    match s {
        GenSel::All => sel(&[], &[]),
        GenSel::Label(v) => sel(&[(key, VALUES[*v as usize])], &[]),
        GenSel::In(a, b) => sel(
            &[],
            &[(key, "In", &[VALUES[*a as usize], VALUES[*b as usize]])],
        ),
        GenSel::NotIn(v) => sel(&[], &[(key, "NotIn", &[VALUES[*v as usize]])]),
        GenSel::Exists => sel(&[], &[(key, "Exists", &[])]),
        GenSel::DoesNotExist => sel(&[], &[(key, "DoesNotExist", &[])]),
    }
}

fn to_peer(p: &GenPeer) -> NetworkPolicyPeer {
    match p {
        GenPeer::Pods(s) => NetworkPolicyPeer {
            pod_selector: Some(to_selector(s, "app")),
            ..Default::default()
        },
        GenPeer::Namespaces(s) => NetworkPolicyPeer {
            namespace_selector: Some(to_selector(s, "team")),
            ..Default::default()
        },
        GenPeer::Both(n, s) => NetworkPolicyPeer {
            namespace_selector: Some(to_selector(n, "team")),
            pod_selector: Some(to_selector(s, "app")),
            ip_block: None,
        },
        GenPeer::Block(i) => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: "10.4.0.0/14".into(),
                except: (*i < 3).then(|| vec![format!("10.4.{i}.0/24")]),
            }),
            ..Default::default()
        },
    }
}

fn to_ports(i: u8) -> Option<Vec<NetworkPolicyPort>> {
    match i {
        0 => None,
        1 => Some(vec![tcp(80)]),
        2 => Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::String("http".into())),
            protocol: None,
            end_port: None,
        }]),
        3 => Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(8000)),
            end_port: Some(8080),
            protocol: None,
        }]),
        4 => Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::String("dns".into())),
            protocol: Some("UDP".into()),
            end_port: None,
        }]),
        _ => Some(vec![NetworkPolicyPort {
            port: None,
            protocol: Some("UDP".into()),
            end_port: None,
        }]),
    }
}

fn to_view(g: &Gen) -> ClusterView {
    let mut v = ClusterView::default();
    for (i, (team, _)) in g.ns_labels.iter().enumerate() {
        v.add_namespace(namespace(
            &format!("n{i}"),
            &[("team", VALUES[*team as usize])],
        ));
    }
    for (i, (ns, app, node)) in g.pods.iter().enumerate() {
        let kv: Vec<(&str, &str)> = if *app < 3 {
            vec![("app", VALUES[*app as usize])]
        } else {
            vec![]
        };
        v.add_pod(pod(
            &format!("n{ns}"),
            &format!("p{i}"),
            *node as usize + 1,
            &kv,
        ));
    }
    for (i, p) in g.policies.iter().enumerate() {
        let rules_in: Vec<NetworkPolicyIngressRule> = p
            .ingress
            .iter()
            .map(|(peers, ports)| {
                ingress(
                    (!peers.is_empty()).then(|| peers.iter().map(to_peer).collect()),
                    to_ports(*ports),
                )
            })
            .collect();
        let rules_eg: Vec<NetworkPolicyEgressRule> = p
            .egress
            .iter()
            .map(|(peers, ports)| NetworkPolicyEgressRule {
                to: (!peers.is_empty()).then(|| peers.iter().map(to_peer).collect()),
                ports: to_ports(*ports),
            })
            .collect();
        let types = match p.types {
            0 => None,
            1 => Some(vec!["Ingress".to_string()]),
            2 => Some(vec!["Egress".to_string()]),
            _ => Some(vec!["Ingress".to_string(), "Egress".to_string()]),
        };
        v.add_network_policy(policy(
            &format!("n{}", p.ns),
            &format!("np{i}"),
            NetworkPolicySpec {
                pod_selector: Some(to_selector(&p.selector, "app")),
                ingress: Some(rules_in),
                egress: Some(rules_eg),
                policy_types: types,
            },
        ));
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random clusters and policies, reconciled one after another into the same NSX (so
    /// every transition between two policy sets is exercised too): the dataplane allows
    /// exactly what Kubernetes allows.
    #[test]
    fn the_firewall_enforces_exactly_what_kubernetes_means(gens in prop::collection::vec(arb_cluster(), 1..3)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let w = World::new(&["k8s-a"]).await;
            let mut cache = None;
            for g in &gens {
                let v = to_view(g);
                if let Err(e) = check_with(&w, &v, &mut cache).await {
                    return Err(TestCaseError::fail(e));
                }
            }
            Ok(())
        })?;
    }
}

/// Policies with every kind of object (tag-criteria and explicit groups, an IPSet, namespace
/// members), realized with a crash after each write in turn: the restarted NCP converges to
/// the same objects, with no duplicate, and the firewall means what Kubernetes means.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_write_of_a_policy_converges_to_exactly_the_policy() {
    let from = xyz();
    let mut to = xyz();
    to.add_network_policy(policy(
        "x",
        "mixed",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[], &[("pod", "NotIn", &["c"])])),
            ingress: Some(vec![ingress(
                Some(vec![
                    ns_peer(&[("ns", "y")]),
                    pods_peer(&[("pod", "b")]),
                    NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: "10.4.0.0/14".into(),
                            except: Some(vec!["10.4.2.0/24".into()]),
                        }),
                        ..Default::default()
                    },
                ]),
                Some(vec![tcp(80)]),
            )]),
            egress: Some(vec![NetworkPolicyEgressRule {
                to: Some(vec![ns_peer(&[("ns", "z")])]),
                ports: None,
            }]),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
        },
    ));
    to.add_network_policy(policy(
        "z",
        "deny",
        NetworkPolicySpec {
            pod_selector: Some(sel(&[], &[])),
            policy_types: Some(vec!["Ingress".into()]),
            ..Default::default()
        },
    ));
    let clean = World::new(&["k8s-a"]).await;
    clean.reconcile("k8s-a", &from, None).await.unwrap();
    let total = clean
        .reconcile("k8s-a", &to, None)
        .await
        .unwrap()
        .report
        .writes;
    let want = check(&clean, &to).await.unwrap();
    let objects = |w: &World| {
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for d in w.docs().values() {
            *kinds
                .entry(d["resource_type"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
        kinds
    };
    let clean_objects = objects(&clean);
    assert!(total >= 10, "{total} writes");
    for n in 0..total {
        let w = World::new(&["k8s-a"]).await;
        w.reconcile("k8s-a", &from, None).await.unwrap();
        assert!(
            w.reconcile("k8s-a", &to, Some(n)).await.is_err(),
            "budget {n} of {total}"
        );
        // Every pod pair and port against the Kubernetes oracle. (Not the count of allowed
        // pairs against the clean run's: NCP creates namespaces' subnets concurrently, so which
        // namespace gets which subnet, and so which pods the ipBlock's `except` holds, depends
        // on the order the creates reach NSX.)
        let got = check(&w, &to)
            .await
            .unwrap_or_else(|e| panic!("after a crash at write {n}: {e}"));
        assert!(
            got > 0 && want > 0,
            "after a crash at write {n}: nothing allowed"
        );
        let o = w.observe("k8s-a").await;
        let dups: Vec<&Key> = o
            .objects
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, _)| k)
            .collect();
        assert!(
            dups.is_empty(),
            "after a crash at write {n}: duplicates {dups:?}"
        );
        assert_eq!(objects(&w), clean_objects, "after a crash at write {n}");
    }
}
