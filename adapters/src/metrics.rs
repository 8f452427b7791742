//! Prometheus metrics and health endpoints of the binaries (`/metrics`, `/healthz`,
//! `/readyz`): NCP's, fed by the controller's pass events and the NSX client's counters, and
//! the node agent's and nsx-kube-proxy's ([`NodeMetrics`]).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use nsx_core::k8s::watch::WatchProgress;
use nsx_core::ncp::controller::PassEvent;
use nsx_core::ncp::leader::Leadership;
use nsx_core::nsx::client::ClientStats;

/// Counters shared between the controller's callback and the HTTP server.
#[derive(Default)]
pub struct Metrics {
    passes_converged: AtomicU64,
    passes_failed: AtomicU64,
    nsx_writes_planned: AtomicU64,
    annotations: AtomicU64,
    objects_refused: AtomicU64,
    last_pass_ms: AtomicU64,
    last_pass_planned: AtomicU64,
    passes_incremental: AtomicU64,
    /// Converged passes by duration: counts per bucket of [`PASS_BUCKETS_MS`] (cumulative
    /// when rendered), and the sum.
    pass_buckets: [AtomicU64; PASS_BUCKETS_MS.len()],
    pass_ms_sum: AtomicU64,
    leader: AtomicBool,
    /// Ready: a pass converged, or this replica is a standby (HA).
    ready: AtomicBool,
    /// Watch events seen and taken in by passes: the work queue's depth. The controller
    /// shares it through `LoopConfig::progress`.
    pub watch: Arc<WatchProgress>,
}

/// Upper bounds (ms) of the pass duration histogram's buckets.
pub const PASS_BUCKETS_MS: [u64; 9] = [10, 50, 100, 500, 1_000, 5_000, 10_000, 30_000, 60_000];

