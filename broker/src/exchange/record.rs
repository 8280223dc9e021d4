//! What the broker stores for an exchange: the envelope, where it stands, and its outcome.

use govshare_proto::v1::{ExchangeEnvelope, ExchangeResult, ExchangeState};

/// One exchange as kept in the `exchanges` tree until the consumer acknowledges its result.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredExchange {
    /// The exchange as accepted (consumer, provider, request, deadline, trail).
    #[prost(message, optional, tag = "1")]
    pub envelope: Option<ExchangeEnvelope>,
    /// Where it stands (`ExchangeState`).
    #[prost(enumeration = "ExchangeState", tag = "2")]
    pub state: i32,
    /// Deliveries tried so far.
    #[prost(uint32, tag = "3")]
    pub deliveries: u32,
    /// The outcome, once it has ended.
    #[prost(message, optional, tag = "4")]
    pub result: Option<ExchangeResult>,
    /// Its place in its destination's queue (from one counter of the broker's), while it has
    /// not ended: restarts queue it again in this order.
    #[prost(uint64, tag = "5")]
    pub queue_seq: u64,
    /// Its key in the `results` tree once it has ended.
    #[prost(uint64, tag = "6")]
    pub result_seq: u64,
    /// True for a `Request` (a caller waits on it) rather than a `Submit`.
    #[prost(bool, tag = "7")]
    pub sync: bool,
    /// The queue it waits in: the provider node (or, with federation, a next-hop broker).
    #[prost(string, tag = "8")]
    pub dest: String,
    /// Its encoded size, counted against the destination's byte bound.
    #[prost(uint64, tag = "9")]
    pub bytes: u64,
    /// The grant's purpose, passed to the provider.
    #[prost(string, tag = "10")]
    pub purpose: String,
}

impl StoredExchange {
    /// True once the exchange has ended (answered, failed, denied, expired, dead-lettered).
    pub fn finished(&self) -> bool {
        is_final(self.state())
    }
}

/// What releasing an exchange reads of its [`StoredExchange`]: the same tags, and only these
/// fields, so that decoding skips the request, the trail and the result's rows.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExchangeHead {
    /// The consumer, from the envelope.
    #[prost(message, optional, tag = "1")]
    pub envelope: Option<EnvelopeHead>,
    /// Where it stands (`ExchangeState`).
    #[prost(enumeration = "ExchangeState", tag = "2")]
    pub state: i32,
    /// Its key in the `results` tree once it has ended.
    #[prost(uint64, tag = "6")]
    pub result_seq: u64,
}

/// The consumer of an `ExchangeEnvelope` (its tag 2), read alone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvelopeHead {
    /// The consumer node.
    #[prost(string, tag = "2")]
    pub consumer: String,
}

impl ExchangeHead {
    /// The consumer node, or "" when the record names none.
    pub fn consumer(&self) -> &str {
        self.envelope.as_ref().map_or("", |e| e.consumer.as_str())
    }

    /// True once the exchange has ended.
    pub fn finished(&self) -> bool {
        is_final(self.state())
    }
}

/// What recovery reads of a queued exchange's [`StoredExchange`] (same tags): where it
/// stands, its queue and place in it, its dataset, deadline and size, without the request's
/// query, the trail or the grant's terms. At a million queued, decoding whole records was most
/// of a restart.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueuedHead {
    /// The dataset and deadline, from the envelope.
    #[prost(message, optional, tag = "1")]
    pub envelope: Option<QueuedEnvelope>,
    /// Where it stands (`ExchangeState`).
    #[prost(enumeration = "ExchangeState", tag = "2")]
    pub state: i32,
    /// Its place in the queue, from one counter of the broker's.
    #[prost(uint64, tag = "5")]
    pub queue_seq: u64,
    /// The queue it waits in.
    #[prost(string, tag = "8")]
    pub dest: String,
    /// Its encoded size, counted against the destination's byte bound.
    #[prost(uint64, tag = "9")]
    pub bytes: u64,
}

/// The request and deadline of an `ExchangeEnvelope` (its tags 4 and 9), read alone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueuedEnvelope {
    /// The request's dataset.
    #[prost(message, optional, tag = "4")]
    pub request: Option<QueuedRequest>,
    /// When the exchange expires.
    #[prost(message, optional, tag = "9")]
    pub deadline: Option<prost_types::Timestamp>,
}

/// The dataset of an `ExchangeRequest` (its tag 1), read alone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueuedRequest {
    /// The dataset asked for.
    #[prost(string, tag = "1")]
    pub dataset_id: String,
}

impl QueuedHead {
    /// True once the exchange has ended.
    pub fn finished(&self) -> bool {
        is_final(self.state())
    }

