//! The TOML configuration: plain serde structs with defaults, environment overrides for scalar
//! server settings, and one validation pass whose errors name the file, the key and the problem.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer};
use tickgate_actors::agent::AgentSpec;
use tickgate_actors::model::AgentId;
use tickgate_actors::runner::{CommandMode, RunnerSpec};
use tickgate_actors::schedule::{CatchUp, Entry};
use tickgate_actors::token::MIN_PINNED_LEN;

use crate::ingress::client_ip::parse_cidrs;
use crate::ingress::signature::{SignatureConfig, Verifier};
use crate::ingress::{Gate, GateRules};

/// The default config file, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/tickgate.toml";

/// The default config compiled into the binary, used when `config/tickgate.toml` is absent, so
/// that the service starts on a fresh machine with no set-up.
pub const EMBEDDED: &str = include_str!("../config/tickgate.toml");

/// A config problem, worded for the operator: where (file and key) and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ConfigError {
    /// The file the problem is in (or "embedded default config").
    pub source_name: String,
    /// What is wrong, starting with the offending key.
    pub message: String,
}

/// A duration written as `"30s"`, `"5m"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`
    #[serde(default)]
    pub server: ServerConfig,
    /// `[store]`
    #[serde(default)]
    pub store: StoreConfig,
    /// `[admin]`
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[queue]`: the NATS server queue triggers use beside the sled store (SPEC section 11).
    #[serde(default)]
    pub queue: QueueConfig,
    /// `[[agent]]` tables.
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentConfig>,
}

/// `[server]`: how the HTTP edge listens and what it accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to bind; port 0 picks a free port (handy in tests).
    pub listen: String,
    /// Base of printed webhook URLs and `poll_url`s; defaults to `http://<bound address>`.
    pub public_url: Option<String>,
    /// CIDRs of reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Larger request bodies get 413 before they are read.
    pub max_body_bytes: usize,
    /// Upper bound for a synchronous trigger's wait.
    pub max_wait: Dur,
    /// How long SIGTERM lets running ticks finish.
    pub shutdown_grace: Dur,
    /// HTTP worker threads; defaults to the number of CPUs.
    pub workers: Option<usize>,
    /// Per client address: unknown tokens and bad signatures allowed before 429, so that
    /// guessing tokens or brute-forcing signatures is throttled.
    pub auth_failures: RateLimitConfig,
    /// Time a request body may take to arrive (408 after it), so slow senders cannot hold
    /// connections and memory indefinitely.
    pub body_timeout: Dur,
    /// Bytes all bodies still being received may hold together; past it triggers get 503.
    pub max_inflight_body_bytes: usize,
    /// This node's name in a cluster (leases, `/admin/agents`); defaults to
    /// `<hostname>:<port>`.
    pub node_id: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            trusted_proxies: Vec::new(),
            max_body_bytes: 1024 * 1024,
            max_wait: Dur(Duration::from_secs(600)),
            shutdown_grace: Dur(Duration::from_secs(30)),
            workers: None,
            auth_failures: RateLimitConfig {
                per_second: 2.0,
                burst: 20,
            },
            body_timeout: Dur(Duration::from_secs(30)),
            max_inflight_body_bytes: 64 * 1024 * 1024,
            node_id: None,
        }
    }
}

/// `[store]`: where durable state lives and for how long finished work is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The sled directory.
    pub path: PathBuf,
    /// Finished tasks and their idempotency keys are purged after this.
    pub task_retention: Dur,
    /// What an acknowledged write survives: `flush` (a killed process) or `fsync` (also power
    /// loss and OS crashes, at the cost of an `fdatasync` per group commit).
    pub sync: tickgate_actors::store::sled::SyncMode,
    /// `sled` (one node, embedded) or `nats` (several nodes on NATS JetStream).
    pub kind: StoreKind,
    /// The NATS server(s) for `kind = "nats"`: `nats://host:port`, several separated by commas.
    pub url: Option<String>,
    /// Copies JetStream keeps of every stream and bucket (`kind = "nats"`); 3 in production.
    pub replicas: usize,
    /// Agent ownership lease (`kind = "nats"`): a dead node's agents move within about this.
    pub lease: Dur,
}

/// Which backend `[store]` uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded sled store, one node.
    #[default]
    Sled,
    /// NATS JetStream, shared by any number of nodes.
    Nats,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data"),
            task_retention: Dur(Duration::from_secs(7 * 24 * 3600)),
            sync: tickgate_actors::store::sled::SyncMode::Flush,
            kind: StoreKind::Sled,
            url: None,
            replicas: 1,
            lease: Dur(Duration::from_secs(10)),
        }
    }
}

/// `[admin]`: the admin API is enabled only when its token variable is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Name of the environment variable holding the admin bearer token.
    pub token_env: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token_env: "TICKGATE_ADMIN_TOKEN".into(),
        }
    }
}

/// `[queue]`: where queue triggers (`[[agent.queue]]`) consume from when the store is not NATS
/// itself. Absent, a config with queue entries is refused, so they cannot silently do nothing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `nats://host:port` (several servers comma-separated); may carry credentials, so it is
    /// never logged whole.
    pub url: Option<String>,
}

/// One `[[agent.queue]]` entry as written: a JetStream subject whose messages become tasks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueEntryConfig {
    /// The subject consumed (wildcards allowed); a stream covering it is used or created.
    pub subject: String,
    /// Where each finished task's record is published; no wildcards.
    pub reply_subject: Option<String>,
    /// How long a delivered message may stay unacknowledged before JetStream redelivers it (to
    /// any node): the time a message held by a node that died waits. Default 30s.
    #[serde(default = "default_ack_wait")]
    pub ack_wait: Dur,
}

fn default_ack_wait() -> Dur {
    Dur(Duration::from_secs(30))
}

/// A validated `[[agent.queue]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueEntry {
    /// The subject consumed.
    pub subject: String,
    /// Where finished task records go, if anywhere.
    pub reply_subject: Option<String>,
    /// JetStream's redelivery timeout for this entry's consumer.
    pub ack_wait: Duration,
}

/// Whether `subject` is a NATS subject tickgate can consume (`wildcards`) or publish to: dot-
/// separated non-empty tokens without whitespace; `*` only as a whole token and `>` only as the
/// whole last token.
pub fn check_subject(subject: &str, wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("must not be empty".into());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!(
                "{subject:?} has an empty token (a leading, trailing or doubled '.')"
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{subject:?} contains whitespace"));
        }
        let wild = *token == "*" || *token == ">";
        if wild && !wildcards {
            return Err(format!(
                "{subject:?} contains a wildcard; a subject to publish to cannot"
            ));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(format!("{subject:?}: '>' may only be the last token"));
        }
        if !wild && (token.contains('*') || token.contains('>')) {
            return Err(format!("{subject:?}: '*' and '>' must be whole tokens"));
        }
    }
    Ok(())
}

