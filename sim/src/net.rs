//! The network model: per-link latency (by datacenter), jitter, loss, duplication and
//! partitions. Decides each message's fate; the world schedules deliveries.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// A process's network address (coordinator replicas' addresses are their Raft ids).
pub type Addr = u64;

/// A process of the simulated cluster. Its network address is derived from it and back; no
/// other code does arithmetic on addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProcId {
    Coordinator(usize),
    Router(usize),
    Data(usize),
    /// The operator's CLI (and the source of injected garbage).
    Operator,
}

const ROUTER_BASE: Addr = 1_000;
const DATA_BASE: Addr = 2_000;
const OPERATOR: Addr = 9_000;

impl ProcId {
    pub fn addr(self) -> Addr {
        match self {
            ProcId::Coordinator(i) => i as Addr + 1,
            ProcId::Router(i) => ROUTER_BASE + i as Addr,
            ProcId::Data(i) => DATA_BASE + i as Addr,
            ProcId::Operator => OPERATOR,
        }
    }

    pub fn of(addr: Addr) -> ProcId {
        match addr {
            1..ROUTER_BASE => ProcId::Coordinator((addr - 1) as usize),
            ROUTER_BASE..DATA_BASE => ProcId::Router((addr - ROUTER_BASE) as usize),
            DATA_BASE..OPERATOR => ProcId::Data((addr - DATA_BASE) as usize),
            _ => ProcId::Operator,
        }
    }
}

/// An active partition: messages from `a` to `b` are dropped, and from `b` to `a` too when
/// `symmetric`.
#[derive(Clone, Debug)]
pub struct Partition {
    pub id: u64,
    pub a: BTreeSet<Addr>,
    pub b: BTreeSet<Addr>,
    pub symmetric: bool,
}

/// A late message comes at least this much after its normal delay.
const LATE_US_MIN: u64 = 500_000;

/// The network's current behaviour.
#[derive(Debug, Default)]
pub struct NetModel {
    pub loss: f64,
    pub duplicate: f64,
    pub jitter_max_us: u64,
    /// Share of messages held back for a long time (a retransmission, a stalled proxy), and how
    /// long at most: they arrive long after their sender gave up on them.
    pub late: f64,
    pub late_us_max: u64,
    /// One-way base latency between datacenters, microseconds.
    pub dc_latency_us: Vec<Vec<u64>>,
    pub dc_of: BTreeMap<Addr, usize>,
    pub partitions: Vec<Partition>,
    next_partition: u64,
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

impl NetModel {
    /// Latencies for `datacenters` (one: 0.5 ms; more: 50–150 ms between each pair).
    pub fn new(datacenters: usize, rng: &mut ChaCha8Rng) -> NetModel {
        let mut dc_latency_us = vec![vec![500; datacenters]; datacenters];
        let pairs: Vec<(usize, usize)> =
            (0..datacenters).flat_map(|a| ((a + 1)..datacenters).map(move |b| (a, b))).collect();
        for (a, b) in pairs {
            let l = rng.gen_range(50_000..=150_000);
            dc_latency_us[a][b] = l;
            dc_latency_us[b][a] = l;
        }
        NetModel { dc_latency_us, ..Default::default() }
    }

    pub fn add_partition(&mut self, a: BTreeSet<Addr>, b: BTreeSet<Addr>, symmetric: bool) -> u64 {
        self.next_partition += 1;
        self.partitions.push(Partition { id: self.next_partition, a, b, symmetric });
        self.next_partition
    }

    pub fn remove_partition(&mut self, id: u64) {
        self.partitions.retain(|p| p.id != id);
    }

    pub fn blocked(&self, from: Addr, to: Addr) -> bool {
        self.partitions.iter().any(|p| {
            (p.a.contains(&from) && p.b.contains(&to)) || (p.symmetric && p.b.contains(&from) && p.a.contains(&to))
        })
    }

    /// Delays (µs) of the copies of one message that arrive; empty when it is lost.
    pub fn fate(&mut self, rng: &mut ChaCha8Rng, from: Addr, to: Addr) -> Vec<u64> {
        self.sent += 1;
        if from == to {
            return vec![0];
        }
        if self.blocked(from, to) || (self.loss > 0.0 && rng.gen_bool(self.loss)) {
            self.dropped += 1;
            return Vec::new();
        }
        let base = self.dc_latency_us[self.dc_of[&from]][self.dc_of[&to]];
        let jitter = self.jitter_max_us;
        let delay = |rng: &mut ChaCha8Rng| base + if jitter > 0 { rng.gen_range(0..=jitter) } else { 0 };
        let mut first = delay(rng);
        if self.late > 0.0 && rng.gen_bool(self.late) {
            first += rng.gen_range(LATE_US_MIN..=self.late_us_max.max(LATE_US_MIN));
        }
        if self.duplicate > 0.0 && rng.gen_bool(self.duplicate) {
            self.duplicated += 1;
            return vec![first, delay(rng)];
        }
        vec![first]
    }

    /// Heals: no loss, no duplication, no partitions (latency stays).
    pub fn heal(&mut self) {
        self.loss = 0.0;
        self.duplicate = 0.0;
        self.late = 0.0;
        self.partitions.clear();
    }
}
