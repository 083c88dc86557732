//! The command line: `serve` (the default), `check`, `token rotate`, and the operator commands
//! `tasks` and `agents` (clients of a running server's admin API, in [`client`]).

mod client;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tickgate_actors::model::AgentId;
use tickgate_actors::registry::rotate_offline;
use tickgate_actors::store::sled::SledStore;
use tickgate_actors::store::StoreError;

use crate::config::{Config, Settings};

/// tickgate: webhooks in, serialized durable agent ticks out.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Config file [default: config/tickgate.toml, else the embedded default].
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve,
    /// Validate the config (secrets included) and exit non-zero with the problem.
    Check,
    /// Manage webhook tokens.
    Token {
        /// Token action.
        #[command(subcommand)]
        action: TokenAction,
    },
    /// List, inspect, replay, cancel and resume tasks through a running server's admin API.
    Tasks {
        /// Which server, and how to talk to it.
        #[command(flatten)]
        remote: Remote,
        /// Task action.
        #[command(subcommand)]
        action: TaskAction,
    },
    /// List agents with breaker state, queue depth, tick count and next scheduled slot, through
    /// a running server's admin API.
    Agents {
        /// Which server, and how to talk to it.
        #[command(flatten)]
        remote: Remote,
    },
}

/// Where the admin API of a running server is and the token that opens it; shared by the
/// operator commands so that scripts set both once in the environment.
#[derive(Clone, clap::Args)]
pub struct Remote {
    /// Base URL of the running tickgate.
    #[arg(
        long,
        global = true,
        env = "TICKGATE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// The admin token. Prefer the environment variable: command lines are visible to every
    /// user of the host. Never printed, not even in `--help`.
    #[arg(
        long,
        global = true,
        env = "TICKGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print the server's JSON answer instead of a table, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Never shows the token, so a debug print of the command line cannot leak it.
impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("json", &self.json)
            .finish()
    }
}

/// `tickgate tasks` subcommands (SPEC section 8: listing, replay, cancel, resume).
#[derive(Debug, Subcommand)]
pub enum TaskAction {
    /// Tasks newest first, one page at a time.
    List {
        /// Only this agent (`namespace/name`, or `name` in `default`).
        #[arg(long)]
        agent: Option<String>,
        /// Only this status (PENDING, STARTED, RETRY, AWAITING_INPUT, SUCCESS, FAILURE, REVOKED).
        #[arg(long)]
        status: Option<String>,
        /// Created at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Created before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        /// Page size (1 to 1000; the server's default is 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Continue after a previous page (its `more: --cursor …` line).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One task's whole record: status, attempts, response, what it awaits.
    Show {
        /// The task id.
        id: String,
    },
    /// Run a task again as a new task; or, with --agent, every matching task of an agent.
    Replay {
        /// The task id (omit with --agent).
        #[arg(required_unless_present = "agent")]
        id: Option<String>,
        /// Replay the matching tasks of this agent instead of one task.
        #[arg(long, conflicts_with = "id")]
        agent: Option<String>,
        /// With --agent: only tasks of this status (e.g. FAILURE).
        #[arg(long, requires = "agent")]
        status: Option<String>,
        /// With --agent: only tasks created at or after this RFC 3339 time.
        #[arg(long, requires = "agent")]
        since: Option<String>,
        /// With --agent: only tasks created before this RFC 3339 time.
        #[arg(long, requires = "agent")]
        until: Option<String>,
        /// With --agent: continue a bulk replay that reported `more: --cursor …`.
        #[arg(long, requires = "agent")]
        cursor: Option<String>,
    },
    /// Revoke a task that is PENDING, RETRY or AWAITING_INPUT.
    Cancel {
        /// The task id.
        id: String,
    },
    /// Answer a task that is AWAITING_INPUT; a continuation tick is queued.
    Resume {
        /// The task id.
        id: String,
        /// The answer: JSON text, `@file` holding it, or `@-` for standard input.
        #[arg(long)]
        answer: String,
    },
}

/// Token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Issue a new token for NAMESPACE/AGENT; the old one stops working.
    Rotate {
        /// The agent, as namespace/name.
        agent: String,
    },
}

/// `tickgate tasks …`: a client of the admin API; needs no config file.
pub fn tasks(remote: &Remote, action: &TaskAction) -> ExitCode {
    client::tasks(remote, action)
}

/// `tickgate agents`: a client of the admin API; needs no config file.
pub fn agents(remote: &Remote) -> ExitCode {
    client::agents(remote)
}

/// Loads and validates the config the command line points at.
pub fn settings(cli: &Cli) -> Result<Settings, String> {
    let (config, source) = Config::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
    config
        .validate(source, &|name| std::env::var(name).ok())
        .map_err(|e| e.to_string())
}

/// `tickgate token rotate`: directly on the store when no server holds it, else through the
/// running server's admin API.
pub fn rotate(settings: &Settings, agent: &str) -> Result<String, String> {
    let agent: AgentId = agent.parse().map_err(|e| format!("{e}"))?;
    let setup = settings
        .agents
        .iter()
        .find(|a| a.spec.id == agent)
        .ok_or_else(|| format!("no agent {agent} in {}", settings.source_name))?;
    if !setup.webhook_enabled {
        return Err(format!(
            "{agent} has no webhook (webhook.enabled = false); there is no token to rotate"
        ));
    }
    if setup.pinned_token.is_some() {
        return Err(format!(
            "the token of {agent} is pinned by webhook.token_env; change that variable instead"
        ));
    }
    let base = settings
        .config
        .server
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", settings.listen));
    match SledStore::open(&settings.config.store.path) {
        Ok(store) => {
            let token = rotate_offline(store.as_ref(), &agent).map_err(|e| e.to_string())?;
            store.close().map_err(|e| e.to_string())?;
            Ok(format!("webhook for {agent}: POST {base}/webhooks/{token}"))
        }
        Err(StoreError::Locked { path }) => rotate_online(settings, &agent, &path),
        Err(e) => Err(e.to_string()),
    }
}

fn rotate_online(settings: &Settings, agent: &AgentId, path: &str) -> Result<String, String> {
    let Some(admin) = &settings.admin_token else {
        return Err(format!(
            "the store {path} is locked by a running tickgate; set {} to its admin token to rotate through its admin API",
            settings.config.admin.token_env
        ));
    };
    let mut addr = settings.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    let url = format!(
        "http://{addr}/admin/agents/{}/{}/token",
        agent.namespace(),
        agent.name()
    );
    let admin = admin.clone();
    let answer: Result<serde_json::Value, String> = actix_rt::System::new().block_on(async move {
        let resp = reqwest::Client::new()
            .post(&url)
            .bearer_auth(admin)
            .send()
            .await
            .map_err(|e| {
                format!("the store is locked and the admin API at {url} did not answer: {e}")
            })?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            return Err(format!("the admin API refused: {status}: {msg}"));
        }
        Ok(body)
    });
    let body = answer?;
    let url = body["webhook_url"].as_str().unwrap_or_default();
    Ok(format!("webhook for {agent}: POST {url}"))
}