    /// The dataset, or "" when the record names none.
    pub fn dataset(&self) -> &str {
        self.envelope
            .as_ref()
            .and_then(|e| e.request.as_ref())
            .map_or("", |r| r.dataset_id.as_str())
    }
}

/// True for the states an exchange ends in.
pub fn is_final(s: ExchangeState) -> bool {
    matches!(
        s,
        ExchangeState::Answered
            | ExchangeState::Failed
            | ExchangeState::Denied
            | ExchangeState::Expired
            | ExchangeState::DeadLettered
    )
}

/// An idempotency key's first exchange.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DedupRecord {
    /// The exchange the key produced.
    #[prost(string, tag = "1")]
    pub exchange_id: String,
    /// When, Unix ms (the window runs from here).
    #[prost(int64, tag = "2")]
    pub at_ms: i64,
    /// For a hop mark: the exchange's deadline, Unix ms, set by the consumer's broker (0 in
    /// marks written before 2026-12-07). A resend can come until then, however long the
    /// deadline this broker would itself allow.
    #[prost(int64, tag = "3")]
    pub deadline_ms: i64,
}

/// The longest a hop mark is kept for its exchange's deadline, from when it was written: the
/// deadline comes from a peer, and marks with deadlines years away would never be swept.
/// (This broker's own longest deadline keeps a mark as long as it says, whatever this is.)
pub const HOP_MARK_DEADLINE_CAP_MS: i64 = 7 * 24 * 3_600_000;

/// The hop mark of exchange `id`, handled here at `now` (see [`hop_mark_key`]).
pub fn hop_mark(id: &str, now: i64, deadline_ms: i64) -> Vec<u8> {
    prost::Message::encode_to_vec(&DedupRecord {
        exchange_id: id.to_string(),
        at_ms: now,
        deadline_ms: deadline_ms.min(now.saturating_add(HOP_MARK_DEADLINE_CAP_MS)),
    })
}

/// The key of a hop mark in the `dedup` tree (`#hop ‖ 0 ‖ id`): an exchange id this broker
/// has already handled as a hop, so a frame sent again is not handled twice.
pub fn hop_mark_key(id: &str) -> Vec<u8> {
    crate::store::index_key("#hop", id)
}

/// What every [`hop_mark_key`] starts with.
pub const HOP_MARK_PREFIX: &[u8] = b"#hop\0";

/// The first key after every [`hop_mark_key`].
pub const HOP_MARKS_END: &[u8] = b"#hop\x01";

/// The first byte of a [`dedup_key`]: never the first byte of a node id (UTF-8 text) nor of a
/// hop mark (`#hop ‖ 0 ‖ id`), so such keys are told from both.
pub const DEDUP_HASHED: u8 = 0xFF;

/// The `dedup` tree's key for a consumer's idempotency key: [`DEDUP_HASHED`], then the first
/// 16 bytes of SHA-256 over consumer ‖ 0 ‖ key. Every exchange submitted with a key has one
/// for the whole window (a day by default), so its size counts: 17 bytes, where the joined
/// text (the key until 2026-11-29, see [`undigested_dedup_key`]) took about 50.
pub fn dedup_key(consumer: &str, key: &str) -> Vec<u8> {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(consumer.as_bytes())
        .chain_update([0])
        .chain_update(key.as_bytes())
        .finalize();
    let mut k = Vec::with_capacity(17);
    k.push(DEDUP_HASHED);
    k.extend_from_slice(&digest[..16]);
    k
}

/// For a `dedup` key in the form written until 2026-11-29 (consumer ‖ 0 ‖ idempotency key),
/// its [`dedup_key`]; None for a key already digested and for a hop mark.
pub fn undigested_dedup_key(k: &[u8]) -> Option<Vec<u8>> {
    if k.first() == Some(&DEDUP_HASHED) || k.starts_with(HOP_MARK_PREFIX) {
        return None;
    }
    let split = k.iter().position(|b| *b == 0)?;
    let consumer = std::str::from_utf8(&k[..split]).ok()?;
    let key = std::str::from_utf8(&k[split + 1..]).ok()?;
    Some(dedup_key(consumer, key))
}

