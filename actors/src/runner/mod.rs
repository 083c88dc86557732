//! What a tick executes. The agent actor only knows `Runner::tick`; each kind of runner lives in
//! its own module so that adding one (a gRPC runner, say) touches nothing else.

mod a2a;
pub(crate) mod command;
pub(crate) mod http;
pub(crate) mod persistent;
mod reap;

pub use command::STDERR_DROPPED_BYTES;
pub use reap::become_subreaper;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::model::{AgentId, TickInput, TickOutput};

/// The `runner = { kind = ... }` table of an agent's config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RunnerSpec {
    /// Built in: answers with the inputs; for demos and benchmarks.
    Echo,
    /// A program speaking the tick protocol on stdin/stdout.
    Command(CommandSpec),
    /// An HTTP endpoint receiving the tick input as a POST.
    Http(HttpSpec),
    /// A remote agent speaking A2A 1.0 (JSON-RPC binding), found through its agent card.
    A2a(A2aSpec),
}

/// A `command` runner's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program path; relative paths resolve against the working directory tickgate started in.
    pub program: PathBuf,
    /// Arguments passed as they are, with no shell in between.
    #[serde(default)]
    pub args: Vec<String>,
    /// One process per tick, or one long-lived process per agent.
    #[serde(default)]
    pub mode: CommandMode,
}

/// How a `command` runner's process lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandMode {
    /// A new process per tick: simplest, isolates ticks, costs a fork+exec each time.
    #[default]
    Oneshot,
    /// One process per agent speaking JSON Lines: no start-up cost per tick. Exactly one output
    /// line per input line; see [`persistent`] for how a violation is handled.
    Persistent,
}

/// An `http` runner's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Endpoint that receives the tick input as a JSON POST.
    pub url: String,
    /// Extra request headers, for example an API key the endpoint expects.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// An `a2a` runner's settings (SPEC section 10).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct A2aSpec {
    /// The remote agent's card (`…/.well-known/agent-card.json`); operator config, so it is not
    /// subject to the SSRF guard that protects URLs coming from requests.
    pub url: String,
    /// The variable holding the bearer token sent to the remote agent, when it wants one. Named
    /// rather than written here so that the secret stays out of the config file.
    #[serde(default)]
    pub token_env: Option<String>,
}

/// Why a tick did not produce usable output. The `Display` text becomes the task's `error`, so it
/// is written for the operator reading a failed task.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunnerError {
    /// The program could not be started at all.
    #[error("runner could not start: {0}")]
    Spawn(String),
    /// The program ran but exited unsuccessfully or died.
    #[error("runner failed: {0}")]
    Exit(String),
    /// The tick took longer than `tick_timeout`; the process (group) was killed.
    #[error("tick timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The runner answered, but not with one JSON object.
    #[error("{0}")]
    BadOutput(String),
    /// The `http` runner's endpoint could not be reached or answered with an error status.
    #[error("runner endpoint: {0}")]
    Http(String),
    /// The `a2a` runner's remote agent could not be reached, broke the protocol, or ended its
    /// task without success.
    #[error("remote A2A agent: {0}")]
    A2a(String),
    /// The runner itself reported `"status": "error"`.
    #[error("runner reported an error")]
    Reported,
}

/// The variables every command process gets from tickgate's own environment; nothing else leaks
/// through, so tickgate's secrets (admin token, signature secrets) never reach a runner.
pub const INHERITED_ENV: [&str; 3] = ["PATH", "HOME", "LANG"];

/// A ready-to-run runner for one agent.
pub enum Runner {
    /// See [`RunnerSpec::Echo`].
    Echo,
    /// See [`command::Oneshot`].
    Oneshot(command::Oneshot),
    /// See [`persistent::Persistent`].
    Persistent(persistent::Persistent),
    /// See [`http::HttpRunner`].
    Http(http::HttpRunner),
    /// See [`a2a::A2aRunner`].
    A2a(a2a::A2aRunner),
}

impl Runner {
    /// Builds the runner for `agent`; `env` is the agent's fixed environment from config.
    pub fn new(spec: &RunnerSpec, agent: &AgentId, env: &BTreeMap<String, String>) -> Self {
        match spec {
            RunnerSpec::Echo => Runner::Echo,
            RunnerSpec::Command(c) => match c.mode {
                CommandMode::Oneshot => Runner::Oneshot(command::Oneshot::new(c.clone())),
                CommandMode::Persistent => {
                    Runner::Persistent(persistent::Persistent::new(c.clone(), base_env(agent, env)))
                }
            },
            RunnerSpec::Http(h) => Runner::Http(http::HttpRunner::new(h.clone())),
            RunnerSpec::A2a(a) => Runner::A2a(a2a::A2aRunner::new(a.clone())),
        }
    }

    /// Whether a tick can have effects outside tickgate before its outcome is recorded. Only
    /// then is the tick's start stored (and on disk) before it runs: the STARTED record is what
    /// tells a re-run after a crash (`attempt` + 1) that the first try may have done something.
    /// The built-in `echo` computes its output and nothing else, so a crash before its outcome
    /// is stored is indistinguishable from a tick that never started, and its start costs no
    /// write.
    pub fn has_side_effects(&self) -> bool {
        !matches!(self, Runner::Echo)
    }

    /// Runs one tick, giving up after `timeout`. Failures of every kind come back as
    /// `RunnerError`, never as a panic, so the agent can record them and move on.
    pub async fn tick(
        &self,
        input: &TickInput,
        timeout: Duration,
    ) -> Result<TickOutput, RunnerError> {
        let out = match self {
            Runner::Echo => Ok(echo(input)),
            Runner::Oneshot(r) => r.tick(input, timeout).await,
            Runner::Persistent(r) => r.tick(input, timeout).await,
            Runner::Http(r) => r.tick(input, timeout).await,
            Runner::A2a(r) => r.tick(input, timeout).await,
        }?;
        if out.status.as_deref() == Some("error") {
            return Err(RunnerError::Reported);
        }
        Ok(out)
    }

    /// Stops any long-lived process; called when the agent stops so no child outlives tickgate.
    pub async fn shutdown(&self) {
        if let Runner::Persistent(r) = self {
            r.shutdown().await;
        }
    }
}

fn echo(input: &TickInput) -> TickOutput {
    TickOutput {
        response: Some(input.inputs.clone()),
        status: Some("ok".to_string()),
        memory: Some(json!({ "ticks": input.tick })),
        ..TickOutput::default()
    }
}

/// The environment shared by all of an agent's processes: the inherited basics, then the agent's
/// configured `env`, then `TICKGATE_AGENT` (which configuration cannot override).
pub fn base_env(agent: &AgentId, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for name in INHERITED_ENV {
        if let Ok(v) = std::env::var(name) {
            vars.insert(name.to_string(), v);
        }
    }
    vars.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars.insert("TICKGATE_AGENT".to_string(), agent.to_string());
    vars
}

/// The full environment of a oneshot tick process: [`base_env`] with the tick's `env` (agent env
/// plus allowed caller overrides) and the per-tick `TICKGATE_*` variables on top.
pub fn tick_env(input: &TickInput) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for name in INHERITED_ENV {
        if let Ok(v) = std::env::var(name) {
            vars.insert(name.to_string(), v);
        }
    }
    vars.extend(input.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars.insert("TICKGATE_AGENT".to_string(), input.agent.clone());
    vars.insert("TICKGATE_TASK_ID".to_string(), input.task_id.clone());
    vars.insert("TICKGATE_TICK".to_string(), input.tick.to_string());
    vars
}
