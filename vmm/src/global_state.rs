//! QEMU's `globalstate` section: the runstate the guest had when its source stopped it for
//! the switchover (`running`, `paused`, `prelaunch`), so that a destination resumes only
//! a guest that was running, and keeps a paused one paused (QEMU's rule, with `-S`
//! holding any guest). The same bytes as QEMU 7.2 (`migration/global_state.c`):
//! `u32 size` (the name's length with its NUL) then a 100-byte buffer holding the name.

use std::sync::{Arc, Mutex, MutexGuard};

use savevm::{DeviceHandler, FieldReader, FieldWriter, SectionError, SectionInfo, VmState};

use crate::run_state::RunState;

/// The runstate name's buffer (QEMU's `GlobalState.runstate`).
const RUNSTATE_LEN: usize = 100;

/// What the section carries, shared by the machine and its section.
#[derive(Debug, Default)]
pub struct GlobalState {
    // Lock: the runstate the guest had when the switchover stopped it (set by the
    // migration thread before it stops the vCPUs, saved in the same completion), and the
    // one a loaded stream said (set by the load, read when the destination starts).
    inner: Mutex<Cells>,
}

#[derive(Debug, Default)]
struct Cells {
    at_switchover: Option<RunState>,
    loaded: Option<RunState>,
}

impl GlobalState {
    fn lock(&self) -> MutexGuard<'_, Cells> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the runstate the switchover found.
    pub fn set_at_switchover(&self, s: RunState) {
        self.lock().at_switchover = Some(s);
    }

    /// Takes what the last loaded stream said (None: no `globalstate` section, as from a
    /// QEMU with `store-global-state` off: the guest counts as running).
    pub fn take_loaded(&self) -> Option<RunState> {
        self.lock().loaded.take()
    }
}

/// QEMU's `vmstate_globalstate`, field for field.
#[derive(VmState)]
#[vmstate(name = "globalstate")]
struct Fields {
    size: u32,
    runstate: [u8; RUNSTATE_LEN],
}

/// The `globalstate` section of a machine.
#[derive(Debug)]
pub struct GlobalStateSection(pub Arc<GlobalState>);

impl GlobalStateSection {
    /// How it registers (QEMU's name, instance 0, version 1).
    pub fn info() -> SectionInfo {
        SectionInfo::for_state::<Fields>("globalstate", 0)
    }
}

impl DeviceHandler for GlobalStateSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        let name = match self.0.lock().at_switchover {
            Some(RunState::Running) | None => "running",
            Some(RunState::Prelaunch) => "prelaunch",
            Some(_) => "paused",
        };
        let mut f = Fields {
            size: name.len() as u32 + 1,
            runstate: [0; RUNSTATE_LEN],
        };
        f.runstate[..name.len()].copy_from_slice(name.as_bytes());
        w.state(&f);
        Ok(())
    }

    fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
        let mut f = Fields {
            size: 0,
            runstate: [0; RUNSTATE_LEN],
        };
        r.state(&mut f, version)?;
        let (size, buf) = (f.size as usize, f.runstate);
        if size == 0 || size > RUNSTATE_LEN {
            return Err(format!(
                "globalstate: a runstate of {size} bytes (at most {RUNSTATE_LEN})"
            )
            .into());
        }
        let name = buf[..size]
            .split(|b| *b == 0)
            .next()
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or("globalstate: the runstate is not text")?;
        // QEMU's rule: anything but running and paused keeps the guest stopped as it was
        // (postmigrate, say, from a source that had migrated before); vmm knows prelaunch
        // too, and holds every other state as paused.
        let state = match name {
            "running" => RunState::Running,
            "prelaunch" => RunState::Prelaunch,
            "paused" | "postmigrate" | "finish-migrate" | "suspended" | "debug" | "io-error"
            | "watchdog" | "guest-panicked" | "internal-error" | "save-vm" | "restore-vm"
            | "shutdown" | "inmigrate" | "colo" => RunState::Paused,
            other => {
                return Err(format!(
                    "globalstate: unknown runstate {:?}",
                    other.chars().take(32).collect::<String>()
                )
                .into());
            }
        };
        self.0.lock().loaded = Some(state);
        Ok(())
    }
}
