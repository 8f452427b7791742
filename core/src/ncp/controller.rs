//! The NCP controller: Kubernetes watches in, NSX objects and annotations out.
//!
//! Layered like kube-runtime: `watcher` -> reflector stores (one per kind) -> a change signal,
//! and every event also names its object in a dirty set. The reconcile loop waits for the stores
//! to be ready and finds the admin infra. Its first pass builds the view, the desired state
//! ([`DesiredCache`]) and observes NSX; every later pass (after a short debounce, to fold bursts)
//! takes the dirty set, brings its view up to date for those objects only (a change NCP does not
//! read, such as a pod's status, is none), recomputes the desired fragments they own, plans the
//! keys whose spec changed ([`super::plan::plan_changes`]), and writes back what Kubernetes must
//! know for the owners concerned: each pod's network (`ncp/network`: ip/prefix, mac, gateway,
//! vlan, logical port) which the node agent waits for, each namespace's subnet and SNAT address,
//! each LoadBalancer service's VIP. Annotations are patched only when they differ, so a restart
//! of a converged cluster writes nothing anywhere.
//!
//! A pass plans against what NSX held after the previous pass by NCP's own account (the cache,
//! see [`reconcile_desired`]), so a change costs NSX calls for its own writes only, and CPU for
//! its own objects only. An object NSX refused (and what depends on it) is retried on backoff as
//! part of that change set, so a refusal that lasts does not make passes cost the cluster either
//! (but for the few kinds whose realization changes others, see [`super::plan::settle`]). The
//! first pass, the periodic resync (`LoopConfig::resync`), and every pass after an error observe
//! NSX in full and plan every key, which is also what puts back objects others changed or
//! deleted.
//!
//! Errors are not fatal: a failed pass is retried with exponential backoff (bounded), and the
//! next pass re-observes NSX, so nothing is assumed about how far the failed one got.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::connect::Connect;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::runtime::reflector::Store;
use tokio::sync::Notify;

use super::config::NcpConfig;
use super::desired::NetworkSettings;
use super::desired_cache::DesiredCache;
use super::infra::{Infra, discover};
use super::leader::{Elector, Fence, LeaderConfig, Leadership, run_elected};
use super::reconcile::{WriteGate, reconcile_desired};
use super::vocab::Key;
use super::write_back::{WriteScope, report_failures, write_back};
use crate::k8s::dirty::{Dirty, KindDirty, refresh_kind};
use crate::k8s::{ClusterView, ViewChanges};
use crate::nsx::NsxClient;

/// Timing of the loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub debounce: Duration,
    pub resync: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Watch events seen and taken in by passes (the queue depth metric).
    pub progress: Arc<crate::k8s::watch::WatchProgress>,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(300),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            progress: Arc::default(),
        }
    }
}

/// What one pass did, for logs, traces and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassEvent {
    /// This replica became leader or stopped being one (HA only).
    Leadership(Leadership),
    /// The pass ran to its end; `failed` objects were refused by NSX (an Event says why).
    Converged {
        ops: usize,
        writes: usize,
        annotations: usize,
        failed: usize,
        /// From reading the view to the last write-back (tokio time: simulated under turmoil).
        took_ms: u64,
        /// Desired keys the plan looked at: those that changed (and pod ports still waiting)
        /// when `incremental`, every key otherwise. The measure of a pass's CPU that does not
        /// depend on the machine.
        planned: usize,
        /// The pass planned only what changed, against what the previous pass left.
        incremental: bool,
    },
    Failed {
        error: String,
    },
}

pub use crate::k8s::watch::WatchBackoff;

/// Aborts the watch tasks when the last handle goes (a leadership term ends).
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Reflector stores of everything NCP reads.
#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub network_policies: Store<NetworkPolicy>,
    /// The objects watch events named since [`Stores::take_dirty`] was last called.
    dirty: Arc<Mutex<Dirty>>,
    _tasks: Arc<Tasks>,
}

