//! I/O that every simulated node has: its disk and its clock.

use crate::checkers::Violation;
use crate::net::ProcId;
use crate::world::{detached, virtual_now, with, World};
use node::io::{DiskError, NodeDisk};
use node_core::NodeRecord;
use rand::Rng;
use std::future::Future;
use std::sync::{Mutex, Weak};

/// The clock a simulated node reads: virtual milliseconds since the seed started.
pub type SimClock = Box<dyn Fn() -> u64>;

pub fn sim_clock(world: &World) -> SimClock {
    let start = world.start;
    Box::new(move || virtual_now().duration_since(start).as_millis() as u64)
}

/// A node's disk in the simulated world: a field of its process slot, written at once (and
/// refused once the incarnation that writes it is gone).
pub struct SimDisk {
    pub(crate) world: Weak<Mutex<World>>,
    pub(crate) node: ProcId,
    pub(crate) incarnation: u64,
}

/// Writes `record` to the disk of `node` if its incarnation is still up.
fn write(world: &Weak<Mutex<World>>, node: ProcId, incarnation: u64, record: NodeRecord) -> bool {
    world.upgrade().is_some_and(|shared| {
        with(&shared, |w| {
            if !w.is_up(node.addr(), incarnation) {
                return false;
            }
            let (disk, name) = w.node_disk(node);
            // A write keeps the boot count, or counts one more boot (the boot record).
            let on_disk = disk.boots;
            let miscounted = record.boots != on_disk && record.boots != on_disk.wrapping_add(1);
            let (boots, decision) = (record.boots, record.decision);
            *disk = record;
            let name = name.to_string();
            if miscounted {
                let now = w.now_us();
                let found = Violation::BootMiscounted { node: name.clone(), on_disk, written: boots };
                w.checker.violation(now, found);
            }
            w.note_persisted(&name, decision);
            true
        })
    })
}

impl NodeDisk for SimDisk {
    /// A write takes a drawn time (none in seeds without slow disks). It lands on the disk either
    /// at once or only when it completes, so a crash in between leaves either a record the node
    /// never learnt was durable or no record: both must be safe.
    fn persist(&self, record: NodeRecord) -> impl Future<Output = Result<(), DiskError>> + 'static {
        let (world, node, incarnation) = (self.world.clone(), self.node, self.incarnation);
        let (delay_us, early) = world
            .upgrade()
            .map(|shared| {
                with(&shared, |w| match w.faults.disk_delay_us_max {
                    0 => (0, true),
                    max => {
                        let delay_us = w.rng.gen_range(0..=max);
                        (delay_us, delay_us == 0 || w.rng.gen_bool(0.5))
                    }
                })
            })
            .unwrap_or((0, true));
        let written_early = early && write(&world, node, incarnation, record.clone());
        async move {
            let written = if delay_us == 0 {
                written_early
            } else {
                detached(tokio::time::sleep(std::time::Duration::from_micros(delay_us))).await;
                if early {
                    written_early && with_up(&world, node, incarnation)
                } else {
                    write(&world, node, incarnation, record)
                }
            };
            if written {
                Ok(())
            } else {
                Err(DiskError("the process is down".into()))
            }
        }
    }
}

fn with_up(world: &Weak<Mutex<World>>, node: ProcId, incarnation: u64) -> bool {
    world.upgrade().is_some_and(|shared| with(&shared, |w| w.is_up(node.addr(), incarnation)))
}
