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

/// Two replicas, the apiserver and the fake manager under turmoil. `tune` adjusts the NSX
/// client of each replica (the defaults are production's: 30 s per attempt, 10 attempts).
fn two_replicas(
    tune: fn(&mut ClientConfig),
) -> (turmoil::Sim<'static>, ApiServer, FakeNsxManager, Log) {
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
                tune(&mut cc);
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
    (sim, api, nsx, log)
}

fn run_for(sim: &mut turmoil::Sim<'_>, ms: u64) {
    let until = sim.elapsed() + Duration::from_millis(ms);
    while sim.elapsed() < until {
        sim.step().unwrap();
    }
}

#[test]
fn a_partitioned_leader_is_fenced_before_the_other_replica_takes_over() {
    let (mut sim, api, nsx, log) = two_replicas(|cc| {
        cc.request_timeout_ms = 2_000;
        cc.max_attempts = 2;
    });
    let (leader, other) = elect(&mut sim, &api, &log);
    let other = other.as_str();
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
    delete_the_pod_port(&nsx);
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
    let ports = pod_ports(&nsx);
    assert_eq!(ports, 1, "repaired once, by the new leader");
    // Healed: the old leader stays a follower and never writes again.
    sim.repair(leader.as_str(), "apiserver");
    let healed_ms = sim.elapsed().as_millis() as i64;
    run_for(&mut sim, 20_000);
    assert_eq!(
        writers(healed_ms).iter().filter(|u| **u == leader).count(),
        0
    );
    nsx.inspect(|s| s.check_invariants()).unwrap();
}

/// Applies the cluster, runs until one replica leads; `(leader, other)`.
fn elect(sim: &mut turmoil::Sim<'_>, api: &ApiServer, log: &Log) -> (String, String) {
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop"}, "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}),
    ] {
        api.apply(obj).unwrap();
    }
    run_for(sim, 20_000);
    let leaders: Vec<String> = log
        .borrow()
        .iter()
        .filter(|(_, _, e)| *e == PassEvent::Leadership(Leadership::Acquired))
        .map(|(_, r, _)| r.clone())
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {:?}", log.borrow());
    let leader = leaders[0].clone();
    let other = if leader == "ncp-0" { "ncp-1" } else { "ncp-0" };
    (leader, other.to_string())
}

/// How many pod ports NSX holds (tagged `ncp/pod_uid`).
fn pod_ports(nsx: &FakeNsxManager) -> usize {
    nsx.inspect(|s| {
        s.objects()
            .filter(|o| {
                o.doc
                    .get("tags")
                    .is_some_and(|t| t.to_string().contains("ncp/pod_uid"))
            })
            .count()
    })
}

/// The pod's logical port, deleted behind NCP's back (detached), as drift NCP repairs.
fn delete_the_pod_port(nsx: &FakeNsxManager) {
    let port = nsx.inspect(|s| {
        s.objects()
            .find(|o| o.tag("ncp/pod_uid").is_some())
            .map(|o| o.id.to_string())
            .unwrap()
    });
    let r = nsx.as_admin(
        "DELETE",
        &format!("/api/v1/logical-ports/{port}"),
        &[("detach", "true")],
        None,
    );
    assert!(r.is_success(), "{} {}", r.status, r.body);
}

/// The fence test with production's client (30 s per attempt, 10 attempts with backoff).
/// The leader is cut off from the apiserver, so its fence falls and the other replica takes
/// over 6 s later; meanwhile the leader is repairing drift against an NSX that throttles it
/// (503 to its writes, so it retries), and for part of that time the network holds its
/// traffic. A write already on the wire when the fence falls may still land (NSX has no
/// fencing token): the hold is released between the fall and the earliest takeover, as the
/// README says that risk is bounded. What must not happen is a retry, re-login or new attempt
/// after the fence: no write of the old leader reaches NSX after the new leader's first.
#[test]
fn a_write_held_and_retried_across_a_takeover_never_lands_after_the_new_leaders_first() {
    let (mut sim, api, nsx, log) = two_replicas(|_| {});
    let (leader, other) = elect(&mut sim, &api, &log);
    let renewed_ms = |api: &ApiServer| -> i64 {
        let lease = api.get("leases", "kube-system", "ncp-k8s-a").unwrap();
        let t = lease["spec"]["renewTime"].as_str().unwrap().to_string();
        t.parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap()
            .as_millisecond()
            - EPOCH_MS
    };
    let cut_ms = sim.elapsed().as_millis() as i64;
    sim.partition(leader.as_str(), "apiserver");
    let last_renewal = renewed_ms(&api);
    // The leader's writes are throttled from now on; the other replica's are not.
    nsx.add_fault(fake_nsx_manager::FaultRule {
        user: Some(leader.clone()),
        method: Some("POST".into()),
        path: None,
        status: 503,
        error_code: Some(503),
        rate: 1.0,
        remaining: None,
        message: None,
    });
    delete_the_pod_port(&nsx);
    // The leader notices (its resync reads NSX every 2 s) and starts retrying the create.
    let tried = |nsx: &FakeNsxManager, since: i64| {
        nsx.requests_since(0)
            .iter()
            .filter(|e| e.user == leader && e.method == "POST" && e.time_ms - EPOCH_MS >= since)
            .count()
    };
    while tried(&nsx, cut_ms) == 0 {
        sim.step().unwrap();
        assert!(
            sim.elapsed().as_millis() as i64 - cut_ms < 10_000,
            "the leader never tried"
        );
    }
    // Its next attempts are held by the network until after its fence has fallen (at most
    // 12 s after the last renewal), and released before the Lease can expire (18 s after it).
    sim.hold(leader.as_str(), "nsx-manager");
    let release_ms = last_renewal + 15_000;
    let now_ms = sim.elapsed().as_millis() as i64;
    run_for(&mut sim, (release_ms - now_ms).max(0) as u64);
    sim.release(leader.as_str(), "nsx-manager");
    run_for(&mut sim, 40_000);

    let after: Vec<(i64, String, u16)> = nsx
        .requests_since(0)
        .iter()
        .filter(|e| {
            e.method != "GET" && e.path.starts_with("/api/v1/") && e.time_ms - EPOCH_MS >= cut_ms
        })
        .map(|e| (e.time_ms - EPOCH_MS, e.user.clone(), e.status))
        .collect();
    let old_last = after
        .iter()
        .filter(|(_, u, _)| *u == leader)
        .map(|(t, ..)| *t)
        .max()
        .unwrap();
    let new_first = after
        .iter()
        .filter(|(_, u, _)| *u == other)
        .map(|(t, ..)| *t)
        .min()
        .expect("the other replica took over and repaired");
    assert!(
        new_first > old_last,
        "the deposed leader's write reached NSX at {old_last} ms, after the new leader's first \
         at {new_first} ms (cut at {cut_ms}, last renewal {last_renewal}): {after:?}"
    );
    assert!(
        old_last <= release_ms + 100,
        "nothing of the old leader is sent after its fence: last write at {old_last} ms, \
         released at {release_ms}"
    );
    assert!(
        new_first >= last_renewal + 18_000,
        "taken over before the Lease expired"
    );
    let ports = pod_ports(&nsx);
    assert_eq!(ports, 1, "repaired once, by the new leader");
    nsx.inspect(|s| s.check_invariants()).unwrap();
}