impl Metrics {
    /// Records one pass.
    pub fn record(&self, e: &PassEvent) {
        match e {
            PassEvent::Converged {
                writes,
                annotations,
                failed,
                took_ms,
                planned,
                incremental,
                ..
            } => {
                let took_ms = *took_ms;
                self.last_pass_planned
                    .store(*planned as u64, Ordering::Relaxed);
                if *incremental {
                    self.passes_incremental.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(i) = PASS_BUCKETS_MS.iter().position(|b| took_ms <= *b) {
                    self.pass_buckets[i].fetch_add(1, Ordering::Relaxed);
                }
                self.pass_ms_sum.fetch_add(took_ms, Ordering::Relaxed);
                self.passes_converged.fetch_add(1, Ordering::Relaxed);
                self.nsx_writes_planned
                    .fetch_add(*writes as u64, Ordering::Relaxed);
                self.annotations
                    .fetch_add(*annotations as u64, Ordering::Relaxed);
                self.objects_refused
                    .store(*failed as u64, Ordering::Relaxed);
                self.last_pass_ms.store(took_ms, Ordering::Relaxed);
                self.ready.store(true, Ordering::Relaxed);
            }
            PassEvent::Failed { .. } => {
                self.passes_failed.fetch_add(1, Ordering::Relaxed);
            }
            PassEvent::Leadership(l) => {
                let leading = matches!(l, Leadership::Acquired);
                self.leader.store(leading, Ordering::Relaxed);
                if !leading {
                    self.ready.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, nsx: &ClientStats) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            family(&mut out, name, kind, help, samples)
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "ncp_reconcile_passes_total",
            "counter",
            "Reconcile passes by result.",
            &[
                (
                    "{result=\"converged\"}".into(),
                    load(&self.passes_converged),
                ),
                ("{result=\"failed\"}".into(), load(&self.passes_failed)),
            ],
        );
        metric(
            "ncp_reconcile_last_pass_milliseconds",
            "gauge",
            "Duration of the last converged pass.",
            &[(String::new(), load(&self.last_pass_ms))],
        );
        metric(
            "ncp_reconcile_last_pass_keys_planned",
            "gauge",
            "NSX objects the last converged pass planned: what changed, or all of them.",
            &[(String::new(), load(&self.last_pass_planned))],
        );
        metric(
            "ncp_reconcile_incremental_passes_total",
            "counter",
            "Converged passes that planned only what changed since the previous one.",
            &[(String::new(), load(&self.passes_incremental))],
        );
        metric(
            "ncp_queue_depth",
            "gauge",
            "Kubernetes watch events not yet taken in by a reconcile pass.",
            &[(String::new(), self.watch.pending())],
        );
        metric(
            "ncp_watch_events_total",
            "counter",
            "Kubernetes watch events received.",
            &[(String::new(), self.watch.seen())],
        );
        metric(
            "ncp_planned_writes_total",
            "counter",
            "NSX writes the passes planned.",
            &[(String::new(), load(&self.nsx_writes_planned))],
        );
        metric(
            "ncp_annotations_written_total",
            "counter",
            "Kubernetes annotations and statuses written.",
            &[(String::new(), load(&self.annotations))],
        );
        metric(
            "ncp_objects_refused",
            "gauge",
            "Objects NSX refused in the last pass (each has a Kubernetes Event).",
            &[(String::new(), load(&self.objects_refused))],
        );
        metric(
            "ncp_is_leader",
            "gauge",
            "1 while this replica holds the lease (or runs alone).",
            &[(
                String::new(),
                u64::from(self.leader.load(Ordering::Relaxed)),
            )],
        );
        let by_status: Vec<(String, u64)> = nsx
            .by_status
            .iter()
            .map(|(s, n)| (format!("{{status=\"{s}\"}}"), *n))
            .collect();
        metric(
            "ncp_nsx_requests_total",
            "counter",
            "NSX Manager API answers by HTTP status.",
            &by_status,
        );
        metric(
            "ncp_nsx_retries_total",
            "counter",
            "NSX requests retried (429, 503, 409/412 re-reads, transport errors).",
            &[(String::new(), nsx.retries)],
        );
        metric(
            "ncp_nsx_transport_errors_total",
            "counter",
            "NSX requests that got no HTTP answer.",
            &[(String::new(), nsx.transport_errors)],
        );
        let mut cumulative = 0;
        let mut buckets: Vec<(String, u64)> = PASS_BUCKETS_MS
            .iter()
            .zip(&self.pass_buckets)
            .map(|(le, n)| {
                cumulative += load(n);
                (
                    format!("_bucket{{le=\"{}\"}}", *le as f64 / 1000.0),
                    cumulative,
                )
            })
            .collect();
        buckets.push(("_bucket{le=\"+Inf\"}".into(), load(&self.passes_converged)));
        buckets.push(("_count".into(), load(&self.passes_converged)));
        family(
            &mut out,
            "ncp_reconcile_pass_duration_seconds",
            "histogram",
            "Duration of converged passes, from reading the cluster to the last write-back.",
            &buckets,
        );
        let _ = writeln!(
            out,
            "ncp_reconcile_pass_duration_seconds_sum {}",
            load(&self.pass_ms_sum) as f64 / 1000.0
        );
        out
    }
}

/// One metric family in the text exposition: HELP, TYPE, then a line per sample (labels
/// already rendered, `{k="v"}` or empty).
pub fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// What a binary exposes: its metrics text, and whether it is ready (with why not).
pub trait Exposition: Send + Sync + 'static {
    fn render(&self) -> String;
    fn ready(&self) -> Result<(), &'static str>;
}

struct NcpExposition {
    metrics: Arc<Metrics>,
    nsx_stats: Arc<dyn Fn() -> ClientStats + Send + Sync>,
}

impl Exposition for NcpExposition {
    fn render(&self) -> String {
        self.metrics.render(&(self.nsx_stats)())
    }
    fn ready(&self) -> Result<(), &'static str> {
        if self.metrics.is_ready() {
            Ok(())
        } else {
            Err("no pass has converged yet")
        }
    }
}

/// NCP's `/metrics`, `/healthz` (the process serves) and `/readyz` (see
/// [`Metrics::is_ready`]).
pub fn router(
    metrics: Arc<Metrics>,
    nsx_stats: Arc<dyn Fn() -> ClientStats + Send + Sync>,
) -> Router {
    exposition_router(Arc::new(NcpExposition { metrics, nsx_stats }))
}

