//! A node for real. `nsx-node-agent agent` and `nsx-node-agent kube-proxy` run as processes
//! against a private ovs-vswitchd (userspace datapath) and the fake kube-apiserver over HTTP;
//! `nsx-cni` is driven as a container runtime drives it (environment, stdin, exit codes).
//! Two pods get real network namespaces with their veth, NSX's MAC, address and route;
//! traffic between them leaves through the uplink with each pod's VLAN (a second bridge plays
//! NSX: it switches by VLAN, answers ARP for the gateway and routes), and ClusterIP services
//! are load-balanced by nsx-kube-proxy's flows, the replies un-NATed, a pod reaching itself
//! through its own Service turned around on the node. Then ovs-vswitchd
//! restarts (both processes replay), the proxy restarts (a new round replaces the old), a
//! Service added through the API is served, and CHECK, DEL (twice) and GC behave as the spec
//! says. It runs in a network namespace of its own. Needs root and Debian's
//! openvswitch-switch: it fails, it does not skip, without them.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fake_ovs::real::Sandbox;
use nsx_adapters::ovs::{OvsBridge, OvsTools, find_tool};
use nsx_core::agent::PodSwitch;
use nsx_core::ovs::interface::port_name;
use nsx_core::ovs::pipeline::{self, Cookie};
use nsx_sim::apiserver::ApiServer;
use serde_json::{Value, json};

mod common;
use common::{Namespaces, Running, free_port, http_get, in_netns, ok, sh, wait_for};

const GW: &str = "10.4.0.1";
const GW_MAC: &str = "02:00:0a:04:00:01";
/// The node's own address (on its VIF: untagged on the uplink), outside the pods' subnet.
const NODE_IP: &str = "172.16.0.10";
/// A client outside the cluster, behind "NSX", and its gateway there.
const CLIENT_IP: &str = "203.0.113.9";
const CLIENT_GW: &str = "203.0.113.1";
/// An endpoint on another node, as far as this one can tell: behind "NSX".
const REMOTE_IP: &str = "10.4.0.99";

struct Pod {
    name: &'static str,
    cid: &'static str,
    ip: &'static str,
    mac: &'static str,
    vlan: u16,
    netns: String,
}

/// The private switch: br-int (`bi…`) and a bridge standing in for NSX (`bn…`), joined by
/// the uplink patch port (ofport 1 on both).
struct Switch {
    sb: Sandbox,
    tools: OvsTools,
    brint: String,
    brnsx: String,
    uplink: String,
}

impl Switch {
    fn start() -> Self {
        let pid = std::process::id() % 100_000;
        let sb = Sandbox::start_netdev("node");
        let dir = sb.dir().to_string_lossy().into_owned();
        let tools = OvsTools {
            vsctl: find_tool("ovs-vsctl").expect("ovs-vsctl"),
            ofctl: find_tool("ovs-ofctl").expect("ovs-ofctl"),
            appctl: find_tool("ovs-appctl").expect("ovs-appctl"),
            db: Some(format!("unix:{}", sb.path("db.sock"))),
            env: vec![("OVS_RUNDIR".into(), dir)],
        };
        let (brint, brnsx) = (format!("bi{pid}"), format!("bn{pid}"));
        let (up, nsxp) = (format!("up{pid}"), format!("np{pid}"));
        #[rustfmt::skip]
        tools.vsctl(&[
            "add-br", &brint, "--", "set", "bridge", &brint, "datapath_type=netdev",
            "fail-mode=secure", "--", "add-br", &brnsx, "--", "set", "bridge", &brnsx,
            "datapath_type=netdev", "fail-mode=secure", "--", "add-port", &brint, &up, "--",
            "set", "interface", &up, "type=patch", &format!("options:peer={nsxp}"),
            "ofport_request=1", "--", "add-port", &brnsx, &nsxp, "--", "set", "interface",
            &nsxp, "type=patch", &format!("options:peer={up}"), "ofport_request=1",
        ])
        .unwrap();
        Self {
            sb,
            tools,
            brint,
            brnsx,
            uplink: up,
        }
    }

    fn bridge(&self) -> OvsBridge {
        OvsBridge::new(&self.brint, self.tools.clone())
    }

    /// NSX, as far as these pods need it: switch by VLAN, answer ARP for the gateway.
    fn play_nsx(&self, pods: &[Pod]) {
        let mut nsx = vec![];
        for (p, q) in [(&pods[0], &pods[1]), (&pods[1], &pods[0])] {
            nsx.push(format!(
                "priority=100,arp,dl_vlan={},arp_tpa={} actions=mod_vlan_vid:{},IN_PORT",
                p.vlan, q.ip, q.vlan
            ));
            nsx.push(format!(
                "priority=100,ip,dl_vlan={},nw_dst={} actions=mod_dl_dst:{},mod_vlan_vid:{},IN_PORT",
                p.vlan, q.ip, q.mac, q.vlan
            ));
            nsx.push(format!(
                "priority=100,arp,arp_op=1,dl_vlan={},arp_tpa={GW} actions=move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],mod_dl_src:{GW_MAC},load:0x2->NXM_OF_ARP_OP[],move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[],move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[],load:0x{}->NXM_NX_ARP_SHA[],load:0x0a040001->NXM_OF_ARP_SPA[],IN_PORT",
                p.vlan,
                GW_MAC.replace(':', "")
            ));
        }
        let text: String = nsx.iter().map(|l| format!("{l}\n")).collect();
        self.tools
            .ofctl(&["add-flows", &self.brnsx, "-"], Some(&text))
            .unwrap();
    }

