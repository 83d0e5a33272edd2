//! The node's disk on a real machine: its [`NodeRecord`] in one of two fixed slots of one file,
//! written in place and synced before a write counts.
//!
//! A write goes to the slot the last write did not use, with a sequence number and a CRC-32 of
//! the slot; a read takes the valid slot with the highest sequence. A write torn by a crash
//! spoils only its own slot, and the other still holds the record written before it (the two
//! superblock copies of TigerBeetle work the same way). The slots' blocks are written once, when
//! the file is made, so a write in place is one data sync and no metadata journal commit: about
//! 0.2 ms on this project's machines, where a new file renamed over the old one and the
//! directory synced took 1 to 3 ms. A router waits for this write twice in every switch (the
//! freeze before it acks, the commit before it serves again), so it is on the clients' hold.
//!
//! A slot holds a codec frame of [`DiskFile`]: the format, the cluster id and the node's name
//! beside the record. A file of another cluster, or of a newer format, is refused; a missing file
//! is an empty disk, which gets a fresh random disk id (so that the node's request keys differ
//! from those of any disk it had before).
//!
//! **Formats.** Format 2 is this slot file (`node.disk`). Format 1 was one frame in a file
//! replaced whole (`node.record`); it is read when there is no slot file, and the first write
//! makes the slot file and removes it. A build that knows only format 1 finds no record after
//! format 2 was written, and takes the disk as empty: such a router waits for the coordinator's
//! first linearizable read, as a node with a lost disk does (safe, not silent).

use node::io::{DiskError, NodeDisk};
use node_core::NodeRecord;
use protocol::codec;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The format of the record file this build writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 2;
/// The slot file's name in the node's data directory (format 2).
pub const FILE_NAME: &str = "node.disk";
/// The record file of format 1, read when there is no slot file.
pub const FILE_NAME_V1: &str = "node.record";
/// The bytes of one slot; the file holds two.
pub const SLOT_BYTES: usize = 64 * 1024;
/// A slot's header: magic, sequence, payload length, CRC-32.
const SLOT_HEADER_BYTES: usize = 24;
/// The largest record frame a slot holds.
pub const RECORD_BYTES_MAX: usize = SLOT_BYTES - SLOT_HEADER_BYTES;
const SLOT_MAGIC: [u8; 8] = *b"IMAGOSLT";

/// What the file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFile {
    pub format: u32,
    pub cluster: String,
    pub node: String,
    pub record: NodeRecord,
}

/// A node's record file in its data directory.
#[derive(Clone, Debug)]
pub struct FileDisk {
    dir: PathBuf,
    cluster: String,
    node: String,
    /// The slot file once a write opened it, and the sequence of its newest slot.
    open: Arc<Mutex<Option<(File, u64)>>>,
}

/// One slot's bytes for `frame` at `sequence`.
fn slot_bytes(sequence: u64, frame: &[u8]) -> Vec<u8> {
    let mut slot = Vec::with_capacity(SLOT_HEADER_BYTES + frame.len());
    slot.extend_from_slice(&SLOT_MAGIC);
    slot.extend_from_slice(&sequence.to_be_bytes());
    slot.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&slot[8..20]);
    crc.update(frame);
    slot.extend_from_slice(&crc.finalize().to_be_bytes());
    slot.extend_from_slice(frame);
    slot
}

/// The sequence and frame a slot holds, if it is whole.
fn slot_frame(slot: &[u8]) -> Option<(u64, &[u8])> {
    let header = slot.get(..SLOT_HEADER_BYTES)?;
    if header[..8] != SLOT_MAGIC {
        return None;
    }
    let sequence = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(header[16..20].try_into().ok()?) as usize;
    let stored = u32::from_be_bytes(header[20..24].try_into().ok()?);
    let frame = slot.get(SLOT_HEADER_BYTES..SLOT_HEADER_BYTES.checked_add(len)?)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[8..20]);
    crc.update(frame);
    (crc.finalize() == stored).then_some((sequence, frame))
}

/// The newest whole slot of a slot file's bytes: (sequence, frame).
fn newest_slot(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let slots = [bytes.get(..SLOT_BYTES.min(bytes.len())), bytes.get(SLOT_BYTES..)];
    slots.into_iter().flatten().filter_map(slot_frame).max_by_key(|(sequence, _)| *sequence)
}

