//! Delivers the outbox (SPEC section 9): signed status callbacks, at least once, in order per
//! task and endpoint, with bounded concurrency per endpoint.
//!
//! Deliveries reach the worker two ways: at start, every `pending` delivery is read from the
//! store (so `kill -9` loses nothing); while running, the store hands over each delivery once the
//! batch that created it is durable. Deliveries of one task to one endpoint form a *chain*, worked
//! by one tokio task in id order; a chain ends when its queue is empty. Every attempt's result is
//! written to the store before the next attempt starts.
//!
//! One `reqwest` client serves every endpoint: no redirects, no proxies from the environment, and
//! a DNS resolver that drops loopback/private/link-local/unique-local addresses for hosts whose
//! endpoint did not set `allow_private`, so a name is checked on every connect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tickgate_actors::model::{now_ms, rfc3339, AgentId, TaskId};
use tickgate_actors::outbox::{
    after_attempt, is_private, parse_retry_after, random_unit, Delivery, DeliveryStatus,
    EndpointBreaker, EndpointPlan, Outbox, Outcome,
};
use tickgate_actors::store::{write_async, Store, StoreError, Write};
use tokio::sync::{watch, Semaphore};

use crate::config::{NotifySetup, Settings};
use crate::http::tasks::TaskRecord;
use crate::metrics::Metrics;

