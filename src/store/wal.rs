//! The write-ahead log of a store opened with
//! [`StoreOptions::write_ahead_log`](super::StoreOptions::write_ahead_log):
//! what makes a group commit durable without flushing redb's pages.
//!
//! A group of replicated writes (`Store::commit_group_exposed`) commits its
//! redb transaction without a flush; the entries it wrote are appended here
//! as one record and the file is fdatasync'ed, one sequential write instead
//! of a page per B-tree leaf touched. For a local write the record holds the
//! entry *after* the write, so replaying it mints no dot and reads no clock.
//! Every [`StoreOptions::checkpoint_interval`](super::StoreOptions::checkpoint_interval)
//! (or [`MAX_LOG_BYTES`]) a group commits with a flush instead: a
//! checkpoint, which makes everything before it durable in redb, records the
//! next log generation in `meta` in the same transaction, and starts the log
//! afresh.
//!
//! File: a header of [`HEADER_BYTES`] (magic, generation, xxh3 of both),
//! then records of (payload length u32 LE, xxh3 of the payload u64 LE,
//! payload), the payload being the postcard encoding of `Vec<LoggedEntry>`.
//!
//! Invariants:
//! - A record is synced before any write it holds is reported durable.
//! - Replay merges the records into the store as entries of another replica
//!   would be: CRDT merges, idempotent, so a record whose writes the
//!   checkpoint already holds changes nothing.
//! - A log of an older generation than the store's is stale (the checkpoint
//!   that moved the generation on holds all of it) and is discarded. So is
//!   an incomplete last record, or a zeroed tail: its sync never finished,
//!   so nothing in it was reported durable. Any other damage stops the open
//!   with an error naming the file and offset.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"GKVWAL01";
pub const HEADER_BYTES: usize = 24;
const RECORD_HEADER_BYTES: usize = 12;
/// A log this long is checkpointed whatever the interval: bounds the time a
/// replay takes at open, and the memory of the pages redb holds unflushed.
pub const MAX_LOG_BYTES: u64 = 64 << 20;
/// The largest record the decoder accepts (a group is bounded well below).
const MAX_RECORD_BYTES: usize = 256 << 20;

/// One entry a group wrote, as it is to be merged on replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEntry {
    pub partition: u16,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub entry: Vec<u8>,
}

/// What a log file holds, read against the store's generation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// Entries of the complete records, in order.
    pub entries: Vec<LoggedEntry>,
    /// Bytes of the file up to the end of the last complete record (0 for
    /// a stale or empty log).
    pub valid_bytes: usize,
    /// Bytes after it: an incomplete or zeroed tail, dropped.
    pub torn_bytes: usize,
}

/// Reads a log's bytes. `generation` is the store's: an older log is
/// stale (nothing to replay), a newer one or any damage before the tail an
/// error (the reason, without the path).
pub fn decode(bytes: &[u8], generation: u64) -> Result<Decoded, String> {
    if bytes.len() < HEADER_BYTES {
        // A header never completed: nothing after it was ever synced.
        return Ok(Decoded::default());
    }
    let (header, mut rest) = bytes.split_at(HEADER_BYTES);
    if &header[..8] != MAGIC {
        return Err("not a gossipkv write-ahead log (bad magic)".into());
    }
    let found = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let sum = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
    if xxhash_rust::xxh3::xxh3_64(&header[..16]) != sum {
        return Err("the header checksum does not match".into());
    }
    if found < generation {
        return Ok(Decoded::default());
    }
    if found > generation {
        return Err(format!(
            "log generation {found} is ahead of the store's {generation} (the log belongs to another copy of the store)"
        ));
    }
    let mut decoded = Decoded {
        valid_bytes: HEADER_BYTES,
        ..Decoded::default()
    };
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let torn = |d: &mut Decoded| {
            d.torn_bytes = bytes.len() - offset;
        };
        if rest.iter().all(|&b| b == 0) || rest.len() < RECORD_HEADER_BYTES {
            torn(&mut decoded);
            break;
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or_default()) as usize;
        let sum = u64::from_le_bytes(rest[4..12].try_into().unwrap_or_default());
        if len > MAX_RECORD_BYTES {
            return Err(format!(
                "record at offset {offset} claims {len} bytes (at most {MAX_RECORD_BYTES})"
            ));
        }
        let Some(payload) = rest.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len) else {
            torn(&mut decoded);
            break;
        };
        let after = &rest[RECORD_HEADER_BYTES + len..];
        if xxhash_rust::xxh3::xxh3_64(payload) != sum {
            if after.is_empty() {
                torn(&mut decoded);
                break;
            }
            return Err(format!(
                "the record at offset {offset} is damaged (checksum mismatch) and {} bytes follow it",
                after.len()
            ));
        }
        let entries: Vec<LoggedEntry> = postcard::from_bytes(payload).map_err(|e| {
            format!("the record at offset {offset} passes its checksum but does not decode: {e}")
        })?;
        decoded.entries.extend(entries);
        rest = after;
        decoded.valid_bytes = bytes.len() - rest.len();
    }
    Ok(decoded)
}

