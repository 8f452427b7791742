//! NCP end to end on turmoil: the real controller (kube-rs watches, reflector stores, the
//! reconcile loop, annotation write-back) against the fake kube-apiserver and the fake NSX
//! manager, on three simulated hosts.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use fake_nsx_manager::{Clock, FakeNsxManager, ManagerConfig};
use nsx_core::ncp::config::NcpConfig;
use nsx_core::ncp::controller::{self, LoopConfig, PassEvent};
use nsx_core::nsx::{Auth, ClientConfig, NsxClient};
use nsx_sim::apiserver::ApiServer;
use nsx_sim::net::{TurmoilConnector, kube_client, serve};
use serde_json::{Value, json};

use crate::common;

const EPOCH_MS: i64 = 1_767_225_600_000;

struct World {
    sim: turmoil::Sim<'static>,
    api: ApiServer,
    nsx: FakeNsxManager,
    passes: Rc<RefCell<Vec<PassEvent>>>,
}

fn sim_clock() -> i64 {
    EPOCH_MS + turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as i64)
}

fn world(seed: u64) -> World {
    world_with_prefix(seed, 24)
}

/// A world whose NCP carves namespace subnets of this prefix length.
fn world_with_prefix(seed: u64, subnet_prefix: u8) -> World {
    let api = ApiServer::new(seed, sim_clock);
    let mut mc = ManagerConfig {
        clock: Clock::new(sim_clock),
        ..Default::default()
    };
    mc.store.seed = seed;
    mc.store.search_lag_ms = 500;
    let nsx = FakeNsxManager::new(mc);
    let boot = nsx.bootstrap().unwrap();
    let mut sim = turmoil::Builder::new()
        .epoch(std::time::UNIX_EPOCH + Duration::from_millis(EPOCH_MS as u64))
        .rng_seed(seed)
        .tick_duration(Duration::from_millis(5))
        .simulation_duration(Duration::from_secs(3600))
        .build();
    let a = api.clone();
    sim.host("apiserver", move || {
        let a = a.clone();
        async move { serve(6443, a.router()).await }
    });
    let n = nsx.clone();
    sim.host("nsx-manager", move || {
        let n = n.clone();
        async move {
            n.restart();
            serve(80, n.router()).await
        }
    });
    let passes: Rc<RefCell<Vec<PassEvent>>> = Rc::default();
    let p = passes.clone();
    let snat = boot.clusters["k8s-a"].snat_pool.clone();
    sim.host("ncp", move || {
        let p = p.clone();
        let snat = snat.clone();
        async move {
            let kube = kube_client("http://apiserver:6443")?;
            let mut cc = ClientConfig::new(
                "http://nsx-manager:80",
                Auth::Session {
                    user: "admin".into(),
                    password: "admin".into(),
                },
            );
            cc.seed = 7;
            let nsx = Arc::new(NsxClient::new(TurmoilConnector, cc));
            let mut config = NcpConfig::for_cluster("k8s-a");
            config.external_ip_pools = vec![snat];
            config.subnet_prefix = subnet_prefix;
            controller::run(kube, nsx, config, LoopConfig::default(), None, move |e| {
                p.borrow_mut().push(e.clone())
            })
            .await;
            Ok(())
        }
    });
    World {
        sim,
        api,
        nsx,
        passes,
    }
}

impl World {
    fn run_for(&mut self, ms: u64) {
        let until = self.sim.elapsed() + Duration::from_millis(ms);
        while self.sim.elapsed() < until {
            self.sim.step().unwrap();
            nsx_sim::ncp_host::note_sim_time(self.sim.elapsed());
        }
    }

    fn apply(&self, v: Value) {
        self.api.apply(v).unwrap();
    }

    fn pod_annotation(&self, ns: &str, name: &str) -> Option<Value> {
        let p = self.api.get("pods", ns, name)?;
        p["metadata"]["annotations"]["ncp/network"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
    }

    fn ncp_objects(&self) -> usize {
        self.nsx.inspect(|s| {
            s.objects()
                .filter(|o| {
                    nsx_core::ncp::observe::classify(&Value::Object(o.doc.clone()), "k8s-a")
                        .is_some()
                })
                .count()
        })
    }
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}
fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}
fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}})
}

