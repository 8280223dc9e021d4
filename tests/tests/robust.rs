//! Robustness: random well-formed and malformed protobuf messages sent to every RPC the broker
//! serves, by every kind of caller, each call answered with a gRPC status (or a response), and
//! the broker healthy afterwards.
//!
//! The methods are enumerated from the API's `FileDescriptorSet` (plus the standard health and
//! reflection services), never listed by hand, so a new RPC is fuzzed as soon as it exists. The
//! messages travel as raw bytes through a pass-through codec: malformed ones (random bytes,
//! truncated varints, invalid wire types, lengths past the end, deep nesting, invalid UTF-8 in
//! string fields, ...) and well-formed ones generated from each method's input descriptor with
//! random values. The callers are a registered department, the admin, a CA-signed but
//! unregistered node, and a child-broker link identity.
//!
//! Failures: a unary call that does not answer (or, outside `Request`/`Get`, runs into its
//! deadline), a status that reports a panic or a dropped call or connection, a well-formed
//! message answered `INTERNAL`/`UNKNOWN`, any panic in this process (the broker's tasks run
//! here), or a failed health check (health `SERVING`, `WhoAmI` on the old and on a new
//! connection) after a method's batch. A failed call is replayed alone on a fresh connection: if
//! it passes alone it is reported as collateral damage of another call in its batch.
//!
//! `GOVSHARE_ROBUST_SEED=N` replays a run (the seed is printed); `GOVSHARE_ROBUST_CASES=N`
//! sets the messages per method per caller (default 32); `GOVSHARE_ROBUST_METHOD=TEXT` fuzzes
//! only the methods whose path contains TEXT (with the same messages as a full run);
//! `GOVSHARE_ROBUST_VERBOSE=1` prints every call's outcome.

use anyhow::{bail, ensure, Context, Result};
use govshare_client::proto::{self as pb, provider_message, NodeRole, ProviderMessage, ServeHello};
use govshare_client::Client;
use govshare_tests::TestBroker;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, RngCore, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A unary call (unary response) must answer within this, or it hung.
const UNARY_TIMEOUT: Duration = Duration::from_secs(5);
/// The `grpc-timeout` most calls carry, as a real client's would.
const CALL_DEADLINE: Duration = Duration::from_secs(3);
/// How long a streaming response is read before the test leaves it open and drops it.
const STREAM_WINDOW: Duration = Duration::from_millis(1500);
/// Calls in flight at once.
const CONCURRENCY: usize = 48;
/// Nesting depth of generated well-formed messages.
const MAX_DEPTH: u32 = 5;
/// Rough byte budget of one generated message.
const MESSAGE_BUDGET: usize = 96 * 1024;

/// The department node that calls (and provides a dataset).
const DEPT: &str = "330100/civil";
/// Its dataset.
const DATASET: &str = "330100/civil/marriage";
/// The unregistered (but CA-signed) node.
const GHOST: &str = "330000/ghost";
/// The child broker's link identity.
const CHILD: &str = "330100/city";
/// The only methods that may legitimately hold a unary call until its deadline.
const WAITING_METHODS: &[&str] = &[
    "/govshare.v1.ExchangeService/Request",
    "/govshare.v1.ExchangeService/Get",
];

// ---- panics anywhere in the process ------------------------------------------------------------

/// Every panic seen in this process (the broker's tasks run in it).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or("<unnamed>")
            .to_string();
        PANICS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("thread {thread}: {info}"));
        previous(info);
    }));
}

fn panics() -> Vec<String> {
    PANICS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// ---- a pass-through codec ----------------------------------------------------------------------

/// Sends and receives message bodies as they are, without protobuf encoding.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

// ---- the schema --------------------------------------------------------------------------------

/// One RPC, from the descriptors.
#[derive(Debug, Clone)]
struct Method {
    /// `/package.Service/Method`.
    path: String,
    /// The same, as the request's `:path`.
    uri: PathAndQuery,
    /// The input message's fully qualified name (`.package.Message`).
    input: String,
    client_streaming: bool,
    server_streaming: bool,
}

/// Messages, enums and methods of a few `FileDescriptorSet`s, by fully qualified name.
#[derive(Debug, Default)]
struct Schema {
    messages: HashMap<String, DescriptorProto>,
    enums: HashMap<String, Vec<i32>>,
    methods: BTreeMap<String, Method>,
}

impl Schema {
    fn load(sets: &[&[u8]]) -> Result<Self> {
        let mut s = Schema::default();
        for raw in sets {
            let fds = FileDescriptorSet::decode(*raw).context("decoding a FileDescriptorSet")?;
            for file in fds.file {
                let scope = match file.package() {
                    "" => String::new(),
                    p => format!(".{p}"),
                };
                for m in &file.message_type {
                    s.add_message(&scope, m);
                }
                for e in &file.enum_type {
                    s.add_enum(&scope, e);
                }
                for svc in &file.service {
                    for m in &svc.method {
                        let path = format!("/{}.{}/{}", file.package(), svc.name(), m.name());
                        let uri = PathAndQuery::try_from(path.as_str())
                            .with_context(|| format!("method path {path}"))?;
                        s.methods.insert(
                            path.clone(),
                            Method {
                                path,
                                uri,
                                input: m.input_type().to_string(),
                                client_streaming: m.client_streaming(),
                                server_streaming: m.server_streaming(),
                            },
                        );
                    }
                }
            }
        }
        Ok(s)
    }

    fn add_message(&mut self, scope: &str, m: &DescriptorProto) {
        let name = format!("{scope}.{}", m.name());
        for nested in &m.nested_type {
            self.add_message(&name, nested);
        }
        for e in &m.enum_type {
            self.add_enum(&name, e);
        }
        self.messages.insert(name, m.clone());
    }

    fn add_enum(&mut self, scope: &str, e: &EnumDescriptorProto) {
        let values = e.value.iter().map(|v| v.number()).collect();
        self.enums.insert(format!("{scope}.{}", e.name()), values);
    }

    /// Type names that fields refer to but no descriptor defines.
    fn unresolved(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for m in self.messages.values() {
            for f in &m.field {
                let known = match f.r#type() {
                    Type::Message | Type::Group => self.messages.contains_key(f.type_name()),
                    Type::Enum => self.enums.contains_key(f.type_name()),
                    _ => true,
                };
                if !known {
                    missing.push(f.type_name().to_string());
                }
            }
        }
        for m in self.methods.values() {
            if !self.messages.contains_key(&m.input) {
                missing.push(m.input.clone());
            }
        }
        missing.sort();
        missing.dedup();
        missing
    }
}

