//! Two NCP replicas with leader election on a Lease: one leads, the other waits; a leader cut
//! off from the apiserver stops writing (fencing) before the other takes over, and the two
//! never write to NSX in the same period.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use fake_nsx_manager::{Clock, FakeNsxManager, ManagerConfig, User};
use nsx_core::ncp::config::NcpConfig;
use nsx_core::ncp::controller::{self, LoopConfig, PassEvent};
use nsx_core::ncp::leader::{LeaderConfig, Leadership};
use nsx_core::nsx::{Auth, ClientConfig, NsxClient};
use nsx_sim::apiserver::ApiServer;
use nsx_sim::net::{TurmoilConnector, kube_client, serve};
use serde_json::{Value, json};

const EPOCH_MS: i64 = 1_767_225_600_000;

fn sim_clock() -> i64 {
    EPOCH_MS + turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as i64)
}

type Log = Rc<RefCell<Vec<(u64, String, PassEvent)>>>;

#[test]
fn a_partitioned_leader_is_fenced_before_the_other_replica_takes_over() {
    let api = ApiServer::new(9, sim_clock);
    let nsx = FakeNsxManager::new(ManagerConfig {
        clock: Clock::new(sim_clock),
        ..Default::default()
    });
    for r in ["ncp-0", "ncp-1"] {
        nsx.add_user(User::new(r, "pw", "enterprise_admin"));
    }
    let snat = nsx.bootstrap().unwrap().clusters["k8s-a"].snat_pool.clone();
    let mut sim = turmoil::Builder::new()
        .epoch(std::time::UNIX_EPOCH + Duration::from_millis(EPOCH_MS as u64))
        .rng_seed(9)
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
        async move { serve(80, n.router()).await }
    });
    let log: Log = Rc::default();
    for replica in ["ncp-0", "ncp-1"] {
        let (log, snat) = (log.clone(), snat.clone());
        sim.host(replica, move || {
            let (log, snat) = (log.clone(), snat.clone());
            async move {
                let kube = kube_client("http://apiserver:6443")?;
                let mut cc = ClientConfig::new(
                    "http://nsx-manager:80",
                    Auth::Basic {
                        user: replica.into(),
                        password: "pw".into(),
                    },
                );
                cc.request_timeout_ms = 2_000;
                cc.max_attempts = 2;
                let nsx = Arc::new(NsxClient::new(TurmoilConnector, cc));
                let mut config = NcpConfig::for_cluster("k8s-a");
                config.external_ip_pools = vec![snat];
                let timing = LoopConfig {
                    resync: Duration::from_secs(2),
                    ..LoopConfig::default()
                };
                controller::run_ha(
                    kube,
                    nsx,
                    config,
                    timing,
                    LeaderConfig::new("k8s-a", replica),
                    Arc::new(sim_clock),
                    move |e| {
                        let t = turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64);
                        log.borrow_mut().push((t, replica.to_string(), e.clone()));
                    },
                )
                .await;
                Ok(())
            }
        });
    }
    let run_for = |sim: &mut turmoil::Sim<'_>, ms: u64| {
        let until = sim.elapsed() + Duration::from_millis(ms);
        while sim.elapsed() < until {
            sim.step().unwrap();
        }
    };
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop"}, "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}),
    ] {
        api.apply(obj).unwrap();
    }
    run_for(&mut sim, 20_000);
    let leaders: Vec<String> = log
        .borrow()
        .iter()
        .filter(|(_, _, e)| *e == PassEvent::Leadership(Leadership::Acquired))
        .map(|(_, r, _)| r.clone())
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {:?}", log.borrow());
    let leader = leaders[0].clone();
    let other = if leader == "ncp-0" { "ncp-1" } else { "ncp-0" };
    let writers = |from_ms: i64| -> Vec<String> {
        let mut w: Vec<String> = nsx
            .requests_since(0)
            .iter()
            .filter(|e| {
                e.method != "GET"
                    && e.path.starts_with("/api/v1/")
                    && e.time_ms - EPOCH_MS >= from_ms
            })
            .map(|e| e.user.clone())
            .collect();
        w.dedup();
        w
    };
    assert_eq!(writers(0), vec![leader.clone()], "only the leader writes");
    let annotated =
        api.get("pods", "shop", "web-1").unwrap()["metadata"]["annotations"]["ncp/network"]
            .is_string();
    assert!(annotated);

    // Cut the leader off from the apiserver (not from NSX).
    let cut_ms = sim.elapsed().as_millis() as i64;
    sim.partition(leader.as_str(), "apiserver");
    run_for(&mut sim, 13_000);
    // Its fence has lapsed by now; delete an NCP object: the old leader must not put it back.
    let port = nsx.with_store(|s| {
        s.objects()
            .find(|(_, o)| {
                o.doc
                    .get("tags")
                    .is_some_and(|t| t.to_string().contains("ncp/pod_uid"))
            })
            .map(|(id, _)| id.clone())
            .unwrap()
    });
    nsx.with_store_mut(|s, ctx| {
        s.delete(
            ctx,
            fake_nsx_manager::kind::Kind::LogicalPort,
            &port,
            fake_nsx_manager::store::DeleteFlags {
                detach: true,
                ..Default::default()
            },
        )
        .unwrap()
    });
    run_for(&mut sim, 30_000);
    let after: Vec<(i64, String)> = nsx
        .requests_since(0)
        .iter()
        .filter(|e| {
            e.method != "GET" && e.path.starts_with("/api/v1/") && e.time_ms - EPOCH_MS >= cut_ms
        })
        .map(|e| (e.time_ms - EPOCH_MS, e.user.clone()))
        .collect();
    let old_last = after
        .iter()
        .filter(|(_, u)| *u == leader)
        .map(|(t, _)| *t)
        .max()
        .unwrap_or(cut_ms);
    let new_first = after
        .iter()
        .filter(|(_, u)| u == other)
        .map(|(t, _)| *t)
        .min()
        .expect("the other replica took over and repaired");
    assert!(
        old_last <= cut_ms + 12_000,
        "the old leader wrote {} ms after the cut",
        old_last - cut_ms
    );
    assert!(
        new_first > old_last,
        "writes overlapped: old leader until {old_last}, new from {new_first}"
    );
    assert!(
        new_first >= cut_ms + 12_000,
        "taken over too early: {}",
        new_first - cut_ms
    );
    let holder =
        api.get("leases", "kube-system", "ncp-k8s-a").unwrap()["spec"]["holderIdentity"].clone();
    assert_eq!(holder, Value::String(other.to_string()));
    let ports = nsx.with_store(|s| {
        s.objects()
            .filter(|(_, o)| {
                o.doc
                    .get("tags")
                    .is_some_and(|t| t.to_string().contains("ncp/pod_uid"))
            })
            .count()
    });
    assert_eq!(ports, 1, "repaired once, by the new leader");
    // Healed: the old leader stays a follower and never writes again.
    sim.repair(leader.as_str(), "apiserver");
    let healed_ms = sim.elapsed().as_millis() as i64;
    run_for(&mut sim, 20_000);
    assert_eq!(
        writers(healed_ms).iter().filter(|u| **u == leader).count(),
        0
    );
    nsx.with_store(|s| s.check_invariants()).unwrap();
}
