//! Maps webhook tokens to agents. The registry actor owns the digest → agent map and is its only
//! writer (start-up, rotation, one at a time through its mailbox); it publishes the map as a
//! [`TokenIndex`] that the HTTP edge reads on every trigger without a message round trip.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use actix::prelude::*;
use subtle::ConstantTimeEq;

use crate::agent::AgentHandle;
use crate::model::AgentId;
use crate::store::{write_async, write_blocking, Store, StoreError, Write};
use crate::token;

/// Why a token could not be resolved on the `{namespace}/{agent}/{token}` route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No such agent (404).
    #[error("unknown agent")]
    UnknownAgent,
    /// The agent exists but the token is not its token (401).
    #[error("wrong token for this agent")]
    WrongToken,
}

/// Why a rotation did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RotateError {
    /// No such agent.
    #[error("unknown agent {0}")]
    UnknownAgent(AgentId),
    /// The token comes from `token_env`; rotating it means changing that variable.
    #[error("the token of {0} is pinned by token_env; change the variable to rotate it")]
    Pinned(AgentId),
    /// The agent is scheduled-only (`webhook.enabled = false`): it has no token to rotate.
    #[error("{0} has no webhook (webhook.enabled = false)")]
    NoWebhook(AgentId),
    /// The new token could not be stored; the old one still works.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A token created during start-up, to be printed once.
pub struct NewToken {
    /// Whose token.
    pub agent: AgentId,
    /// The token itself; shown once and then forgotten.
    pub token: String,
}

/// The outcome of [`bootstrap_tokens`].
pub struct Tokens {
    /// Every agent's current token digest.
    pub digests: HashMap<AgentId, [u8; 32]>,
    /// Tokens created just now, to be printed once.
    pub created: Vec<NewToken>,
}

/// Decides each agent's token digest at start-up: the pinned one from `token_env`, else the
/// stored one, else a fresh token that is stored and returned so that it can be printed once.
pub fn bootstrap_tokens(
    store: &dyn Store,
    agents: &[AgentId],
    pinned: &BTreeMap<AgentId, String>,
) -> Result<Tokens, StoreError> {
    let mut digests = HashMap::new();
    let mut created = Vec::new();
    // New tokens are written together and waited for once, so a first start with thousands of
    // agents costs a few group commits rather than one flush per agent.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for agent in agents {
        let digest = if let Some(token) = pinned.get(agent) {
            token::digest(token)
        } else if let Some(stored) = store.token_digest(agent)? {
            stored
        } else {
            let token = token::generate();
            let digest = token::digest(&token);
            let done_tx = done_tx.clone();
            store.write(
                Write::SetToken {
                    agent: agent.clone(),
                    digest,
                },
                Box::new(move |res| {
                    let _ = done_tx.send(res);
                }),
            );
            created.push(NewToken {
                agent: agent.clone(),
                token,
            });
            digest
        };
        digests.insert(agent.clone(), digest);
    }
    drop(done_tx);
    for _ in 0..created.len() {
        done_rx.recv().unwrap_or(Err(StoreError::Closed))?;
    }
    Ok(Tokens { digests, created })
}

/// Rotates a token directly on a store no server holds (the CLI's offline path).
pub fn rotate_offline(store: &dyn Store, agent: &AgentId) -> Result<String, StoreError> {
    let token = token::generate();
    write_blocking(
        store,
        Write::SetToken {
            agent: agent.clone(),
            digest: token::digest(&token),
        },
    )?;
    Ok(token)
}

/// The token → agent map. The registry actor is its only writer (rotation); HTTP workers read it
/// directly, because a lookup happens on every trigger and a round trip through one actor would
/// put every request behind one thread. The lock is never held across an await.
pub struct TokenIndex {
    tokens: RwLock<Digests>,
    agents: BTreeMap<AgentId, AgentHandle>,
}

#[derive(Default)]
struct Digests {
    by_digest: foldhash::HashMap<[u8; 32], AgentId>,
    of_agent: foldhash::HashMap<AgentId, [u8; 32]>,
}

