//! Agent ownership when several nodes share the NATS store (SPEC section 11).
//!
//! Every node runs every agent actor, but an agent ticks only on the node holding its lease in
//! JetStream KV. A lease round runs every third of the lease: the owner renews (compare-and-set
//! on the lease's revision); the others try to create the key, which succeeds only once the
//! owner's key expired (the bucket's `max_age` is the lease), i.e. when the owner died or lost
//! its connection. The owner stops acting two thirds of a lease after its last successful renew
//! was sent, so it stops before anyone else can start.
//!
//! Winning a lease: the agent's state is adopted (its stored memory, tick counter and queue
//! cursor, rewritten to fence out the former owner), its retry timers are armed, and a feeder
//! reads the agent's queue from the stream, after the cursor, handing each runnable task to the
//! agent actor and waiting for its turn to end, so the cluster-wide order is the stream's order.
//! A task the former owner had STARTED is runnable again and starts with `attempt` + 1.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::agent::{Adopt, AgentHandle};
use crate::model::AgentId;
use crate::retry::RunRetry;
use crate::store::nats::{LeaseChange, NatsStore};

/// Writes of an agent waiting in the store's lane before its feeder hands it another task.
const FEED_AHEAD: u64 = 4;

/// Starts the lease rounds (and with them the feeders) for `agents` on the store's runtime.
/// They run until the process ends or [`NatsStore::close`].
pub fn start(store: Arc<NatsStore>, agents: Vec<AgentHandle>) {
    let rt = store.runtime().clone();
    rt.spawn(lease_loop(store, agents));
}

async fn lease_loop(store: Arc<NatsStore>, agents: Vec<AgentHandle>) {
    let every = (store.lease() / 3).max(Duration::from_millis(100));
    let mut feeders: HashMap<AgentId, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for handle in &agents {
            let id = &handle.spec.id;
            let change = store.lease_round(id).await;
            let running = feeders.get(id).is_some_and(|f| !f.is_finished());
            match change {
                Ok(LeaseChange::Won) => {
                    tracing::info!(agent = %id, node = store.node_id(), "took the agent's lease");
                    start_feeder(&store, handle, &mut feeders).await;
                }
                Ok(LeaseChange::Kept) if !running => {
                    start_feeder(&store, handle, &mut feeders).await;
                }
                Ok(LeaseChange::Kept) => {}
                Ok(LeaseChange::Lost | LeaseChange::Elsewhere) => stop_feeder(id, &mut feeders),
                Err(e) => {
                    tracing::warn!(agent = %id, error = %e, "lease round failed");
                    if !store.owns(id) {
                        stop_feeder(id, &mut feeders);
                    }
                }
            }
            if store.owns(id) {
                if let Err(e) = store.trim(id).await {
                    tracing::debug!(agent = %id, error = %e, "could not trim the agent's queue");
                }
            }
        }
        if let Err(e) = store.refresh_backlog().await {
            tracing::debug!(error = %e, "could not count the agents' backlogs");
        }
    }
}

fn stop_feeder(id: &AgentId, feeders: &mut HashMap<AgentId, tokio::task::JoinHandle<()>>) {
    if let Some(f) = feeders.remove(id) {
        f.abort();
    }
}

/// Adopts the agent's state and starts reading its queue; on failure the next lease round
/// tries again (the lease is kept meanwhile).
async fn start_feeder(
    store: &Arc<NatsStore>,
    handle: &AgentHandle,
    feeders: &mut HashMap<AgentId, tokio::task::JoinHandle<()>>,
) {
    let id = handle.spec.id.clone();
    stop_feeder(&id, feeders);
    let (state, cursor) = match store.adopt(&id).await {
        Ok(adopted) => adopted,
        Err(e) => {
            tracing::warn!(agent = %id, error = %e, "could not adopt the agent's state; trying again next round");
            return;
        }
    };
    let timers = store.retry_timers_of(&id).await.unwrap_or_else(|e| {
        tracing::warn!(agent = %id, error = %e, "could not read the agent's retry timers");
        Vec::new()
    });
    handle.addr.do_send(Adopt(state));
    crate::retry::hold_recovered(handle, &timers);
    for timer in timers {
        handle.retry.rearm(timer);
    }
    let feeder = store
        .runtime()
        .spawn(feed(store.clone(), handle.clone(), cursor + 1));
    feeders.insert(id, feeder);
}

/// Hands the agent its queue, in stream order, one turn at a time, while this node owns it.
async fn feed(store: Arc<NatsStore>, handle: AgentHandle, mut next: u64) {
    let id = handle.spec.id.clone();
    let mut backoff = Duration::from_millis(100);
    while store.owns(&id) {
        match store.queue_reader(&id, next).await {
            Ok(reader) => {
                let mut reader = std::pin::pin!(reader);
                while let Some(item) = reader.next().await {
                    if !store.owns(&id) {
                        return;
                    }
                    let (seq, task_id, first) = match item {
                        Ok(item) => item,
                        Err(e) => {
                            tracing::warn!(agent = %id, error = %e, "reading the agent's queue failed");
                            break;
                        }
                    };
                    let Some(task_id) = task_id else {
                        tracing::warn!(agent = %id, seq, "a message on the agent's queue names no task; passed over");
                        store.skipped(&id, seq);
                        next = seq + 1;
                        continue;
                    };
                    match store.runnable(&id, seq, task_id, first).await {
                        Ok(Some(task)) => {
                            // A few writes ahead of the store at most: the backlog stays in
                            // JetStream, not in this process.
                            store.writes_below(&id, FEED_AHEAD).await;
                            store.feeding(&id, seq);
                            let slot = handle.mailbox.force_reserve();
                            // Resolves when the agent's turn for this task is over.
                            let _ = handle.addr.send(RunRetry(Arc::new(task), slot)).await;
                        }
                        Ok(None) => store.skipped(&id, seq),
                        Err(e) => {
                            tracing::warn!(agent = %id, task_id = %task_id, error = %e, "could not read a queued task");
                            break;
                        }
                    }
                    next = seq + 1;
                    backoff = Duration::from_millis(100);
                }
            }
            Err(e) => tracing::warn!(agent = %id, error = %e, "cannot read the agent's queue"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