/// Attempts in flight per endpoint at most.
const PER_ENDPOINT: usize = 4;
/// Most response body bytes read from a receiver; the rest is dropped with the connection.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Wait before retrying a store write of a delivery's state.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Why an admin action on the outbox was refused.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// No such delivery.
    #[error("no delivery {0}")]
    NoSuchDelivery(u64),
    /// No such endpoint.
    #[error("agent {agent} has no notify endpoint {index}")]
    NoSuchEndpoint {
        /// The agent named.
        agent: AgentId,
        /// The index given.
        index: usize,
    },
    /// The delivery is not a dead letter.
    #[error("delivery {id} is {status}; only failed deliveries can be retried")]
    NotFailed {
        /// The delivery.
        id: u64,
        /// Its state.
        status: &'static str,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Builds the outbox the store plans with, from every agent's `[[agent.notify]]`; `None` when no
/// agent has callbacks (the writer then skips the hook entirely).
pub fn outbox_for(settings: &Settings) -> Option<Arc<Outbox>> {
    let plans: HashMap<AgentId, Vec<EndpointPlan>> = settings
        .agents
        .iter()
        .filter(|a| !a.notify.is_empty())
        .map(|a| {
            let plans = a
                .notify
                .iter()
                .map(|n| EndpointPlan {
                    events: n.events.iter().copied().collect(),
                })
                .collect();
            (a.spec.id.clone(), plans)
        })
        .collect();
    (!plans.is_empty()).then(|| Arc::new(Outbox::new(plans)))
}

/// The SSRF refusal, found again in reqwest's error chain to fail the delivery for good.
#[derive(Debug, thiserror::Error)]
#[error("refused: {0}")]
struct Refused(String);

/// Resolves names and keeps only public addresses, except for hosts of `allow_private` endpoints.
struct GuardedResolver {
    allowed: HashSet<String>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let allow = self.allowed.contains(&host.to_ascii_lowercase());
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow || !is_private(a.ip()))
                .collect();
            if kept.is_empty() {
                let ips: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                return Err(Box::new(Refused(format!(
                    "{host} resolves only to loopback/private/link-local/unique-local addresses ({}); set allow_private = true to allow it",
                    ips.join(", ")
                ))) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

struct Endpoint {
    setup: NotifySetup,
    disabled: watch::Sender<bool>,
    breaker: Mutex<EndpointBreaker>,
    slots: Semaphore,
    label: [String; 2],
}

type ChainKey = (AgentId, usize, TaskId);

#[derive(Default)]
struct Chains {
    queues: HashMap<ChainKey, VecDeque<Delivery>>,
    known: HashSet<u64>,
}

struct Inner {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    endpoints: HashMap<(AgentId, usize), Arc<Endpoint>>,
    chains: Mutex<Chains>,
    metrics: Arc<Metrics>,
    public_url: String,
    user_agent: String,
}

/// The running delivery worker; the admin routes act through it.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

impl Notifier {
    /// Starts delivering: loads disabled endpoints and pending deliveries, then follows the
    /// store's hand-overs. `None` when the store has no outbox (no agent has callbacks).
    pub async fn start(
        settings: &Settings,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        public_url: String,
    ) -> Result<Option<Self>, StoreError> {
        let Some(outbox) = store.outbox() else {
            return Ok(None);
        };
        let Some(mut rx) = outbox.take_receiver() else {
            return Ok(None);
        };
        let allowed = settings
            .agents
            .iter()
            .flat_map(|a| &a.notify)
            .filter(|n| n.allow_private)
            .filter_map(|n| n.url.host_str().map(|h| h.to_ascii_lowercase()))
            .collect();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { allowed }))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot build the callback client: {e}")))?;
        let disabled: HashSet<(AgentId, usize)> =
            store.disabled_endpoints().await?.into_iter().collect();
        let mut endpoints = HashMap::new();
        for a in &settings.agents {
            for (i, n) in a.notify.iter().enumerate() {
                let key = (a.spec.id.clone(), i);
                let off = disabled.contains(&key);
                endpoints.insert(
                    key,
                    Arc::new(Endpoint {
                        setup: n.clone(),
                        disabled: watch::Sender::new(off),
                        breaker: Mutex::new(EndpointBreaker::default()),
                        slots: Semaphore::new(PER_ENDPOINT),
                        label: [a.spec.id.to_string(), i.to_string()],
                    }),
                );
            }
        }
        metrics
            .notify
            .disabled_endpoints
            .set(endpoints.values().filter(|e| *e.disabled.borrow()).count() as i64);
        let inner = Arc::new(Inner {
            store: store.clone(),
            client,
            endpoints,
            chains: Mutex::new(Chains::default()),
            metrics,
            public_url,
            user_agent: format!("tickgate/{}", env!("CARGO_PKG_VERSION")),
        });
        let mut after = None;
        let mut loaded = 0;
        loop {
            let page = store
                .deliveries(tickgate_actors::store::DeliveryQuery {
                    status: Some(DeliveryStatus::Pending),
                    after,
                    limit: 1000,
                    ..Default::default()
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for d in page {
                loaded += 1;
                inner.enqueue(d);
            }
        }
        if loaded > 0 {
            tracing::info!(deliveries = loaded, "pending status callbacks loaded");
        }
        let worker = inner.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                worker.enqueue(d);
            }
        });
        Ok(Some(Self { inner }))
    }

    /// `POST /admin/deliveries/{id}/retry`: a dead letter goes out again with a fresh schedule.
    pub async fn retry(&self, id: u64) -> Result<Delivery, NotifyError> {
        let mut d = self
            .inner
            .store
            .delivery(id)
            .await?
            .ok_or(NotifyError::NoSuchDelivery(id))?;
        if d.status != DeliveryStatus::Failed {
            return Err(NotifyError::NotFailed {
                id,
                status: status_name(d.status),
            });
        }
        // The chain that dead-lettered it lets go of it right after storing `failed`; wait for
        // that, so the retry is not mistaken for a delivery already being worked.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.inner.is_known(id) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        d.status = DeliveryStatus::Pending;
        d.round_attempts = 0;
        d.next_attempt_at = Some(now_ms());
        write_async(
            self.inner.store.as_ref(),
            Write::Delivery(Box::new(d.clone())),
        )
        .await?;
        self.inner.enqueue(d.clone());
        Ok(d)
    }

    /// `POST /admin/agents/{ns}/{agent}/notify/{index}/enable`: held deliveries go out again.
    pub async fn enable(&self, agent: &AgentId, index: usize) -> Result<(), NotifyError> {
        let ep = self
            .inner
            .endpoints
            .get(&(agent.clone(), index))
            .ok_or_else(|| NotifyError::NoSuchEndpoint {
                agent: agent.clone(),
                index,
            })?;
        write_async(
            self.inner.store.as_ref(),
            Write::NotifyEndpoint {
                agent: agent.clone(),
                endpoint: index,
                disabled: false,
            },
        )
        .await?;
        if ep.disabled.send_replace(false) {
            self.inner.metrics.notify.disabled_endpoints.dec();
            tracing::info!(agent = %agent, endpoint = index, "notify endpoint re-enabled");
        }
        Ok(())
    }

    /// Whether `agent` has an endpoint `index`.
    pub fn has_endpoint(&self, agent: &AgentId, index: usize) -> bool {
        self.inner.endpoints.contains_key(&(agent.clone(), index))
    }
}

