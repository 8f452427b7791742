//! A pod's OVS interface as the node agent records it: its name and the external ids on it.
//! The agent's memory lives on the switch (an agent that restarts reads it back), and
//! whoever inspects a bridge (`ovs-vsctl find Interface external_ids:container-id=...`, the
//! harness, an operator) finds a pod's port by these keys.

/// External id keys on a pod's OVS port.
pub mod external_id {
    pub const CONTAINER_ID: &str = "container-id";
    pub const POD_NAME: &str = "k8s-pod-name";
    pub const POD_NAMESPACE: &str = "k8s-pod-namespace";
    /// The NSX logical port's attachment id: NSX's own OVS integration keys on it.
    pub const IFACE_ID: &str = "iface-id";
    pub const ATTACHED_MAC: &str = "attached-mac";
    pub const IP: &str = "ip-address";
    pub const VLAN: &str = "vlan";
}

/// The port name: `nsx` and 11 hex digits of a hash of the container id (interface names
/// are at most 15 characters).
pub fn port_name(container_id: &str) -> String {
    let name = format!(
        "nsx{:011x}",
        crate::hash::stable_hash(container_id) & 0xfff_ffff_ffff
    );
    debug_assert!(name.len() <= 15, "IFNAMSIZ is 16 with the NUL");
    name
}
