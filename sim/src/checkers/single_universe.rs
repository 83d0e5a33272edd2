//! Single universe: every request admitted to the old universe was admitted before every
//! request admitted to the new one (checked at routers and at data stores separately).

use super::{AdmissionPoint, Violation};
use protocol::Universe;

#[derive(Debug, Default)]
pub struct SingleUniverse {
    /// First admission to the new universe at routers and at stores: (time µs, who).
    first_new: [Option<(u64, String)>; 2],
}

impl SingleUniverse {
    pub fn admitted(
        &mut self,
        now_us: u64,
        point: AdmissionPoint,
        who: &str,
        universe: Universe,
        request: u64,
    ) -> Option<Violation> {
        let first = &mut self.first_new[point as usize];
        match universe {
            Universe::New => {
                first.get_or_insert_with(|| (now_us, who.to_string()));
                None
            }
            Universe::Old => first.as_ref().map(|(at_us, by)| Violation::MixedUniverses {
                point,
                node: who.to_string(),
                request,
                first_new_by: by.clone(),
                first_new_at_us: *at_us,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_admission_after_a_new_one_is_a_violation() {
        let mut c = SingleUniverse::default();
        assert_eq!(c.admitted(1, AdmissionPoint::Router, "r1", Universe::Old, 1), None);
        assert_eq!(c.admitted(2, AdmissionPoint::Router, "r2", Universe::New, 2), None);
        assert_eq!(c.admitted(3, AdmissionPoint::Store, "db", Universe::Old, 3), None, "points are separate");
        let v = c.admitted(4, AdmissionPoint::Router, "r1", Universe::Old, 4);
        assert!(matches!(v, Some(Violation::MixedUniverses { request: 4, first_new_at_us: 2, .. })), "{v:?}");
    }
}
