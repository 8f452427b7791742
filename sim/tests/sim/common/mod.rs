//! NCP against the fake NSX manager over loopback TCP.
#![allow(dead_code)]

use std::collections::BTreeMap;

use fake_nsx_manager::bootstrap::{BootstrapConfig, ClusterSetup};
use fake_nsx_manager::{FakeNsxManager, ManagerConfig};
use hyper_util::client::legacy::connect::HttpConnector;
use nsx_core::k8s::{ClusterView, fixture};
use nsx_core::ncp::config::NcpConfig;
use nsx_core::ncp::infra::{Infra, discover};
use nsx_core::ncp::observe::{Observed, observe};
use nsx_core::ncp::reconcile::{Outcome, ReconcileError, reconcile_once};
use nsx_core::nsx::{Auth, ClientConfig, NsxClient};
use serde_json::Value;

pub type Client = NsxClient<HttpConnector>;

pub struct World {
    pub nsx: FakeNsxManager,
    pub url: String,
}

impl World {
    pub async fn new(clusters: &[&str]) -> Self {
        let setups = clusters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut s = ClusterSetup::new(c, 3);
                s.container_block = format!("10.{}.0.0/14", 4 * (i + 1));
                s.snat_pool = format!("100.64.{}.0/22", 4 * i);
                s.lb_pool = format!("198.51.{}.0/24", 100 + i);
                s.node_cidr = format!("172.16.{i}.0/24");
                s
            })
            .collect();
        let mut config = ManagerConfig {
            bootstrap: Some(BootstrapConfig { clusters: setups }),
            ..Default::default()
        };
        config.store.api_service.client_api_rate_limit = 0;
        let nsx = FakeNsxManager::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = nsx.router();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { nsx, url }
    }

    /// A fresh NCP process: a new client (no session, no memory).
    pub fn client(&self) -> Client {
        let mut cfg = ClientConfig::new(
            &self.url,
            Auth::Basic {
                user: "admin".into(),
                password: "admin".into(),
            },
        );
        cfg.rate_limit_per_second = 0;
        cfg.backoff_base_ms = 1;
        cfg.backoff_max_ms = 5;
        NsxClient::new(HttpConnector::new(), cfg)
    }

    pub fn ncp_config(&self, cluster: &str) -> NcpConfig {
        let boot = self.nsx.bootstrap().unwrap();
        let mut c = NcpConfig::for_cluster(cluster);
        c.external_ip_pools = vec![boot.clusters[cluster].snat_pool.clone()];
        c.external_ip_pools_lb = vec![boot.clusters[cluster].lb_pool.clone()];
        c
    }

    pub async fn infra(&self, cluster: &str) -> Infra {
        discover(&self.client(), &self.ncp_config(cluster))
            .await
            .unwrap()
    }

    pub async fn reconcile(
        &self,
        cluster: &str,
        view: &ClusterView,
        budget: Option<usize>,
    ) -> Result<Outcome, ReconcileError> {
        let client = self.client();
        let infra = self.infra(cluster).await;
        reconcile_once(
            &client,
            cluster,
            24,
            &infra,
            view,
            &nsx_core::ncp::reconcile::WriteGate::budget(budget),
        )
        .await
    }

    /// A pass of a running NCP: plans against `cache` when it holds the previous pass's result.
    pub async fn reconcile_cached(
        &self,
        cluster: &str,
        infra: &Infra,
        view: &ClusterView,
        cache: &mut Option<nsx_core::ncp::observe::Cache>,
    ) -> Result<Outcome, ReconcileError> {
        let client = self.client();
        nsx_core::ncp::reconcile::reconcile_cached(
            &client,
            cluster,
            24,
            infra,
            view,
            &nsx_core::ncp::reconcile::WriteGate::default(),
            cache,
        )
        .await
    }

    pub async fn observe(&self, cluster: &str) -> Observed {
        observe(&self.client(), cluster, &self.infra(cluster).await)
            .await
            .unwrap()
    }

    pub fn invariants(&self) {
        self.nsx
            .inspect(|s| s.check_invariants())
            .unwrap_or_else(|e| panic!("fake NSX invariant: {e}"));
    }

    /// Every document of the store, by id.
    pub fn docs(&self) -> BTreeMap<String, Value> {
        self.nsx.inspect(|s| {
            s.objects()
                .map(|o| (o.id.to_string(), Value::Object(o.doc.clone())))
                .collect()
        })
    }

    pub fn allocations(&self, pool: &str) -> Vec<String> {
        let r = self.nsx.as_admin(
            "GET",
            &format!("/api/v1/pools/ip-pools/{pool}/allocations"),
            &[],
            None,
        );
        r.body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["allocation_id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// `namespaces` namespaces `ns-i` with `pods` pods each, spread over node-1..node-3.
pub fn view(namespaces: usize, pods: usize) -> ClusterView {
    view_with_uids("", namespaces, pods)
}

/// The same, with UIDs prefixed (UIDs are unique across clusters, as real ones are).
pub fn view_with_uids(prefix: &str, namespaces: usize, pods: usize) -> ClusterView {
    let mut v = ClusterView::default();
    for n in 0..namespaces {
        v.add_namespace(fixture::namespace(
            &format!("ns-{n}"),
            &format!("{prefix}uid-ns-{n}"),
        ));
        for p in 0..pods {
            let node = format!("node-{}", (n * pods + p) % 3 + 1);
            v.add_pod(fixture::pod(
                &format!("ns-{n}"),
                &format!("pod-{p}"),
                &format!("{prefix}uid-{n}-{p}"),
                &node,
                &[("app", "web")],
            ));
        }
    }
    v
}

/// Someone else takes every free address of `pool` (as an admin would): what NCP asks for
/// next is refused with NSX's pool-exhausted error. Returns the addresses taken.
pub fn take_every_address(nsx: &FakeNsxManager, pool: &str) -> Vec<String> {
    let mut taken = Vec::new();
    loop {
        let r = nsx.as_admin(
            "POST",
            &format!("/api/v1/pools/ip-pools/{pool}"),
            &[("action", "ALLOCATE")],
            Some(&Value::Object(Default::default())),
        );
        match r.body["allocation_id"].as_str() {
            Some(ip) if r.status == 200 => taken.push(ip.to_string()),
            _ => return taken,
        }
    }
}

/// Gives an address taken by [`take_every_address`] back to `pool`.
pub fn give_back(nsx: &FakeNsxManager, pool: &str, ip: &str) {
    let r = nsx.as_admin(
        "POST",
        &format!("/api/v1/pools/ip-pools/{pool}"),
        &[("action", "RELEASE")],
        Some(&serde_json::json!({ "allocation_id": ip })),
    );
    assert_eq!(r.status, 200, "release {ip}: {:?}", r.body);
}