/// The API name of a delivery state.
pub fn status_name(s: DeliveryStatus) -> &'static str {
    match s {
        DeliveryStatus::Pending => "pending",
        DeliveryStatus::Succeeded => "succeeded",
        DeliveryStatus::Failed => "failed",
    }
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` (Standard Webhooks).
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, digest)
    )
}

impl Inner {
    fn is_known(&self, id: u64) -> bool {
        self.chains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .known
            .contains(&id)
    }

    fn enqueue(self: &Arc<Self>, d: Delivery) {
        let key = (d.agent.clone(), d.endpoint, d.task_id);
        let spawn = {
            let mut chains = self.chains.lock().unwrap_or_else(|e| e.into_inner());
            if !chains.known.insert(d.id) {
                return;
            }
            self.metrics.notify.outbox_depth.inc();
            match chains.queues.get_mut(&key) {
                Some(q) => {
                    q.push_back(d);
                    false
                }
                None => {
                    chains.queues.insert(key.clone(), VecDeque::from([d]));
                    true
                }
            }
        };
        if spawn {
            let me = self.clone();
            tokio::spawn(async move { me.run_chain(key).await });
        }
    }

    async fn run_chain(self: Arc<Self>, key: ChainKey) {
        loop {
            let next = {
                let chains = self.chains.lock().unwrap_or_else(|e| e.into_inner());
                chains.queues.get(&key).and_then(|q| q.front().cloned())
            };
            let Some(d) = next else { return };
            let id = d.id;
            self.deliver(d).await;
            let mut chains = self.chains.lock().unwrap_or_else(|e| e.into_inner());
            chains.known.remove(&id);
            self.metrics.notify.outbox_depth.dec();
            let empty = match chains.queues.get_mut(&key) {
                Some(q) => {
                    q.pop_front();
                    q.is_empty()
                }
                None => true,
            };
            if empty {
                chains.queues.remove(&key);
                return;
            }
        }
    }

    async fn persist(&self, write: impl Fn() -> Write) {
        loop {
            match write_async(self.store.as_ref(), write()).await {
                Ok(_) => return,
                Err(StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot store a callback delivery's state; retrying");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
    }

    /// Works one delivery until it is succeeded or failed.
    async fn deliver(&self, mut d: Delivery) {
        let Some(ep) = self.endpoints.get(&(d.agent.clone(), d.endpoint)).cloned() else {
            d.status = DeliveryStatus::Failed;
            d.next_attempt_at = None;
            d.last_error = Some("the endpoint is no longer configured".into());
            let snapshot = d.clone();
            self.persist(|| Write::Delivery(Box::new(snapshot.clone())))
                .await;
            return;
        };
        while d.status == DeliveryStatus::Pending {
            let mut off = ep.disabled.subscribe();
            if off.wait_for(|off| !*off).await.is_err() {
                return;
            }
            if let Some(at) = d.next_attempt_at {
                let now = now_ms();
                if at > now {
                    tokio::time::sleep(Duration::from_millis(at - now)).await;
                }
            }
            let admitted = ep
                .breaker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(now_ms());
            if let Err(until) = admitted {
                tokio::time::sleep(Duration::from_millis(until.saturating_sub(now_ms()))).await;
                continue;
            }
            let Ok(permit) = ep.slots.acquire().await else {
                return;
            };
            if *ep.disabled.borrow() {
                ep.breaker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .release();
                continue;
            }
            let started = Instant::now();
            let outcome = self.attempt(&ep, &d).await;
            drop(permit);
            let [agent, index] = &ep.label;
            self.metrics
                .notify
                .latency
                .with_label_values(&[agent, index])
                .observe(started.elapsed().as_secs_f64());
            let name = match &outcome {
                Outcome::Delivered => "delivered",
                Outcome::Failed { .. } => "failed",
                Outcome::Gone => "gone",
                Outcome::Refused(_) => "refused",
            };
            self.metrics
                .notify
                .deliveries
                .with_label_values(&[agent, index, name])
                .inc();
            {
                let mut breaker = ep.breaker.lock().unwrap_or_else(|e| e.into_inner());
                match &outcome {
                    Outcome::Delivered => breaker.record(true, now_ms()),
                    Outcome::Failed { .. } => breaker.record(false, now_ms()),
                    Outcome::Gone | Outcome::Refused(_) => breaker.release(),
                }
            }
            if outcome == Outcome::Gone {
                let (agent_id, endpoint) = (d.agent.clone(), d.endpoint);
                self.persist(|| Write::NotifyEndpoint {
                    agent: agent_id.clone(),
                    endpoint,
                    disabled: true,
                })
                .await;
                if !ep.disabled.send_replace(true) {
                    self.metrics.notify.disabled_endpoints.inc();
                }
                tracing::warn!(agent = %d.agent, endpoint = d.endpoint, "callback receiver answered 410 Gone; endpoint disabled until an admin re-enables it");
            }
            after_attempt(
                &mut d,
                outcome,
                &ep.setup.retry_schedule,
                now_ms(),
                random_unit(),
            );
            tracing::info!(
                agent = %d.agent,
                endpoint = d.endpoint,
                webhook_id = %d.webhook_id,
                status = status_name(d.status),
                attempts = d.attempts,
                last_error = d.last_error.as_deref().unwrap_or(""),
                "status callback attempt"
            );
            let snapshot = d.clone();
            self.persist(|| Write::Delivery(Box::new(snapshot.clone())))
                .await;
        }
    }

    /// One signed POST; classifies the answer.
    async fn attempt(&self, ep: &Endpoint, d: &Delivery) -> Outcome {
        let body = json!({
            "type": d.event.as_str(),
            "timestamp": rfc3339(d.created_at),
            "data": TaskRecord::at(&d.task, &self.public_url),
        });
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => return Outcome::Refused(format!("cannot render the body: {e}")),
        };
        let timestamp = (now_ms() / 1000).to_string();
        let signature = sign(&ep.setup.key, &d.webhook_id, &timestamp, &body);
        let sent = self
            .client
            .post(ep.setup.url.clone())
            .timeout(ep.setup.timeout)
            .header("content-type", "application/json")
            .header("user-agent", &self.user_agent)
            .header("webhook-id", &d.webhook_id)
            .header("webhook-timestamp", &timestamp)
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            // Without the URL: it may carry credentials, and last_error is shown to admins.
            Err(e) => return classify_error(&e.without_url()),
        };
        let status = resp.status();
        let retry_after = if status.as_u16() == 429 || status.as_u16() == 503 {
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after)
        } else {
            None
        };
        // Read (a bounded part of) the answer so the connection can be reused.
        let mut read = 0;
        while read <= MAX_RESPONSE_BYTES {
            match resp.chunk().await {
                Ok(Some(c)) => read += c.len(),
                _ => break,
            }
        }
        if status.is_success() {
            Outcome::Delivered
        } else if status.as_u16() == 410 {
            Outcome::Gone
        } else {
            Outcome::Failed {
                error: format!("the receiver answered {status}"),
                retry_after,
            }
        }
    }
}

/// A transport error: the SSRF refusal fails the delivery for good, anything else retries.
fn classify_error(e: &reqwest::Error) -> Outcome {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut text = Vec::new();
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Outcome::Refused(r.to_string());
        }
        text.push(s.to_string());
        source = s.source();
    }
    let what = if e.is_timeout() {
        "timed out".to_string()
    } else {
        text.join(": ")
    };
    if let Some(at) = text.iter().position(|t| t.starts_with("refused: ")) {
        return Outcome::Refused(text[at].clone());
    }
    Outcome::Failed {
        error: format!("no answer: {what}"),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let key = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
