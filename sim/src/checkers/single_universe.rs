//! Single universe: no request is admitted to a generation older than one another request was
//! admitted to before (checked at routers and at data stores separately). With one upgrade that
//! is "every old admission before every new one"; upgrade after upgrade, generations only move
//! forward.

use super::{AdmissionPoint, Violation};
use protocol::Generation;

#[derive(Debug, Default)]
pub struct SingleUniverse {
    /// The newest generation admitted to at routers and at stores, and its first admission:
    /// (generation, time µs, who).
    newest: [Option<(Generation, u64, String)>; 2],
}

impl SingleUniverse {
    /// The newest generation any client request was admitted to, anywhere.
    pub fn newest_admitted(&self) -> Option<Generation> {
        self.newest.iter().flatten().map(|(g, _, _)| *g).max()
    }

    pub fn admitted(
        &mut self,
        now_us: u64,
        point: AdmissionPoint,
        who: &str,
        generation: Generation,
        request: u64,
    ) -> Option<Violation> {
        let newest = &mut self.newest[point as usize];
        match newest {
            Some((g, at_us, by)) if generation < *g => Some(Violation::MixedUniverses {
                point,
                node: who.to_string(),
                request,
                generation,
                newer: *g,
                first_newer_by: by.clone(),
                first_newer_at_us: *at_us,
            }),
            Some((g, _, _)) if generation == *g => None,
            _ => {
                *newest = Some((generation, now_us, who.to_string()));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G1: Generation = Generation(1);
    const G2: Generation = Generation(2);

    #[test]
    fn an_admission_to_an_older_generation_after_a_newer_one_is_a_violation() {
        let mut c = SingleUniverse::default();
        assert_eq!(c.admitted(1, AdmissionPoint::Router, "r1", G1, 1), None);
        assert_eq!(c.admitted(2, AdmissionPoint::Router, "r2", G2, 2), None);
        assert_eq!(c.admitted(3, AdmissionPoint::Store, "db", G1, 3), None, "points are separate");
        let v = c.admitted(4, AdmissionPoint::Router, "r1", G1, 4);
        assert!(matches!(v, Some(Violation::MixedUniverses { request: 4, first_newer_at_us: 2, .. })), "{v:?}");
        assert_eq!(c.admitted(5, AdmissionPoint::Router, "r1", Generation(3), 5), None, "the next switch");
        let v = c.admitted(6, AdmissionPoint::Router, "r2", G2, 6);
        assert!(
            matches!(v, Some(Violation::MixedUniverses { newer: Generation(3), first_newer_at_us: 5, .. })),
            "{v:?}"
        );
    }
}
