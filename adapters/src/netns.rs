//! Pod interfaces through netlink (rtnetlink): a veth pair whose host end the node agent
//! attaches to OVS and whose other end becomes the pod's `eth0` in its network namespace,
//! with NSX's MAC (SpoofGuard checks it), the address, MTU and default route.
//!
//! Work inside a pod's namespace runs on a thread of its own that enters the namespace
//! (`setns`), so the rest of the process never changes namespace.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// What went wrong, naming the interface or namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {reason}")]
    Namespace { path: String, reason: String },
    #[error("{what}: {reason}")]
    Netlink { what: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetnsError {
    let what = what.into();
    move |e| NetnsError::Netlink {
        what,
        reason: e.to_string(),
    }
}

/// Runs `work` with a netlink handle inside the namespace at `netns` (or the current one).
fn in_netns<T, F, Fut>(netns: Option<&Path>, work: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetnsError>>,
{
    let netns = netns.map(Path::to_path_buf);
    std::thread::spawn(move || {
        if let Some(path) = &netns {
            let f = std::fs::File::open(path).map_err(|e| NetnsError::Namespace {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetnsError::Namespace {
                    path: path.display().to_string(),
                    reason: format!("setns: {e}"),
                }
            })?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetnsError::Invalid(e.to_string()))?;
        rt.block_on(async move {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| NetnsError::Netlink {
                    what: "netlink socket".into(),
                    reason: e.to_string(),
                })?;
            tokio::spawn(conn);
            work(handle).await
        })
    })
    .join()
    .map_err(|_| NetnsError::Invalid("the netlink thread panicked".into()))?
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, NetnsError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

fn mac_bytes(mac: &str) -> Result<Vec<u8>, NetnsError> {
    let b: Result<Vec<u8>, _> = mac.split(':').map(|x| u8::from_str_radix(x, 16)).collect();
    match b {
        Ok(b) if b.len() == 6 => Ok(b),
        _ => Err(NetnsError::Invalid(format!("bad MAC address {mac:?}"))),
    }
}

/// Whether the host has a link of that name.
pub fn host_link_exists(name: &str) -> Result<bool, NetnsError> {
    let name = name.to_string();
    in_netns(None, move |h| async move {
        Ok(link_by_name(&h, &name).await?.is_some())
    })
}

/// Creates the veth pair `host` <-> `ifname` (in `netns`), host end up. Idempotent: an
/// existing pair is kept.
pub fn create_pod_link(host: &str, netns: &Path, ifname: &str, mtu: u32) -> Result<(), NetnsError> {
    let (host, ifname, ns) = (host.to_string(), ifname.to_string(), netns.to_path_buf());
    let ns_file = std::fs::File::open(&ns).map_err(|e| NetnsError::Namespace {
        path: ns.display().to_string(),
        reason: e.to_string(),
    })?;
    let peer_tmp = format!("{}p", &host[..host.len().min(14)]);
    in_netns(None, move |h| async move {
        if link_by_name(&h, &host).await?.is_some() {
            return Ok(());
        }
        h.link()
            .add(LinkVeth::new(&host, &peer_tmp).mtu(mtu).build())
            .execute()
            .await
            .map_err(nl(format!("creating veth {host}")))?;
        let peer = link_by_name(&h, &peer_tmp)
            .await?
            .ok_or_else(|| NetnsError::Invalid(format!("veth peer {peer_tmp} vanished")))?;
        // Into the pod's namespace, renamed there (eth0 may exist on the host).
        h.link()
            .set(
                LinkUnspec::new_with_index(peer.header.index)
                    .setns_by_fd(ns_file.as_raw_fd())
                    .name(ifname.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("moving {peer_tmp} into the pod's namespace")))?;
        let hl = link_by_name(&h, &host)
            .await?
            .ok_or_else(|| NetnsError::Invalid(format!("veth {host} vanished")))?;
        h.link()
            .set(LinkUnspec::new_with_index(hl.header.index).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting {host} up")))?;
        drop(ns_file);
        Ok(())
    })
}

/// The pod side: MAC, MTU, address, up, loopback up, default route via `gateway`.
pub fn configure_pod_link(
    netns: &Path,
    ifname: &str,
    mac: &str,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    mtu: u32,
) -> Result<(), NetnsError> {
    let mac = mac_bytes(mac)?;
    let ifname = ifname.to_string();
    in_netns(Some(netns), move |h| async move {
        let link = link_by_name(&h, &ifname)
            .await?
            .ok_or_else(|| NetnsError::Invalid(format!("no {ifname} in the pod's namespace")))?;
        let idx = link.header.index;
        h.link()
            .set(LinkUnspec::new_with_index(idx).down().build())
            .execute()
            .await
            .map_err(nl("link down"))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .address(mac)
                    .mtu(mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("setting the MAC and MTU of {ifname}")))?;
        // Replace the address (an ADD repeated after a partial failure).
        let mut addrs = h.address().get().set_link_index_filter(idx).execute();
        while let Some(a) = addrs.try_next().await.map_err(nl("listing addresses"))? {
            h.address()
                .del(a)
                .execute()
                .await
                .map_err(nl("removing an old address"))?;
        }
        h.address()
            .add(idx, ip.into(), prefix)
            .execute()
            .await
            .map_err(nl(format!("adding {ip}/{prefix}")))?;
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting {ifname} up")))?;
        // This thread is in the pod's namespace: the ioctl reaches the pod's interface.
        disable_tx_checksum(&ifname)?;
        if let Some(lo) = link_by_name(&h, "lo").await? {
            h.link()
                .set(LinkUnspec::new_with_index(lo.header.index).up().build())
                .execute()
                .await
                .map_err(nl("setting lo up"))?;
        }
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(idx)
            .build();
        match h.route().add(route).execute().await {
            Ok(()) => Ok(()),
            // EEXIST: the default route is already there.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => Ok(()),
            Err(e) => Err(nl(format!("default route via {gateway}"))(e)),
        }
    })
}

/// A link's MAC address, `aa:bb:..`.
fn link_mac(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        ),
        _ => None,
    })
}

