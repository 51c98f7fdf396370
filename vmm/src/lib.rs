//! The parts of vmm that read untrusted or user-typed input, as a library so they are
//! fuzzed (`cargo xtask fuzz`) and can be reused: the QMP protocol ([`qmp`]), the
//! command-line specs ([`spec`]), the migration settings they set ([`settings`]). The vCPU state carried in the `"cpu"` sections is the
//! savevm-kvm crate's. The binary, `vmm`, is the rest: the VM, the monitor, the
//! migration.

pub mod object;
pub mod qmp;
pub mod settings;
pub mod spec;
