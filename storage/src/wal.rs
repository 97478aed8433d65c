//! The write-ahead log that makes a group commit cost one small durable write.
//!
//! The writer appends each batch's changes to this log as one record, makes it durable, and
//! only then acknowledges the batch; the changes then go into an open redb write transaction
//! (in memory). That transaction is committed (a checkpoint, with redb's own fsyncs) every
//! 250 ms, when a reader in this process needs it, or when the log is full; the checkpoint
//! records the last log sequence number it contains, and the log is then rewritten from its
//! start. Recovery applies the records after the checkpoint.
//!
//! A durable append is one `O_DIRECT | O_DSYNC` write of whole 4 KiB blocks (the record,
//! zero-padded), which returns once the device has it; where the file system refuses direct
//! I/O, a buffered write and an fdatasync. Rewriting a block that holds the tail of a durable
//! record never happens: every record starts on a fresh block.
//!
//! Record layout: `magic u32 | body_len u32 | lsn u64 | blake3(lsn ‖ body)[..16] | body`, where
//! `body` is the postcard encoding of the batch's [`Change`]s. Records start at offset 0 and on
//! block boundaries (logs written before that have them back to back: a scan takes the next
//! record right after the previous one or at the next boundary); a scan stops where there is no
//! whole record with a good checksum and the next sequence number (torn, or a leftover of an
//! earlier cycle).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::StoreError;

const MAGIC: u32 = 0x4341_5731; // "CAW1"
const HEADER_BYTES: usize = 32;

/// One change to a table, replayed in order on recovery. Every change is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Change {
    /// events[(run, seq)] = record bytes.
    Event {
        /// The run.
        run: u128,
        /// The event's position.
        seq: u64,
        /// The encoded record envelope (as bytes: the same wire format as a `u8` sequence,
        /// copied in one go).
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// runs[run] = row bytes.
    Run {
        /// The run.
        run: u128,
        /// The encoded row.
        #[serde(with = "serde_bytes")]
        row: Vec<u8>,
    },
    /// runs_by_status[(code, run)] present or absent.
    Status {
        /// The status code.
        code: u8,
        /// The run.
        run: u128,
        /// Whether the entry exists after the change.
        present: bool,
    },
    /// wakeups[(t, run)] present or absent.
    Wake {
        /// The wake-up time.
        at_us: i64,
        /// The run.
        run: u128,
        /// Whether the entry exists after the change.
        present: bool,
    },
}

/// About the encoded size of `changes` (a little over), so the record is allocated once.
fn encoded_size_hint(changes: &[Change]) -> usize {
    10 + changes
        .iter()
        .map(|c| match c {
            Change::Event { bytes, .. } => bytes.len() + 40,
            Change::Run { row, .. } => row.len() + 30,
            Change::Status { .. } | Change::Wake { .. } => 40,
        })
        .sum::<usize>()
}

/// The log grows in steps of this many bytes.
const RESERVE_STEP: u64 = 4 * 1024 * 1024;

/// Records start on multiples of this many bytes: the log's direct writes cover whole blocks.
const BLOCK: usize = 4096;