impl FileDisk {
    /// The disk of node `node` of cluster `cluster` in `dir` (made if missing).
    pub fn new(dir: &Path, cluster: &str, node: &str) -> Result<FileDisk, DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| DiskError(format!("{}: {e}", dir.display())))?;
        Ok(FileDisk {
            dir: dir.to_path_buf(),
            cluster: cluster.to_string(),
            node: node.to_string(),
            open: Arc::default(),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The record on this disk: the slot file's newest whole slot, else the format 1 file's
    /// record, else a fresh one (with a random disk id). A file of another cluster or of a
    /// newer format, or a slot file with no whole slot, is an error: nothing is served from it
    /// and nothing overwrites it.
    pub fn read(&self) -> Result<NodeRecord, DiskError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let Some((_, frame)) = newest_slot(&bytes) else {
                    return Err(DiskError(format!("{}: neither slot holds a whole record", path.display())));
                };
                return self.checked(&path, frame);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DiskError(format!("{}: {e}", path.display()))),
        }
        let v1 = self.dir.join(FILE_NAME_V1);
        match std::fs::read(&v1) {
            Ok(bytes) => self.checked(&v1, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(NodeRecord { disk_id: rand::random::<u64>() | 1, ..NodeRecord::default() })
            }
            Err(e) => Err(DiskError(format!("{}: {e}", v1.display()))),
        }
    }

    /// The record of one frame of `path`, if its format and cluster are this build's and disk's.
    fn checked(&self, path: &Path, frame: &[u8]) -> Result<NodeRecord, DiskError> {
        let file: DiskFile = match codec::decode_frame(frame) {
            Ok(Some((file, used))) if used == frame.len() => file,
            Ok(_) => return Err(DiskError(format!("{}: truncated record", path.display()))),
            Err(e) => return Err(DiskError(format!("{}: unreadable record: {e}", path.display()))),
        };
        if file.format > FORMAT_VERSION {
            return Err(DiskError(format!(
                "{}: record format {} is newer than this build reads ({FORMAT_VERSION}): upgrade imago",
                path.display(),
                file.format
            )));
        }
        if file.cluster != self.cluster {
            return Err(DiskError(format!(
                "{}: this disk belongs to cluster `{}`, not `{}`: never reuse a node's disk across clusters",
                path.display(),
                file.cluster,
                self.cluster
            )));
        }
        // Another node's file is handed to the core as it is: its owner mark makes the core
        // start afresh on it (a copied disk is as good as an empty one).
        Ok(file.record)
    }

    /// Writes `record` durably: into the slot the newest record is not in, then a data sync.
    /// The first write makes the slot file (a temporary file with both slots' blocks written,
    /// synced, renamed, the directory synced) and removes a format 1 file.
    fn write_now(&self, record: NodeRecord) -> Result<(), DiskError> {
        let file = DiskFile { format: FORMAT_VERSION, cluster: self.cluster.clone(), node: self.node.clone(), record };
        let frame = codec::encode_frame(&file).map_err(|e| DiskError(e.to_string()))?;
        let path = self.path();
        if frame.len() > RECORD_BYTES_MAX {
            return Err(DiskError(format!(
                "{}: a record of {} bytes does not fit a slot ({RECORD_BYTES_MAX} bytes at most)",
                path.display(),
                frame.len()
            )));
        }
        let fail = |e: std::io::Error| DiskError(format!("{}: {e}", path.display()));
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.is_none() {
            *open = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(fail)?;
                    let newest = newest_slot(&bytes).map_or(0, |(sequence, _)| sequence);
                    Some((file, newest))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let made = self.make(&path, &frame).map_err(fail)?;
                    *open = Some((made, 1));
                    return Ok(());
                }
                Err(e) => return Err(fail(e)),
            };
        }
        let (out, newest) = open.as_mut().expect("opened above");
        let sequence = *newest + 1;
        let at = (sequence % 2) * SLOT_BYTES as u64;
        out.write_all_at(&slot_bytes(sequence, &frame), at).map_err(fail)?;
        out.sync_data().map_err(fail)?;
        *newest = sequence;
        Ok(())
    }

    /// Makes the slot file with `frame` in slot 1 (sequence 1), durably, and removes a format 1
    /// file: returns the file open for writing.
    fn make(&self, path: &Path, frame: &[u8]) -> std::io::Result<File> {
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut bytes = vec![0u8; 2 * SLOT_BYTES];
        let slot = slot_bytes(1, frame);
        bytes[SLOT_BYTES..SLOT_BYTES + slot.len()].copy_from_slice(&slot);
        let mut out = File::create(&tmp)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&tmp, path)?;
        File::open(&self.dir)?.sync_all()?;
        match std::fs::remove_file(self.dir.join(FILE_NAME_V1)) {
            Ok(()) => File::open(&self.dir)?.sync_all()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::OpenOptions::new().read(true).write(true).open(path)
    }
}

