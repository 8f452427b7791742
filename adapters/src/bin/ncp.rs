//! `ncp`: the NSX Container Plugin controller. Reads an `ncp.ini`, connects to the Kubernetes
//! API (in-cluster, a kubeconfig, or `[k8s] apiserver_host_ip`) and to NSX Manager over HTTPS,
//! and reconciles until stopped; with `--ha`, only while it holds the Lease.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use nsx_adapters::metrics::{self, Metrics};
use nsx_adapters::nsx_tls::{self, Trust};
use nsx_core::ncp::config::{CredentialOverrides, NcpConfig};
use nsx_core::ncp::controller::{self, LoopConfig, PassEvent};
use nsx_core::ncp::leader::LeaderConfig;
use nsx_core::nsx::client::{Auth, ClientConfig, NsxClient};

/// Plans, JSON bodies and watch events are allocated and freed at a high rate; mimalloc does it
/// in a fraction of glibc's instructions (the benches run with it too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "NSX Container Plugin: Kubernetes namespaces, pods, services and network policies as NSX-T objects"
)]
struct Args {
    /// The ncp.ini file.
    #[arg(long, default_value = "/etc/nsx-ujo/ncp.ini")]
    config: PathBuf,
    /// A kubeconfig to use instead of the in-cluster service account (ignored when the
    /// config sets `[k8s] apiserver_host_ip`).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Address of the metrics and health server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Run as one of several replicas: reconcile only while holding the Lease `ncp-<cluster>`
    /// in `--lease-namespace`.
    #[arg(long)]
    ha: bool,
    #[arg(long, default_value = "kube-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds between full re-reads of NSX (objects changed by others are put back), 1 to
    /// 604800 (a week).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    resync_seconds: u64,
    /// Log lines as JSON objects.
    #[arg(long)]
    log_json: bool,
    /// NSX user, overriding `[nsx_v3] nsx_api_user` (for a Kubernetes Secret in the
    /// environment rather than a password in the ConfigMap).
    #[arg(long, env = "NSX_API_USER", hide_env_values = true)]
    nsx_api_user: Option<String>,
    /// NSX password, overriding `[nsx_v3] nsx_api_password`.
    #[arg(long, env = "NSX_API_PASSWORD", hide_env_values = true)]
    nsx_api_password: Option<String>,
}

async fn kube_client(
    config: &NcpConfig,
    kubeconfig: Option<&PathBuf>,
) -> anyhow::Result<kube::Client> {
    let kc = if let Some(host) = &config.apiserver_host_ip {
        let url = if host.starts_with("http://") || host.starts_with("https://") {
            host.clone()
        } else {
            format!(
                "https://{host}:{}",
                config.apiserver_host_port.unwrap_or(6443)
            )
        };
        let mut kc = kube::Config::new(
            url.parse()
                .with_context(|| format!("[k8s] apiserver_host_ip: bad address {url:?}"))?,
        );
        if let Some(ca) = &config.k8s_ca_file {
            kc.root_cert_file = Some(ca.into());
        }
        kc.auth_info.token_file = config.client_token_file.clone();
        kc
    } else {
        nsx_adapters::kube_client::config(kubeconfig.map(PathBuf::as_path)).await?
    };
    kube::Client::try_from(kc).context("building the Kubernetes client")
}

