//! HTTP over turmoil's simulated TCP: a connector for the production hyper client, and an
//! accept loop that serves an axum app (the fake NSX manager) on a simulated host.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

/// Opens `turmoil::net::TcpStream`s for hyper-util's legacy client: the only thing that differs
/// from production, where the connector speaks TLS over real TCP.
#[derive(Debug, Clone, Default)]
pub struct TurmoilConnector;

/// The same, with kube-rs's read timeout (295 s without a byte read fails the read): a watch
/// whose end was lost in a silent partition is given up and started again, as it is in
/// production.
#[derive(Debug, Clone, Default)]
pub struct KubeConnector;

/// kube-rs's default read timeout.
pub const KUBE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(295);

/// A simulated TCP connection as hyper sees it.
pub struct TurmoilConnection {
    io: TokioIo<turmoil::net::TcpStream>,
    read_timeout: Option<std::time::Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

async fn connect(
    uri: Uri,
    read_timeout: Option<std::time::Duration>,
) -> io::Result<TurmoilConnection> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
    Ok(TurmoilConnection {
        io: TokioIo::new(stream),
        read_timeout,
        timer: None,
    })
}

impl tower::Service<Uri> for KubeConnector {
    type Response = TurmoilConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TurmoilConnection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(connect(uri, Some(KUBE_READ_TIMEOUT)))
    }
}

impl tower::Service<Uri> for TurmoilConnector {
    type Response = TurmoilConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TurmoilConnection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(connect(uri, None))
    }
}

impl Connection for TurmoilConnection {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TurmoilConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let Some(limit) = this.read_timeout else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.timer = None;
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("nothing read for {limit:?}"),
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl hyper::rt::Write for TurmoilConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `app` on a simulated host until the host is crashed: one HTTP/1.1 connection task
/// per accepted stream.
pub async fn serve(port: u16, app: axum::Router) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            // A connection ends when the peer goes away or a partition cuts it; that is
            // normal in the simulation and the client sees it as a transport error.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A kube-rs `Client` for `base` (`http://apiserver:6443`) over turmoil TCP: the same client,
/// watchers and patch calls as in production, only the connector differs.
pub fn kube_client(base: &str) -> Result<kube::Client, http::uri::InvalidUri> {
    let base: Uri = base.parse()?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, kube::client::Body>(KubeConnector);
    let svc = tower::ServiceBuilder::new()
        .layer(kube::client::middleware::BaseUriLayer::new(base))
        .service(http);
    Ok(kube::Client::new(svc, "default"))
}