// ---- wire format -------------------------------------------------------------------------------

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_len(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    put_tag(out, field, LEN);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

fn number(f: &FieldDescriptorProto) -> u32 {
    u32::try_from(f.number()).unwrap_or(1)
}

// ---- random values -----------------------------------------------------------------------------

/// Strings that mean something to the broker, so that random messages get past the first checks;
/// the first 10 are well-formed node and dataset ids.
const MEANINGFUL: &[&str] = &[
    DEPT,
    DATASET,
    GHOST,
    CHILD,
    "330000/hub",
    "330000/admin",
    "330102/nobody",
    "330100/civil/nosuch",
    "110000/broker",
    "000000/broker",
    "govshare.v1",
    "govshare.v1.ExchangeService",
    "grpc.health.v1.Health",
    "id_number",
    "status",
    "marriage",
    "CONDITIONAL",
    "SHARE_TYPE_CONDITIONAL",
    "33",
    "3301",
    "4bf92f3577b34da6a3ce929d0e0e4736",
    "",
    "/",
    "//",
    "a/b/c",
    "330000/",
    "/330000",
    "330100/civil/",
    "../../etc/passwd",
    "%s%n%x",
    "'; DROP TABLE nodes; --",
    "死亡登记信息",
    "婚姻登记信息 🙂",
    "\u{202e}evil\u{202c}",
    "nul\0inside",
    "line\nbreak\r\n",
    "\u{feff}bom",
    "e\u{301}\u{301}\u{301}",
];

fn random_int(rng: &mut StdRng) -> i64 {
    match rng.random_range(0..12) {
        0 => 0,
        1 => 1,
        2 => -1,
        3 => i64::from(i32::MIN),
        4 => i64::from(i32::MAX),
        5 => i64::MIN,
        6 => i64::MAX,
        7 => i64::from(u32::MAX),
        8 => rng.random_range(-1000..1000),
        9 => rng.random_range(0..20),
        10 => 86_400 * 365 * 10_000,
        _ => rng.random(),
    }
}

fn random_char(rng: &mut StdRng) -> char {
    loop {
        let c = match rng.random_range(0..4) {
            0 => rng.random_range(0x20..0x7f),
            1 => rng.random_range(0..0x20),
            2 => rng.random_range(0x4e00..0x9fff),
            _ => rng.random_range(0..=0x10ffff),
        };
        if let Some(c) = char::from_u32(c) {
            return c;
        }
    }
}

/// The callers' certificates (PEM), for fields that take one (`PinCertificate`).
static PEMS: OnceLock<Vec<String>> = OnceLock::new();

/// One of the callers' certificates, often damaged: cut short, a base64 character changed, or
/// the lines shuffled.
fn random_pem(rng: &mut StdRng) -> String {
    let Some(pem) = PEMS.get().and_then(|p| p.choose(rng)) else {
        return String::new();
    };
    let mut pem = pem.clone();
    match rng.random_range(0..4) {
        0 => {}
        1 => {
            let mut cut = rng.random_range(0..=pem.len());
            while !pem.is_char_boundary(cut) {
                cut -= 1;
            }
            pem.truncate(cut);
        }
        2 => {
            let mut bytes = pem.into_bytes();
            if !bytes.is_empty() {
                let i = rng.random_range(0..bytes.len());
                if bytes[i].is_ascii_alphanumeric() {
                    bytes[i] = *b"ABCxyz019+/".choose(rng).unwrap_or(&b'A');
                }
            }
            pem = String::from_utf8_lossy(&bytes).into_owned();
        }
        _ => {
            let mut lines: Vec<&str> = pem.lines().collect();
            lines.shuffle(rng);
            pem = lines.join("\n");
        }
    }
    pem
}

fn random_string(rng: &mut StdRng, field_name: &str, budget: &mut usize) -> String {
    let idish = field_name.contains("id") || field_name.contains("provider");
    if field_name.contains("pem") && rng.random_bool(0.7) {
        return random_pem(rng);
    }
    if idish && rng.random_bool(0.4) {
        // A well-formed id, to get past syntax checks to the lookups behind them.
        return (*MEANINGFUL[..10].choose(rng).unwrap_or(&DEPT)).to_string();
    }
    let s = match rng.random_range(0..10) {
        0..=3 => (*MEANINGFUL.choose(rng).unwrap_or(&"")).to_string(),
        4 if idish => format!(
            "{}/{}",
            rng.random_range(100_000..999_999),
            random_ascii(rng, 1..12)
        ),
        5 => format!(
            "{DEPT}/{}",
            random_ascii(rng, 0..20) // a plausible dataset id
        ),
        6 if rng.random_bool(0.2) && *budget > 40_000 => {
            // huge-ish
            let n = rng.random_range(4_000..32_000);
            let c = random_char(rng);
            std::iter::repeat_n(c, n).collect()
        }
        _ => {
            let n = rng.random_range(0..64);
            (0..n).map(|_| random_char(rng)).collect()
        }
    };
    *budget = budget.saturating_sub(s.len());
    s
}

fn random_ascii(rng: &mut StdRng, len: std::ops::Range<usize>) -> String {
    let n = rng.random_range(len);
    (0..n)
        .map(|_| {
            *b"abcdefghijklmnopqrstuvwxyz0123456789_-"
                .choose(rng)
                .unwrap_or(&b'a') as char
        })
        .collect()
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let mut b = vec![0u8; rng.random_range(0..=max)];
    rng.fill_bytes(&mut b);
    b
}

fn random_f64(rng: &mut StdRng) -> f64 {
    match rng.random_range(0..6) {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => f64::NEG_INFINITY,
        3 => -0.0,
        4 => f64::from_bits(rng.random()),
        _ => rng.random_range(-1e9..1e9),
    }
}

// ---- well-formed messages ----------------------------------------------------------------------

/// Encodes one scalar value of field `f`: (wire type, bytes after the tag).
fn scalar(
    rng: &mut StdRng,
    schema: &Schema,
    f: &FieldDescriptorProto,
    budget: &mut usize,
) -> (u8, Vec<u8>) {
    let mut v = Vec::new();
    let wire = match f.r#type() {
        Type::Double => {
            v.extend_from_slice(&random_f64(rng).to_le_bytes());
            FIXED64
        }
        Type::Float => {
            v.extend_from_slice(&(random_f64(rng) as f32).to_le_bytes());
            FIXED32
        }
        Type::Int64 | Type::Uint64 | Type::Int32 | Type::Uint32 => {
            put_varint(&mut v, random_int(rng) as u64);
            VARINT
        }
        Type::Sint32 | Type::Sint64 => {
            let n = random_int(rng);
            put_varint(&mut v, ((n << 1) ^ (n >> 63)) as u64);
            VARINT
        }
        Type::Bool => {
            put_varint(&mut v, *[0u64, 1, 1, 2, u64::MAX].choose(rng).unwrap_or(&1));
            VARINT
        }
        Type::Enum => {
            let known = schema.enums.get(f.type_name());
            let n = match known.and_then(|k| k.choose(rng)) {
                Some(n) if rng.random_bool(0.75) => i64::from(*n),
                _ => *[-1, -7, 99, 1000, i64::from(i32::MAX), i64::from(i32::MIN)]
                    .choose(rng)
                    .unwrap_or(&-1),
            };
            put_varint(&mut v, n as u64);
            VARINT
        }
        Type::Fixed32 | Type::Sfixed32 => {
            v.extend_from_slice(&(random_int(rng) as u32).to_le_bytes());
            FIXED32
        }
        Type::Fixed64 | Type::Sfixed64 => {
            v.extend_from_slice(&(random_int(rng) as u64).to_le_bytes());
            FIXED64
        }
        Type::String => {
            let s = random_string(rng, f.name(), budget);
            put_varint(&mut v, s.len() as u64);
            v.extend_from_slice(s.as_bytes());
            LEN
        }
        Type::Bytes => {
            let b = random_bytes(rng, 300);
            put_varint(&mut v, b.len() as u64);
            v.extend_from_slice(&b);
            LEN
        }
        Type::Message | Type::Group => {
            // Handled by the caller; an empty message is a fine stand-in.
            put_varint(&mut v, 0);
            LEN
        }
    };
    (wire, v)
}

