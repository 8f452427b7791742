//! Production adapters: what connects the core to a real NSX Manager and a real cluster, and
//! what the binaries share (metrics, health).

pub mod cni_netns;
pub mod kube_client;
pub mod logs;
pub mod metrics;
pub mod netns;
pub mod nsx_tls;
pub mod openflow;
pub mod ovs;
pub mod reject;
