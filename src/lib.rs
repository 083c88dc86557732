//! The tickgate service: configuration, the HTTP edge and ingress checks around the actors of
//! `tickgate-actors`. `main.rs` is only the command line.

pub mod app;
pub mod cli;
pub mod config;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod outbox_worker;
pub mod queue;
mod schedule;