fn header(generation: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&h[..16]);
    h[16..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// A whole log: the header of `generation` and one record per group (for
/// tests and fuzzing seeds).
pub fn encode_log(generation: u64, groups: &[Vec<LoggedEntry>]) -> Vec<u8> {
    let mut bytes = header(generation).to_vec();
    for group in groups {
        bytes.extend(encode_record(group));
    }
    bytes
}

/// Encodes one record (header and payload).
pub fn encode_record(entries: &[LoggedEntry]) -> Vec<u8> {
    // A Vec of byte strings always serializes.
    let payload = postcard::to_allocvec(entries).unwrap_or_default();
    let mut record = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    record.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    record
}

/// The open log of a store.
pub(super) struct Wal {
    file: File,
    path: PathBuf,
    pub(super) generation: u64,
    /// Record bytes appended since the header.
    bytes: u64,
    last_checkpoint: Instant,
    interval: Duration,
    /// An append or a reset failed: the file may end in a partial record or
    /// carry an old header, so nothing is appended until a checkpoint has
    /// reset it.
    broken: bool,
}

impl Wal {
    /// Opens (creating) the log at `path` and reads what it holds for a
    /// store at `generation`. The file is left as read: the caller replays
    /// the entries, checkpoints and then [`Wal::reset`]s it.
    pub(super) fn open(
        path: &Path,
        generation: u64,
        interval: Duration,
    ) -> Result<(Wal, Decoded), crate::Error> {
        let io = |source: std::io::Error| crate::Error::WriteAheadLog {
            path: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let decoded = decode(&bytes, generation).map_err(|reason| crate::Error::Corrupt {
            what: format!("write-ahead log {}", path.display()),
            reason,
        })?;
        let wal = Wal {
            file,
            path: path.to_path_buf(),
            generation,
            bytes: (decoded.valid_bytes.saturating_sub(HEADER_BYTES)) as u64,
            last_checkpoint: Instant::now(),
            interval,
            // Until the first reset writes a header of this generation.
            broken: true,
        };
        Ok((wal, decoded))
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the next group should be a checkpoint.
    pub(super) fn checkpoint_due(&self) -> bool {
        self.broken
            || self.bytes >= MAX_LOG_BYTES
            || (self.bytes > 0 && self.last_checkpoint.elapsed() >= self.interval)
    }

    /// Whether records have been appended since the last checkpoint.
    pub(super) fn is_empty(&self) -> bool {
        self.bytes == 0 && !self.broken
    }

    /// Appends one record and syncs it. On failure the log is broken until
    /// the next checkpoint.
    pub(super) fn append(&mut self, entries: &[LoggedEntry]) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::other(
                "the log is awaiting a checkpoint after an earlier failure",
            ));
        }
        let record = encode_record(entries);
        let result = self
            .file
            .write_all(&record)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.bytes += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Starts the log afresh at `generation`, after a checkpoint made
    /// everything in it durable in redb (and recorded `generation` there).
    /// Not synced: until the next append syncs it, a crash leaves either
    /// the old generation's log (stale) or an incomplete header (empty).
    pub(super) fn reset(&mut self, generation: u64) -> std::io::Result<()> {
        self.generation = generation;
        self.last_checkpoint = Instant::now();
        let result = self
            .file
            .set_len(0)
            .and_then(|()| self.file.seek(SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(&header(generation)));
        match result {
            Ok(()) => {
                self.bytes = 0;
                self.broken = false;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u8) -> LoggedEntry {
        LoggedEntry {
            partition: u16::from(i),
            key: vec![b'k', i],
            entry: vec![i; 3],
        }
    }

    use encode_log as log;

    #[test]
    fn records_round_trip() {
        let bytes = log(3, &[vec![entry(1), entry(2)], vec![entry(3)]]);
        let d = decode(&bytes, 3).unwrap();
        assert_eq!(d.entries, vec![entry(1), entry(2), entry(3)]);
        assert_eq!((d.valid_bytes, d.torn_bytes), (bytes.len(), 0));
    }

    #[test]
    fn an_older_generation_or_an_unfinished_header_is_empty() {
        let bytes = log(2, &[vec![entry(1)]]);
        assert_eq!(decode(&bytes, 3).unwrap(), Decoded::default());
        assert_eq!(decode(&bytes[..10], 2).unwrap(), Decoded::default());
        assert_eq!(decode(&[], 0).unwrap(), Decoded::default());
        let err = decode(&bytes, 1).unwrap_err();
        assert!(err.contains("ahead"), "{err}");
    }

    #[test]
    fn an_incomplete_or_zeroed_tail_is_dropped() {
        let full = log(0, &[vec![entry(1)], vec![entry(2)]]);
        let one = log(0, &[vec![entry(1)]]).len();
        for cut in one + 1..full.len() {
            let d = decode(&full[..cut], 0).unwrap();
            assert_eq!(d.entries, vec![entry(1)], "cut at {cut}");
            assert_eq!(d.valid_bytes, one);
            assert_eq!(d.torn_bytes, cut - one);
        }
        // The last record's bytes damaged: its write was torn.
        let mut torn = full.clone();
        *torn.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&torn, 0).unwrap().entries, vec![entry(1)]);
        let mut zeroed = full.clone();
        zeroed.extend([0u8; 100]);
        let d = decode(&zeroed, 0).unwrap();
        assert_eq!(d.entries.len(), 2);
        assert_eq!(d.torn_bytes, 100);
    }

    #[test]
    fn damage_before_the_tail_is_an_error() {
        let mut bytes = log(0, &[vec![entry(1)], vec![entry(2)]]);
        bytes[HEADER_BYTES + RECORD_HEADER_BYTES] ^= 0xff;
        let err = decode(&bytes, 0).unwrap_err();
        assert!(
            err.contains("offset 24") && err.contains("damaged"),
            "{err}"
        );
        let mut bad_header = log(0, &[]);
        bad_header[9] ^= 1;
        assert!(decode(&bad_header, 0).unwrap_err().contains("header"));
        assert!(decode(&[7u8; 40], 0).unwrap_err().contains("magic"));
    }
}