/// What the pod's interface holds, for CNI CHECK: (MAC, addresses with prefix).
pub fn inspect_pod_link(netns: &Path, ifname: &str) -> Result<(String, Vec<String>), NetnsError> {
    let ifname = ifname.to_string();
    in_netns(Some(netns), move |h| async move {
        let link = link_by_name(&h, &ifname)
            .await?
            .ok_or_else(|| NetnsError::Invalid(format!("no {ifname} in the pod's namespace")))?;
        let mac = link_mac(&link).unwrap_or_default();
        let mut out = Vec::new();
        let mut addrs = h
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute();
        while let Some(a) = addrs.try_next().await.map_err(nl("listing addresses"))? {
            for attr in &a.attributes {
                if let netlink_packet_route::address::AddressAttribute::Address(ip) = attr {
                    out.push(format!("{ip}/{}", a.header.prefix_len));
                }
            }
        }
        Ok((mac, out))
    })
}

/// The MAC of host link `name` (the pod veth's host end, for the CNI result).
pub fn host_link_mac(name: &str) -> Result<String, NetnsError> {
    let name = name.to_string();
    in_netns(None, move |h| async move {
        let link = link_by_name(&h, &name)
            .await?
            .ok_or_else(|| NetnsError::Invalid(format!("no host link {name}")))?;
        link_mac(&link).ok_or_else(|| NetnsError::Invalid(format!("host link {name} has no MAC")))
    })
}

/// Deletes the host end (and so the pair). A missing link is not an error (DEL is
/// idempotent; the namespace may be gone already).
pub fn delete_host_link(host: &str) -> Result<(), NetnsError> {
    let host = host.to_string();
    in_netns(None, move |h| async move {
        let Some(l) = link_by_name(&h, &host).await? else {
            return Ok(());
        };
        match h.link().del(l.header.index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(()),
            Err(e) => Err(nl(format!("deleting {host}"))(e)),
        }
    })
}

/// Host links whose names start with `prefix` (the node agent's `nsx…` veth ends).
pub fn host_links_with_prefix(prefix: &str) -> Result<Vec<String>, NetnsError> {
    let prefix = prefix.to_string();
    in_netns(None, move |h| async move {
        let mut out = Vec::new();
        let mut links = h.link().get().execute();
        while let Some(l) = links.try_next().await.map_err(nl("listing links"))? {
            for a in &l.attributes {
                if let LinkAttribute::IfName(n) = a
                    && n.starts_with(&prefix)
                {
                    out.push(n.clone());
                }
            }
        }
        out.sort();
        Ok(out)
    })
}

/// Turns transmit checksum offload off on `ifname` (in the calling thread's namespace), as
/// `ethtool -K IF tx off` does: a packet a veth leaves to offload reaches OVS's userspace
/// datapath with its checksum unfilled, and the receiver drops it.
fn disable_tx_checksum(ifname: &str) -> Result<(), NetnsError> {
    use nix::libc;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(NetnsError::Invalid(format!(
            "interface name {ifname:?} is too long"
        )));
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above) and stays NUL-terminated;
    // ifru_data points at `value`, which outlives the ioctl; the socket is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(NetnsError::Invalid(format!(
                "socket for ethtool: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(NetnsError::Invalid(format!(
                "turning checksum offload off on {ifname}: {err}"
            )));
        }
    }
    Ok(())
}
