//! The cutover protocol (DESIGN.md, "Cutover") and its triggers.

pub mod fence;
pub(crate) mod guard;
pub mod protocol;
