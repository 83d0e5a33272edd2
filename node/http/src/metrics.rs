//! What a router exports on its `/metrics` endpoint (Prometheus text format): requests by what
//! the client was told, hold times during a freeze, mirrored and mismatched answers, the
//! generation served and the last epoch acted on. The shell feeds them from the core's events
//! and replies; the core decides nothing for them.

use node_core::ingress::{ClientReply, IngressEvent};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use protocol::Decision;

/// What a client was told.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `answered` (the universe's answer), `unavailable` (503), `unknown` (504).
    pub outcome: &'static str,
}

/// A router's metrics (cheap to clone: each is shared).
#[derive(Clone, Debug)]
pub struct NodeMetrics {
    requests: Family<Outcome, Counter>,
    /// The family's counters for answered, unavailable and unknown (looked up once, not per
    /// request).
    by_outcome: [Counter; 3],
    hold_ms: Histogram,
    mirrored: Counter,
    mismatched: Counter,
    ended: Counter,
    epoch: Gauge,
    in_progress: Gauge,
    held: Gauge,
    /// The generation served; 0 while holding (restarted and not yet told, or frozen), -1 retired.
    serving: Gauge,
}

impl NodeMetrics {
    /// Registers a router's metrics in `registry`.
    pub fn register(registry: &mut Registry) -> NodeMetrics {
        let requests = Family::<Outcome, Counter>::default();
        let by_outcome =
            ["answered", "unavailable", "unknown"].map(|outcome| requests.get_or_create(&Outcome { outcome }).clone());
        let m = NodeMetrics {
            requests,
            by_outcome,
            hold_ms: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            mirrored: Counter::default(),
            mismatched: Counter::default(),
            ended: Counter::default(),
            epoch: Gauge::default(),
            in_progress: Gauge::default(),
            held: Gauge::default(),
            serving: Gauge::default(),
        };
        registry.register("imago_requests", "Client requests, by what the client was told", m.requests.clone());
        registry.register("imago_hold_ms", "How long a request was held during a freeze (ms)", m.hold_ms.clone());
        registry.register("imago_mirrored", "Read-only requests mirrored and compared", m.mirrored.clone());
        registry.register("imago_mismatched", "Mirrored requests whose answers differed", m.mismatched.clone());
        registry.register(
            "imago_requests_ended",
            "Requests in flight ended at a freeze (a long route, or inflight_ms_max reached)",
            m.ended.clone(),
        );
        registry.register("imago_epoch", "The epoch of the last decision acted on", m.epoch.clone());
        registry.register(
            "imago_requests_in_progress",
            "Requests forwarded, held or mirrored now",
            m.in_progress.clone(),
        );
        registry.register("imago_requests_held", "Requests held now (a freeze, or a restart)", m.held.clone());
        registry.register(
            "imago_serving_generation",
            "The generation served (0: holding, -1: retired)",
            m.serving.clone(),
        );
        m
    }

    pub fn replied(&self, reply: &ClientReply) {
        let i = match reply {
            ClientReply::Answer(_) => 0,
            ClientReply::Unavailable { .. } => 1,
            ClientReply::Unknown => 2,
        };
        self.by_outcome[i].inc();
    }

    pub fn event(&self, event: &IngressEvent) {
        match event {
            IngressEvent::Released { held_ms, .. } => self.hold_ms.observe(*held_ms as f64),
            IngressEvent::Compared { verdict, .. } => {
                self.mirrored.inc();
                if *verdict == node_core::duties::validate::Verdict::Mismatch {
                    self.mismatched.inc();
                }
            }
            IngressEvent::Acted(decision) => {
                let epoch = match decision {
                    Decision::Freeze(e) | Decision::Commit(e) | Decision::Abort(e) => e.0,
                    Decision::Initial | Decision::Retired => 0,
                };
                if epoch > 0 {
                    self.epoch.set(epoch as i64);
                }
            }
            IngressEvent::Ended { .. } => {
                self.ended.inc();
            }
            IngressEvent::ValidationReset { .. } => {}
        }
    }

    /// The core's state after an input.
    pub fn observe(&self, core: &node_core::ingress::IngressCore) {
        use node_core::duties::router::Mode;
        self.in_progress.set(core.requests() as i64);
        self.held.set(core.router().held() as i64);
        self.serving.set(match core.router().mode() {
            Mode::Serving(g) => g.0 as i64,
            Mode::Unknown | Mode::Frozen(_) => 0,
            Mode::Retired => -1,
        });
    }
}
