//! KVM vCPU threads: running, stopping (immediate_exit plus a signal), throttle naps,
//! state requests.
//!
//! Stopping follows the KVM API's rule for consistent state: a vCPU that exited for I/O
//! re-enters KVM_RUN with `immediate_exit` set, which completes the I/O without running
//! another guest instruction, before it parks. The thread that asked waits on a condition
//! variable until every vCPU has parked (no spinning: two cores).

use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, anyhow};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;
use savevm_kvm::VcpuState;

/// What the vCPU's owner wants it to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Quit,
}

/// A request a parked vCPU carries out on its own fd (KVM wants vCPU ioctls from the
/// thread that runs the vCPU).
enum Command {
    Save,
    Load(Box<VcpuState>),
}

enum Reply {
    Saved(Box<VcpuState>),
    Loaded,
}

struct Ctl {
    want: Want,
    /// The vCPU is parked outside KVM_RUN with no I/O pending.
    parked: bool,
    exited: bool,
    command: Option<Command>,
    reply: Option<Result<Reply, String>>,
    /// Why the guest cannot run any more (triple fault, entry failure).
    fault: Option<String>,
    /// A throttle's sleep, taken before the vCPU next runs guest code.
    nap: Option<Duration>,
}

/// The `immediate_exit` byte of a vCPU's `kvm_run` page and its thread, for kicks.
struct Kick {
    tid: libc::pthread_t,
    immediate_exit: *mut u8,
}

// SAFETY: the pointer is only used for atomic byte stores while the owning vCPU thread
// keeps its `kvm_run` mapping alive, which the `kick` mutex guarantees (the thread clears
// the kick under that mutex before it drops its fd, on every exit path). The vCPU thread
// meanwhile holds a `&mut kvm_run` inside kvm-ioctls' `run()`; the kernel reads the byte,
// and a concurrent store of it is the protocol the KVM API prescribes, as in every VMM.
unsafe impl Send for Kick {}

/// The shared half of a vCPU: control state and the kick.
pub struct VcpuShared {
    index: usize,
    // Lock: guards the control state; the vCPU thread waits on `cond` when parked or
    // halted, requesters wait on it for acknowledgements and replies.
    ctl: Mutex<Ctl>,
    cond: Condvar,
    // Lock: held while kicking and while the vCPU thread sets or clears the kick.
    kick: Mutex<Option<Kick>>,
    /// The thread's host id (0 until it started): `query-cpus-fast`'s thread-id.
    tid: AtomicI32,
}

impl VcpuShared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Ctl>) -> MutexGuard<'a, Ctl> {
        self.cond.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the vCPU leave KVM_RUN soon: `immediate_exit` for a vCPU about to enter, the
    /// signal for one inside.
    fn kick(&self) {
        let k = self.kick.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = k.as_ref() {
            // SAFETY: see `Kick`: the mapping is alive while the kick is registered, and
            // the byte is only accessed atomically by this process.
            unsafe { AtomicU8::from_ptr(k.immediate_exit).store(1, Ordering::SeqCst) };
            // SAFETY: the thread is alive while its kick is registered (it deregisters
            // under this lock before exiting); the signal's handler does nothing.
            unsafe { libc::pthread_kill(k.tid, libc::SIGRTMIN()) };
        }
    }

    /// Makes a running vCPU sleep `d` before it next runs guest code (the throttle).
    pub fn nap(&self, d: Duration) {
        let mut c = self.lock();
        if c.want != Want::Run {
            return;
        }
        c.nap = Some(d);
        drop(c);
        self.kick();
    }

    fn set_immediate_exit(&self, v: u8) {
        let k = self.kick.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = k.as_ref() {
            // SAFETY: as in `kick`.
            unsafe { AtomicU8::from_ptr(k.immediate_exit).store(v, Ordering::SeqCst) };
        }
    }
}

/// One vCPU and its thread.
pub struct Vcpu {
    shared: Arc<VcpuShared>,
    thread: Option<JoinHandle<()>>,
}

extern "C" fn kick_handler(_: libc::c_int) {}

/// Installs the no-op SIGRTMIN handler once per process (without SA_RESTART, so KVM_RUN
/// returns EINTR).
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid
        // argument; the handler is async-signal-safe (it does nothing).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = kick_handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGRTMIN(), &sa, std::ptr::null_mut());
        }
    });
}

