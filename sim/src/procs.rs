//! The simulated processes' slots: what each node keeps across crashes (its disk, its stores)
//! and the handle of its running actor. A slot knows no world: the I/O that moves data between
//! slots lives in `router.rs`, `data.rs` and `node_io.rs`.

use crate::app::AppOp;
use crate::net::{Addr, ProcId};
use crate::oracle::WriteRef;
use actix::Recipient;
use node::data_node::DataRequest;
use node::ingress::ClientRequest;
use node_core::duties::router::Mode;
use node_core::duties::transform::Checkpoint;
use node_core::store::{Batch, MemStore};
use node_core::NodeRecord;
use protocol::schema::Schema;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The simulator's stores are in memory: their calls never fail (a store failure is a fault
/// the simulator injects on its own).
pub(crate) const MEM: &str = "memory stores do not fail";

/// Where a request's answer is delivered to its caller.
pub type ReplySlot = Arc<Mutex<Option<oneshot::Sender<Vec<u8>>>>>;

/// Where the answer to one request goes.
#[derive(Clone)]
pub struct ReplyTo {
    pub(crate) server: Addr,
    pub(crate) server_inc: u64,
    pub(crate) caller: Addr,
    pub(crate) caller_inc: u64,
    pub(crate) slot: ReplySlot,
}

/// What the simulator observes of a running router (for its checkers and its end of run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterObserved {
    pub mode: Mode,
    pub held: usize,
    pub oldest_held_ms: Option<u64>,
}

impl RouterObserved {
    pub const DOWN: RouterObserved = RouterObserved { mode: Mode::Unknown, held: 0, oldest_held_ms: None };
}

/// One client request inside a router: the client's ticket and the payload.
pub struct SimClient {
    pub(crate) ticket: u64,
    pub(crate) op: AppOp,
}

/// A request forwarded to a data node: its payload and where its answer goes.
pub struct SimDataRequest {
    pub(crate) op: AppOp,
    pub(crate) reply_to: ReplyTo,
}

/// A client request a router has not answered yet.
pub struct OpenRequest {
    pub op: AppOp,
    pub issued_us: u64,
    pub write: WriteRef,
    /// The router forwarded it to a universe (it is no longer held).
    pub forwarded: bool,
}

/// A running actor: where its messages go, and its task (aborting it is a crash).
pub type Running<M> = Option<(Recipient<M>, JoinHandle<()>)>;

/// A router process. `disk` survives a crash; the actor does not.
pub struct RouterProc {
    pub addr: Addr,
    pub name: String,
    pub disk: NodeRecord,
    pub actor: Running<ClientRequest<SimClient>>,
    /// Client requests in progress, by ticket (what the clients wait for).
    pub open: BTreeMap<u64, OpenRequest>,
    /// The open requests neither forwarded nor answered, by (arrival µs, ticket).
    pub unforwarded: std::collections::BTreeSet<(u64, u64)>,
    pub next_ticket: u64,
    pub observed: RouterObserved,
    /// Decisions acted on by the running incarnation: those that serve a universe, and freezes.
    pub acted_serving: u32,
    pub acted_freezes: u32,
    /// How the running incarnation booted: on its own disk (one it booted from before) or not,
    /// and whether that disk held a freeze.
    pub booted: crate::checkers::observed::Booted,
    /// Its load balancer sends it clients (false while it is being restarted gracefully).
    pub in_rotation: bool,
    /// Told once the router has answered every client it took (a graceful stop waits for it).
    pub idle: Option<oneshot::Sender<()>>,
    /// The process slot is in use (false: the reserve router, until it is started to join).
    pub deployed: bool,
    /// The operator retired it (out of rotation for good).
    pub retired: bool,
    /// Retired by force: crashed and kept cut off from clients (never restarted).
    pub cut_off: bool,
    /// When its join was seen applied (the reserve router).
    pub joined_us: Option<u64>,
}

impl RouterProc {
    pub fn new(index: usize) -> RouterProc {
        RouterProc {
            addr: ProcId::Router(index).addr(),
            name: format!("router-{index}"),
            disk: NodeRecord::default(),
            actor: None,
            open: BTreeMap::new(),
            unforwarded: Default::default(),
            next_ticket: 1,
            observed: RouterObserved::DOWN,
            acted_serving: 0,
            acted_freezes: 0,
            booted: Default::default(),
            in_rotation: true,
            idle: None,
            deployed: true,
            retired: false,
            cut_off: false,
            joined_us: None,
        }
    }
}

/// A data node. `old`, `new` and `disk` survive a crash; the actor does not.
pub struct DataProc {
    pub addr: Addr,
    pub name: String,
    /// The generation the upgrade this node is deployed for upgrades from: `old` holds it,
    /// `new` the next.
    pub from: protocol::Generation,
    pub old: MemStore,
    pub new: MemStore,
    pub disk: NodeRecord,
    pub actor: Running<DataRequest<SimDataRequest>>,
    /// The decision on disk when the node last asked for a fence.
    pub fence_asked_with: Option<protocol::Decision>,
    /// Where routers' frozen notices go (the same running actor).
    pub notices: Option<actix::Recipient<node::data_node::RouterFrozen>>,
    /// Batches applied lately (the re-delivery fault sends one again).
    pub delivered: std::collections::VecDeque<Batch>,
    /// A rogue writer has written to the new database behind the transform (the drift fault).
    pub drifted: bool,
    /// What the simulator did to the old store (checked against what the store says,
    /// `checkers::observed`): fenced, snapshots opened since the last connection loss, changes
    /// pruned up to.
    pub fenced_seen: bool,
    pub snapshots_seen: usize,
    pub pruned_seen: u64,
    /// The checkpoint of a batch handed to the new store and not yet applied there.
    pub applying: Option<Checkpoint>,
    /// The node abandoned the upgrade it is deployed for (rolled back): no transform runs
    /// for it again.
    pub abandoned: bool,
}

impl DataProc {
    pub fn new(index: usize, old_schema: &Schema, mapping: &protocol::schema::Mapping) -> DataProc {
        DataProc {
            addr: ProcId::Data(index).addr(),
            name: format!("db-{index}"),
            from: protocol::Generation::GENESIS,
            old: MemStore::with_schema(old_schema),
            new: MemStore::new_universe(mapping.clone()),
            disk: NodeRecord::default(),
            actor: None,
            notices: None,
            fence_asked_with: None,
            delivered: Default::default(),
            drifted: false,
            fenced_seen: false,
            snapshots_seen: 0,
            pruned_seen: 0,
            applying: None,
            abandoned: false,
        }
    }
}
