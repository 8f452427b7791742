//! The standalone manager's accept loop, plain or TLS, with the limits that keep one client
//! from starving the others.
//!
//! - A connection has the API service's `connection_timeout` (seconds, NSX's default 30) to
//!   finish its TLS handshake and, for each request, to send the headers; the same bound holds
//!   the body ([`crate::server`] answers 408) and closes a connection idle between requests.
//!   Slow or half-sent requests therefore cannot hold a file descriptor for long.
//! - One client address may hold at most `max_connections_per_client` connections at once;
//!   a connection over the cap is closed as soon as it is accepted, so a client that opens
//!   hundreds of idle connections exhausts its own share, not the process's descriptors.
//! - A failed `accept` (out of descriptors, say) is logged and retried after a pause; it never
//!   ends the server.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use crate::server::{FakeNsxManager, PeerCertificate};

/// Connections one client address may hold at once unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 64;

/// How the accept loop is bounded.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// TLS configuration; plain HTTP without one.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections one client address may hold at once (at least 1).
    pub max_connections_per_client: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            tls: None,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        }
    }
}

/// Open connections per client address; a [`Slot`] gives its place back when dropped.
#[derive(Clone, Default)]
struct Slots(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct Slot {
    slots: Slots,
    ip: IpAddr,
}

impl Slots {
    fn take(&self, ip: IpAddr, cap: usize) -> Option<Slot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= cap.max(1) {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Serves `nsx` on `listener` until the task is dropped.
pub async fn serve(nsx: FakeNsxManager, listener: tokio::net::TcpListener, options: ServeOptions) {
    let acceptor = options.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let slots = Slots::default();
    let app = nsx.router();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = slots.take(peer.ip(), options.max_connections_per_client) else {
            tracing::warn!(%peer, cap = options.max_connections_per_client,
                "client holds too many connections; closing the new one");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let timeout = nsx.connection_timeout();
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(timeout);
            match acceptor {
                None => {
                    let svc = TowerToHyperService::new(app);
                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    // The client certificate, if any, travels with each request of this
                    // connection.
                    let cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| PeerCertificate(crate::tls::sha256_hex(c.as_ref())));
                    let app = match cert {
                        Some(p) => app.layer(axum::Extension(p)),
                        None => app,
                    };
                    let svc = TowerToHyperService::new(app);
                    let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                }
            }
        });
    }
}
