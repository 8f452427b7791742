//! The proxy's service ports, kept up to date from watch events one service at a time.
//!
//! A watch event names one Service or EndpointSlice; only the service it belongs to is compiled
//! again (its slices found through an index, not by scanning every slice), and only the service
//! ports whose compiled form changed are handed to [`super::Proxy::sync`]. So an endpoint
//! change costs that service's size, not the cluster's. A relist (the watch started over)
//! rebuilds everything, since deletions in the gap have no event of their own.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use super::model::{SERVICE_NAME_LABEL, service_ports};
use super::{ServicePort, ServicePortKey};
use crate::k8s::dirty::KindDirty;

/// `(namespace, name)`.
type Name = (String, String);

/// What the watch events since the last refresh named.
#[derive(Debug, Default)]
pub struct ProxyEvents {
    services: KindDirty,
    slices: KindDirty,
}

impl ProxyEvents {
    pub fn service(&mut self, event: &watcher::Event<Service>) {
        self.services.record(event);
    }

    pub fn slice(&mut self, event: &watcher::Event<EndpointSlice>) {
        self.slices.record(event);
    }
}

/// Every service port this node programs, with the indexes that find what an event touches.
#[derive(Debug)]
pub struct ProxyView {
    node: String,
    /// Nothing built yet: the first refresh builds everything.
    fresh: bool,
    /// A slice's service (its `kubernetes.io/service-name` label) when last seen.
    slice_owner: BTreeMap<Name, String>,
    /// A service's slices, by name.
    slices_of: BTreeMap<Name, BTreeSet<String>>,
    /// A service's ports, as last compiled.
    ports_of: BTreeMap<Name, Vec<ServicePortKey>>,
    want: BTreeMap<ServicePortKey, ServicePort>,
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Name {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn owner_of(slice: &EndpointSlice) -> Option<String> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL).cloned())
}

