//! `Machine`: guest RAM, the devices behind the VM lock, the vCPUs (KVM or software), the
//! run state, and the `VmControl` the migration thread drives.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{Context, Result, bail};
use savevm::{SectionError, VmControl, VmLock};
use serde_json::json;

use crate::events::EventLog;
use block_migration::Disk;

use crate::bus::{Bus, Devices};
use crate::cpus::Cpus;
use crate::disk::{BlockDevice, open_disks};
use crate::global_state::GlobalState;
use crate::guest::{self, GuestParams, LOAD_ADDR};
use crate::memory::{GuestRam, MemoryBackend};
pub use crate::run_state::RunState;
use crate::serial::{Console, new_uart};
use crate::{kvm, soft};
use vmm::spec::DriveSpec;

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm works, the software backend otherwise.
    Auto,
    /// KVM (fails without /dev/kvm).
    Kvm,
    /// The software backend: the workload runs on a host thread.
    Soft,
}

/// What a machine is made of.
pub struct MachineConfig {
    /// Bytes of RAM.
    pub memory: u64,
    /// Where RAM lives.
    pub memory_backend: MemoryBackend,
    /// vCPUs (KVM; the software backend has one).
    pub vcpus: usize,
    /// The accelerator.
    pub accel: Accel,
    /// The boot sector.
    pub image: Vec<u8>,
    /// Parameters to patch into it (with the TSC frequency filled in here).
    pub params: Option<GuestParams>,
    /// A destination: memory comes from the stream (no image is loaded) and shared disks
    /// are locked only when the guest starts here.
    pub incoming: bool,
    /// Where the serial port's output goes.
    pub serial: Box<dyn Write + Send>,
    /// The disks.
    pub drives: Vec<DriveSpec>,
    /// Hold the guest until `cont`: a source starts in `prelaunch`, a destination stays
    /// `paused` after its load (QEMU's `-S`).
    pub paused: bool,
    /// Hash shared disks at the switchover (`--verify`): they must be hashed before the
    /// destination may write them.
    pub verify: bool,
    /// A destination allocates all guest RAM before the stream arrives.
    pub prealloc: bool,
    /// Allocate all RAM at start on any side (QEMU's `-mem-prealloc`).
    pub mem_prealloc: bool,
    /// How KVM's dirty log re-protects pages.
    pub dirty_protect: kvm::DirtyProtect,
}

type RunObserver = Box<dyn Fn(RunState, RunState) + Send + Sync>;

/// A virtual machine.
pub struct Machine {
    /// The vCPUs. Declared first so they are dropped (their threads ended) before the
    /// memory KVM maps into the guest.
    pub cpus: Box<dyn Cpus>,
    /// The VM lock and the devices.
    pub bus: Arc<Bus>,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The disks.
    pub disks: Vec<Arc<Disk>>,
    /// Disks created here (`create=on`), which take the size the stream gives.
    pub created_disks: Vec<String>,
    /// What the guest printed.
    pub console: Arc<Console>,
    /// The event log.
    pub events: Arc<EventLog>,
    /// The guest parameters in effect.
    pub params: Option<GuestParams>,
    /// The runstate carried by the `globalstate` section, both ways.
    pub global_state: Arc<GlobalState>,
    // Lock: the run state, and a flag: in `finish-migrate` whether the guest ran when the
    // migration stopped it, in `inmigrate` whether it is to be held once loaded (a
    // `stop`); changed by the main thread, the monitor and the migration thread, only
    // through `transition`.
    state: Mutex<(RunState, bool)>,
    state_cond: Condvar,
    // Lock: called (without `state` held) with the old and new run state whenever the
    // guest starts or stops running: the monitor's STOP and RESUME events. Set once.
    on_run_change: Mutex<Option<RunObserver>>,
    /// `--paused`: a destination's guest stays paused after its load.
    hold_after_load: bool,
    // Lock: the shared disks this source unlocked for the destination at the switchover;
    // the migration thread hands them over and takes them back after a failure, `cont`
    // on a postmigrate source takes them back.
    handed_over: Mutex<Vec<Arc<Disk>>>,
    verify: bool,
    /// Whether guest RAM still holds only the zeros it was allocated with (a destination
    /// that never ran a guest nor loaded a stream): zero pages then need no writing.
    fresh_memory: AtomicBool,
    // Lock: with `verify`, the hashes of the shared disks taken at the switchover (the
    // migration thread writes, the verify report reads).
    shared_hashes: Mutex<Vec<(String, u64)>>,
    /// The outgoing migration hands guest memory over (x-ignore-shared with a memfd):
    /// set by the migration thread before it starts.
    gives_memory: AtomicBool,
    /// The last completed migration handed the guest's memory itself over: this copy
    /// must never run again (the destination runs the guest on the same memory).
    memory_given: AtomicBool,
    // Lock: with `verify`, the hash of guest RAM and the guest's counters (pass, stale
    // pages) taken at the switchover, before the destination could run on memory it
    // shares (the migration thread writes).
    switchover_hash: Mutex<Option<(u64, (u64, u64))>>,
    // Lock: a destination's post-copy state, set by the incoming thread when a load with
    // postcopy-ram starts; kept for as long as the guest may lack pages (its RAM stays
    // registered, so the guest waits for them rather than read zeros); read by
    // query-migrate.
    postcopy: Mutex<Option<Arc<ram_list::PostcopyIncoming>>>,
}

