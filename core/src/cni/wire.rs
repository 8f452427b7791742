//! The wire protocol between the CNI plugin and the node agent: one JSON object per line each
//! way over the agent's Unix socket, a [`WireRequest`] from the plugin and a [`WireResponse`]
//! from the agent. Its only home: the plugin ([`super::client`]) and the agent
//! (`agent::server`) both speak it through these types.

use serde::{Deserialize, Serialize};

use super::{Attachment, Command, Env};

/// One request on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRequest {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub keep: Vec<(String, String)>,
}

/// One answer on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WireResponse {
    Added {
        ip: String,
        gateway: String,
        mac: String,
    },
    Checked {
        ip: Option<String>,
        gateway: String,
        mac: String,
    },
    Done,
    Error {
        code: u32,
        msg: String,
        details: String,
    },
}

impl WireRequest {
    pub fn from_env(env: &Env, keep: &[Attachment]) -> Self {
        Self {
            command: env.command,
            container_id: env.container_id.clone(),
            netns: env.netns.clone(),
            ifname: env.ifname.clone(),
            args: env.args.clone(),
            keep: keep
                .iter()
                .map(|a| (a.container_id.clone(), a.ifname.clone()))
                .collect(),
        }
    }
}
