//! The fake kube-apiserver's patch bodies: any JSON merge patch of a Pod is applied or
//! refused with a message, never a panic; what is stored afterwards is still a Pod with its
//! name and namespace.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nsx_sim::apiserver::ApiServer;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(patch) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let api = ApiServer::new(1, || 1_767_225_600_000);
    let _ =
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}))
        .expect("a valid pod");
    let _ = api.patch("pods", "shop", "web", &patch);
    let pod = api
        .get("pods", "shop", "web")
        .expect("the pod is still there");
    assert_eq!(pod["kind"], "Pod", "{pod}");
    assert_eq!(pod["metadata"]["name"], "web", "{pod}");
    assert_eq!(pod["metadata"]["namespace"], "shop", "{pod}");
});
