//! A replica's disk on a real machine: the [`RaftDisk`] written through to a redb file, each
//! change in one transaction. The vote, the log and snapshots are made durable (fsync) before
//! the store call that made them returns; the commit index and the applied state are not
//! waited for (redb makes them durable with the next durable transaction; see `store.rs` on why
//! Raft does not need them to be).
//!
//! The in-memory [`RaftDisk`] stays the one the store reads, so the simulator and a real
//! replica run the same store code; here is only what reaches the file and what is read back
//! at start. A data directory belongs to one cluster: its cluster id is written when it is
//! made, and a directory of another cluster (or of a newer format) is refused, never reused.

// openraft fixes the error type (`StorageError`, large); our helpers return it as is.
#![allow(clippy::result_large_err)]

use super::store::{AppliedState, RaftDisk, SharedDisk, StoredSnapshot};
use super::TypeConfig;
use crate::upgrade::UpgradeState;
use openraft::{Entry, LogId, SnapshotMeta, StorageError, StorageIOError, Vote};
use protocol::codec;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The format of a data directory this build writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 1;
/// The file in a data directory.
pub const FILE_NAME: &str = "raft.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

mod key {
    pub const CLUSTER: &str = "cluster";
    pub const FORMAT: &str = "format";
    pub const VOTE: &str = "vote";
    pub const COMMITTED: &str = "committed";
    pub const LAST_PURGED: &str = "last_purged";
    pub const APPLIED: &str = "applied";
    pub const SNAPSHOT: &str = "snapshot";
}

/// Why a data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: another process has this data directory open (is this replica already running?)")]
    InUse { path: PathBuf },
    #[error(
        "{path}: this data directory belongs to cluster `{found}`, not `{expected}`: never reuse a data \
         directory across clusters (move it away to start this replica fresh)"
    )]
    OtherCluster { path: PathBuf, found: String, expected: String },
    #[error("{path}: data directory format {found} is newer than this build reads ({FORMAT_VERSION}): upgrade imago")]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("{path}: cannot read `{what}`: {message}")]
    Corrupt { path: PathBuf, what: String, message: String },
}

/// The redb file behind one replica's disk.
pub struct Durable {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Durable({})", self.path.display())
    }
}

/// A snapshot as it is stored.
#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    data: Vec<u8>,
}

fn write_error(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::<u64>::write(&std::io::Error::other(e.to_string())).into()
}

fn encode(value: &impl Serialize) -> Result<Vec<u8>, StorageError<u64>> {
    codec::encode(value).map_err(write_error)
}

