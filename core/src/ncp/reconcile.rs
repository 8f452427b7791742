//! One reconcile pass: observe NSX, plan against the desired state, apply.

use hyper_util::client::legacy::connect::Connect;

use super::apply::{Applier, ApplyError, ApplyReport};
use std::collections::BTreeSet;

use super::desired::{NetworkSettings, desired};
use super::infra::Infra;
use super::observe::{Cache, Observed, observe, observe_by_search};
use super::plan::{Plan, plan, plan_changes};
use super::vocab::{Desired, Key};
use crate::k8s::ClusterView;
use crate::nsx::{NsxClient, NsxError};

/// What a pass did.
#[derive(Debug)]
pub struct Outcome {
    pub plan: Plan,
    pub report: ApplyReport,
    /// NSX calls spent observing.
    pub observe_calls: usize,
    /// What the cluster asks that NSX cannot do exactly.
    pub problems: Vec<super::vocab::Problem>,
    /// The plan covered only the keys that changed ([`plan_changes`]), so only their owners
    /// can need new annotations.
    pub incremental: bool,
    /// Desired keys the plan looked at.
    pub planned: usize,
}

#[derive(thiserror::Error)]
pub enum ReconcileError {
    #[error("failed to observe NSX")]
    Observe(#[source] NsxError),
    #[error("failed to apply the plan after {} writes", report.writes)]
    Apply {
        #[source]
        source: ApplyError,
        report: Box<ApplyReport>,
        plan: Box<Plan>,
    },
}

impl ReconcileError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ReconcileError::Observe(e) => e.is_retryable(),
            ReconcileError::Apply { source, .. } => source.is_retryable(),
        }
    }
}

/// How a pass may write.
#[derive(Debug, Clone)]
pub struct WriteGate {
    /// Stop after this many writes, as a crash would (tests).
    pub write_budget: Option<usize>,
    /// Stop as soon as this replica is no longer the leader.
    pub fence: Option<std::sync::Arc<super::leader::Fence>>,
    /// Operations in flight at most (`[nsx_v3] concurrent_connections`).
    pub concurrency: usize,
}

impl Default for WriteGate {
    fn default() -> Self {
        Self {
            write_budget: None,
            fence: None,
            concurrency: super::config::DEFAULT_CONCURRENT_CONNECTIONS,
        }
    }
}

impl WriteGate {
    pub fn budget(writes: Option<usize>) -> Self {
        Self {
            write_budget: writes,
            ..Self::default()
        }
    }
}

/// Observe, plan, apply.
pub async fn reconcile_once<C>(
    client: &NsxClient<C>,
    cluster: &str,
    net: impl Into<NetworkSettings>,
    infra: &Infra,
    view: &ClusterView,
    gate: &WriteGate,
) -> Result<Outcome, ReconcileError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let want = desired(view, cluster, net);
    reconcile_desired(client, cluster, infra, &want, None, gate, &mut None).await
}

/// Plan against `cache` (what NSX held after the previous pass, by NCP's own account) when
/// there is one, else observe NSX; apply; leave in `cache` what NSX holds now. A pass that
/// fails leaves the cache empty, so the next one observes: after an error NCP no longer knows
/// what NSX holds. A change in Kubernetes then costs the NSX calls of its own writes, not a
/// read of every object; the caller empties the cache for the periodic full resync, which is
/// also what finds changes others made in NSX.
///
/// The keys to plan are found by comparing `view`'s desired state with the one the cache was
/// left for; a controller that tracks its changes calls [`reconcile_desired`] instead.
pub async fn reconcile_cached<C>(
    client: &NsxClient<C>,
    cluster: &str,
    net: impl Into<NetworkSettings>,
    infra: &Infra,
    view: &ClusterView,
    gate: &WriteGate,
    cache: &mut Option<Cache>,
) -> Result<Outcome, ReconcileError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let want = desired(view, cluster, net);
    let touched = cache
        .as_ref()
        .and_then(|c| c.known.verified.as_deref())
        .map(|before| before.changed_keys(&want));
    let outcome =
        reconcile_desired(client, cluster, infra, &want, touched.as_ref(), gate, cache).await?;
    if let Some(c) = cache.as_mut().filter(|c| c.known.synced) {
        c.known.verified = Some(std::sync::Arc::new(want));
    }
    Ok(outcome)
}