#[test]
fn pods_get_their_network_and_a_restarted_ncp_writes_nothing() {
    let mut w = world(3);
    for n in ["node-1", "node-2", "node-3"] {
        w.apply(node(n));
    }
    w.apply(namespace("shop"));
    w.apply(namespace("db"));
    w.apply(pod("shop", "web-1", "node-1"));
    w.apply(pod("shop", "web-2", "node-2"));
    w.apply(pod("db", "pg-1", "node-1"));
    w.run_for(5_000);
    assert!(
        matches!(w.passes.borrow().last(), Some(PassEvent::Converged { .. })),
        "{:?}",
        w.passes.borrow()
    );
    assert_eq!(
        w.ncp_objects(),
        2 * 10 + 3,
        "10 objects per namespace, one port per pod"
    );
    let shop = w.api.get("namespaces", "", "shop").unwrap();
    let subnet = shop["metadata"]["annotations"]["ncp/subnet-0"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        shop["metadata"]["annotations"]["ncp/snat_ip"]
            .as_str()
            .unwrap()
            .starts_with("192.0.2.")
    );
    let net = w.pod_annotation("shop", "web-1").expect("web-1 annotated");
    let prefix = subnet.rsplit_once('.').unwrap().0;
    assert!(
        net["ip"].as_str().unwrap().starts_with(prefix)
            && net["ip"].as_str().unwrap().ends_with("/24"),
        "{net} not in {subnet}"
    );
    assert_eq!(net["gateway"], format!("{prefix}.1"));
    assert!(net["vlan"].as_u64().unwrap() >= 1);
    let web2 = w.pod_annotation("shop", "web-2").unwrap();
    assert_ne!(net["ip"], web2["ip"]);
    // A pod added later is wired by the next pass.
    w.apply(pod("shop", "web-3", "node-3"));
    w.run_for(2_000);
    assert!(w.pod_annotation("shop", "web-3").is_some());
    // NCP restarts with empty memory: no NSX write, no Kubernetes write.
    let writes = w.nsx.counters().writes;
    let patches = w
        .api
        .request_counts()
        .get("PATCH pods")
        .copied()
        .unwrap_or(0);
    w.sim.bounce("ncp");
    w.run_for(5_000);
    assert_eq!(
        w.nsx.counters().writes - writes,
        0,
        "{:?}",
        w.nsx
            .requests_since(0)
            .iter()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        w.api
            .request_counts()
            .get("PATCH pods")
            .copied()
            .unwrap_or(0),
        patches
    );
    // Deleting a namespace removes its NSX objects.
    w.api.delete("namespaces", "", "db").unwrap();
    w.run_for(3_000);
    assert_eq!(w.ncp_objects(), 10 + 3, "{:?}", w.passes.borrow().last());
    w.nsx.inspect(|s| s.check_invariants()).unwrap();
}

#[test]
fn dropped_watches_and_a_410_relist_lose_no_change() {
    let mut w = world(4);
    w.apply(node("node-1"));
    w.apply(namespace("shop"));
    w.run_for(3_000);
    w.api.drop_watches();
    w.apply(pod("shop", "a", "node-1"));
    w.run_for(3_000);
    assert!(w.pod_annotation("shop", "a").is_some());
    w.api.expire_history();
    w.apply(pod("shop", "b", "node-1"));
    w.run_for(5_000);
    assert!(
        w.pod_annotation("shop", "b").is_some(),
        "{:?}",
        w.passes.borrow()
    );
    w.api.duplicate_next_events(5);
    w.api.delete("pods", "shop", "a").unwrap();
    w.run_for(3_000);
    assert_eq!(w.ncp_objects(), 10 + 1);
}

