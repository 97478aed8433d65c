//! cairn-storage: the durable, append-only, hash-chained log of records that every Cairn run is
//! made of.
//!
//! This crate knows runs, sequence numbers, timestamps, opaque payload bytes and the hash chain
//! that links them. It never interprets a payload: the engine decides what an event means.
//! The default backend is an embedded [redb](https://docs.rs/redb) file ([`RedbStore`]), written
//! by one group-commit writer thread so that concurrent appends share one fsync.
//!
//! Architecture invariant: records of a run are appended with dense sequence numbers starting at
//! 0 and are never rewritten; every record carries `blake3(previous hash ‖ seq ‖ ts ‖ payload)`.

mod chunks;
mod error;
mod ids;
mod record;
mod redb_store;
mod store;
mod wal;

pub use error::StoreError;
pub use ids::{BadRunId, RunId, Seq};
pub use record::{
    FORMAT_VERSION, Hash, NewEvent, StoredEvent, VerifyReport, genesis_hash, now_micros,
    record_hash,
};
pub use redb_store::{Durability, RedbStore, StoreOptions, WriterStats};
pub use store::{
    Appended, BoxFuture, EventStore, Guard, NewRun, RunFilter, RunMeta, RunStatus, RunUpdate,
    verify_events,
};
