//! Fixtures shared by the benchmarks: stores filled to a given size the way NCP fills them,
//! and clusters of services for the proxy.

use fake_nsx_manager::dispatch::{ApiRequest, ApiResponse};
use fake_nsx_manager::{FakeNsxManager, ManagerConfig};
use serde_json::{Value, json};

/// A fake manager holding `ports` container ports (allocate_addresses Both, tagged like NCP's)
/// spread over switches of 1,000 ports, and the id of the last switch.
pub fn manager_with_ports(ports: usize) -> (FakeNsxManager, String) {
    let mut config = ManagerConfig::default();
    config.store.api_service.client_api_rate_limit = 0;
    let nsx = FakeNsxManager::new(config);
    let tz = nsx.bootstrap().expect("bootstrap").transport_zone;
    let pool = created(&post(
        &nsx,
        "/api/v1/pools/ip-pools",
        &json!({
            "subnets": [{"cidr": "10.0.0.0/8", "gateway_ip": "10.0.0.1", "allocation_ranges": [{"start": "10.0.0.2", "end": "10.255.255.254"}]}]
        }),
    ));
    let mut switch = String::new();
    for i in 0..ports {
        if i % 1000 == 0 {
            switch = created(&post(
                &nsx,
                "/api/v1/logical-switches",
                &json!({
                    "transport_zone_id": tz, "admin_state": "UP", "ip_pool_id": pool,
                    "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}, {"scope": "ncp/project", "tag": format!("ns-{}", i / 1000)}]
                }),
            ));
        }
        created(&post(&nsx, "/api/v1/logical-ports", &port_body(&switch, i)));
    }
    (nsx, switch)
}

/// An NCP-style container port body for pod number `i`.
pub fn port_body(switch: &str, i: usize) -> Value {
    json!({
        "logical_switch_id": switch, "admin_state": "UP", "display_name": format!("pod-{i}"),
        "attachment": {"attachment_type": "VIF", "id": format!("cif-{i}"),
            "context": {"resource_type": "VifAttachmentContext", "vif_type": "CHILD", "parent_vif_id": "vif-node-1",
                "traffic_tag": (i % 4000) + 1, "app_id": format!("ns/pod-{i}"), "allocate_addresses": "Both"}},
        "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}, {"scope": "ncp/project", "tag": format!("ns-{}", i / 1000)},
                 {"scope": "ncp/pod", "tag": format!("pod-{i}")}, {"scope": "app", "tag": "web"}]
    })
}

pub fn post(nsx: &FakeNsxManager, path: &str, body: &Value) -> ApiResponse {
    let bytes = serde_json::to_vec(body).expect("json");
    nsx.call_as_admin(ApiRequest {
        method: "POST",
        path,
        query: &[],
        body: &bytes,
    })
}

/// The id of a created object; panics with the answer otherwise (a broken fixture).
pub fn created(r: &ApiResponse) -> String {
    match (
        &r.status,
        r.body
            .as_ref()
            .and_then(|b| b.get("id"))
            .and_then(Value::as_str),
    ) {
        (201, Some(id)) => id.to_string(),
        _ => panic!("fixture request failed: {} {:?}", r.status, r.body),
    }
}

/// A cluster of `pods` pods, 10 per namespace, over three nodes.
pub fn cluster_view(pods: usize) -> nsx_core::k8s::ClusterView {
    use nsx_core::k8s::fixture;
    let mut v = nsx_core::k8s::ClusterView::default();
    for n in 0..pods.div_ceil(10) {
        v.add_namespace(fixture::namespace(
            &format!("ns-{n}"),
            &format!("uid-ns-{n}"),
        ));
    }
    for i in 0..pods {
        let n = i / 10;
        v.add_pod(fixture::pod(
            &format!("ns-{n}"),
            &format!("pod-{i}"),
            &format!("uid-pod-{i}"),
            &format!("node-{}", i % 3 + 1),
            &[("app", "web"), ("tier", "front")],
        ));
    }
    v
}

/// Infra ids for the pure NCP benchmarks.
pub fn infra() -> nsx_core::ncp::infra::Infra {
    nsx_core::ncp::infra::Infra {
        transport_zone: "tz".into(),
        tier0: "t0".into(),
        ip_block: "block".into(),
        snat_pool: Some("snat".into()),
        lb_pool: Some("lb".into()),
        lb_tcp_profile: Some("tcp".into()),
        lb_udp_profile: Some("udp".into()),
        edge_cluster: Some("edges".into()),
        node_vifs: (1..=3)
            .map(|i| (format!("node-{i}"), format!("vif-{i}")))
            .collect(),
    }
}

