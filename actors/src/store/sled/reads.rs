//! The readers of the records without a file of their own: agent state, retry timers, schedule
//! cursors, await timers, callback deliveries and disabled endpoints. Each is a lookup or a scan
//! that the [`Store`](crate::store::Store) impl runs off the calling thread; their writes are
//! staged by `stage` and their keys are built in the parent module.

use super::{
    agent_state_key, backend, hex, outbox_key, schedule_key, Shared, AWAIT_TIMER, NOTIFY_OFF,
    OUTBOX, RETRY,
};
use crate::model::{AgentId, TaskId};
use crate::outbox::Delivery;
use crate::store::{
    AgentState, DeliveryQuery, RetryTimer, ScheduleCursor, ScheduleKey, StoreError,
};

pub(super) fn read_agent_state(shared: &Shared, agent: &AgentId) -> Result<AgentState, StoreError> {
    match shared.db()?.get(agent_state_key(agent)).map_err(backend)? {
        Some(raw) => shared.decode(|| format!("state of agent {agent}"), &raw),
        None => Ok(AgentState {
            memory: serde_json::json!({}),
            ticks: 0,
        }),
    }
}

pub(super) fn read_retry_timers(shared: &Shared) -> Result<Vec<RetryTimer>, StoreError> {
    let mut timers = Vec::new();
    for entry in shared.db()?.scan_prefix(RETRY) {
        let (k, agent) = entry.map_err(backend)?;
        let rest = &k[RETRY.len()..];
        let parsed = (rest.len() == 8 + 1 + 16)
            .then(|| {
                let due = u64::from_be_bytes(rest[..8].try_into().ok()?);
                let id = TaskId::from_bytes(rest[9..].try_into().ok()?);
                let agent: AgentId = std::str::from_utf8(&agent).ok()?.parse().ok()?;
                Some(RetryTimer {
                    due_ms: due,
                    task: id,
                    agent,
                })
            })
            .flatten();
        match parsed {
            Some(timer) => timers.push(timer),
            None => {
                let e = <serde_json::Error as serde::de::Error>::custom(
                    "a retry timer is a due time, a task id and an agent id",
                );
                shared.report_unreadable(format!("retry timer {}", hex(&k)), &e);
            }
        }
    }
    Ok(timers)
}

pub(super) fn read_schedule_cursor(
    shared: &Shared,
    k: &ScheduleKey,
) -> Result<Option<ScheduleCursor>, StoreError> {
    match shared.db()?.get(schedule_key(k)).map_err(backend)? {
        Some(raw) => shared
            .decode(|| format!("schedule cursor of agent {}", k.agent), &raw)
            .map(Some),
        None => Ok(None),
    }
}

pub(super) fn read_due_awaits(
    shared: &Shared,
    now_ms: u64,
    limit: usize,
) -> Result<Vec<(u64, TaskId)>, StoreError> {
    // Keys are `w/<8-byte expiry>\0<16-byte id>`; everything below `w/<now + 1>` is due.
    let mut end = AWAIT_TIMER.to_vec();
    end.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
    let mut due = Vec::new();
    for entry in shared.db()?.range(AWAIT_TIMER.to_vec()..end).take(limit) {
        let (k, id) = entry.map_err(backend)?;
        let at = k
            .get(AWAIT_TIMER.len()..AWAIT_TIMER.len() + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        match (at, <[u8; 16]>::try_from(id.as_ref())) {
            (Some(at), Ok(bytes)) => due.push((at, TaskId::from_bytes(bytes))),
            _ => {
                let e = <serde_json::Error as serde::de::Error>::custom(
                    "an await timer is an 8-byte time and a 16-byte task id",
                );
                shared.report_unreadable(format!("await timer {}", hex(&k)), &e);
            }
        }
    }
    Ok(due)
}

pub(super) fn read_deliveries(
    shared: &Shared,
    q: &DeliveryQuery,
) -> Result<Vec<Delivery>, StoreError> {
    let db = shared.db()?;
    let start = match q.after {
        Some(after) => outbox_key(after.saturating_add(1)),
        None => OUTBOX.to_vec(),
    };
    let mut out = Vec::new();
    if q.after == Some(u64::MAX) {
        return Ok(out);
    }
    for entry in db.range(start..) {
        if out.len() >= q.limit {
            break;
        }
        let (k, raw) = entry.map_err(backend)?;
        if !k.starts_with(OUTBOX) {
            break;
        }
        let Ok(d) = shared.decode::<Delivery>(|| format!("delivery {}", hex(&k)), &raw) else {
            continue;
        };
        if q.agent.as_ref().is_some_and(|a| *a != d.agent)
            || q.status.is_some_and(|s| s != d.status)
        {
            continue;
        }
        out.push(d);
    }
    Ok(out)
}

pub(super) fn read_delivery(shared: &Shared, id: u64) -> Result<Option<Delivery>, StoreError> {
    match shared.db()?.get(outbox_key(id)).map_err(backend)? {
        Some(raw) => shared.decode(|| format!("delivery {id}"), &raw).map(Some),
        None => Ok(None),
    }
}

pub(super) fn read_disabled_endpoints(
    shared: &Shared,
) -> Result<Vec<(AgentId, usize)>, StoreError> {
    let mut out = Vec::new();
    for entry in shared.db()?.scan_prefix(NOTIFY_OFF) {
        let (k, _) = entry.map_err(backend)?;
        let rest = &k[NOTIFY_OFF.len()..];
        if rest.len() < 9 {
            continue;
        }
        let (agent, index) = rest.split_at(rest.len() - 9);
        let Ok(index) = <[u8; 8]>::try_from(&index[1..]) else {
            continue;
        };
        if let Some(agent) = std::str::from_utf8(agent)
            .ok()
            .and_then(|a| a.parse::<AgentId>().ok())
        {
            out.push((agent, u64::from_be_bytes(index) as usize));
        }
    }
    Ok(out)
}
