//! The `twophase` binary's library: configuration, the command line, and the clients that
//! producers, ops and tests use (publishing a transfer and waiting for its outcome).

pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod dlq;
pub mod invariants;

pub use config::Config;