/// What NSX holds once `view` is realized: every created object as the manager would return it,
/// built by playing the creation plan against an in-memory id and subnet allocator.
pub fn converged_observation(
    view: &nsx_core::k8s::ClusterView,
    infra: &nsx_core::ncp::infra::Infra,
) -> nsx_core::ncp::observe::Observed {
    use std::collections::BTreeMap;

    use nsx_core::ncp::desired::desired;
    use nsx_core::ncp::observe::Observed;
    use nsx_core::ncp::plan::{Op, plan};
    use nsx_core::ncp::render::render;
    use nsx_core::ncp::vocab::Key;

    let want = desired(view, "k8s-a", 24);
    let creation = plan(&want, &Observed::default(), infra);
    let mut resolved: BTreeMap<Key, Value> = BTreeMap::new();
    let mut allocations = std::collections::BTreeSet::new();
    let mut subnets = 0u32;
    for (n, op) in creation.ops.iter().enumerate() {
        let Op::Create { key, spec } = op else {
            panic!("a creation plan only creates: {op:?}")
        };
        let snat_ip =
            matches!(key, Key::Snat(_)).then(|| format!("192.0.{}.{}", n / 250, n % 250 + 1));
        let mut doc = render(key, spec, infra, &resolved, snat_ip.as_deref())
            .expect("dependencies come first");
        doc["id"] = json!(format!("id-{n}"));
        doc["_create_time"] = json!(n);
        doc["_revision"] = json!(0);
        if let Key::Subnet(_) = key {
            doc["cidr"] = json!(format!("10.{}.{}.0/24", 4 + subnets / 256, subnets % 256));
            subnets += 1;
        }
        if let Key::T0Link(_) = key {
            doc["linked_logical_router_port_id"] = json!("set-by-nsx");
        }
        if let Some(ip) = snat_ip {
            allocations.insert(ip);
        }
        resolved.insert(key.clone(), doc);
    }
    let mut observed = Observed::from_docs(resolved.into_values(), "k8s-a");
    observed.snat_allocations = allocations;
    observed
}

/// A cluster of `services` service ports with 10 endpoints each, as the proxy benchmarks
/// take it (distinct cluster IPs and endpoint addresses, 100 namespaces).
pub fn proxy_cluster(
    services: usize,
) -> std::collections::BTreeMap<nsx_core::proxy::ServicePortKey, nsx_core::proxy::ServicePort> {
    use nsx_core::proxy::{Endpoint, ServicePort, ServicePortKey};
    (0..services)
        .map(|i| {
            let key = ServicePortKey {
                namespace: format!("ns-{}", i % 100).into(),
                name: format!("svc-{i}").into(),
                port: "http".into(),
            };
            let endpoints = (0..10u32)
                .map(|e| Endpoint {
                    ip: 0x0a01_0000 + (i as u32) * 10 + e,
                    port: 8080,
                })
                .collect();
            let sp = ServicePort {
                key: key.clone(),
                cluster_ip: 0x0a60_0000 + i as u32,
                port: 80,
                protocol: 6,
                node_port: None,
                no_local_endpoints: false,
                scope: Default::default(),
                affinity_timeout: None,
                endpoints,
            };
            (key, sp)
        })
        .collect()
}

/// The Kubernetes objects behind [`proxy_cluster`]: a Service (one port, `http`) and one
/// EndpointSlice of 10 ready endpoints per service.
pub fn proxy_objects(
    services: usize,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint, EndpointConditions, EndpointPort, EndpointSlice,
    };
    let ip = |n: u32| std::net::Ipv4Addr::from(n).to_string();
    (0..services)
        .map(|i| {
            let ns = format!("ns-{}", i % 100);
            let name = format!("svc-{i}");
            let mut svc = Service::default();
            svc.metadata.namespace = Some(ns.clone());
            svc.metadata.name = Some(name.clone());
            svc.spec = Some(ServiceSpec {
                cluster_ip: Some(ip(0x0a60_0000 + i as u32)),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            let mut slice = EndpointSlice {
                address_type: "IPv4".into(),
                endpoints: (0..10u32)
                    .map(|e| Endpoint {
                        addresses: vec![ip(0x0a01_0000 + (i as u32) * 10 + e)],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ports: Some(vec![EndpointPort {
                    name: Some("http".into()),
                    port: Some(8080),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            };
            slice.metadata.namespace = Some(ns);
            slice.metadata.name = Some(format!("{name}-1"));
            slice.metadata.labels = Some([("kubernetes.io/service-name".to_string(), name)].into());
            (svc, slice)
        })
        .unzip()
}
