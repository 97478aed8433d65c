//! The storage error type: one enum whose variants each say what went wrong and what to do.

use std::path::PathBuf;

use crate::{RunId, Seq};

/// Everything that can go wrong reading or writing the event log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process has the store open for writing (redb holds a lock on the file).
    #[error(
        "the store {path} is open for writing by another cairn process; wait for it to finish or stop it (Ctrl-C), then retry"
    )]
    AlreadyOpen {
        /// The store file.
        path: PathBuf,
    },
    /// The store file does not exist and the caller asked not to create it.
    #[error(
        "no store at {path}; run a workflow first (e.g. `cairn demo`) or pass --store PATH / CAIRN_STORE"
    )]
    NotFound {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// The file exists but is not a readable Cairn store.
    #[error(
        "the store {path} is corrupt or not a cairn store: {detail}; restore it from a backup or point --store elsewhere"
    )]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What the backend reported.
        detail: String,
    },
    /// The store was written by a newer Cairn whose format this binary cannot read.
    #[error(
        "the store {path} has format version {found}, but this cairn reads up to {supported}; upgrade cairn"
    )]
    NewerFormat {
        /// The store file.
        path: PathBuf,
        /// The format version found in the file.
        found: u32,
        /// The newest format version this binary reads.
        supported: u32,
    },
    /// One record was written in a newer format than this binary reads.
    #[error(
        "record {seq} of run {run} has format version {found}, but this cairn reads up to {supported}; upgrade cairn"
    )]
    NewerRecord {
        /// The run holding the record.
        run: RunId,
        /// The record's position.
        seq: Seq,
        /// The record's format version.
        found: u8,
        /// The newest record format this binary reads.
        supported: u8,
    },
    /// A record could not be decoded.
    #[error("record {seq} of run {run} cannot be decoded ({detail}); the store may be damaged")]
    BadRecord {
        /// The run holding the record.
        run: RunId,
        /// The record's position.
        seq: Seq,
        /// The decoder's message.
        detail: String,
    },
    /// No run with this id exists in the store.
    #[error("no run {0} in this store; list runs with `cairn runs`")]
    UnknownRun(RunId),
    /// A guarded append found the run already finished; nothing was written.
    #[error("run {run} has already {status}; nothing was written")]
    RunFinished {
        /// The run.
        run: RunId,
        /// Its final status.
        status: crate::RunStatus,
    },
    /// A run with this id already exists.
    #[error("run {0} already exists")]
    RunExists(RunId),
    /// A write was attempted on a store opened read-only.
    #[error("the store is open read-only; open it for writing to change it")]
    ReadOnly,
    /// A payload is larger than the configured limit.
    #[error(
        "a payload of {bytes} bytes exceeds the limit of {max_bytes} bytes; store large data elsewhere and record a reference"
    )]
    PayloadTooLarge {
        /// The payload's size.
        bytes: usize,
        /// The limit in force.
        max_bytes: usize,
    },
    /// The writer thread has stopped (the store was closed or a previous fatal error).
    #[error("the store's writer has stopped; reopen the store")]
    Closed,
    /// An I/O or backend failure; the write (if any) did not happen.
    #[error("storage failure: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::AlreadyOpen { .. } | StoreError::Backend(_)
        )
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

macro_rules! backend_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Backend(e.to_string())
            }
        }
    )*};
}
backend_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
