//! nsx-kube-proxy's loop: watches Services and EndpointSlices, and after each burst of changes
//! recompiles the services the events named ([`ProxyView`]) and syncs exactly the service ports
//! whose compiled form changed (one bundle): a change costs its service's size. An OVS restart,
//! signalled by whoever watches ovs-vswitchd, makes the next sync replay everything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use tokio::sync::{Mutex, Notify};

use super::{Proxy, ProxyEvents, ProxyView, ServicePort, ServicePortKey, SyncReport};
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
    // What the watch events named since the last sync: the view recompiles those services only.
    let events: Arc<std::sync::Mutex<ProxyEvents>> = Arc::default();
    let (services, h1) = {
        let events = events.clone();
        crate::k8s::watch::watch(
            Api::<Service>::all(kube.clone()),
            signals.changed.clone(),
            None,
            move |e| lock(&events).service(e),
        )
    };
    let (slices, h2) = {
        let events = events.clone();
        crate::k8s::watch::watch(
            Api::<EndpointSlice>::all(kube),
            signals.changed.clone(),
            None,
            move |e| lock(&events).slice(e),
        )
    };
    let _abort = AbortOnDrop(vec![h1, h2]);
    let _ = services.wait_until_ready().await;
    let _ = slices.wait_until_ready().await;
    let mut view = ProxyView::new(&node);
    // Whether the bridge holds the view as this proxy last synced it (`false` until the first
    // full sync and after a restart), and the ports changed since the last successful sync.
    let mut installed = false;
    let mut pending: BTreeSet<ServicePortKey> = BTreeSet::new();
    loop {
        let named = std::mem::take(&mut *lock(&events));
        pending.extend(view.refresh(&services, &slices, named));
        if signals.bridge_restarted.swap(false, Ordering::SeqCst) {
            proxy.bridge_restarted();
            installed = false;
        }
        let result = {
            let mut b = bridge.lock().await;
            if !installed {
                proxy.full_sync(&mut *b, view.want())
            } else if pending.is_empty() {
                Ok(SyncReport::default())
            } else {
                proxy.sync(&mut *b, view.want(), &pending)
            }
        };
        match result {
            Ok(report) => {
                on_sync(Synced {
                    want: view.want(),
                    report: &report,
                });
                installed = true;
                pending.clear();
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

fn lock(events: &std::sync::Mutex<ProxyEvents>) -> std::sync::MutexGuard<'_, ProxyEvents> {
    events.lock().unwrap_or_else(|p| p.into_inner())
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