#[test]
fn what_nsx_refuses_is_reported_as_a_warning_event_once() {
    let mut w = world(5);
    let boot = w.nsx.bootstrap().unwrap();
    let pool = boot.clusters["k8s-a"].snat_pool.clone();
    // Another team holds every address of the SNAT pool.
    loop {
        let r = w.nsx.as_admin(
            "POST",
            &format!("/api/v1/pools/ip-pools/{pool}"),
            &[("action", "ALLOCATE")],
            Some(&json!({})),
        );
        if r.status != 200 {
            break;
        }
    }
    w.apply(node("node-1"));
    w.apply(namespace("shop"));
    w.apply(pod("shop", "web-1", "node-1"));
    w.run_for(10_000);
    assert!(
        w.pod_annotation("shop", "web-1").is_some(),
        "the pod is wired despite the SNAT failure"
    );
    let events = w.api.list("events");
    let warnings: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "NSXRealizationFailed")
        .collect();
    assert_eq!(warnings.len(), 1, "one Event, not one per pass: {events:?}");
    assert_eq!(warnings[0]["involvedObject"]["kind"], "Namespace");
    assert!(
        warnings[0]["message"].as_str().unwrap().contains("5109"),
        "{}",
        warnings[0]["message"]
    );
}

#[test]
fn network_policies_are_watched_realized_reported_and_removed() {
    let mut w = world(9);
    w.apply(node("node-1"));
    w.apply(namespace("shop"));
    w.apply(pod("shop", "web-1", "node-1"));
    w.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web-1"}},
            "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]}}],
                "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "SCTP", "port": 9}]}]}}));
    w.run_for(8_000);
    let sections = |w: &World| -> Vec<String> {
        w.nsx.inspect(|s| {
            s.sections()
                .map(|o| o.doc["display_name"].as_str().unwrap_or("").to_string())
                .collect()
        })
    };
    // Markers around the node access, allow and isolation sections, above the admin's
    // default section.
    let names = sections(&w);
    assert_eq!(
        &names[..5],
        [
            "k8s-a-marker-top",
            "k8s-a-node-access",
            "k8s-a-shop-web",
            "is-k8s-a-shop-web",
            "k8s-a-marker-bottom"
        ],
        "{names:?}"
    );
    let events = w.api.list("events");
    let notes: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "NetworkPolicyNotExact")
        .collect();
    assert_eq!(notes.len(), 1, "{events:?}");
    assert_eq!(notes[0]["involvedObject"]["kind"], "NetworkPolicy");
    assert!(notes[0]["message"].as_str().unwrap().contains("SCTP"));
    w.api.delete("networkpolicies", "shop", "web").unwrap();
    w.run_for(5_000);
    assert_eq!(sections(&w).len(), 1, "only the default section is left");
    assert_eq!(w.ncp_objects(), 10 + 1);
}

/// The converged passes since pass `mark`: (planned keys, incremental, operations).
fn passes_since(w: &World, mark: usize) -> Vec<(usize, bool, usize)> {
    w.passes.borrow()[mark..]
        .iter()
        .filter_map(|p| match p {
            PassEvent::Converged {
                planned,
                incremental,
                ops,
                ..
            } => Some((*planned, *incremental, *ops)),
            _ => None,
        })
        .collect()
}