    fn dump(&self) -> String {
        self.tools
            .ofctl(&["-O", "OpenFlow15", "dump-flows", &self.brint], None)
            .unwrap_or_default()
    }
}

/// The fake kube-apiserver on a loopback port, and a kubeconfig for it.
struct Api {
    api: ApiServer,
    kubeconfig: PathBuf,
    _rt: tokio::runtime::Runtime,
}

fn api(dir: &Path) -> Api {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api = ApiServer::new(1, || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    });
    let addr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let router = api.router();
        tokio::spawn(async move { axum::serve(l, router).await });
        addr
    });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: node\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: node\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    Api {
        api,
        kubeconfig,
        _rt: rt,
    }
}

fn service(name: &str, ip: &str, port: u16, endpoint: &str) -> [Value; 2] {
    [
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"namespace": "shop", "name": name},
               "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                        "selector": {"app": "b"},
                        "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"namespace": "shop", "name": format!("{name}-1"),
                            "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [endpoint], "conditions": {"ready": true}, "nodeName": "node-1"}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
    ]
}

fn node_agent(sw: &Switch, kubeconfig: &Path, metrics: u16, role: &[&str]) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_nsx-node-agent"))
        .args(role)
        .args(["--node-name", "node-1", "--bridge", &sw.brint])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--ovs-db", &format!("unix:{}", sw.sb.path("db.sock"))])
        .arg("--ovs-rundir")
        .arg(sw.sb.dir())
        .args(["--ovs-check-ms", "200"])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .spawn()
        .expect("nsx-node-agent runs");
    let running = Running(child);
    wait_for(
        &format!("{role:?} to be ready"),
        Duration::from_secs(20),
        || http_get(metrics, "/readyz").filter(|(c, _)| *c == 200),
    );
    running
}

/// The value of a sample in a metrics port's exposition.
fn metric(port: u16, name: &str) -> Option<u64> {
    let (_, text) = http_get(port, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn cni(command: &str, pod: &Pod, socket: &Path, extra: Value) -> (i32, Value) {
    let mut conf = json!({
        "cniVersion": "1.1.0", "name": "nsx", "type": "nsx-cni", "agentSocket": socket
    });
    if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_nsx-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod.cid)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={}", pod.name),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command}: {e}: {text}"))
    };
    (out.status.code().unwrap_or(-1), v)
}

/// An HTTP server in `pod`'s namespace answering its name (a plain socket server:
/// http.server's reverse lookup of its address would stall for the resolver's timeout).
fn serve_http(pod: &Pod) -> Running {
    let py = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{}', 8080)); s.listen(16); print('listening', flush=True)\n\
         while True:\n\
         \x20   c, _ = s.accept(); c.recv(4096)\n\
         \x20   c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 6\\r\\n\\r\\npod-{}\\n'); c.close()\n",
        pod.ip, pod.name
    );
    serve_py(&pod.netns, &py)
}

/// Runs the Python server `py` in namespace `netns`, once it prints "listening".
fn serve_py(netns: &str, py: &str) -> Running {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", py])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening", "the test server did not start");
    Running(child)
}

/// GET `url` from `pod`'s namespace (retried for up to 5 s): "<status> <body>" or the error.
fn get(pod: &Pod, url: &str) -> String {
    let client = format!(
        "import sys,time,urllib.request\n\
         err = None\n\
         for i in range(25):\n\
         \x20   try:\n\
         \x20       r = urllib.request.urlopen('{url}', timeout=2); print(r.status, r.read().decode().strip()); sys.exit(0)\n\
         \x20   except Exception as e:\n\
         \x20       err = e; time.sleep(0.2)\n\
         print(err); sys.exit(1)\n"
    );
    let out = in_netns(&pod.netns, &["python3", "-c", &client]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A UDP Service `dns` on 10.96.0.13:`port` with `endpoint` (or none) at port 5353.
fn udp_service(port: u16, endpoint: Option<&str>) -> [Value; 2] {
    let endpoints: Vec<Value> = endpoint
        .into_iter()
        .map(|e| json!({"addresses": [e], "conditions": {"ready": true}, "nodeName": "node-1"}))
        .collect();
    [
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"namespace": "shop", "name": "dns"},
               "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.13", "clusterIPs": ["10.96.0.13"],
                        "ports": [{"name": "dns", "port": port, "protocol": "UDP", "targetPort": 5353}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"namespace": "shop", "name": "dns-1",
                            "labels": {"kubernetes.io/service-name": "dns"}},
               "addressType": "IPv4", "endpoints": endpoints,
               "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}]}),
    ]
}

/// A UDP echo server on `pod`'s port 5353.
fn serve_udp(pod: &Pod) -> Running {
    let py = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{}', 5353))\n\
         print('listening', flush=True)\n\
         while True:\n\
         \x20   d, a = s.recvfrom(100); s.sendto(b'pong', a)\n",
        pod.ip
    );
    serve_py(&pod.netns, &py)
}

