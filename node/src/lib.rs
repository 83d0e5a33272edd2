//! The Imago node runtime: one actix actor per composition core, generic over small I/O
//! traits. The simulator runs these same actors over in-memory I/O; production runs them over
//! QUIC, HTTP, databases and a disk.
//!
//! An actor does exactly this: it feeds one message, I/O completion or timer to its core as one
//! input, maps each output to one I/O call, and re-arms one timer at the core's next deadline.
//! Nothing else: every decision is the core's. A store operation blocks the actor's mailbox
//! until it finishes (`ctx.wait`: one database operation at a time). A persist does not: the
//! node goes on (a slow disk must not stall hold deadlines) and the core acts on the decision
//! only when `Persisted` comes back. Every task an actor starts lives inside the actor's own
//! future: stopping the actor (or aborting the task returned by [`start_local`]) ends them all,
//! as a crash does.
//!
//! Actors need a tokio `LocalSet` (actix spawns with `spawn_local`); they never start threads.

pub mod data_node;
pub mod ingress;
pub mod io;

pub use node_core;

use actix::{Actor, Addr, Context};
use tokio::task::JoinHandle;

/// Starts `actor` on the current `LocalSet` and returns its address and its task. Aborting the
/// task ends the actor and every future it started at once (a crash).
pub fn start_local<A: Actor<Context = Context<A>>>(actor: A) -> (Addr<A>, JoinHandle<()>) {
    let context = Context::new();
    let future = context.into_future(actor);
    let addr = future.address();
    (addr, tokio::task::spawn_local(future))
}

/// A test's view of a core inside an actor: (now, input, outputs) of every `handle` call.
pub type Tap<I, O> = Box<dyn FnMut(u64, &I, &[O])>;

/// Polls `future` once with a waker that does nothing: its output if it completed at once.
/// An I/O call that finishes immediately (an in-memory store, a disk write already done) is
/// then fed back to the core in order, without a trip through the actor's mailbox machinery.
pub(crate) fn ready_now<F: std::future::Future>(future: &mut std::pin::Pin<Box<F>>) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// An actor's one timer, armed at its core's next deadline.
#[derive(Default)]
pub(crate) struct Timer(Option<(u64, actix::SpawnHandle)>);

impl Timer {
    /// Arms for `next` (cancelling a timer armed for another deadline). When it fires, it is
    /// cleared (`timer_of` finds it in the actor) and `fire` runs.
    pub(crate) fn rearm<A: Actor<Context = Context<A>>>(
        &mut self,
        ctx: &mut Context<A>,
        now_ms: u64,
        next: Option<u64>,
        timer_of: fn(&mut A) -> &mut Timer,
        fire: fn(&mut A, &mut Context<A>),
    ) {
        use actix::AsyncContext;
        if self.0.as_ref().map(|(at, _)| *at) == next {
            return;
        }
        if let Some((_, handle)) = self.0.take() {
            ctx.cancel_future(handle);
        }
        if let Some(at) = next {
            let delay = std::time::Duration::from_millis(at.saturating_sub(now_ms));
            let handle = ctx.run_later(delay, move |act, ctx| {
                timer_of(act).0 = None;
                fire(act, ctx);
            });
            self.0 = Some((at, handle));
        }
    }
}

/// A message that stops an actor (a graceful stop: messages already queued are not handled).
#[derive(Debug, Clone, Copy)]
pub struct Stop;

impl actix::Message for Stop {
    type Result = ();
}
