//! The agent's [`PodSource`]s over the Kubernetes API.
//!
//! A CNI ADD waits until NCP has annotated its pod. When a node starts many pods at once (a
//! rollout, a node drained onto this one) hundreds of ADDs wait together; asking the apiserver
//! for each of them every poll would cost a GET per waiting pod per poll. [`WatchedPods`] keeps
//! a watch of this node's pods instead (as kubelet does), so a poll is a lookup; only a pod the
//! watch has not shown yet (just created) is read with a GET.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tokio::sync::Notify;

use super::server::PodSource;
use crate::k8s::annotation;

fn network_of(p: &Pod) -> Option<String> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation::POD_NETWORK).cloned())
}

/// The pod as the apiserver has it now (`None` when gone or unreadable; the caller polls again).
async fn read(client: &kube::Client, namespace: &str, name: &str) -> Option<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, namespace, name, "reading the pod failed; will retry");
            None
        }
    }
}

/// A GET of the pod for every poll.
pub struct KubePods(pub kube::Client);

impl PodSource for KubePods {
    async fn annotation(&self, namespace: &str, name: &str) -> Option<String> {
        read(&self.0, namespace, name)
            .await
            .as_ref()
            .and_then(network_of)
    }
}

/// The pods scheduled to one node, from a watch (`fieldSelector=spec.nodeName=NODE`).
pub struct WatchedPods {
    client: kube::Client,
    node: String,
    store: Store<Pod>,
    task: tokio::task::JoinHandle<()>,
}

impl WatchedPods {
    /// Starts the watch (on the current runtime); it ends when this is dropped.
    pub fn start(client: kube::Client, node: &str) -> Self {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (store, task) = crate::k8s::watch::watch_with(
            Api::<Pod>::all(client.clone()),
            config,
            Arc::new(Notify::new()),
            None,
            |_| {},
        );
        Self {
            client,
            node: node.to_string(),
            store,
            task,
        }
    }
}

impl Drop for WatchedPods {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodSource for WatchedPods {
    async fn annotation(&self, namespace: &str, name: &str) -> Option<String> {
        match self.store.get(&ObjectRef::new(name).within(namespace)) {
            // The watch holds the pod: its annotation arrives with the watch event NCP's
            // patch causes.
            Some(p) => network_of(&p),
            // Not shown yet (the pod is newer than the watch's last event, or the watch is
            // still listing): ask, and take the answer only for a pod scheduled here. A pod
            // deleted while its ADD waited may have come back under its name on another node;
            // that pod's network (its VLAN under the other node's VIF) must not be wired here.
            None => read(&self.client, namespace, name)
                .await
                .filter(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.node.as_str())
                })
                .as_ref()
                .and_then(network_of),
        }
    }
}
