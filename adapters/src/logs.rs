//! The binaries' logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text
//! or one JSON object per line (what log collectors on a cluster parse).

pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
