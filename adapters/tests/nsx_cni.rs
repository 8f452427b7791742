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

/// The plugin with `env` on top of a valid ADD environment; `(exit code, stdout)`.
fn plugin_with(env: &[(std::ffi::OsString, std::ffi::OsString)], conf: &Value) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nsx-cni"));
    cmd.env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "abc123")
        .env("CNI_NETNS", "/var/run/netns/x")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
        .env("CNI_PATH", "/opt/cni/bin");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
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
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_variable_that_is_not_utf8_is_error_4_or_ignored_never_a_panic() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let conf = json!({"cniVersion": "1.0.0", "name": "nsx", "type": "nsx-cni",
                      "agentSocket": "/nonexistent/agent.sock"});
    let bad = || OsString::from_vec(vec![b'x', 0xff, 0xfe]);
    for var in ["CNI_ARGS", "CNI_CONTAINERID"] {
        let (rc, out) = plugin_with(&[(var.into(), bad())], &conf);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        assert_eq!((rc, v["code"].as_u64()), (1, Some(4)), "{var}: {v}");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["msg"].as_str().unwrap().contains(var), "{v}");
    }
    // Somebody else's variable: ignored; the answer is about the (absent) agent.
    let (rc, out) = plugin_with(&[("LC_WEIRD".into(), bad())], &conf);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!((rc, v["code"].as_u64()), (1, Some(11)), "{v}");
}

#[test]
fn an_agent_that_accepts_and_never_answers_is_try_again_later_within_the_timeout() {
    let dir = std::env::temp_dir().join(format!("nsx-cni-mute-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Accepts, reads, never answers; holds every connection open.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let conf = json!({"cniVersion": "1.1.0", "name": "nsx", "type": "nsx-cni",
                      "agentSocket": socket, "agentTimeoutSeconds": 1});
    let started = std::time::Instant::now();
    let (rc, out) = plugin_with(&[("CNI_COMMAND".into(), "DEL".into())], &conf);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!((rc, v["code"].as_u64()), (1, Some(11)), "{v}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "bounded by agentTimeoutSeconds, took {:?}",
        started.elapsed()
    );
    // An out-of-range timeout is a configuration error.
    let mut bad = conf.clone();
    bad["agentTimeoutSeconds"] = json!(0);
    let (rc, out) = plugin_with(&[], &bad);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((rc, v["code"].as_u64()), (1, Some(7)), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