/// One `[[agent]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// DNS label.
    pub name: String,
    /// DNS label; `default` when omitted.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// What a tick runs.
    pub runner: RunnerSpec,
    /// Ticks running longer fail and their runner is killed.
    #[serde(default = "default_tick_timeout")]
    pub tick_timeout: Dur,
    /// Queue bound; triggers beyond it get 429.
    #[serde(default = "default_mailbox")]
    pub mailbox: usize,
    /// Fixed runner environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Variables a caller may set per request.
    #[serde(default)]
    pub allow_env: Vec<String>,
    /// Circuit breaker thresholds.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Ingress rules.
    #[serde(default)]
    pub webhook: WebhookConfig,
    /// Scheduled ticks: `schedule = [{ cron, timezone, inputs } | { every, inputs }]`.
    #[serde(default)]
    pub schedule: Vec<ScheduleConfig>,
    /// What a start does with slots missed while no server ran: `"latest"` (default) or `"none"`.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// `retry = { schedule = ["10s", "1m"], order = "requeue" | "block" }`; absent: no retry.
    #[serde(default)]
    pub retry: RetryConfig,
    /// `"await"` parks a task whose tick reports a non-empty `pending_approvals`; `"pass"`
    /// (default) only passes them through.
    #[serde(default)]
    pub approvals: tickgate_actors::awaiting::Approvals,
    /// Signed status callbacks: `[[agent.notify]]` (SPEC section 9).
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// The agent as an A2A server: `[agent.a2a]` (SPEC section 10).
    #[serde(default)]
    pub a2a: A2aConfig,
    /// Queue triggers: `[[agent.queue]]` (SPEC section 11).
    #[serde(default)]
    pub queue: Vec<QueueEntryConfig>,
}

/// `[agent.a2a]`: whether the agent is served over A2A and what its Agent Card says.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct A2aConfig {
    /// Serve `/a2a/{namespace}/{agent}` and its Agent Card.
    pub enabled: bool,
    /// The card's `description`; a generic sentence naming the agent when absent.
    pub description: Option<String>,
    /// The card's `skills`; one skill named after the agent when empty (the card requires one).
    pub skills: Vec<A2aSkill>,
}

/// One entry of `[agent.a2a] skills`, shown as-is in the Agent Card.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct A2aSkill {
    /// Unique within the agent.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// What the skill does.
    #[serde(default)]
    pub description: String,
    /// Keywords.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Example prompts or inputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
}

/// Most delays a `retry.schedule` may list; a longer one is a config mistake, not a policy.
const MAX_RETRIES: usize = 100;

/// `retry = { schedule = [...], order = "requeue" }`: the delays before each retry (`n` delays
/// allow `n + 1` attempts) and whether later tasks run meanwhile.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay before each retry, in order.
    pub schedule: Vec<Dur>,
    /// `"requeue"` (default): later tasks run meanwhile; `"block"`: they wait.
    pub order: tickgate_actors::retry::RetryOrder,
}

impl RetryConfig {
    fn policy(&self) -> tickgate_actors::retry::RetryPolicy {
        tickgate_actors::retry::RetryPolicy {
            schedule: self.schedule.iter().map(|d| d.0).collect(),
            order: self.order,
        }
    }
}

/// One `[[agent.notify]]` endpoint as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where deliveries are POSTed.
    pub url: String,
    /// Variable holding the `whsec_<base64>` signing secret.
    pub secret_env: Option<String>,
    /// File holding the `whsec_<base64>` signing secret.
    pub secret_file: Option<PathBuf>,
    /// Subscribed events; the SPEC's default set when omitted.
    pub events: Option<Vec<String>>,
    /// Per-attempt timeout.
    #[serde(default = "default_notify_timeout")]
    pub timeout: Dur,
    /// Delays before each retry, after the immediate try.
    pub retry_schedule: Option<Vec<Dur>>,
    /// Allow loopback/private/link-local targets (tests, internal receivers).
    #[serde(default)]
    pub allow_private: bool,
}

fn default_notify_timeout() -> Dur {
    Dur(Duration::from_secs(15))
}

/// The SPEC's default retry schedule for callbacks.
const DEFAULT_NOTIFY_SCHEDULE: [u64; 7] = [5, 300, 1800, 7200, 18000, 36000, 36000];

/// A validated callback endpoint. Its signing key never appears in `Debug` output.
#[derive(Clone)]
pub struct NotifySetup {
    /// Target URL (already checked against the SSRF guard's literal ranges).
    pub url: reqwest::Url,
    /// HMAC key: the base64-decoded part of the secret after `whsec_`.
    pub key: Vec<u8>,
    /// Subscribed events.
    pub events: Vec<tickgate_actors::outbox::EventType>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Delays before each retry.
    pub retry_schedule: Vec<Duration>,
    /// Whether private targets are allowed.
    pub allow_private: bool,
}

impl fmt::Debug for NotifySetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifySetup")
            .field("url", &self.url.as_str())
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// Checks one `[[agent.notify]]` entry and reads its secret; errors never contain the secret.
fn notify_setup(
    n: &NotifyConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<NotifySetup, String> {
    let url = reqwest::Url::parse(&n.url).map_err(|e| format!("url: {:?}: {e}", n.url))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "url: {:?} must start with http:// or https://",
            n.url
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("url: {:?} has no host", n.url))?;
    if !n.allow_private {
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .ok();
        if let Some(ip) = literal.filter(|ip| tickgate_actors::outbox::is_private(*ip)) {
            return Err(format!(
                "url: {ip} is a loopback, private, link-local or unique-local address; set allow_private = true to allow it"
            ));
        }
    }
    let secret = match (&n.secret_env, &n.secret_file) {
        (Some(var), None) => {
            env(var).ok_or_else(|| format!("secret_env: the variable {var} is not set"))?
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("secret_file: cannot read {}: {e}", path.display()))?
            .trim()
            .to_string(),
        _ => return Err("give exactly one of secret_env and secret_file".into()),
    };
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("the secret must have the form whsec_<base64> (Standard Webhooks)")?;
    let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded)
        .ok()
        .filter(|k| !k.is_empty())
        .ok_or("the secret after whsec_ is not valid, non-empty base64")?;
    let events = match &n.events {
        None => tickgate_actors::outbox::EventType::DEFAULT.to_vec(),
        Some(names) => names
            .iter()
            .map(|e| e.parse())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("events: {e}"))?,
    };
    if n.timeout.0.is_zero() {
        return Err("timeout: must be more than zero".into());
    }
    let retry_schedule = match &n.retry_schedule {
        None => DEFAULT_NOTIFY_SCHEDULE
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect(),
        Some(s) => s.iter().map(|d| d.0).collect(),
    };
    Ok(NotifySetup {
        url,
        key,
        events,
        timeout: n.timeout.0,
        retry_schedule,
        allow_private: n.allow_private,
    })
}

