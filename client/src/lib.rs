//! govshare's Rust SDK for department systems: a typed async client of the broker's gRPC API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), govshare_client::ClientError> {
//! use govshare_client::{Client, ClientConfig};
//!
//! let client = Client::connect(ClientConfig::new("/etc/govshare/identity")).await?;
//! let me = client.whoami().await?;
//! println!("I am {}", me.node_id);
//! # Ok(()) }
//! ```
//!
//! Every unary call carries the configured deadline and is retried on `UNAVAILABLE` with
//! exponential backoff; streams (`watch`, `serve`) carry no deadline. Messages are the
//! generated ones of [`govshare_proto::v1`], re-exported here as [`proto`].
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod catalog_file;
mod client;
mod config;
pub mod enums;
mod error;
mod identity;
pub mod provider;
#[cfg(test)]
mod tls_tests;
pub mod trail;

pub use client::{install_crypto_provider, Client, MAX_DECODING_MESSAGE_SIZE};
pub use config::{
    ClientConfig, DEFAULT_BROKER_URL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RETRIES, DEFAULT_TIMEOUT,
};
pub use enums::ProtoEnum;
pub use error::{code_name, code_name_i32, status_message, ClientError, Result};
pub use identity::{Identity, CA_FILE, CERT_FILE, KEY_FILE};

/// The generated messages and clients of package `govshare.v1`.
pub use govshare_proto::v1 as proto;
