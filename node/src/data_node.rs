//! The data-node actor: the data-node composition core behind a mailbox.

use crate::io::{Clock, NodeDisk, Stores};
use crate::{ready_now, Stop, Timer};
use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture};
use node_core::data_node::{DataInput, DataNodeCore, DataOutput};
use node_core::duties::transform::Checkpoint;
use node_core::{NodeRecord, RequestKey};
use protocol::messages::{Request, Response};
use protocol::transport::Transport;
use protocol::Generation;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// A request forwarded to this data node by an ingress node.
pub struct DataRequest<R> {
    pub key: RequestKey,
    /// The generation the router sends it to (the node maps it to one of its stores).
    pub generation: Generation,
    pub mirror: bool,
    pub read_only: bool,
    pub request: R,
}

impl<R: 'static> Message for DataRequest<R> {
    type Result = ();
}

/// A router's notice that it is frozen for `epoch` (see `IngressOutput::NotifyFrozen`).
pub struct RouterFrozen {
    pub router: protocol::NodeName,
    pub epoch: protocol::Epoch,
}

impl Message for RouterFrozen {
    type Result = ();
}

/// What the data node finds on its disk and in its stores when it starts.
#[derive(Clone, Debug)]
pub struct DataBoot {
    pub record: NodeRecord,
    pub checkpoint: Checkpoint,
    pub old_fenced: bool,
}

/// The data-node actor. Its only state beside the core: the open requests by key (the core
/// answers each one exactly once, in order), and its one timer.
pub struct DataNodeActor<T: Transport + Unpin, D: NodeDisk, S: Stores, C: Clock> {
    core: DataNodeCore,
    transport: T,
    disk: D,
    stores: S,
    clock: C,
    boot: Option<DataBoot>,
    requests: BTreeMap<(RequestKey, bool), VecDeque<S::Request>>,
    timer: Timer,
    /// Sees every input the core handles and its outputs (tests only; never set in production).
    tap: Option<crate::Tap<DataInput, DataOutput>>,
}

impl<T: Transport + Unpin, D: NodeDisk, S: Stores, C: Clock> DataNodeActor<T, D, S, C> {
    pub fn new(core: DataNodeCore, boot: DataBoot, transport: T, disk: D, stores: S, clock: C) -> Self {
        DataNodeActor {
            core,
            transport,
            disk,
            stores,
            clock,
            boot: Some(boot),
            requests: BTreeMap::new(),
            timer: Timer::default(),
            tap: None,
        }
    }

    /// Lets a test see every input the core handles and the outputs it returns, in order.
    pub fn with_tap(mut self, tap: impl FnMut(u64, &DataInput, &[DataOutput]) + 'static) -> Self {
        self.tap = Some(Box::new(tap));
        self
    }

