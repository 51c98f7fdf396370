//! Threads a waiting guest depends on: post-copy's fault handling and page requests
//! (on the destination, the thread that turns a fault into a request and the one that
//! places a requested page; on the source, the one that reads the request and sends
//! the page). Each does a few microseconds of work per page a vCPU waits for, between
//! sleeps, while the background pass, the loader and the guest keep every core busy; at
//! the default priority each wake-up may wait a scheduler slice for a core.
//!
//! They run under `SCHED_FIFO` at its lowest priority (1), as interrupt threads do: a
//! wake-up takes a core at once from any normal thread. Each blocks between events and
//! does bounded work per event, and the kernel keeps 5% of each second for normal
//! threads whatever real-time threads do. Where the process may not (no CAP_SYS_NICE,
//! or a cgroup without real-time budget), nice -10; where not even that, the default.
//! On the `postcopy-preempt` bench scenario (3 single runs each, ours only): fault wait
//! p99 of 360 µs under `SCHED_FIFO`, 910 µs at nice -10, 2200 µs at the default.
//!
//! One thread a waiting guest depends on does a lot of work: a destination's loading
//! thread, which places the main stream's pages (a page the guest asked for may be
//! among them). It is raised the same way only while a fault waits ([`boost`],
//! [`unboost`]). Raised for the whole phase, with the source's sending thread, it made
//! the post-copy phase 70% longer and the waits no shorter (6 alternated pairs); raised
//! while a fault waits, the waits' p99 fell from 319 to 191 µs without preempt and from
//! 479 to 271 µs with it, the phase 8–11% longer (5 alternated pairs each).

/// Raises the calling thread's priority as above. Returns whether it could.
pub fn serve_waiting_guest() -> bool {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: pthread_self is the calling thread; the parameter lives for the call.
    if unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &p) } == 0 {
        return true;
    }
    // SAFETY: gettid has no preconditions; setpriority on this thread's own id changes
    // only its scheduling.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -10) == 0
    }
}

/// The calling thread's id, as [`boost`] takes it.
pub fn current_thread() -> i32 {
    thread_local! {
        // SAFETY: gettid has no preconditions.
        static TID: i32 = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    }
    TID.with(|t| *t)
}

/// Raises thread `tid` of this process to `SCHED_FIFO` as [`serve_waiting_guest`] does
/// for itself, while a guest waits on what that thread does (a post-copy destination's
/// loading thread while a vCPU waits for a page the main stream carries). Returns
/// whether it could; [`unboost`] puts it back.
pub fn boost(tid: i32) -> bool {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: the parameter lives for the call; the call changes only `tid`'s scheduling.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &p) == 0 }
}

/// Puts thread `tid` back to the normal policy after [`boost`].
pub fn unboost(tid: i32) {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in `boost`.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &p) };
}