/// One change to the file.
pub(super) enum Change<'a> {
    Vote(&'a Vote<u64>),
    Committed(Option<LogId<u64>>),
    Append(&'a [Entry<TypeConfig>]),
    /// Removes the entries from this index on.
    Truncate(u64),
    /// Removes the entries up to and including this log id, and remembers it.
    Purge(LogId<u64>),
    Applied(&'a AppliedState),
    Snapshot(&'a StoredSnapshot, Option<&'a AppliedState>),
}

impl Durable {
    /// Writes one change in one transaction; returns once it is durable, unless it is the
    /// commit index or the applied state.
    pub(super) fn write(&self, change: Change<'_>) -> Result<(), StorageError<u64>> {
        let mut txn = self.db.begin_write().map_err(write_error)?;
        if matches!(change, Change::Committed(_) | Change::Applied(_)) {
            txn.set_durability(redb::Durability::None).map_err(write_error)?;
        }
        {
            let mut meta = txn.open_table(META).map_err(write_error)?;
            let mut log = txn.open_table(LOG).map_err(write_error)?;
            match change {
                Change::Vote(vote) => {
                    meta.insert(key::VOTE, encode(vote)?.as_slice()).map_err(write_error)?;
                }
                Change::Committed(committed) => {
                    meta.insert(key::COMMITTED, encode(&committed)?.as_slice()).map_err(write_error)?;
                }
                Change::Append(entries) => {
                    for entry in entries {
                        log.insert(entry.log_id.index, encode(entry)?.as_slice()).map_err(write_error)?;
                    }
                }
                Change::Truncate(from) => {
                    log.retain_in(from.., |_, _| false).map_err(write_error)?;
                }
                Change::Purge(upto) => {
                    log.retain_in(..=upto.index, |_, _| false).map_err(write_error)?;
                    meta.insert(key::LAST_PURGED, encode(&Some(upto))?.as_slice()).map_err(write_error)?;
                }
                Change::Applied(applied) => {
                    meta.insert(key::APPLIED, encode(applied)?.as_slice()).map_err(write_error)?;
                }
                Change::Snapshot(snapshot, applied) => {
                    let record = SnapshotRecord { meta: snapshot.meta.clone(), data: snapshot.data.clone() };
                    meta.insert(key::SNAPSHOT, encode(&record)?.as_slice()).map_err(write_error)?;
                    if let Some(applied) = applied {
                        meta.insert(key::APPLIED, encode(applied)?.as_slice()).map_err(write_error)?;
                    }
                }
            }
        }
        txn.commit().map_err(write_error)
    }
}

/// Opens (or makes) the data directory `dir` of a replica of cluster `cluster_id`. A new
/// directory's state machine starts from `genesis`.
pub fn open_data_dir(dir: &Path, cluster_id: &str, genesis: UpgradeState) -> Result<SharedDisk, DataDirError> {
    let path = dir.join(FILE_NAME);
    let io = |e: &dyn std::fmt::Display| DataDirError::Io { path: path.clone(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
    let db = redb::Database::create(&path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => DataDirError::InUse { path: path.clone() },
        other => io(&other),
    })?;
    let corrupt = |what: &str, e: &dyn std::fmt::Display| DataDirError::Corrupt {
        path: path.clone(),
        what: what.to_string(),
        message: e.to_string(),
    };
    // A new directory is marked as this cluster's, in this format, before anything else.
    {
        let txn = db.begin_write().map_err(|e| io(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| io(&e))?;
            txn.open_table(LOG).map_err(|e| io(&e))?;
            if meta.get(key::CLUSTER).map_err(|e| io(&e))?.is_none() {
                meta.insert(key::CLUSTER, cluster_id.as_bytes()).map_err(|e| io(&e))?;
                meta.insert(key::FORMAT, FORMAT_VERSION.to_be_bytes().as_slice()).map_err(|e| io(&e))?;
            }
        }
        txn.commit().map_err(|e| io(&e))?;
    }
    let txn = db.begin_read().map_err(|e| io(&e))?;
    let meta = txn.open_table(META).map_err(|e| io(&e))?;
    let raw = |k: &str| -> Result<Option<Vec<u8>>, DataDirError> {
        Ok(meta.get(k).map_err(|e| io(&e))?.map(|v| v.value().to_vec()))
    };
    let found = String::from_utf8_lossy(&raw(key::CLUSTER)?.unwrap_or_default()).into_owned();
    if found != cluster_id {
        return Err(DataDirError::OtherCluster { path, found, expected: cluster_id.to_string() });
    }
    let format = raw(key::FORMAT)?
        .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt(key::FORMAT, &"missing"))?;
    if format > FORMAT_VERSION {
        return Err(DataDirError::NewerFormat { path, found: format });
    }
    fn decoded<T: DeserializeOwned>(bytes: Option<Vec<u8>>) -> Result<Option<T>, codec::CodecError> {
        bytes.map(|b| codec::decode(&b)).transpose()
    }
    let mut disk = RaftDisk {
        vote: decoded(raw(key::VOTE)?).map_err(|e| corrupt(key::VOTE, &e))?,
        committed: decoded::<Option<LogId<u64>>>(raw(key::COMMITTED)?)
            .map_err(|e| corrupt(key::COMMITTED, &e))?
            .flatten(),
        last_purged: decoded::<Option<LogId<u64>>>(raw(key::LAST_PURGED)?)
            .map_err(|e| corrupt(key::LAST_PURGED, &e))?
            .flatten(),
        applied: match decoded(raw(key::APPLIED)?).map_err(|e| corrupt(key::APPLIED, &e))? {
            Some(applied) => applied,
            None => AppliedState { state: genesis, ..AppliedState::default() },
        },
        snapshot: decoded::<SnapshotRecord>(raw(key::SNAPSHOT)?)
            .map_err(|e| corrupt(key::SNAPSHOT, &e))?
            .map(|r| StoredSnapshot { meta: r.meta, data: r.data }),
        ..RaftDisk::default()
    };
    let log = txn.open_table(LOG).map_err(|e| io(&e))?;
    for item in log.iter().map_err(|e| io(&e))? {
        let (index, bytes) = item.map_err(|e| io(&e))?;
        let index = index.value();
        let entry: Entry<TypeConfig> =
            codec::decode(bytes.value()).map_err(|e| corrupt(&format!("log entry {index}"), &e))?;
        if entry.log_id.index != index {
            return Err(corrupt(&format!("log entry {index}"), &format!("holds entry {}", entry.log_id.index)));
        }
        disk.log.insert(index, entry);
    }
    drop(log);
    drop(meta);
    drop(txn);
    disk.durable = Some(Durable { db, path: path.clone() });
    Ok(Arc::new(Mutex::new(disk)))
}