/// A valid encoding of message `ty` with random values in a random subset of its fields.
fn well_formed(
    rng: &mut StdRng,
    schema: &Schema,
    ty: &str,
    depth: u32,
    budget: &mut usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(desc) = schema.messages.get(ty) else {
        // Not in the descriptors (never expected; see `unresolved`): a Timestamp-shaped body.
        put_tag(&mut out, 1, VARINT);
        put_varint(&mut out, random_int(rng) as u64);
        return out;
    };
    let mut fields: Vec<&FieldDescriptorProto> = desc.field.iter().collect();
    fields.shuffle(rng);
    let density = rng.random_range(0.2..1.0);
    let mut oneofs = HashSet::new();
    for f in fields {
        if *budget == 0 || !rng.random_bool(density) {
            continue;
        }
        if let Some(o) = f.oneof_index {
            // Usually one member per oneof; sometimes several (valid: the last wins).
            if !oneofs.insert(o) && rng.random_bool(0.9) {
                continue;
            }
        }
        let repeated = f.label() == Label::Repeated;
        let count = if repeated { rng.random_range(0..=5) } else { 1 };
        match f.r#type() {
            Type::Message | Type::Group => {
                if depth >= MAX_DEPTH {
                    continue;
                }
                for _ in 0..count {
                    let inner = well_formed(rng, schema, f.type_name(), depth + 1, budget);
                    put_len(&mut out, number(f), &inner);
                }
            }
            Type::String | Type::Bytes => {
                for _ in 0..count {
                    let (_, v) = scalar(rng, schema, f, budget);
                    put_tag(&mut out, number(f), LEN);
                    out.extend_from_slice(&v);
                }
            }
            _ if repeated && rng.random_bool(0.5) => {
                // Packed (proto3's default); parsers must accept both forms.
                let mut packed = Vec::new();
                for _ in 0..count {
                    packed.extend_from_slice(&scalar(rng, schema, f, budget).1);
                }
                put_len(&mut out, number(f), &packed);
            }
            _ => {
                for _ in 0..count {
                    let (wire, v) = scalar(rng, schema, f, budget);
                    put_tag(&mut out, number(f), wire);
                    out.extend_from_slice(&v);
                }
            }
        }
        *budget = budget.saturating_sub(16);
    }
    if rng.random_bool(0.05) {
        // An unknown field: must be skipped.
        put_tag(&mut out, rng.random_range(1000..5000), VARINT);
        put_varint(&mut out, rng.random());
    }
    out
}

