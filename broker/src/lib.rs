//! The govshare broker: routes supply-demand requests and data exchanges between government
//! department nodes over mutual TLS, with all state in its own storage log ([`kv`]).
//!
//! Domain modules (`registry`, `catalog`, `sharing`, `audit`) know nothing about tonic; the
//! `service` modules are thin gRPC wrappers over them, and `error` is the one place where
//! errors become gRPC statuses.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod error;
pub mod exchange;
pub mod federation;
pub mod http;
pub mod ids;
pub mod keys;
pub mod kv;
pub mod mask;
pub mod metrics;
pub mod pki;
pub mod registry;
pub mod serve;
pub mod server;
pub mod service;
pub mod sharing;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod tls;

pub use config::Config;
pub use error::BrokerError;
pub use server::{start, RunningBroker};