impl NodeDisk for FileDisk {
    fn persist(&self, record: NodeRecord) -> impl Future<Output = Result<(), DiskError>> + 'static {
        let disk = self.clone();
        // The write runs off the node's thread: the core acts on the decision only once told.
        let write = tokio::task::spawn_blocking(move || disk.write_now(record));
        async move { write.await.unwrap_or_else(|e| Err(DiskError(format!("disk write task: {e}")))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Decision, Epoch, Generation};

    fn record(epoch: u64, disk_id: u64) -> NodeRecord {
        NodeRecord {
            decision: Decision::Commit(Epoch(epoch)),
            generation: Generation(2),
            boots: 4,
            disk_id,
            owner: NodeRecord::owner_of("router-1"),
            confirmed: true,
            endpoints: vec!["http://127.0.0.1:9003".into()],
        }
    }

    /// Flips a byte of the slot that holds sequence `sequence`, as a torn write would leave it.
    fn spoil_slot(dir: &Path, sequence: u64) {
        let path = dir.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).expect("read");
        let at = (sequence % 2) as usize * SLOT_BYTES + SLOT_HEADER_BYTES + 3;
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).expect("write");
    }

    #[tokio::test]
    async fn a_record_survives_and_a_foreign_disk_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FileDisk::new(dir.path(), "shop", "router-1").expect("disk");
        let empty = disk.read().expect("empty disk");
        assert_eq!(empty.decision, Decision::Initial);
        assert_ne!(empty.disk_id, 0, "an empty disk gets an id");
        let record = record(3, empty.disk_id);
        disk.persist(record.clone()).await.expect("persist");
        assert_eq!(FileDisk::new(dir.path(), "shop", "router-1").expect("disk").read().expect("read"), record);
        let other = FileDisk::new(dir.path(), "other", "router-1").expect("disk");
        let refused = other.read().expect_err("another cluster's disk");
        assert!(refused.0.contains("belongs to cluster `shop`"), "{refused}");
        std::fs::write(dir.path().join(FILE_NAME), b"garbage").expect("write");
        let garbage = disk.read().expect_err("an unreadable record is an error, not an empty disk");
        assert!(garbage.0.contains("neither slot holds a whole record"), "{garbage}");
    }

    #[tokio::test]
    async fn a_torn_write_leaves_the_record_before_it_and_writes_alternate_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FileDisk::new(dir.path(), "shop", "router-1").expect("disk");
        disk.persist(record(1, 7)).await.expect("persist");
        disk.persist(record(2, 7)).await.expect("persist");
        // Another process on the same disk (a restart) goes on from the newest slot.
        let again = FileDisk::new(dir.path(), "shop", "router-1").expect("disk");
        assert_eq!(again.read().expect("read"), record(2, 7));
        again.persist(record(3, 7)).await.expect("persist");
        assert_eq!(again.read().expect("read"), record(3, 7));
        assert_eq!(std::fs::metadata(dir.path().join(FILE_NAME)).expect("file").len(), 2 * SLOT_BYTES as u64);
        // The write of sequence 3 torn: the record before it (sequence 2, the other slot) stands.
        spoil_slot(dir.path(), 3);
        assert_eq!(again.read().expect("read"), record(2, 7));
        // Both spoiled: an error, never an empty disk (which would forget a freeze).
        spoil_slot(dir.path(), 2);
        assert!(again.read().is_err());
    }

    #[tokio::test]
    async fn a_format_1_record_is_read_and_the_first_write_replaces_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v1 = DiskFile { format: 1, cluster: "shop".into(), node: "router-1".into(), record: record(5, 9) };
        std::fs::write(dir.path().join(FILE_NAME_V1), codec::encode_frame(&v1).expect("encode")).expect("write");
        let disk = FileDisk::new(dir.path(), "shop", "router-1").expect("disk");
        assert_eq!(disk.read().expect("the previous format is read"), record(5, 9));
        disk.persist(record(6, 9)).await.expect("persist");
        assert!(!dir.path().join(FILE_NAME_V1).exists(), "the format 1 file is gone");
        assert_eq!(disk.read().expect("read"), record(6, 9));
        // A newer format is refused with what to do.
        let v3 = DiskFile { format: FORMAT_VERSION + 1, ..v1 };
        std::fs::remove_file(dir.path().join(FILE_NAME)).expect("remove");
        std::fs::write(dir.path().join(FILE_NAME_V1), codec::encode_frame(&v3).expect("encode")).expect("write");
        let newer = disk.read().expect_err("a newer format");
        assert!(newer.0.contains("upgrade imago"), "{newer}");
    }

    #[tokio::test]
    async fn a_record_too_large_for_a_slot_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FileDisk::new(dir.path(), "shop", "router-1").expect("disk");
        disk.persist(record(1, 7)).await.expect("persist");
        let mut huge = record(2, 7);
        huge.endpoints = vec!["http://127.0.0.1:9003/".repeat(100); 100];
        let refused = disk.persist(huge).await.expect_err("too large");
        assert!(refused.0.contains("does not fit a slot"), "{refused}");
        assert_eq!(disk.read().expect("read"), record(1, 7));
    }
}