/// `n` rounded up to a multiple of [`BLOCK`].
fn align_up(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// The log file and where the next record goes.
pub(crate) struct Wal {
    file: Arc<File>,
    /// The same file opened `O_DIRECT | O_DSYNC`, when durable appends are wanted and the file
    /// system supports it: each record is then one write that returns once the device has it,
    /// without the page-cache copy and write-back an fdatasync pays for.
    direct: Option<Arc<File>>,
    /// Scratch space for direct writes, over-allocated so a [`BLOCK`]-aligned slice fits (lent
    /// to each [`PendingWrite`] and given back when it is written).
    scratch: Vec<u8>,
    path: Arc<Path>,
    offset: u64,
    /// Bytes of the file already written (with zeros or records): appends below this only
    /// overwrite data blocks, so their fdatasync does not also flush a new file size.
    allocated: u64,
    /// Whether appends are fdatasynced (off only with `Durability::None`).
    sync: bool,
    /// Tests: make the next write fail.
    #[cfg(test)]
    fail_write: bool,
    /// Tests: make the next fdatasync fail.
    #[cfg(test)]
    fail_sync: bool,
}

/// A record encoded and given its place in the log, to be written (and made durable) by
/// [`PendingWrite::write`], which needs no access to the [`Wal`]: the writer thread writes it
/// without holding the writer's lock. [`Wal::written`] then takes it back.
pub(crate) struct PendingWrite {
    /// The record (`direct`: zero-padded to whole blocks from `start`), in the log's scratch.
    buf: Vec<u8>,
    start: usize,
    /// The record's length without the padding.
    rec_len: usize,
    /// The padded length (what a direct write writes).
    padded: usize,
    offset: u64,
    file: Arc<File>,
    direct: Option<Arc<File>>,
    /// Whether a buffered write is followed by an fdatasync.
    sync: bool,
    /// Whether the write is made durable (durability on).
    durable: bool,
    path: Arc<Path>,
    /// Set by [`PendingWrite::write`] when the file system refused direct I/O after all.
    refused_direct: bool,
    #[cfg(test)]
    fail_write: bool,
    #[cfg(test)]
    fail_sync: bool,
}

/// Why a [`PendingWrite`] failed: its write (nothing of it is durable) or the fdatasync after
/// a buffered write (the kernel may have dropped dirty pages of the log: only a reopen can
/// tell what is durable).
pub(crate) enum WriteError {
    /// The write failed.
    Write(StoreError),
    /// The fdatasync failed.
    Sync(StoreError),
}

impl PendingWrite {
    /// Writes the record at its place and makes it durable (one `O_DIRECT | O_DSYNC` write, or
    /// a write and, unless durability is off, an fdatasync).
    pub(crate) fn write(&mut self) -> Result<(), WriteError> {
        #[cfg(test)]
        if self.fail_write {
            // As a device that fails a write: after a while (operations meanwhile go on being
            // worked out into the next record).
            std::thread::sleep(std::time::Duration::from_millis(2));
            return Err(WriteError::Write(io(
                &self.path,
                "cannot write the write-ahead log",
                std::io::Error::other("injected failure"),
            )));
        }
        if let Some(direct) = &self.direct {
            // One write of whole blocks, durable when it returns (the tail past the record is
            // zeros, which a scan reads as padding).
            match direct.write_all_at(&self.buf[self.start..self.start + self.padded], self.offset)
            {
                Ok(()) => return Ok(()),
                // The file system refused direct I/O after all: buffered from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.refused_direct = true;
                    self.sync = self.durable;
                }
                Err(e) => {
                    return Err(WriteError::Write(io(
                        &self.path,
                        "cannot write the write-ahead log",
                        e,
                    )));
                }
            }
        }
        self.file
            .write_all_at(
                &self.buf[self.start..self.start + self.rec_len],
                self.offset,
            )
            .map_err(|e| {
                WriteError::Write(io(&self.path, "cannot write the write-ahead log", e))
            })?;
        #[cfg(test)]
        if self.fail_sync {
            return Err(WriteError::Sync(io(
                &self.path,
                "cannot fsync the write-ahead log",
                std::io::Error::other("injected failure"),
            )));
        }
        if self.sync {
            self.file.sync_data().map_err(|e| {
                WriteError::Sync(io(&self.path, "cannot fsync the write-ahead log", e))
            })?;
        }
        Ok(())
    }

    /// Whether the write is made durable: false only with durability off.
    pub(crate) fn durable(&self) -> bool {
        self.durable
    }
}

/// The log's path for a store file.
pub(crate) fn wal_path(store: &Path) -> PathBuf {
    let mut s = store.as_os_str().to_owned();
    s.push(".wal");
    PathBuf::from(s)
}

