//! The `nsx-cni` binary as a runtime runs it: environment, stdin, stdout, exit code, against a
//! stand-in agent on a Unix socket that answers the agent's wire protocol.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn plugin(command: &str, conf: &Value) -> (i32, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nsx-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "abc123")
        .env("CNI_NETNS", "/var/run/netns/x")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the plugin runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (out.status.code().unwrap(), v)
}

#[test]
fn the_binary_speaks_cni_to_the_agent_and_reports_an_absent_one() {
    let dir = std::env::temp_dir().join(format!("nsx-cni-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("agent.sock");
    let conf =
        json!({"cniVersion": "1.1.0", "name": "nsx", "type": "nsx-cni", "agentSocket": socket});
    // No agent yet.
    let (rc, e) = plugin("ADD", &conf);
    assert_eq!((rc, e["code"].as_u64()), (1, Some(11)), "{e}");
    let (rc, e) = plugin("STATUS", &conf);
    assert_eq!((rc, e["code"].as_u64()), (1, Some(50)), "{e}");
    let (rc, v) = plugin("VERSION", &conf);
    assert_eq!(rc, 0);
    assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]));
    // A stand-in agent that wires everything at 10.4.0.5.
    let listener = UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        // The plugin connects before it knows what it will ask; an ADD that fails first
        // (below) closes without a request. Serves until a DEL.
        loop {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                continue;
            }
            let req: Value = serde_json::from_str(&line).unwrap();
            let command = req["command"].as_str().unwrap_or_default().to_string();
            assert_ne!(command, "ADD", "ADD must fail before asking the agent");
            let mut s = s;
            s.write_all(format!("{}\n", json!("done")).as_bytes())
                .unwrap();
            if command == "DEL" {
                return;
            }
        }
    });
    // ADD into a network namespace that does not exist: an I/O error naming it, and the
    // agent is not asked (a successful ADD into a real namespace: tests/node_real.rs).
    let (rc, v) = plugin("ADD", &conf);
    assert_eq!((rc, v["code"].as_u64()), (1, Some(5)), "{v}");
    assert!(
        v["details"]
            .as_str()
            .is_some_and(|d| d.contains("/var/run/netns/x")),
        "{v}"
    );
    // DEL succeeds although the namespace (and so the pod's interface) is gone.
    let (rc, v) = plugin("DEL", &conf);
    assert_eq!((rc, v), (0, Value::Null));
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
