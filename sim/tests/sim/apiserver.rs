//! kube-rs, unchanged, against the fake kube-apiserver on turmoil: CRUD with the API's status
//! codes, merge patches, optimistic concurrency, and the watcher's list/watch/relist cycle
//! through dropped watches, expired history and duplicated events.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use nsx_sim::apiserver::ApiServer;
use nsx_sim::net::{kube_client, serve};
use serde_json::json;

const EPOCH_MS: i64 = 1_767_225_600_000;

fn sim_with_apiserver(seed: u64) -> (turmoil::Sim<'static>, ApiServer) {
    let api = ApiServer::new(seed, || {
        EPOCH_MS + turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as i64)
    });
    let mut sim = turmoil::Builder::new()
        .epoch(std::time::UNIX_EPOCH + Duration::from_millis(EPOCH_MS as u64))
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(600))
        .build();
    let a = api.clone();
    sim.host("apiserver", move || {
        let a = a.clone();
        async move { serve(6443, a.router()).await }
    });
    (sim, api)
}

fn ns(name: &str) -> Namespace {
    serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .unwrap()
}

#[test]
fn crud_patch_conflicts_and_errors_behave_like_the_apiserver() {
    let (mut sim, api) = sim_with_apiserver(1);
    sim.client("ncp", async move {
        let client = kube_client("http://apiserver:6443")?;
        let nss: Api<Namespace> = Api::all(client.clone());
        let created = nss.create(&PostParams::default(), &ns("shop")).await?;
        assert!(created.metadata.uid.is_some());
        assert!(created.metadata.resource_version.is_some());
        assert!(created.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default().starts_with("2026-01-01"));
        let again = nss.create(&PostParams::default(), &ns("shop")).await.unwrap_err();
        assert!(matches!(&again, kube::Error::Api(s) if s.code == 409), "{again:?}");
        let missing = nss.get("nope").await.unwrap_err();
        assert!(matches!(&missing, kube::Error::Api(s) if s.code == 404), "{missing:?}");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
        let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}))?;
        pods.create(&PostParams::default(), &pod).await?;
        let elsewhere: Api<Pod> = Api::namespaced(client.clone(), "ghost");
        let e = elsewhere.create(&PostParams::default(), &pod).await.unwrap_err();
        assert!(matches!(&e, kube::Error::Api(s) if s.code == 404), "{e:?}");
        let patched = pods
            .patch("web-1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"ncp/network": "{\"ip\":\"10.4.0.2\"}"}}})))
            .await?;
        assert_eq!(patched.metadata.annotations.unwrap()["ncp/network"], "{\"ip\":\"10.4.0.2\"}");
        let status = pods.patch_status("web-1", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "10.4.0.2"}}))).await?;
        assert_eq!(status.status.unwrap().pod_ip.as_deref(), Some("10.4.0.2"));
        let by_label = pods.list(&ListParams::default().labels("app=web")).await?;
        assert_eq!(by_label.items.len(), 1);
        assert!(pods.list(&ListParams::default().labels("app=db")).await?.items.is_empty());
        let on_node: Api<Pod> = Api::all(client.clone());
        assert_eq!(on_node.list(&ListParams::default().fields("spec.nodeName=node-1")).await?.items.len(), 1);
        // Leases: optimistic concurrency on replace.
        let leases: Api<Lease> = Api::namespaced(client.clone(), "shop");
        let lease: Lease = serde_json::from_value(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "ncp"}, "spec": {"holderIdentity": "ncp-0"}}))?;
        let l = leases.create(&PostParams::default(), &lease).await?;
        let mut mine = l.clone();
        mine.spec.as_mut().unwrap().holder_identity = Some("ncp-1".into());
        leases.replace("ncp", &PostParams::default(), &mine).await?;
        let stale = leases.replace("ncp", &PostParams::default(), &l).await.unwrap_err();
        assert!(matches!(&stale, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "{stale:?}");
        // Deleting the namespace takes its pods with it.
        nss.delete("shop", &Default::default()).await?;
        assert!(Api::<Pod>::all(client).list(&ListParams::default()).await?.items.is_empty());
        Ok(())
    });
    sim.run().unwrap();
    assert!(api.list("leases").is_empty());
}

/// What the watcher emitted, as short strings.
type Seen = Rc<RefCell<Vec<String>>>;

fn watch_namespaces(client: kube::Client, seen: Seen) {
    tokio::task::spawn_local(async move {
        let nss: Api<Namespace> = Api::all(client);
        let mut stream = watcher::watcher(nss, watcher::Config::default()).boxed_local();
        while let Some(e) = stream.next().await {
            let s = match e {
                Ok(Event::Init) => "init".to_string(),
                Ok(Event::InitApply(n)) => {
                    format!("init-apply {}", n.metadata.name.unwrap_or_default())
                }
                Ok(Event::InitDone) => "init-done".to_string(),
                Ok(Event::Apply(n)) => format!("apply {}", n.metadata.name.unwrap_or_default()),
                Ok(Event::Delete(n)) => format!("delete {}", n.metadata.name.unwrap_or_default()),
                Err(e) => format!(
                    "error {}",
                    if e.to_string().contains("410")
                        || e.to_string().to_lowercase().contains("expired")
                    {
                        "410"
                    } else {
                        "other"
                    }
                ),
            };
            seen.borrow_mut().push(s);
        }
    });
}

#[test]
fn the_watcher_lists_watches_and_relists_after_410() {
    let (mut sim, api) = sim_with_apiserver(2);
    let seen: Seen = Rc::default();
    let (s, a) = (seen.clone(), api.clone());
    sim.client("ncp", async move {
        a.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}))
            .unwrap();
        let client = kube_client("http://apiserver:6443")?;
        watch_namespaces(client, s.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        a.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}}))
            .unwrap();
        a.patch(
            "namespaces",
            "",
            "b",
            &json!({"metadata": {"labels": {"team": "x"}}}),
        )
        .unwrap();
        a.delete("namespaces", "", "a").unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A dropped connection: the watcher re-watches from its version, no relist, no loss.
        a.drop_watches();
        tokio::time::sleep(Duration::from_millis(10)).await;
        a.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}}))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before_expiry = s.borrow().len();
        // History compacted: the next watch gets 410 and the watcher relists.
        a.expire_history();
        a.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "d"}}))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after: Vec<String> = s.borrow()[before_expiry..].to_vec();
        assert!(
            after.iter().any(|e| e == "init-done"),
            "no relist after 410: {after:?}"
        );
        assert!(after.iter().any(|e| e == "init-apply d"), "{after:?}");
        // Duplicated events arrive twice.
        a.duplicate_next_events(1);
        a.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "e"}}))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    });
    sim.run().unwrap();
    let seen = seen.borrow().clone();
    let start: Vec<&str> = seen.iter().take(5).map(String::as_str).collect();
    assert_eq!(
        start,
        ["init", "init-apply a", "init-done", "apply b", "apply b"],
        "{seen:?}"
    );
    assert!(seen.contains(&"delete a".to_string()), "{seen:?}");
    let c_applies = seen.iter().filter(|e| *e == "apply c").count();
    assert_eq!(
        c_applies, 1,
        "the change after the drop arrives once: {seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|e| *e == "apply e").count(),
        2,
        "{seen:?}"
    );
    assert!(seen.iter().any(|e| e == "error 410"), "{seen:?}");
    let inits = seen.iter().filter(|e| *e == "init").count();
    assert_eq!(
        inits, 2,
        "one list at start, one relist after 410: {seen:?}"
    );
}
