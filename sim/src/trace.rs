//! The run's trace: a hash of every event (always) and its text (on request).

use node_core::duties::validate::Fnv;
use std::fmt::{self, Write};

/// Trace of one seed.
#[derive(Debug, Default)]
pub struct Trace {
    hash: Fnv,
    lines: Option<Vec<String>>,
    pub events: u64,
}

struct HashWriter<'a>(&'a mut Fnv);

impl Write for HashWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.bytes(s.as_bytes());
        Ok(())
    }
}

impl Trace {
    pub fn new(keep_lines: bool) -> Self {
        Trace { hash: Fnv::default(), lines: keep_lines.then(Vec::new), events: 0 }
    }

    /// Records one event at virtual time `now_us`.
    pub fn event(&mut self, now_us: u64, what: fmt::Arguments<'_>) {
        self.events += 1;
        self.hash.bytes(&now_us.to_le_bytes());
        let _ = HashWriter(&mut self.hash).write_fmt(what);
        if let Some(lines) = &mut self.lines {
            lines.push(format!("{:>10.3}ms {}", now_us as f64 / 1000.0, what));
        }
    }

    /// Records a message sent from `from` to `to` (hashed as raw numbers: the most frequent event).
    /// `what`: the message, described (only when the trace is kept as text).
    pub fn packet(
        &mut self,
        now_us: u64,
        from: u64,
        to: u64,
        len: usize,
        delays_us: &[u64],
        what: impl FnOnce() -> String,
    ) {
        self.events += 1;
        for n in [now_us, from, to, len as u64, delays_us.len() as u64].iter().chain(delays_us) {
            self.hash.bytes(&n.to_le_bytes());
        }
        if let Some(lines) = &mut self.lines {
            lines.push(format!(
                "{:>10.3}ms net {from}->{to} len={len} delays_us={delays_us:?} {}",
                now_us as f64 / 1000.0,
                what()
            ));
        }
    }

    /// Records a request forwarded by a router (hashed as raw numbers: a frequent event).
    pub fn forward(&mut self, now_us: u64, router: u64, id: u64, generation: protocol::Generation, mirror: bool) {
        self.events += 1;
        let tag = 0xf0 | (generation.0 & 0x7) << 1 | u64::from(mirror);
        for n in [now_us, router, id, tag] {
            self.hash.bytes(&n.to_le_bytes());
        }
        if let Some(lines) = &mut self.lines {
            lines.push(format!(
                "{:>10.3}ms router@{router} forwards {id} to {generation} mirror={mirror}",
                now_us as f64 / 1000.0
            ));
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash.0
    }

    pub fn lines(&self) -> Option<&[String]> {
        self.lines.as_deref()
    }
}
