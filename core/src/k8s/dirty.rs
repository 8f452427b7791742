//! Which objects changed, as watch events name them: what a consumer brings its own copy of the
//! stores up to date with, instead of comparing whole stores on every change.

use std::collections::{BTreeMap, BTreeSet};

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

/// The objects of one kind that watch events named, by (namespace, name) (an empty namespace
/// for cluster-scoped kinds); `relisted` when the watch started over and the store was
/// replaced wholesale (deletions in the gap have no event of their own).
#[derive(Debug, Default)]
pub struct KindDirty {
    pub keys: BTreeSet<(String, String)>,
    pub relisted: bool,
}

impl KindDirty {
    pub fn record<K: kube::Resource>(&mut self, event: &watcher::Event<K>) {
        match event {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                let m = o.meta();
                self.keys.insert((
                    m.namespace.clone().unwrap_or_default(),
                    m.name.clone().unwrap_or_default(),
                ));
            }
            watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::InitDone => {
                self.relisted = true;
            }
        }
    }
}

/// What changed in the stores since the last pass, per kind.
#[derive(Debug, Default)]
pub struct Dirty {
    pub namespaces: KindDirty,
    pub pods: KindDirty,
    pub nodes: KindDirty,
    pub services: KindDirty,
    pub endpoint_slices: KindDirty,
    pub network_policies: KindDirty,
}

/// Brings one kind of `view` up to date with its store for the objects `dirty` names (every
/// object after a relist), and adds to `out` those whose fingerprint changed.
pub fn refresh_kind<K, Q>(
    store: &Store<K>,
    map: &mut BTreeMap<Q, K>,
    dirty: KindDirty,
    key_of: impl Fn(&(String, String)) -> Q,
    fingerprint: fn(&K) -> u64,
    out: &mut BTreeSet<Q>,
) where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    Q: Ord + Clone,
{
    let name_of = |o: &K| {
        let m = o.meta();
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    };
    if dirty.relisted {
        let fresh: BTreeMap<Q, K> = store
            .state()
            .iter()
            .map(|o| (key_of(&name_of(o)), (**o).clone()))
            .collect();
        super::diff_maps(map, &fresh, fingerprint, out);
        *map = fresh;
        return;
    }
    for (ns, name) in dirty.keys {
        let mut r = ObjectRef::<K>::new(&name);
        if !ns.is_empty() {
            r = r.within(&ns);
        }
        let key = key_of(&(ns, name));
        let now = store.get(&r);
        let before = map.get(&key).map(fingerprint);
        if now.as_deref().map(fingerprint) == before {
            continue;
        }
        out.insert(key.clone());
        match now {
            Some(o) => {
                map.insert(key, (*o).clone());
            }
            None => {
                map.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::reflector;

    use super::*;
    use crate::k8s::{fingerprint, fixture};

    fn key(p: &Pod) -> (String, String) {
        (
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// The events into the store, and what they name.
    fn feed(
        writer: &mut reflector::store::Writer<Pod>,
        events: Vec<watcher::Event<Pod>>,
    ) -> KindDirty {
        let mut dirty = KindDirty::default();
        for e in events {
            writer.apply_watcher_event(&e);
            dirty.record(&e);
        }
        dirty
    }

    /// The keys `refresh_kind` reports changed.
    fn refresh(
        store: &reflector::Store<Pod>,
        view: &mut BTreeMap<(String, String), Pod>,
        dirty: KindDirty,
    ) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        refresh_kind(store, view, dirty, Clone::clone, fingerprint::pod, &mut out);
        out
    }

    #[test]
    fn named_objects_are_brought_up_to_date_and_a_relist_finds_silent_deletions() {
        let (store, mut writer) = reflector::store::<Pod>();
        let a = fixture::pod("shop", "a", "uid-a", "node-1", &[("app", "web")]);
        let b = fixture::pod("shop", "b", "uid-b", "node-1", &[]);
        let dirty = feed(
            &mut writer,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(a.clone()),
                watcher::Event::InitApply(b.clone()),
                watcher::Event::InitDone,
            ],
        );
        let mut view: BTreeMap<(String, String), Pod> = BTreeMap::new();
        let out = refresh(&store, &mut view, dirty);
        assert_eq!(out, [key(&a), key(&b)].into());
        assert_eq!(view.len(), 2);

        // A status-only change is taken in without being a change; a relabel is one.
        let mut a_status = a.clone();
        a_status.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.0.0.5".into()),
            ..Default::default()
        });
        let mut b_relabelled = b.clone();
        b_relabelled.metadata.labels = Some([("app".to_string(), "db".to_string())].into());
        let dirty = feed(
            &mut writer,
            vec![
                watcher::Event::Apply(a_status),
                watcher::Event::Apply(b_relabelled.clone()),
            ],
        );
        assert!(!dirty.relisted);
        let out = refresh(&store, &mut view, dirty);
        assert_eq!(out, [key(&b)].into());
        assert_eq!(view[&key(&b)], b_relabelled);

        // A relist after a gap: `a` went away with no event of its own, `c` is new.
        let c = fixture::pod("shop", "c", "uid-c", "node-2", &[]);
        let dirty = feed(
            &mut writer,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(b_relabelled.clone()),
                watcher::Event::InitApply(c.clone()),
                watcher::Event::InitDone,
            ],
        );
        let out = refresh(&store, &mut view, dirty);
        assert_eq!(out, [key(&a), key(&c)].into());
        assert_eq!(
            view.keys().cloned().collect::<Vec<_>>(),
            vec![key(&b), key(&c)]
        );

        // A delete event.
        let dirty = feed(&mut writer, vec![watcher::Event::Delete(c.clone())]);
        let out = refresh(&store, &mut view, dirty);
        assert_eq!(out, [key(&c)].into());
        assert!(!view.contains_key(&key(&c)));
    }
}