/// A write fence that falls at a fixed instant.
struct FallsAt(tokio::time::Instant);

impl nsx_core::nsx::client::WriteFence for FallsAt {
    fn writes_until(&self) -> Option<tokio::time::Instant> {
        (tokio::time::Instant::now() < self.0).then_some(self.0)
    }
}

/// The client alone, with production's settings: a throttled write (503, retried with
/// backoff) whose attempt is held by the network when the fence falls. The attempt on the
/// wire is abandoned by the client but still reaches NSX when the network lets it go; nothing
/// else is sent after the fence: no retry, no new attempt. (Without the client's check before
/// every attempt, the retries run on for half a minute.)
#[test]
fn a_fenced_client_sends_nothing_after_its_fence() {
    let nsx = FakeNsxManager::new(ManagerConfig {
        clock: Clock::new(sim_clock),
        ..Default::default()
    });
    nsx.add_user(User::new("old", "pw", "enterprise_admin"));
    nsx.add_fault(fake_nsx_manager::FaultRule {
        user: Some("old".into()),
        method: Some("POST".into()),
        path: None,
        status: 503,
        error_code: Some(503),
        rate: 1.0,
        remaining: None,
        message: None,
    });
    let tz = nsx.bootstrap().unwrap().transport_zone;
    let mut sim = turmoil::Builder::new()
        .epoch(std::time::UNIX_EPOCH + Duration::from_millis(EPOCH_MS as u64))
        .rng_seed(3)
        .tick_duration(Duration::from_millis(5))
        .simulation_duration(Duration::from_secs(600))
        .build();
    let n = nsx.clone();
    sim.host("nsx-manager", move || {
        let n = n.clone();
        async move { serve(80, n.router()).await }
    });
    let outcome: Rc<RefCell<Option<String>>> = Rc::default();
    let out = outcome.clone();
    sim.client("old", async move {
        let client = NsxClient::new(
            TurmoilConnector,
            ClientConfig::new(
                "http://nsx-manager:80",
                Auth::Basic {
                    user: "old".into(),
                    password: "pw".into(),
                },
            ),
        );
        client.set_write_fence(Some(Arc::new(FallsAt(
            tokio::time::Instant::now() + Duration::from_secs(5),
        ))));
        let r = client
            .create::<_, Value>(
                "logical-switches",
                &json!({"transport_zone_id": tz, "admin_state": "UP"}),
            )
            .await;
        *out.borrow_mut() = Some(match r {
            Ok(v) => format!("created {v}"),
            Err(e) => e.to_string(),
        });
        Ok(())
    });
    // Attempts go out and are refused until 3 s; from then the network holds them, past the
    // fence (5 s), until 8 s.
    run_for(&mut sim, 3_000);
    sim.hold("old", "nsx-manager");
    run_for(&mut sim, 5_000);
    sim.release("old", "nsx-manager");
    run_for(&mut sim, 60_000);
    let outcome = outcome.borrow().clone().expect("the write ended");
    assert!(outcome.contains("write fence is down"), "{outcome}");
    let arrivals: Vec<i64> = nsx
        .requests_since(0)
        .iter()
        .filter(|e| e.user == "old" && e.method == "POST")
        .map(|e| e.time_ms - EPOCH_MS)
        .collect();
    assert!(
        arrivals.len() >= 3,
        "the write was retried before the fence: {arrivals:?}"
    );
    let late: Vec<&i64> = arrivals.iter().filter(|t| **t > 5_000).collect();
    assert!(
        late.len() <= 1 && late.iter().all(|t| **t <= 8_100),
        "after the fence (5 s) only the attempt already on the wire may arrive, when the \
         network releases it (8 s): {arrivals:?}"
    );
}
