//! Leader election on a Kubernetes Lease, with fencing, for running NCP with several replicas.
//!
//! **Protocol**: the Lease `ncp-<cluster>` holds the leader's identity and when it last renewed.
//! A replica takes the Lease when it is free or expired (`renewTime + leaseDurationSeconds` in
//! the past) and keeps it by renewing every `retry_period`. Every write to the Lease is a PUT
//! with the `resourceVersion` read, so two replicas racing for it cannot both win.
//!
//! **Fencing**: a leader may write (to NSX or to Kubernetes) only while its [`Fence`] is valid,
//! that is until `renew_deadline` after the start of its last successful renewal. Since
//! `renew_deadline < lease_duration`, a leader cut off from the apiserver stops writing at least
//! `lease_duration - renew_deadline` before any other replica can take the Lease over. The
//! margin must cover the longest time a write can spend in flight; NSX offers no fencing token
//! of its own, so this timing argument is the fence. (Clocks: the fence runs on the replica's
//! monotonic clock; expiry is judged on `renewTime`, wall time, so hosts' clocks must agree to
//! well within the margin, as for any Lease-based election.)
//!
//! State machine, as `step` in kube-runtime style:
//! - `Follower`: try to acquire every `retry_period`; on success -> `Leader`.
//! - `Leader`: renew every `retry_period`; a success extends the fence; once the fence has
//!   lapsed (renewals failing for `renew_deadline`) -> `Follower`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// Election settings (NCP's `[ha]` section: master_timeout, update_timeout, heartbeat_period).
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderConfig {
    pub fn new(cluster: &str, identity: &str) -> Self {
        Self {
            namespace: "kube-system".into(),
            lease_name: format!("ncp-{cluster}"),
            identity: identity.into(),
            lease_duration: Duration::from_secs(18),
            renew_deadline: Duration::from_secs(12),
            retry_period: Duration::from_secs(6),
        }
    }
}

/// Whether this replica may write right now. Checked before every write.
#[derive(Debug, Default)]
pub struct Fence {
    valid_until: Mutex<Option<Instant>>,
}

impl Fence {
    pub fn allows_writes(&self) -> bool {
        self.valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|u| Instant::now() < u)
    }

    fn extend(&self, until: Instant) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
    }

    fn revoke(&self) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// When the fence lapses, if it is up.
    pub fn valid_until(&self) -> Option<Instant> {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl crate::nsx::client::WriteFence for Fence {
    fn writes_until(&self) -> Option<Instant> {
        self.valid_until().filter(|u| Instant::now() < *u)
    }
}

/// A replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    /// Wall-clock milliseconds (simulated time in the harness).
    now_ms: Arc<dyn Fn() -> i64 + Send + Sync>,
    pub fence: Arc<Fence>,
}

fn micro(ms: i64) -> Option<MicroTime> {
    Timestamp::from_millisecond(ms).ok().map(MicroTime)
}

impl Elector {
    pub fn new(
        kube: kube::Client,
        config: LeaderConfig,
        now_ms: Arc<dyn Fn() -> i64 + Send + Sync>,
    ) -> Self {
        Self {
            api: Api::namespaced(kube, &config.namespace),
            config,
            now_ms,
            fence: Arc::new(Fence::default()),
        }
    }

    /// One attempt to acquire or renew. `Ok(true)` when this replica holds the Lease now; the
    /// fence is extended from the moment the attempt started.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let started = Instant::now();
        let now = (self.now_ms)();
        let duration_s = self.config.lease_duration.as_secs() as i32;
        let me = self.config.identity.clone();
        let won = match self.api.get_opt(&self.config.lease_name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.lease_name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.clone()),
                        lease_duration_seconds: Some(duration_s),
                        acquire_time: micro(now),
                        renew_time: micro(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => true,
                    Err(kube::Error::Api(s)) if s.code == 409 => false,
                    Err(e) => return Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let holder = spec.holder_identity.clone().unwrap_or_default();
                let renewed_ms = spec.renew_time.as_ref().map_or(0, |t| t.0.as_millisecond());
                let duration_ms =
                    i64::from(spec.lease_duration_seconds.unwrap_or(duration_s)) * 1000;
                let mine = holder == me;
                if !mine && !holder.is_empty() && now <= renewed_ms + duration_ms {
                    return Ok(self.lost());
                }
                lease.spec = Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration_s),
                    acquire_time: if mine {
                        spec.acquire_time.clone()
                    } else {
                        micro(now)
                    },
                    renew_time: micro(now),
                    lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
                    ..spec
                });
                match self
                    .api
                    .replace(&self.config.lease_name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => true,
                    Err(kube::Error::Api(s)) if s.code == 409 => false,
                    Err(e) => return Err(e),
                }
            }
        };
        if won {
            self.fence.extend(started + self.config.renew_deadline);
            Ok(true)
        } else {
            Ok(self.lost())
        }
    }

    fn lost(&self) -> bool {
        self.fence.revoke();
        false
    }
}

/// What happened to this replica's leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    Acquired,
    Lost,
}

/// Runs `work` while this replica leads, restarting it each time leadership is regained and
/// dropping it (and so stopping every write it had in progress) as soon as the fence lapses.
pub async fn run_elected<F, Fut>(
    elector: Elector,
    mut on_change: impl FnMut(Leadership),
    mut work: F,
) where
    F: FnMut(Arc<Fence>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let period = elector.config.retry_period;
    loop {
        // Follower.
        loop {
            match elector.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "lease attempt failed"),
            }
            tokio::time::sleep(period).await;
        }
        on_change(Leadership::Acquired);
        // Leader: work and renew side by side; leadership ends when the fence lapses.
        let renew = async {
            loop {
                let until = elector.fence.valid_until();
                let next = Instant::now() + period;
                match until {
                    Some(u) if u <= next => tokio::time::sleep_until(u).await,
                    _ => tokio::time::sleep(period).await,
                }
                if !elector.fence.allows_writes() {
                    return;
                }
                // A renewal that hangs (an apiserver that does not answer) must not keep this
                // replica leading past its fence: it is abandoned when the fence falls.
                let Some(until) = elector.fence.valid_until() else {
                    return;
                };
                match tokio::time::timeout_at(until, elector.try_acquire_or_renew()).await {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) | Err(_) => return,
                    Ok(Err(e)) => tracing::debug!(error = %e, "lease renewal failed"),
                }
                if !elector.fence.allows_writes() {
                    return;
                }
            }
        };
        tokio::select! {
                biased;
            _ = renew => {}
            _ = work(elector.fence.clone()) => {}
        }
        elector.fence.revoke();
        on_change(Leadership::Lost);
    }
}
