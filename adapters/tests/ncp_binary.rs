//! The `ncp` binary for real: a process reading an ncp.ini, talking HTTPS to the fake NSX
//! Manager (the same server and TLS code as the standalone `fake-nsx-manager`, with a
//! generated certificate) and HTTP to the fake kube-apiserver. A namespace and a pod created
//! through the API become NSX objects and a pod annotation; metrics and health answer; a wrong
//! thumbprint or CA is refused with a message that says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fake_nsx_manager::{FakeNsxManager, ManagerConfig};
use nsx_adapters::nsx_tls::{self, thumbprint_of};
use nsx_core::nsx::client::{Auth, ClientConfig, NsxClient};
use nsx_sim::apiserver::ApiServer;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};

mod common;
use common::{Running, free_port, http_get, wait_for};

struct Servers {
    nsx: FakeNsxManager,
    api: ApiServer,
    nsx_addr: String,
    api_addr: String,
    /// SHA-256 of the manager's certificate, and a CA that did not sign it.
    thumbprint: String,
    dir: PathBuf,
    _rt: tokio::runtime::Runtime,
}

fn servers(name: &str) -> Servers {
    let dir = std::env::temp_dir().join(format!("ncp-binary-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The manager's certificate, signed by a CA; and another CA that signed nothing.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(
        dir.join("ca.pem"),
        ca_params.self_signed(&ca_key).unwrap().pem(),
    )
    .unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    other
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Some other CA");
    std::fs::write(
        dir.join("other-ca.pem"),
        other.self_signed(&other_key).unwrap().pem(),
    )
    .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nsx = rt.block_on(async { FakeNsxManager::new(ManagerConfig::default()) });
    let api = ApiServer::new(1, || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    });
    for n in 1..=3 {
        api.apply(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")}}),
        )
        .unwrap();
    }
    let tls =
        fake_nsx_manager::tls::server_config(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
    let (nsx_addr, api_addr) = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nsx_addr = l.local_addr().unwrap().to_string();
        tokio::spawn(fake_nsx_manager::listen::serve(
            nsx.clone(),
            l,
            fake_nsx_manager::listen::ServeOptions {
                tls: Some(tls),
                ..Default::default()
            },
        ));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_addr = l.local_addr().unwrap().to_string();
        let router = api.router();
        tokio::spawn(async move { axum::serve(l, router).await });
        (nsx_addr, api_addr)
    });
    Servers {
        nsx,
        api,
        nsx_addr,
        api_addr,
        thumbprint: thumbprint_of(leaf.der()),
        dir,
        _rt: rt,
    }
}

fn write_ini(s: &Servers, trust_line: &str) -> PathBuf {
    let path = s.dir.join(format!("ncp-{}.ini", free_port()));
    std::fs::write(
        &path,
        format!(
            "[coe]\ncluster = k8s-a\n\n[nsx_v3]\nnsx_api_managers = https://{nsx}\n\
             nsx_api_user = admin\nnsx_api_password = admin\n{trust_line}\n\n\
             [k8s]\napiserver_host_ip = http://{api}\n",
            nsx = s.nsx_addr,
            api = s.api_addr
        ),
    )
    .unwrap();
    path
}

/// A key and self-signed certificate for a principal identity: (certificate PEM, paths).
fn client_identity(dir: &Path, name: &str) -> (String, PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap().pem();
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, &cert).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (cert, c, k)
}

fn ncp(config: &Path, metrics_port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ncp"));
    c.arg("--config")
        .arg(config)
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("RUST_LOG", "info");
    c
}

