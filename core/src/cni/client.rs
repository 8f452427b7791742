//! The plugin's side of the wire: a blocking client over any stream (a Unix socket to the
//! node agent in production), speaking the agent's line-delimited JSON.

use std::io::{BufRead, BufReader, Read, Write};

use super::wire::{WireRequest, WireResponse};
use super::{AgentClient, Attachment, CniError, Env, PodAddress, code};

pub struct StreamAgent<T: Read + Write> {
    stream: BufReader<T>,
}

impl<T: Read + Write> StreamAgent<T> {
    pub fn new(stream: T) -> Self {
        Self {
            stream: BufReader::new(stream),
        }
    }

    fn round_trip(&mut self, req: &WireRequest) -> Result<WireResponse, CniError> {
        // A read that times out (the stream's timeout) means the agent is busy or stuck: the
        // runtime should try again later, not treat the node as broken.
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => CniError::new(
                code::TRY_AGAIN_LATER,
                "the node agent did not answer in time",
                e.to_string(),
            ),
            _ => CniError::new(code::IO, "cannot reach the node agent", e.to_string()),
        };
        let mut line = serde_json::to_string(req)
            .map_err(|e| CniError::new(code::IO, "cannot encode the request", e.to_string()))?;
        line.push('\n');
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(io)?;
        self.stream.get_mut().flush().map_err(io)?;
        let mut answer = String::new();
        if self.stream.read_line(&mut answer).map_err(io)? == 0 {
            return Err(CniError::new(
                code::IO,
                "the node agent closed the connection",
                "",
            ));
        }
        serde_json::from_str(&answer).map_err(|e| {
            CniError::new(
                code::DECODE,
                "the node agent's answer is not valid",
                e.to_string(),
            )
        })
    }
}

/// One request, one answer: how the plugin reaches the agent.
pub trait Transport {
    fn exchange(&mut self, req: &WireRequest) -> Result<WireResponse, CniError>;

    /// The exchange, with the agent's error answer as an error.
    fn call(&mut self, req: &WireRequest) -> Result<WireResponse, CniError> {
        match self.exchange(req)? {
            WireResponse::Error { code, msg, details } => Err(CniError { code, msg, details }),
            ok => Ok(ok),
        }
    }
}

impl<T: Read + Write> Transport for StreamAgent<T> {
    fn exchange(&mut self, req: &WireRequest) -> Result<WireResponse, CniError> {
        self.round_trip(req)
    }
}

/// An answer the agent already gave: lets a caller that speaks to the agent asynchronously
/// (the simulated kubelet over turmoil) run the plugin's own logic on the answer.
pub struct Answered(pub WireResponse);

impl Transport for Answered {
    fn exchange(&mut self, _: &WireRequest) -> Result<WireResponse, CniError> {
        Ok(self.0.clone())
    }
}

impl<T: Transport> AgentClient for T {
    fn add(&mut self, env: &Env) -> Result<PodAddress, CniError> {
        match self.call(&WireRequest::from_env(env, &[]))? {
            WireResponse::Added { ip, gateway, mac } => Ok(PodAddress {
                ip,
                gateway,
                mac,
                host: None,
            }),
            other => Err(CniError::new(
                code::IO,
                "unexpected answer to ADD",
                format!("{other:?}"),
            )),
        }
    }

    fn del(&mut self, env: &Env) -> Result<(), CniError> {
        self.call(&WireRequest::from_env(env, &[])).map(|_| ())
    }

    fn check(&mut self, env: &Env) -> Result<Option<PodAddress>, CniError> {
        match self.call(&WireRequest::from_env(env, &[]))? {
            WireResponse::Checked {
                ip: Some(ip),
                gateway,
                mac,
            } => Ok(Some(PodAddress {
                ip,
                gateway,
                mac,
                host: None,
            })),
            WireResponse::Checked { ip: None, .. } => Ok(None),
            other => Err(CniError::new(
                code::IO,
                "unexpected answer to CHECK",
                format!("{other:?}"),
            )),
        }
    }

    fn status(&mut self) -> Result<(), CniError> {
        let env = Env {
            command: super::Command::Status,
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: Default::default(),
        };
        self.call(&WireRequest::from_env(&env, &[]))
            .map(|_| ())
            .map_err(|e| {
                CniError::new(
                    code::PLUGIN_NOT_AVAILABLE,
                    "the node agent is not available",
                    e.to_string(),
                )
            })
    }

    fn gc(&mut self, keep: &[Attachment]) -> Result<(), CniError> {
        let env = Env {
            command: super::Command::Gc,
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: Default::default(),
        };
        self.call(&WireRequest::from_env(&env, keep)).map(|_| ())
    }
}
