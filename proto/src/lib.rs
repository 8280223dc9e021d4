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

/// The bytes a `HopReceipt`'s signature covers: exchange id, broker, decision (each
/// NUL-terminated), hop and time in Unix ms (fixed width), so that no two receipts share an
/// encoding. Brokers sign these bytes and clients verify them; both must agree exactly.
pub fn receipt_bytes(exchange_id: &str, r: &v1::HopReceipt) -> Vec<u8> {
    let at_ms =
        r.at.as_ref()
            .map(|t| {
                t.seconds
                    .saturating_mul(1000)
                    .saturating_add(i64::from(t.nanos) / 1_000_000)
            })
            .unwrap_or(0);
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(b"govshare.v1.HopReceipt\0");
    for part in [exchange_id, r.broker.as_str(), r.decision.as_str()] {
        b.extend_from_slice(part.as_bytes());
        b.push(0);
    }
    b.extend_from_slice(&r.hop.to_be_bytes());
    b.extend_from_slice(&at_ms.to_be_bytes());
    b
}