fn io(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

fn checksum(lsn: u64, body: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(body);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// The log opened `O_DIRECT | O_DSYNC` for durable appends, if the file system allows it.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)
        .ok()
}

/// Direct I/O is only used on Linux; elsewhere, buffered writes and fdatasync.
#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// One record: header and body.
pub(crate) fn encode_record(lsn: u64, changes: &[Change]) -> Result<Vec<u8>, StoreError> {
    // Encode the body straight after a header placeholder: the batch's bytes are copied once,
    // not once into a body and again into the record.
    let mut buf = Vec::with_capacity(HEADER_BYTES + encoded_size_hint(changes));
    buf.resize(HEADER_BYTES, 0);
    let mut rec = postcard::to_extend(changes, buf)
        .map_err(|e| StoreError::Backend(format!("cannot encode a log record: {e}")))?;
    let body_len = u32::try_from(rec.len() - HEADER_BYTES)
        .map_err(|_| StoreError::Backend("a log record over 4 GiB".into()))?;
    let sum = checksum(lsn, &rec[HEADER_BYTES..]);
    rec[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    rec[4..8].copy_from_slice(&body_len.to_le_bytes());
    rec[8..16].copy_from_slice(&lsn.to_le_bytes());
    rec[16..32].copy_from_slice(&sum);
    Ok(rec)
}

/// Whether `buf` has, at `at`, the magic of a later log format ("CAW" and a higher digit): such
/// a log is refused, not taken for the end of the log.
fn newer_format(buf: &[u8], at: usize) -> bool {
    let Some(m) = buf.get(at..at + 4) else {
        return false;
    };
    let [m0, m1, m2, m3] = [m[0], m[1], m[2], m[3]];
    [m3, m2, m1] == *b"CAW" && m0 > MAGIC.to_le_bytes()[0]
}

/// Whether `buf` holds a whole record at `at` with a good checksum and, if given, sequence
/// number `lsn`.
fn record_at(buf: &[u8], at: usize, lsn: Option<u64>) -> bool {
    let Some(h) = buf.get(at..at + HEADER_BYTES) else {
        return false;
    };
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let body_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let found = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    if magic != MAGIC || lsn.is_some_and(|l| l != found) {
        return false;
    }
    buf.get(at + HEADER_BYTES..at + HEADER_BYTES + body_len)
        .is_some_and(|body| h[16..32] == checksum(found, body))
}

impl Wal {
    /// The error for a log written by a newer cairn.
    fn newer(&self) -> StoreError {
        StoreError::Corrupt {
            path: self.path.to_path_buf(),
            detail: "the write-ahead log was written by a newer cairn; upgrade cairn".into(),
        }
    }

    /// Opens (creating) the log of `store`.
    pub(crate) fn open(store: &Path, sync: bool) -> Result<Self, StoreError> {
        let path = wal_path(store);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, "cannot open the write-ahead log", e))?;
        let allocated = file
            .metadata()
            .map_err(|e| io(&path, "cannot read the write-ahead log", e))?
            .len();
        // Not every file system takes O_DIRECT (tmpfs on older kernels): then buffered writes
        // and fdatasync.
        let direct = if sync { open_direct(&path) } else { None };
        Ok(Wal {
            file: Arc::new(file),
            direct: direct.map(Arc::new),
            scratch: Vec::new(),
            path: Arc::from(path.as_path()),
            offset: 0,
            allocated,
            sync,
            #[cfg(test)]
            fail_write: false,
            #[cfg(test)]
            fail_sync: false,
        })
    }

    /// The records after `checkpoint`, in order, as (lsn, changes). Stops at the first torn,
    /// corrupt or out-of-sequence record.
    pub(crate) fn scan(&self, checkpoint: u64) -> Result<Vec<(u64, Vec<Change>)>, StoreError> {
        let len = self
            .file
            .metadata()
            .map_err(|e| io(&self.path, "cannot read the write-ahead log", e))?
            .len();
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.file
            .read_exact_at(&mut buf, 0)
            .map_err(|e| io(&self.path, "cannot read the write-ahead log", e))?;
        let mut out = Vec::new();
        let mut at = 0usize;
        let mut expect: Option<u64> = None;
        while at + HEADER_BYTES <= buf.len() {
            // Records written since session 4 start on block boundaries; older logs have them
            // back to back. A record follows the previous one directly, or at the next
            // boundary; only a whole one with a good checksum and the next sequence number
            // counts (each is checksummed once).
            if newer_format(&buf, at) {
                return Err(self.newer());
            }
            if !record_at(&buf, at, expect) {
                let aligned = align_up(at as u64) as usize;
                if expect.is_none() || aligned == at {
                    break;
                }
                if newer_format(&buf, aligned) {
                    return Err(self.newer());
                }
                if !record_at(&buf, aligned, expect) {
                    break;
                }
                at = aligned;
            }
            let h = &buf[at..at + HEADER_BYTES];
            let body_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let lsn = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
            let body = &buf[at + HEADER_BYTES..at + HEADER_BYTES + body_len];
            expect = Some(lsn + 1);
            if lsn > checkpoint {
                let changes: Vec<Change> =
                    postcard::from_bytes(body).map_err(|e| StoreError::Corrupt {
                        path: self.path.to_path_buf(),
                        detail: format!("write-ahead log record {lsn} cannot be decoded: {e}"),
                    })?;
                out.push((lsn, changes));
            }
            at += HEADER_BYTES + body_len;
        }
        Ok(out)
    }

    /// Bytes written since the last reset.
    pub(crate) fn len(&self) -> u64 {
        self.offset
    }

    /// Appends one record and makes it durable.
    #[cfg(test)]
    pub(crate) fn append(&mut self, lsn: u64, changes: &[Change]) -> Result<(), StoreError> {
        let mut p = self.prepare(lsn, changes)?;
        let r = p.write();
        self.written(p);
        r.map_err(|(WriteError::Write(e) | WriteError::Sync(e))| e)
    }

    /// Tests: buffered writes and fdatasync, as where direct I/O is refused.
    #[cfg(test)]
    pub(crate) fn force_buffered(&mut self) {
        self.direct = None;
    }

    /// Tests: the next write fails.
    #[cfg(test)]
    pub(crate) fn fail_next_write(&mut self) {
        self.fail_write = true;
    }

    /// Tests: the next fdatasync fails.
    #[cfg(test)]
    pub(crate) fn fail_next_sync(&mut self) {
        self.fail_sync = true;
    }

    /// Encodes a record of `changes` with sequence number `lsn` and gives it its place (the next
    /// block boundary): [`PendingWrite::write`] writes it, then [`Wal::written`] takes it back.
    /// Records must be written in the order they were prepared, one at a time.
    pub(crate) fn prepare(
        &mut self,
        lsn: u64,
        changes: &[Change],
    ) -> Result<PendingWrite, StoreError> {
        self.place(&encode_record(lsn, changes)?)
    }

    /// [`Wal::prepare`] for a record already encoded ([`encode_record`], which needs no
    /// access to the log: the writer thread encodes outside the writer's lock).
    pub(crate) fn place(&mut self, rec: &[u8]) -> Result<PendingWrite, StoreError> {
        let padded = align_up(rec.len() as u64);
        self.reserve(self.offset + padded)?;
        let len = padded as usize;
        let mut buf = std::mem::take(&mut self.scratch);
        if buf.len() < len + BLOCK {
            buf.resize(len + BLOCK, 0);
        }
        let start = buf.as_ptr().align_offset(BLOCK).min(BLOCK);
        let block = &mut buf[start..start + len];
        block[..rec.len()].copy_from_slice(rec);
        // Only the padding needs zeroing: the rest is the record.
        block[rec.len()..].fill(0);
        let offset = self.offset;
        self.offset += padded;
        Ok(PendingWrite {
            buf,
            start,
            rec_len: rec.len(),
            padded: len,
            offset,
            file: Arc::clone(&self.file),
            direct: self.direct.clone(),
            // A direct write is durable when it returns; a buffered one needs an fdatasync.
            sync: self.sync && self.direct.is_none(),
            durable: self.sync,
            path: Arc::clone(&self.path),
            refused_direct: false,
            #[cfg(test)]
            fail_write: std::mem::take(&mut self.fail_write),
            #[cfg(test)]
            fail_sync: std::mem::take(&mut self.fail_sync),
        })
    }

    /// Takes back a record [`PendingWrite::write`] wrote (its scratch space, and whether the
    /// file system refused direct I/O: buffered writes and fdatasync from then on).
    pub(crate) fn written(&mut self, mut p: PendingWrite) {
        if p.refused_direct {
            self.direct = None;
        }
        if p.buf.capacity() >= self.scratch.capacity() {
            self.scratch = std::mem::take(&mut p.buf);
        }
    }

    /// Gives the log its first [`RESERVE_STEP`] bytes now, at open, so the first commit does
    /// not pay for writing and syncing them.
    pub(crate) fn preallocate(&mut self) -> Result<(), StoreError> {
        if self.sync {
            self.reserve(RESERVE_STEP)?;
        }
        Ok(())
    }

    /// Makes sure the file's first `end` bytes exist, writing zeros in [`RESERVE_STEP`] steps
    /// (zeros read as the end of the log) and syncing the new size once per step.
    fn reserve(&mut self, end: u64) -> Result<(), StoreError> {
        const STEP: u64 = RESERVE_STEP;
        if end <= self.allocated {
            return Ok(());
        }
        let new_len = end.div_ceil(STEP) * STEP;
        let zeros = vec![0u8; usize::try_from(new_len - self.allocated).unwrap_or(0)];
        self.file
            .write_all_at(&zeros, self.allocated)
            .map_err(|e| io(&self.path, "cannot extend the write-ahead log", e))?;
        if self.sync {
            self.file
                .sync_all()
                .map_err(|e| io(&self.path, "cannot fsync the write-ahead log", e))?;
        }
        self.allocated = new_len;
        Ok(())
    }

    /// Starts the next cycle at the beginning of the file (after a checkpoint). The old
    /// records stay until overwritten; their sequence numbers keep a scan from using them.
    pub(crate) fn reset(&mut self) {
        self.offset = 0;
    }

    /// Empties the file (on a clean close, after a final checkpoint, and for a new store: a log
    /// left by a deleted store file must not be replayed into a new one).
    pub(crate) fn truncate(&mut self) -> Result<(), StoreError> {
        self.offset = 0;
        self.allocated = 0;
        self.file
            .set_len(0)
            .map_err(|e| io(&self.path, "cannot truncate the write-ahead log", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(i: u64) -> Change {
        Change::Event {
            run: 7,
            seq: i,
            bytes: vec![i as u8; 10],
        }
    }

    #[test]
    fn records_round_trip_and_a_checkpoint_skips_applied_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut w = Wal::open(&store, true).unwrap();
        for lsn in 1..=5 {
            w.append(lsn, &[change(lsn)]).unwrap();
        }
        let all = w.scan(0).unwrap();
        assert_eq!(
            all.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(all[2].1, vec![change(3)]);
        let after = w.scan(3).unwrap();
        assert_eq!(
            after.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![4, 5]
        );
    }

    #[test]
    fn byte_fields_keep_the_wire_format_of_logs_written_before_serde_bytes() {
        #[derive(Serialize)]
        enum Old {
            Event { run: u128, seq: u64, bytes: Vec<u8> },
            Run { run: u128, row: Vec<u8> },
        }
        let bytes: Vec<u8> = (0..200u8).collect();
        let old = postcard::to_allocvec(&vec![
            Old::Event {
                run: 7,
                seq: 3,
                bytes: bytes.clone(),
            },
            Old::Run {
                run: 7,
                row: bytes.clone(),
            },
        ])
        .unwrap();
        let new = vec![
            Change::Event {
                run: 7,
                seq: 3,
                bytes: bytes.clone(),
            },
            Change::Run { run: 7, row: bytes },
        ];
        assert_eq!(postcard::to_allocvec(&new).unwrap(), old);
        assert_eq!(postcard::from_bytes::<Vec<Change>>(&old).unwrap(), new);
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut w = Wal::open(&store, true).unwrap();
        w.append(1, &[change(1)]).unwrap();
        w.append(2, &[change(2)]).unwrap();
        // Cut into the second record, which starts at the second block (the file beyond the
        // records is zeros).
        assert_eq!(w.len(), 2 * BLOCK as u64);
        let f = OpenOptions::new()
            .write(true)
            .open(wal_path(&store))
            .unwrap();
        f.set_len(BLOCK as u64 + HEADER_BYTES as u64 + 3).unwrap();
        assert_eq!(w.scan(0).unwrap().len(), 1);
        // A flipped bit fails the checksum.
        let mut bytes = std::fs::read(wal_path(&store)).unwrap();
        bytes[HEADER_BYTES + 2] ^= 1;
        std::fs::write(wal_path(&store), &bytes).unwrap();
        assert!(w.scan(0).unwrap().is_empty());
    }

    #[test]
    fn leftovers_of_an_earlier_cycle_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut w = Wal::open(&store, true).unwrap();
        for lsn in 1..=4 {
            w.append(lsn, &[change(lsn)]).unwrap();
        }
        // Checkpoint at 4, then a new cycle writes 5 over the start of the file.
        w.reset();
        w.append(5, &[change(5)]).unwrap();
        let after = w.scan(4).unwrap();
        assert_eq!(after.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![5]);
    }

    #[test]
    fn an_opened_log_is_preallocated() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut w = Wal::open(&store, true).unwrap();
        w.preallocate().unwrap();
        let len = || std::fs::metadata(wal_path(&store)).unwrap().len();
        assert_eq!(
            len(),
            RESERVE_STEP,
            "space for the first commits is written at open"
        );
        w.append(1, &[change(1)]).unwrap();
        assert_eq!(len(), RESERVE_STEP);
        assert_eq!(w.scan(0).unwrap().len(), 1);
    }

    #[test]
    fn buffered_appends_when_direct_io_is_unavailable_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut w = Wal::open(&store, true).unwrap();
        // What a file system without O_DIRECT gets: buffered writes and fdatasync.
        w.direct = None;
        for lsn in 1..=3 {
            w.append(lsn, &[change(lsn)]).unwrap();
        }
        assert_eq!(
            w.len(),
            3 * BLOCK as u64,
            "records start on block boundaries"
        );
        let all = w.scan(0).unwrap();
        assert_eq!(
            all.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(all[1].1, vec![change(2)]);
    }

    #[test]
    fn a_log_written_before_block_alignment_still_replays() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        // Records back to back, as cairn wrote them before session 4, then zeros.
        let mut bytes = Vec::new();
        for lsn in 1..=3 {
            bytes.extend(encode_record(lsn, &[change(lsn)]).unwrap());
        }
        bytes.resize(2 * BLOCK, 0);
        std::fs::write(wal_path(&store), &bytes).unwrap();
        let w = Wal::open(&store, true).unwrap();
        let all = w.scan(0).unwrap();
        assert_eq!(
            all.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(all[2].1, vec![change(3)]);
    }

    #[test]
    fn a_leftover_record_on_the_next_block_is_not_taken_for_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut w = Wal::open(&store, true).unwrap();
        for lsn in 1..=3 {
            w.append(lsn, &[change(lsn)]).unwrap();
        }
        // A new cycle after a checkpoint at 3 writes record 4 over the first block; records 2
        // and 3 of the old cycle stay on the next blocks.
        w.reset();
        w.append(4, &[change(4)]).unwrap();
        let after = w.scan(3).unwrap();
        assert_eq!(after.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn a_record_of_a_newer_log_format_is_refused_not_taken_for_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut w = Wal::open(&store, true).unwrap();
        w.append(1, &[change(1)]).unwrap();
        w.append(2, &[change(2)]).unwrap();
        // The second record (on the second block) as a later cairn would mark it: "CAW2".
        let mut bytes = std::fs::read(wal_path(&store)).unwrap();
        bytes[BLOCK] = b'2';
        std::fs::write(wal_path(&store), &bytes).unwrap();
        let err = w.scan(0).unwrap_err();
        assert!(err.to_string().contains("newer cairn"), "{err}");
        // The same at the start of the log.
        bytes[0] = b'2';
        std::fs::write(wal_path(&store), &bytes).unwrap();
        assert!(w.scan(0).unwrap_err().to_string().contains("newer cairn"));
    }
}