/// A delivery in progress, as recorded in the `in_flight` tree.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InFlight {
    /// The delivery id given to the provider.
    #[prost(string, tag = "1")]
    pub delivery_id: String,
    /// The destination whose instance holds it.
    #[prost(string, tag = "2")]
    pub dest: String,
    /// The instance's label.
    #[prost(string, tag = "3")]
    pub instance: String,
    /// Which delivery this is.
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
    /// When it was handed over, Unix ms.
    #[prost(int64, tag = "5")]
    pub since_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The head reads the fields of a full record, whatever else the record holds.
    #[test]
    fn a_records_head_is_its_consumer_state_and_result_key() -> Result<(), prost::DecodeError> {
        let full = StoredExchange {
            envelope: Some(ExchangeEnvelope {
                exchange_id: "x".into(),
                consumer: "110000/mca".into(),
                provider: "120000/mca".into(),
                origin_broker: "000000/hub".into(),
                hops_left: 3,
                ..Default::default()
            }),
            state: ExchangeState::Answered as i32,
            deliveries: 2,
            result: Some(ExchangeResult {
                exchange_id: "x".into(),
                trace_id: "t".into(),
                ..Default::default()
            }),
            queue_seq: 7,
            result_seq: 42,
            sync: true,
            dest: "120000/mca".into(),
            bytes: 99,
            purpose: "p".into(),
        };
        let head = ExchangeHead::decode(full.encode_to_vec().as_slice())?;
        assert_eq!(head.consumer(), "110000/mca");
        assert_eq!(head.state(), ExchangeState::Answered);
        assert!(head.finished());
        assert_eq!(head.result_seq, 42);
        let queued = StoredExchange {
            state: ExchangeState::Queued as i32,
            envelope: None,
            ..full
        };
        let head = ExchangeHead::decode(queued.encode_to_vec().as_slice())?;
        assert_eq!(head.consumer(), "");
        assert!(!head.finished());
        Ok(())
    }

    /// Recovery's head reads the dataset, deadline, size and state of a full record.
    #[test]
    fn a_dedup_key_is_17_bytes_apart_for_every_consumer_and_key() {
        let k = dedup_key("330100/civil", "k1");
        assert_eq!((k.len(), k[0]), (17, DEDUP_HASHED));
        assert_eq!(k, dedup_key("330100/civil", "k1"));
        // The separator keeps ("a", "b\0c") apart from ("a\0b", "c") only if names hold no NUL,
        // which node ids never do; these differ in their bytes before it.
        for other in [
            dedup_key("330100/civil", "k2"),
            dedup_key("330100/civi", "lk1"),
            dedup_key("330200/civil", "k1"),
        ] {
            assert_ne!(k, other);
        }
        assert_eq!(undigested_dedup_key(b"330100/civil\0k1"), Some(k.clone()));
        assert_eq!(undigested_dedup_key(&k), None);
        assert_eq!(undigested_dedup_key(b"#hop\0some-exchange"), None);
        assert_eq!(undigested_dedup_key(b"no separator"), None);
    }

    // Recovery reads the keys outside the hop marks' range (see `digest_dedup_keys`), so every
    // mark must lie inside it, whatever the id, and no digested key may.
    #[test]
    fn hop_marks_lie_between_their_prefix_and_their_end() {
        for id in [
            "",
            "0",
            "01a22961-2cf5-71c5-a6a9-aaa425473559",
            "\u{10FFFF}",
        ] {
            let k = hop_mark_key(id);
            assert!(k.starts_with(HOP_MARK_PREFIX), "{k:?}");
            assert!(k.as_slice() < HOP_MARKS_END, "{k:?}");
        }
        assert!(dedup_key("a", "b").as_slice() > HOP_MARKS_END);
    }

    #[test]
    fn a_queued_records_head_is_its_queue_dataset_deadline_size_and_state(
    ) -> Result<(), prost::DecodeError> {
        let deadline = prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 5_000_000,
        };
        let full = StoredExchange {
            envelope: Some(ExchangeEnvelope {
                exchange_id: "x".into(),
                consumer: "110000/mca".into(),
                request: Some(govshare_proto::v1::ExchangeRequest {
                    dataset_id: "120000/mca/death-registration".into(),
                    grant_id: "g".into(),
                    idempotency_key: "k".into(),
                    ..Default::default()
                }),
                deadline: Some(deadline),
                ..Default::default()
            }),
            state: ExchangeState::InFlight as i32,
            deliveries: 1,
            queue_seq: 7,
            dest: "120000/mca".into(),
            bytes: 1234,
            ..Default::default()
        };
        let head = QueuedHead::decode(full.encode_to_vec().as_slice())?;
        assert_eq!(head.dataset(), "120000/mca/death-registration");
        assert_eq!(
            head.envelope.as_ref().and_then(|e| e.deadline),
            Some(deadline)
        );
        assert_eq!(head.bytes, 1234);
        assert_eq!((head.dest.as_str(), head.queue_seq), ("120000/mca", 7));
        assert!(!head.finished());
        let ended = StoredExchange {
            state: ExchangeState::Expired as i32,
            envelope: None,
            ..full
        };
        let head = QueuedHead::decode(ended.encode_to_vec().as_slice())?;
        assert!(head.finished());
        assert_eq!(head.dataset(), "");
        Ok(())
    }
}
