//! Watching one kind: kube-runtime's watcher into a reflector store, with a change signal and
//! a seeded backoff (so a simulated run repeats exactly, watch errors included).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

/// Watch-retry backoff: exponential from 800 ms to 30 s with jitter from a seeded source.
/// kube-runtime's default draws its jitter from the OS, which would make a simulated run
/// unrepeatable after the first watch error.
pub struct WatchBackoff {
    next_ms: u64,
    rng: crate::rng::SeededRng,
}

impl WatchBackoff {
    pub fn new(seed: u64) -> Self {
        Self {
            next_ms: 800,
            rng: crate::rng::SeededRng::new(seed),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let base = self.next_ms;
        self.next_ms = (self.next_ms * 2).min(30_000);
        Some(Duration::from_millis(self.rng.range_u64(base / 2, base)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next_ms = 800;
    }
}

/// Counts watch events and how many of them a consumer has taken in: the difference is the
/// depth of its work queue (changes seen but not yet reconciled), a metric operators watch.
#[derive(Debug, Default)]
pub struct WatchProgress {
    seen: std::sync::atomic::AtomicU64,
    taken: std::sync::atomic::AtomicU64,
}

impl WatchProgress {
    fn record(&self) {
        self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Events received so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The consumer is about to read the stores: everything seen so far is taken in.
    pub fn take(&self) {
        self.taken
            .store(self.seen(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Events seen since the consumer last took them in.
    pub fn pending(&self) -> u64 {
        self.seen()
            .saturating_sub(self.taken.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// What a watch can keep in a store: a Kubernetes kind known at compile time.
pub trait Watchable:
    kube::Resource<DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Watchable for K where
    K: kube::Resource<DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Starts watching `api` into a store; every event notifies `changed` (and counts in
/// `progress`, when given), and `on_event` sees it once the store holds it: how a consumer
/// learns which objects changed rather than comparing whole stores. The task runs until
/// aborted or the runtime ends.
pub fn watch<K, F>(
    api: Api<K>,
    changed: Arc<Notify>,
    progress: Option<Arc<WatchProgress>>,
    on_event: F,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    F: FnMut(&watcher::Event<K>) + Send + 'static,
    K: Watchable,
{
    watch_with(api, watcher::Config::default(), changed, progress, on_event)
}

/// [`watch`] with the watch's own settings (a field or label selector).
pub fn watch_with<K, F>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    progress: Option<Arc<WatchProgress>>,
    mut on_event: F,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    F: FnMut(&watcher::Event<K>) + Send + 'static,
    K: Watchable,
{
    let (reader, writer) = reflector::store();
    // Seeded jitter: kube-runtime's default backoff draws from the OS.
    let seed = crate::hash::stable_hash(std::any::type_name::<K>());
    let stream = reflector::reflector(
        writer,
        watcher::watcher(api, config).backoff(WatchBackoff::new(seed)),
    );
    let handle = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match &event {
                Err(e) => {
                    tracing::debug!(error = %e, "watch error; the watcher recovers by itself");
                }
                Ok(event) => {
                    on_event(event);
                    if let Some(p) = &progress {
                        p.record();
                    }
                }
            }
            changed.notify_one();
        }
    });
    (reader, handle)
}