// ---- malformed messages ------------------------------------------------------------------------

/// A random path of field numbers from `ty` down to a string field.
fn string_path(rng: &mut StdRng, schema: &Schema, ty: &str, depth: u32) -> Option<Vec<u32>> {
    let desc = schema.messages.get(ty)?;
    let strings: Vec<u32> = desc
        .field
        .iter()
        .filter(|f| f.r#type() == Type::String)
        .map(number)
        .collect();
    if !strings.is_empty() && (depth >= 4 || rng.random_bool(0.5)) {
        return strings.choose(rng).map(|n| vec![*n]);
    }
    let mut messages: Vec<&FieldDescriptorProto> = desc
        .field
        .iter()
        .filter(|f| f.r#type() == Type::Message)
        .collect();
    messages.shuffle(rng);
    if depth < 6 {
        for f in messages {
            if let Some(mut p) = string_path(rng, schema, f.type_name(), depth + 1) {
                p.insert(0, number(f));
                return Some(p);
            }
        }
    }
    strings.choose(rng).map(|n| vec![*n])
}

/// Wraps `inner` in length-delimited fields along `path` (outermost first).
fn wrap(path: &[u32], mut inner: Vec<u8>) -> Vec<u8> {
    for f in path.iter().rev() {
        let mut o = Vec::new();
        put_len(&mut o, *f, &inner);
        inner = o;
    }
    inner
}

fn random_field(rng: &mut StdRng, schema: &Schema, ty: &str) -> (u32, Type) {
    schema
        .messages
        .get(ty)
        .and_then(|d| d.field.choose(rng))
        .map(|f| (number(f), f.r#type()))
        .unwrap_or((1, Type::String))
}

/// A malformed (or at least hostile) body for message `ty`, and what kind it is.
fn malformed(rng: &mut StdRng, schema: &Schema, ty: &str) -> (&'static str, Vec<u8>) {
    let mut budget = MESSAGE_BUDGET / 4;
    let prefix = if rng.random_bool(0.5) {
        well_formed(rng, schema, ty, 0, &mut budget)
    } else {
        Vec::new()
    };
    let mut out = prefix.clone();
    let (field, kind) = random_field(rng, schema, ty);
    let label = match rng.random_range(0..16) {
        0 => {
            out.clear();
            "empty"
        }
        1 => {
            out = random_bytes(rng, 2048);
            "random-bytes"
        }
        2 => {
            put_tag(&mut out, field, VARINT);
            out.extend(std::iter::repeat_n(0xff, rng.random_range(1..9)));
            "truncated-varint"
        }
        3 => {
            put_tag(&mut out, field, *[3u8, 4, 6, 7].choose(rng).unwrap_or(&6));
            out.extend_from_slice(&random_bytes(rng, 16));
            "invalid-wire-type"
        }
        4 => {
            let body = random_bytes(rng, 64);
            put_tag(&mut out, field, LEN);
            put_varint(&mut out, body.len() as u64 + rng.random_range(1..100_000));
            out.extend_from_slice(&body);
            "length-past-end"
        }
        5 => {
            // Follow message fields as deep as the schema goes, then nest garbage further.
            let depth = rng.random_range(50..400);
            let mut path = Vec::new();
            let mut cur = ty.to_string();
            while path.len() < depth {
                let Some(f) = schema.messages.get(&cur).and_then(|d| {
                    let m: Vec<&FieldDescriptorProto> = d
                        .field
                        .iter()
                        .filter(|f| f.r#type() == Type::Message)
                        .collect();
                    m.choose(rng).copied()
                }) else {
                    break;
                };
                path.push(number(f));
                cur = f.type_name().to_string();
            }
            while path.len() < depth {
                path.push(rng.random_range(1..16));
            }
            out.extend_from_slice(&wrap(&path, random_bytes(rng, 8)));
            "deep-nesting"
        }
        6 => {
            let path = string_path(rng, schema, ty, 0).unwrap_or_else(|| vec![field]);
            let bad: &[u8] = [
                &[0xff, 0xfe][..],
                &[0xc0, 0x80],
                &[0xed, 0xa0, 0x80],
                &[b'o', b'k', 0xe4, 0xb8],
                &[0xf8, 0x88, 0x80, 0x80, 0x80],
            ]
            .choose(rng)
            .copied()
            .unwrap_or(&[0xff]);
            out.extend_from_slice(&wrap(&path, bad.to_vec()));
            "invalid-utf8"
        }
        7 => {
            let mut b = MESSAGE_BUDGET / 4;
            let full = well_formed(rng, schema, ty, 0, &mut b);
            out = full[..rng.random_range(0..=full.len())].to_vec();
            "truncated"
        }
        8 => {
            let mut b = MESSAGE_BUDGET / 4;
            out = well_formed(rng, schema, ty, 0, &mut b);
            if !out.is_empty() {
                for _ in 0..rng.random_range(1..5) {
                    let i = rng.random_range(0..out.len());
                    out[i] ^= 1 << rng.random_range(0..8);
                }
            }
            "bit-flip"
        }
        9 => {
            put_tag(&mut out, field, VARINT);
            out.extend(std::iter::repeat_n(0xff, 10));
            out.push(0x01);
            "varint-overflow"
        }
        10 => {
            put_varint(&mut out, u64::from(rng.random_range(0u8..8)));
            out.push(0);
            "field-zero"
        }
        11 => {
            // A known field with the wrong wire type for its type.
            let wrong = match kind {
                Type::String | Type::Bytes | Type::Message => {
                    *[VARINT, FIXED32, FIXED64].choose(rng).unwrap_or(&VARINT)
                }
                _ => LEN,
            };
            put_tag(&mut out, field, wrong);
            out.extend_from_slice(&[0x03, b'a', b'b', b'c', 0, 0, 0, 0, 0]);
            "wrong-wire-type"
        }
        12 => {
            put_tag(&mut out, field, 3); // start group, never ended
            out.extend_from_slice(&random_bytes(rng, 32));
            "unclosed-group"
        }
        13 => {
            put_tag(&mut out, field, LEN);
            put_varint(
                &mut out,
                *[u64::MAX, 1 << 62, u64::from(u32::MAX)]
                    .choose(rng)
                    .unwrap_or(&u64::MAX),
            );
            "huge-length"
        }
        14 => {
            // The right wire format of another message type.
            let other: Vec<&String> = schema.messages.keys().collect();
            let mut names = other.clone();
            names.sort();
            let t = (*names.choose(rng).unwrap_or(&&ty.to_string())).clone();
            let mut b = MESSAGE_BUDGET / 4;
            out = well_formed(rng, schema, &t, 0, &mut b);
            "other-type"
        }
        _ => {
            // A packed field whose last element is cut.
            let mut packed = Vec::new();
            put_varint(&mut packed, 300);
            packed.push(0x80);
            put_len(&mut out, field, &packed);
            "bad-packed"
        }
    };
    (label, out)
}

// ---- cases -------------------------------------------------------------------------------------

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Department,
    Admin,
    Unregistered,
    ChildBroker,
}

/// One call to make.
#[derive(Debug, Clone)]
struct Case {
    who: Who,
    /// What the messages are (for the report).
    kind: String,
    /// True when every message is a valid encoding of the input type.
    well_formed: bool,
    messages: Vec<Bytes>,
    /// The `grpc-timeout` the call carries.
    deadline: Option<Duration>,
}

/// A valid first message for the streams that want one, so that the rest of the stream reaches
/// the session rather than the opening check.
fn primer(rng: &mut StdRng, m: &Method) -> Option<Vec<u8>> {
    match m.path.as_str() {
        "/govshare.v1.FederationService/Link" => Some(
            pb::LinkFrame {
                seq: 0,
                body: Some(pb::link_frame::Body::Hello(pb::LinkHello {
                    broker_id: CHILD.into(),
                    protocol: "govshare.v1".into(),
                    scope: Vec::new(),
                    ping_secs: 0,
                })),
            }
            .encode_to_vec(),
        ),
        "/govshare.v1.ExchangeService/Serve" => Some(
            ProviderMessage {
                body: Some(provider_message::Body::Hello(ServeHello {
                    dataset_ids: if rng.random_bool(0.5) {
                        vec![DATASET.into()]
                    } else {
                        Vec::new()
                    },
                    max_in_flight: rng.random_range(1..=16),
                    instance: "robust".into(),
                })),
            }
            .encode_to_vec(),
        ),
        _ => None,
    }
}

fn make_case(rng: &mut StdRng, schema: &Schema, m: &Method, who: Who) -> Case {
    let well = rng.random_bool(0.5);
    let mut kinds = Vec::new();
    let mut messages = Vec::new();
    let count = if m.client_streaming {
        if let Some(p) = primer(rng, m).filter(|_| rng.random_bool(0.5)) {
            kinds.push("primer");
            messages.push(Bytes::from(p));
        }
        rng.random_range(1..=3)
    } else if !well && rng.random_bool(0.05) {
        // A unary method given no message or two: a protocol violation, not a body one.
        kinds.push("wrong-count");
        *[0, 2].choose(rng).unwrap_or(&2)
    } else {
        1
    };
    for _ in 0..count {
        if well {
            let mut budget = MESSAGE_BUDGET;
            kinds.push("well-formed");
            messages.push(Bytes::from(well_formed(
                rng,
                schema,
                &m.input,
                0,
                &mut budget,
            )));
        } else {
            let (k, b) = malformed(rng, schema, &m.input);
            kinds.push(k);
            messages.push(Bytes::from(b));
        }
    }
    Case {
        who,
        kind: kinds.join("+"),
        well_formed: well && !kinds.contains(&"wrong-count"),
        messages,
        deadline: rng.random_bool(0.7).then_some(CALL_DEADLINE),
    }
}

// ---- calling -----------------------------------------------------------------------------------

/// What a call came to.
#[derive(Debug, Clone)]
enum Outcome {
    /// The response stream ended cleanly after this many messages.
    Ok(usize),
    /// A streaming response still open when the test stopped reading (after this many messages).
    Open(usize),
    /// A status, headers-only or at the end of the stream.
    Status { code: Code, message: String },
    /// A unary call that did not answer in time.
    Hung,
}

async fn call(channel: Channel, m: &Method, case: &Case) -> Outcome {
    let unary_response = !m.server_streaming;
    let window = if unary_response {
        UNARY_TIMEOUT
    } else {
        STREAM_WINDOW
    };
    let mut received = 0usize;
    let path = m.uri.clone();
    let mut request = tonic::Request::new(tokio_stream::iter(case.messages.clone()));
    if let Some(d) = case.deadline {
        request.set_timeout(d);
    }
    let run = async {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let mut stream = grpc.streaming(request, path, RawCodec).await?.into_inner();
        while stream.message().await?.is_some() {
            received += 1;
        }
        Ok::<(), Status>(())
    };
    match tokio::time::timeout(window, run).await {
        Ok(Ok(())) => Outcome::Ok(received),
        Ok(Err(s)) => Outcome::Status {
            code: s.code(),
            message: s.message().to_string(),
        },
        Err(_) if unary_response => Outcome::Hung,
        Err(_) => Outcome::Open(received),
    }
}

/// FNV-1a, to derive a method's generator from the run's seed.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A failed call, for the report: method, caller, kind, deadline and the messages' bytes.
fn describe(m: &Method, case: &Case, why: &str) -> String {
    let msgs: Vec<String> = case.messages.iter().map(|b| hex_preview(b)).collect();
    format!(
        "{} as {:?}, {} ({}): {why}\n    messages: [{}]",
        m.path,
        case.who,
        case.kind,
        case.deadline
            .map_or("no deadline".into(), |d| format!("grpc-timeout {d:?}")),
        msgs.join(", ")
    )
}

/// The first `n` lines of a report, and how many more there are.
fn first(lines: &[String], n: usize) -> String {
    let mut out = lines.iter().take(n).cloned().collect::<Vec<_>>().join("\n");
    if lines.len() > n {
        let _ = write!(out, "\n... and {} more", lines.len() - n);
    }
    out
}

/// At most 200 characters of a status message.
fn clip(s: &str) -> String {
    let mut c: String = s.chars().take(200).collect();
    if c.len() < s.len() {
        c.push_str("...");
    }
    c
}

/// Why an outcome fails the test, if it does.
fn verdict(m: &Method, case: &Case, o: &Outcome) -> Option<String> {
    match o {
        Outcome::Hung => Some(format!(
            "no answer within {UNARY_TIMEOUT:?} (a unary call must return a status)"
        )),
        Outcome::Status { code, message } => {
            let lower = message.to_lowercase();
            let msg = clip(message);
            if lower.contains("panicked") {
                return Some(format!("a panic reported as {code:?}: {msg}"));
            }
            for transport in [
                "transport error",
                "h2 protocol error",
                "connection reset",
                "broken pipe",
                "connection closed",
                "error reading a body",
            ] {
                if lower.contains(transport) {
                    return Some(format!(
                        "the call was dropped rather than answered ({code:?}: {msg})"
                    ));
                }
            }
            if lower.contains("see the broker's log") {
                // The broker's own INTERNAL: a fault on its side, whatever the input.
                return Some(format!("the broker failed internally ({code:?}: {msg})"));
            }
            if case.well_formed && matches!(code, Code::Internal | Code::Unknown | Code::DataLoss) {
                return Some(format!(
                    "a well-formed message answered {code:?} (expected a client-error code): {msg}"
                ));
            }
            let timed_out = *code == Code::DeadlineExceeded
                || (*code == Code::Cancelled && lower.contains("timeout expired"));
            if timed_out && !m.server_streaming && !WAITING_METHODS.contains(&m.path.as_str()) {
                return Some(format!(
                    "ran into its deadline ({code:?}: {msg}); this method should answer at once"
                ));
            }
            if *code == Code::Cancelled && !timed_out {
                // The test never cancels a call it still reads.
                return Some(format!("the call was cancelled under it ({code:?}: {msg})"));
            }
            None
        }
        Outcome::Ok(_) | Outcome::Open(_) => None,
    }
}

fn outcome_key(o: &Outcome) -> String {
    match o {
        Outcome::Ok(_) => "OK".into(),
        Outcome::Open(_) => "OK(stream left open)".into(),
        Outcome::Status { code, .. } => format!("{code:?}"),
        Outcome::Hung => "HUNG".into(),
    }
}

fn hex_preview(b: &[u8]) -> String {
    let mut s = String::new();
    for x in b.iter().take(48) {
        let _ = write!(s, "{x:02x}");
    }
    if b.len() > 48 {
        let _ = write!(s, "...({} bytes)", b.len());
    }
    s
}

// ---- health ------------------------------------------------------------------------------------

async fn check_healthy(
    broker: &TestBroker,
    admin: &Client,
    dept: &Client,
    after: &str,
) -> Result<()> {
    let seen = panics();
    ensure!(
        seen.is_empty(),
        "after {after}: a panic in the process:\n{}",
        seen.join("\n")
    );
    let mut health = HealthClient::new(admin.channel());
    let r = tokio::time::timeout(
        UNARY_TIMEOUT,
        health.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .with_context(|| format!("after {after}: the health check hung"))?
    .with_context(|| format!("after {after}: the health check failed"))?
    .into_inner();
    ensure!(
        r.status() == ServingStatus::Serving,
        "after {after}: health says {:?}",
        r.status()
    );
    tokio::time::timeout(UNARY_TIMEOUT, admin.whoami())
        .await
        .with_context(|| format!("after {after}: whoami hung"))?
        .with_context(|| format!("after {after}: whoami on the existing connection failed"))?;
    // A new connection: the accept loop is still alive.
    let fresh = tokio::time::timeout(UNARY_TIMEOUT, broker.admin())
        .await
        .with_context(|| format!("after {after}: connecting hung"))?
        .with_context(|| format!("after {after}: a new connection failed"))?;
    fresh
        .whoami()
        .await
        .with_context(|| format!("after {after}: whoami on a new connection failed"))?;
    // Random admin calls may suspend the department; put it back, so that later batches still
    // reach past the registry.
    if dept.whoami().await.is_err() {
        let _ = admin.resume_node(DEPT).await;
    }
    Ok(())
}

// ---- the test ----------------------------------------------------------------------------------

fn rpc_count_in_proto_files() -> Result<usize> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/govshare/v1");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            n += std::fs::read_to_string(&path)?
                .lines()
                .filter(|l| l.trim_start().starts_with("rpc "))
                .count();
        }
    }
    Ok(n)
}

/// Every method, every caller kind, random and malformed bodies: a status each, a healthy broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_random_and_malformed_messages_with_a_status() -> Result<()> {
    install_panic_hook();
    let started = Instant::now();
    let seed: u64 = match std::env::var("GOVSHARE_ROBUST_SEED") {
        Ok(s) => s.parse().context("GOVSHARE_ROBUST_SEED")?,
        Err(_) => rand::random(),
    };
    let cases_per: usize = match std::env::var("GOVSHARE_ROBUST_CASES") {
        Ok(s) => s.parse().context("GOVSHARE_ROBUST_CASES")?,
        Err(_) => 32,
    };
    let only = std::env::var("GOVSHARE_ROBUST_METHOD").ok();
    let verbose = std::env::var_os("GOVSHARE_ROBUST_VERBOSE").is_some();
    println!("robust: seed {seed} (GOVSHARE_ROBUST_SEED={seed} replays it), {cases_per} cases per method per caller");

    let govshare = Schema::load(&[govshare_proto::FILE_DESCRIPTOR_SET])?;
    let schema = Schema::load(&[
        govshare_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])?;
    let methods: Vec<Method> = schema.methods.values().cloned().collect();
    ensure!(!methods.is_empty(), "no methods found in the descriptors");
    for want in [
        "/govshare.v1.ExchangeService/Submit",
        "/govshare.v1.ExchangeService/Serve",
        "/govshare.v1.FederationService/Link",
        "/govshare.v1.NodeService/RegisterNode",
        "/govshare.v1.AdminService/PurgeDeadLetters",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    ] {
        ensure!(
            schema.methods.contains_key(want),
            "{want} missing from the enumerated methods: {:?}",
            schema.methods.keys().collect::<Vec<_>>()
        );
    }
    let in_files = rpc_count_in_proto_files()?;
    ensure!(
        govshare.methods.len() == in_files,
        "the descriptor set has {} govshare methods, the .proto files {in_files} rpc lines",
        govshare.methods.len()
    );
    let unresolved = schema.unresolved();
    ensure!(unresolved.is_empty(), "unresolved types: {unresolved:?}");

    let broker = TestBroker::start_with("330000/hub", |c| {
        c.limits.requests_per_second = 100_000;
        c.limits.burst = 100_000;
        // A bare Request (no grpc-timeout) waits this long for a provider, not 30 s.
        c.exchange.default_sync_deadline_secs = 2;
    })
    .await?;
    let admin = broker.admin().await?;
    let dept_dir = broker.issue(DEPT, NodeRole::Department)?;
    admin
        .register_node(pb::RegisterNodeRequest {
            id: DEPT.into(),
            name: "民政厅".into(),
            role: NodeRole::Department as i32,
            ..Default::default()
        })
        .await?;
    let dept = broker.connect(&dept_dir).await?;
    dept.publish_dataset(pb::Dataset {
        code: "marriage".into(),
        name: "婚姻登记信息".into(),
        share_type: pb::ShareType::Conditional as i32,
        items: vec![
            pb::InfoItem {
                name: "id_number".into(),
                ..Default::default()
            },
            pb::InfoItem {
                name: "status".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    })
    .await?;
    let ghost_dir = broker.issue(GHOST, NodeRole::Department)?;
    let child_dir = broker.issue(CHILD, NodeRole::Broker)?;
    let mut pems = Vec::new();
    for dir in [&dept_dir, &ghost_dir, &child_dir, &broker.admin_dir()] {
        pems.push(std::fs::read_to_string(
            dir.join(govshare_client::CERT_FILE),
        )?);
    }
    let _ = PEMS.set(pems);
    let ghost = broker.connect(&ghost_dir).await?;
    let child = broker.connect(&child_dir).await?;
    let callers = [
        (Who::Department, dept_dir, dept.channel()),
        (Who::Admin, broker.admin_dir(), admin.channel()),
        (Who::Unregistered, ghost_dir, ghost.channel()),
        (Who::ChildBroker, child_dir, child.channel()),
    ];
    check_healthy(&broker, &admin, &dept, "start").await?;

    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_caller: BTreeMap<(Who, String), usize> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut collateral: Vec<String> = Vec::new();
    let mut calls = 0usize;
    let mut responses = 0usize;
    let mut covered = 0usize;
    let mut examples: BTreeMap<String, String> = BTreeMap::new();
    let mut healthy = true;
    for m in &methods {
        if only.as_deref().is_some_and(|o| !m.path.contains(o)) {
            continue;
        }
        covered += 1;
        // One generator per method, so that a filtered replay sees the same messages.
        let mut rng = StdRng::seed_from_u64(seed ^ fnv1a(&m.path));
        let batch_started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (who, _, channel) in &callers {
            for _ in 0..cases_per {
                let case = make_case(&mut rng, &schema, m, *who);
                let (channel, m, permits) = (channel.clone(), m.clone(), permits.clone());
                set.spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    let outcome = call(channel, &m, &case).await;
                    (case, outcome)
                });
            }
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut all_unimplemented = true;
        let mut suspects = Vec::new();
        while let Some(joined) = set.join_next().await {
            let (case, outcome) = joined.context("a call task died")?;
            calls += 1;
            if let Outcome::Ok(n) | Outcome::Open(n) = outcome {
                responses += n;
            }
            let key = outcome_key(&outcome);
            *counts.entry(key.clone()).or_default() += 1;
            *totals.entry(key.clone()).or_default() += 1;
            if verbose {
                println!(
                    "robust:     {:?} {} -> {}",
                    case.who,
                    case.kind,
                    match &outcome {
                        Outcome::Status { code, message } => format!("{code:?}: {}", clip(message)),
                        other => format!("{other:?}"),
                    }
                );
            }
            if let Outcome::Status { message, .. } = &outcome {
                examples
                    .entry(key.clone())
                    .or_insert_with(|| format!("{} as {:?}: {}", m.path, case.who, clip(message)));
            }
            *by_caller.entry((case.who, key)).or_default() += 1;
            if !matches!(
                &outcome,
                Outcome::Status {
                    code: Code::Unimplemented,
                    ..
                }
            ) {
                all_unimplemented = false;
            }
            if let Some(why) = verdict(m, &case, &outcome) {
                suspects.push((case, why));
            }
        }
        println!(
            "robust: {:<52} {:>5} ms  {counts:?}",
            m.path,
            batch_started.elapsed().as_millis()
        );
        if all_unimplemented {
            failures.push(format!(
                "{}: every call was UNIMPLEMENTED; is the path right?",
                m.path
            ));
        }
        // Replay each failed call alone on a fresh connection: a call that passes alone was
        // collateral damage of another call in the batch (e.g. its connection torn down).
        for (case, why) in suspects {
            let dir = &callers
                .iter()
                .find(|(w, _, _)| *w == case.who)
                .context("no such caller")?
                .1;
            let fresh = broker.connect(dir).await?;
            let alone = call(fresh.channel(), m, &case).await;
            let line = describe(m, &case, &why);
            match verdict(m, &case, &alone) {
                Some(again) => failures.push(format!("{line}\n    alone, again: {again}")),
                None => collateral.push(format!("{line}\n    alone: {}", outcome_key(&alone))),
            }
        }
        if let Err(e) = check_healthy(&broker, &admin, &dept, &m.path).await {
            failures.push(format!("{e:#}"));
            healthy = false;
            break;
        }
    }
    if healthy {
        if let Err(e) = check_healthy(&broker, &admin, &dept, "the end").await {
            failures.push(format!("{e:#}"));
        }
    }

    println!(
        "robust: {} methods, {calls} calls ({responses} response messages) in {:.1} s; \
         outcomes: {totals:?}",
        covered,
        started.elapsed().as_secs_f64()
    );
    for who in [
        Who::Department,
        Who::Admin,
        Who::Unregistered,
        Who::ChildBroker,
    ] {
        let row: BTreeMap<&str, usize> = by_caller
            .iter()
            .filter(|((w, _), _)| *w == who)
            .map(|((_, k), n)| (k.as_str(), *n))
            .collect();
        println!("robust:   {who:?}: {row:?}");
    }
    for (code, example) in &examples {
        println!("robust:   e.g. {code}: {example}");
    }
    if !failures.is_empty() || !collateral.is_empty() {
        bail!(
            "{} failures, and {} calls that failed only beside them (seed {seed}; \
             GOVSHARE_ROBUST_SEED={seed} replays):\n{}\ncollateral (the first few):\n{}",
            failures.len(),
            collateral.len(),
            first(&failures, 40),
            first(&collateral, 5),
        );
    }
    broker.shutdown().await
}