impl Stores {
    /// Takes the objects named by watch events so far.
    pub fn take_dirty(&self) -> Dirty {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Brings `view` up to date for what `dirty` names and says what changed in what NCP
    /// reads: the cost is the changed objects', not the cluster's.
    pub fn refresh(&self, view: &mut ClusterView, dirty: Dirty) -> ViewChanges {
        use crate::k8s::fingerprint as f;
        let mut c = ViewChanges::default();
        let both = |k: &(String, String)| k.clone();
        let name = |k: &(String, String)| k.1.clone();
        refresh_kind(
            &self.namespaces,
            &mut view.namespaces,
            dirty.namespaces,
            name,
            f::namespace,
            &mut c.namespaces,
        );
        refresh_kind(
            &self.pods,
            &mut view.pods,
            dirty.pods,
            both,
            f::pod,
            &mut c.pods,
        );
        refresh_kind(
            &self.nodes,
            &mut view.nodes,
            dirty.nodes,
            name,
            f::node,
            &mut c.nodes,
        );
        refresh_kind(
            &self.services,
            &mut view.services,
            dirty.services,
            both,
            f::service,
            &mut c.services,
        );
        refresh_kind(
            &self.endpoint_slices,
            &mut view.endpoint_slices,
            dirty.endpoint_slices,
            both,
            f::endpoint_slice,
            &mut c.endpoint_slices,
        );
        refresh_kind(
            &self.network_policies,
            &mut view.network_policies,
            dirty.network_policies,
            both,
            f::network_policy,
            &mut c.network_policies,
        );
        c
    }

    pub fn view(&self) -> ClusterView {
        let mut v = ClusterView::default();
        for n in self.namespaces.state() {
            v.add_namespace((*n).clone());
        }
        for p in self.pods.state() {
            v.add_pod((*p).clone());
        }
        for n in self.nodes.state() {
            v.add_node((*n).clone());
        }
        for s in self.services.state() {
            v.add_service((*s).clone());
        }
        for e in self.endpoint_slices.state() {
            v.add_endpoint_slice((*e).clone());
        }
        for p in self.network_policies.state() {
            v.add_network_policy((*p).clone());
        }
        v
    }

    async fn ready(&self) {
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.endpoint_slices.wait_until_ready().await;
        let _ = self.network_policies.wait_until_ready().await;
    }
}

/// Starts the watches; every change notifies `changed`. The tasks run until the runtime ends.
pub fn start_watches(
    kube: kube::Client,
    changed: Arc<Notify>,
    progress: Arc<crate::k8s::watch::WatchProgress>,
) -> Stores {
    fn spawn_kind<K>(
        api: Api<K>,
        changed: Arc<Notify>,
        progress: &Arc<crate::k8s::watch::WatchProgress>,
        tasks: &mut Vec<tokio::task::JoinHandle<()>>,
        dirty: &Arc<Mutex<Dirty>>,
        kind: fn(&mut Dirty) -> &mut KindDirty,
    ) -> Store<K>
    where
        K: crate::k8s::watch::Watchable,
    {
        let dirty = dirty.clone();
        let (reader, handle) =
            crate::k8s::watch::watch(api, changed, Some(progress.clone()), move |e| {
                kind(&mut dirty.lock().unwrap_or_else(|e| e.into_inner())).record(e)
            });
        tasks.push(handle);
        reader
    }
    let mut tasks = Vec::new();
    let dirty = Arc::new(Mutex::new(Dirty::default()));
    let namespaces = spawn_kind(
        Api::<Namespace>::all(kube.clone()),
        changed.clone(),
        &progress,
        &mut tasks,
        &dirty,
        |d| &mut d.namespaces,
    );
    let pods = spawn_kind(
        Api::<Pod>::all(kube.clone()),
        changed.clone(),
        &progress,
        &mut tasks,
        &dirty,
        |d| &mut d.pods,
    );
    let nodes = spawn_kind(
        Api::<Node>::all(kube.clone()),
        changed.clone(),
        &progress,
        &mut tasks,
        &dirty,
        |d| &mut d.nodes,
    );
    let services = spawn_kind(
        Api::<Service>::all(kube.clone()),
        changed.clone(),
        &progress,
        &mut tasks,
        &dirty,
        |d| &mut d.services,
    );
    let endpoint_slices = spawn_kind(
        Api::<EndpointSlice>::all(kube.clone()),
        changed.clone(),
        &progress,
        &mut tasks,
        &dirty,
        |d| &mut d.endpoint_slices,
    );
    let network_policies = spawn_kind(
        Api::<NetworkPolicy>::all(kube),
        changed,
        &progress,
        &mut tasks,
        &dirty,
        |d| &mut d.network_policies,
    );
    Stores {
        namespaces,
        pods,
        nodes,
        services,
        endpoint_slices,
        network_policies,
        dirty,
        _tasks: Arc::new(Tasks(tasks)),
    }
}

/// Runs NCP until the task is dropped. `on_pass` sees every pass (tracing, tests).
pub async fn run<C>(
    kube: kube::Client,
    nsx: Arc<NsxClient<C>>,
    config: NcpConfig,
    timing: LoopConfig,
    fence: Option<Arc<Fence>>,
    mut on_pass: impl FnMut(&PassEvent),
) where
    C: Connect + Clone + Send + Sync + 'static,
{
    let changed = Arc::new(Notify::new());
    let stores = start_watches(kube.clone(), changed.clone(), timing.progress.clone());
    stores.ready().await;
    let infra = discover_until_found(&nsx, &config, &timing, &mut on_pass).await;
    let mut l = Loop {
        kube,
        nsx,
        config,
        infra,
        fence,
        backoff: timing.backoff_min,
        timing,
        reported: BTreeMap::new(),
        reported_problems: BTreeMap::new(),
        cache: None,
        next_full: tokio::time::Instant::now(),
        tracked: None,
        synced: false,
        clean: false,
    };
    loop {
        // What the stores hold from here on is taken in (reconciled, or skipped as a change
        // NCP does not read).
        l.timing.progress.take();
        let dirty = stores.take_dirty();
        let started = tokio::time::Instant::now();
        let changes = l
            .tracked
            .as_mut()
            .map(|(view, _)| stores.refresh(view, dirty));
        if l.idle(changes.as_ref()) {
            let until_resync = l
                .next_full
                .saturating_duration_since(tokio::time::Instant::now());
            l.wait_for_change(&changed, until_resync).await;
            continue;
        }
        let event = l.pass(&stores, changes, started).await;
        on_pass(&event);
        match l.wait_after(&event) {
            Wait::Sleep(d) => tokio::time::sleep(d).await,
            Wait::UntilChange(d) => l.wait_for_change(&changed, d).await,
        }
    }
}

/// Finds the admin's infrastructure in NSX, retrying with backoff until it is there.
async fn discover_until_found<C>(
    nsx: &NsxClient<C>,
    config: &NcpConfig,
    timing: &LoopConfig,
    on_pass: &mut impl FnMut(&PassEvent),
) -> Infra
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut backoff = timing.backoff_min;
    loop {
        match discover(nsx, config).await {
            Ok(i) => return i,
            Err(e) => {
                on_pass(&PassEvent::Failed {
                    error: format!("{e}"),
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(timing.backoff_max);
            }
        }
    }
}

/// What the loop does after a pass.
enum Wait {
    /// Backoff after a failure: a change does not cut it short.
    Sleep(Duration),
    /// Until a change, or this long at most.
    UntilChange(Duration),
}

/// The reconcile loop's state between passes.
struct Loop<C> {
    kube: kube::Client,
    nsx: Arc<NsxClient<C>>,
    config: NcpConfig,
    timing: LoopConfig,
    infra: Infra,
    fence: Option<Arc<Fence>>,
    backoff: Duration,
    /// Events already reported, by object, so that a refusal that lasts is reported once.
    reported: BTreeMap<Key, String>,
    reported_problems: BTreeMap<Key, String>,
    /// What NSX held after the previous pass by NCP's own account; `None`: observe NSX.
    cache: Option<super::observe::Cache>,
    /// When the periodic full resync is due.
    next_full: tokio::time::Instant,
    /// The view and its desired state, kept between passes and updated by what the watches
    /// name: a change costs the objects it touches, not the cluster.
    tracked: Option<(ClusterView, DesiredCache)>,
    /// The last pass left NSX matching the desired state but for pod ports still waiting (see
    /// `Known::synced`) and wrote every annotation: the next pass need only plan what
    /// changed, and those ports.
    synced: bool,
    /// ... and NSX refused nothing: with no change at all, there is nothing to do (a change
    /// NCP does not read, such as a pod's status, costs no pass). Refused objects are retried
    /// on backoff.
    clean: bool,
}

impl<C> Loop<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// Nothing to do: the last pass was clean, nothing NCP reads changed, no resync is due.
    fn idle(&self, changes: Option<&ViewChanges>) -> bool {
        self.clean
            && self.cache.is_some()
            && changes.is_some_and(ViewChanges::is_empty)
            && tokio::time::Instant::now() < self.next_full
    }

    /// Sleeps until the watches signal a change (then the debounce, to fold a burst) or `wait`
    /// has passed.
    async fn wait_for_change(&self, changed: &Notify, wait: Duration) {
        tokio::select! {
            biased;
            _ = changed.notified() => tokio::time::sleep(self.timing.debounce).await,
            _ = tokio::time::sleep(wait) => {}
        }
    }

    /// How long to wait after a pass: the backoff after a failure; after a pass with refused
    /// objects, the backoff or a change (an exhausted pool may free up); otherwise a change or
    /// the periodic resync.
    fn wait_after(&mut self, event: &PassEvent) -> Wait {
        let current = self.backoff;
        match event {
            PassEvent::Failed { .. } | PassEvent::Leadership(_) => {
                self.backoff = (current * 2).min(self.timing.backoff_max);
                Wait::Sleep(current)
            }
            PassEvent::Converged { failed, .. } if *failed > 0 => {
                self.backoff = (current * 2).min(self.timing.backoff_max);
                Wait::UntilChange(current)
            }
            PassEvent::Converged { .. } => {
                self.backoff = self.timing.backoff_min;
                Wait::UntilChange(
                    self.next_full
                        .saturating_duration_since(tokio::time::Instant::now()),
                )
            }
        }
    }

    /// One pass: the desired state brought up to date with `changes` (or built from the
    /// stores), planned and applied, then written back to Kubernetes.
    async fn pass(
        &mut self,
        stores: &Stores,
        changes: Option<ViewChanges>,
        started: tokio::time::Instant,
    ) -> PassEvent {
        let touched = match (&mut self.tracked, &changes) {
            (Some((view, want)), Some(c)) => Some(want.update(view, c)),
            _ => {
                let view = stores.view();
                let want = DesiredCache::new(
                    &view,
                    &self.config.cluster,
                    NetworkSettings::of(&self.config),
                );
                self.tracked = Some((view, want));
                None
            }
        };
        // The periodic full resync: read NSX again instead of trusting the cache (finds what
        // others changed, deleted or added under our tags).
        if tokio::time::Instant::now() >= self.next_full {
            self.cache = None;
        }
        if self.cache.is_none() {
            self.next_full = tokio::time::Instant::now() + self.timing.resync;
        }
        // Only a synced previous pass leaves nothing but `touched` to look at.
        let touched = touched.filter(|_| self.synced);
        (self.synced, self.clean) = (false, false);
        let event = self.reconcile(changes.as_ref(), touched, started).await;
        if matches!(event, PassEvent::Failed { .. }) {
            // Nothing is assumed about how far the pass got: observe NSX next time.
            self.cache = None;
        }
        event
    }

    async fn reconcile(
        &mut self,
        changes: Option<&ViewChanges>,
        touched: Option<std::collections::BTreeSet<Key>>,
        started: tokio::time::Instant,
    ) -> PassEvent {
        let Some((view, want)) = &self.tracked else {
            return PassEvent::Failed {
                error: "no view of the cluster".into(),
            };
        };
        let gate = WriteGate {
            write_budget: None,
            fence: self.fence.clone(),
            concurrency: self.config.concurrent_connections,
        };
        let result = reconcile_desired(
            &self.nsx,
            &self.config.cluster,
            &self.infra,
            want.desired(),
            touched.as_ref(),
            &gate,
            &mut self.cache,
        )
        .await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                return PassEvent::Failed {
                    error: format!(
                        "{e}: {:?}",
                        std::error::Error::source(&e).map(|s| s.to_string())
                    ),
                };
            }
        };
        let Some(cache) = &self.cache else {
            return PassEvent::Failed {
                error: "the pass left no record of what NSX holds".into(),
            };
        };
        let synced = cache.known.synced;
        let scope = match (changes, outcome.incremental) {
            (Some(c), true) => Some(WriteScope::of(c, &outcome)),
            _ => None,
        };
        let annotations = match write_back(
            &self.kube,
            &self.nsx,
            view,
            &cache.observed,
            &outcome,
            scope.as_ref(),
            &gate,
        )
        .await
        {
            Ok(n) => n,
            Err(error) => return PassEvent::Failed { error },
        };
        if self.fence.as_deref().is_none_or(Fence::allows_writes) {
            self.report(&outcome).await;
        }
        self.synced = synced;
        self.clean = synced && outcome.report.failed.is_empty();
        PassEvent::Converged {
            ops: outcome.plan.len(),
            writes: outcome.report.writes,
            annotations,
            failed: outcome.report.failed.len(),
            took_ms: started.elapsed().as_millis() as u64,
            planned: outcome.planned,
            incremental: outcome.incremental,
        }
    }

    /// Warning Events: objects NSX refused, and policies NSX cannot express exactly (one
    /// message per policy).
    async fn report(&mut self, outcome: &super::reconcile::Outcome) {
        let Some((view, _)) = &self.tracked else {
            return;
        };
        report_failures(
            &self.kube,
            view,
            &outcome.report.failed,
            &mut self.reported,
            "NSXRealizationFailed",
        )
        .await;
        let mut problems: BTreeMap<Key, String> = BTreeMap::new();
        for p in &outcome.problems {
            let m = problems
                .entry(Key::AllowSection(p.uid.clone()))
                .or_default();
            if !m.is_empty() {
                m.push_str("; ");
            }
            m.push_str(&p.message);
        }
        report_failures(
            &self.kube,
            view,
            &problems,
            &mut self.reported_problems,
            "NetworkPolicyNotExact",
        )
        .await;
    }
}

