//! The cutover protocol (DESIGN.md, "Cutover") and its triggers.

pub mod fence;
pub mod protocol;
pub mod window;
