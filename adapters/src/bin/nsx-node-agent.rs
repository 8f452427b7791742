//! `nsx-node-agent`: what runs on every node, as the DaemonSet's two containers.
//!
//! - `nsx-node-agent agent`: wires pods into Open vSwitch (the pod's port, its VLAN on the
//!   way to the uplink, SpoofGuard) and serves the CNI plugin on a Unix socket; reads NCP's
//!   pod annotation from the Kubernetes API while an ADD waits.
//! - `nsx-node-agent kube-proxy`: nsx-kube-proxy, ClusterIP and NodePort services as select
//!   groups and conntrack NAT on the same bridge, from watches of Services and EndpointSlices.
//!
//! Both drive the node's real OVS through `ovs-vsctl`/`ovs-ofctl`/`ovs-appctl` (the host's
//! `/var/run/openvswitch` mounted), rebuild their view from the bridge on start, and look for
//! one of their own flows every `--ovs-check-ms`: when it is gone (ovs-vswitchd restarted, or
//! someone deleted it) they install everything again.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use nsx_adapters::kube_client;
use nsx_adapters::metrics::{NodeMetrics, exposition_router};
use nsx_adapters::openflow::Session;
use nsx_adapters::ovs::{OvsBridge, OvsTools};
use nsx_core::agent::kube_pods::WatchedPods;
use nsx_core::agent::server::{AgentService, WaitConfig};
use nsx_core::agent::wiring::AGENT_STATIC_COOKIE;
use nsx_core::agent::{Agent, AgentConfig};
use nsx_core::cni::DEFAULT_AGENT_SOCKET;
use nsx_core::ovs::pipeline::{self, Category, Cookie};
use nsx_core::proxy::run::{ProxySignals, Synced, Timing};
use nsx_core::proxy::{Proxy, ProxyConfig};
use tokio::sync::Mutex;

/// A proxy's full sync allocates 100,000s of flows at once; mimalloc does it in a fraction of
/// glibc's time (`proxy/full_sync` runs with it too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "NSX node agent and nsx-kube-proxy: pods and ClusterIP services in Open vSwitch"
)]
struct Args {
    #[command(subcommand)]
    command: Role,
    /// This node's name (the DaemonSet passes `spec.nodeName`).
    #[arg(long, env = "NODE_NAME", global = true)]
    node_name: Option<String>,
    /// The integration bridge.
    #[arg(long, default_value = "br-int", global = true)]
    bridge: String,
    /// A kubeconfig instead of the in-cluster service account.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// OVSDB for ovs-vsctl (default: the system socket).
    #[arg(long, global = true)]
    ovs_db: Option<String>,
    /// ovs-vswitchd's run directory, where `<bridge>.mgmt` and the control socket are.
    #[arg(long, global = true)]
    ovs_rundir: Option<PathBuf>,
    /// How often to look for one of this process's flows (a restart of ovs-vswitchd
    /// removes them all).
    #[arg(long, default_value_t = 2000, global = true,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    ovs_check_ms: u64,
    /// `/metrics`, `/healthz`, `/readyz` (none when not given).
    #[arg(long, global = true)]
    metrics_listen: Option<SocketAddr>,
    /// Log lines as JSON objects.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// The node agent: pod wiring and the CNI server.
    Agent {
        /// The bridge's uplink port (the node VM's NIC to the NSX segment).
        #[arg(long, default_value = "eth1")]
        uplink: String,
        /// Where the CNI plugin connects.
        #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
        cni_socket: PathBuf,
        /// How long an ADD waits for NCP's pod annotation.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        annotation_timeout_seconds: u64,
    },
    /// nsx-kube-proxy: Services and EndpointSlices to flows and groups.
    KubeProxy {
        /// This node's addresses, for NodePort (repeat for several).
        #[arg(long = "node-ip")]
        node_ips: Vec<Ipv4Addr>,
        /// Quiet time gathering a burst of watch events into one bundle.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=60_000))]
        debounce_ms: u64,
    },
}

fn tools(args: &Args) -> anyhow::Result<OvsTools> {
    let mut t = OvsTools::system()?;
    t.db = args.ovs_db.clone();
    if let Some(dir) = &args.ovs_rundir {
        t.env
            .push(("OVS_RUNDIR".into(), dir.to_string_lossy().into_owned()));
    }
    Ok(t)
}

