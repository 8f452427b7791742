//! The CNI plugin's part of wiring on a real node: around the node agent's answer, the veth
//! pair in the pod's network namespace. ADD creates the pair first (so OVS numbers the port
//! the agent adds), asks the agent, then gives the pod's end NSX's MAC, the address and the
//! default route; DEL asks the agent and removes the pair, succeeding when either is gone;
//! CHECK compares the namespace with the agent's record; GC also removes the veths of pods
//! not kept.

use std::net::Ipv4Addr;
use std::path::Path;

use nsx_core::cni::{AgentClient, Attachment, CniError, Env, PodAddress, code};
use nsx_core::ovs::interface::port_name;

use crate::netns;

/// The MTU of pod interfaces (NSX overlay segments carry 1500-byte frames to pods).
pub const POD_MTU: u32 = 1500;

/// An agent client that also does the namespace work.
pub struct NetnsAgent<A> {
    pub inner: A,
    pub mtu: u32,
}

fn io(msg: &str, e: netns::NetnsError) -> CniError {
    CniError::new(code::IO, msg, e.to_string())
}

fn parse_address(a: &PodAddress) -> Result<(Ipv4Addr, u8, Ipv4Addr), CniError> {
    let bad = |what: &str| {
        CniError::new(
            code::AGENT_FAILED,
            format!("the agent answered a bad {what}"),
            format!("{a:?}"),
        )
    };
    let (ip, prefix) = a.ip.split_once('/').ok_or_else(|| bad("address"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad("address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| bad("prefix"))?;
    let gw: Ipv4Addr = a.gateway.parse().map_err(|_| bad("gateway"))?;
    Ok((ip, prefix, gw))
}

impl<A: AgentClient> AgentClient for NetnsAgent<A> {
    fn add(&mut self, env: &Env) -> Result<PodAddress, CniError> {
        let host = port_name(&env.container_id);
        let ns = Path::new(&env.netns);
        // A failed ADD undoes what it did: the pair goes (deleting the host end deletes the
        // pod's end too), so a later ADD into the same namespace starts clean instead of
        // configuring a leftover interface.
        let result = netns::create_pod_link(&host, ns, &env.ifname, self.mtu)
            .map_err(|e| io("creating the pod's interface failed", e))
            .and_then(|()| {
                let mut answer = self.inner.add(env)?;
                let (ip, prefix, gw) = parse_address(&answer)?;
                netns::configure_pod_link(ns, &env.ifname, &answer.mac, ip, prefix, gw, self.mtu)
                    .map_err(|e| io("configuring the pod's interface failed", e))?;
                // The host end goes into the result too, for chained plugins (`bandwidth`
                // shapes it).
                let host_mac = netns::host_link_mac(&host)
                    .map_err(|e| io("reading the pod veth's host end failed", e))?;
                answer.host = Some((host.clone(), host_mac));
                Ok(answer)
            });
        if result.is_err()
            && let Err(e) = netns::delete_host_link(&host)
        {
            tracing::warn!(%host, error = %e, "could not remove the interface of a failed ADD");
        }
        result
    }

    fn del(&mut self, env: &Env) -> Result<(), CniError> {
        self.inner.del(env)?;
        netns::delete_host_link(&port_name(&env.container_id))
            .map_err(|e| io("removing the pod's interface failed", e))
    }

    fn check(&mut self, env: &Env) -> Result<Option<PodAddress>, CniError> {
        let Some(a) = self.inner.check(env)? else {
            return Ok(None);
        };
        let (mac, addrs) =
            netns::inspect_pod_link(Path::new(&env.netns), &env.ifname).map_err(|e| {
                CniError::new(
                    code::CHECK_FAILED,
                    "the pod's interface is missing",
                    e.to_string(),
                )
            })?;
        if !mac.eq_ignore_ascii_case(&a.mac) {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("{} has MAC {mac}, NSX's port has {}", env.ifname, a.mac),
                "",
            ));
        }
        if !addrs.contains(&a.ip) {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("{} has {addrs:?}, not {}", env.ifname, a.ip),
                "",
            ));
        }
        Ok(Some(a))
    }

    fn status(&mut self) -> Result<(), CniError> {
        self.inner.status()
    }

    fn gc(&mut self, keep: &[Attachment]) -> Result<(), CniError> {
        self.inner.gc(keep)?;
        let kept: Vec<String> = keep.iter().map(|a| port_name(&a.container_id)).collect();
        let ours = netns::host_links_with_prefix("nsx")
            .map_err(|e| io("listing pod interfaces failed", e))?;
        for l in ours {
            // Only names the agent makes (nsx + 11 hex digits), never another device.
            let is_pod_veth = l.len() == 14 && l[3..].chars().all(|c| c.is_ascii_hexdigit());
            if is_pod_veth && !kept.contains(&l) {
                netns::delete_host_link(&l)
                    .map_err(|e| io("removing a stale interface failed", e))?;
            }
        }
        Ok(())
    }
}