/// From `pod`'s port 40001, a datagram to 10.96.0.13:`port`: "pong" or what happened.
fn ask_udp(pod: &Pod, port: u16) -> String {
    let py = format!(
        "import socket\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)\n\
         u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); u.bind(('{}', 40001))\n\
         u.connect(('10.96.0.13', {port})); u.send(b'ping')\n\
         try:\n\
         \x20   print(u.recv(100).decode())\n\
         except Exception as e: print(type(e).__name__)\n",
        pod.ip
    );
    let out = in_netns(&pod.netns, &["python3", "-c", &py]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The connections OVS tracks to 10.96.0.13 on UDP `port` (`dpctl/dump-conntrack`).
fn tracked_to_dns(sw: &Switch, port: u16) -> usize {
    let dump = sw
        .tools
        .appctl(&["dpctl/dump-conntrack"])
        .unwrap_or_default();
    dump.lines()
        .filter(|l| {
            l.starts_with("udp,") && l.contains(&format!("dst=10.96.0.13,sport=40001,dport={port}"))
        })
        .count()
}

/// From `pod`: a TCP connect to `ip:tcp` and a UDP datagram to `ip:udp`, each "refused" (with
/// the seconds the TCP refusal took) or what happened instead.
fn try_closed_ports(pod: &Pod, ip: &str, tcp: u16, udp: u16) -> String {
    let py = format!(
        "import socket,time\n\
         t = time.time()\n\
         try:\n\
         \x20   socket.create_connection(('{ip}', {tcp}), timeout=3); print('tcp connected')\n\
         except ConnectionRefusedError: print('tcp refused %.1f' % (time.time() - t))\n\
         except Exception as e: print('tcp', type(e).__name__)\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)\n\
         u.connect(('{ip}', {udp})); u.send(b'x')\n\
         try:\n\
         \x20   u.recv(100); print('udp answered')\n\
         except ConnectionRefusedError: print('udp refused')\n\
         except Exception as e: print('udp', type(e).__name__)\n"
    );
    let out = in_netns(&pod.netns, &["python3", "-c", &py]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A NodePort Service `name` on `node_port` (ClusterIP `ip`) with one endpoint at port 8081 on
/// `node`, under externalTrafficPolicy `etp`.
fn nodeport(
    name: &str,
    ip: &str,
    node_port: u16,
    etp: &str,
    endpoint: &str,
    node: &str,
) -> [Value; 2] {
    [
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"namespace": "shop", "name": name},
               "spec": {"type": "NodePort", "clusterIP": ip, "clusterIPs": [ip],
                        "externalTrafficPolicy": etp,
                        "ports": [{"name": "peer", "port": 80, "protocol": "TCP", "targetPort": 8081,
                                   "nodePort": node_port}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"namespace": "shop", "name": format!("{name}-1"),
                            "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [endpoint], "conditions": {"ready": true}, "nodeName": node}],
               "ports": [{"name": "peer", "port": 8081, "protocol": "TCP"}]}),
    ]
}

/// An HTTP server on `ip`:8081 in namespace `netns` answering the address it was reached from.
fn serve_peer(netns: &str, ip: &str) -> Running {
    let py = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{ip}', 8081)); s.listen(16); print('listening', flush=True)\n\
         while True:\n\
         \x20   c, a = s.accept(); c.recv(4096); b = ('from ' + a[0]).encode()\n\
         \x20   c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(b) + b); c.close()\n"
    );
    serve_py(netns, &py)
}

/// One GET of `url` from namespace `netns` (3 s): "<status> <body>" or the error's type.
fn get_once(netns: &str, url: &str) -> String {
    let py = format!(
        "import urllib.request\n\
         try:\n\
         \x20   r = urllib.request.urlopen('{url}', timeout=3); print(r.status, r.read().decode().strip())\n\
         except Exception as e: print(type(e).__name__, e)\n"
    );
    let out = in_netns(netns, &["python3", "-c", &py]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A namespace behind "NSX" (port `ofport` of its bridge): address `ip`/24 with a default
/// route via `gw`, whose MAC is pinned (no ARP needed).
fn behind_nsx(sw: &Switch, netns: &str, host: &str, ofport: u32, ip: &str, mac: &str, gw: &str) {
    let path = PathBuf::from(format!("/var/run/netns/{netns}"));
    nsx_adapters::netns::create_pod_link(host, &path, "eth0", 1500).expect("a veth");
    nsx_adapters::netns::configure_pod_link(
        &path,
        "eth0",
        mac,
        ip.parse().unwrap(),
        24,
        gw.parse().unwrap(),
        1500,
    )
    .expect("the namespace's link");
    ok(
        "ip",
        &[
            "-n",
            netns,
            "neigh",
            "replace",
            gw,
            "lladdr",
            GW_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    #[rustfmt::skip]
    sw.tools.vsctl(&[
        "add-port", &sw.brnsx, host, "--", "set", "interface", host,
        &format!("ofport_request={ofport}"),
    ])
    .unwrap();
}

/// NodePort from outside the node, on the node's own address: the client's packets reach the
/// node's uplink untagged, nsx-kube-proxy DNATs them to the endpoint, masquerades them to the
/// node's address under externalTrafficPolicy Cluster (an endpoint elsewhere: out of the
/// uplink again, its replies back through this node), keeps the client's address under Local,
/// and drops when Local leaves this node no endpoint.
fn nodeports(sw: &Switch, k: &Api, pods: &[Pod; 2], pid: u32) {
    let (client_ns, remote_ns) = (format!("nsxc{pid}"), format!("nsxr{pid}"));
    let _ns = Namespaces::create(vec![client_ns.clone(), remote_ns.clone()]);
    let (cmac, rmac) = ("02:00:cb:00:71:09", "02:50:56:00:00:99");
    behind_nsx(
        sw,
        &client_ns,
        &format!("oc{pid}"),
        10,
        CLIENT_IP,
        cmac,
        CLIENT_GW,
    );
    behind_nsx(sw, &remote_ns, &format!("or{pid}"), 11, REMOTE_IP, rmac, GW);
    // "NSX": the node's address is on its VIF (untagged, the uplink); the client and the
    // remote endpoint are routed to.
    let flows = [
        format!("priority=200,ip,in_port=10,nw_dst={NODE_IP} actions=output:1"),
        format!("priority=200,ip,in_port=11,nw_dst={NODE_IP} actions=output:1"),
        format!(
            "priority=200,ip,in_port=1,vlan_tci=0x0000/0x1fff,nw_dst={CLIENT_IP} actions=mod_dl_dst:{cmac},output:10"
        ),
        format!(
            "priority=200,ip,in_port=1,vlan_tci=0x0000/0x1fff,nw_dst={REMOTE_IP} actions=mod_dl_dst:{rmac},output:11"
        ),
    ];
    let text: String = flows.iter().map(|l| format!("{l}\n")).collect();
    sw.tools
        .ofctl(&["add-flows", &sw.brnsx, "-"], Some(&text))
        .unwrap();
    let _b = serve_peer(&pods[1].netns, pods[1].ip);
    let _r = serve_peer(&remote_ns, REMOTE_IP);
    for (name, ip, np, etp, ep, node) in [
        (
            "np-here",
            "10.96.0.20",
            30080,
            "Cluster",
            pods[1].ip,
            "node-1",
        ),
        (
            "np-here-local",
            "10.96.0.21",
            30081,
            "Local",
            pods[1].ip,
            "node-1",
        ),
        (
            "np-there",
            "10.96.0.22",
            30082,
            "Cluster",
            REMOTE_IP,
            "node-2",
        ),
        (
            "np-there-local",
            "10.96.0.23",
            30083,
            "Local",
            REMOTE_IP,
            "node-2",
        ),
    ] {
        for o in nodeport(name, ip, np, etp, ep, node) {
            k.api.apply(o).unwrap();
        }
    }
    let url = |np: u16| format!("http://{NODE_IP}:{np}/");
    // The endpoint on this node, masqueraded: it sees the node's address.
    let got = wait_for("NodePort 30080 to answer", Duration::from_secs(10), || {
        let g = get_once(&client_ns, &url(30080));
        g.starts_with("200").then_some(g)
    });
    assert_eq!(got, format!("200 from {NODE_IP}"), "{}", sw.dump());
    // Local: the client's own address.
    let got = get_once(&client_ns, &url(30081));
    assert_eq!(got, format!("200 from {CLIENT_IP}"), "{}", sw.dump());
    // The endpoint elsewhere: forwarded out of the uplink, masqueraded, the reply un-NATed on
    // the way back through this node.
    let got = get_once(&client_ns, &url(30082));
    assert_eq!(got, format!("200 from {NODE_IP}"), "{}", sw.dump());
    // Local with no endpoint here: dropped, not refused.
    let got = get_once(&client_ns, &url(30083));
    assert!(
        got.starts_with("URLError") && got.contains("timed out"),
        "{got}"
    );
    // The node's real conntrack holds both halves of the masquerade: the DNAT in the host
    // zone and the SNAT in the SNAT zone.
    let ct = sw
        .tools
        .appctl(&["dpctl/dump-conntrack"])
        .unwrap_or_default();
    let zone = |z: u16| format!("zone={z}");
    assert!(
        ct.lines()
            .any(|l| l.contains(&format!("dst={NODE_IP},sport="))
                && l.contains("dport=30082")
                && l.contains(&zone(pipeline::zone::HOST))),
        "{ct}"
    );
    assert!(
        ct.lines().any(
            |l| l.contains(&format!("reply=(src={REMOTE_IP},dst={NODE_IP},sport=8081"))
                && l.contains(&zone(pipeline::zone::SNAT))
        ),
        "{ct}"
    );
}

/// The Go driver of `tests/libcni/driver.go` (libcni 1.1, as containerd 1.7 links it), built
/// with Debian's Go and Debian's copy of libcni.
fn libcni_driver() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = dir.join("libcni-driver");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libcni/driver.go");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", dir.join("go-cache"))
        .env("GOFLAGS", "")
        .status()
        .expect("Debian's golang-go (scripts/test.sh installs it)");
    assert!(
        status.success(),
        "building the libcni driver (needs golang-github-appc-cni-dev)"
    );
    out
}

/// A pod wired by a container runtime's CNI library, through a chain with Debian's reference
/// plugins after nsx-cni: `tuning` (a sysctl in the pod), `bandwidth` (a tc shaper on the
/// veth's host end, which it finds in nsx-cni's result) and `portmap` (iptables DNAT of a host
/// port). The shipped conflist version (1.0.0) is the one libcni 1.1 reads results of.
fn libcni_chain(sw: &Switch, k: &Api, socket: &Path, pid: u32) {
    let netns = format!("nsxl{pid}");
    let _ns = Namespaces::create(vec![netns.clone()]);
    let (cid, ip, mac) = ("cid-c-0003", "10.4.0.12", "02:50:56:00:00:0c");
    let net = json!({"ip": format!("{ip}/24"), "mac": mac, "gateway": GW, "vlan": 13,
                     "logical_port_id": "lp-c"});
    k.api
        .apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "shop", "name": "c", "labels": {"app": "c"},
                         "annotations": {"ncp/network": net.to_string()}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}))
        .unwrap();
    let driver = libcni_driver();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("libcni-{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    // The conflist as deploy/nsx-node-agent.yaml ships it, with the chain after nsx-cni.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nsx-node-agent.yaml"),
    )
    .unwrap();
    assert!(
        shipped.contains("\"cniVersion\": \"1.0.0\""),
        "the shipped conflist's version"
    );
    let conflist = dir.join("10-nsx.conflist");
    let chain = |portmap: bool| {
        let mut plugins = vec![
            json!({"type": "nsx-cni", "agentSocket": socket}),
            json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}}),
            json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
        ];
        if portmap {
            plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
        }
        json!({"cniVersion": "1.0.0", "name": "nsx", "plugins": plugins}).to_string()
    };
    std::fs::write(&conflist, chain(true)).unwrap();
    let nsx_cni = Path::new(env!("CARGO_BIN_EXE_nsx-cni"));
    let cni_path = format!("{}:/usr/lib/cni", nsx_cni.parent().unwrap().display());
    let netns_path = format!("/var/run/netns/{netns}");
    let cache = dir.join("cache");
    let run = |cmd: &str| {
        let out = Command::new(&driver)
            .args([
                cmd,
                &conflist.to_string_lossy(),
                &netns_path,
                cid,
                "eth0",
                "shop/c",
            ])
            .arg(&cache)
            .env("CNI_PATH", &cni_path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok_add, stdout, stderr) = run("ADD");
    assert!(ok_add, "libcni ADD: {stderr}");
    let result: Value = serde_json::from_str(&stdout).expect("a result");
    assert_eq!(result["cniVersion"], "1.0.0", "{result}");
    let host = port_name(cid);
    let ifaces = result["interfaces"].as_array().expect("interfaces");
    let at = |name: &str| ifaces.iter().position(|i| i["name"] == name);
    let (h, p) = (
        at(&host).expect("the veth's host end is listed"),
        at("eth0").expect("eth0 is listed"),
    );
    assert!(ifaces[h].get("sandbox").is_none(), "{result}");
    assert_eq!(ifaces[p]["sandbox"], netns_path.as_str(), "{result}");
    assert_eq!(ifaces[p]["mac"], mac, "{result}");
    assert_eq!(result["ips"][0]["address"], format!("{ip}/24"), "{result}");
    assert_eq!(result["ips"][0]["interface"], p, "{result}");
    // Each chained plugin did its part.
    let somaxconn = in_netns(&netns, &["sysctl", "-n", "net.core.somaxconn"]);
    assert_eq!(String::from_utf8_lossy(&somaxconn.stdout).trim(), "512");
    let tc = ok("tc", &["qdisc", "show", "dev", &host]);
    assert!(tc.contains("tbf"), "bandwidth shaped the host end: {tc}");
    let nat = ok("iptables", &["-t", "nat", "-S"]);
    assert!(nat.contains("--dport 18080"), "portmap's DNAT: {nat}");
    assert!(sw.bridge().has_port(&host), "the agent added the OVS port");
    // CHECK through the chain (nsx-cni's against NSX's record and the namespace). Debian's
    // portmap 1.1.1 cannot CHECK on a host with ip6tables and an IPv4-only pod (it looks for
    // the IPv6 chain it never made), so CHECK runs the chain without it, on the result libcni
    // cached from the full ADD.
    std::fs::write(&conflist, chain(false)).unwrap();
    let (ok_check, _, stderr) = run("CHECK");
    assert!(ok_check, "libcni CHECK: {stderr}");
    std::fs::write(&conflist, chain(true)).unwrap();
    // DEL undoes every plugin's part; a second DEL succeeds too.
    for _ in 0..2 {
        let (ok_del, _, stderr) = run("DEL");
        assert!(ok_del, "libcni DEL: {stderr}");
    }
    assert!(!sw.bridge().has_port(&host));
    assert!(!sh("ip", &["link", "show", &host]).status.success());
    let nat = ok("iptables", &["-t", "nat", "-S"]);
    assert!(
        !nat.contains("--dport 18080"),
        "portmap's DNAT stays: {nat}"
    );
}

