//! The vCPU throttle of auto-converge (QEMU's `cpu-throttle.c`): a thread that, every
//! time slice, makes each vCPU sleep so that it runs only `100 - percent` percent of the
//! time. A vCPU runs [`TIMESLICE`], then sleeps `percent / (100 - percent)` of it: at 20%
//! 2.5 ms, at 99% 990 ms.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a throttled vCPU runs between two sleeps (QEMU's CPU_THROTTLE_TIMESLICE_NS).
pub const TIMESLICE: Duration = Duration::from_millis(10);

/// The most a vCPU can be throttled, percent.
pub const MAX_PERCENT: u8 = 99;

/// Sleeps up to `d` on `cond`, waking early once `keep_sleeping` says no (a pause, a
/// quit, a new throttle); returns the guard, held again.
pub fn nap<'a, T>(
    cond: &Condvar,
    mut guard: MutexGuard<'a, T>,
    d: Duration,
    keep_sleeping: impl Fn(&T) -> bool,
) -> MutexGuard<'a, T> {
    let deadline = Instant::now() + d;
    while keep_sleeping(&guard) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        guard = cond
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    guard
}

/// How long a vCPU throttled by `percent` sleeps per time slice.
pub fn sleep_per_slice(percent: u8) -> Duration {
    let p = f64::from(percent.min(MAX_PERCENT)) / 100.0;
    TIMESLICE.mul_f64(p / (1.0 - p))
}

struct State {
    percent: u8,
    quit: bool,
}

struct Shared {
    // Lock: the throttle asked for; the thread waits on `cond` for changes.
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running throttle thread; idle at 0%.
pub struct Throttle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Starts the thread; `sleep` makes every vCPU sleep the given time before it next
    /// runs guest code (and returns at once).
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn new(sleep: impl Fn(Duration) + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                percent: 0,
                quit: false,
            }),
            cond: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cpu-throttle".into())
            .spawn(move || run(&s, sleep))?;
        Ok(Throttle {
            shared,
            thread: Some(thread),
        })
    }

    /// Throttles to `percent` (capped at [`MAX_PERCENT`]; 0 stops).
    pub fn set(&self, percent: u8) {
        self.shared.lock().percent = percent.min(MAX_PERCENT);
        self.shared.cond.notify_all();
    }

    /// The throttle in effect, percent.
    pub fn percent(&self) -> u8 {
        self.shared.lock().percent
    }
}

fn run(s: &Shared, sleep: impl Fn(Duration)) {
    let mut st = s.lock();
    loop {
        if st.quit {
            return;
        }
        if st.percent == 0 {
            st = s.cond.wait(st).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let nap = sleep_per_slice(st.percent);
        drop(st);
        sleep(nap);
        st = s.lock();
        // The next slice starts once this one's run and sleep are over; a change of the
        // throttle takes effect at once.
        let percent = st.percent;
        st = self::nap(&s.cond, st, TIMESLICE + nap, |st| {
            !st.quit && st.percent == percent
        });
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    #[test]
    fn the_sleep_follows_qemus_formula() {
        assert_eq!(sleep_per_slice(0), Duration::ZERO);
        assert_eq!(sleep_per_slice(50), Duration::from_millis(10));
        assert_eq!(sleep_per_slice(20).as_micros(), 2500);
        assert_eq!(sleep_per_slice(99).as_millis(), 990);
        assert_eq!(sleep_per_slice(100), sleep_per_slice(99));
    }

    #[test]
    fn the_thread_asks_for_sleeps_only_while_throttled() {
        let naps = Arc::new(AtomicU64::new(0));
        let n = naps.clone();
        let t = Throttle::new(move |d| {
            assert_eq!(d, Duration::from_millis(10));
            n.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(naps.load(Ordering::SeqCst), 0);
        t.set(50);
        assert_eq!(t.percent(), 50);
        let start = Instant::now();
        while naps.load(Ordering::SeqCst) < 3 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        t.set(0);
        // At most one slice was in flight.
        std::thread::sleep(Duration::from_millis(50));
        let after = naps.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(naps.load(Ordering::SeqCst), after);
        drop(t);
    }
}
