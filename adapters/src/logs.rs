//! The binaries' logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`, or what the
//! config file asks for), as text or one JSON object per line (what log collectors on a cluster
//! parse).

pub fn init(json: bool) {
    init_with(json, "info");
}

/// `default`: the filter when `RUST_LOG` is not set.
pub fn init_with(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