impl ProxyView {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            fresh: true,
            slice_owner: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            ports_of: BTreeMap::new(),
            want: BTreeMap::new(),
        }
    }

    /// The service ports to program, by key.
    pub fn want(&self) -> &BTreeMap<ServicePortKey, ServicePort> {
        &self.want
    }

    /// Brings the view up to date with the stores for what `events` named (everything after a
    /// relist, or the first time); returns the service ports whose compiled form changed,
    /// appeared or went away.
    pub fn refresh(
        &mut self,
        services: &Store<Service>,
        slices: &Store<EndpointSlice>,
        events: ProxyEvents,
    ) -> BTreeSet<ServicePortKey> {
        let mut touched: BTreeSet<Name> = BTreeSet::new();
        if self.fresh || events.services.relisted || events.slices.relisted {
            self.fresh = false;
            self.slice_owner.clear();
            self.slices_of.clear();
            for s in slices.state() {
                if let Some(owner) = owner_of(&s) {
                    let (ns, name) = name_of(&s.metadata);
                    self.slices_of
                        .entry((ns.clone(), owner.clone()))
                        .or_default()
                        .insert(name.clone());
                    self.slice_owner.insert((ns, name), owner);
                }
            }
            touched.extend(self.ports_of.keys().cloned());
            touched.extend(services.state().iter().map(|s| name_of(&s.metadata)));
        } else {
            touched.extend(events.services.keys);
            for (ns, name) in events.slices.keys {
                let key = (ns.clone(), name.clone());
                if let Some(old) = self.slice_owner.remove(&key) {
                    let svc = (ns.clone(), old);
                    if let Some(set) = self.slices_of.get_mut(&svc) {
                        set.remove(&name);
                        if set.is_empty() {
                            self.slices_of.remove(&svc);
                        }
                    }
                    touched.insert(svc);
                }
                let now = slices.get(&ObjectRef::new(&name).within(&ns));
                if let Some(owner) = now.as_deref().and_then(owner_of) {
                    self.slices_of
                        .entry((ns.clone(), owner.clone()))
                        .or_default()
                        .insert(name.clone());
                    self.slice_owner.insert(key, owner.clone());
                    touched.insert((ns, owner));
                }
            }
        }
        let mut changed = BTreeSet::new();
        for svc in touched {
            self.compile(services, slices, svc, &mut changed);
        }
        changed
    }

    /// Compiles one service again and records which of its ports changed.
    fn compile(
        &mut self,
        services: &Store<Service>,
        slices: &Store<EndpointSlice>,
        svc: Name,
        changed: &mut BTreeSet<ServicePortKey>,
    ) {
        let (ns, name) = &svc;
        let ports = match services.get(&ObjectRef::new(name).within(ns)) {
            Some(s) => {
                let mine: Vec<_> = self
                    .slices_of
                    .get(&svc)
                    .into_iter()
                    .flatten()
                    .filter_map(|n| slices.get(&ObjectRef::new(n).within(ns)))
                    .collect();
                service_ports(&s, mine.iter().map(|s| &**s), &self.node)
            }
            None => Vec::new(),
        };
        let old = self.ports_of.remove(&svc).unwrap_or_default();
        let keys: Vec<ServicePortKey> = ports.iter().map(|p| p.key.clone()).collect();
        for k in old {
            if !keys.contains(&k) {
                self.want.remove(&k);
                changed.insert(k);
            }
        }
        for p in ports {
            if self.want.get(&p.key) != Some(&p) {
                changed.insert(p.key.clone());
                self.want.insert(p.key.clone(), p);
            }
        }
        if !keys.is_empty() {
            self.ports_of.insert(svc, keys);
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ServicePort as K8sPort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::runtime::reflector;
    use proptest::prelude::*;

    use super::*;
    use crate::proxy::all_service_ports;

    fn service(ns: &str, name: &str, ip: u8, ports: &[i32]) -> Service {
        let mut s = Service::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.spec = Some(ServiceSpec {
            cluster_ip: Some(format!("10.96.0.{ip}")),
            ports: Some(
                ports
                    .iter()
                    .map(|p| K8sPort {
                        name: Some(format!("p{p}")),
                        port: *p,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        s
    }

    fn slice(ns: &str, name: &str, owner: &str, ips: &[u8], port: i32) -> EndpointSlice {
        let mut s = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: ips
                .iter()
                .map(|i| Endpoint {
                    addresses: vec![format!("10.4.0.{i}")],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some(format!("p{port}")),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), owner.to_string())].into());
        s
    }

    /// One change to the cluster.
    #[derive(Debug, Clone)]
    enum Change {
        Service {
            ns: u8,
            name: u8,
            ports: Vec<i32>,
        },
        DeleteService {
            ns: u8,
            name: u8,
        },
        /// A slice of service `owner` (moved to it when it was another's).
        Slice {
            ns: u8,
            slice: u8,
            owner: u8,
            ips: Vec<u8>,
            port: i32,
        },
        DeleteSlice {
            ns: u8,
            slice: u8,
        },
        /// One watch or the other starts over.
        Relist {
            services: bool,
        },
    }

    fn change() -> impl Strategy<Value = Change> {
        let port = prop_oneof![Just(80), Just(443)];
        prop_oneof![
            (
                0u8..2,
                0u8..3,
                proptest::collection::vec(port.clone(), 0..3)
            )
                .prop_map(|(ns, name, ports)| Change::Service { ns, name, ports }),
            (0u8..2, 0u8..3).prop_map(|(ns, name)| Change::DeleteService { ns, name }),
            (
                0u8..2,
                0u8..4,
                0u8..3,
                proptest::collection::vec(1u8..20, 0..4),
                port
            )
                .prop_map(|(ns, slice, owner, ips, port)| Change::Slice {
                    ns,
                    slice,
                    owner,
                    ips,
                    port
                }),
            (0u8..2, 0u8..4).prop_map(|(ns, slice)| Change::DeleteSlice { ns, slice }),
            any::<bool>().prop_map(|services| Change::Relist { services }),
        ]
    }

    proptest! {
        /// Under random churn of services and slices (slices moving between services, relists
        /// that drop objects silently), the view kept from events equals the ports compiled
        /// from scratch from the stores, and every port that differs from the previous state
        /// is reported changed.
        #[test]
        fn the_view_kept_from_events_equals_a_full_compilation(
            changes in proptest::collection::vec(change(), 1..40)
        ) {
            let (services, mut sw) = reflector::store::<Service>();
            let (slices, mut lw) = reflector::store::<EndpointSlice>();
            let mut view = ProxyView::new("node-1");
            let mut before = BTreeMap::new();
            let mut ip = 0u8;
            for c in changes {
                let mut events = ProxyEvents::default();
                match c {
                    Change::Service { ns, name, ports } => {
                        ip = ip.wrapping_add(1);
                        let e = watcher::Event::Apply(service(&format!("ns{ns}"), &format!("s{name}"), ip, &ports));
                        sw.apply_watcher_event(&e);
                        events.service(&e);
                    }
                    Change::DeleteService { ns, name } => {
                        let e = watcher::Event::Delete(service(&format!("ns{ns}"), &format!("s{name}"), 0, &[]));
                        sw.apply_watcher_event(&e);
                        events.service(&e);
                    }
                    Change::Slice { ns, slice: n, owner, ips, port } => {
                        let e = watcher::Event::Apply(slice(&format!("ns{ns}"), &format!("e{n}"), &format!("s{owner}"), &ips, port));
                        lw.apply_watcher_event(&e);
                        events.slice(&e);
                    }
                    Change::DeleteSlice { ns, slice: n } => {
                        let e = watcher::Event::Delete(slice(&format!("ns{ns}"), &format!("e{n}"), "s0", &[], 80));
                        lw.apply_watcher_event(&e);
                        events.slice(&e);
                    }
                    Change::Relist { services: true } => {
                        // The watch starts over without the first service (by name): the
                        // relist is the only news of its deletion.
                        let mut keep: Vec<Service> = services.state().iter().map(|s| (**s).clone()).collect();
                        keep.sort_by_key(|s| name_of(&s.metadata));
                        keep.drain(..keep.len().min(1));
                        for e in std::iter::once(watcher::Event::Init)
                            .chain(keep.into_iter().map(watcher::Event::InitApply))
                            .chain(std::iter::once(watcher::Event::InitDone))
                        {
                            sw.apply_watcher_event(&e);
                            events.service(&e);
                        }
                    }
                    Change::Relist { services: false } => {
                        let mut keep: Vec<EndpointSlice> = slices.state().iter().map(|s| (**s).clone()).collect();
                        keep.sort_by_key(|s| name_of(&s.metadata));
                        keep.drain(..keep.len().min(1));
                        for e in std::iter::once(watcher::Event::Init)
                            .chain(keep.into_iter().map(watcher::Event::InitApply))
                            .chain(std::iter::once(watcher::Event::InitDone))
                        {
                            lw.apply_watcher_event(&e);
                            events.slice(&e);
                        }
                    }
                }
                let changed = view.refresh(&services, &slices, events);
                let by_key: BTreeMap<(String, String), EndpointSlice> = slices
                    .state()
                    .iter()
                    .map(|s| (name_of(&s.metadata), (**s).clone()))
                    .collect();
                let svcs = services.state();
                let full = all_service_ports(svcs.iter().map(|s| &**s), &by_key, "node-1");
                prop_assert_eq!(view.want(), &full);
                let keys: BTreeSet<&ServicePortKey> = before.keys().chain(full.keys()).collect();
                for k in keys {
                    if before.get(k) != full.get(k) {
                        prop_assert!(changed.contains(k), "{} changed but was not reported", k);
                    }
                }
                before = full;
            }
        }
    }
}
