//! HTTPS to NSX Manager the way NCP's `[nsx_v3]` options describe it: a CA bundle
//! (`ca_file`), a pinned certificate (`thumbprint`, the SHA-256 NSX shows for its API
//! certificate), or, only when asked, no verification at all (`insecure = True`). NCP
//! itself may be a principal identity: it then presents the certificate and key of
//! `nsx_api_cert_file` / `nsx_api_private_key_file` ([`ClientIdentity`]).

use std::path::Path;
use std::sync::Arc;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// Why the TLS settings cannot be used; each names the option or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("thumbprint {0:?}: expected 64 hexadecimal digits (SHA-256), colons allowed")]
    Thumbprint(String),
    #[error(
        "no way to trust NSX Manager's certificate: set ca_file or thumbprint in [nsx_v3] \
         (or insecure = True to skip verification)"
    )]
    NoTrust,
    #[error("nsx_api_cert_file {path}: {reason}")]
    CertFile { path: String, reason: String },
    #[error("nsx_api_private_key_file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The client certificate (with its chain) and key NCP authenticates with as a principal
/// identity.
#[derive(Debug)]
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl ClientIdentity {
    /// From PEM files; the key may also be in the certificate file (then `key` may be the
    /// same path).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsSetupError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsSetupError::CertFile {
                path: cert.display().to_string(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsSetupError::CertFile {
                path: cert.display().to_string(),
                reason: "no PEM certificate in the file".into(),
            });
        }
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
            TlsSetupError::KeyFile {
                path: key.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self { chain, key })
    }
}

/// How NSX Manager's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// A chain to one of these CAs, for the manager's host name.
    Ca(Vec<CertificateDer<'static>>),
    /// The leaf certificate's SHA-256 equals this (host name and chain are not checked, as
    /// NSX's self-signed API certificates rarely name the address NCP uses).
    Thumbprint([u8; 32]),
    Insecure,
}

/// Parses `AB:CD:..` or `abcd..` (64 hex digits).
pub fn parse_thumbprint(text: &str) -> Result<[u8; 32], TlsSetupError> {
    let hex: String = text
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if hex.len() != 64 {
        return Err(TlsSetupError::Thumbprint(text.to_string()));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| TlsSetupError::Thumbprint(text.to_string()))?;
    }
    Ok(out)
}

/// The SHA-256 of a DER certificate, as NSX shows thumbprints (lower case, no colons).
pub fn thumbprint_of(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Trust {
    /// From NCP's options; `ca_file` wins over `thumbprint`, `insecure` only when neither
    /// is set (as NCP reads them).
    pub fn from_options(
        ca_file: Option<&str>,
        thumbprint: Option<&str>,
        insecure: bool,
    ) -> Result<Self, TlsSetupError> {
        if let Some(path) = ca_file {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(Path::new(path))
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsSetupError::CaFile {
                        path: path.into(),
                        reason: e.to_string(),
                    })?;
            if certs.is_empty() {
                return Err(TlsSetupError::CaFile {
                    path: path.into(),
                    reason: "no certificate in the file".into(),
                });
            }
            return Ok(Trust::Ca(certs));
        }
        if let Some(t) = thumbprint {
            return Ok(Trust::Thumbprint(parse_thumbprint(t)?));
        }
        if insecure {
            return Ok(Trust::Insecure);
        }
        Err(TlsSetupError::NoTrust)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `trust`, presenting `identity` when given.
pub fn client_config(
    trust: &Trust,
    identity: Option<&ClientIdentity>,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let verifying = match trust {
        Trust::Ca(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots.add(c.clone())?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::Thumbprint(t) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                thumbprint: Some(*t),
                algorithms: provider().signature_verification_algorithms,
            })),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                thumbprint: None,
                algorithms: provider().signature_verification_algorithms,
            })),
    };
    Ok(match identity {
        Some(id) => verifying.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => verifying.with_no_client_auth(),
    })
}

/// An HTTPS (and plain HTTP, for `http://` manager URLs) connector for the NSX client.
pub fn connector(
    trust: &Trust,
    identity: Option<&ClientIdentity>,
) -> Result<HttpsConnector<HttpConnector>, TlsSetupError> {
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(client_config(trust, identity)?)
        .https_or_http()
        .enable_http1()
        .build())
}

/// `host`, `host:port` or a URL, as `nsx_api_managers` lists them, to a base URL.
pub fn manager_url(entry: &str) -> String {
    let e = entry.trim().trim_end_matches('/');
    if e.starts_with("https://") || e.starts_with("http://") {
        e.to_string()
    } else {
        format!("https://{e}")
    }
}

/// Checks the leaf against a pinned SHA-256 (or nothing, when insecure); handshake
/// signatures are always verified, so the peer must hold the certificate's key.
#[derive(Debug)]
struct Pinned {
    thumbprint: Option<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(want) = self.thumbprint else {
            return Ok(ServerCertVerified::assertion());
        };
        let got = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if got.as_ref() == want.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "NSX Manager's certificate has thumbprint {}, not the configured one",
                thumbprint_of(end_entity.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_parse_with_or_without_colons_and_bad_ones_are_named() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_thumbprint(&hex).unwrap(), [0xab; 32]);
        assert_eq!(parse_thumbprint(&colons).unwrap(), [0xab; 32]);
        let e = parse_thumbprint("abcd").unwrap_err().to_string();
        assert!(e.contains("\"abcd\"") && e.contains("64"), "{e}");
        assert!(parse_thumbprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn trust_follows_ncp_precedence_and_refuses_none() {
        let t = Trust::from_options(None, Some(&"01".repeat(32)), true).unwrap();
        assert_eq!(t, Trust::Thumbprint([1; 32]));
        assert_eq!(
            Trust::from_options(None, None, true).unwrap(),
            Trust::Insecure
        );
        let e = Trust::from_options(None, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca_file or thumbprint"), "{e}");
        let e = Trust::from_options(Some("/nonexistent/ca.pem"), None, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn manager_entries_become_https_urls() {
        assert_eq!(manager_url("10.0.0.10"), "https://10.0.0.10");
        assert_eq!(manager_url("10.0.0.11:443 "), "https://10.0.0.11:443");
        assert_eq!(
            manager_url("http://127.0.0.1:8080/"),
            "http://127.0.0.1:8080"
        );
    }
}
