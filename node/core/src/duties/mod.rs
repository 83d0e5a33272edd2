//! Duty cores. Each is a plain state machine driven by its shell.

pub mod capture;
pub mod drain;
pub mod progress;
pub mod ranges;
pub mod router;
pub mod transform;
pub mod validate;