/// `/metrics`, `/healthz` and `/readyz` over any [`Exposition`].
pub fn exposition_router(e: Arc<dyn Exposition>) -> Router {
    let m = e.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let e = e.clone();
                async move {
                    match e.ready() {
                        Ok(()) => (StatusCode::OK, "ready"),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
}

/// The node agent's and nsx-kube-proxy's counters (each process fills its own part).
#[derive(Default)]
pub struct NodeMetrics {
    /// Set by the agent once its socket serves, by the proxy after its first sync.
    pub ready: AtomicBool,
    pub pods_wired: AtomicU64,
    pub ovs_replays: AtomicU64,
    pub proxy_syncs_ok: AtomicU64,
    pub proxy_syncs_failed: AtomicU64,
    pub proxy_ops: AtomicU64,
    pub proxy_service_ports: AtomicU64,
    pub proxy_conntrack_flushed: AtomicU64,
    pub proxy_last_sync_ms: AtomicU64,
    /// Rejected packets answered (TCP RST, ICMP port unreachable), by the packet-in handler.
    pub proxy_rejects: AtomicU64,
}

/// Name, type, help, samples.
type Family = (&'static str, &'static str, &'static str, Vec<(String, u64)>);

impl Exposition for NodeMetrics {
    fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let one = |a: &AtomicU64| vec![(String::new(), load(a))];
        let mut out = String::new();
        let families: [Family; 8] = [
            (
                "nsx_node_pods_wired",
                "gauge",
                "Pods the agent has wired into OVS.",
                one(&self.pods_wired),
            ),
            (
                "nsx_node_ovs_replays_total",
                "counter",
                "Replays after ovs-vswitchd lost this process's flows (a restart).",
                one(&self.ovs_replays),
            ),
            (
                "nsx_kube_proxy_syncs_total",
                "counter",
                "Bundles sent to OVS by result.",
                vec![
                    ("{result=\"ok\"}".into(), load(&self.proxy_syncs_ok)),
                    ("{result=\"failed\"}".into(), load(&self.proxy_syncs_failed)),
                ],
            ),
            (
                "nsx_kube_proxy_sync_ops_total",
                "counter",
                "Flow and group messages in successful bundles.",
                one(&self.proxy_ops),
            ),
            (
                "nsx_kube_proxy_service_ports",
                "gauge",
                "Service ports installed on the bridge.",
                one(&self.proxy_service_ports),
            ),
            (
                "nsx_kube_proxy_conntrack_flushed_total",
                "counter",
                "Conntrack flushes for removed endpoints.",
                one(&self.proxy_conntrack_flushed),
            ),
            (
                "nsx_kube_proxy_rejects_total",
                "counter",
                "Packets to a service port without endpoints answered with a TCP RST or an ICMP port unreachable.",
                one(&self.proxy_rejects),
            ),
            (
                "nsx_kube_proxy_last_sync_milliseconds",
                "gauge",
                "Wall time of the last successful sync.",
                one(&self.proxy_last_sync_ms),
            ),
        ];
        for (name, kind, help, samples) in &families {
            family(&mut out, name, kind, help, samples);
        }
        out
    }

    fn ready(&self) -> Result<(), &'static str> {
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("not serving yet")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_and_nsx_answers_show_in_the_exposition() {
        let m = Metrics::default();
        assert!(!m.is_ready());
        m.record(&PassEvent::Converged {
            ops: 3,
            writes: 3,
            annotations: 2,
            failed: 0,
            took_ms: 40,
            planned: 7,
            incremental: true,
        });
        m.record(&PassEvent::Failed { error: "x".into() });
        assert!(m.is_ready());
        let mut s = ClientStats::default();
        s.by_status.insert(201, 3);
        s.by_status.insert(429, 1);
        let text = m.render(&s);
        assert!(
            text.contains("ncp_reconcile_passes_total{result=\"converged\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ncp_reconcile_last_pass_keys_planned 7"),
            "{text}"
        );
        assert!(
            text.contains("ncp_reconcile_incremental_passes_total 1"),
            "{text}"
        );
        assert!(
            text.contains("ncp_reconcile_passes_total{result=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ncp_nsx_requests_total{status=\"429\"} 1"),
            "{text}"
        );
        assert!(text.contains("ncp_planned_writes_total 3"), "{text}");
        // 40 ms falls in the 50 ms bucket and every one above it.
        assert!(
            text.contains("ncp_reconcile_pass_duration_seconds_bucket{le=\"0.01\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ncp_reconcile_pass_duration_seconds_bucket{le=\"0.05\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ncp_reconcile_pass_duration_seconds_sum 0.04"),
            "{text}"
        );
        assert!(text.contains("ncp_queue_depth 0"), "{text}");
        assert!(
            text.contains("# TYPE ncp_nsx_requests_total counter"),
            "{text}"
        );
    }
}
