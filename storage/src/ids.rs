//! Identifiers parsed at the edge: [`RunId`] and [`Seq`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// The identity of one run: a ULID, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunId(u128);

impl RunId {
    /// A fresh id for a run created now.
    pub fn new() -> Self {
        // One process-wide generator keeps ids created in the same millisecond in order.
        static GENERATOR: std::sync::Mutex<ulid::Generator> =
            std::sync::Mutex::new(ulid::Generator::new());
        let id = match GENERATOR.lock() {
            Ok(mut g) => g.generate().unwrap_or_else(|_| Ulid::generate()),
            Err(_) => Ulid::generate(),
        };
        RunId(id.0)
    }

    /// The id as a 128-bit integer (the key in the store).
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds an id from its 128-bit form.
    pub fn from_u128(v: u128) -> Self {
        RunId(v)
    }

    /// The id's bytes, big-endian (used in hashes).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Ulid(self.0))
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", Ulid(self.0))
    }
}

/// The error for a string that is not a run id.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not a run id (expected 26 characters like 01JD3Q5W8ZK2X4M7N9P0R1S2T3; see `cairn runs`)"
)]
pub struct BadRunId(String);

impl FromStr for RunId {
    type Err = BadRunId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(s.trim())
            .map(|u| RunId(u.0))
            .map_err(|_| BadRunId(s.to_string()))
    }
}

/// The position of a record within its run: dense, starting at 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
