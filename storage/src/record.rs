//! The versioned record envelope and the per-run hash chain.
//!
//! A record is stored as one format-version byte followed by a postcard body
//! (`ts_us`, `hash`, `payload`). postcard's wire format is stable and documented, which an event
//! log that must stay readable for years needs (bincode is unmaintained: RUSTSEC-2025-0141).
//! The chain is `h_n = blake3(h_{n-1} ‖ seq ‖ ts_us ‖ payload)` with a genesis hash derived from
//! the run id, so a record cannot be moved between runs or positions unnoticed.

use serde::{Deserialize, Serialize};

use crate::{RunId, Seq, StoreError};

/// The newest record format this binary writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// A 32-byte blake3 hash of the chain.
pub type Hash = [u8; 32];

/// One event to append: its timestamp and opaque payload bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// When the event happened, in microseconds since the Unix epoch.
    pub ts_us: i64,
    /// The encoded event; storage never looks inside.
    pub payload: Vec<u8>,
}

impl NewEvent {
    /// An event stamped with the current time.
    pub fn now(payload: Vec<u8>) -> Self {
        NewEvent {
            ts_us: now_micros(),
            payload,
        }
    }
}

/// One event as read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the run, dense from 0.
    pub seq: Seq,
    /// When the event happened, in microseconds since the Unix epoch.
    pub ts_us: i64,
    /// The encoded event.
    pub payload: Vec<u8>,
    /// The chain hash of this record (covers all records before it).
    pub hash: Hash,
}

/// The result of checking a run's hash chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The run checked.
    pub run: String,
    /// How many records were checked.
    pub events: u64,
    /// The hash of the last record, hex: record it elsewhere to detect later rewrites.
    pub head: String,
    /// The first problem found, if any.
    pub problem: Option<String>,
}

impl VerifyReport {
    /// Whether the chain is intact.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// The current time in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    // Straight from the clock: no calendar conversion on the append path. A clock before 1970
    // reads as 0.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The hash a run's chain starts from.
pub fn genesis_hash(run: RunId) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"cairn.run.v1");
    h.update(&run.to_bytes());
    *h.finalize().as_bytes()
}

/// The chain hash of a record given its predecessor's hash.
pub fn record_hash(prev: &Hash, seq: Seq, ts_us: i64, payload: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(&seq.0.to_le_bytes());
    h.update(&ts_us.to_le_bytes());
    h.update(payload);
    *h.finalize().as_bytes()
}

// `serde_bytes`: serde writes a plain `[u8]` element by element; as bytes postcard copies it
// in one go. Both are the same on the wire (a varint length, then the bytes).
#[derive(Serialize)]
struct BodyRef<'a> {
    ts_us: i64,
    hash: &'a Hash,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

#[derive(Deserialize)]
struct BodyOwned<'a> {
    ts_us: i64,
    hash: Hash,
    #[serde(borrow, with = "serde_bytes")]
    payload: &'a [u8],
}

/// Encodes a record envelope.
pub(crate) fn encode(ts_us: i64, hash: &Hash, payload: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(payload.len() + 48);
    out.push(FORMAT_VERSION);
    let body = BodyRef {
        ts_us,
        hash,
        payload,
    };
    postcard::to_extend(&body, out)
        .map_err(|e| StoreError::Backend(format!("cannot encode a record: {e}")))
}

/// Decodes a record envelope, refusing records from a newer format.
pub(crate) fn decode(run: RunId, seq: Seq, bytes: &[u8]) -> Result<StoredEvent, StoreError> {
    let (&version, body) = bytes.split_first().ok_or_else(|| StoreError::BadRecord {
        run,
        seq,
        detail: "empty record".into(),
    })?;
    if version > FORMAT_VERSION {
        return Err(StoreError::NewerRecord {
            run,
            seq,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(StoreError::BadRecord {
            run,
            seq,
            detail: "format version 0 does not exist".into(),
        });
    }
    let b: BodyOwned<'_> = postcard::from_bytes(body).map_err(|e| StoreError::BadRecord {
        run,
        seq,
        detail: e.to_string(),
    })?;
    Ok(StoredEvent {
        seq,
        ts_us: b.ts_us,
        payload: b.payload.to_vec(),
        hash: b.hash,
    })
}

/// Lowercase hex of a hash.
pub(crate) fn hex(h: &Hash) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(64);
    for b in h {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let run = RunId::new();
        let h = record_hash(&genesis_hash(run), Seq(0), 42, b"abc");
        let bytes = encode(42, &h, b"abc").unwrap();
        let ev = decode(run, Seq(0), &bytes).unwrap();
        assert_eq!(ev.ts_us, 42);
        assert_eq!(ev.payload, b"abc");
        assert_eq!(ev.hash, h);
    }

    #[test]
    fn the_envelope_keeps_the_wire_format_of_stores_written_before_serde_bytes() {
        // Until 2026-11-25 the payload was encoded as a sequence of u8; records written then
        // must decode and new records must be byte-identical.
        #[derive(Serialize)]
        struct Old<'a> {
            ts_us: i64,
            hash: &'a Hash,
            payload: Vec<u8>,
        }
        let payload: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let mut old = vec![FORMAT_VERSION];
        old.extend(
            postcard::to_allocvec(&Old {
                ts_us: -5,
                hash: &[9; 32],
                payload: payload.clone(),
            })
            .unwrap(),
        );
        assert_eq!(encode(-5, &[9; 32], &payload).unwrap(), old);
        let ev = decode(RunId::new(), Seq(0), &old).unwrap();
        assert_eq!((ev.ts_us, ev.payload), (-5, payload));
    }

    #[test]
    fn newer_record_is_refused_with_a_clear_error() {
        let run = RunId::new();
        let mut bytes = encode(1, &[0; 32], b"x").unwrap();
        bytes[0] = FORMAT_VERSION + 1;
        let err = decode(run, Seq(3), &bytes).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerRecord { found, .. } if found == FORMAT_VERSION + 1)
        );
        assert!(err.to_string().contains("upgrade cairn"));
    }

    #[test]
    fn truncated_record_is_an_error_not_a_panic() {
        let run = RunId::new();
        let bytes = encode(1, &[7; 32], b"hello").unwrap();
        for cut in 0..bytes.len() {
            let _ = decode(run, Seq(0), &bytes[..cut]);
        }
        assert!(decode(run, Seq(0), &bytes[..5]).is_err());
    }

    #[test]
    fn hash_depends_on_position_and_run() {
        let a = RunId::new();
        let b = RunId::new();
        assert_ne!(genesis_hash(a), genesis_hash(b));
        let g = genesis_hash(a);
        assert_ne!(
            record_hash(&g, Seq(0), 1, b"p"),
            record_hash(&g, Seq(1), 1, b"p")
        );
    }
}
