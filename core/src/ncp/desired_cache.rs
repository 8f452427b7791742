//! The desired state kept between passes and updated by what changed, so that a change in the
//! cluster costs the objects it touches, not the cluster.
//!
//! The desired state is a union of fragments, each computed from one owner: a namespace (its
//! router, switch, subnet, SNAT rule and NSGroup), a pod (its port), a LoadBalancer service
//! (its pools and virtual servers), a NetworkPolicy (its groups, IPSets and sections), and two
//! cluster-wide ones (the load balancer, the firewall markers). [`super::desired::desired`] computes them all;
//! [`DesiredCache::update`] recomputes the owners a change can reach and reports the keys
//! whose spec changed, which is what the incremental planner looks at:
//!
//! | change | owners recomputed |
//! |---|---|
//! | namespace | the namespace, its pods and services, every policy (namespace selectors read labels) |
//! | pod | the pod; the policies of its namespace and those reading every namespace's pods |
//! | service | the service, the load balancer |
//! | endpoint slice | the services it belonged to and belongs to, the load balancer |
//! | policy | the policy, the markers |
//! | node | the markers (the node access section lists the nodes' addresses) |
//!
//! A property test (`tests::updates_match_a_fresh_computation`) checks that the result is
//! exactly `desired` of the new view, and that every key whose spec changed is reported.

use std::collections::{BTreeMap, BTreeSet};

use super::desired::{
    NetworkSettings, lb_objects, namespace_objects, pod_objects, service_objects, slice_service,
    uses_shared_persistence, virtual_servers,
};
use super::policy::{PodScope, marker_objects, policy_objects, sort_problems};
use super::vocab::{Desired, Key, LiveNamespaces, Problem, Spec};
use crate::k8s::{ClusterView, ViewChanges};

/// What a fragment of the desired state is computed from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Namespace(String),
    Pod(String, String),
    Service(String, String),
    Policy(String, String),
    LoadBalancer,
    Markers,
}

/// The desired state of a view, with what it takes to update it in place.
#[derive(Debug, Clone)]
pub struct DesiredCache {
    cluster: String,
    net: NetworkSettings,
    desired: Desired,
    /// The keys each owner's fragment holds.
    owned: BTreeMap<Owner, Vec<Key>>,
    /// Realized policies: what they report and whose pods they read.
    policies: BTreeMap<(String, String), (Vec<Problem>, PodScope)>,
    /// Services that need the cluster's load balancer.
    lb_users: BTreeSet<(String, String)>,
    /// The service each endpoint slice was counted for.
    slice_owner: BTreeMap<(String, String), String>,
}

