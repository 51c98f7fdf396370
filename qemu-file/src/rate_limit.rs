//! Bandwidth limiting per 100 ms window, as QEMU's `max-bandwidth`.

use std::time::{Duration, Instant};

/// Counts bytes per window and says when a window's share of the bandwidth is used up.
///
/// The migration thread asks [`RateLimiter::exceeded`] before producing more data and sleeps
/// until [`RateLimiter::window_end`] when it is; a limit of 0 means unlimited.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    max_bytes_per_sec: u64,
    window_start: Instant,
    window_bytes: u64,
}

impl RateLimiter {
    /// The length of one window.
    pub const WINDOW: Duration = Duration::from_millis(100);

    /// A limiter at `max_bytes_per_sec` (0: unlimited).
    pub fn new(max_bytes_per_sec: u64) -> Self {
        RateLimiter {
            max_bytes_per_sec,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// Changes the limit; takes effect in the current window.
    pub fn set_max_bytes_per_sec(&mut self, max: u64) {
        self.max_bytes_per_sec = max;
    }

    /// The limit in bytes per second (0: unlimited).
    pub fn max_bytes_per_sec(&self) -> u64 {
        self.max_bytes_per_sec
    }

    /// Accounts `n` bytes to the current window.
    pub fn consume(&mut self, n: u64) {
        self.window_bytes = self.window_bytes.saturating_add(n);
    }

    fn window_limit(&self) -> u64 {
        (self.max_bytes_per_sec / 10).max(1)
    }

    /// Starts a new window when due. Bytes beyond the windows' shares carry over, so a
    /// burst (a whole chunk, or bytes counted only once other connections wrote them)
    /// does not lift the average above the limit.
    fn roll(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= Self::WINDOW {
            let windows = (elapsed.as_nanos() / Self::WINDOW.as_nanos()) as u64;
            self.window_start = now;
            self.window_bytes = self
                .window_bytes
                .saturating_sub(self.window_limit().saturating_mul(windows));
        }
    }

    /// Whether the current window has used its share; starts a new window when due.
    pub fn exceeded(&mut self) -> bool {
        if self.max_bytes_per_sec == 0 {
            return false;
        }
        self.roll(Instant::now());
        self.window_bytes >= self.window_limit()
    }

    /// Bytes the current window still allows (`u64::MAX` when unlimited).
    pub fn remaining(&mut self) -> u64 {
        if self.max_bytes_per_sec == 0 {
            return u64::MAX;
        }
        self.roll(Instant::now());
        self.window_limit().saturating_sub(self.window_bytes)
    }

    /// When the current window ends and a new share becomes available.
    pub fn window_end(&self) -> Instant {
        self.window_start + Self::WINDOW
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_is_never_exceeded() {
        let mut r = RateLimiter::new(0);
        r.consume(u64::MAX);
        assert!(!r.exceeded());
        assert_eq!(r.remaining(), u64::MAX);
    }

    #[test]
    fn a_window_allows_a_tenth_of_the_bandwidth() {
        let mut r = RateLimiter::new(1000);
        assert_eq!(r.remaining(), 100);
        r.consume(99);
        assert!(!r.exceeded());
        r.consume(1);
        assert!(r.exceeded());
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn a_new_window_resets_the_count() {
        let mut r = RateLimiter::new(1000);
        r.consume(150);
        assert!(r.exceeded());
        std::thread::sleep(r.window_end().saturating_duration_since(Instant::now()));
        assert!(!r.exceeded());
        assert_eq!(
            r.remaining(),
            50,
            "the 50 bytes over the last share carried over"
        );
    }

    #[test]
    fn a_burst_is_paid_for_by_the_windows_after_it() {
        let mut r = RateLimiter::new(1000);
        r.consume(350);
        std::thread::sleep(RateLimiter::WINDOW);
        assert!(r.exceeded(), "250 left after one window's share");
        std::thread::sleep(RateLimiter::WINDOW * 3);
        assert!(!r.exceeded());
    }
}
