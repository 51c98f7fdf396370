//! The project's automation as a library: the process harness shared by `cargo xtask`
//! and vmm's end-to-end tests.

pub mod harness;
pub mod proxy;
