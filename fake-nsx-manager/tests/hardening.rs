//! Hostile input and hostile clients: each test reproduces a defect a hostile test of the
//! release binary found (deep search queries, a failed state save, unauthenticated huge
//! bodies, idle connections, forged XSRF tokens, wrapped admin numbers, lax validation).

mod common;

use std::time::Duration;

use common::Client;
use fake_nsx_manager::listen::{ServeOptions, serve};
use fake_nsx_manager::{FakeNsxManager, ManagerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[tokio::test]
async fn a_query_nested_thousands_deep_is_a_400_and_the_manager_stays_up() {
    let c = Client::new();
    for q in [
        format!("{}a{}", "(".repeat(2_100), ")".repeat(2_100)),
        "!".repeat(3_500) + "a",
        "NOT ".repeat(5_000) + "a",
    ] {
        let a = c
            .raw(
                "GET",
                &format!("/api/v1/search?query={}", urlencode(&q)),
                b"",
                &[],
            )
            .await
            .expect(400);
        assert_eq!(a.code(), Some(60501), "{}", a.body);
        // The batch API carries no URI length limit: the same bound must hold there.
        let b = c
            .post(
                "batch",
                json!({"requests": [{"method": "GET", "uri": format!("/api/v1/search?query={}", urlencode(&q))}]}),
            )
            .await
            .expect(200);
        assert_eq!(b.body["results"][0]["code"], 400, "{}", b.body);
    }
    c.get("search?query=resource_type:TransportZone")
        .await
        .expect(200);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_write_that_cannot_be_saved_is_a_500_and_is_undone() {
    let dir = std::env::temp_dir().join(format!("fake-nsx-unsaved-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nsx.json");
    let config = || ManagerConfig {
        state_file: Some(file.clone()),
        ..Default::default()
    };
    let c = Client::on(FakeNsxManager::open(config()).unwrap());
    let tz = c.boot().transport_zone;
    let before = c.get("logical-switches").await.expect(200).body["result_count"].clone();
    // The disk refuses both ways a write is saved: the journal cannot be opened for append and
    // the snapshot's temporary file cannot be created (each path is a directory). The journal
    // is empty here (just folded into the snapshot on open), so nothing already saved is lost.
    let tmp = dir.join(".nsx.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let journal = dir.join("nsx.json.journal");
    assert_eq!(std::fs::read(&journal).unwrap(), b"");
    std::fs::remove_file(&journal).unwrap();
    std::fs::create_dir(&journal).unwrap();
    let body = json!({"transport_zone_id": tz, "admin_state": "UP", "display_name": "once"});
    let failed = c.post("logical-switches", body.clone()).await.expect(500);
    assert_eq!(failed.code(), Some(100), "{}", failed.body);
    assert_eq!(
        c.get("logical-switches").await.expect(200).body["result_count"],
        before,
        "a write that was not saved must not stay applied"
    );
    assert_eq!(
        c.get("search?query=display_name:once").await.body["result_count"],
        0
    );
    // A principal identity too: refused, not half-registered.
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem();
    let pi = json!({"name": "ncp", "node_id": "k8s-a", "role": "enterprise_admin", "certificate_pem": pem});
    let path = "trust-management/principal-identities/with-certificate";
    c.post(path, pi.clone()).await.expect(500);
    assert_eq!(
        c.get("trust-management/principal-identities").await.body["result_count"],
        0
    );
    // The client retries once the disk is back: exactly one object, and it survives a restart.
    std::fs::remove_dir(&tmp).unwrap();
    std::fs::remove_dir(&journal).unwrap();
    let id = c.post("logical-switches", body).await.expect(201).id();
    c.post(path, pi).await.expect(201);
    drop(c);
    let c = Client::on(FakeNsxManager::open(config()).unwrap());
    let found = c
        .get("search?query=display_name:once")
        .await
        .expect(200)
        .body;
    assert_eq!(found["result_count"], 1, "{found}");
    assert_eq!(found["results"][0]["id"], id.as_str());
    assert_eq!(
        c.get("trust-management/principal-identities").await.body["result_count"],
        1
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_forged_xsrf_token_is_refused_and_the_session_survives() {
    let c = Client::new();
    let (cookie, xsrf) = c.session().await;
    let mut s = c.as_user("x", "y");
    s.auth = None;
    for forged in ["", "forged", &xsrf[1..]] {
        s.extra = vec![
            ("cookie".into(), cookie.clone()),
            ("x-xsrf-token".into(), forged.into()),
        ];
        assert_eq!(s.get("logical-switches").await.expect(403).code(), Some(98));
    }
    s.extra = vec![("cookie".into(), cookie), ("x-xsrf-token".into(), xsrf)];
    s.get("logical-switches").await.expect(200);
}

#[tokio::test]
async fn admin_numbers_out_of_range_are_a_400_and_change_nothing() {
    let c = Client::new();
    let before = c.get("/fake-admin/config").await.expect(200).body;
    for bad in [
        json!({"rate_limit": 4_294_967_296u64}),
        json!({"search_lag_ms": u64::MAX}),
        json!({"latency_ms": -1}),
        json!({"concurrency_limit": "7"}),
        json!({"connection_timeout": 0}),
        json!({"rate_limit": 5, "no_such_setting": 1}),
        json!([1, 2]),
    ] {
        let a = c.put("/fake-admin/config", bad.clone()).await;
        assert_eq!(a.status, 400, "{bad} -> {}", a.body);
        assert_eq!(c.get("/fake-admin/config").await.body, before, "{bad}");
    }
    let a = c
        .put(
            "/fake-admin/config",
            json!({"rate_limit": 4_294_967_295u64, "connection_timeout": 5}),
        )
        .await
        .expect(200);
    assert_eq!(a.body["rate_limit"], 4_294_967_295u64);
    assert_eq!(a.body["connection_timeout"], 5);
}

#[tokio::test]
async fn loose_addresses_priorities_and_certificates_are_refused() {
    let c = Client::new();
    for cidr in [
        " 10.0.0.0/24",
        "10.0.0.0 /24",
        "10.0.0.0/08",
        "10.0.0.0/+8",
        "10.0.0.0/",
        "010.0.0.0/24",
    ] {
        let a = c
            .post(
                "pools/ip-blocks",
                json!({"display_name": "b", "cidr": cidr}),
            )
            .await;
        assert_eq!(a.status, 400, "{cidr:?} -> {}", a.body);
        assert_eq!(a.code(), Some(255), "{cidr:?} -> {}", a.body);
    }
    c.post(
        "pools/ip-blocks",
        json!({"display_name": "b", "cidr": "10.0.0.0/8"}),
    )
    .await
    .expect(201);
    let router = c
        .post(
            "logical-routers",
            json!({"router_type": "TIER1", "display_name": "t1"}),
        )
        .await
        .expect(201)
        .id();
    let nat = format!("logical-routers/{router}/nat/rules");
    for p in [json!(-5), json!(2_147_483_648u64), json!("1"), json!(1.5)] {
        let a = c
            .post(
                &nat,
                json!({"action": "SNAT", "translated_network": "192.0.2.1", "rule_priority": p}),
            )
            .await;
        assert_eq!(a.status, 400, "rule_priority {p} -> {}", a.body);
    }
    c.post(
        &nat,
        json!({"action": "SNAT", "translated_network": "192.0.2.1", "rule_priority": 0}),
    )
    .await
    .expect(201);
    let garbage = "-----BEGIN CERTIFICATE-----\nq83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJ\n-----END CERTIFICATE-----\n";
    let a = c
        .post(
            "trust-management/principal-identities/with-certificate",
            json!({"name": "x", "node_id": "n", "role": "enterprise_admin", "certificate_pem": garbage}),
        )
        .await
        .expect(400);
    assert_eq!(a.code(), Some(255), "{}", a.body);
}

/// The manager on a real socket, as the binary serves it.
async fn listening(config: ManagerConfig, cap: usize) -> (FakeNsxManager, std::net::SocketAddr) {
    let nsx = FakeNsxManager::new(config);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(
        nsx.clone(),
        l,
        ServeOptions {
            tls: None,
            max_connections_per_client: cap,
        },
    ));
    (nsx, addr)
}

/// The status line of the answer on `s`, or `None` when the server closed the connection.
async fn status_of(s: &mut TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the server neither answered nor closed within 10 s")
        .unwrap_or(0);
    (n > 0).then(|| {
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
}

#[tokio::test]
async fn an_unauthenticated_body_is_refused_before_it_is_read_and_big_bodies_are_a_413() {
    let (_nsx, addr) = listening(ManagerConfig::default(), 8).await;
    // Headers announce 60 MB and not a byte of it follows: the answer must not wait for it.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /api/v1/batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 60000000\r\n\r\n",
    )
    .await
    .unwrap();
    let status = status_of(&mut s).await.expect("an answer");
    assert!(status.contains(" 403 "), "{status}");
    // An authenticated caller gets a 413 past the limit, before anything is parsed.
    let auth = common::basic("admin", "admin");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = vec![b' '; 5 << 20];
    let head = format!(
        "POST /api/v1/logical-switches HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&body).await;
    let status = status_of(&mut s).await.expect("an answer");
    assert!(status.contains(" 413 "), "{status}");
}

#[tokio::test]
async fn idle_and_half_sent_requests_time_out_and_one_client_cannot_hold_every_connection() {
    let mut config = ManagerConfig::default();
    config.store.api_service.connection_timeout = 1;
    let (_nsx, addr) = listening(config, 4).await;
    // Four idle connections fill this address's share; the fifth is closed on accept.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    assert_eq!(status_of(&mut fifth).await, None, "over the cap: closed");
    // Another client address is served meanwhile.
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = sock.connect(addr).await.unwrap();
    let auth = common::basic("admin", "admin");
    other
        .write_all(
            format!(
                "GET /api/v1/logical-switches HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let status = status_of(&mut other).await.expect("an answer");
    assert!(status.contains(" 200 "), "{status}");
    // A request whose headers stop half way, and one whose body never comes, are cut off
    // after connection_timeout; the idle ones too, which frees the address's share.
    idle[0]
        .write_all(b"GET /api/v1/logical-switches HTTP/1.1\r\nhost:")
        .await
        .unwrap();
    idle[1]
        .write_all(
            format!("PUT /api/v1/logical-switches/x HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-length: 100\r\n\r\n{{").as_bytes(),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for (i, s) in idle.iter_mut().enumerate() {
        let status = status_of(s).await;
        if i == 1 {
            let status = status.expect("the half-sent body is answered");
            assert!(status.contains(" 408 "), "{status}");
        } else {
            assert_eq!(status, None, "connection {i} is closed");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after about connection_timeout (1 s), took {:?}",
        started.elapsed()
    );
    let mut again = TcpStream::connect(addr).await.unwrap();
    again
        .write_all(
            format!(
                "GET /api/v1/logical-switches HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let status = status_of(&mut again).await.expect("served again");
    assert!(status.contains(" 200 "), "{status}");
}
