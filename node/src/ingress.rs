//! The ingress actor: the ingress composition core behind a mailbox.

use crate::io::{Clock, Ingress, NodeDisk, Purpose};
use crate::{ready_now, Stop, Timer};
use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture};
use node_core::ingress::{IngressCore, IngressInput, IngressOutput, RequestId};
use node_core::NodeRecord;
use protocol::messages::{Request, Response};
use protocol::transport::Transport;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Messages the actor's mailbox takes before a sender's `try_send` is refused.
pub const MAILBOX_CAPACITY: usize = 4096;

/// A client request for the ingress node.
pub struct ClientRequest<R> {
    /// Of a kind that is mirrored (see [`IngressInput::Request`]).
    pub read_only: bool,
    /// On a route the plan names long.
    pub long: bool,
    pub request: R,
}

impl<R: 'static> Message for ClientRequest<R> {
    type Result = ();
}

/// The ingress actor. Its only state beside the core: the open client requests by id, and
/// its one timer.
pub struct IngressActor<T: Transport + Unpin, D: NodeDisk, I: Ingress, C: Clock> {
    core: IngressCore,
    transport: T,
    disk: D,
    io: I,
    clock: C,
    boot: Option<NodeRecord>,
    requests: BTreeMap<RequestId, I::Request>,
    next_id: RequestId,
    timer: Timer,
    /// Sees every input the core handles and its outputs (tests only; never set in production).
    tap: Option<crate::Tap<IngressInput, IngressOutput>>,
}

impl<T: Transport + Unpin, D: NodeDisk, I: Ingress, C: Clock> IngressActor<T, D, I, C> {
    /// An actor that boots `core` from `record` (read from the node's disk) when it starts.
    pub fn new(core: IngressCore, record: NodeRecord, transport: T, disk: D, io: I, clock: C) -> Self {
        IngressActor {
            core,
            transport,
            disk,
            io,
            clock,
            boot: Some(record),
            requests: BTreeMap::new(),
            next_id: 1,
            timer: Timer::default(),
            tap: None,
        }
    }

    /// Lets a test see every input the core handles and the outputs it returns, in order.
    pub fn with_tap(mut self, tap: impl FnMut(u64, &IngressInput, &[IngressOutput]) + 'static) -> Self {
        self.tap = Some(Box::new(tap));
        self
    }

    /// Feeds one input to the core, performs its outputs in order, re-arms the timer.
    fn feed(&mut self, ctx: &mut Context<Self>, input: IngressInput) {
        let now_ms = self.clock.now_ms();
        let timer = matches!(input, IngressInput::Timer);
        // I/O that completes at once answers with an input, fed after the batch that caused it
        // (rare: the queue allocates only then).
        let (mut next, mut inputs) = (Some(input), VecDeque::new());
        while let Some(input) = next.take().or_else(|| inputs.pop_front()) {
            let seen = self.tap.is_some().then(|| input.clone());
            let outputs = self.core.handle(now_ms, input);
            if let (Some(tap), Some(input)) = (self.tap.as_mut(), seen) {
                tap(now_ms, &input, &outputs);
            }
            for output in outputs {
                inputs.extend(self.perform(ctx, now_ms, output));
            }
        }
        self.io.observe(now_ms, &self.core);
        let next = self.core.next_deadline_ms();
        assert!(
            !timer || next.is_none_or(|d| d > now_ms),
            "the core asks to be called again at {next:?}, now is {now_ms}"
        );
        self.timer.rearm(ctx, now_ms, next, |act| &mut act.timer, |act, ctx| act.feed(ctx, IngressInput::Timer));
    }

