//! The agent's side of CNI: the operations the plugin asks for, with the bounded wait for
//! NCP's pod annotation, and the wire protocol between plugin and agent (one JSON object per
//! line over a local stream socket; turmoil TCP in the simulation).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

use super::wiring::{Agent, AgentError, PodNetwork, PodRequest, PodSwitch};
use crate::cni::wire::{WireRequest, WireResponse};
use crate::cni::{Attachment, CniError, Command, Env, PodAddress, code};
use crate::k8s::annotation;

/// Where the agent reads a pod's `ncp/network` annotation (a kube watch in production, the
/// fake apiserver in the simulation).
pub trait PodSource: Send + Sync {
    fn annotation(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl std::future::Future<Output = Option<String>> + Send;
}

/// How long ADD waits for NCP, and how often it looks.
#[derive(Debug, Clone)]
pub struct WaitConfig {
    pub timeout: Duration,
    pub poll: Duration,
}

impl Default for WaitConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            poll: Duration::from_millis(250),
        }
    }
}

/// The CNI operations over an agent and its switch.
pub struct AgentService<S, P> {
    pub agent: Mutex<Agent>,
    pub switch: Arc<Mutex<S>>,
    pub pods: P,
    pub wait: WaitConfig,
}

fn agent_error(e: AgentError) -> CniError {
    match e {
        AgentError::BadAnnotation(m) => {
            CniError::new(code::AGENT_FAILED, "NCP's pod annotation is malformed", m)
        }
        AgentError::Switch(m) => CniError::new(code::AGENT_FAILED, "Open vSwitch refused", m),
        AgentError::DeletedDuringAdd(c) => CniError::new(
            code::TRY_AGAIN_LATER,
            "the container was deleted while it was being added",
            c,
        ),
    }
}

fn address(n: &PodNetwork) -> PodAddress {
    PodAddress {
        ip: n.ip.clone(),
        gateway: n.gateway.clone(),
        mac: n.mac.clone(),
        host: None,
    }
}

impl<S: PodSwitch + Send, P: PodSource> AgentService<S, P> {
    fn request(env: &Env) -> Result<PodRequest, CniError> {
        let get = |k: &str| {
            env.args
                .get(k)
                .cloned()
                .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("CNI_ARGS has no {k}"), ""))
        };
        Ok(PodRequest {
            container_id: env.container_id.clone(),
            namespace: get("K8S_POD_NAMESPACE")?,
            name: get("K8S_POD_NAME")?,
            ifname: env.ifname.clone(),
        })
    }

    /// ADD: wait (bounded) for NCP's annotation, then wire. The wait happens outside any lock;
    /// a DEL arriving meanwhile makes this ADD fail rather than leave a port behind.
    pub async fn add(&self, env: &Env) -> Result<PodAddress, CniError> {
        let req = Self::request(env)?;
        self.agent.lock().await.begin_add(&req.container_id);
        let deadline = tokio::time::Instant::now() + self.wait.timeout;
        let net = loop {
            if let Some(text) = self.pods.annotation(&req.namespace, &req.name).await {
                match PodNetwork::parse(&text) {
                    Ok(n) => break n,
                    Err(e) => {
                        self.agent.lock().await.abort_add(&req.container_id);
                        return Err(agent_error(e.into()));
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                self.agent.lock().await.abort_add(&req.container_id);
                return Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "NCP has not annotated pod {}/{} ({}) yet",
                        req.namespace,
                        req.name,
                        annotation::POD_NETWORK
                    ),
                    format!("waited {:?}", self.wait.timeout),
                ));
            }
            tokio::time::sleep(self.wait.poll).await;
        };
        let mut agent = self.agent.lock().await;
        let mut switch = self.switch.lock().await;
        agent
            .add(&mut *switch, &req, net)
            .map(|w| address(&w.network))
            .map_err(agent_error)
    }

    pub async fn del(&self, env: &Env) -> Result<(), CniError> {
        let mut agent = self.agent.lock().await;
        let mut switch = self.switch.lock().await;
        agent
            .remove(&mut *switch, &env.container_id)
            .map_err(agent_error)
    }

    pub async fn check(&self, env: &Env) -> Result<Option<PodAddress>, CniError> {
        let agent = self.agent.lock().await;
        Ok(agent
            .pods()
            .get(&env.container_id)
            .map(|w| address(&w.network)))
    }

    /// GC: every wired pod the runtime no longer lists goes.
    pub async fn gc(&self, keep: &[Attachment]) -> Result<(), CniError> {
        let mut agent = self.agent.lock().await;
        let mut switch = self.switch.lock().await;
        let stale: Vec<String> = agent
            .pods()
            .keys()
            .filter(|c| !keep.iter().any(|a| &a.container_id == *c))
            .cloned()
            .collect();
        for c in stale {
            agent.remove(&mut *switch, &c).map_err(agent_error)?;
        }
        Ok(())
    }
}

impl<S: PodSwitch + Send, P: PodSource> AgentService<S, P> {
    async fn answer(&self, req: WireRequest) -> WireResponse {
        let command = req.command;
        let env = Env {
            command,
            container_id: req.container_id,
            netns: req.netns,
            ifname: req.ifname,
            args: req.args,
        };
        let r = match command {
            Command::Add => self.add(&env).await.map(|a| WireResponse::Added {
                ip: a.ip,
                gateway: a.gateway,
                mac: a.mac,
            }),
            Command::Del => self.del(&env).await.map(|()| WireResponse::Done),
            Command::Check => self.check(&env).await.map(|a| match a {
                Some(a) => WireResponse::Checked {
                    ip: Some(a.ip),
                    gateway: a.gateway,
                    mac: a.mac,
                },
                None => WireResponse::Checked {
                    ip: None,
                    gateway: String::new(),
                    mac: String::new(),
                },
            }),
            Command::Status => Ok(WireResponse::Done),
            Command::Gc => {
                let keep: Vec<Attachment> = req
                    .keep
                    .into_iter()
                    .map(|(container_id, ifname)| Attachment {
                        container_id,
                        ifname,
                    })
                    .collect();
                self.gc(&keep).await.map(|()| WireResponse::Done)
            }
            // The plugin answers VERSION itself; the agent has nothing to add.
            Command::Version => Err(CniError::new(
                code::INVALID_ENV,
                "VERSION is answered by the plugin, not the agent",
                "",
            )),
        };
        r.unwrap_or_else(|e| WireResponse::Error {
            code: e.code,
            msg: e.msg,
            details: e.details,
        })
    }

    /// Serves one plugin connection: a JSON request per line, a JSON answer per line. A
    /// malformed line gets an error answer (code 6) and the connection goes on.
    pub async fn serve<T: AsyncRead + AsyncWrite + Unpin>(&self, stream: T) -> std::io::Result<()> {
        let (r, mut w) = tokio::io::split(stream);
        let mut lines = BufReader::new(r).lines();
        while let Some(line) = lines.next_line().await? {
            let answer = match serde_json::from_str::<WireRequest>(&line) {
                Ok(req) => self.answer(req).await,
                Err(e) => WireResponse::Error {
                    code: code::DECODE,
                    msg: "the request is not valid JSON".into(),
                    details: e.to_string(),
                },
            };
            let mut out = serde_json::to_string(&answer).unwrap_or_default();
            out.push('\n');
            w.write_all(out.as_bytes()).await?;
            w.flush().await?;
        }
        Ok(())
    }
}