async fn serve_metrics(
    listen: Option<SocketAddr>,
    metrics: Arc<NodeMetrics>,
) -> anyhow::Result<()> {
    let Some(addr) = listen else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics server to {addr}"))?;
    tracing::info!(listen = %addr, "metrics and health endpoints up");
    let app = exposition_router(metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// Until SIGTERM or SIGINT.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A Unix socket at `path` only this node's root can use; a stale file from a previous
/// agent is replaced.
fn bind_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a previous agent's socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the CNI socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

async fn run_agent(
    args: &Args,
    node_name: &str,
    uplink: &str,
    socket: &Path,
    timeout: Duration,
    metrics: Arc<NodeMetrics>,
) -> anyhow::Result<()> {
    let tools = tools(args)?;
    let bridge = OvsBridge::new(&args.bridge, tools);
    let uplink_port = bridge.require_port(uplink)?;
    let kube = kube_client::client(args.kubeconfig.as_deref()).await?;
    // The view from the ports' external ids, then every pod's flows again (idempotent): OVS
    // may have restarted while the agent was down.
    let mut agent = Agent::new(AgentConfig {
        uplink: uplink_port,
    });
    let mut bridge = bridge;
    agent.recover(&bridge);
    agent
        .replay(&mut bridge)
        .context("installing the agent's flows")?;
    tracing::info!(
        bridge = %args.bridge,
        uplink,
        uplink_port,
        pods = agent.pods().len(),
        "recovered pods from the bridge's ports"
    );
    metrics
        .pods_wired
        .store(agent.pods().len() as u64, Ordering::Relaxed);
    let watcher = bridge.clone();
    let service = Arc::new(AgentService {
        agent: Mutex::new(agent),
        switch: Arc::new(Mutex::new(bridge)),
        pods: WatchedPods::start(kube, node_name),
        wait: WaitConfig {
            timeout,
            poll: Duration::from_millis(250),
        },
    });
    let listener = bind_socket(socket)?;
    tracing::info!(socket = %socket.display(), "serving the CNI plugin");
    metrics.ready.store(true, Ordering::Relaxed);
    {
        let s = service.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let s = s.clone();
                        tokio::spawn(async move {
                            if let Err(e) = s.serve(stream).await {
                                tracing::debug!(error = %e, "CNI connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a CNI connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    let check = Duration::from_millis(args.ovs_check_ms.max(100));
    let watch = async {
        loop {
            tokio::time::sleep(check).await;
            metrics.pods_wired.store(
                service.agent.lock().await.pods().len() as u64,
                Ordering::Relaxed,
            );
            match watcher.has_flow_with_cookie(AGENT_STATIC_COOKIE, u64::MAX) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the bridge's flows");
                    continue;
                }
            }
            let mut agent = service.agent.lock().await;
            let mut sw = service.switch.lock().await;
            // The ports survived in OVSDB, but a restarted ovs-vswitchd may have numbered them
            // anew: read them back before installing their flows.
            agent.recover(&*sw);
            match agent.replay(&mut *sw) {
                Ok(()) => {
                    metrics.ovs_replays.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        pods = agent.pods().len(),
                        "the agent's flows were gone (ovs-vswitchd restarted?): replayed"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "replay failed; trying again"),
            }
        }
    };
    tokio::select! {
        _ = watch => {}
        _ = terminated() => tracing::info!("terminating"),
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// Answers, on a thread of its own, the packets the proxy's flows send to the controller
/// (a service port without endpoints, a port a ClusterIP does not serve) with what kube-proxy's
/// REJECT sends: a real Open vSwitch has no action for it, and would drop them silently. It
/// connects again whenever the connection ends (ovs-vswitchd restarted).
fn answer_rejects(mgmt: PathBuf, metrics: Arc<NodeMetrics>) {
    let spawned = std::thread::Builder::new()
        .name("packet-in".into())
        .spawn(move || {
            loop {
                let served = Session::connect(&mgmt)
                    .map_err(|e| e.message)
                    .and_then(|s| {
                        s.serve_packet_ins(|cookie, frame| {
                            let ours = Cookie::parse(cookie).is_some_and(|c| {
                                matches!(c.category, Category::Service | Category::ClusterIp)
                            });
                            let reply = ours.then(|| nsx_adapters::reject::reply(frame)).flatten();
                            if reply.is_some() {
                                metrics.proxy_rejects.fetch_add(1, Ordering::Relaxed);
                            }
                            reply
                        })
                        .map_err(|e| e.to_string())
                    });
                if let Err(e) = served {
                    tracing::debug!(error = %e, "packet-in connection ended; connecting again");
                }
                // Soon: while it is away, rejected packets are dropped (a client then waits
                // for its SYN's retransmission).
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "no packet-in thread: rejected packets will be dropped");
    }
}

async fn run_proxy(
    args: &Args,
    node: String,
    node_ips: &[Ipv4Addr],
    debounce: Duration,
    metrics: Arc<NodeMetrics>,
) -> anyhow::Result<()> {
    let tools = tools(args)?;
    let bridge = OvsBridge::new(&args.bridge, tools);
    // What a previous proxy left: its round (deleted after the first sync of the next one)
    // and its groups (ids this proxy must not reuse blindly).
    let previous =
        pipeline::previous_round(bridge.cookies().context("reading the bridge's flows")?);
    let groups = bridge
        .group_ids()
        .context("reading the bridge's groups")?
        .into_iter()
        .collect();
    let round = pipeline::next_round(previous);
    tracing::info!(bridge = %args.bridge, round, previous = ?previous, "nsx-kube-proxy starting");
    let kube = kube_client::client(args.kubeconfig.as_deref()).await?;
    let proxy = Proxy::new(
        ProxyConfig {
            node_name: node.clone(),
            node_ips: node_ips.iter().map(|ip| u32::from(*ip)).collect(),
        },
        round,
        previous,
        groups,
    );
    answer_rejects(bridge.mgmt_socket(), metrics.clone());
    let signals = ProxySignals::default();
    let watcher = bridge.clone();
    let shared = Arc::new(Mutex::new(bridge));
    let sentinel = Cookie::new(round, Category::ProxyStatic, 0).value();
    let m = metrics.clone();
    let mut last = Instant::now();
    let on_sync = move |s: Synced<'_>| {
        m.proxy_syncs_ok.fetch_add(1, Ordering::Relaxed);
        m.proxy_ops
            .fetch_add(s.report.ops as u64, Ordering::Relaxed);
        m.proxy_service_ports
            .store(s.want.len() as u64, Ordering::Relaxed);
        m.proxy_conntrack_flushed
            .fetch_add(s.report.flushed as u64, Ordering::Relaxed);
        m.proxy_last_sync_ms
            .store(last.elapsed().as_millis() as u64, Ordering::Relaxed);
        m.ready.store(true, Ordering::Relaxed);
        last = Instant::now();
        if s.report.ops > 0 {
            tracing::info!(
                service_ports = s.want.len(),
                ops = s.report.ops,
                flushed = s.report.flushed,
                "synced"
            );
        }
    };
    let run = nsx_core::proxy::run::run(
        kube,
        proxy,
        node,
        shared,
        signals.clone(),
        Timing {
            debounce,
            ..Timing::default()
        },
        on_sync,
    );
    let check = Duration::from_millis(args.ovs_check_ms.max(100));
    let watch = async {
        loop {
            tokio::time::sleep(check).await;
            // Before the first sync the proxy's flows are not expected yet.
            if !metrics.ready.load(Ordering::Relaxed) {
                continue;
            }
            match watcher.has_flow_with_cookie(sentinel, u64::MAX) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "the proxy's flows are gone (ovs-vswitchd restarted?): replaying"
                    );
                    metrics.ovs_replays.fetch_add(1, Ordering::Relaxed);
                    signals.bridge_restarted.store(true, Ordering::SeqCst);
                    signals.changed.notify_one();
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the bridge's flows"),
            }
        }
    };
    tokio::select! {
        _ = run => bail!("the proxy loop ended"),
        _ = watch => {}
        _ = terminated() => tracing::info!("terminating"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    nsx_adapters::logs::init(args.log_json);
    let metrics = Arc::new(NodeMetrics::default());
    serve_metrics(args.metrics_listen, metrics.clone()).await?;
    match &args.command {
        Role::Agent {
            uplink,
            cni_socket,
            annotation_timeout_seconds,
        } => {
            let Some(node) = args.node_name.clone() else {
                bail!(
                    "the agent needs --node-name (or NODE_NAME): it watches the pods scheduled \
                     to its node"
                );
            };
            run_agent(
                &args,
                &node,
                uplink,
                cni_socket,
                Duration::from_secs(*annotation_timeout_seconds),
                metrics,
            )
            .await
        }
        Role::KubeProxy {
            node_ips,
            debounce_ms,
        } => {
            let Some(node) = args.node_name.clone() else {
                bail!("kube-proxy needs --node-name (or NODE_NAME): endpoints are chosen per node");
            };
            run_proxy(
                &args,
                node,
                node_ips,
                Duration::from_millis(*debounce_ms),
                metrics,
            )
            .await
        }
    }
}
