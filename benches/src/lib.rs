//! Fixtures shared by the benchmarks: stores filled to a given size the way NCP fills them.

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