impl DesiredCache {
    /// The desired state of `view`, fragment by fragment.
    pub fn new(view: &ClusterView, cluster: &str, net: impl Into<NetworkSettings>) -> Self {
        let mut cache = Self {
            cluster: cluster.to_string(),
            net: net.into(),
            desired: Desired::default(),
            owned: BTreeMap::new(),
            policies: BTreeMap::new(),
            lb_users: BTreeSet::new(),
            slice_owner: BTreeMap::new(),
        };
        let mut owners: BTreeSet<Owner> = BTreeSet::new();
        owners.extend(view.namespaces.keys().cloned().map(Owner::Namespace));
        owners.extend(
            view.pods
                .keys()
                .map(|(n, p)| Owner::Pod(n.clone(), p.clone())),
        );
        owners.extend(
            view.services
                .keys()
                .map(|(n, s)| Owner::Service(n.clone(), s.clone())),
        );
        owners.extend(
            view.network_policies
                .keys()
                .map(|(n, p)| Owner::Policy(n.clone(), p.clone())),
        );
        for (k, s) in &view.endpoint_slices {
            if let Some(svc) = slice_service(s) {
                cache.slice_owner.insert(k.clone(), svc.to_string());
            }
        }
        let mut touched = BTreeSet::new();
        cache.recompute(view, owners, false, &mut touched);
        cache
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Takes in `changes` (between the view this cache was computed from and `view`), and
    /// returns every key whose spec appeared, changed or went away.
    pub fn update(&mut self, view: &ClusterView, changes: &ViewChanges) -> BTreeSet<Key> {
        let mut owners: BTreeSet<Owner> = BTreeSet::new();
        let all_policies = |owners: &mut BTreeSet<Owner>, policies: &BTreeMap<_, _>| {
            owners.extend(
                view.network_policies
                    .keys()
                    .chain(policies.keys())
                    .map(|(n, p): &(String, String)| Owner::Policy(n.clone(), p.clone())),
            );
        };
        for ns in &changes.namespaces {
            owners.insert(Owner::Namespace(ns.clone()));
            let start = (ns.clone(), String::new());
            let in_ns = |k: &&(String, String)| k.0 == *ns;
            owners.extend(
                view.pods
                    .range(start.clone()..)
                    .map(|(k, _)| k)
                    .take_while(in_ns)
                    .map(|(n, p)| Owner::Pod(n.clone(), p.clone())),
            );
            owners.extend(
                self.owned
                    .range(Owner::Pod(ns.clone(), String::new())..)
                    .map(|(o, _)| o)
                    .take_while(|o| matches!(o, Owner::Pod(n, _) if n == ns))
                    .cloned(),
            );
            owners.extend(
                view.services
                    .range(start.clone()..)
                    .map(|(k, _)| k)
                    .take_while(in_ns)
                    .chain(
                        self.lb_users
                            .range(start.clone()..)
                            .take_while(|k| k.0 == *ns),
                    )
                    .map(|(n, s)| Owner::Service(n.clone(), s.clone())),
            );
            all_policies(&mut owners, &self.policies);
        }
        for (ns, pod) in &changes.pods {
            owners.insert(Owner::Pod(ns.clone(), pod.clone()));
            // The policies that read this namespace's pods: its own, and those reading all.
            let start = (ns.clone(), String::new());
            owners.extend(
                view.network_policies
                    .range(start.clone()..)
                    .map(|(k, _)| k)
                    .take_while(|k| k.0 == *ns)
                    .chain(
                        self.policies
                            .range(start..)
                            .map(|(k, _)| k)
                            .take_while(|k| k.0 == *ns),
                    )
                    .map(|(n, p)| Owner::Policy(n.clone(), p.clone())),
            );
            owners.extend(
                self.policies
                    .iter()
                    .filter(|(_, (_, scope))| *scope == PodScope::All)
                    .map(|((n, p), _)| Owner::Policy(n.clone(), p.clone())),
            );
        }
        for (ns, svc) in &changes.services {
            owners.insert(Owner::Service(ns.clone(), svc.clone()));
        }
        for key @ (ns, _) in &changes.endpoint_slices {
            let now = view
                .endpoint_slices
                .get(key)
                .and_then(slice_service)
                .map(str::to_string);
            let before = match &now {
                Some(svc) => self.slice_owner.insert(key.clone(), svc.clone()),
                None => self.slice_owner.remove(key),
            };
            for svc in [now, before].into_iter().flatten() {
                owners.insert(Owner::Service(ns.clone(), svc));
            }
        }
        for (ns, np) in &changes.network_policies {
            owners.insert(Owner::Policy(ns.clone(), np.clone()));
        }
        let mut touched = BTreeSet::new();
        self.recompute(view, owners, !changes.nodes.is_empty(), &mut touched);
        touched
    }

    /// Recomputes `owners`, then the cluster-wide fragments that depend on them. Each batch
    /// takes the old fragments out before it puts the new ones in, so a key that passes from
    /// one owner to another stays.
    fn recompute(
        &mut self,
        view: &ClusterView,
        owners: BTreeSet<Owner>,
        nodes_changed: bool,
        touched: &mut BTreeSet<Key>,
    ) {
        let lb = owners.iter().any(|o| matches!(o, Owner::Service(..)));
        let policies = owners.iter().any(|o| matches!(o, Owner::Policy(..)));
        let markers = policies || nodes_changed;
        self.batch(view, owners, touched);
        let global = [
            lb.then_some(Owner::LoadBalancer),
            markers.then_some(Owner::Markers),
        ];
        self.batch(view, global.into_iter().flatten(), touched);
        if policies {
            let mut problems: Vec<Problem> = self
                .policies
                .values()
                .flat_map(|(p, _)| p.iter().cloned())
                .collect();
            sort_problems(&mut problems);
            self.desired.problems = problems;
        }
    }

    /// Recomputes `owners` and puts their fragments in place.
    fn batch(
        &mut self,
        view: &ClusterView,
        owners: impl IntoIterator<Item = Owner>,
        touched: &mut BTreeSet<Key>,
    ) {
        let fragments: Vec<(Owner, BTreeMap<Key, Spec>)> = owners
            .into_iter()
            .map(|o| {
                let f = self.fragment(view, &o);
                (o, f)
            })
            .collect();
        self.replace(fragments, touched);
    }

    /// One owner's fragment as the view has it now (and what the cache keeps about the owner).
    fn fragment(&mut self, view: &ClusterView, owner: &Owner) -> BTreeMap<Key, Spec> {
        let live = LiveNamespaces(&view.namespaces);
        let cluster = self.cluster.as_str();
        let mut fragment: BTreeMap<Key, Spec> = BTreeMap::new();
        match owner {
            Owner::Namespace(name) => {
                if let Some(ns) = live.get(name) {
                    namespace_objects(cluster, self.net, name, ns, &mut fragment);
                }
            }
            Owner::Pod(ns, name) => {
                if let Some(pod) = view.pods.get(&(ns.clone(), name.clone())) {
                    pod_objects(cluster, live, ns, name, pod, &mut fragment);
                }
            }
            Owner::Service(ns, name) => {
                let key = (ns.clone(), name.clone());
                let uses_lb = view.services.get(&key).is_some_and(|svc| {
                    service_objects(
                        view,
                        cluster,
                        self.net.lb,
                        live,
                        ns,
                        name,
                        svc,
                        &mut fragment,
                    )
                });
                if uses_lb {
                    self.lb_users.insert(key);
                } else {
                    self.lb_users.remove(&key);
                }
            }
            Owner::Policy(ns, name) => {
                let key = (ns.clone(), name.clone());
                let outcome = view.network_policies.get(&key).and_then(|np| {
                    policy_objects(view, cluster, live, ns, name, np, &mut fragment)
                });
                match outcome {
                    Some(o) => {
                        self.policies.insert(key, (o.problems, o.scope));
                    }
                    None => {
                        self.policies.remove(&key);
                    }
                }
            }
            Owner::LoadBalancer => {
                if !self.lb_users.is_empty() {
                    // The services' virtual servers are in place: the LB service lists them.
                    let servers = virtual_servers(&self.desired.objects);
                    let shared = uses_shared_persistence(&self.desired.objects, cluster);
                    lb_objects(cluster, self.net.lb, servers, shared, &mut fragment);
                }
            }
            Owner::Markers => {
                if !self.policies.is_empty() {
                    marker_objects(cluster, view, &mut fragment);
                }
            }
        }
        fragment
    }

    /// Puts new fragments in place of the owners' old ones, noting every key that changed.
    fn replace(
        &mut self,
        fragments: Vec<(Owner, BTreeMap<Key, Spec>)>,
        touched: &mut BTreeSet<Key>,
    ) {
        let objects = &mut self.desired.objects;
        for (owner, fragment) in &fragments {
            for old in self.owned.remove(owner).unwrap_or_default() {
                if !fragment.contains_key(&old) && objects.remove(&old).is_some() {
                    touched.insert(old);
                }
            }
        }
        for (owner, fragment) in fragments {
            let keys: Vec<Key> = fragment.keys().cloned().collect();
            for (k, spec) in fragment {
                if objects.get(&k) != Some(&spec) {
                    touched.insert(k.clone());
                    objects.insert(k, spec);
                }
            }
            if !keys.is_empty() {
                self.owned.insert(owner, keys);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::k8s::{annotation, fixture};
    use crate::ncp::desired::desired;

    /// A small universe of objects, each present or not and in one of a few shapes, so that
    /// two random views share most names and differ in a few ways.
    #[derive(Debug, Clone)]
    struct Gen {
        /// Per namespace: (present, uid generation, label, no-SNAT, being deleted).
        namespaces: Vec<(bool, u8, u8, bool, bool)>,
        /// Per pod slot: (namespace, present, uid generation, label, node, finished).
        pods: Vec<(u8, bool, u8, u8, u8, bool)>,
        /// Per service slot: (namespace, kind: none/ClusterIP/LoadBalancer, ports).
        services: Vec<(u8, u8, u8)>,
        /// Per slice slot: (namespace, service slot it belongs to, endpoints, ready).
        slices: Vec<(u8, u8, u8, bool)>,
        /// Per policy slot: (namespace, shape: absent, own, namespace selector, named egress).
        policies: Vec<(u8, u8)>,
        /// Per node slot: absent, or which of two addresses it reports.
        nodes: Vec<u8>,
    }

    fn clusters() -> impl Strategy<Value = Gen> {
        (
            proptest::collection::vec(
                (
                    any::<bool>(),
                    0u8..2,
                    0u8..2,
                    any::<bool>(),
                    proptest::bool::weighted(0.1),
                ),
                3,
            ),
            proptest::collection::vec(
                (
                    0u8..3,
                    any::<bool>(),
                    0u8..2,
                    0u8..3,
                    0u8..2,
                    proptest::bool::weighted(0.1),
                ),
                8,
            ),
            proptest::collection::vec((0u8..3, 0u8..3, 1u8..3), 3),
            proptest::collection::vec((0u8..3, 0u8..3, 0u8..3, any::<bool>()), 3),
            proptest::collection::vec((0u8..3, 0u8..4), 3),
            proptest::collection::vec(0u8..3, 2),
        )
            .prop_map(
                |(namespaces, pods, services, slices, policies, nodes)| Gen {
                    namespaces,
                    pods,
                    services,
                    slices,
                    policies,
                    nodes,
                },
            )
    }

    fn view(g: &Gen) -> ClusterView {
        let mut v = ClusterView::default();
        for (i, (present, generation, label, no_snat, deleting)) in g.namespaces.iter().enumerate()
        {
            if !present {
                continue;
            }
            let mut ns =
                fixture::namespace(&format!("ns-{i}"), &format!("uid-ns-{i}-{generation}"));
            ns.metadata.labels = Some([("team".to_string(), format!("t{label}"))].into());
            if *no_snat {
                ns.metadata.annotations =
                    Some([(annotation::NO_SNAT.to_string(), "true".to_string())].into());
            }
            if *deleting {
                ns.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
                );
            }
            v.add_namespace(ns);
        }
        for (i, (ns, present, generation, label, node, finished)) in g.pods.iter().enumerate() {
            if !present {
                continue;
            }
            let labels: &[(&str, &str)] = match label {
                0 => &[],
                1 => &[("app", "web")],
                _ => &[("app", "db")],
            };
            let mut pod = fixture::pod(
                &format!("ns-{ns}"),
                &format!("pod-{i}"),
                &format!("uid-pod-{i}-{generation}"),
                &format!("node-{node}"),
                labels,
            );
            // `http` is 8080, but 8081 on the last pod slot in one of its generations: one
            // name, two numbers (each pod is allowed its own, by groups of explicit pods) in
            // about a tenth of the clusters, so that most passes still plan incrementally.
            let http = 8080 + u32::from(i == 7 && *node == 1 && *generation == 1);
            if let Some(spec) = pod.spec.as_mut() {
                spec.containers = vec![
                    serde_json::from_value(
                        json!({"name": "c", "ports": [{"name": "http", "containerPort": http}]}),
                    )
                    .unwrap(),
                ];
            }
            if *finished {
                pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
                    phase: Some("Succeeded".into()),
                    ..Default::default()
                });
            }
            v.add_pod(pod);
        }
        for (i, (ns, kind, ports)) in g.services.iter().enumerate() {
            if *kind == 0 {
                continue;
            }
            let ty = if *kind == 1 {
                "ClusterIP"
            } else {
                "LoadBalancer"
            };
            let ports: Vec<_> = (0..*ports)
                .map(|p| json!({"name": format!("p{p}"), "port": 80 + i32::from(p), "protocol": "TCP"}))
                .collect();
            v.add_service(
                serde_json::from_value(json!({"metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{ns}"), "uid": format!("uid-svc-{i}")},
                    "spec": {"type": ty, "ports": ports}}))
                .unwrap(),
            );
        }
        for (i, (ns, svc, endpoints, ready)) in g.slices.iter().enumerate() {
            let eps: Vec<_> = (0..*endpoints)
                .map(|e| json!({"addresses": [format!("10.0.{i}.{e}")], "conditions": {"ready": *ready || e == 0}}))
                .collect();
            v.add_endpoint_slice(
                serde_json::from_value(json!({"metadata": {"name": format!("slice-{i}"), "namespace": format!("ns-{ns}"),
                    "labels": {"kubernetes.io/service-name": format!("svc-{svc}")}},
                    "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "p0", "port": 8080}]}))
                .unwrap(),
            );
        }
        for (i, (ns, shape)) in g.policies.iter().enumerate() {
            let spec = match shape {
                0 => continue,
                1 => json!({"podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}}], "ports": [{"port": "http"}]}]}),
                2 => json!({"podSelector": {},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "t1"}}, "podSelector": {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}}]}]}),
                _ => {
                    json!({"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"port": "http", "protocol": "TCP"}]}]})
                }
            };
            v.add_network_policy(
                serde_json::from_value(json!({"metadata": {"name": format!("np-{i}"), "namespace": format!("ns-{ns}"), "uid": format!("uid-np-{i}")},
                    "spec": spec}))
                .unwrap(),
            );
        }
        for (i, address) in g.nodes.iter().enumerate() {
            if *address == 0 {
                continue;
            }
            v.add_node(
                serde_json::from_value(json!({"metadata": {"name": format!("node-{i}"), "uid": format!("uid-node-{i}")},
                    "status": {"addresses": [{"type": "InternalIP", "address": format!("172.16.0.{}", 10 * i + usize::from(*address))},
                        {"type": "Hostname", "address": format!("node-{i}")}]}}))
                .unwrap(),
            );
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn updates_match_a_fresh_computation(a in clusters(), b in clusters(), c in clusters()) {
            let views = [view(&a), view(&b), view(&c)];
            let mut cache = DesiredCache::new(&views[0], "k8s-a", 24);
            prop_assert_eq!(cache.desired(), &desired(&views[0], "k8s-a", 24));
            for pair in views.windows(2) {
                let before = desired(&pair[0], "k8s-a", 24);
                let after = desired(&pair[1], "k8s-a", 24);
                let touched = cache.update(&pair[1], &ViewChanges::between(&pair[0], &pair[1]));
                prop_assert_eq!(cache.desired(), &after);
                let keys: BTreeSet<&Key> = before.objects.keys().chain(after.objects.keys()).collect();
                for k in keys {
                    if before.objects.get(k) != after.objects.get(k) {
                        prop_assert!(touched.contains(k), "{:?} changed but was not reported", k);
                    }
                }
            }
        }
    }

    fn infra() -> crate::ncp::infra::Infra {
        crate::ncp::infra::Infra {
            transport_zone: "tz".into(),
            tier0: "t0".into(),
            ip_block: "block".into(),
            snat_pool: Some("snat".into()),
            lb_pool: Some("lb".into()),
            lb_tcp_profile: Some("tcp".into()),
            lb_udp_profile: Some("udp".into()),
            edge_cluster: Some("edges".into()),
            // node-1 has no VIF: its pods cannot be realized.
            node_vifs: [("node-0".to_string(), "vif-0".to_string())].into(),
        }
    }

    /// How NSX answers a pass's writes: `seed` 0 takes them all; any other refuses about one
    /// key in ten (a 4xx), the same keys for the same seed. A refused SNAT rule may have had
    /// its address allocated first.
    #[derive(Clone, Copy, Debug)]
    struct Refusals(u64);

    impl Refusals {
        fn pick(self, key: &Key) -> Option<bool> {
            if self.0 == 0 {
                return None;
            }
            let h = crate::hash::stable_hash(&format!("{key:?}/{}", self.0));
            h.is_multiple_of(10).then_some(h & 0x100 != 0)
        }
    }

    /// Plays `plan` on `o` as NSX and the applier would: ids, subnets and addresses assigned
    /// on create, bodies rendered against what exists, deletes and releases forgotten; a write
    /// NSX refuses leaves its key failed, and so every later operation that depends on it.
    /// Returns whether anything was refused.
    fn play(
        plan: &crate::ncp::plan::Plan,
        desired: &crate::ncp::vocab::Desired,
        o: &mut crate::ncp::observe::Observed,
        known: &mut crate::ncp::observe::Known,
        infra: &crate::ncp::infra::Infra,
        n: &mut u32,
        refusals: Refusals,
    ) -> bool {
        use crate::ncp::plan::Op;
        use crate::ncp::render::render;
        let mut failed: BTreeSet<Key> = BTreeSet::new();
        let mut delete_refused = false;
        // The applier runs a phase's lanes concurrently, in any order: played here in the
        // reverse of the plan's, so that a body rendered from an object of its own phase
        // (created later in plan order) panics below.
        let reordered = crate::ncp::apply::phases(&plan.ops)
            .into_iter()
            .flat_map(|phase| phase.into_iter().rev().flatten());
        for op in reordered {
            *n += 1;
            match op {
                Op::Create { key, spec } | Op::Update { key, spec, .. } => {
                    if key
                        .deps(Some(&spec.detail))
                        .iter()
                        .any(|d| failed.contains(d))
                    {
                        failed.insert(key.clone());
                        continue;
                    }
                    let old = o.get(key).cloned();
                    if let Some(allocated) = refusals.pick(key) {
                        if let (Key::Snat(_), None, true) = (key, &old, allocated) {
                            o.snat_allocations.insert(format!("192.0.2.{}", *n % 250));
                        }
                        failed.insert(key.clone());
                        continue;
                    }
                    let address = match (key, &old) {
                        (_, Some(d)) if d.get("translated_network").is_some() => {
                            d["translated_network"].as_str().map(str::to_string)
                        }
                        (_, Some(d)) if d.get("ip_address").is_some() => {
                            d["ip_address"].as_str().map(str::to_string)
                        }
                        (Key::Snat(_), None) => Some(format!("192.0.2.{}", *n % 250)),
                        (Key::LbVirtualServer(_), None) => Some(format!("198.51.100.{}", *n % 250)),
                        _ => None,
                    };
                    if let (Key::Snat(_), Some(a), None) = (key, &address, &old) {
                        o.snat_allocations.insert(a.clone());
                    }
                    if let (Key::LbVirtualServer(v), Some(a), None) = (key, &address, &old) {
                        o.lb_vips.insert(
                            v.split('/').next().unwrap_or_default().to_string(),
                            a.clone(),
                        );
                    }
                    let mut doc = render(key, spec, infra, &*o, address.as_deref())
                        .unwrap_or_else(|e| panic!("dependencies first: {key:?}: {e:?}"));
                    doc["id"] = old
                        .as_ref()
                        .map_or(json!(format!("id-{n}")), |d| d["id"].clone());
                    doc["_create_time"] = json!(*n);
                    if let Key::Subnet(_) = key {
                        doc["cidr"] = old
                            .as_ref()
                            .map_or(json!(format!("10.4.{}.0/24", *n % 250)), |d| {
                                d["cidr"].clone()
                            });
                    }
                    if let (Key::PolicyGroup(_) | Key::NsGroup(_), Some(d)) = (key, &old) {
                        doc["_create_time"] = d["_create_time"].clone();
                    }
                    o.put(key.clone(), doc);
                }
                Op::Delete { key, doc } => {
                    // Deletes go dependents first: once one is refused, NSX refuses the rest
                    // (what they would leave behind is still in use).
                    if delete_refused || refusals.pick(key).is_some() {
                        delete_refused = true;
                        failed.insert(key.clone());
                        continue;
                    }
                    let id = doc["id"].as_str().unwrap_or_default().to_string();
                    if let (Key::Snat(_), Some(ip)) =
                        (key, crate::ncp::plan::tag_of(doc, "ncp/snat_ip"))
                    {
                        o.snat_allocations.remove(ip);
                    }
                    o.remove(key, &id);
                }
                Op::ReleaseIp { ip, .. } => {
                    o.snat_allocations.remove(ip);
                    o.lb_vips.retain(|_, v| v != ip);
                }
            }
        }
        let refused = !failed.is_empty();
        let left = plan
            .unrealizable
            .iter()
            .map(|u| u.key.clone())
            .chain(failed)
            .collect();
        *known = crate::ncp::plan::settle(o, desired, left);
        refused
    }

    static PASSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static INCREMENTAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    /// Incremental passes that retried refused keys other than pod ports.
    static RETRIED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn plans_of_the_changed_keys_equal_full_plans() {
        plans_of_the_changed_keys_equal_full_plans_cases();
        // The comparison means something only if the incremental planner often answers (it
        // declines when an existing object is to be recreated, or the cache is not synced),
        // and if it answers after refusals too.
        let load =
            |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::Relaxed);
        let (passes, incremental, retried) = (load(&PASSES), load(&INCREMENTAL), load(&RETRIED));
        // 40%: an egress rule's named port now reaches pods through a group, and passes that
        // create or retry such groups plan in full; measured 185 to 235 of 393 passes over
        // eight runs (65% before named ports resolved per pod).
        assert!(
            incremental * 5 > passes * 2,
            "{incremental} of {passes} passes incremental"
        );
        assert!(
            retried * 20 > passes,
            "{retried} of {passes} passes retried refused objects"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// A running NCP's plan over the keys that changed (and those NSX refused before) is
        /// the plan over every key, through a chain of changes where each pass's result is the
        /// next one's cache, and NSX refuses some writes of some passes.
        fn plans_of_the_changed_keys_equal_full_plans_cases(
            a in clusters(), b in clusters(), c in clusters(), d in clusters(),
            refusals in proptest::collection::vec(prop_oneof![Just(0u64), 1u64..1_000_000], 4),
        ) {
            let count = |c: &std::sync::atomic::AtomicUsize| {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            };
            let infra = infra();
            let views = [view(&a), view(&b), view(&c), view(&d)];
            let mut cache = DesiredCache::new(&views[0], "k8s-a", 24);
            let mut o = crate::ncp::observe::Observed::default();
            let mut k = crate::ncp::observe::Known::default();
            let mut n = 0;
            let first = crate::ncp::plan::plan(cache.desired(), &o, &infra);
            play(&first, cache.desired(), &mut o, &mut k, &infra, &mut n, Refusals(refusals[0]));
            for (pair, r) in views.windows(2).zip(&refusals[1..]) {
                let touched = cache.update(&pair[1], &ViewChanges::between(&pair[0], &pair[1]));
                let full = crate::ncp::plan::plan(cache.desired(), &o, &infra);
                let retrying = k.synced && k.pending.iter().any(|k| !matches!(k, Key::PodPort(_)));
                if let Some(inc) = crate::ncp::plan::plan_changes(cache.desired(), &o, &k, &infra, &touched) {
                    prop_assert_eq!(&inc, &full);
                    count(&INCREMENTAL);
                    if retrying {
                        count(&RETRIED);
                    }
                }
                count(&PASSES);
                let refused = play(&full, cache.desired(), &mut o, &mut k, &infra, &mut n, Refusals(*r));
                let again = crate::ncp::plan::plan(cache.desired(), &o, &infra);
                if !refused {
                    prop_assert!(again.ops.is_empty(), "not converged: {:?}", again.ops);
                }
                if let Some(inc) = crate::ncp::plan::plan_changes(cache.desired(), &o, &k, &infra, &BTreeSet::new()) {
                    prop_assert_eq!(inc, again);
                }
            }
            // NSX takes everything again: one retry converges, whether planned in full or not.
            let retry = crate::ncp::plan::plan(cache.desired(), &o, &infra);
            if let Some(inc) = crate::ncp::plan::plan_changes(cache.desired(), &o, &k, &infra, &BTreeSet::new()) {
                prop_assert_eq!(&inc, &retry);
            }
            play(&retry, cache.desired(), &mut o, &mut k, &infra, &mut n, Refusals(0));
            let done = crate::ncp::plan::plan(cache.desired(), &o, &infra);
            prop_assert!(done.ops.is_empty(), "not converged after the retry: {:?}", done.ops);
        }
    }

    #[test]
    fn a_pod_change_recomputes_that_pod_only() {
        let mut g = ClusterView::default();
        for n in 0..50 {
            g.add_namespace(fixture::namespace(
                &format!("ns-{n}"),
                &format!("uid-ns-{n}"),
            ));
            for p in 0..10 {
                g.add_pod(fixture::pod(
                    &format!("ns-{n}"),
                    &format!("pod-{p}"),
                    &format!("uid-{n}-{p}"),
                    "node-1",
                    &[("app", "web")],
                ));
            }
        }
        let mut cache = DesiredCache::new(&g, "k8s-a", 24);
        let before = g.clone();
        g.add_pod(fixture::pod(
            "ns-7",
            "pod-3",
            "uid-7-3",
            "node-1",
            &[("app", "db")],
        ));
        let touched = cache.update(&g, &ViewChanges::between(&before, &g));
        assert_eq!(touched, [Key::PodPort("uid-7-3".into())].into());
        // A status-only change (what NCP does not read) is no change at all.
        let before = g.clone();
        let mut pod = g.pods[&("ns-7".to_string(), "pod-4".to_string())].clone();
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.1.1.1".into()),
            ..Default::default()
        });
        g.add_pod(pod);
        assert!(ViewChanges::between(&before, &g).is_empty());
    }

    /// A node's address is what the node access section lets through: a node that joins,
    /// changes address or goes updates the IPSet, and nothing else; a heartbeat is no change.
    #[test]
    fn a_node_change_recomputes_the_node_access_set_only() {
        let node = |name: &str, ip: &str, heartbeat: &str| -> k8s_openapi::api::core::v1::Node {
            serde_json::from_value(json!({"metadata": {"name": name},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                    "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}]}}))
            .unwrap()
        };
        let mut g = ClusterView::default();
        g.add_namespace(fixture::namespace("ns-0", "uid-ns-0"));
        g.add_pod(fixture::pod(
            "ns-0",
            "pod-0",
            "uid-pod-0",
            "node-1",
            &[("app", "web")],
        ));
        g.add_network_policy(
            serde_json::from_value(
                json!({"metadata": {"name": "deny", "namespace": "ns-0", "uid": "uid-np"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
            )
            .unwrap(),
        );
        g.add_node(node("node-1", "172.16.0.11", "2026-01-01T00:00:00Z"));
        let mut cache = DesiredCache::new(&g, "k8s-a", 24);
        let ipset = Key::NodeIpSet("k8s-a".into());
        let addresses = |c: &DesiredCache| match &c.desired().objects[&ipset].detail {
            crate::ncp::vocab::Detail::IpSet { addresses } => addresses.clone(),
            d => panic!("{d:?}"),
        };
        assert_eq!(addresses(&cache), ["172.16.0.11"]);
        for (change, want) in [
            (
                Some(node("node-2", "172.16.0.12", "2026-01-01T00:00:00Z")),
                vec!["172.16.0.11", "172.16.0.12"],
            ),
            (
                Some(node("node-1", "172.16.0.21", "2026-01-01T00:00:00Z")),
                vec!["172.16.0.12", "172.16.0.21"],
            ),
            (None, vec!["172.16.0.21"]),
        ] {
            let before = g.clone();
            match change {
                Some(n) => g.add_node(n),
                None => {
                    g.nodes.remove("node-2");
                }
            }
            let touched = cache.update(&g, &ViewChanges::between(&before, &g));
            assert_eq!(touched, [ipset.clone()].into());
            assert_eq!(addresses(&cache), want);
            assert_eq!(cache.desired(), &desired(&g, "k8s-a", 24));
        }
        let before = g.clone();
        g.add_node(node("node-1", "172.16.0.21", "2026-01-01T00:00:10Z"));
        assert!(ViewChanges::between(&before, &g).is_empty());
    }
}
