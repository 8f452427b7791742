//! The Kubernetes client of the binaries: a kubeconfig when one is given, otherwise the
//! in-cluster service account (or `KUBECONFIG` / `~/.kube/config`, as kubectl finds them).

use std::path::Path;

/// Why no client could be built, naming the file or the missing setting.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("failed to read kubeconfig {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("failed to use kubeconfig {path}: {source}")]
    Use {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "failed to find the Kubernetes API: no --kubeconfig, no in-cluster service account \
         and no KUBECONFIG ({0})"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("failed to build the Kubernetes client: {0}")]
    Build(#[source] kube::Error),
}

/// The config for `kubeconfig`, or inferred as kubectl and in-cluster clients do.
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config, KubeClientError> {
    match kubeconfig {
        Some(path) => {
            let shown = path.display().to_string();
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeClientError::Read {
                    path: shown.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|source| KubeClientError::Use {
                    path: shown,
                    source,
                })
        }
        None => kube::Config::infer().await.map_err(KubeClientError::Infer),
    }
}

/// A client for `kubeconfig` (see [`config`]).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeClientError> {
    kube::Client::try_from(config(kubeconfig).await?).map_err(KubeClientError::Build)
}
