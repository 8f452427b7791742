//! A small HTTP client over the fake's axum router (no sockets), for the integration tests.
#![allow(dead_code)]

use axum::Router;
use base64::Engine;
use fake_nsx_manager::{FakeNsxManager, ManagerConfig};
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub headers: HeaderMap,
}

impl Answer {
    pub fn id(&self) -> String {
        self.body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {}", self.body))
            .to_string()
    }
    pub fn code(&self) -> Option<i64> {
        match &self.body["error_code"] {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status, status,
            "unexpected status, body: {}",
            self.body
        );
        self
    }
}

pub struct Client {
    pub nsx: FakeNsxManager,
    app: Router,
    pub auth: Option<String>,
    pub extra: Vec<(String, String)>,
}

pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

impl Client {
    pub fn new() -> Self {
        Self::with(ManagerConfig::default())
    }

    pub fn with(config: ManagerConfig) -> Self {
        let nsx = FakeNsxManager::new(config);
        Self::on(nsx)
    }

    pub fn on(nsx: FakeNsxManager) -> Self {
        let app = nsx.router();
        Self {
            nsx,
            app,
            auth: Some(basic("admin", "admin")),
            extra: Vec::new(),
        }
    }

    pub fn as_user(&self, user: &str, password: &str) -> Self {
        Self {
            nsx: self.nsx.clone(),
            app: self.app.clone(),
            auth: Some(basic(user, password)),
            extra: Vec::new(),
        }
    }

    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(a) = &self.auth {
            b = b.header("authorization", a);
        }
        for (k, v) in &self.extra {
            b = b.header(k.as_str(), v.as_str());
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(b.body(axum::body::Body::from(body.to_vec())).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Answer {
            status,
            body,
            headers,
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let bytes = body
            .map(|b| serde_json::to_vec(&b).unwrap())
            .unwrap_or_default();
        let p = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/api/v1/{path}")
        };
        self.raw(method, &p, &bytes, &[("content-type", "application/json")])
            .await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Answer {
        self.call("PUT", path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Answer {
        self.call("DELETE", path, None).await
    }

    /// The id of the default LB application profile of `resource_type` (`LbFastTcpProfile`...).
    pub async fn app_profile(&self, resource_type: &str) -> String {
        self.get("loadbalancer/application-profiles")
            .await
            .expect(200)
            .body["results"]
            .as_array()
            .expect("a list")
            .iter()
            .find(|p| p["resource_type"] == resource_type)
            .and_then(|p| p["id"].as_str())
            .unwrap_or_else(|| panic!("no default {resource_type}"))
            .to_string()
    }

    /// Logs in as admin with a session: `(cookie, xsrf token)`.
    pub async fn session(&self) -> (String, String) {
        let login = self
            .raw(
                "POST",
                "/api/session/create",
                b"j_username=admin&j_password=admin",
                &[],
            )
            .await
            .expect(200);
        let cookie = login.headers["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let xsrf = login.headers["x-xsrf-token"].to_str().unwrap().to_string();
        (cookie, xsrf)
    }

    pub fn boot(&self) -> fake_nsx_manager::Bootstrap {
        self.nsx.bootstrap().expect("bootstrapped")
    }

    pub fn invariants(&self) {
        self.nsx
            .with_store(|s| s.check_invariants())
            .unwrap_or_else(|e| panic!("store invariant broken: {e}"));
    }

    /// A T1 router, switch with a pool, the usual namespace plumbing; returns (switch, pool).
    pub async fn switch_with_pool(&self, cidr: &str) -> (String, String) {
        let net: Vec<&str> = cidr.split('/').collect();
        let base: Vec<u32> = net[0].split('.').map(|x| x.parse().unwrap()).collect();
        let gw = format!("{}.{}.{}.{}", base[0], base[1], base[2], base[3] + 1);
        let start = format!("{}.{}.{}.{}", base[0], base[1], base[2], base[3] + 2);
        let end = format!("{}.{}.{}.{}", base[0], base[1], base[2], base[3] + 6);
        let pool = self
            .post("pools/ip-pools", serde_json::json!({"display_name": "p", "subnets": [{"cidr": cidr, "gateway_ip": gw, "allocation_ranges": [{"start": start, "end": end}]}]}))
            .await
            .expect(201)
            .id();
        let tz = self.boot().transport_zone;
        let ls = self
            .post("logical-switches", serde_json::json!({"transport_zone_id": tz, "admin_state": "UP", "ip_pool_id": pool}))
            .await
            .expect(201)
            .id();
        (ls, pool)
    }
}

/// Starts the standalone binary on a free port with `args`; the child and its `host:port`.
pub fn start_binary(args: &[&std::ffi::OsStr]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fake-nsx-manager"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on http"), "{line}");
    let addr = line.trim().rsplit("://").next().unwrap().to_string();
    (child, addr)
}