impl Vcpu {
    /// Starts the thread of vCPU `index`, parked until [`Vcpu::resume`].
    pub fn spawn(index: usize, fd: VcpuFd, bus: Arc<Bus>, msrs: Arc<Vec<u32>>) -> Result<Self> {
        install_kick_handler();
        let shared = Arc::new(VcpuShared {
            index,
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                parked: false,
                exited: false,
                command: None,
                reply: None,
                fault: None,
                nap: None,
            }),
            cond: Condvar::new(),
            kick: Mutex::new(None),
            tid: AtomicI32::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run(fd, s, bus, msrs))?;
        Ok(Vcpu {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks the vCPU to stop (returns at once; see [`Vcpu::wait_parked`]).
    pub fn request_pause(&self) {
        let mut c = self.shared.lock();
        if c.want == Want::Run {
            c.want = Want::Pause;
        }
        drop(c);
        // A vCPU sleeping after a HLT exit waits on the condition variable, not in KVM.
        self.shared.cond.notify_all();
        self.shared.kick();
    }

    /// Waits until the vCPU is parked outside KVM_RUN with its I/O completed.
    pub fn wait_parked(&self) {
        let mut c = self.shared.lock();
        while !c.parked && !c.exited {
            c = self.shared.wait(c);
        }
    }

    /// Lets the vCPU run.
    pub fn resume(&self) {
        let mut c = self.shared.lock();
        if c.want == Want::Pause {
            c.want = Want::Run;
        }
        drop(c);
        self.shared.cond.notify_all();
    }

    /// The handle the throttle naps this vCPU through.
    pub fn shared(&self) -> Arc<VcpuShared> {
        self.shared.clone()
    }

    /// The vCPU thread's host id (0 before it started).
    pub fn thread_id(&self) -> i32 {
        self.shared.tid.load(Ordering::Relaxed)
    }

    /// Why the guest stopped for good, if it did.
    pub fn fault(&self) -> Option<String> {
        self.shared.lock().fault.clone()
    }

    fn request(&self, cmd: Command) -> Result<Reply> {
        let mut c = self.shared.lock();
        anyhow::ensure!(
            c.parked && !c.exited,
            "vCPU {} is not stopped",
            self.shared.index
        );
        c.command = Some(cmd);
        c.reply = None;
        self.shared.cond.notify_all();
        loop {
            if let Some(r) = c.reply.take() {
                return r.map_err(|e| anyhow!("vCPU {}: {e}", self.shared.index));
            }
            if c.exited {
                return Err(anyhow!("vCPU {} exited", self.shared.index));
            }
            c = self.shared.wait(c);
        }
    }

    /// The state of the stopped vCPU.
    ///
    /// # Errors
    /// Not stopped, or an ioctl failed.
    pub fn save_state(&self) -> Result<VcpuState> {
        match self.request(Command::Save)? {
            Reply::Saved(s) => Ok(*s),
            Reply::Loaded => unreachable!("a save is answered with a state"),
        }
    }

    /// Loads `state` into the stopped vCPU.
    ///
    /// # Errors
    /// Not stopped, or an ioctl failed.
    pub fn load_state(&self, state: VcpuState) -> Result<()> {
        self.request(Command::Load(Box::new(state))).map(|_| ())
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Quit;
        self.shared.cond.notify_all();
        self.shared.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Ends a vCPU thread cleanly however it ends (a panic included): the kick is removed
/// before the `kvm_run` mapping goes away with the fd, and waiters learn the vCPU is gone.
struct ThreadEnd<'a>(&'a VcpuShared);

impl Drop for ThreadEnd<'_> {
    fn drop(&mut self) {
        *self.0.kick.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.0.lock().exited = true;
        self.0.cond.notify_all();
    }
}

fn run(mut fd: VcpuFd, s: Arc<VcpuShared>, bus: Arc<Bus>, msrs: Arc<Vec<u32>>) {
    // SAFETY: gettid has no preconditions.
    s.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
    {
        let ie = std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit);
        // SAFETY: pthread_self has no preconditions.
        let tid = unsafe { libc::pthread_self() };
        *s.kick.lock().unwrap_or_else(|p| p.into_inner()) = Some(Kick {
            tid,
            immediate_exit: ie,
        });
    }
    // Declared after `fd`, so it is dropped first: the kick goes before the mapping does.
    let _end = ThreadEnd(&s);
    while control(&mut fd, &s, &msrs) {
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => bus.io_out(port, data),
            Ok(VcpuExit::IoIn(port, data)) => bus.io_in(port, data),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Hlt) => {
                // Halted with interrupts off: nothing will wake the guest, so sleep until
                // someone wants this vCPU stopped.
                let mut c = s.lock();
                while c.want == Want::Run {
                    c = s.wait(c);
                }
            }
            Ok(VcpuExit::Shutdown) => {
                fail(&s, "the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => fail(
                &s,
                format!("KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"),
            ),
            Ok(VcpuExit::InternalError) => {
                fail(&s, "KVM internal error (emulation failure)".into())
            }
            Ok(other) => fail(&s, format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag before looking at what is wanted, so a kick that
                // raced with this clear is still seen through `want`.
                s.set_immediate_exit(0);
            }
            Err(e) => fail(&s, format!("KVM_RUN failed: {e}")),
        }
    }
}

fn fail(s: &VcpuShared, why: String) {
    let mut c = s.lock();
    c.fault.get_or_insert(why);
}

/// Runs the control protocol before each KVM_RUN: returns false when the thread must end.
fn control(fd: &mut VcpuFd, s: &VcpuShared, msrs: &[u32]) -> bool {
    let mut c = s.lock();
    if let Some(d) = c.nap.take() {
        // Throttled: sleep, unless something else is wanted meanwhile.
        c = crate::throttle::nap(&s.cond, c, d, |c| c.want == Want::Run);
    }
    if c.want == Want::Run && c.fault.is_none() {
        return true;
    }
    if c.want == Want::Quit {
        return false;
    }
    drop(c);
    // Complete a pending I/O without running guest code, then park.
    s.set_immediate_exit(1);
    let _ = fd.run();
    s.set_immediate_exit(0);
    c = s.lock();
    loop {
        if c.want == Want::Quit {
            c.parked = false;
            return false;
        }
        // A state request made while parked is answered before the vCPU runs again, so
        // the requester (holding the VM lock) never waits for a vCPU that left.
        if let Some(cmd) = c.command.take() {
            drop(c);
            let reply = match cmd {
                Command::Save => VcpuState::save(fd, msrs).map(|st| Reply::Saved(Box::new(st))),
                Command::Load(st) => st.restore(fd).map(|_| Reply::Loaded),
            };
            c = s.lock();
            c.reply = Some(reply.map_err(|e| savevm::error_chain(&e)));
            s.cond.notify_all();
            continue;
        }
        if c.want == Want::Run && c.fault.is_none() {
            c.parked = false;
            s.cond.notify_all();
            return true;
        }
        if !c.parked {
            c.parked = true;
            s.cond.notify_all();
        }
        c = s.wait(c);
    }
}
