//! The agent's [`PodSource`] over the Kubernetes API: a GET of the pod (the annotation is
//! read only while an ADD waits, so a watch of every pod on the node is not worth keeping).

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use super::server::PodSource;
use crate::k8s::annotation;

pub struct KubePods(pub kube::Client);

impl PodSource for KubePods {
    async fn annotation(&self, namespace: &str, name: &str) -> Option<String> {
        let api: Api<Pod> = Api::namespaced(self.0.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(p)) => p
                .metadata
                .annotations
                .and_then(|a| a.get(annotation::POD_NETWORK).cloned()),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, namespace, name, "reading the pod failed; will retry");
                None
            }
        }
    }
}