#[test]
fn a_node_wires_pods_serves_cluster_ips_and_survives_restarts() {
    // The node gets a network namespace of its own (this thread, and so every thread and
    // process it starts from here: OVS, the binaries, the fake apiserver's runtime): its
    // bridges' taps and the pods' host-side veths never touch the machine's namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("a network namespace of its own (the test needs root)");
    ok("ip", &["link", "set", "lo", "up"]);
    let pid = std::process::id();
    let sw = Switch::start();
    let k = api(sw.sb.dir());
    let pods = [
        Pod {
            name: "a",
            cid: "cid-a-0001",
            ip: "10.4.0.10",
            mac: "02:50:56:00:00:0a",
            vlan: 11,
            netns: format!("nsxa{pid}"),
        },
        Pod {
            name: "b",
            cid: "cid-b-0002",
            ip: "10.4.0.11",
            mac: "02:50:56:00:00:0b",
            vlan: 12,
            netns: format!("nsxb{pid}"),
        },
    ];
    let _ns = Namespaces::create(pods.iter().map(|p| p.netns.clone()).collect());
    // What NCP would have written: the pods with their ncp/network annotations; a Service.
    k.api
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    for p in &pods {
        let net = json!({"ip": format!("{}/24", p.ip), "mac": p.mac, "gateway": GW,
                         "vlan": p.vlan, "logical_port_id": format!("lp-{}", p.name)});
        k.api
            .apply(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": "shop", "name": p.name, "labels": {"app": p.name},
                             "annotations": {"ncp/network": net.to_string()}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}))
            .unwrap();
    }
    for o in service("web", "10.96.0.10", 80, pods[1].ip) {
        k.api.apply(o).unwrap();
    }
    // A Service whose pods are all gone: no EndpointSlice has an endpoint for it.
    k.api
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": "empty"},
            "spec": {"clusterIP": "10.96.0.12", "ports": [
                {"name": "t", "port": 7070, "protocol": "TCP"},
                {"name": "u", "port": 7071, "protocol": "UDP"}]}}))
        .unwrap();
    // A Service for local clients only (internalTrafficPolicy: Local) whose one endpoint is on
    // another node: dropped here, not rejected, as kube-proxy does.
    k.api
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": "elsewhere"},
            "spec": {"clusterIP": "10.96.0.14", "internalTrafficPolicy": "Local", "ports": [
                {"name": "t", "port": 7072, "protocol": "TCP"},
                {"name": "u", "port": 7073, "protocol": "UDP"}]}}))
        .unwrap();
    k.api
        .apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "shop", "name": "elsewhere-1",
                         "labels": {"kubernetes.io/service-name": "elsewhere"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.4.0.99"], "conditions": {"ready": true}, "nodeName": "node-2"}],
            "ports": [{"name": "t", "port": 7072, "protocol": "TCP"}, {"name": "u", "port": 7073, "protocol": "UDP"}]}))
        .unwrap();

    let socket = sw.sb.dir().join("cni.sock");
    let (agent_port, proxy_port) = (free_port(), free_port());
    let uplink_arg = ["agent", "--uplink", &sw.uplink, "--cni-socket"];
    let mut role: Vec<&str> = uplink_arg.to_vec();
    let socket_text = socket.to_string_lossy().into_owned();
    role.push(&socket_text);
    let mut agent = node_agent(&sw, &k.kubeconfig, agent_port, &role);
    let proxy_role = ["kube-proxy", "--node-ip", NODE_IP];
    let mut proxy = node_agent(&sw, &k.kubeconfig, proxy_port, &proxy_role);

    // ADD: the result JSON as the spec says, the pod's namespace configured.
    let mut results = Vec::new();
    for p in &pods {
        let (code, out) = cni("ADD", p, &socket, json!({}));
        assert_eq!(code, 0, "ADD {}: {out}", p.name);
        assert_eq!(out["cniVersion"], "1.1.0", "{out}");
        assert_eq!(out["ips"][0]["address"], format!("{}/24", p.ip), "{out}");
        results.push(out);
        let link = ok("ip", &["-n", &p.netns, "-o", "link", "show", "eth0"]);
        assert!(link.contains(p.mac), "{link}");
        assert!(link.contains("mtu 1500") && link.contains("UP"), "{link}");
        let addr = ok("ip", &["-n", &p.netns, "-o", "-4", "addr", "show", "eth0"]);
        assert!(addr.contains(&format!("{}/24", p.ip)), "{addr}");
        let route = ok("ip", &["-n", &p.netns, "route", "show", "default"]);
        assert!(route.contains(&format!("via {GW} dev eth0")), "{route}");
        let host = port_name(p.cid);
        let ports = sw.bridge().list_ports();
        let port = ports.iter().find(|x| x.name == host).expect("the OVS port");
        assert!(port.ofport > 1, "{port:?}");
        assert_eq!(
            port.external_ids.get("attached-mac").map(String::as_str),
            Some(p.mac)
        );
    }
    wait_for(
        "the agent to count its pods",
        Duration::from_secs(5),
        || (metric(agent_port, "nsx_node_pods_wired") == Some(2)).then_some(()),
    );

    // a reaches b directly (out of a's port with VLAN 11, through "NSX", into b with VLAN
    // 12) and through the ClusterIP.
    sw.play_nsx(&pods);
    let _server = serve_http(&pods[1]);
    for (what, url) in [
        ("b directly", "http://10.4.0.11:8080/"),
        ("the ClusterIP", "http://10.96.0.10/"),
    ] {
        let got = get(&pods[0], url);
        assert_eq!(got, "200 pod-b", "GET {what} from a\n{}", sw.dump());
    }
    assert_eq!(metric(proxy_port, "nsx_kube_proxy_service_ports"), Some(5));
    // The Service without endpoints refuses at once, as kube-proxy's REJECT does: the flow
    // sends the packet to the controller and the proxy answers a TCP RST or an ICMP port
    // unreachable out of the pod's port (a real OVS alone would drop it: a 3 s timeout). So
    // does a port the ClusterIP of `web` does not serve.
    let refused = |ip: &str, tcp: u16, udp: u16| try_closed_ports(&pods[0], ip, tcp, udp);
    let got = refused("10.96.0.12", 7070, 7071);
    assert!(
        got.starts_with("tcp refused 0.") && got.ends_with("udp refused"),
        "{got}\n{}",
        sw.dump()
    );
    let got = refused("10.96.0.10", 81, 82);
    assert!(
        got.starts_with("tcp refused 0.") && got.ends_with("udp refused"),
        "{got}"
    );
    assert!(metric(proxy_port, "nsx_kube_proxy_rejects_total") >= Some(4));
    // No endpoint on this node for a local-only Service: silence (a 3 s timeout), no RST.
    let rejects = metric(proxy_port, "nsx_kube_proxy_rejects_total");
    let got = refused("10.96.0.14", 7072, 7073);
    assert_eq!(got, "tcp TimeoutError udp TimeoutError", "{}", sw.dump());
    assert_eq!(metric(proxy_port, "nsx_kube_proxy_rejects_total"), rejects);
    // b reaches itself through its own ClusterIP (hairpin): the node turns the connection
    // around with the hairpin source address; "NSX" has no flow that would send b's packets
    // back to b, and b's kernel would drop a packet from its own address.
    let got = get(&pods[1], "http://10.96.0.10/");
    assert_eq!(
        got,
        "200 pod-b",
        "GET the ClusterIP from b itself\n{}",
        sw.dump()
    );

    // ovs-vswitchd restarts: flows and groups are gone; both processes notice and replay
    // (NSX's stand-in is replayed by the test).
    sw.sb.restart_vswitchd();
    for (who, port) in [("agent", agent_port), ("proxy", proxy_port)] {
        wait_for(
            &format!("the {who} to replay"),
            Duration::from_secs(15),
            || (metric(port, "nsx_node_ovs_replays_total") == Some(1)).then_some(()),
        );
    }
    sw.play_nsx(&pods);
    let got = get(&pods[0], "http://10.96.0.10/");
    assert_eq!(got, "200 pod-b", "after the OVS restart\n{}", sw.dump());
    // The packet-in connection came back with ovs-vswitchd (a SYN sent before it did is
    // dropped, and its retransmission a second later refused: not a timeout).
    let got = refused("10.96.0.12", 7070, 7071);
    assert!(
        got.starts_with("tcp refused") && got.ends_with("udp refused"),
        "after the OVS restart: {got}"
    );
    let got = get(&pods[1], "http://10.96.0.10/");
    assert_eq!(
        got,
        "200 pod-b",
        "hairpin after the OVS restart\n{}",
        sw.dump()
    );

    // Stale UDP connections on the real switch's conntrack, as kube-proxy clears them: a UDP
    // Service's connections go when its endpoint goes (the Service staying), when its port
    // changes, and when the endpoint went while no proxy ran.
    let _udp = serve_udp(&pods[1]);
    let apply = |objs: [Value; 2]| {
        for o in objs {
            k.api.apply(o).unwrap();
        }
    };
    let answered_and_tracked = |port: u16| {
        wait_for(
            &format!("dns:{port} to answer"),
            Duration::from_secs(10),
            || (ask_udp(&pods[0], port) == "pong").then_some(()),
        );
        assert_eq!(
            tracked_to_dns(&sw, port),
            1,
            "{}",
            sw.tools
                .appctl(&["dpctl/dump-conntrack"])
                .unwrap_or_default()
        );
    };
    let forgotten = |port: u16, what: &str| {
        wait_for(what, Duration::from_secs(10), || {
            (tracked_to_dns(&sw, port) == 0).then_some(())
        })
    };
    apply(udp_service(53, Some(pods[1].ip)));
    answered_and_tracked(53);
    apply(udp_service(53, None));
    forgotten(53, "the connection to a removed endpoint to be forgotten");
    apply(udp_service(53, Some(pods[1].ip)));
    answered_and_tracked(53);
    apply(udp_service(54, Some(pods[1].ip)));
    forgotten(
        53,
        "the connection to the Service's old port to be forgotten",
    );
    answered_and_tracked(54);

    // nsx-kube-proxy restarts: round 2 replaces round 1 in one bundle, traffic goes on.
    let before = pipeline::previous_round(sw.bridge().cookies().unwrap());
    assert_eq!(before, Some(1));
    drop(proxy);
    // While no proxy runs, dns loses its endpoint: the new one finds it in the old round's
    // flows and forgets its connections.
    apply(udp_service(54, None));
    assert_eq!(tracked_to_dns(&sw, 54), 1);
    proxy = node_agent(&sw, &k.kubeconfig, proxy_port, &proxy_role);
    forgotten(
        54,
        "a restarted proxy to forget the connection to an endpoint gone meanwhile",
    );
    let cookies = sw.bridge().cookies().unwrap();
    let rounds: std::collections::BTreeSet<u64> = cookies
        .iter()
        .filter(|c| pipeline::previous_round([**c]).is_some())
        .map(|c| (c & Cookie::ROUND_MASK) >> Cookie::ROUND_SHIFT)
        .collect();
    assert_eq!(rounds, [2].into(), "only the new round's flows remain");
    assert_eq!(get(&pods[0], "http://10.96.0.10/"), "200 pod-b");

    // A Service added through the API is served without a restart.
    for o in service("web2", "10.96.0.11", 9090, pods[1].ip) {
        k.api.apply(o).unwrap();
    }
    wait_for("the proxy to install web2", Duration::from_secs(10), || {
        (metric(proxy_port, "nsx_kube_proxy_service_ports") == Some(7)).then_some(())
    });
    assert_eq!(get(&pods[0], "http://10.96.0.11:9090/"), "200 pod-b");

    nodeports(&sw, &k, &pods, pid);
    libcni_chain(&sw, &k, &socket, pid);

    // CHECK agrees; after someone changes the pod's MAC it does not.
    let prev = json!({"prevResult": results[0]});
    let (code, out) = cni("CHECK", &pods[0], &socket, prev.clone());
    assert_eq!(code, 0, "CHECK: {out}");
    ok(
        "ip",
        &[
            "-n",
            &pods[0].netns,
            "link",
            "set",
            "eth0",
            "address",
            "02:50:56:00:00:99",
        ],
    );
    let (code, out) = cni("CHECK", &pods[0], &socket, prev);
    assert_eq!((code, out["code"].as_u64()), (1, Some(101)), "{out}");

    // DEL twice: both succeed; the veth and the OVS port are gone.
    for _ in 0..2 {
        let (code, out) = cni("DEL", &pods[0], &socket, json!({}));
        assert_eq!(code, 0, "DEL: {out}");
    }
    assert!(
        !sh("ip", &["link", "show", &port_name(pods[0].cid)])
            .status
            .success()
    );
    assert!(!sw.bridge().has_port(&port_name(pods[0].cid)));

    // GC keeping nothing: b's port and veth go too.
    let (code, out) = cni(
        "GC",
        &pods[1],
        &socket,
        json!({"cni.dev/valid-attachments": []}),
    );
    assert_eq!(code, 0, "GC: {out}");
    assert!(
        !sh("ip", &["link", "show", &port_name(pods[1].cid)])
            .status
            .success()
    );
    assert!(!sw.bridge().has_port(&port_name(pods[1].cid)));

    // SIGTERM: the agent leaves, taking its socket with it.
    ok("kill", &["-TERM", &agent.0.id().to_string()]);
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists());
    drop(proxy);
}
