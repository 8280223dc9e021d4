//! govshare's gRPC API, package `govshare.v1`, generated from the `.proto` files in this crate.
//!
//! The `.proto` files are the contract for every language; this crate is the Rust view of them.
#![forbid(unsafe_code)]

/// Messages, enums, clients and servers of package `govshare.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("govshare.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("govshare_descriptor");

pub use v1::*;