    /// Feeds one input to the core, performs its outputs in order, re-arms the timer.
    fn feed(&mut self, ctx: &mut Context<Self>, input: DataInput) {
        let now_ms = self.clock.now_ms();
        let timer = matches!(input, DataInput::Timer);
        // I/O that completes at once answers with an input, fed after the batch that caused it.
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let seen = self.tap.is_some().then(|| input.clone());
            let outputs = self.core.handle(now_ms, input);
            if let (Some(tap), Some(input)) = (self.tap.as_mut(), seen) {
                tap(now_ms, &input, &outputs);
            }
            for output in outputs {
                inputs.extend(self.perform(ctx, now_ms, output));
            }
        }
        self.stores.observe(now_ms, &self.core);
        let next = self.core.next_deadline_ms();
        assert!(
            !timer || next.is_none_or(|d| d > now_ms),
            "the core asks to be called again at {next:?}, now is {now_ms}"
        );
        self.timer.rearm(ctx, now_ms, next, |act| &mut act.timer, |act, ctx| act.feed(ctx, DataInput::Timer));
    }

    /// Performs one output; returns the input it answers with if it completed at once.
    fn perform(&mut self, ctx: &mut Context<Self>, now_ms: u64, output: DataOutput) -> Option<DataInput> {
        match output {
            DataOutput::Execute { key, universe, mirror } => {
                let request =
                    self.requests.get(&(key, mirror)).and_then(|q| q.front()).expect("executing an open request");
                let mut run = Box::pin(self.stores.execute(key, request, universe));
                if let Some(answer) = ready_now(&mut run) {
                    return Some(DataInput::Executed { key, universe, mirror, answer });
                }
                ctx.spawn(
                    run.into_actor(self).map(move |answer, act, ctx| {
                        act.feed(ctx, DataInput::Executed { key, universe, mirror, answer })
                    }),
                );
            }
            DataOutput::Reply { key, mirror, answer } => {
                let queue = self.requests.get_mut(&(key, mirror)).expect("answering an open request");
                let request = queue.pop_front().expect("answering an open request");
                if queue.is_empty() {
                    self.requests.remove(&(key, mirror));
                }
                self.stores.reply(request, answer);
            }
            DataOutput::Send { id, replica, request, deadline_ms } => {
                let timeout = Duration::from_millis(deadline_ms.saturating_sub(now_ms));
                let call = self.transport.call(replica, Request::Node(request), timeout);
                ctx.spawn(call.into_actor(self).map(move |result, act, ctx| {
                    // No answer (or a garbled one) is left to the core's own deadline.
                    if let Ok(Response::Node(response)) = result {
                        act.feed(ctx, DataInput::Coordinator { id, response });
                    }
                }));
            }
            DataOutput::Persist(record) => {
                let mut write = Box::pin(self.disk.persist(record.clone()));
                match ready_now(&mut write) {
                    Some(Ok(())) => return Some(DataInput::Persisted(record)),
                    Some(Err(_)) => ctx.stop(),
                    // The node goes on while the record is written (a slow disk must not stall
                    // hold deadlines): the core acts on a decision only once told it is durable,
                    // and asks for one record at a time.
                    None => {
                        ctx.spawn(write.into_actor(self).map(move |result, act, ctx| match result {
                            Ok(()) => act.feed(ctx, DataInput::Persisted(record)),
                            Err(_) => ctx.stop(),
                        }));
                    }
                }
            }
            DataOutput::Store(op) => {
                let mut done = Box::pin(self.stores.store(op));
                if let Some(result) = ready_now(&mut done) {
                    return Some(DataInput::Store(result));
                }
                // The mailbox waits until the store answers (one operation at a time).
                ctx.wait(done.into_actor(self).map(|result, act, ctx| act.feed(ctx, DataInput::Store(result))));
            }
            DataOutput::Event(event) => self.stores.event(event),
        }
        None
    }
}

impl<T: Transport + Unpin, D: NodeDisk, S: Stores, C: Clock> Actor for DataNodeActor<T, D, S, C> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let DataBoot { record, checkpoint, old_fenced } = self.boot.take().expect("started once");
        self.feed(ctx, DataInput::Boot { record, checkpoint, old_fenced });
    }
}

impl<T: Transport + Unpin, D: NodeDisk, S: Stores, C: Clock> Handler<DataRequest<S::Request>>
    for DataNodeActor<T, D, S, C>
{
    type Result = ();

    fn handle(&mut self, msg: DataRequest<S::Request>, ctx: &mut Context<Self>) {
        let DataRequest { key, generation, mirror, read_only, request } = msg;
        self.requests.entry((key, mirror)).or_default().push_back(request);
        self.feed(ctx, DataInput::Request { key, generation, mirror, read_only });
    }
}

impl<T: Transport + Unpin, D: NodeDisk, S: Stores, C: Clock> Handler<RouterFrozen> for DataNodeActor<T, D, S, C> {
    type Result = ();

    fn handle(&mut self, msg: RouterFrozen, ctx: &mut Context<Self>) {
        self.feed(ctx, DataInput::RouterFrozen { router: msg.router, epoch: msg.epoch });
    }
}

impl<T: Transport + Unpin, D: NodeDisk, S: Stores, C: Clock> Handler<Stop> for DataNodeActor<T, D, S, C> {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
