//! Event chunks: how the redb file holds a run's events since store format 2.
//!
//! The write-ahead log makes each event durable on its own; the redb file is only written at
//! checkpoints. So instead of one B-tree entry per event, the events a run appended since the
//! last checkpoint are gathered in memory, in `seq` order, and each checkpoint inserts them as
//! one row per run, `(run, first seq) → chunk` (a chunk longer than [`CHUNK_BYTES_MAX`] is
//! split). A redb insert into a table whose keys of a few thousand runs interleave costs about
//! 10,000 instructions (copy-on-write of the leaf and its branch pages, page allocation), and
//! it was a third of the process's instructions under `cairn bench many`; a chunk makes it
//! once per run and checkpoint instead of once per event.
//!
//! A chunk is one version byte ([`CHUNK_VERSION`]) and then, per event, its record's length
//! as a little-endian `u32` and the record (the envelope of `record.rs`, unchanged). The
//! events of a chunk are dense: the `i`-th has `seq = first + i`.
//!
//! Stores of format 1 hold one row per event in the `events` table; they are still read (a
//! run's older events there, its newer ones in chunks), and opening such a store for writing
//! raises its format to 2, so an older binary refuses it instead of missing events.

use rustc_hash::FxHashMap;

use redb::{ReadableTable, TableDefinition};

use crate::record::decode;
use crate::{RunId, Seq, StoreError, StoredEvent};

/// The chunks table: `(run, seq of the chunk's first event) → chunk`.
pub(crate) const EVENT_CHUNKS: TableDefinition<(u128, u64), &[u8]> =
    TableDefinition::new("event_chunks");

/// The version byte in front of each chunk.
const CHUNK_VERSION: u8 = 1;

/// A chunk is closed (inserted) once it holds this many bytes; the next event starts another.
/// Just under 16 KiB, so that a chunk and its leaf's header fill one 16 KiB redb page: redb
/// gives a value larger than a 4 KiB page a page of the next power of two, and 64 KiB chunks
/// took 128 KiB pages (`bench seq`: 644 KiB on disk for 1,000 steps, against 276 KiB with
/// this size; `bench replay`: 20.3 MiB for 100,000 events, 17.0 here, 19.0 with one row per
/// event). Large enough that a run's steps between two checkpoints are a row or a few.
pub(crate) const CHUNK_BYTES_MAX: usize = 16 * 1024 - 64;

/// The events applied to the open transaction and not yet inserted: one open chunk per run.
#[derive(Default)]
pub(crate) struct Pending {
    /// Keyed by run id (random and internal: a fast hash, not SipHash, which cost about 470
    /// instructions per event across the writer's maps).
    runs: FxHashMap<u128, Open>,
}

/// A run's chunk being filled.
struct Open {
    first: u64,
    next: u64,
    bytes: Vec<u8>,
}

impl Pending {
    /// Adds `record`, the event at `seq` of `run`. A full chunk, or one that `seq` does not
    /// continue, is inserted into `table` first.
    pub(crate) fn push(
        &mut self,
        table: &mut redb::Table<'_, (u128, u64), &[u8]>,
        run: u128,
        seq: u64,
        record: &[u8],
    ) -> Result<(), StoreError> {
        let len = u32::try_from(record.len()).map_err(|_| {
            StoreError::Backend(format!(
                "an event record of {} bytes does not fit a chunk",
                record.len()
            ))
        })?;
        if let Some(open) = self.runs.get(&run)
            && (open.next != seq || open.bytes.len() + 4 + record.len() > CHUNK_BYTES_MAX)
            && let Some(full) = self.runs.remove(&run)
        {
            insert(table, run, &full)?;
        }
        let open = self.runs.entry(run).or_insert_with(|| Open {
            first: seq,
            next: seq,
            bytes: {
                let mut b = Vec::with_capacity(1024);
                b.push(CHUNK_VERSION);
                b
            },
        });
        open.bytes.extend_from_slice(&len.to_le_bytes());
        open.bytes.extend_from_slice(record);
        open.next = seq + 1;
        Ok(())
    }

    /// Whether `run` has a chunk being filled.
    pub(crate) fn is_open(&self, run: u128) -> bool {
        self.runs.contains_key(&run)
    }

    /// Inserts `run`'s open chunk, if it has one: the run stopped appending (it finished or
    /// parked), so its chunk is whole, and inserting it now, on the apply thread, leaves less
    /// for the checkpoint, which holds up the writer.
    pub(crate) fn close(
        &mut self,
        table: &mut redb::Table<'_, (u128, u64), &[u8]>,
        run: u128,
    ) -> Result<(), StoreError> {
        match self.runs.remove(&run) {
            Some(open) => insert(table, run, &open),
            None => Ok(()),
        }
    }

    /// Inserts every open chunk into `txn` (before the transaction is committed).
    pub(crate) fn flush(&mut self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let mut table = txn.open_table(EVENT_CHUNKS)?;
        // In key order: neighbouring rows go into the same leaves.
        let mut runs: Vec<(u128, Open)> = self.runs.drain().collect();
        runs.sort_unstable_by_key(|(run, _)| *run);
        for (run, open) in &runs {
            insert(&mut table, *run, open)?;
        }
        Ok(())
    }
}

fn insert(
    table: &mut redb::Table<'_, (u128, u64), &[u8]>,
    run: u128,
    open: &Open,
) -> Result<(), StoreError> {
    table.insert((run, open.first), open.bytes.as_slice())?;
    Ok(())
}

/// Appends to `out` the events of `run` from `from` on that the chunks in `table` hold, until
/// `out` holds `limit` events.
pub(crate) fn read(
    table: &impl ReadableTable<(u128, u64), &'static [u8]>,
    run: RunId,
    from: Seq,
    limit: usize,
    out: &mut Vec<StoredEvent>,
) -> Result<(), StoreError> {
    let id = run.as_u128();
    // The chunk holding `from` starts at or before it.
    let start = match table.range((id, 0)..=(id, from.0))?.next_back() {
        Some(row) => row?.0.value().1,
        None => from.0,
    };
    for row in table.range((id, start)..=(id, u64::MAX))? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = row?;
        let first = k.value().1;
        for (seq, record) in (first..).zip(records(run, first, v.value())?) {
            if out.len() >= limit {
                break;
            }
            if seq >= from.0 {
                out.push(decode(run, Seq(seq), record)?);
            }
        }
    }
    Ok(())
}

/// The records of a chunk whose first event is at `first`, in order.
fn records(run: RunId, first: u64, chunk: &[u8]) -> Result<Vec<&[u8]>, StoreError> {
    let corrupt = |detail: String| StoreError::BadRecord {
        run,
        seq: Seq(first),
        detail,
    };
    let body = match chunk.split_first() {
        Some((&CHUNK_VERSION, body)) => body,
        Some((&v, _)) if v > CHUNK_VERSION => {
            return Err(StoreError::NewerRecord {
                run,
                seq: Seq(first),
                found: v,
                supported: CHUNK_VERSION,
            });
        }
        _ => {
            return Err(corrupt(
                "its chunk is empty or has an unknown version".into(),
            ));
        }
    };
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(corrupt("its chunk ends inside a record's length".into()));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(corrupt(format!(
                "its chunk ends inside a record ({len} bytes announced, {} left)",
                tail.len()
            )));
        }
        let (record, after) = tail.split_at(len);
        out.push(record);
        rest = after;
    }
    Ok(out)
}