/// One `schedule` entry as written; exactly one of `cron` and `every`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Five-field cron, or six with a leading seconds field.
    pub cron: Option<String>,
    /// IANA zone the cron is read in; UTC when absent. Only with `cron`.
    pub timezone: Option<String>,
    /// A fixed period (`"5m"`), slots aligned to the Unix epoch.
    pub every: Option<String>,
    /// The tasks' `inputs`; `{}` when absent.
    pub inputs: Option<serde_json::Value>,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_tick_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}

fn default_mailbox() -> usize {
    64
}

/// `breaker = { failures = 5, open_for = "30s" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long it stays open before one trial tick is let through.
    pub open_for: Dur,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Dur(Duration::from_secs(30)),
        }
    }
}

/// `[agent.webhook]`: who may trigger the agent and how.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Variable pinning the token (>= 32 characters) instead of generating one.
    pub token_env: Option<String>,
    /// Source addresses allowed to trigger; empty allows all.
    pub allow_cidrs: Vec<String>,
    /// Provider signature scheme and secrets.
    pub signature: Option<SignatureConfig>,
    /// Token bucket for this agent's triggers.
    pub rate_limit: Option<RateLimitConfig>,
    /// Whether GET with a query string triggers a tick.
    pub allow_get: bool,
    /// `false` for a scheduled-only agent: no token is created or printed and no webhook route
    /// resolves to it. Absent means enabled.
    pub enabled: Option<bool>,
    /// Where the sender puts its delivery id: `"/json/pointer"` or `"header:Name"`.
    pub delivery_id: Option<String>,
    /// Fixed answer replacing the fire-and-forget (and duplicate) answer.
    pub ack: Option<crate::ingress::delivery::AckConfig>,
}

/// `rate_limit = { per_second = 10, burst = 20 }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained triggers per second.
    pub per_second: f64,
    /// Triggers allowed at once after a quiet period.
    pub burst: u32,
}

/// Server-level settings overridable from the environment as `TICKGATE_<SECTION>_<KEY>`.
/// Limited to scalars so that an override can never restructure agents.
const ENV_OVERRIDES: [(&str, &str); 15] = [
    ("server", "listen"),
    ("server", "body_timeout"),
    ("server", "max_inflight_body_bytes"),
    ("server", "public_url"),
    ("server", "max_body_bytes"),
    ("server", "max_wait"),
    ("server", "shutdown_grace"),
    ("server", "workers"),
    ("store", "path"),
    ("store", "task_retention"),
    ("store", "sync"),
    ("store", "url"),
    ("server", "node_id"),
    ("admin", "token_env"),
    ("queue", "url"),
];

/// An agent ready to start: the actors' spec plus the ingress rules the edge enforces.
pub struct AgentSetup {
    /// What the agent actor needs.
    pub spec: AgentSpec,
    /// The token from `token_env`, if pinned. Never logged.
    pub pinned_token: Option<String>,
    /// Allowed source networks; empty allows all.
    pub allow_cidrs: Vec<IpNetwork>,
    /// Signature verification, if configured.
    pub signature: Option<Verifier>,
    /// The custom signature header of an `hmac-sha256` scheme, kept out of the tick's `source`.
    pub signature_header: Option<String>,
    /// Per-agent rate limit.
    pub rate_limit: Option<RateLimitConfig>,
    /// GET with a query string triggers.
    pub allow_get: bool,
    /// Delivery ids, handshakes and the fixed acknowledgement.
    pub delivery: crate::ingress::delivery::Delivery,
    /// Breaker thresholds.
    pub breaker: BreakerConfig,
    /// Whether the agent has a webhook at all (`[agent.webhook] enabled`).
    pub webhook_enabled: bool,
    /// Parsed `schedule` entries, in file order (their index is part of each slot's key).
    pub schedule: Vec<Entry>,
    /// `catch_up` policy for the schedule.
    pub catch_up: CatchUp,
    /// Status callback endpoints, in file order (their index is their admin id).
    pub notify: Vec<NotifySetup>,
    /// The A2A server settings, when `[agent.a2a] enabled = true`.
    pub a2a: Option<A2aConfig>,
    /// Queue trigger entries, in file order (their index names their consumer).
    pub queue: Vec<QueueEntry>,
}

impl AgentSetup {
    /// The agent's ingress gate, built from these settings.
    pub fn gate(&self) -> Gate {
        Gate::new(GateRules {
            allow_cidrs: &self.allow_cidrs,
            signature: self.signature.as_ref(),
            signature_header: self.signature_header.as_deref(),
            rate_limit: self.rate_limit.map(|r| (r.per_second, r.burst)),
            allow_get: self.allow_get,
            delivery: &self.delivery,
        })
    }
}

/// A validated configuration with secrets resolved.
pub struct Settings {
    /// The parsed file (with overrides applied).
    pub config: Config,
    /// Where it came from, for messages.
    pub source_name: String,
    /// `server.listen`, parsed.
    pub listen: SocketAddr,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<IpNetwork>,
    /// The admin token, when the admin API is enabled. Never logged.
    pub admin_token: Option<String>,
    /// Agents in file order.
    pub agents: Vec<AgentSetup>,
}

impl Settings {
    /// The NATS server queue triggers use: `[queue] url`, else, on the NATS store
    /// (`[store] kind = "nats"`), the store's own server. The one place that decides it.
    pub fn queue_url(&self) -> Option<String> {
        self.config.queue.url.clone().or_else(|| {
            (self.config.store.kind == StoreKind::Nats)
                .then(|| self.config.store.url.clone())
                .flatten()
        })
    }
}

impl Config {
    /// Reads the config at `path`, or the default path, or the embedded default, applies
    /// environment overrides, and parses it.
    pub fn load(path: Option<&Path>) -> Result<(Config, String), ConfigError> {
        let (text, source_name) = match path {
            Some(p) => (read(p)?, p.display().to_string()),
            None if Path::new(DEFAULT_PATH).exists() => {
                (read(Path::new(DEFAULT_PATH))?, DEFAULT_PATH.to_string())
            }
            None => (EMBEDDED.to_string(), "embedded default config".to_string()),
        };
        let err = |message: String| ConfigError {
            source_name: source_name.clone(),
            message,
        };
        let mut doc: toml::Table = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        apply_env_overrides(&mut doc, &|name| std::env::var(name).ok()).map_err(|e| match e {
            OverrideError::Value { var, message } => ConfigError {
                source_name: format!("environment variable {var}"),
                message,
            },
            OverrideError::NotATable(section) => err(format!("{section}: must be a table")),
        })?;
        let config =
            Config::deserialize(toml::Value::Table(doc)).map_err(|e| err(e.to_string()))?;
        Ok((config, source_name))
    }

