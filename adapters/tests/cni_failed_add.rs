//! A failed `nsx-cni` ADD undoes what it did. Before the fix, an ADD whose agent answered an
//! invalid address (or whose `CNI_NETNS` was not a namespace) left its veth pair behind, and
//! a later ADD into the same namespace configured the leftover `eth0`. Runs the binary in a
//! network namespace of its own; needs root and iproute2: it fails, it does not skip, without
//! them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};

use nsx_core::ovs::interface::port_name;
use serde_json::{Value, json};

mod common;
use common::{Namespaces, in_netns, ok, sh};

/// A stand-in agent answering every request on `socket` with `answer`.
fn agent(socket: &Path, answer: Value) {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let mut line = String::new();
            if BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap_or(0)
                == 0
            {
                continue;
            }
            let _ = s.write_all(format!("{answer}\n").as_bytes());
        }
    });
}

fn add(cid: &str, netns: &str, socket: &Path) -> (i32, Value) {
    let conf =
        json!({"cniVersion": "1.1.0", "name": "nsx", "type": "nsx-cni", "agentSocket": socket});
    let mut child = Command::new(env!("CARGO_BIN_EXE_nsx-cni"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (out.status.code().unwrap_or(-1), v)
}

fn host_link_exists(name: &str) -> bool {
    sh("ip", &["link", "show", name]).status.success()
}

#[test]
fn a_failed_add_leaves_no_interface_and_the_next_add_starts_clean() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("a network namespace of its own (the test needs root)");
    ok("ip", &["link", "set", "lo", "up"]);
    let pid = std::process::id();
    let ns = format!("nsxfail{pid}");
    let _ns = Namespaces::create(vec![ns.clone()]);
    let netns = format!("/var/run/netns/{ns}");
    let dir = std::env::temp_dir().join(format!("nsx-cni-failed-add-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cid = "cid-failed-0001";
    let host = port_name(cid);

    // 1. The agent answers an address that is not one: error, and neither end of the pair
    //    is left (the pod's end would be eth0 in the namespace).
    let bad = dir.join("bad.sock");
    agent(
        &bad,
        json!({"added": {"ip": "300.1.2.3/24", "gateway": "10.4.0.1", "mac": "02:50:56:00:00:0a"}}),
    );
    let (rc, v) = add(cid, &netns, &bad);
    assert_eq!((rc, v["code"].as_u64()), (1, Some(100)), "{v}");
    assert!(!host_link_exists(&host), "{host} left behind");
    let inside = in_netns(&ns, &["ip", "link", "show", "eth0"]);
    assert!(!inside.status.success(), "eth0 left in the pod's namespace");

    // 2. CNI_NETNS is a file but not a namespace: the pair made before moving the pod's end
    //    is removed.
    let not_ns = dir.join("not-a-netns");
    std::fs::write(&not_ns, b"").unwrap();
    let (rc, v) = add(cid, not_ns.to_str().unwrap(), &bad);
    assert_eq!((rc, v["code"].as_u64()), (1, Some(5)), "{v}");
    assert!(!host_link_exists(&host), "{host} left behind");
    let leftovers = ok("ip", &["-o", "link", "show"]);
    assert!(
        !leftovers.contains(&host[..host.len().min(14)]),
        "a veth end left: {leftovers}"
    );

    // 3. The agent answers well: the same namespace is wired from scratch.
    let good = dir.join("good.sock");
    agent(
        &good,
        json!({"added": {"ip": "10.4.0.10/24", "gateway": "10.4.0.1", "mac": "02:50:56:00:00:0a"}}),
    );
    let (rc, v) = add(cid, &netns, &good);
    assert_eq!(rc, 0, "{v}");
    assert!(host_link_exists(&host));
    let addr =
        String::from_utf8_lossy(&in_netns(&ns, &["ip", "-o", "addr", "show", "eth0"]).stdout)
            .into_owned();
    assert!(addr.contains("10.4.0.10/24"), "{addr}");
    let _ = std::fs::remove_dir_all(&dir);
}