impl Machine {
    /// Builds a machine, stopped (call [`Machine::start`], or load a stream first).
    ///
    /// # Errors
    /// KVM requested but missing, bad memory size, bad parameters, failing ioctls.
    pub fn new(cfg: MachineConfig, events: Arc<EventLog>) -> Result<Arc<Self>> {
        let console = Arc::new(Console::default());
        let disks = open_disks(&cfg.drives, cfg.incoming)?;
        let use_kvm = match cfg.accel {
            Accel::Kvm => true,
            Accel::Soft => false,
            Accel::Auto => {
                let ok = kvm::available();
                if !ok {
                    eprintln!(
                        "vmm: /dev/kvm is not usable here: running the guest's workload on the SOFTWARE backend \
                         (a host thread on the same memory, with the VMM's own dirty tracking)"
                    );
                }
                ok
            }
        };
        let vm = if use_kvm {
            Some(kvm::KvmVm::new(cfg.dirty_protect)?)
        } else {
            None
        };
        // A memfd destination does not allocate: a local hand-over replaces its memory.
        let prefault = cfg.mem_prealloc
            || (cfg.incoming && cfg.prealloc && cfg.memory_backend == MemoryBackend::Anonymous);
        let ram = match &vm {
            Some(vm) => kvm::ram(vm, cfg.memory, cfg.memory_backend, prefault)?,
            None => soft::ram(cfg.memory, cfg.memory_backend, prefault)?,
        };
        if let (Some(m), false) = (&ram.memfd, cfg.incoming) {
            // This process runs the guest on its memory.
            m.try_lock().context("locking guest memory")?;
        }
        let bus = Bus::new(Devices {
            uart: new_uart(cfg.serial, console.clone()),
            block: BlockDevice::new(disks.clone(), ram.mem.clone()),
        });
        let (cpus, tsc_khz): (Box<dyn Cpus>, u32) = match vm {
            Some(vm) => {
                let backend = vm.into_backend(cfg.vcpus, bus.clone())?;
                let tsc = backend.tsc_khz();
                (Box::new(backend), tsc)
            }
            None => (Box::new(soft::SoftBackend::new(&ram, bus.clone())), 0),
        };
        let mut params = cfg.params;
        if let Some(p) = &mut params {
            p.tsc_khz = tsc_khz;
            p.disk_blocks = disks.first().map_or(0, |d| d.size() / 4096);
            if !cfg.incoming {
                p.validate(cfg.memory)?;
            }
        }
        if !cfg.incoming {
            guest::check_image(&cfg.image)?;
            let mut image = cfg.image.clone();
            if let Some(p) = &params {
                p.patch(&mut image)?;
            }
            ram.write(LOAD_ADDR, &image)
                .context("loading the guest image")?;
        }
        Ok(Arc::new(Machine {
            cpus,
            bus,
            ram,
            disks,
            created_disks: cfg
                .drives
                .iter()
                .filter(|d| d.create)
                .map(|d| d.id.clone())
                .collect(),
            console,
            events,
            params,
            global_state: Arc::default(),
            state: Mutex::new((
                if cfg.incoming {
                    RunState::InMigrate
                } else {
                    RunState::Prelaunch
                },
                false,
            )),
            state_cond: Condvar::new(),
            on_run_change: Mutex::new(None),
            hold_after_load: cfg.paused,
            handed_over: Mutex::new(Vec::new()),
            verify: cfg.verify,
            fresh_memory: AtomicBool::new(cfg.incoming),
            shared_hashes: Mutex::new(Vec::new()),
            gives_memory: AtomicBool::new(false),
            memory_given: AtomicBool::new(false),
            switchover_hash: Mutex::new(None),
            postcopy: Mutex::new(None),
        }))
    }

