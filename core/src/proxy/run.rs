//! nsx-kube-proxy's loop: watches Services and EndpointSlices, and after each burst of changes
//! syncs exactly the service ports whose compiled form changed (one bundle). An OVS restart,
//! signalled by whoever watches ovs-vswitchd, makes the next sync replay everything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::Store;
use tokio::sync::{Mutex, Notify};

use super::{Proxy, ServicePort, ServicePortKey, SyncReport, all_service_ports};
use crate::ovs::bridge::OpenFlowBridge;

/// How the loop is told about the world outside the watches.
#[derive(Clone, Default)]
pub struct ProxySignals {
    /// Wakes the loop (watch events, a restart).
    pub changed: Arc<Notify>,
    /// Set when ovs-vswitchd restarted (flows and groups gone).
    pub bridge_restarted: Arc<AtomicBool>,
}

/// How the loop paces itself: `debounce` gathers a burst of watch events into one sync; a
/// failed sync is retried after `retry`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub debounce: Duration,
    pub retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(50),
            retry: Duration::from_millis(500),
        }
    }
}

/// What one sync installed, for whoever watches the proxy (metrics, a harness).
pub struct Synced<'a> {
    pub want: &'a BTreeMap<ServicePortKey, ServicePort>,
    pub report: &'a SyncReport,
}

fn view(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    node: &str,
) -> BTreeMap<ServicePortKey, ServicePort> {
    let svcs: Vec<Arc<Service>> = services.state();
    let by_key: BTreeMap<(String, String), EndpointSlice> = slices
        .state()
        .iter()
        .map(|s| {
            (
                (
                    s.metadata.namespace.clone().unwrap_or_default(),
                    s.metadata.name.clone().unwrap_or_default(),
                ),
                (**s).clone(),
            )
        })
        .collect();
    all_service_ports(svcs.iter().map(|s| &**s), &by_key, node)
}

/// Runs until the runtime ends.
pub async fn run<B: OpenFlowBridge>(
    kube: kube::Client,
    mut proxy: Proxy,
    node: String,
    bridge: Arc<Mutex<B>>,
    signals: ProxySignals,
    timing: Timing,
    mut on_sync: impl FnMut(Synced<'_>),
) {
    let (services, h1) = crate::k8s::watch::watch(
        Api::<Service>::all(kube.clone()),
        signals.changed.clone(),
        None,
        |_| {},
    );
    let (slices, h2) = crate::k8s::watch::watch(
        Api::<EndpointSlice>::all(kube),
        signals.changed.clone(),
        None,
        |_| {},
    );
    let _abort = AbortOnDrop(vec![h1, h2]);
    let _ = services.wait_until_ready().await;
    let _ = slices.wait_until_ready().await;
    // What the bridge holds as far as this proxy knows; `None` until the first full sync.
    let mut installed: Option<BTreeMap<ServicePortKey, ServicePort>> = None;
    loop {
        let want = view(&services, &slices, &node);
        if signals.bridge_restarted.swap(false, Ordering::SeqCst) {
            proxy.bridge_restarted();
            installed = None;
        }
        let result = {
            let mut b = bridge.lock().await;
            match &installed {
                None => proxy.full_sync(&mut *b, &want),
                Some(old) => {
                    let changed: BTreeSet<ServicePortKey> = want
                        .iter()
                        .filter(|(k, v)| old.get(*k) != Some(*v))
                        .map(|(k, _)| k.clone())
                        .chain(old.keys().filter(|k| !want.contains_key(*k)).cloned())
                        .collect();
                    if changed.is_empty() {
                        Ok(SyncReport::default())
                    } else {
                        proxy.sync(&mut *b, &want, &changed)
                    }
                }
            }
        };
        match result {
            Ok(report) => {
                on_sync(Synced {
                    want: &want,
                    report: &report,
                });
                installed = Some(want);
                signals.changed.notified().await;
                tokio::time::sleep(timing.debounce).await;
            }
            Err(e) => {
                // A bundle is atomic and the proxy commits its caches only after success:
                // nothing changed, the same changes are tried again.
                tracing::warn!(error = %e, "proxy sync failed; retrying");
                tokio::time::sleep(timing.retry).await;
            }
        }
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
