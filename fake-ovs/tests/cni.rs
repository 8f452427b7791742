//! The CNI plugin end to end: `cni::run` (what the plugin binary does) talks over a real Unix
//! socket to the agent's server, which waits for NCP's annotation and wires the pod into
//! fake-ovs. Every command, the spec's error codes and JSON, and the bounded wait.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use fake_ovs::Bridge;
use nsx_core::agent::server::{AgentService, PodSource, WaitConfig};
use nsx_core::agent::{Agent, AgentConfig};
use nsx_core::cni::client::StreamAgent;
use nsx_core::cni::{code, run};
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Clone, Default)]
struct Annotations(Arc<std::sync::Mutex<BTreeMap<(String, String), String>>>);

impl PodSource for Annotations {
    async fn annotation(&self, namespace: &str, name: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }
}

const NET: &str = r#"{"ip": "10.4.0.5/24", "mac": "02:00:00:00:00:05", "gateway": "10.4.0.1", "vlan": 5, "logical_port_id": "lp-1"}"#;

struct Node {
    socket: std::path::PathBuf,
    pods: Annotations,
    bridge: Arc<Mutex<Bridge>>,
    rt: tokio::runtime::Runtime,
}

fn node(name: &str) -> Node {
    let socket = std::env::temp_dir().join(format!("nsx-cni-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pods = Annotations::default();
    let bridge = Arc::new(Mutex::new(Bridge::new("br-int")));
    let service = Arc::new(AgentService {
        agent: Mutex::new(Agent::new(AgentConfig { uplink: 100 })),
        switch: bridge.clone(),
        pods: pods.clone(),
        wait: WaitConfig {
            timeout: Duration::from_millis(600),
            poll: Duration::from_millis(20),
        },
    });
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&socket).unwrap() });
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let s = service.clone();
            tokio::spawn(async move {
                let _ = s.serve(stream).await;
            });
        }
    });
    Node {
        socket,
        pods,
        bridge,
        rt,
    }
}

impl Node {
    fn plugin(&self, command: &str, cid: &str, conf: Value) -> (i32, Value) {
        let vars: BTreeMap<String, String> = [
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", cid.to_string()),
            ("CNI_NETNS", "/var/run/netns/cni-1".to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1".to_string(),
            ),
            ("CNI_PATH", "/opt/cni/bin".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let stream = UnixStream::connect(&self.socket).unwrap();
        let (rc, out) = run(
            &vars,
            conf.to_string().as_bytes(),
            &mut StreamAgent::new(stream),
        );
        let v = if out.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out).unwrap()
        };
        (rc, v)
    }

    fn ports(&self) -> usize {
        self.rt
            .block_on(async { self.bridge.lock().await.ports().count() })
    }
}

fn conf(version: &str) -> Value {
    json!({"cniVersion": version, "name": "nsx", "type": "nsx-cni"})
}