    fn state(&self) -> MutexGuard<'_, (RunState, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the run state with `f` (which may refuse), then wakes the waiters and,
    /// when the guest started or stopped running, tells the observer: every transition
    /// goes through here, so each emits its event exactly once.
    fn transition<R>(&self, f: impl FnOnce(&mut (RunState, bool)) -> R) -> R {
        let (old, new, r) = {
            let mut st = self.state();
            let old = st.0;
            let r = f(&mut st);
            (old, st.0, r)
        };
        self.state_cond.notify_all();
        if (old == RunState::Running) != (new == RunState::Running) && new != RunState::Shutdown {
            if let Some(o) = self
                .on_run_change
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                o(old, new);
            }
        }
        r
    }

    /// Calls `f(old, new)` whenever the guest starts or stops running.
    pub fn on_run_change(&self, f: impl Fn(RunState, RunState) + Send + Sync + 'static) {
        *self.on_run_change.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    /// The run state (a crashed guest shows as `guest-panicked`).
    pub fn run_state(&self) -> RunState {
        if self.cpus.fault().is_some() {
            return RunState::GuestPanicked;
        }
        self.state().0
    }

    fn set_state(&self, s: RunState) {
        self.transition(|st| st.0 = s);
    }

    /// Marks a destination as waiting for its stream: a VM started as a destination, or
    /// one whose guest was migrated away (it may receive it back). Returns the state to
    /// go back to should the load fail.
    ///
    /// # Errors
    /// The guest runs (or could run) here: loading over it would lose it.
    pub fn set_incoming(&self) -> Result<RunState> {
        self.transition(|st| {
            let was = st.0;
            match was {
                RunState::InMigrate | RunState::PostMigrate => {
                    *st = (RunState::InMigrate, false);
                    // What an earlier stream said does not apply to the next.
                    self.global_state.take_loaded();
                }
                other => bail!(
                    "the guest is {} here; only a VM started with --incoming or whose guest was migrated away \
                     can receive one",
                    other.as_str()
                ),
            }
            Ok(was)
        })
    }

    /// Puts back the state [`Machine::set_incoming`] left, after a failed load.
    pub fn incoming_failed(&self, previous: RunState) {
        self.set_state(previous);
    }

    /// Whether RAM still holds only zeros, and from now on not: the caller is about to
    /// load into it.
    pub fn take_fresh_memory(&self) -> bool {
        self.fresh_memory.swap(false, Ordering::SeqCst)
    }

    /// A destination's post-copy state for the load about to start (`postcopy-ram`);
    /// the one of an earlier load is dropped unless its guest still lacks pages.
    ///
    /// # Errors
    /// The guest of an earlier post-copy still waits for pages here.
    pub fn new_postcopy_incoming(&self) -> Result<Arc<ram_list::PostcopyIncoming>> {
        let mut slot = self.postcopy.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|p| p.waiting_for_pages()) {
            bail!("the guest of an interrupted post-copy still waits for its pages here");
        }
        let p = Arc::new(ram_list::PostcopyIncoming::new());
        p.set_vcpu_threads(
            self.cpus
                .thread_ids()
                .into_iter()
                .map(|t| u32::try_from(t).unwrap_or(0))
                .collect(),
        );
        *slot = Some(p.clone());
        Ok(p)
    }

    /// The destination's post-copy state, if a load used it.
    pub fn postcopy_incoming(&self) -> Option<Arc<ram_list::PostcopyIncoming>> {
        self.postcopy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks a source whose guest now runs elsewhere.
    pub fn set_migrated(&self) {
        self.set_state(RunState::PostMigrate);
    }

    /// Says whether the outgoing migration about to start hands the guest's memory over
    /// (x-ignore-shared with memfd RAM): once it completes, this copy never runs again.
    pub fn set_gives_memory(&self, on: bool) {
        self.gives_memory
            .store(on && self.ram.memfd.is_some(), Ordering::SeqCst);
    }

    /// The hash of guest RAM and the guest's counters taken at the switchover (`verify`
    /// with memfd RAM).
    pub fn switchover_hash(&self) -> Option<(u64, (u64, u64))> {
        *self
            .switchover_hash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the vCPUs (`cont`). On a source whose guest was migrated away (`postmigrate`)
    /// this is the operator's rollback, as QEMU allows it: the shared disks handed over
    /// must be locked here again first, so it fails while the destination holds them.
    ///
    /// # Errors
    /// The guest is being migrated or still being loaded, or a shared disk is held by
    /// another process.
    pub fn start(&self) -> Result<()> {
        // Read the state first: a guard in the match would still be held in the arm.
        let state = self.state().0;
        match state {
            RunState::InMigrate => bail!("the guest is still being loaded from a migration stream"),
            RunState::PostMigrate => {
                if self.memory_given.load(Ordering::SeqCst) {
                    bail!(
                        "the guest's memory was handed over to the destination (x-ignore-shared): the guest \
                         runs there on this same memory, so this copy, whose vCPU state is older, must not \
                         run again"
                    );
                }
                self.take_back_disks().map_err(|e| {
                    anyhow::anyhow!("{e}: the guest may be running elsewhere; stop it there first")
                })?;
                self.resume_from(Some(RunState::PostMigrate))
            }
            _ => self.resume_from(None),
        }
    }

    /// Locks again the guest memory (a memfd) and the shared disks this source released
    /// at a switchover.
    fn take_back_disks(&self) -> std::result::Result<(), String> {
        if let Some(m) = &self.ram.memfd {
            m.try_lock().map_err(|e| {
                format!("the guest's memory is in use by another process, which may run the guest on it ({e})")
            })?;
        }
        let r = self.take_back_shared_disks();
        if let (Err(_), Some(m)) = (&r, &self.ram.memfd) {
            // All or none.
            m.unlock();
        }
        r
    }

    fn take_back_shared_disks(&self) -> std::result::Result<(), String> {
        let mut handed = self.handed_over.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken: Vec<Arc<Disk>> = Vec::new();
        for d in handed.iter() {
            if let Err(e) = d.lock() {
                // All or none: a disk taken back is handed over again.
                for t in &taken {
                    t.unlock();
                }
                return Err(format!(
                    "shared disk {:?} is locked elsewhere ({e})",
                    d.name()
                ));
            }
            taken.push(d.clone());
        }
        handed.clear();
        Ok(())
    }

    /// Runs the guest of a destination that loaded it completely: takes the locks of the
    /// shared disks (which the source releases at the switchover), then the vCPUs.
    ///
    /// # Errors
    /// A shared disk stays locked by another process.
    pub fn start_after_load(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for d in &self.disks {
            while let Err(e) = d.lock() {
                if std::time::Instant::now() >= deadline {
                    return Err(anyhow::Error::new(e).context(
                        "the source still holds a shared disk; the guest does not run here",
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        if let Some(m) = &self.ram.memfd {
            // A source that handed its memory over lets go of it at its switchover.
            while let Err(e) = m.try_lock() {
                if std::time::Instant::now() >= deadline {
                    return Err(anyhow::Error::new(e).context(
                        "the source still holds the guest's memory; the guest does not run here",
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.memory_given.store(false, Ordering::SeqCst);
        }
        // As QEMU: a guest its source had paused (or never started) stays so; a running
        // one is held by `-S` or a `stop` while incoming, until `cont`.
        let from_stream = self.global_state.take_loaded();
        let held = self.transition(|st| {
            if st.0 != RunState::InMigrate {
                return false;
            }
            let to = match from_stream {
                Some(s @ (RunState::Paused | RunState::Prelaunch)) => s,
                _ if self.hold_after_load || st.1 => RunState::Paused,
                _ => return false,
            };
            *st = (to, false);
            true
        });
        if held {
            return Ok(());
        }
        self.resume_from(Some(RunState::InMigrate))
    }

    fn resume_from(&self, required: Option<RunState>) -> Result<()> {
        let resumed = self.transition(|st| {
            match st.0 {
                RunState::PostMigrate if required != Some(RunState::PostMigrate) => {
                    bail!("the guest was migrated away; this copy must not run again")
                }
                RunState::FinishMigrate => bail!("a migration is completing"),
                RunState::Running => return Ok(false),
                s if required.is_some_and(|r| r != s) => bail!("the guest is {}", s.as_str()),
                _ => {}
            }
            st.0 = RunState::Running;
            self.cpus.resume();
            Ok(true)
        })?;
        if resumed {
            self.events.emit("resumed", json!({}));
        }
        Ok(())
    }

    /// Stops the vCPUs (`stop`).
    ///
    /// # Errors
    /// A vCPU that cannot be stopped.
    pub fn stop(&self) -> Result<()> {
        self.cpus.pause()?;
        let stopped = self.transition(|st| match st.0 {
            RunState::Running => {
                st.0 = RunState::Paused;
                true
            }
            // A stop during a switchover: a migration that fails must not resume it.
            RunState::FinishMigrate => {
                st.1 = false;
                false
            }
            // A destination told to hold the guest once loaded.
            RunState::InMigrate => {
                st.1 = true;
                false
            }
            _ => false,
        });
        if stopped {
            self.events.emit("stopped", json!({}));
        }
        Ok(())
    }

    /// Holds a destination's guest paused once its load completes (as a `stop` while
    /// incoming does): it runs only on `cont`.
    pub fn hold_after_load(&self) {
        self.transition(|st| {
            if st.0 == RunState::InMigrate {
                st.1 = true;
            }
        });
    }

    /// Stops the vCPUs for good as the process ends: state `shutdown`, no STOP event.
    ///
    /// # Errors
    /// A vCPU that cannot be stopped.
    pub fn shutdown(&self) -> Result<()> {
        self.cpus.pause()?;
        self.transition(|st| st.0 = RunState::Shutdown);
        Ok(())
    }

    /// The hash of a shared disk taken at the switchover (`verify`).
    pub fn shared_hash(&self, name: &str) -> Option<u64> {
        self.shared_hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| *h)
    }

    /// The guest's pass counter and stale-page counter (built-in guest).
    pub fn guest_status(&self) -> (u64, u64) {
        (
            self.ram.read_u64(guest::PASS_ADDR),
            self.ram.read_u64(guest::MISMATCH_ADDR),
        )
    }
}

impl VmControl for Machine {
    fn handed_over(&self) {
        if self.gives_memory.load(Ordering::SeqCst) {
            self.memory_given.store(true, Ordering::SeqCst);
        }
        self.set_migrated();
    }

    fn lock(&self) -> VmLock<'_> {
        VmLock::holding(self.bus.vm_lock.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn stop_vcpus(&self) -> Result<(), SectionError> {
        // The state changes first, so a `cont` from now on is refused.
        self.transition(|st| {
            self.global_state.set_at_switchover(st.0);
            st.1 = st.0 == RunState::Running;
            st.0 = RunState::FinishMigrate;
        });
        self.cpus.pause().map_err(|e| format!("{e:#}"))?;
        Ok(())
    }

    fn flush_disks(&self) -> Result<(), SectionError> {
        for d in &self.disks {
            d.flush().map_err(|e| format!("{e:#}"))?;
        }
        // Shared disks go to the destination with the guest: release them now that
        // they are flushed, so it can take them when it starts. `verify` hashes them
        // first: afterwards the destination may write them.
        let mut handed = self.handed_over.lock().unwrap_or_else(|p| p.into_inner());
        for d in self.disks.iter().filter(|d| !d.migrates()) {
            if self.verify {
                let h = crate::disk::hash(d).map_err(|e| format!("{e:#}"))?;
                self.shared_hashes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((d.name().to_string(), h));
            }
            d.unlock();
            handed.push(d.clone());
        }
        if let Some(m) = &self.ram.memfd {
            // The memory too: a destination it is handed to runs on it once it has the
            // lock. `verify` hashes it first, while it is certainly the guest's as it
            // stopped here.
            if self.verify {
                *self
                    .switchover_hash
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) =
                    Some((self.ram.hash(), self.guest_status()));
            }
            m.unlock();
        }
        Ok(())
    }

    fn sync_disks(&self) -> Result<(), SectionError> {
        for d in &self.disks {
            d.flush().map_err(|e| format!("{e:#}"))?;
        }
        Ok(())
    }

    fn set_throttle(&self, percent: u8) -> Result<(), SectionError> {
        self.cpus.set_throttle(percent);
        Ok(())
    }

    fn resume_vcpus(&self) -> Result<(), SectionError> {
        // Take back the shared disks handed over for a switchover that failed; never run
        // without them: another process holding one may be running the guest.
        if let Err(e) = self.take_back_disks() {
            self.set_migrated();
            self.events
                .emit("not-resumed", json!({"reason": e.clone()}));
            return Err(format!(
                "{e}: the guest may run there, so it stays stopped here (postmigrate)"
            )
            .into());
        }
        let resumed = self.transition(|st| {
            if st.0 != RunState::FinishMigrate {
                return false;
            }
            st.0 = if st.1 {
                RunState::Running
            } else {
                RunState::Paused
            };
            if st.1 {
                self.cpus.resume();
            }
            st.1
        });
        if resumed {
            self.events
                .emit("resumed", json!({"after": "failed migration"}));
        }
        Ok(())
    }
}