/// A running NCP's cost per change is the change's: a new pod, a relabelled pod and a
/// relabelled namespace are planned from the keys they touch, the same at 60 and at 600 pods.
/// Every pass after the first plans incrementally, including those that only take in NCP's
/// own annotations.
#[test]
fn a_change_plans_what_it_touches_whatever_the_size_of_the_cluster() {
    let mut seen = Vec::new();
    for namespaces in [6, 60] {
        let mut w = world(11);
        w.apply(node("node-1"));
        for n in 0..namespaces {
            w.apply(namespace(&format!("ns-{n}")));
            for p in 0..10 {
                w.apply(pod(&format!("ns-{n}"), &format!("p-{p}"), "node-1"));
            }
        }
        // The first pass creates everything (about 2,000 requests at 600 pods).
        for _ in 0..60 {
            w.run_for(5_000);
            if w.pod_annotation(&format!("ns-{}", namespaces - 1), "p-9")
                .is_some()
            {
                break;
            }
        }
        w.run_for(5_000);
        assert!(
            w.pod_annotation(&format!("ns-{}", namespaces - 1), "p-9")
                .is_some(),
            "{:?}",
            w.passes.borrow().last()
        );
        assert_eq!(w.ncp_objects(), namespaces * 10 + namespaces * 10);
        // A new pod: its port, planned alone.
        let mark = w.passes.borrow().len();
        w.apply(pod("ns-3", "late", "node-1"));
        w.run_for(3_000);
        assert!(w.pod_annotation("ns-3", "late").is_some());
        let added = passes_since(&w, mark);
        // A relabelled pod: its port's tags.
        let mark = w.passes.borrow().len();
        w.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "late", "namespace": "ns-3", "labels": {"app": "moved"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}));
        w.run_for(3_000);
        let relabelled = passes_since(&w, mark);
        // A relabelled namespace: nothing NSX holds depends on namespace labels here.
        let mark = w.passes.borrow().len();
        w.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns-3", "labels": {"team": "a"}}}));
        w.run_for(3_000);
        let namespace_labelled = passes_since(&w, mark);
        for (what, passes, ops) in [
            ("new pod", &added, 1),
            ("relabelled pod", &relabelled, 1),
            ("relabelled namespace", &namespace_labelled, 0),
        ] {
            assert!(!passes.is_empty(), "{what}: no pass");
            assert!(
                passes.iter().all(|(_, incremental, _)| *incremental),
                "{what}: {passes:?}"
            );
            assert_eq!(
                passes.iter().map(|p| p.2).sum::<usize>(),
                ops,
                "{what}: {passes:?}"
            );
            assert!(
                passes.iter().all(|(planned, _, _)| *planned <= 1),
                "{what}: {passes:?}"
            );
        }
        w.nsx.inspect(|s| s.check_invariants()).unwrap();
        seen.push((added, relabelled, namespace_labelled));
    }
    assert_eq!(seen[0], seen[1], "the same passes at both sizes");
}

/// With no change for 20 s, the one refused object is retried on backoff: each pass plans that
/// key alone, incrementally, and tries one create. (The backoff doubles from 0.5 s after each
/// refusal; 20 s covers the step after 8 s, where the passes of the first 10 s leave it.)
fn retried_alone(w: &mut World) {
    let mark = w.passes.borrow().len();
    w.run_for(20_000);
    let retries = passes_since(w, mark);
    assert!(!retries.is_empty(), "no retry");
    assert!(
        retries.iter().all(|p| *p == (1, true, 1)),
        "one key planned, incrementally, one create tried: {retries:?}"
    );
}

/// A pod NSX refuses (its namespace's /28 is full) waits in a synced cache: the passes stay
/// incremental, and once another pod leaves, the next pass wires it.
#[test]
fn a_pod_refused_for_a_full_subnet_is_wired_once_another_leaves() {
    let mut w = world_with_prefix(12, 28);
    w.apply(node("node-1"));
    w.apply(namespace("shop"));
    // A /28 pool holds 13 addresses (the gateway takes one).
    for p in 0..14 {
        w.apply(pod("shop", &format!("p-{p:02}"), "node-1"));
    }
    w.run_for(10_000);
    let wired = |w: &World| -> Vec<bool> {
        (0..14)
            .map(|p| w.pod_annotation("shop", &format!("p-{p:02}")).is_some())
            .collect()
    };
    let before = wired(&w);
    assert_eq!(before.iter().filter(|x| **x).count(), 13, "{before:?}");
    let waiting = before.iter().position(|x| !x).unwrap();
    let events = w.api.list("events");
    assert!(
        events.iter().any(|e| e["reason"] == "NSXRealizationFailed"
            && e["involvedObject"]["kind"] == "Pod"
            && e["involvedObject"]["name"] == format!("p-{waiting:02}")),
        "{events:?}"
    );
    // With no change at all, the refused port is retried on backoff, by itself.
    retried_alone(&mut w);
    let mark = w.passes.borrow().len();
    let leaving = (waiting + 1) % 14;
    w.api
        .delete("pods", "shop", &format!("p-{leaving:02}"))
        .unwrap();
    w.run_for(5_000);
    assert!(
        w.pod_annotation("shop", &format!("p-{waiting:02}"))
            .is_some(),
        "{:?}",
        &w.passes.borrow()[mark..]
    );
    let after = passes_since(&w, mark);
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|(_, incremental, _)| *incremental),
        "{after:?}"
    );
    // The waiting port and the leaving one: a delete and a create.
    assert_eq!(after.iter().map(|p| p.2).sum::<usize>(), 2, "{after:?}");
    assert_eq!(w.ncp_objects(), 10 + 13);
    w.nsx.inspect(|s| s.check_invariants()).unwrap();
}