fn nsx_objects(nsx: &FakeNsxManager, kind: &str, tag: (&str, &str)) -> Vec<Value> {
    nsx.with_store(|s| {
        s.objects()
            .map(|(_, o)| Value::Object(o.doc.clone()))
            .filter(|d| d["resource_type"] == kind)
            .filter(|d| {
                d["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t["scope"] == tag.0 && t["tag"] == tag.1))
            })
            .collect()
    })
}

/// Waits for NCP to create the namespace's logical switch.
fn namespace_switch(nsx: &FakeNsxManager, ns_uid: &str) -> Value {
    wait_for(
        "the namespace's logical switch",
        Duration::from_secs(60),
        || {
            nsx_objects(nsx, "LogicalSwitch", ("ncp/project_uid", ns_uid))
                .into_iter()
                .next()
        },
    )
}

#[test]
fn ncp_realizes_a_namespace_and_a_pod_over_tls_with_a_pinned_thumbprint() {
    let s = servers("ok");
    let ini = write_ini(&s, &format!("thumbprint = {}", s.thumbprint));
    let metrics = free_port();
    let _ncp = Running(
        ncp(&ini, metrics)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Health first, readiness only once a pass converged.
    let (code, body) = wait_for("/healthz", Duration::from_secs(20), || {
        http_get(metrics, "/healthz")
    });
    assert_eq!((code, body.as_str()), (200, "ok"));

    let ns = s
        .api
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    let ns_uid = ns["metadata"]["uid"].as_str().unwrap().to_string();
    let pod = s
        .api
        .apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-2", "containers": [{"name": "c", "image": "nginx"}]}
        }))
        .unwrap();
    let pod_uid = pod["metadata"]["uid"].as_str().unwrap().to_string();

    let switch = namespace_switch(&s.nsx, &ns_uid);
    assert!(
        switch["display_name"]
            .as_str()
            .unwrap()
            .starts_with("k8s-a-shop"),
        "{switch}"
    );
    let annotation = wait_for(
        "the pod's network annotation",
        Duration::from_secs(60),
        || {
            let p = s.api.get("pods", "shop", "web")?;
            p["metadata"]["annotations"]
                .as_object()?
                .iter()
                .find(|(_, v)| v.as_str().is_some_and(|v| v.contains("logical_port_id")))
                .map(|(_, v)| serde_json::from_str::<Value>(v.as_str().unwrap()).unwrap())
        },
    );
    let ports = nsx_objects(&s.nsx, "LogicalPort", ("ncp/pod_uid", &pod_uid));
    assert_eq!(ports.len(), 1, "one logical port for the pod: {ports:?}");
    assert_eq!(annotation["logical_port_id"], ports[0]["id"]);
    assert_eq!(
        ports[0]["attachment"]["context"]["vif_type"], "CHILD",
        "{}",
        ports[0]
    );

    let (code, _) = wait_for("/readyz", Duration::from_secs(20), || {
        http_get(metrics, "/readyz").filter(|(c, _)| *c == 200)
    });
    assert_eq!(code, 200);
    let (code, text) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    let converged: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ncp_reconcile_passes_total{result=\"converged\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(converged >= 1, "{text}");
    assert!(
        text.contains("ncp_nsx_requests_total{status=\"201\"}"),
        "{text}"
    );
    // The watch events it took in, none left waiting once converged and idle.
    let events: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ncp_watch_events_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(events >= 2, "{text}");
    assert!(
        text.contains("ncp_reconcile_pass_duration_seconds_bucket{le=\"+Inf\"}"),
        "{text}"
    );
    wait_for("an empty queue", Duration::from_secs(20), || {
        let (_, t) = http_get(metrics, "/metrics")?;
        t.contains("ncp_queue_depth 0").then_some(())
    });
}

