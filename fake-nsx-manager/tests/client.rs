//! The production NSX client (nsx-core) against the fake over real loopback TCP: both speak
//! the same wire protocol, and the client's retry, session and paging rules work against it.

use std::sync::Arc;

use fake_nsx_manager::{FakeNsxManager, FaultRule, ManagerConfig};
use hyper_util::client::legacy::connect::HttpConnector;
use nsx_core::nsx::model::{LogicalSwitch, Tag};
use nsx_core::nsx::{Auth, ClientConfig, NsxClient, search};
use serde_json::{Value, json};

async fn serve(nsx: &FakeNsxManager) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = nsx.router();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}

fn client(url: &str, auth: Auth) -> NsxClient<HttpConnector> {
    let mut cfg = ClientConfig::new(url, auth);
    cfg.backoff_base_ms = 2;
    cfg.backoff_max_ms = 20;
    cfg.rate_limit_per_second = 0;
    cfg.seed = 7;
    NsxClient::new(HttpConnector::new(), cfg)
}

fn basic() -> Auth {
    Auth::Basic {
        user: "admin".into(),
        password: "admin".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_create_get_update_delete_round_trip() {
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    let url = serve(&nsx).await;
    let c = client(&url, basic());
    let tz = nsx.bootstrap().unwrap().transport_zone;
    let mut ls = LogicalSwitch {
        transport_zone_id: Some(tz),
        admin_state: Some("UP".into()),
        ..Default::default()
    };
    ls.meta.tags = Some(vec![Tag::new("ncp/cluster", "k8s-a")]);
    let created: LogicalSwitch = c.create("logical-switches", &ls).await.unwrap();
    let id = created.meta.id.clone().unwrap();
    assert_eq!(created.meta.revision, Some(0));
    assert!(created.vni.is_some());
    let got: LogicalSwitch = c.get(&format!("logical-switches/{id}")).await.unwrap();
    assert_eq!(got, created);
    let renamed: LogicalSwitch = c
        .update_with(
            &format!("logical-switches/{id}"),
            |s: &mut LogicalSwitch| s.meta.display_name = Some("renamed".into()),
        )
        .await
        .unwrap();
    assert_eq!(renamed.meta.revision, Some(1));
    c.delete(&format!("logical-switches/{id}")).await.unwrap();
    let err = c
        .get::<LogicalSwitch>(&format!("logical-switches/{id}"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.error_code(), Some(202));
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_with_rereads_and_reapplies_after_a_concurrent_change() {
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    let url = serve(&nsx).await;
    let c = Arc::new(client(&url, basic()));
    let tz = nsx.bootstrap().unwrap().transport_zone;
    let created: Value = c
        .create(
            "logical-switches",
            &json!({"transport_zone_id": tz, "admin_state": "UP"}),
        )
        .await
        .unwrap();
    let path = format!("logical-switches/{}", created["id"].as_str().unwrap());
    // Eight writers each add their own tag by read-modify-write: all eight must land.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            c.update_with(&path, move |s: &mut LogicalSwitch| {
                let tags = s.meta.tags.get_or_insert_with(Vec::new);
                let t = Tag::new("writer", i.to_string());
                if !tags.contains(&t) {
                    tags.push(t);
                }
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let done: LogicalSwitch = c.get(&path).await.unwrap();
    assert_eq!(done.meta.tags.unwrap().len(), 8);
    assert_eq!(done.meta.revision, Some(8));
    assert!(
        nsx.counters().by_status.get(&412).copied().unwrap_or(0) > 0,
        "the writers did collide"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_all_and_search_all_follow_cursors() {
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    nsx.set_rate_limit(0);
    let url = serve(&nsx).await;
    let c = client(&url, basic());
    for i in 0..120 {
        let _: Value = c
            .create("ns-groups", &json!({"display_name": format!("g{i}"), "tags": [{"scope": "ncp/cluster", "tag": "k8s-b"}]}))
            .await
            .unwrap();
    }
    let all: Vec<Value> = c.list_all("ns-groups").await.unwrap();
    assert_eq!(all.len(), 120, "NSGroups come 50 a page");
    let found = c
        .search_all(&search::by_tags(
            Some("NSGroup"),
            &[Tag::new("ncp/cluster", "k8s-b")],
        ))
        .await
        .unwrap();
    assert_eq!(found.len(), 120);
    let pages = nsx
        .requests_since(0)
        .iter()
        .filter(|e| e.path.starts_with("/api/v1/ns-groups") && e.method == "GET")
        .count();
    let paths: Vec<String> = nsx
        .requests_since(0)
        .iter()
        .filter(|e| e.path.starts_with("/api/v1/ns-groups") && e.method == "GET")
        .map(|e| format!("{} {}", e.path, e.status))
        .collect();
    assert_eq!(pages, 3, "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_overload_are_retried_with_backoff_but_validation_errors_are_not() {
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    let url = serve(&nsx).await;
    let c = client(&url, basic());
    for (status, code) in [(429, 102), (503, 503), (500, 607)] {
        nsx.add_fault(FaultRule {
            user: None,
            method: None,
            path: Some("/api/v1/ip-sets".into()),
            status,
            error_code: Some(code),
            rate: 1.0,
            remaining: Some(3),
            message: None,
        });
    }
    let before = c.stats();
    let v: Value = c
        .create("ip-sets", &json!({"ip_addresses": ["10.0.0.1"]}))
        .await
        .unwrap();
    assert!(v["id"].is_string());
    let s = c.stats();
    assert_eq!(s.retries - before.retries, 9);
    assert_eq!(s.by_status.get(&429), Some(&3));
    assert_eq!(s.by_status.get(&503), Some(&3));
    assert_eq!(s.by_status.get(&500), Some(&3));
    let err = c
        .create::<_, Value>("ip-sets", &json!({"ip_addresses": ["bogus"]}))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert_eq!(c.stats().retries, s.retries, "a 400 is not retried");
    // A fault that never heals exhausts the attempts and surfaces the last error.
    nsx.add_fault(FaultRule {
        user: None,
        method: Some("GET".into()),
        path: Some("/api/v1/ip-sets".into()),
        status: 503,
        error_code: None,
        rate: 1.0,
        remaining: None,
        message: None,
    });
    let err = c.get::<Value>("ip-sets").await.unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_auth_logs_in_once_and_again_after_expiry() {
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    let url = serve(&nsx).await;
    let c = client(
        &url,
        Auth::Session {
            user: "admin".into(),
            password: "admin".into(),
        },
    );
    let _: Value = c.get("logical-switches").await.unwrap();
    let _: Value = c.get("logical-routers").await.unwrap();
    assert_eq!(c.stats().sessions_created, 1);
    nsx.expire_sessions();
    let _: Value = c.get("logical-switches").await.unwrap();
    assert_eq!(c.stats().sessions_created, 2);
    let bad = client(
        &url,
        Auth::Session {
            user: "admin".into(),
            password: "wrong".into(),
        },
    );
    let err = bad.get::<Value>("logical-switches").await.unwrap_err();
    assert_eq!(err.status(), Some(403));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_side_rate_limit_keeps_a_busy_client_clear_of_429() {
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    nsx.set_rate_limit(40);
    let url = serve(&nsx).await;
    let mut cfg = ClientConfig::new(&url, basic());
    cfg.rate_limit_per_second = 30;
    cfg.rate_limit_burst = 5;
    let c = Arc::new(NsxClient::new(HttpConnector::new(), cfg));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                let _: Value = c.get("transport-zones").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = c.stats();
    assert_eq!(s.requests, 60);
    assert_eq!(s.by_status.get(&429), None, "{s:?}");
    assert_eq!(s.retries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_that_stops_answering_is_failed_over_to_the_next_of_the_cluster() {
    // Two managers of one cluster (one database); the first goes away.
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        format!("http://{addr}")
    };
    let alive = serve(&nsx).await;
    let mut cfg = ClientConfig::new(&dead, basic());
    cfg.standby_urls = vec![alive.clone()];
    cfg.backoff_base_ms = 2;
    cfg.backoff_max_ms = 20;
    cfg.rate_limit_per_second = 0;
    let c = NsxClient::new(HttpConnector::new(), cfg);
    // A read is repeated on the next manager.
    let switches: Vec<Value> = c.list_all("logical-switches").await.unwrap();
    assert_eq!(
        switches.len(),
        nsx.with_store(|s| s
            .objects()
            .filter(|(_, o)| o.doc["resource_type"] == "LogicalSwitch")
            .count())
    );
    assert_eq!(c.manager_url(), alive);
    assert_eq!(c.stats().failovers, 1);
    // Later requests, writes too, go straight to it.
    let tz = nsx.bootstrap().unwrap().transport_zone;
    let created: Value = c
        .create(
            "logical-switches",
            &json!({"transport_zone_id": tz, "admin_state": "UP", "display_name": "x"}),
        )
        .await
        .unwrap();
    assert_eq!(created["display_name"], "x");
    assert_eq!(c.stats().failovers, 1);
    assert_eq!(c.stats().transport_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reads_through_one_batch_that_is_not_a_write() {
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    let url = serve(&nsx).await;
    let c = client(&url, basic());
    let tz = nsx.bootstrap().unwrap().transport_zone;
    let before = nsx.counters();
    let answers = c
        .get_many(&[
            format!("transport-zones/{tz}"),
            "/api/v1/logical-switches".to_string(),
        ])
        .await
        .unwrap();
    assert_eq!(answers[0]["id"], tz.as_str());
    assert!(answers[1]["results"].is_array(), "{}", answers[1]);
    let after = nsx.counters();
    assert_eq!(after.total - before.total, 1, "one request for two reads");
    assert_eq!(
        after.writes, before.writes,
        "a read-only batch is not a write"
    );
    // A batch that carries a write is one.
    let _: Value = c
        .create(
            "batch",
            &json!({"requests": [{"method": "POST", "uri": "/v1/logical-switches",
                "body": {"transport_zone_id": tz, "admin_state": "UP"}}]}),
        )
        .await
        .unwrap();
    assert_eq!(nsx.counters().writes, after.writes + 1);
    // The failed read is the error, with its own status and NSX error code.
    let err = c
        .get_many(&[
            "logical-switches".to_string(),
            "logical-switches/no-such-switch".to_string(),
        ])
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.error_code(), Some(202));
    assert!(err.to_string().contains("no-such-switch"), "{err}");
}