    /// Checks everything that serde cannot and resolves secrets from the environment (through
    /// `env`, so tests can supply their own). Every error names the key.
    pub fn validate(
        self,
        source_name: String,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let err = |message: String| ConfigError {
            source_name: source_name.clone(),
            message,
        };
        let listen: SocketAddr = self.server.listen.parse().map_err(|e| {
            err(format!(
                "server.listen: {:?} is not an address: {e}",
                self.server.listen
            ))
        })?;
        if let Some(url) = &self.server.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(err(format!(
                    "server.public_url: {url:?} must start with http:// or https://"
                )));
            }
        }
        let trusted_proxies = parse_cidrs(&self.server.trusted_proxies)
            .map_err(|e| err(format!("server.trusted_proxies: {e}")))?;
        if self.server.max_body_bytes == 0 {
            return Err(err("server.max_body_bytes: must be at least 1".into()));
        }
        check_rate("server.auth_failures", &self.server.auth_failures).map_err(err)?;
        if self.server.body_timeout.0.is_zero() {
            return Err(err("server.body_timeout: must be more than zero".into()));
        }
        if self.server.max_inflight_body_bytes < self.server.max_body_bytes {
            return Err(err(format!(
                "server.max_inflight_body_bytes: must be at least server.max_body_bytes ({})",
                self.server.max_body_bytes
            )));
        }
        if self.server.workers == Some(0) {
            return Err(err("server.workers: must be at least 1".into()));
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(err("store.path: must not be empty".into()));
        }
        if self.store.kind == StoreKind::Nats {
            match &self.store.url {
                Some(url) => check_nats_url(url).map_err(|m| err(format!("store.url: {m}")))?,
                None => {
                    return Err(err(
                        "store.url: kind = \"nats\" needs the NATS server's url, such as \"nats://127.0.0.1:4222\"".into(),
                    ))
                }
            }
            if !(1..=5).contains(&self.store.replicas) {
                return Err(err(
                    "store.replicas: must be between 1 and 5 (JetStream's limit)".into(),
                ));
            }
            if self.store.lease.0 < Duration::from_millis(300) {
                return Err(err("store.lease: must be at least 300ms".into()));
            }
        }
        if self
            .server
            .node_id
            .as_ref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return Err(err("server.node_id: must not be empty".into()));
        }
        let admin_token = match env(&self.admin.token_env) {
            Some(t) if t.len() < 16 => {
                return Err(err(format!(
                    "admin.token_env: the variable {} holds fewer than 16 characters; use a long random token",
                    self.admin.token_env
                )))
            }
            Some(t) => Some(t),
            None => None,
        };
        if self.agents.is_empty() {
            return Err(err("agent: at least one [[agent]] is required".into()));
        }
        let mut seen = BTreeSet::new();
        let mut agents = Vec::with_capacity(self.agents.len());
        for (i, a) in self.agents.iter().enumerate() {
            let at = format!("agent[{i}]");
            let id = AgentId::new(&a.namespace, &a.name).map_err(|e| err(format!("{at}: {e}")))?;
            let at = format!("agent {id}");
            if !seen.insert(id.clone()) {
                return Err(err(format!("{at}: declared twice")));
            }
            agents.push(validate_agent(a, id, &at, env).map_err(err)?);
        }
        check_unique_tokens(&self.agents, &agents).map_err(err)?;
        if self.store.kind == StoreKind::Nats {
            // Every node must answer the same token: a token generated at start-up would differ
            // per node (and one printed by a node could be overwritten by another's).
            if let Some(a) = agents
                .iter()
                .find(|a| a.webhook_enabled && a.pinned_token.is_none())
            {
                return Err(err(format!(
                    "agent {}: webhook.token_env: with store.kind = \"nats\" every node must share the webhook token, so pin it with webhook.token_env (or set webhook.enabled = false)",
                    a.spec.id
                )));
            }
        }
        if let Some(url) = &self.queue.url {
            check_nats_url(url).map_err(|m| err(format!("queue.url: {m}")))?;
        }
        let settings = Settings {
            config: self,
            source_name: source_name.clone(),
            listen,
            trusted_proxies,
            admin_token,
            agents,
        };
        if let Some(a) = settings.agents.iter().find(|a| !a.queue.is_empty()) {
            if settings.queue_url().is_none() {
                return Err(err(format!(
                    "agent {}: queue: [[agent.queue]] entries need a NATS server; set [queue] url = \"nats://host:4222\"",
                    a.spec.id
                )));
            }
        }
        Ok(settings)
    }
}

fn check_rate(at: &str, r: &RateLimitConfig) -> Result<(), String> {
    if !(r.per_second > 0.0 && r.per_second.is_finite()) {
        return Err(format!("{at}.per_second: must be a positive number"));
    }
    if r.burst == 0 {
        return Err(format!("{at}.burst: must be at least 1"));
    }
    Ok(())
}

