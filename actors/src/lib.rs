//! tickgate's domain, free of HTTP: agents as supervised actors, the token registry, the
//! runners that execute ticks, and the durable store. The `tickgate` binary wraps it in an
//! HTTP edge; anything here can be driven directly from tests or another front end.

pub mod agent;
pub mod awaiting;
pub mod breaker;
pub mod cluster;
pub mod events;
pub mod intake;
pub mod model;
pub mod outbox;
pub mod registry;
pub mod retry;
pub mod runner;
pub mod schedule;
pub mod store;
mod text;
pub mod token;
