//! The parts of vmm that read untrusted or user-typed input, as a library so they are
//! fuzzed (`cargo xtask fuzz`) and can be reused: the QMP protocol ([`qmp`]), the
//! command-line specs ([`spec`]) and the vCPU state carried in the `"cpu"` sections
//! ([`cpu_state`]). The binary, `vmm`, is the rest: the VM, the monitor, the migration.

pub mod cpu_state;
pub mod object;
pub mod qmp;
pub mod spec;