fn validate_agent(
    a: &AgentConfig,
    id: AgentId,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AgentSetup, String> {
    if a.mailbox == 0 {
        return Err(format!("{at}: mailbox: must be at least 1"));
    }
    if a.tick_timeout.0.is_zero() {
        return Err(format!("{at}: tick_timeout: must be more than zero"));
    }
    if a.breaker.failures == 0 {
        return Err(format!("{at}: breaker.failures: must be at least 1"));
    }
    if a.breaker.open_for.0.is_zero() {
        return Err(format!("{at}: breaker.open_for: must be more than zero"));
    }
    for name in a.allow_env.iter().chain(a.env.keys()) {
        if !is_env_name(name) {
            return Err(format!(
                "{at}: {name:?} is not a valid environment variable name"
            ));
        }
        if name.starts_with("TICKGATE_") {
            return Err(format!(
                "{at}: {name}: TICKGATE_* variables are set by tickgate itself"
            ));
        }
    }
    match &a.runner {
        RunnerSpec::Command(c) if c.program.as_os_str().is_empty() => {
            return Err(format!("{at}: runner.program: must not be empty"));
        }
        RunnerSpec::Command(c)
            if c.mode == CommandMode::Persistent || c.mode == CommandMode::Oneshot => {}
        RunnerSpec::Http(h) if !(h.url.starts_with("http://") || h.url.starts_with("https://")) => {
            return Err(format!(
                "{at}: runner.url: {:?} must start with http:// or https://",
                h.url
            ));
        }
        RunnerSpec::A2a(r) if !(r.url.starts_with("http://") || r.url.starts_with("https://")) => {
            return Err(format!(
                "{at}: runner.url: {:?} must be the agent card's http:// or https:// URL",
                r.url
            ));
        }
        RunnerSpec::A2a(r) => {
            if let Some(var) = &r.token_env {
                if env(var).is_none() {
                    return Err(format!(
                        "{at}: runner.token_env: the variable {var} is not set"
                    ));
                }
            }
        }
        _ => {}
    }
    let pinned_token = match &a.webhook.token_env {
        None => None,
        Some(var) => match env(var) {
            None => return Err(format!("{at}: webhook.token_env: the variable {var} is not set")),
            Some(t) if t.len() < MIN_PINNED_LEN => {
                return Err(format!(
                    "{at}: webhook.token_env: the variable {var} holds fewer than {MIN_PINNED_LEN} characters"
                ))
            }
            Some(t) if !t.bytes().all(is_token_byte) => {
                return Err(format!(
                    "{at}: webhook.token_env: the token in {var} may only contain A-Z, a-z, 0-9, '-' and '_', so that its URL is the same before and after percent-decoding"
                ))
            }
            Some(t) => Some(t),
        },
    };
    let allow_cidrs = parse_cidrs(&a.webhook.allow_cidrs)
        .map_err(|e| format!("{at}: webhook.allow_cidrs: {e}"))?;
    let signature = match &a.webhook.signature {
        None => None,
        Some(s) => Some(
            s.build(env)
                .map_err(|e| format!("{at}: webhook.signature: {e}"))?,
        ),
    };
    if let Some(r) = &a.webhook.rate_limit {
        check_rate(&format!("{at}: webhook.rate_limit"), r)?;
    }
    let webhook_enabled = a.webhook.enabled.unwrap_or(true);
    if !webhook_enabled && a.webhook.token_env.is_some() {
        return Err(format!(
            "{at}: webhook.token_env: set, but webhook.enabled = false gives the agent no webhook"
        ));
    }
    let schedule = a
        .schedule
        .iter()
        .enumerate()
        .map(|(i, e)| schedule_entry(e).map_err(|m| format!("{at}: schedule[{i}]: {m}")))
        .collect::<Result<Vec<_>, _>>()?;
    if a.retry.schedule.len() > MAX_RETRIES {
        return Err(format!(
            "{at}: retry.schedule: {} delays; at most {MAX_RETRIES} are allowed",
            a.retry.schedule.len()
        ));
    }
    let delivery = crate::ingress::delivery::Delivery::new(
        a.webhook.delivery_id.as_deref(),
        a.webhook.ack.as_ref(),
        signature.as_ref().map(|v| v.scheme()),
    )
    .map_err(|e| format!("{at}: {e}"))?;
    let notify = a
        .notify
        .iter()
        .enumerate()
        .map(|(i, n)| notify_setup(n, env).map_err(|m| format!("{at}: notify[{i}]: {m}")))
        .collect::<Result<Vec<_>, _>>()?;
    let a2a = a2a_setup(&a.a2a, webhook_enabled).map_err(|m| format!("{at}: a2a: {m}"))?;
    let queue = a
        .queue
        .iter()
        .enumerate()
        .map(|(i, q)| queue_entry(q).map_err(|m| format!("{at}: queue[{i}]: {m}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AgentSetup {
        spec: AgentSpec {
            id,
            runner: a.runner.clone(),
            tick_timeout: a.tick_timeout.0,
            mailbox: a.mailbox,
            env: a.env.clone(),
            allow_env: a.allow_env.iter().cloned().collect(),
            retry: a.retry.policy(),
            approvals: a.approvals,
        },
        pinned_token,
        allow_cidrs,
        signature,
        signature_header: a.webhook.signature.as_ref().and_then(|s| s.header.clone()),
        rate_limit: a.webhook.rate_limit,
        allow_get: a.webhook.allow_get,
        delivery,
        breaker: a.breaker.clone(),
        webhook_enabled,
        schedule,
        catch_up: a.catch_up,
        notify,
        a2a,
        queue,
    })
}

/// Checks one `[[agent.queue]]` entry.
fn queue_entry(q: &QueueEntryConfig) -> Result<QueueEntry, String> {
    check_subject(&q.subject, true).map_err(|m| format!("subject: {m}"))?;
    if let Some(reply) = &q.reply_subject {
        check_subject(reply, false).map_err(|m| format!("reply_subject: {m}"))?;
    }
    if q.ack_wait.0 < Duration::from_secs(1) {
        return Err("ack_wait: must be at least 1s".into());
    }
    Ok(QueueEntry {
        subject: q.subject.clone(),
        reply_subject: q.reply_subject.clone(),
        ack_wait: q.ack_wait.0,
    })
}

/// Checks a NATS server URL list (`nats://a:4222,nats://b:4222`) without echoing it, since it
/// may carry a user and password.
fn check_nats_url(url: &str) -> Result<(), String> {
    if url.trim().is_empty() {
        return Err("must not be empty".into());
    }
    for part in url.split(',') {
        let part = part.trim();
        let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .any(|s| part.starts_with(s));
        if !scheme_ok || part.parse::<async_nats::ServerAddr>().is_err() {
            return Err(
                "each server must be written nats://host:port (or tls://, ws://, wss://)".into(),
            );
        }
    }
    Ok(())
}

/// Checks `[agent.a2a]`: the bearer A2A callers present is the webhook token, so an agent
/// without a webhook cannot be served; skill ids must be present and unique.
fn a2a_setup(a: &A2aConfig, webhook_enabled: bool) -> Result<Option<A2aConfig>, String> {
    if !a.enabled {
        return Ok(None);
    }
    if !webhook_enabled {
        return Err("enabled, but webhook.enabled = false leaves the agent without the token A2A callers present".into());
    }
    let mut ids = BTreeSet::new();
    for (i, skill) in a.skills.iter().enumerate() {
        if skill.id.trim().is_empty() || skill.name.trim().is_empty() {
            return Err(format!("skills[{i}]: id and name must not be empty"));
        }
        if !ids.insert(skill.id.as_str()) {
            return Err(format!("skills[{i}]: the id {:?} is used twice", skill.id));
        }
    }
    Ok(Some(a.clone()))
}

/// Whether `b` may appear in a pinned webhook token: the URL-safe alphabet, which no URL
/// encoding or decoding step changes.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Two agents sharing a webhook token would silently send every trigger to one of them: refuse
/// the same `token_env` variable and the same token value, naming both agents.
fn check_unique_tokens(configs: &[AgentConfig], agents: &[AgentSetup]) -> Result<(), String> {
    for (j, later) in agents.iter().enumerate() {
        for (i, earlier) in agents[..j].iter().enumerate() {
            let (Some(a), Some(b)) = (&earlier.pinned_token, &later.pinned_token) else {
                continue;
            };
            let var_a = configs[i].webhook.token_env.as_deref().unwrap_or_default();
            let var_b = configs[j].webhook.token_env.as_deref().unwrap_or_default();
            if var_a == var_b {
                return Err(format!(
                    "agents {} and {}: both pin their webhook token to the variable {var_a}; every agent needs its own token",
                    earlier.spec.id, later.spec.id
                ));
            }
            if bool::from(subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes())) {
                return Err(format!(
                    "agents {} and {}: the variables {var_a} and {var_b} hold the same webhook token; every agent needs its own token",
                    earlier.spec.id, later.spec.id
                ));
            }
        }
    }
    Ok(())
}

fn schedule_entry(e: &ScheduleConfig) -> Result<Entry, String> {
    let inputs = e.inputs.clone().unwrap_or_else(|| serde_json::json!({}));
    match (&e.cron, &e.every) {
        (Some(cron), None) => {
            Entry::cron(cron, e.timezone.as_deref(), inputs).map_err(|err| err.to_string())
        }
        (None, Some(every)) if e.timezone.is_some() => Err(format!(
            "timezone applies to cron entries only, not to every = {every:?}"
        )),
        (None, Some(every)) => Entry::every(every, inputs).map_err(|err| err.to_string()),
        (Some(_), Some(_)) => Err("give either cron or every, not both".into()),
        (None, None) => Err("needs cron = \"...\" or every = \"...\"".into()),
    }
}

/// Whether `name` is a portable environment variable name.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        source_name: path.display().to_string(),
        message: format!("cannot read the config file: {e}"),
    })
}