/// Runs NCP as one of several replicas: the controller runs only while this replica holds the
/// Lease, and every write it makes is fenced (see [`super::leader`]).
pub async fn run_ha<C>(
    kube: kube::Client,
    nsx: Arc<NsxClient<C>>,
    config: NcpConfig,
    timing: LoopConfig,
    leader: LeaderConfig,
    now_ms: Arc<dyn Fn() -> i64 + Send + Sync>,
    on_pass: impl FnMut(&PassEvent),
) where
    C: Connect + Clone + Send + Sync + 'static,
{
    let on_pass = std::cell::RefCell::new(on_pass);
    let elector = Elector::new(kube.clone(), leader, now_ms);
    // Every write of this replica's client checks the fence on every attempt, not only the
    // planner before each logical write: a retry or a re-login after the fence falls, or an
    // attempt outliving it, would land a deposed leader's write after its successor's.
    nsx.set_write_fence(Some(elector.fence.clone()));
    run_elected(
        elector,
        |l| (on_pass.borrow_mut())(&PassEvent::Leadership(l)),
        |fence| {
            let (kube, nsx, config, timing) =
                (kube.clone(), nsx.clone(), config.clone(), timing.clone());
            let on_pass = &on_pass;
            async move {
                run(kube, nsx, config, timing, Some(fence), |e| {
                    (on_pass.borrow_mut())(e)
                })
                .await
            }
        },
    )
    .await;
}
