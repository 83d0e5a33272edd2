//! Isolation: the running system does not wait on Imago. A router that restarts on its own
//! disk (one it booted from before) serves from it at once, without the coordinator: no request
//! it takes is held for want of a first read. A freeze on its disk still holds requests, with
//! cause `Freeze` (it fails closed until it learns the outcome). Only a router without disk
//! state of its own (new, replaced, or copied from another node) waits for a first read.

use super::Violation;
use node_core::duties::router::HoldCause;

/// Router `router`, booted on its own disk (`own_disk`) or not, released a request held for
/// `cause`.
pub fn released(router: &str, own_disk: bool, cause: HoldCause, held_ms: u64) -> Option<Violation> {
    (own_disk && cause == HoldCause::Startup)
        .then(|| Violation::HeldAtStartupWithDisk { router: router.to_string(), held_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_router_without_disk_state_holds_at_startup() {
        assert_eq!(released("r", false, HoldCause::Startup, 900), None);
        assert_eq!(released("r", true, HoldCause::Freeze, 900), None, "a freeze on disk holds");
        assert!(matches!(
            released("r", true, HoldCause::Startup, 900),
            Some(Violation::HeldAtStartupWithDisk { held_ms: 900, .. })
        ));
    }
}
