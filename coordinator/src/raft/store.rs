//! In-memory Raft log and state machine over a shared "disk".
//!
//! A [`RaftDisk`] outlives the Raft instance that writes it: the simulator crashes a replica by
//! shutting its Raft down and starts a new one on the same disk. Every writer carries the
//! incarnation it was opened with; a write from an older incarnation (a crashed instance still
//! winding down) is refused, so a crash loses nothing durable and adds nothing after it.
//! A real replica's disk is written through to a file (`durable.rs`) by the same code.
//!
//! **What a crash keeps.** The vote, the log (appends, truncations, purges) and snapshots are
//! durable before the call that writes them returns. The commit index and the applied state are
//! written without waiting for the disk: Raft needs neither to be durable (the committed log is,
//! on a majority, and a restarted replica applies it again), and each fsync sat on the path of
//! every decision (a switch waits for one Raft write per acknowledgement). A later durable write
//! makes them durable too. The simulator loses them as a crash of the real file would: an
//! incarnation starts from the state machine and commit index as of the last durable write
//! ([`RaftDisk::unsynced_since`]); a snapshot is durable, so no purged entry is ever needed again.

// openraft fixes the error type (`StorageError`, large); our helpers return it as is.
#![allow(clippy::result_large_err)]

use super::durable::{Change, Durable};
use super::TypeConfig;
use crate::upgrade::{Applied, Command, UpgradeState, STATE_FORMAT_MAX};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use protocol::codec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

type C = TypeConfig;

/// The applied state as it is snapshotted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, openraft::BasicNode>,
    pub state: UpgradeState,
}

/// A stored snapshot.
#[derive(Clone, Debug)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta<u64, openraft::BasicNode>,
    pub data: Vec<u8>,
}

/// Everything a replica keeps across crashes.
#[derive(Debug, Default)]
pub struct RaftDisk {
    /// Bumped on every (re)start; writers from older incarnations are refused.
    pub incarnation: u64,
    pub vote: Option<Vote<u64>>,
    pub committed: Option<LogId<u64>>,
    pub log: BTreeMap<u64, Entry<C>>,
    pub last_purged: Option<LogId<u64>>,
    pub applied: AppliedState,
    pub snapshot: Option<StoredSnapshot>,
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
    /// The file every change is written through to (a real replica; none in the simulator).
    pub durable: Option<Durable>,
    /// The applied state and commit index as of the last durable write, kept while either was
    /// changed since (a crash goes back to them); `None`: both are durable as they are.
    pub unsynced_since: Option<(AppliedState, Option<LogId<u64>>)>,
    /// A planted bug in the state machine (simulator only).
    #[cfg(feature = "planted-bugs")]
    pub bug: Option<coordinator_core::ApplyBug>,
}

impl RaftDisk {
    /// Keeps what a crash would go back to, before the applied state or the commit index change
    /// without a durable write.
    fn unsynced(&mut self) {
        if self.unsynced_since.is_none() {
            self.unsynced_since = Some((self.applied.clone(), self.committed));
        }
    }

    /// A durable write was made: everything written before it is durable too.
    fn synced(&mut self) {
        self.unsynced_since = None;
    }
}

/// A disk shared by successive incarnations of one replica.
pub type SharedDisk = Arc<Mutex<RaftDisk>>;

/// A fresh, empty disk.
pub fn new_disk() -> SharedDisk {
    Arc::new(Mutex::new(RaftDisk::default()))
}

/// A fresh disk whose state machine starts from `genesis` (the cluster file's roster: every
/// replica of a cluster must start from the same one).
pub fn new_disk_with(genesis: UpgradeState) -> SharedDisk {
    let mut disk = RaftDisk::default();
    disk.applied.state = genesis;
    Arc::new(Mutex::new(disk))
}

fn lock(disk: &SharedDisk) -> MutexGuard<'_, RaftDisk> {
    disk.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes `change` to the disk's file, if it has one, before the caller changes memory.
fn write_through(d: &RaftDisk, change: Change<'_>) -> Result<(), StorageError<u64>> {
    match &d.durable {
        Some(file) => file.write(change),
        None => Ok(()),
    }
}

fn stale() -> StorageError<u64> {
    StorageIOError::<u64>::write(&std::io::Error::other("stale incarnation: this replica instance has crashed")).into()
}

/// Opens one incarnation's writers; returns them and the new incarnation number.
pub fn open(disk: &SharedDisk) -> (LogStore, StateMachineStore, watch::Receiver<u64>) {
    let incarnation = {
        let mut d = lock(disk);
        d.incarnation += 1;
        // What was not durable when the last incarnation ended is lost (a real replica starts
        // from its file, where nothing is pending).
        if let Some((applied, committed)) = d.unsynced_since.take() {
            d.applied = applied;
            d.committed = committed;
        }
        d.incarnation
    };
    let version = lock(disk).applied.state.version;
    let (tx, rx) = watch::channel(version);
    (
        LogStore { disk: disk.clone(), incarnation },
        StateMachineStore { disk: disk.clone(), incarnation, applied_tx: Arc::new(tx) },
        rx,
    )
}

/// The Raft log of one incarnation.
#[derive(Clone, Debug)]
pub struct LogStore {
    disk: SharedDisk,
    incarnation: u64,
}

