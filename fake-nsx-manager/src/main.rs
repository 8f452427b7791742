//! `fake-nsx-manager`: the fake NSX Manager as a standalone server for real clients, curl and
//! scripts. Bootstrapped like a fresh NSX install with the objects an admin creates for NCP.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fake_nsx_manager::bootstrap::{BootstrapConfig, ClusterSetup};
use fake_nsx_manager::store::StoreConfig;
use fake_nsx_manager::{Clock, FakeNsxManager, ManagerConfig, User};

/// Every request parses and renders JSON documents; mimalloc allocates and frees them in a
/// fraction of glibc's instructions (the benches run with it too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A fake NSX-T Manager (2.4/2.5 Manager API) for tests and development"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// The enterprise_admin user.
    #[arg(long, default_value = "admin")]
    user: String,
    #[arg(long, default_value = "admin")]
    password: String,
    /// Keep the database in this file across restarts (written atomically after each write).
    #[arg(long)]
    state: Option<PathBuf>,
    /// NCP cluster name(s) to bootstrap for (repeat for several clusters sharing the manager).
    #[arg(long = "cluster", default_values_t = vec!["k8s-a".to_string()])]
    clusters: Vec<String>,
    /// Nodes per cluster (node-1..node-N get VM ports tagged ncp/node_name).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Container IP block of the first cluster (later clusters get the following /16s).
    #[arg(long, default_value = "10.4.0.0/16")]
    container_block: String,
    #[arg(long, default_value = "192.0.2.0/24")]
    snat_pool: String,
    #[arg(long, default_value = "198.51.100.0/24")]
    lb_pool: String,
    /// Seed of object ids and injected faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Delay before every API answer (at most an hour).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    latency_ms: u64,
    /// How long a write takes to show in search (at most an hour).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=3_600_000))]
    search_lag_ms: i64,
    /// Requests per second per client (429 beyond); 0 = none.
    #[arg(long, default_value_t = 100)]
    rate_limit: u32,
    /// Requests in flight per client (503 beyond); 0 = none.
    #[arg(long, default_value_t = 40)]
    concurrency_limit: u32,
    /// Seconds a client may take to send a request's headers or body, or idle between
    /// requests, before its connection is closed (the API service's `connection_timeout`).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    connection_timeout: u32,
    /// Connections one client address may hold at once; more are closed on accept.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_connections_per_client: u32,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn cluster_setups(args: &Args) -> anyhow::Result<Vec<ClusterSetup>> {
    let base = fake_nsx_manager::ipam::Cidr::parse_strict(&args.container_block)
        .map_err(|e| anyhow::anyhow!("--container-block: {e}"))?;
    let mut out = Vec::new();
    for (i, name) in args.clusters.iter().enumerate() {
        let mut c = ClusterSetup::new(name, args.nodes);
        let block = fake_nsx_manager::ipam::Cidr {
            network: base
                .network
                .wrapping_add((i as u32) << (32 - u32::from(base.prefix)).min(31)),
            prefix: base.prefix,
        };
        c.container_block = block.to_string();
        c.snat_pool = args.snat_pool.clone();
        c.lb_pool = args.lb_pool.clone();
        c.node_cidr = format!("172.16.{i}.0/24");
        out.push(c);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    // The only wall-clock read: the epoch the fake's timestamps start from.
    let epoch_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_millis() as i64;
    let mut store = StoreConfig {
        seed: args.seed,
        search_lag_ms: args.search_lag_ms,
        ..StoreConfig::default()
    };
    store.api_service.client_api_rate_limit = args.rate_limit;
    store.api_service.client_api_concurrency_limit = args.concurrency_limit;
    store.api_service.connection_timeout = args.connection_timeout;
    let config = ManagerConfig {
        store,
        bootstrap: Some(BootstrapConfig {
            clusters: cluster_setups(&args)?,
        }),
        users: vec![
            User::new(&args.user, &args.password, "enterprise_admin"),
            User::new("audit", "audit", "auditor"),
        ],
        latency_ms: args.latency_ms,
        clock: Clock::tokio_since(epoch_ms),
        state_file: args.state.clone(),
    };
    let nsx = FakeNsxManager::open(config).map_err(|e| anyhow::anyhow!(e))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(fake_nsx_manager::tls::server_config(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(address = %local, scheme, "fake NSX manager listening");
    // Scripts wait for this line.
    println!("listening on {scheme}://{local}");
    use std::io::Write;
    std::io::stdout().flush()?;
    let options = fake_nsx_manager::listen::ServeOptions {
        tls,
        max_connections_per_client: args.max_connections_per_client as usize,
    };
    tokio::select! {
        () = fake_nsx_manager::listen::serve(nsx, listener, options) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
