//! The run's trace: a hash of every event (always) and its text (on request).

use node::duties::validate::Fnv;
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

    pub fn hash(&self) -> u64 {
        self.hash.0
    }

    pub fn lines(&self) -> Option<&[String]> {
        self.lines.as_deref()
    }
}
