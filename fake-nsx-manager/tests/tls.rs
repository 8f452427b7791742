//! The standalone binary over TLS: a client that trusts the CA gets answers, one that does not
//! fails the handshake, and bad certificate files are refused with the file named.

mod common;

use std::process::{Child, Command};
use std::sync::Arc;

use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};

struct Pki {
    ca_der: CertificateDer<'static>,
    dir: std::path::PathBuf,
}

fn pki(name: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("fake-nsx-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    Pki {
        ca_der: ca.der().clone(),
        dir,
    }
}

fn start(args: &[&str]) -> (Child, String) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let (child, addr) = common::start_binary(&args);
    (child, addr)
}

async fn get(addr: &str, trusted: CertificateDer<'static>) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:admin")
    );
    let req = http::Request::get("/api/v1/node")
        .header("host", "localhost")
        .header("authorization", auth)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("node_version"));
    Ok(status)
}

#[tokio::test]
async fn https_is_served_with_the_given_certificate_and_untrusted_clients_fail() {
    let good = pki("good");
    let other = pki("other");
    let cert = good.dir.join("cert.pem");
    let key = good.dir.join("key.pem");
    let (mut child, addr) = start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let ok = get(&addr, good.ca_der.clone()).await;
    let refused = get(&addr, other.ca_der.clone()).await;
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(ok, Ok(200));
    let err = refused.expect_err("a client that does not trust the CA must fail");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    std::fs::remove_dir_all(&good.dir).unwrap();
    std::fs::remove_dir_all(&other.dir).unwrap();
}

#[test]
fn a_missing_or_bad_certificate_file_is_refused_naming_the_file() {
    let p = pki("bad");
    std::fs::write(p.dir.join("empty.pem"), "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fake-nsx-manager"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(p.dir.join("empty.pem"))
        .arg("--tls-key")
        .arg(p.dir.join("key.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty.pem"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_fake-nsx-manager"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(p.dir.join("cert.pem"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "--tls-cert without --tls-key is an argument error"
    );
    std::fs::remove_dir_all(&p.dir).unwrap();
}