fn run_to_exit(mut c: Command) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("ncp kept running: {:?}", child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_wrong_thumbprint_or_ca_is_refused_and_nothing_is_written() {
    let s = servers("refused");
    let before = s.nsx.with_store(|st| st.objects().count());
    let wrong = "00".repeat(32);
    let out = run_to_exit(ncp(
        &write_ini(&s, &format!("thumbprint = {wrong}")),
        free_port(),
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no NSX Manager reachable") && err.contains(&s.thumbprint),
        "the error names the certificate's real thumbprint: {err}"
    );

    let out = run_to_exit(ncp(
        &write_ini(
            &s,
            &format!("ca_file = {}", s.dir.join("other-ca.pem").display()),
        ),
        free_port(),
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );

    assert_eq!(s.nsx.with_store(|st| st.objects().count()), before);

    // The CA that did sign it, for the name the URL uses: accepted.
    let port = free_port();
    let _ok = Running(
        ncp(
            &write_ini(&s, &format!("ca_file = {}", s.dir.join("ca.pem").display())),
            port,
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let (code, _) = wait_for(
        "/healthz with the right CA",
        Duration::from_secs(20),
        || http_get(port, "/healthz"),
    );
    assert_eq!(code, 200);
    drop(_ok);

    let out = run_to_exit(ncp(&write_ini(&s, ""), free_port()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("set ca_file or thumbprint"), "{err}");
}

#[test]
fn ncp_authenticates_as_a_principal_identity_with_its_certificate() {
    let s = servers("pi");
    let (pem, cert, key) = client_identity(&s.dir, "ncp-k8s-a");
    let (_, other_cert, other_key) = client_identity(&s.dir, "someone-else");
    // The operator registers the principal identity (NSX 2.4's one-step call), as admin,
    // with the production client over HTTPS.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let trust = nsx_tls::Trust::Thumbprint(nsx_tls::parse_thumbprint(&s.thumbprint).unwrap());
    let admin = NsxClient::new(
        nsx_tls::connector(&trust, None).unwrap(),
        ClientConfig::new(
            format!("https://{}", s.nsx_addr),
            Auth::Basic {
                user: "admin".into(),
                password: "admin".into(),
            },
        ),
    );
    let body = json!({"name": "ncp-k8s-a", "node_id": "k8s-a", "role": "enterprise_admin",
                      "is_protected": true, "certificate_pem": pem});
    let pi: Value = rt
        .block_on(admin.create(
            "/api/v1/trust-management/principal-identities/with-certificate",
            &body,
        ))
        .unwrap();
    assert_eq!(pi["name"], "ncp-k8s-a", "{pi}");
    // A certificate no principal identity holds is refused (403, NSX's error body), whatever
    // the connection: the production client as it would run with it.
    let stranger = NsxClient::new(
        nsx_tls::connector(
            &trust,
            Some(&nsx_tls::ClientIdentity::from_files(&other_cert, &other_key).unwrap()),
        )
        .unwrap(),
        ClientConfig::new(format!("https://{}", s.nsx_addr), Auth::ClientCertificate),
    );
    let refused = rt
        .block_on(stranger.get::<Value>("/api/v1/logical-switches"))
        .unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");

    let ini = s.dir.join("ncp-pi.ini");
    std::fs::write(
        &ini,
        format!(
            "[coe]\ncluster = k8s-a\n\n[nsx_v3]\nnsx_api_managers = https://{nsx}\n\
             nsx_api_cert_file = {cert}\nnsx_api_private_key_file = {key}\n\
             thumbprint = {tp}\n\n[k8s]\napiserver_host_ip = http://{api}\n",
            nsx = s.nsx_addr,
            api = s.api_addr,
            cert = cert.display(),
            key = key.display(),
            tp = s.thumbprint,
        ),
    )
    .unwrap();
    let _ncp = Running(
        ncp(&ini, free_port())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ns = s
        .api
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    let ns_uid = ns["metadata"]["uid"].as_str().unwrap().to_string();
    let switch = namespace_switch(&s.nsx, &ns_uid);
    // Created by the principal identity, and so protected from other users.
    assert_eq!(switch["_create_user"], "ncp-k8s-a", "{switch}");
    assert_eq!(switch["_protection"], "PROTECTED", "{switch}");
    let id = switch["id"].as_str().unwrap().to_string();
    let denied = rt
        .block_on(admin.delete(&format!("/api/v1/logical-switches/{id}")))
        .unwrap_err();
    assert_eq!(denied.status(), Some(400), "{denied}");
    assert_eq!(denied.error_code(), Some(289), "{denied}");
}

#[test]
fn durations_from_the_command_line_are_range_checked_not_a_panic() {
    for (bin, args) in [
        (
            env!("CARGO_BIN_EXE_ncp"),
            vec![
                "--config",
                "/nonexistent.ini",
                "--resync-seconds",
                "18446744073709551615",
            ],
        ),
        (
            env!("CARGO_BIN_EXE_ncp"),
            vec!["--config", "/nonexistent.ini", "--resync-seconds", "0"],
        ),
        (
            env!("CARGO_BIN_EXE_nsx-node-agent"),
            vec!["--ovs-check-ms", "18446744073709551615", "agent"],
        ),
        (
            env!("CARGO_BIN_EXE_nsx-node-agent"),
            vec![
                "agent",
                "--annotation-timeout-seconds",
                "18446744073709551615",
            ],
        ),
        (
            env!("CARGO_BIN_EXE_nsx-node-agent"),
            vec!["kube-proxy", "--debounce-ms", "18446744073709551615"],
        ),
    ] {
        let out = run_to_exit({
            let mut c = Command::new(bin);
            c.args(&args);
            c
        });
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is not in"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