impl TokenIndex {
    /// Finds the agent a token digest belongs to (the `/webhooks/{token}` form).
    pub fn resolve(&self, digest: &[u8; 32]) -> Option<AgentHandle> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let agent = tokens.by_digest.get(digest)?;
        self.agents.get(agent).cloned()
    }

    /// Checks a token digest against one named agent, telling an unknown agent (404) from a
    /// wrong token (401); the comparison is constant-time.
    pub fn resolve_for(
        &self,
        agent: &AgentId,
        digest: &[u8; 32],
    ) -> Result<AgentHandle, ResolveError> {
        let handle = self.agents.get(agent).ok_or(ResolveError::UnknownAgent)?;
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        // An agent without a token has no webhook (`webhook.enabled = false`): as far as
        // webhook routes are concerned it does not exist.
        let expected = tokens
            .of_agent
            .get(agent)
            .ok_or(ResolveError::UnknownAgent)?;
        if bool::from(expected.ct_eq(digest)) {
            Ok(handle.clone())
        } else {
            Err(ResolveError::WrongToken)
        }
    }

    fn replace(&self, agent: AgentId, digest: [u8; 32]) {
        let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = tokens.of_agent.insert(agent.clone(), digest) {
            tokens.by_digest.remove(&old);
        }
        tokens.by_digest.insert(digest, agent);
    }
}

/// The registry actor.
pub struct Registry {
    index: Arc<TokenIndex>,
    pinned: HashSet<AgentId>,
    store: Arc<dyn Store>,
    no_webhook: HashSet<AgentId>,
}

impl Registry {
    /// Builds the registry from the agents and the digests [`bootstrap_tokens`] settled on.
    pub fn new(
        agents: Vec<AgentHandle>,
        digests: HashMap<AgentId, [u8; 32]>,
        pinned: HashSet<AgentId>,
        store: Arc<dyn Store>,
    ) -> Self {
        let tokens = Digests {
            by_digest: digests.iter().map(|(a, d)| (*d, a.clone())).collect(),
            of_agent: digests.into_iter().collect(),
        };
        Self {
            index: Arc::new(TokenIndex {
                tokens: RwLock::new(tokens),
                agents: agents.into_iter().map(|h| (h.spec.id.clone(), h)).collect(),
            }),
            pinned,
            store,
            no_webhook: HashSet::new(),
        }
    }

    /// Marks agents that have no webhook (`webhook.enabled = false`): they get no digest from
    /// [`bootstrap_tokens`] and a rotation must not give them one.
    pub fn without_webhook(mut self, agents: HashSet<AgentId>) -> Self {
        self.no_webhook = agents;
        self
    }

    /// The read side of the token map, for the HTTP edge's per-request lookups.
    pub fn index(&self) -> Arc<TokenIndex> {
        self.index.clone()
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

/// Looks an agent up by id, for admin and readiness routes.
#[derive(Message)]
#[rtype(result = "Option<AgentHandle>")]
pub struct Find(pub AgentId);

impl Handler<Find> for Registry {
    type Result = Option<AgentHandle>;
    fn handle(&mut self, Find(id): Find, _: &mut Context<Self>) -> Self::Result {
        self.index.agents.get(&id).cloned()
    }
}

/// Every agent, in id order.
#[derive(Message)]
#[rtype(result = "Vec<AgentHandle>")]
pub struct List;

impl Handler<List> for Registry {
    type Result = Vec<AgentHandle>;
    fn handle(&mut self, _: List, _: &mut Context<Self>) -> Self::Result {
        self.index.agents.values().cloned().collect()
    }
}

/// Replaces an agent's token; the old one stops working as soon as the new one is durable.
/// Answers with the new token, which the caller shows once.
#[derive(Message)]
#[rtype(result = "Result<String, RotateError>")]
pub struct Rotate(pub AgentId);

impl Handler<Rotate> for Registry {
    type Result = AtomicResponse<Self, Result<String, RotateError>>;

    fn handle(&mut self, Rotate(agent): Rotate, _: &mut Context<Self>) -> Self::Result {
        if !self.index.agents.contains_key(&agent) {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(
                RotateError::UnknownAgent(agent),
            ))));
        }
        if self.no_webhook.contains(&agent) {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(RotateError::NoWebhook(
                agent,
            )))));
        }
        if self.pinned.contains(&agent) {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(RotateError::Pinned(
                agent,
            )))));
        }
        let token = token::generate();
        let digest = token::digest(&token);
        let store = self.store.clone();
        let write = Write::SetToken {
            agent: agent.clone(),
            digest,
        };
        AtomicResponse::new(Box::pin(
            async move { write_async(store.as_ref(), write).await }
                .into_actor(self)
                .map(move |res, registry, _| {
                    res?;
                    registry.index.replace(agent, digest);
                    Ok(token)
                }),
        ))
    }
}