    /// Performs one output; returns the input it answers with if it completed at once.
    fn perform(&mut self, ctx: &mut Context<Self>, now_ms: u64, output: IngressOutput) -> Option<IngressInput> {
        match output {
            IngressOutput::Forward { id, generation, key, endpoint, compared } => {
                let request = self.requests.get(&id).expect("forwarding an open request");
                let sent = self.io.forward(request, generation, &endpoint, key, Purpose::Serve { compared });
                detach(ctx, id, false, sent);
            }
            IngressOutput::Mirror { id, generation, key, endpoint } => {
                let request = self.requests.get(&id).expect("mirroring an open request");
                let sent = self.io.forward(request, generation, &endpoint, key, Purpose::Mirror);
                detach(ctx, id, true, sent);
            }
            IngressOutput::Reply { id, reply } => {
                let request = self.requests.remove(&id).expect("answering an open request");
                self.io.reply(request, reply);
            }
            IngressOutput::Send { id, replica, request, deadline_ms } => {
                let timeout = Duration::from_millis(deadline_ms.saturating_sub(now_ms));
                let call = self.transport.call(replica, Request::Node(request), timeout);
                ctx.spawn(call.into_actor(self).map(move |result, act, ctx| {
                    // No answer (or a garbled one) is left to the core's own deadline.
                    if let Ok(Response::Node(response)) = result {
                        act.feed(ctx, IngressInput::Coordinator { id, response });
                    }
                }));
            }
            IngressOutput::Persist(record) => {
                let mut write = Box::pin(self.disk.persist(record.clone()));
                match ready_now(&mut write) {
                    Some(Ok(())) => return Some(IngressInput::Persisted(record)),
                    Some(Err(_)) => ctx.stop(),
                    // The node goes on while the record is written (a slow disk must not stall
                    // hold deadlines): the core acts on a decision only once told it is durable,
                    // and asks for one record at a time.
                    None => {
                        ctx.spawn(write.into_actor(self).map(move |result, act, ctx| match result {
                            Ok(()) => act.feed(ctx, IngressInput::Persisted(record)),
                            Err(_) => ctx.stop(),
                        }));
                    }
                }
            }
            IngressOutput::NotifyFrozen { epoch } => self.io.notify_frozen(epoch),
            IngressOutput::Event(event) => self.io.event(event),
        }
        None
    }
}

impl<T: Transport + Unpin, D: NodeDisk, I: Ingress, C: Clock> Actor for IngressActor<T, D, I, C> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Room for a burst of client requests between two turns of the actor: the core, not
        // the mailbox, says when there are too many (`requests_max`, answered 503).
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        let record = self.boot.take().expect("started once");
        self.feed(ctx, IngressInput::Boot { record });
    }
}

impl<T: Transport + Unpin, D: NodeDisk, I: Ingress, C: Clock> Handler<ClientRequest<I::Request>>
    for IngressActor<T, D, I, C>
{
    type Result = ();

    fn handle(&mut self, msg: ClientRequest<I::Request>, ctx: &mut Context<Self>) {
        let id = self.next_id;
        self.next_id += 1;
        self.requests.insert(id, msg.request);
        self.feed(ctx, IngressInput::Request { id, read_only: msg.read_only, long: msg.long });
    }
}

/// A universe's answer to a forward or a mirror, back at the actor.
struct Answer<S> {
    id: RequestId,
    mirror: bool,
    sent: S,
}

impl<S: Send + 'static> Message for Answer<S> {
    type Result = ();
}

/// Runs a send as a task of its own that hands its answer to the actor as a message. Not an
/// item of the actor's context: actix polls every such item whenever the actor wakes, which
/// made each request cost in proportion to the requests in flight.
fn detach<A, S>(ctx: &mut Context<A>, id: RequestId, mirror: bool, sent: impl std::future::Future<Output = S> + 'static)
where
    A: Actor<Context = Context<A>> + Handler<Answer<S>>,
    S: Send + 'static,
{
    let actor = ctx.address();
    actix::spawn(async move {
        // A stopped actor drops the answer, as it would have dropped the send.
        actor.do_send(Answer { id, mirror, sent: sent.await });
    });
}

impl<T: Transport + Unpin, D: NodeDisk, I: Ingress, C: Clock> Handler<Answer<I::Sent>> for IngressActor<T, D, I, C> {
    type Result = ();

    fn handle(&mut self, msg: Answer<I::Sent>, ctx: &mut Context<Self>) {
        let (id, answer) = (msg.id, self.io.taken(msg.sent));
        let input =
            if msg.mirror { IngressInput::Mirrored { id, answer } } else { IngressInput::Answered { id, answer } };
        self.feed(ctx, input);
    }
}

impl<T: Transport + Unpin, D: NodeDisk, I: Ingress, C: Clock> Handler<Stop> for IngressActor<T, D, I, C> {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