impl LogStore {
    fn write(&self) -> Result<MutexGuard<'_, RaftDisk>, StorageError<u64>> {
        let d = lock(&self.disk);
        if d.incarnation != self.incarnation {
            return Err(stale());
        }
        Ok(d)
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, StorageError<u64>> {
        Ok(lock(&self.disk).log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<u64>> {
        let d = lock(&self.disk);
        let last = d.log.values().next_back().map(|e| e.log_id).or(d.last_purged);
        Ok(LogState { last_purged_log_id: d.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let mut d = self.write()?;
        write_through(&d, Change::Vote(vote))?;
        d.synced();
        d.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(lock(&self.disk).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError<u64>> {
        let mut d = self.write()?;
        d.unsynced();
        write_through(&d, Change::Committed(committed))?;
        d.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(lock(&self.disk).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<C>> + Send,
        I::IntoIter: Send,
    {
        {
            let mut d = self.write()?;
            let entries: Vec<Entry<C>> = entries.into_iter().collect();
            write_through(&d, Change::Append(&entries))?;
            d.synced();
            for entry in entries {
                d.log.insert(entry.log_id.index, entry);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut d = self.write()?;
        write_through(&d, Change::Truncate(log_id.index))?;
        d.synced();
        d.log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut d = self.write()?;
        write_through(&d, Change::Purge(log_id))?;
        d.synced();
        d.last_purged = Some(log_id);
        let keep = d.log.split_off(&(log_id.index + 1));
        d.log = keep;
        Ok(())
    }
}

/// The state machine of one incarnation. Readers (the service) read the disk directly.
#[derive(Clone, Debug)]
pub struct StateMachineStore {
    disk: SharedDisk,
    incarnation: u64,
    applied_tx: Arc<watch::Sender<u64>>,
}

impl StateMachineStore {
    fn write(&self) -> Result<MutexGuard<'_, RaftDisk>, StorageError<u64>> {
        let d = lock(&self.disk);
        if d.incarnation != self.incarnation {
            return Err(stale());
        }
        Ok(d)
    }
}

fn io_error(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::<u64>::read_state_machine(&e).into()
}

impl RaftSnapshotBuilder<C> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, StorageError<u64>> {
        let mut d = self.write()?;
        let data = codec::encode(&d.applied).map_err(io_error)?;
        d.snapshots_built += 1;
        let last = d.applied.last_applied;
        let snapshot_id =
            format!("{}-{}-{}", last.map_or(0, |l| l.leader_id.term), last.map_or(0, |l| l.index), d.snapshots_built);
        let meta = SnapshotMeta { last_log_id: last, last_membership: d.applied.membership.clone(), snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data: data.clone() };
        write_through(&d, Change::Snapshot(&stored, None))?;
        d.synced();
        d.snapshot = Some(stored);
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<C> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, openraft::BasicNode>), StorageError<u64>> {
        let d = lock(&self.disk);
        Ok((d.applied.last_applied, d.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<C>> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        let version = {
            let mut d = self.write()?;
            d.unsynced();
            for entry in entries {
                // A format this build cannot read stops the replica before it applies anything
                // written in it (the policy: a newer format is refused, loudly).
                if let EntryPayload::Normal(Command::RaiseFormat { to }) = &entry.payload {
                    if *to > STATE_FORMAT_MAX.0 {
                        let why = format!(
                            "the cluster's replicated state was raised to format {to}, but this build reads up to \
                             format {}: upgrade imago on this replica",
                            STATE_FORMAT_MAX.0
                        );
                        tracing::error!("{why}");
                        return Err(io_error(std::io::Error::other(why)));
                    }
                }
                d.applied.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => Applied::Accepted,
                    #[cfg(feature = "planted-bugs")]
                    EntryPayload::Normal(command) => {
                        let bug = d.bug;
                        d.applied.state.apply_planted(&command, bug)
                    }
                    #[cfg(not(feature = "planted-bugs"))]
                    EntryPayload::Normal(command) => d.applied.state.apply(&command),
                    EntryPayload::Membership(membership) => {
                        d.applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        Applied::Accepted
                    }
                };
                results.push(result);
            }
            write_through(&d, Change::Applied(&d.applied))?;
            d.applied.state.version
        };
        self.applied_tx.send_if_modified(|v| std::mem::replace(v, version) != version);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let applied: AppliedState = codec::decode(&data).map_err(io_error)?;
        let version = {
            let mut d = self.write()?;
            let stored = StoredSnapshot { meta: meta.clone(), data };
            write_through(&d, Change::Snapshot(&stored, Some(&applied)))?;
            d.synced();
            d.applied = applied;
            d.snapshots_installed += 1;
            d.snapshot = Some(stored);
            d.applied.state.version
        };
        self.applied_tx.send_if_modified(|v| std::mem::replace(v, version) != version);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<C>>, StorageError<u64>> {
        let d = lock(&self.disk);
        Ok(d.snapshot
            .as_ref()
            .map(|s| Snapshot { meta: s.meta.clone(), snapshot: Box::new(Cursor::new(s.data.clone())) }))
    }
}

/// Reads a whole disk (tests and the simulator's counters).
pub fn read_disk<T>(disk: &SharedDisk, f: impl FnOnce(&RaftDisk) -> T) -> T {
    f(&lock(disk))
}

/// Reads the applied state of a disk (a replica's local, possibly stale, committed view).
pub fn read_applied<T>(disk: &SharedDisk, f: impl FnOnce(&AppliedState) -> T) -> T {
    f(&lock(disk).applied)
}
