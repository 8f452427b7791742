//! The CNI plugin kubelet's runtime executes: reads `CNI_*` from the environment and the
//! network configuration from stdin, creates the pod's veth pair and configures the pod's end
//! (address, MAC, route) around the node agent's answer over its Unix socket, prints the
//! result or the error JSON on stdout and exits 0 or 1, as the CNI spec says.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nsx_adapters::cni_netns::{NetnsAgent, POD_MTU};
use nsx_core::cni::client::StreamAgent;
use nsx_core::cni::{DEFAULT_AGENT_SOCKET, NetConf, Unreachable, run};

fn main() {
    let vars: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    // An unreadable stdin is an empty configuration, which `run` reports as a decode error.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let socket = NetConf::parse(&stdin)
        .ok()
        .and_then(|c| c.agent_socket)
        .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.to_string());
    let (code, out) = match UnixStream::connect(&socket) {
        Ok(stream) => {
            // ADD waits for NCP inside the agent: allow for that, but never hang kubelet.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
            let mut agent = NetnsAgent {
                inner: StreamAgent::new(stream),
                mtu: POD_MTU,
            };
            run(&vars, &stdin, &mut agent)
        }
        Err(e) => run(&vars, &stdin, &mut Unreachable(format!("{socket}: {e}"))),
    };
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    std::process::exit(code);
}