/// Why an environment override could not be applied.
#[derive(Debug, thiserror::Error)]
enum OverrideError {
    /// The variable's value is unusable; the message names the variable, not the file.
    #[error("{var}: {message}")]
    Value {
        /// The variable, e.g. `TICKGATE_SERVER_WORKERS`.
        var: String,
        /// What is wrong with its value.
        message: String,
    },
    /// The file has the section, but not as a table.
    #[error("{0}: must be a table")]
    NotATable(&'static str),
}

/// Checks one override's value the way validation would check the key, so that a bad value is
/// reported against the variable that carries it.
fn override_value(key: &str, raw: &str) -> Result<toml::Value, String> {
    match key {
        "max_body_bytes" | "workers" | "max_inflight_body_bytes" => match raw.trim().parse::<i64>()
        {
            Ok(n) if n >= 1 => Ok(toml::Value::Integer(n)),
            _ => Err(format!("{raw:?} is not a whole number of at least 1")),
        },
        "max_wait" | "shutdown_grace" | "task_retention" | "body_timeout" => {
            humantime::parse_duration(raw)
                .map(|_| toml::Value::String(raw.to_string()))
                .map_err(|e| format!("{raw:?} is not a duration such as \"30s\" or \"5m\": {e}"))
        }
        "listen" => raw
            .parse::<SocketAddr>()
            .map(|_| toml::Value::String(raw.to_string()))
            .map_err(|e| format!("{raw:?} is not an address such as 127.0.0.1:8080: {e}")),
        "public_url" if !(raw.starts_with("http://") || raw.starts_with("https://")) => {
            Err(format!("{raw:?} must start with http:// or https://"))
        }
        "path" if raw.is_empty() => Err("must not be empty".into()),
        "token_env" if !is_env_name(raw) => {
            Err(format!("{raw:?} is not a valid environment variable name"))
        }
        _ => Ok(toml::Value::String(raw.to_string())),
    }
}

fn apply_env_overrides(
    doc: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), OverrideError> {
    for (section, key) in ENV_OVERRIDES {
        let var = format!("TICKGATE_{}_{}", section.to_uppercase(), key.to_uppercase());
        let Some(raw) = env(&var) else { continue };
        let value =
            override_value(key, &raw).map_err(|message| OverrideError::Value { var, message })?;
        let table = doc
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match table {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), value);
            }
            _ => return Err(OverrideError::NotATable(section)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let env = |name: &str| match name {
            "PINNED" => Some("p".repeat(40)),
            "PINNED_TOO" => Some("p".repeat(40)),
            "PERCENT" => Some(format!("{}%41", "p".repeat(40))),
            "SHORT" => Some("short".into()),
            _ => None,
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            source_name: "t".into(),
            message: e.to_string(),
        })?;
        apply_env_overrides(&mut doc, &env).unwrap();
        let config = Config::deserialize(toml::Value::Table(doc)).map_err(|e| ConfigError {
            source_name: "t".into(),
            message: e.to_string(),
        })?;
        config.validate("t".into(), &env)
    }

    #[test]
    fn notify_endpoints_parse_with_defaults_and_errors_name_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "whsec_a2V5LWJ5dGVz\n").unwrap();
        let agent = |notify: &str| {
            format!("[[agent]]\nname = \"n\"\nrunner = {{ kind = \"echo\" }}\n[[agent.notify]]\n{notify}\n")
        };
        let file = format!("secret_file = \"{}\"", secret.display());
        let s = parse(&agent(&format!(
            "url = \"https://hooks.example.com/x\"\n{file}"
        )))
        .unwrap();
        let n = &s.agents[0].notify[0];
        assert_eq!(n.key, b"key-bytes");
        assert_eq!(
            n.events,
            tickgate_actors::outbox::EventType::DEFAULT.to_vec()
        );
        assert_eq!(n.timeout, Duration::from_secs(15));
        assert_eq!(n.retry_schedule.len(), 7);
        assert_eq!(n.retry_schedule[6], Duration::from_secs(36000));
        assert!(!n.allow_private);
        assert!(!format!("{n:?}").contains("key"), "Debug shows the key");
        for (notify, wanted) in [
            (
                format!("url = \"http://127.0.0.1:1/\"\n{file}"),
                "notify[0]: url: 127.0.0.1",
            ),
            (
                format!("url = \"http://[fd00::1]/\"\n{file}"),
                "allow_private",
            ),
            (
                format!("url = \"ftp://x.example/\"\n{file}"),
                "must start with http",
            ),
            (
                format!("url = \"https://x.example/\"\n{file}\nevents = [\"task.done\"]"),
                "events: unknown event",
            ),
            (
                "url = \"https://x.example/\"\nsecret_env = \"SHORT\"".to_string(),
                "whsec_",
            ),
            (
                "url = \"https://x.example/\"\nsecret_env = \"MISSING\"".to_string(),
                "MISSING is not set",
            ),
            ("url = \"https://x.example/\"".to_string(), "exactly one of"),
        ] {
            let e = parse(&agent(&notify))
                .err()
                .unwrap_or_else(|| panic!("{notify} accepted"));
            assert!(e.message.contains(wanted), "{notify}: {}", e.message);
            assert!(e.message.contains("agent default/n"), "{}", e.message);
            assert!(
                !e.message.contains("short"),
                "the secret leaked: {}",
                e.message
            );
        }
        let private = format!("url = \"http://127.0.0.1:1/\"\n{file}\nallow_private = true");
        assert!(parse(&agent(&private)).is_ok());
    }

    #[test]
    fn embedded_default_is_valid() {
        let config: Config = toml::from_str(EMBEDDED).unwrap();
        let settings = config.validate("embedded".into(), &|_| None).unwrap();
        assert!(settings
            .agents
            .iter()
            .any(|a| a.spec.id.to_string() == "default/echo"));
    }

    #[test]
    fn a2a_section_parses_and_is_checked() {
        let agent = |a2a: &str, webhook: &str| {
            format!("[[agent]]\nname = \"r\"\nrunner = {{ kind = \"echo\" }}\n{webhook}[agent.a2a]\n{a2a}\n")
        };
        let s = parse(&agent(
            "enabled = true\ndescription = \"d\"\nskills = [{ id = \"s\", name = \"S\", tags = [\"t\"] }]",
            "",
        ))
        .unwrap();
        let a2a = s.agents[0].a2a.as_ref().unwrap();
        assert_eq!(
            (a2a.description.as_deref(), a2a.skills[0].id.as_str()),
            (Some("d"), "s")
        );
        assert!(parse(&agent("enabled = false", "")).unwrap().agents[0]
            .a2a
            .is_none());
        assert!(
            parse("[[agent]]\nname = \"r\"\nrunner = { kind = \"echo\" }\n")
                .unwrap()
                .agents[0]
                .a2a
                .is_none()
        );
        for (a2a, webhook, wanted) in [
            ("enabled = true", "[agent.webhook]\nenabled = false\n", "a2a: enabled, but webhook.enabled = false"),
            ("enabled = true\nskills = [{ id = \"s\", name = \"S\" }, { id = \"s\", name = \"T\" }]", "", "used twice"),
            ("enabled = true\nskills = [{ id = \"\", name = \"S\" }]", "", "must not be empty"),
            ("enabled = true\ncolour = 1", "", "colour"),
        ] {
            let e = parse(&agent(a2a, webhook)).err().unwrap_or_else(|| panic!("{a2a} accepted"));
            assert!(e.message.contains(wanted), "{a2a}: {}", e.message);
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(
            "[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\ntick_timeout = \"soon\"\n",
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("tick_timeout"), "{e}");
        let e = parse("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n[agent.webhook]\ntoken_env = \"SHORT\"\n")
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("SHORT") && e.to_string().contains("default/a"),
            "{e}"
        );
        let e = parse("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("declared twice"), "{e}");
        let e = parse("[server]\nlisten = \"nowhere\"\n[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = parse("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\ncolour = 1\n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn schedules_parse_and_errors_name_the_entry() {
        let s = parse(
            "[[agent]]\nname = \"d\"\nrunner = { kind = \"echo\" }\ncatch_up = \"none\"\nschedule = [{ cron = \"0 9 * * 1-5\", timezone = \"Europe/Berlin\", inputs = { kind = \"daily\" } }, { every = \"5m\" }]\n[agent.webhook]\nenabled = false\n",
        )
        .unwrap();
        let a = &s.agents[0];
        assert!(!a.webhook_enabled);
        assert_eq!(a.catch_up, CatchUp::None);
        assert_eq!(a.schedule.len(), 2);
        assert_eq!(a.schedule[0].expression, "0 9 * * 1-5");
        assert_eq!(a.schedule[0].inputs["kind"], "daily");
        assert_eq!(a.schedule[1].inputs, serde_json::json!({}));
        let plain = parse("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n").unwrap();
        assert!(plain.agents[0].webhook_enabled);
        assert_eq!(plain.agents[0].catch_up, CatchUp::Latest);
        for (entry, needle) in [
            ("{ cron = \"99 * * * *\" }", "schedule[1]: cron"),
            (
                "{ cron = \"* * * * *\", timezone = \"Nowhere/Land\" }",
                "schedule[1]: timezone",
            ),
            ("{ every = \"often\" }", "schedule[1]: every"),
            (
                "{ every = \"5m\", cron = \"* * * * *\" }",
                "schedule[1]: give either",
            ),
            ("{ inputs = {} }", "schedule[1]: needs"),
        ] {
            let text = format!("[[agent]]\nname = \"d\"\nrunner = {{ kind = \"echo\" }}\nschedule = [{{ every = \"1m\" }}, {entry}]\n");
            let e = parse(&text).err().unwrap().to_string();
            assert!(e.contains("default/d") && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn retry_parses_with_defaults_and_refuses_bad_values() {
        use tickgate_actors::retry::{RetryOrder, RetryPolicy};
        let s = parse("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\nretry = { schedule = [\"10s\", \"1m\"], order = \"block\" }\n[[agent]]\nname = \"b\"\nrunner = { kind = \"echo\" }\n").unwrap();
        assert_eq!(
            s.agents[0].spec.retry,
            RetryPolicy {
                schedule: vec![Duration::from_secs(10), Duration::from_secs(60)],
                order: RetryOrder::Block,
            }
        );
        assert_eq!(s.agents[1].spec.retry, RetryPolicy::default());
        for (bad, names) in [
            ("retry = { schedule = [\"soon\"] }", "soon"),
            ("retry = { order = \"later\" }", "later"),
            ("retry = { delays = [] }", "delays"),
        ] {
            let e = parse(&format!(
                "[[agent]]\nname = \"a\"\nrunner = {{ kind = \"echo\" }}\n{bad}\n"
            ))
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains(names), "{e}");
        }
        let long = vec!["\"1s\""; MAX_RETRIES + 1].join(",");
        let e = parse(&format!("[[agent]]\nname = \"a\"\nrunner = {{ kind = \"echo\" }}\nretry = {{ schedule = [{long}] }}\n"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("retry.schedule"), "{e}");
    }

    #[test]
    fn queue_entries_parse_need_a_url_and_errors_name_the_entry() {
        let agent = |queue: &str| {
            format!("[queue]\nurl = \"nats://u:p@127.0.0.1:4222, nats://127.0.0.1:4223\"\n[[agent]]\nname = \"w\"\nrunner = {{ kind = \"echo\" }}\n[[agent.queue]]\nsubject = \"jobs.in\"\n[[agent.queue]]\n{queue}\n")
        };
        let s = parse(&agent(
            "subject = \"events.>\"\nreply_subject = \"results.w\"\nack_wait = \"5s\"",
        ))
        .unwrap();
        let q = &s.agents[0].queue;
        assert_eq!(q.len(), 2);
        assert_eq!(
            q[0],
            QueueEntry {
                subject: "jobs.in".into(),
                reply_subject: None,
                ack_wait: Duration::from_secs(30),
            }
        );
        assert_eq!(q[1].subject, "events.>");
        assert_eq!(q[1].reply_subject.as_deref(), Some("results.w"));
        assert_eq!(q[1].ack_wait, Duration::from_secs(5));
        assert_eq!(
            s.queue_url().as_deref(),
            Some("nats://u:p@127.0.0.1:4222, nats://127.0.0.1:4223")
        );
        for (entry, wanted) in [
            ("subject = \"\"", "queue[1]: subject: must not be empty"),
            (
                "subject = \"a..b\"",
                "queue[1]: subject: \"a..b\" has an empty token",
            ),
            ("subject = \"a.>.b\"", "'>' may only be the last token"),
            ("subject = \"a.b*\"", "must be whole tokens"),
            ("subject = \"a b\"", "whitespace"),
            (
                "subject = \"a\"\nreply_subject = \"r.*\"",
                "queue[1]: reply_subject",
            ),
            (
                "subject = \"a\"\nack_wait = \"10ms\"",
                "ack_wait: must be at least 1s",
            ),
            ("subject = \"a\"\ncolour = 1", "colour"),
        ] {
            let e = parse(&agent(entry))
                .err()
                .unwrap_or_else(|| panic!("{entry} accepted"));
            assert!(e.message.contains(wanted), "{entry}: {}", e.message);
        }
        let e = parse("[[agent]]\nname = \"w\"\nrunner = { kind = \"echo\" }\n[[agent.queue]]\nsubject = \"a\"\n")
            .err()
            .unwrap();
        assert!(
            e.message.contains("agent default/w") && e.message.contains("[queue] url"),
            "{}",
            e.message
        );
        let e = parse("[queue]\nurl = \"http://user:hunter2@x\"\n[[agent]]\nname = \"w\"\nrunner = { kind = \"echo\" }\n")
            .err()
            .unwrap();
        assert!(e.message.starts_with("queue.url:"), "{}", e.message);
        assert!(
            !e.message.contains("hunter2"),
            "the password leaked: {}",
            e.message
        );
    }

    #[test]
    fn pinned_token_is_read_from_env() {
        let s = parse("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n[agent.webhook]\ntoken_env = \"PINNED\"\n").unwrap();
        assert_eq!(s.agents[0].pinned_token.as_deref().map(str::len), Some(40));
    }

    #[test]
    fn shared_or_unsafe_pinned_tokens_are_refused() {
        let two = |a: &str, b: &str| {
            format!("[[agent]]\nname = \"a\"\nrunner = {{ kind = \"echo\" }}\n[agent.webhook]\ntoken_env = \"{a}\"\n[[agent]]\nname = \"b\"\nrunner = {{ kind = \"echo\" }}\n[agent.webhook]\ntoken_env = \"{b}\"\n")
        };
        let e = parse(&two("PINNED", "PINNED")).err().unwrap().to_string();
        assert!(
            e.contains("default/a") && e.contains("default/b") && e.contains("PINNED"),
            "{e}"
        );
        let e = parse(&two("PINNED", "PINNED_TOO"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("default/a") && e.contains("default/b") && e.contains("same webhook token"),
            "{e}"
        );
        let e = parse("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n[agent.webhook]\ntoken_env = \"PERCENT\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("PERCENT") && !e.contains("ppp"), "{e}");
    }

    #[test]
    fn bad_override_names_the_variable() {
        for (var, value) in [
            ("TICKGATE_SERVER_WORKERS", "many"),
            ("TICKGATE_SERVER_MAX_WAIT", "soon"),
            ("TICKGATE_SERVER_LISTEN", "nowhere"),
            ("TICKGATE_SERVER_BODY_TIMEOUT", "-1"),
            ("TICKGATE_SERVER_MAX_BODY_BYTES", "0"),
            ("TICKGATE_SERVER_PUBLIC_URL", "example.com"),
        ] {
            let env = |name: &str| (name == var).then(|| value.to_string());
            let e = apply_env_overrides(&mut toml::Table::new(), &env)
                .err()
                .unwrap()
                .to_string();
            assert!(e.starts_with(var), "{e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn accepted_pinned_tokens_survive_percent_decoding(token in "[ -~]{32,48}") {
            let env = |name: &str| (name == "T").then(|| token.clone());
            let config: Config = toml::from_str("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n[agent.webhook]\ntoken_env = \"T\"\n").unwrap();
            if let Ok(s) = config.validate("t".into(), &env) {
                let t = s.agents[0].pinned_token.clone().unwrap();
                proptest::prop_assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn override_values_are_accepted_only_when_usable(raw in "\\PC{0,24}") {
            for key in ["workers", "max_wait", "listen", "public_url", "path", "token_env"] {
                let accepted = override_value(key, &raw).is_ok();
                let usable = match key {
                    "workers" => raw.trim().parse::<i64>().is_ok_and(|n| n >= 1),
                    "max_wait" => humantime::parse_duration(&raw).is_ok(),
                    "listen" => raw.parse::<SocketAddr>().is_ok(),
                    "public_url" => raw.starts_with("http://") || raw.starts_with("https://"),
                    "path" => !raw.is_empty(),
                    _ => is_env_name(&raw),
                };
                proptest::prop_assert_eq!(accepted, usable, "{} = {:?}", key, raw);
            }
        }
    }

    #[test]
    fn env_overrides_apply_to_scalars_only() {
        let mut doc = toml::Table::new();
        let env = |name: &str| match name {
            "TICKGATE_SERVER_LISTEN" => Some("127.0.0.1:0".to_string()),
            "TICKGATE_SERVER_MAX_BODY_BYTES" => Some("10".to_string()),
            _ => None,
        };
        apply_env_overrides(&mut doc, &env).unwrap();
        assert_eq!(doc["server"]["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(doc["server"]["max_body_bytes"].as_integer(), Some(10));
        let bad = |name: &str| (name == "TICKGATE_SERVER_WORKERS").then(|| "many".to_string());
        assert!(apply_env_overrides(&mut toml::Table::new(), &bad).is_err());
    }
}