#[test]
fn add_waits_for_ncp_then_check_del_status_and_gc() {
    let n = node("flow");
    let (rc, v) = n.plugin("VERSION", "", conf("1.1.0"));
    assert_eq!(rc, 0);
    assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]));
    // NCP annotates the pod 200 ms after kubelet asks.
    let pods = n.pods.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        pods.0
            .lock()
            .unwrap()
            .insert(("shop".into(), "web-1".into()), NET.into());
    });
    let (rc, result) = n.plugin("ADD", "c1", conf("1.1.0"));
    t.join().unwrap();
    assert_eq!(rc, 0, "{result}");
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["ips"][0]["address"], "10.4.0.5/24");
    assert_eq!(result["ips"][0]["gateway"], "10.4.0.1");
    assert_eq!(result["interfaces"][0]["name"], "eth0");
    assert_eq!(result["interfaces"][0]["mac"], "02:00:00:00:00:05");
    assert_eq!(result["interfaces"][0]["sandbox"], "/var/run/netns/cni-1");
    assert_eq!(n.ports(), 1);
    // ADD again: the same answer, no second port.
    let (rc, again) = n.plugin("ADD", "c1", conf("1.1.0"));
    assert_eq!((rc, &again), (0, &result));
    assert_eq!(n.ports(), 1);
    // CHECK against the previous result; then with a wrong one; then an unknown container.
    let mut with_prev = conf("1.1.0");
    with_prev["prevResult"] = result.clone();
    assert_eq!(n.plugin("CHECK", "c1", with_prev.clone()).0, 0);
    let mut wrong = with_prev.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("10.4.0.99/24");
    let (rc, e) = n.plugin("CHECK", "c1", wrong);
    assert_eq!(
        (rc, e["code"].as_u64()),
        (1, Some(u64::from(code::CHECK_FAILED)))
    );
    let (rc, e) = n.plugin("CHECK", "c9", with_prev);
    assert_eq!(
        (rc, e["code"].as_u64()),
        (1, Some(u64::from(code::UNKNOWN_CONTAINER)))
    );
    assert_eq!(n.plugin("STATUS", "", conf("1.1.0")).0, 0);
    // GC keeps the listed attachments and removes the rest.
    n.pods.0.lock().unwrap().insert(
        ("shop".into(), "web-1".into()),
        NET.replace("\"vlan\": 5", "\"vlan\": 6"),
    );
    assert_eq!(n.plugin("ADD", "c2", conf("1.1.0")).0, 0);
    assert_eq!(n.ports(), 2);
    let mut gc = conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c2", "ifname": "eth0"}]);
    assert_eq!(n.plugin("GC", "", gc).0, 0);
    assert_eq!(n.ports(), 1);
    // DEL twice, and DEL of a container never seen: all succeed.
    assert_eq!(n.plugin("DEL", "c2", conf("1.0.0")), (0, Value::Null));
    assert_eq!(n.plugin("DEL", "c2", conf("1.0.0")), (0, Value::Null));
    assert_eq!(n.plugin("DEL", "never", conf("1.0.0")), (0, Value::Null));
    assert_eq!(n.ports(), 0);
    let _ = std::fs::remove_file(&n.socket);
}

#[test]
fn errors_follow_the_spec() {
    let n = node("errors");
    // No annotation within the bounded wait: try again later (11), nothing left behind.
    let (rc, e) = n.plugin("ADD", "c1", conf("1.0.0"));
    assert_eq!(rc, 1);
    assert_eq!(e["code"], code::TRY_AGAIN_LATER);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert!(e["msg"].as_str().unwrap().contains("shop/web-1"), "{e}");
    assert_eq!(n.ports(), 0);
    let (_, e) = n.plugin("ADD", "c1", conf("0.3.1"));
    assert_eq!(e["code"], code::INCOMPATIBLE_VERSION);
    let (_, e) = n.plugin("STATUS", "", conf("1.0.0"));
    assert_eq!(e["code"], code::INCOMPATIBLE_VERSION, "STATUS is 1.1.0");
    let (_, e) = n.plugin(
        "ADD",
        "c1",
        json!({"cniVersion": "1.0.0", "type": "nsx-cni"}),
    );
    assert_eq!(e["code"], code::INVALID_CONFIG);
    let (_, e) = n.plugin("ADD", "-bad", conf("1.0.0"));
    assert_eq!(e["code"], code::INVALID_ENV);
    // A malformed annotation is the agent's error, reported with the reason.
    n.pods
        .0
        .lock()
        .unwrap()
        .insert(("shop".into(), "web-1".into()), "{\"ip\": 5}".into());
    let (_, e) = n.plugin("ADD", "c1", conf("1.0.0"));
    assert_eq!(e["code"], code::AGENT_FAILED);
    assert!(
        e["details"].as_str().unwrap().contains("invalid type"),
        "{e}"
    );
    // A garbled request line gets a decode error and the connection stays usable.
    use std::io::{BufRead, BufReader, Write};
    let mut s = UnixStream::connect(&n.socket).unwrap();
    s.write_all(b"not json\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"code\":6"), "{line}");
    s.write_all(b"{\"command\":\"STATUS\",\"container_id\":\"\",\"netns\":\"\",\"ifname\":\"\",\"args\":{}}\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("done"), "{line}");
    let _ = std::fs::remove_file(&n.socket);
}