/// A namespace whose SNAT rule NSX refuses (someone else took every address of the SNAT pool)
/// waits in a synced cache too: its other objects and its pods are realized, the rule is
/// retried on backoff by itself, a change elsewhere plans only its own keys (and the waiting
/// rule), and once an address frees up the next pass creates the rule and annotates the
/// namespace. Planned in full, every one of those passes would look at every key.
#[test]
fn a_namespace_refused_a_snat_address_waits_without_making_passes_full() {
    let mut w = world(14);
    w.apply(node("node-1"));
    for ns in ["shop", "db", "web"] {
        w.apply(namespace(ns));
        for p in 0..4 {
            w.apply(pod(ns, &format!("p-{p}"), "node-1"));
        }
    }
    w.run_for(10_000);
    let pool = w.nsx.bootstrap().unwrap().clusters["k8s-a"]
        .snat_pool
        .clone();
    let taken = common::take_every_address(&w.nsx, &pool);
    assert!(!taken.is_empty());
    let snat_ip = |w: &World, ns: &str| {
        w.api.get("namespaces", "", ns).and_then(|n| {
            n["metadata"]["annotations"][nsx_core::k8s::annotation::SNAT_IP]
                .as_str()
                .map(str::to_string)
        })
    };
    w.apply(namespace("late"));
    w.apply(pod("late", "p-0", "node-1"));
    w.run_for(5_000);
    assert!(
        w.pod_annotation("late", "p-0").is_some(),
        "the pod is wired"
    );
    assert_eq!(snat_ip(&w, "late"), None);
    let events = w.api.list("events");
    assert!(
        events.iter().any(|e| e["reason"] == "NSXRealizationFailed"
            && e["involvedObject"]["kind"] == "Namespace"
            && e["involvedObject"]["name"] == "late"),
        "{events:?}"
    );
    // With no change, the rule alone is retried, incrementally.
    retried_alone(&mut w);
    // A new pod elsewhere: its port and the waiting rule, nothing else.
    let mark = w.passes.borrow().len();
    w.apply(pod("shop", "p-new", "node-1"));
    w.run_for(3_000);
    assert!(w.pod_annotation("shop", "p-new").is_some());
    let changed = passes_since(&w, mark);
    assert!(!changed.is_empty());
    assert!(
        changed
            .iter()
            .all(|(planned, incremental, _)| *incremental && *planned <= 2),
        "{changed:?}"
    );
    // An address frees up: the rule is created and the namespace learns its SNAT address.
    common::give_back(&w.nsx, &pool, &taken[0]);
    // The retry comes on backoff (doubling from 0.5 s to at most 30 s).
    let mark = w.passes.borrow().len();
    w.run_for(35_000);
    assert_eq!(
        snat_ip(&w, "late").as_deref(),
        Some(taken[0].as_str()),
        "{:?} objects {}",
        &w.passes.borrow()[mark..],
        w.ncp_objects()
    );
    let healed = passes_since(&w, mark);
    assert!(
        healed.iter().all(|(_, incremental, _)| *incremental),
        "{healed:?}"
    );
    assert_eq!(healed.iter().map(|p| p.2).sum::<usize>(), 1, "{healed:?}");
    // Four namespaces (ten objects each), 14 pods.
    assert_eq!(w.ncp_objects(), 4 * 10 + 14);
    w.nsx.inspect(|s| s.check_invariants()).unwrap();
}
