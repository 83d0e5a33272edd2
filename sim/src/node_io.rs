//! I/O that every simulated node has: its disk and its clock.

use crate::net::ProcId;
use crate::world::{virtual_now, with, World};
use node::io::{DiskError, NodeDisk};
use node_core::NodeRecord;
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

impl NodeDisk for SimDisk {
    fn persist(&self, record: NodeRecord) -> impl Future<Output = Result<(), DiskError>> + 'static {
        let written = self.world.upgrade().is_some_and(|shared| {
            with(&shared, |w| {
                if !w.is_up(self.node.addr(), self.incarnation) {
                    return false;
                }
                let name = match self.node {
                    ProcId::Data(i) => {
                        w.data[i].disk = record;
                        w.data[i].name.clone()
                    }
                    ProcId::Router(i) => {
                        w.routers[i].disk = record;
                        w.routers[i].name.clone()
                    }
                    ProcId::Coordinator(_) | ProcId::Operator => unreachable!("only nodes have a node disk"),
                };
                w.note_persisted(&name, record.decision);
                true
            })
        });
        std::future::ready(if written { Ok(()) } else { Err(DiskError("the process is down".into())) })
    }
}
