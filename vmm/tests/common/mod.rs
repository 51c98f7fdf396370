//! The process harness lives in xtask (shared with `cargo xtask migrate-test`); this
//! module points it at the vmm binary cargo built for these tests.
#![allow(dead_code)]

pub use vmm_harness::*;

/// The vmm binary of this build.
pub const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Points the harness at this build's vmm; every test calls it first.
pub fn init() {
    set_vmm(VMM);
}
