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
use nsx_core::cni::{DEFAULT_AGENT_SOCKET, NetConf, Unreachable, cni_vars, fail_early, run};

/// How long the plugin waits for the agent's answer. ADD includes the agent's own wait for
/// NCP (60 s) and the wiring; the other commands answer from the agent's state. Beyond that,
/// error 11 (try again later): kubelet retries, instead of timing out itself first.
const ADD_WAIT: Duration = Duration::from_secs(75);
const OTHER_WAIT: Duration = Duration::from_secs(15);

fn main() {
    let mut stdin = Vec::new();
    // An unreadable stdin is an empty configuration, which `run` reports as a decode error.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let (code, out) = match cni_vars(std::env::vars_os()) {
        Ok(vars) => invoke(&vars, &stdin),
        Err(e) => fail_early(&stdin, &e),
    };
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    std::process::exit(code);
}

fn invoke(vars: &BTreeMap<String, String>, stdin: &[u8]) -> (i32, String) {
    let conf = NetConf::parse(stdin).ok();
    let socket = conf
        .as_ref()
        .and_then(|c| c.agent_socket.clone())
        .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.to_string());
    let configured = conf
        .and_then(|c| c.agent_timeout_seconds)
        .map(Duration::from_secs);
    match UnixStream::connect(&socket) {
        Ok(stream) => {
            let wait = configured.unwrap_or(match vars.get("CNI_COMMAND").map(String::as_str) {
                Some("ADD") => ADD_WAIT,
                _ => OTHER_WAIT,
            });
            let _ = stream.set_read_timeout(Some(wait));
            let _ = stream.set_write_timeout(Some(OTHER_WAIT));
            let mut agent = NetnsAgent {
                inner: StreamAgent::new(stream),
                mtu: POD_MTU,
            };
            run(vars, stdin, &mut agent)
        }
        Err(e) => run(vars, stdin, &mut Unreachable(format!("{socket}: {e}"))),
    }
}