/// The first manager of `nsx_api_managers` that completes a TLS handshake and answers HTTP.
/// A wrong thumbprint or CA is reported as such, not retried for ever.
async fn pick_manager(
    managers: &[String],
    connector: &hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
) -> anyhow::Result<String> {
    use http_body_util::Empty;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<bytes::Bytes>>(connector.clone());
    let mut problems = Vec::new();
    for m in managers {
        let base = nsx_tls::manager_url(m);
        let uri: http::Uri = format!("{base}/api/v1/logical-routers?page_size=1")
            .parse()
            .with_context(|| format!("nsx_api_managers: bad entry {m:?}"))?;
        match tokio::time::timeout(Duration::from_secs(10), http.get(uri)).await {
            Ok(Ok(_answer)) => return Ok(base),
            Ok(Err(e)) => {
                let mut text = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    text = format!("{text}: {s}");
                    src = s.source();
                }
                problems.push(format!("{base}: {text}"));
            }
            Err(_) => problems.push(format!("{base}: no answer within 10 s")),
        }
    }
    bail!("no NSX Manager reachable:\n  {}", problems.join("\n  "))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let overrides = CredentialOverrides {
        user: args.nsx_api_user.clone(),
        password: args.nsx_api_password.clone(),
    };
    let parsed = NcpConfig::parse_with(&text, &overrides)
        .with_context(|| format!("{}", args.config.display()))?;
    // The config's log levels apply from here on (a config that does not parse says so on
    // stderr through the error above).
    nsx_adapters::logs::init_with(args.log_json, &parsed.config.log_filter());
    for w in &parsed.warnings {
        tracing::warn!("{}: {w}", args.config.display());
    }
    let config = parsed.config;
    // A principal identity's certificate wins over a user and password, as in NCP.
    let (identity, auth) = match (
        &config.nsx_api_cert_file,
        &config.nsx_api_user,
        &config.nsx_api_password,
    ) {
        (Some(cert), _, _) => {
            let key = config.nsx_api_private_key_file.as_deref().unwrap_or(cert);
            let id = nsx_tls::ClientIdentity::from_files(cert.as_ref(), key.as_ref())?;
            tracing::info!(cert = %cert, "authenticating to NSX as a principal identity");
            (Some(id), Auth::ClientCertificate)
        }
        (None, Some(user), Some(password)) => (
            None,
            Auth::Session {
                user: user.clone(),
                password: password.clone(),
            },
        ),
        _ => bail!(
            "{}: set [nsx_v3] nsx_api_cert_file (a principal identity), or nsx_api_user and \
             nsx_api_password (or NSX_API_USER / NSX_API_PASSWORD)",
            args.config.display()
        ),
    };
    let trust = Trust::from_options(
        config.ca_file.as_deref(),
        config.thumbprint.as_deref(),
        config.insecure,
    )?;
    if trust == Trust::Insecure {
        tracing::warn!("insecure = True: NSX Manager's certificate is not verified");
    }
    let connector = nsx_tls::connector(&trust, identity.as_ref())?;
    let base = pick_manager(&config.nsx_api_managers, &connector).await?;
    tracing::info!(manager = %base, "using NSX Manager");
    // The others stand by: the client moves to the next when the one in use stops answering.
    let all: Vec<String> = config
        .nsx_api_managers
        .iter()
        .map(|m| nsx_tls::manager_url(m))
        .collect();
    let at = all.iter().position(|m| *m == base).unwrap_or(0);
    let standby_urls: Vec<String> = all[at + 1..].iter().chain(&all[..at]).cloned().collect();
    let mut cc = ClientConfig::new(base, auth);
    cc.standby_urls = standby_urls;
    cc.seed = std::process::id().into();
    // nsxlib's pool: `concurrent_connections` requests in flight to the manager at most.
    cc.max_concurrent_requests = config.concurrent_connections;
    let nsx = Arc::new(NsxClient::new(connector, cc));
    let kube = kube_client(&config, args.kubeconfig.as_ref()).await?;

    let metrics = Arc::new(Metrics::default());
    let stats = {
        let nsx = nsx.clone();
        Arc::new(move || nsx.stats())
    };
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics server to {}", args.metrics_listen))?;
    tracing::info!(listen = %args.metrics_listen, "metrics and health endpoints up");
    let app = metrics::router(metrics.clone(), stats);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });

    let timing = LoopConfig {
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        progress: metrics.watch.clone(),
        ..LoopConfig::default()
    };
    let on_pass = move |e: &PassEvent| {
        match e {
            PassEvent::Converged {
                ops,
                writes,
                annotations,
                failed,
                took_ms,
                planned,
                incremental,
            } => tracing::info!(
                ops,
                writes,
                annotations,
                failed,
                took_ms,
                planned,
                incremental,
                "pass converged"
            ),
            PassEvent::Failed { error } => tracing::warn!(%error, "pass failed; retrying"),
            PassEvent::Leadership(l) => tracing::info!(leadership = ?l, "leadership changed"),
        }
        metrics.record(e);
    };
    if args.ha {
        let identity = match args.identity {
            Some(i) => i,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| format!("ncp-{}", std::process::id())),
        };
        let mut leader = LeaderConfig::new(&config.cluster, &identity);
        leader.namespace = args.lease_namespace;
        leader.lease_duration = Duration::from_secs(config.ha_master_timeout_s.max(3));
        let now = Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        });
        tokio::select! {
            _ = controller::run_ha(kube, nsx, config, timing, leader, now, on_pass) => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
        }
    } else {
        tokio::select! {
            _ = controller::run(kube, nsx, config, timing, None, on_pass) => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
        }
    }
    Ok(())
}