/// One pass for `want`: against the cache when there is one (planning only `touched` when
/// given and the cache is synced, see [`plan_changes`]), else against a full observation.
pub async fn reconcile_desired<C>(
    client: &NsxClient<C>,
    cluster: &str,
    infra: &Infra,
    want: &Desired,
    touched: Option<&BTreeSet<Key>>,
    gate: &WriteGate,
    cache: &mut Option<Cache>,
) -> Result<Outcome, ReconcileError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut incremental = false;
    let mut planned = want.objects.len();
    let (observed, plan, observe_calls) = match cache.take() {
        // What NCP knew is for the state before this pass: it is computed again after it.
        Some(Cache { observed: o, known }) => {
            let p = match touched.and_then(|t| plan_changes(want, &o, &known, infra, t)) {
                Some(p) => {
                    incremental = true;
                    planned = touched.map_or(0, BTreeSet::len)
                        + known
                            .pending
                            .iter()
                            .filter(|k| touched.is_none_or(|t| !t.contains(*k)))
                            .count();
                    p
                }
                None => plan(want, &o, infra),
            };
            (o, p, 0)
        }
        None => look(client, cluster, infra, want).await?,
    };
    let mut applier = Applier::new(client, infra, observed);
    applier.write_budget = gate.write_budget;
    applier.fence = gate.fence.clone();
    applier.concurrency = gate.concurrency;
    match applier.apply(&plan).await {
        Ok((mut report, after)) => {
            // A service the load balancer has no room for: its Warning Event and annotation,
            // as for a VIP it cannot have.
            for u in &plan.unrealizable {
                if let Key::LbVirtualServer(v) = &u.key
                    && let Some(svc) = v.split('/').next()
                    && plan.lb_full.contains_key(svc)
                {
                    report.lb_errors.insert(svc.to_string(), "LB_SERVICE_FULL");
                    report.failed.insert(u.key.clone(), u.reason.clone());
                }
            }
            // Everything realized as wanted (but pod ports that wait for something): the next
            // pass need only look at what changes.
            let left = report
                .failed
                .keys()
                .chain(plan.unrealizable.iter().map(|u| &u.key))
                .cloned()
                .collect();
            let known = super::plan::settle(&after, want, left);
            *cache = Some(Cache {
                observed: after,
                known,
            });
            Ok(Outcome {
                plan,
                report,
                observe_calls,
                problems: want.problems.clone(),
                incremental,
                planned,
            })
        }
        Err((source, report)) => Err(ReconcileError::Apply {
            source,
            report: Box::new(report),
            plan: Box::new(plan),
        }),
    }
}

/// A full observation for `want`: the search index first (a call per 1,000 objects), and when
/// that shows anything to do, or fails, the consistent lists, so that no write is ever decided
/// on what a lagging index shows. A converged NCP restarting, and every periodic resync that
/// finds nothing to do, cost the search; changes cost the lists as well.
async fn look<C>(
    client: &NsxClient<C>,
    cluster: &str,
    infra: &Infra,
    want: &super::vocab::Desired,
) -> Result<(Observed, Plan, usize), ReconcileError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let before = client.stats().requests;
    let calls = || (client.stats().requests - before) as usize;
    match observe_by_search(client, cluster, infra).await {
        Ok(o) => {
            let p = plan(want, &o, infra);
            if p.is_empty() {
                return Ok((o, p, calls()));
            }
            tracing::debug!(
                ops = p.ops.len(),
                "the search index shows work to do; reading the lists before writing"
            );
        }
        Err(e) => {
            tracing::info!(error = %e, "search failed; observing by lists");
        }
    }
    let o = observe(client, cluster, infra)
        .await
        .map_err(ReconcileError::Observe)?;
    let p = plan(want, &o, infra);
    Ok((o, p, calls()))
}

/// Short on purpose: the plan of a large cluster is megabytes; say what failed and where.
impl std::fmt::Debug for ReconcileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReconcileError::Observe(e) => write!(
                f,
                "Observe({e}: {:?})",
                std::error::Error::source(e).map(|s| s.to_string())
            ),
            ReconcileError::Apply {
                source,
                report,
                plan,
            } => write!(
                f,
                "Apply({source}: {:?}; after {} of {} operations, {} writes)",
                std::error::Error::source(source).map(|s| s.to_string()),
                report.ops_done,
                plan.ops.len(),
                report.writes
            ),
        }
    }
}
