//! The node's disk on a real machine: one small file holding its [`NodeRecord`], replaced
//! atomically and synced before a write counts.
//!
//! The file is a codec frame of a [`DiskFile`]: the format, the cluster id and the node's name
//! beside the record. A file of another cluster, or of a newer format, is refused; a missing file
//! is an empty disk, which gets a fresh random disk id (so that the node's request keys differ
//! from those of any disk it had before).

use node::io::{DiskError, NodeDisk};
use node_core::NodeRecord;
use protocol::codec;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The format of the record file this build writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 1;
/// The record file's name in the node's data directory.
pub const FILE_NAME: &str = "node.record";

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
}

impl FileDisk {
    /// The disk of node `node` of cluster `cluster` in `dir` (made if missing).
    pub fn new(dir: &Path, cluster: &str, node: &str) -> Result<FileDisk, DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| DiskError(format!("{}: {e}", dir.display())))?;
        Ok(FileDisk { dir: dir.to_path_buf(), cluster: cluster.to_string(), node: node.to_string() })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The record on this disk: the file's, or a fresh one (with a random disk id) if there is
    /// none. A file of another cluster or of a newer format is an error: nothing is served
    /// from it and nothing overwrites it.
    pub fn read(&self) -> Result<NodeRecord, DiskError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(NodeRecord { disk_id: rand::random::<u64>() | 1, ..NodeRecord::default() })
            }
            Err(e) => return Err(DiskError(format!("{}: {e}", path.display()))),
        };
        let file: DiskFile = match codec::decode_frame(&bytes) {
            Ok(Some((file, used))) if used == bytes.len() => file,
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

    /// Writes `record` durably: a temporary file, synced, renamed over the record, and the
    /// directory synced.
    fn write_now(&self, record: NodeRecord) -> Result<(), DiskError> {
        let file = DiskFile { format: FORMAT_VERSION, cluster: self.cluster.clone(), node: self.node.clone(), record };
        let bytes = codec::encode_frame(&file).map_err(|e| DiskError(e.to_string()))?;
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let fail = |e: std::io::Error| DiskError(format!("{}: {e}", path.display()));
        let mut out = std::fs::File::create(&tmp).map_err(fail)?;
        out.write_all(&bytes).map_err(fail)?;
        out.sync_all().map_err(fail)?;
        drop(out);
        std::fs::rename(&tmp, &path).map_err(fail)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(fail)
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

    #[tokio::test]
    async fn a_record_survives_and_a_foreign_disk_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FileDisk::new(dir.path(), "shop", "router-1").expect("disk");
        let empty = disk.read().expect("empty disk");
        assert_eq!(empty.decision, Decision::Initial);
        assert_ne!(empty.disk_id, 0, "an empty disk gets an id");
        let record = NodeRecord {
            decision: Decision::Commit(Epoch(3)),
            generation: Generation(2),
            boots: 4,
            disk_id: empty.disk_id,
            owner: NodeRecord::owner_of("router-1"),
            confirmed: true,
            endpoints: vec!["http://127.0.0.1:9003".into()],
        };
        disk.persist(record.clone()).await.expect("persist");
        assert_eq!(FileDisk::new(dir.path(), "shop", "router-1").expect("disk").read().expect("read"), record);
        let other = FileDisk::new(dir.path(), "other", "router-1").expect("disk");
        let refused = other.read().expect_err("another cluster's disk");
        assert!(refused.0.contains("belongs to cluster `shop`"), "{refused}");
        std::fs::write(dir.path().join(FILE_NAME), b"garbage").expect("write");
        assert!(disk.read().is_err(), "an unreadable record is an error, not an empty disk");
    }
}
