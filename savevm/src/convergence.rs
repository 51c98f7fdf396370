//! Whether the migration is getting anywhere, and what to do when it is not.
//!
//! Auto-converge follows QEMU (`migration_trigger_throttle`): at a dirty sync ending a
//! period of at least [`PERIOD`], the bytes the guest dirtied in the period are compared
//! with the bytes sent; when they exceed `throttle-trigger-threshold` percent of them in
//! two periods, the vCPUs are throttled down, first to `cpu-throttle-initial` percent,
//! then `cpu-throttle-increment` more each time, up to `max-cpu-throttle`.
//!
//! Two things make it converge sooner than QEMU's. The migration thread syncs at least
//! once a [`PERIOD`] ([`Convergence::due`]), where QEMU syncs only at the end of a round
//! (at 50 MB/s a 128 MiB round is 2.7 s, so each of its steps took 5.4 s). And the
//! initial value and the increment are the smallest steps: where the period's rates show
//! that more is needed (the guest's unthrottled dirty rate against the share of the
//! bandwidth the trigger allows), the throttle goes there at once rather than in 10%
//! steps two periods apart.
//!
//! Unlike QEMU, a migration that cannot converge ends instead of iterating forever: when
//! for the stall timeout the pending bytes have neither dropped by a tenth nor by a
//! quarter of what was sent meanwhile, and no throttle was raised, the migration fails
//! with the rates that explain it, and the source runs on (unthrottled). A parameter change restarts the clock, so raising
//! the downtime limit or the bandwidth gives a stalled migration a new chance.

use std::time::{Duration, Instant};

use crate::MigrationParams;

/// The shortest period between two throttle decisions (QEMU's).
pub const PERIOD: Duration = Duration::from_secs(1);

/// The pending bytes make progress when they drop by a tenth below their lowest...
const PROGRESS: f64 = 0.9;
/// ...or by at least this share of what was sent since the last progress (a slow link
/// emptying a large memory progresses steadily, by less than a tenth at a time).
const NET_SHARE: f64 = 0.25;

/// What the migration thread does after a dirty sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on as before.
    Continue,
    /// Throttle the vCPUs to this percentage.
    Throttle(u8),
    /// Give up: why.
    CannotConverge(String),
    /// Switch to post-copy (`x-postcopy-auto`): the guest dirties faster than the link
    /// carries, as auto-converge would have judged it.
    Postcopy,
}

/// The convergence watch of one migration.
#[derive(Debug)]
pub struct Convergence {
    period_start: Instant,
    /// Stream bytes written when the period began.
    period_sent: u64,
    /// Bytes the guest dirtied in the period.
    period_dirtied: u64,
    /// Periods in a row that dirtied more than the trigger threshold.
    high_periods: u32,
    throttle: u8,
    /// The pending figure at the last progress.
    best: Option<u64>,
    /// When the migration last made progress (or got a new chance).
    progress_at: Instant,
    /// Stream bytes written then.
    progress_sent: u64,
    /// The dirty and send rates of the last full period (bytes/s).
    rates: Option<(f64, f64)>,
}

impl Convergence {
    /// A watch starting at `now`, with `sent` stream bytes written so far.
    pub fn new(now: Instant, sent: u64) -> Self {
        Convergence {
            period_start: now,
            period_sent: sent,
            period_dirtied: 0,
            high_periods: 0,
            throttle: 0,
            best: None,
            progress_at: now,
            progress_sent: sent,
            rates: None,
        }
    }

    /// The throttle in effect, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Whether a period has run out, so the thread should sync even though the pending
    /// bytes are not yet near the switchover.
    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.period_start) >= PERIOD
    }

    /// The parameters changed: the stall clock restarts.
    pub fn new_chance(&mut self, now: Instant) {
        self.progress_at = now;
        self.best = None;
    }

    /// A dirty sync at `now` found `dirtied` new bytes and left `pending`; `sent` stream
    /// bytes are written so far and `threshold` is what the switchover needs.
    pub fn synced(
        &mut self,
        now: Instant,
        sent: u64,
        dirtied: u64,
        pending: u64,
        threshold: u64,
        params: &MigrationParams,
    ) -> Verdict {
        self.period_dirtied = self.period_dirtied.saturating_add(dirtied);
        match self.best {
            None => {
                self.best = Some(pending);
                self.progress_sent = sent;
            }
            Some(b) => {
                let net = b.saturating_sub(pending) as f64;
                let sent_since = sent.saturating_sub(self.progress_sent) as f64;
                if (pending as f64) < b as f64 * PROGRESS
                    || (net > 0.0 && net >= sent_since * NET_SHARE)
                {
                    self.best = Some(pending);
                    self.progress_at = now;
                    self.progress_sent = sent;
                }
            }
        }

        let elapsed = now.saturating_duration_since(self.period_start);
        let mut verdict = Verdict::Continue;
        if elapsed >= PERIOD {
            let period_sent = sent.saturating_sub(self.period_sent);
            let (dirty_rate, send_rate) = (
                self.period_dirtied as f64 / elapsed.as_secs_f64(),
                period_sent as f64 / elapsed.as_secs_f64(),
            );
            self.rates = Some((dirty_rate, send_rate));
            let share = f64::from(params.throttle_trigger_threshold) / 100.0;
            let postcopy_auto = params.postcopy && params.postcopy_auto;
            if (params.auto_converge || postcopy_auto) && dirty_rate > send_rate * share {
                self.high_periods += 1;
                if self.high_periods >= 2 && postcopy_auto {
                    // Post-copy bounds the time without slowing the guest.
                    return Verdict::Postcopy;
                }
                if self.high_periods >= 2 {
                    self.high_periods = 0;
                    let step = if self.throttle == 0 {
                        params.cpu_throttle_initial
                    } else {
                        self.throttle.saturating_add(params.cpu_throttle_increment)
                    };
                    let next = step
                        .max(needed(self.throttle, dirty_rate, send_rate * share))
                        .min(params.max_cpu_throttle);
                    if next > self.throttle {
                        self.throttle = next;
                        // A harder throttle is a new chance.
                        self.new_chance(now);
                        verdict = Verdict::Throttle(next);
                    }
                }
            }
            self.period_start = now;
            self.period_sent = sent;
            self.period_dirtied = 0;
        }
        if verdict == Verdict::Continue
            && now.saturating_duration_since(self.progress_at) >= params.stall_timeout
        {
            return Verdict::CannotConverge(self.explain(pending, threshold, params));
        }
        verdict
    }

    fn explain(&self, pending: u64, threshold: u64, params: &MigrationParams) -> String {
        const MB: f64 = 1e6;
        let rates = match self.rates {
            Some((dirty, sent)) => format!(
                "the guest dirtied {:.1} MB/s while {:.1} MB/s were sent, and ",
                dirty / MB,
                sent / MB
            ),
            None => String::new(),
        };
        let throttle = if !params.auto_converge {
            "; enable auto-converge, raise downtime-limit or max-bandwidth, or pause the guest"
                .to_string()
        } else {
            format!(
                " with the vCPUs throttled by {}% (max-cpu-throttle {}%); raise downtime-limit \
                 or max-bandwidth, or pause the guest",
                self.throttle, params.max_cpu_throttle
            )
        };
        format!(
            "the migration cannot converge: for {:.1} s {rates}{:.1} MB stayed pending against \
             the {:.1} MB a switchover of downtime-limit {} ms allows{throttle}",
            params.stall_timeout.as_secs_f64(),
            pending as f64 / MB,
            threshold as f64 / MB,
            params.downtime_limit.as_millis(),
        )
    }
}

/// The throttle (percent) at which a guest that dirtied `dirty_rate` bytes/s while
/// throttled by `throttle` percent would dirty no more than `allowed` bytes/s.
fn needed(throttle: u8, dirty_rate: f64, allowed: f64) -> u8 {
    let running = 1.0 - f64::from(throttle.min(99)) / 100.0;
    let unthrottled = dirty_rate / running;
    if unthrottled <= allowed || unthrottled <= 0.0 {
        return 0;
    }
    ((1.0 - allowed / unthrottled) * 100.0)
        .ceil()
        .clamp(0.0, 99.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(auto_converge: bool) -> MigrationParams {
        MigrationParams {
            auto_converge,
            stall_timeout: Duration::from_secs(5),
            ..MigrationParams::default()
        }
    }

    /// How the guest's dirtying answers the throttle.
    #[derive(Clone, Copy)]
    enum Guest {
        /// Dirties this many bytes/s unthrottled, proportionally less when throttled.
        Throttled(u64),
        /// Dirties this many bytes/s whatever the throttle.
        Stubborn(u64),
    }

    /// A watch started at `t0`, synced every 250 ms for `secs`, sending `send` bytes per
    /// second, with `pending` left after each; returns it with the verdicts that were not
    /// Continue, with their time.
    fn drive(
        t0: Instant,
        p: &MigrationParams,
        secs: f64,
        guest: Guest,
        send: u64,
        pending: impl Fn(f64) -> u64,
    ) -> (Convergence, Vec<(f64, Verdict)>) {
        let mut c = Convergence::new(t0, 0);
        let mut out = Vec::new();
        let step = 0.25;
        let mut t = step;
        while t <= secs + 1e-9 {
            let now = t0 + Duration::from_secs_f64(t);
            let sent = (send as f64 * t) as u64;
            let rate = match guest {
                Guest::Throttled(d) => d as f64 * (1.0 - f64::from(c.throttle()) / 100.0),
                Guest::Stubborn(d) => d as f64,
            };
            let v = c.synced(now, sent, (rate * step) as u64, pending(t), 1 << 20, p);
            if v != Verdict::Continue {
                out.push((t, v));
            }
            t += step;
        }
        (c, out)
    }

    /// Pending bytes falling by a fifth a second from 1 GB.
    fn shrinking(t: f64) -> u64 {
        (1e9 * 0.8f64.powf(t)) as u64
    }

    fn throttles(v: &[(f64, Verdict)]) -> Vec<(f64, u8)> {
        v.iter()
            .map(|(t, v)| match v {
                Verdict::Throttle(n) => (*t, *n),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_throttle_goes_at_once_to_what_the_rates_need() {
        let t0 = Instant::now();
        let p = params(true);
        // 400 MB/s against 100 MB/s sent, of which 50% is allowed: 1 - 50/400 = 87.5%.
        let (_, v) = drive(
            t0,
            &p,
            20.0,
            Guest::Throttled(400_000_000),
            100_000_000,
            shrinking,
        );
        // After two high periods, and never again: 48 MB/s is under the trigger.
        assert_eq!(throttles(&v), [(2.0, 88)]);
    }

    #[test]
    fn a_guest_slightly_too_fast_gets_the_initial_step() {
        let t0 = Instant::now();
        let p = params(true);
        let (_, v) = drive(
            t0,
            &p,
            20.0,
            Guest::Throttled(60_000_000),
            100_000_000,
            shrinking,
        );
        assert_eq!(throttles(&v), [(2.0, 20)]);
    }

    #[test]
    fn a_guest_the_throttle_does_not_slow_is_stepped_up_to_the_max() {
        let t0 = Instant::now();
        let p = MigrationParams {
            stall_timeout: Duration::from_secs(60),
            ..params(true)
        };
        let (c, v) = drive(
            t0,
            &p,
            40.0,
            Guest::Stubborn(80_000_000),
            100_000_000,
            |_| 200 << 20,
        );
        let steps = throttles(&v);
        // Every two periods, by at least the increment, up to the max.
        for w in steps.windows(2) {
            assert_eq!(w[1].0 - w[0].0, 2.0, "{steps:?}");
            assert!(w[1].1 >= w[0].1 + 10 || w[1].1 == 99, "{steps:?}");
        }
        assert_eq!(steps[0], (2.0, 38));
        assert_eq!(steps.last().unwrap().1, 99);
        assert_eq!(c.throttle(), 99);
    }

    #[test]
    fn a_guest_dirtying_little_is_not_throttled_and_converging_is_never_a_stall() {
        let t0 = Instant::now();
        let p = params(true);
        // 40% of what is sent: below the trigger; pending keeps falling.
        let (c, v) = drive(
            t0,
            &p,
            20.0,
            Guest::Throttled(40_000_000),
            100_000_000,
            shrinking,
        );
        assert_eq!(v, []);
        assert_eq!(c.throttle(), 0);
    }

    #[test]
    fn a_slow_link_emptying_a_large_memory_is_progress() {
        let t0 = Instant::now();
        let p = params(false);
        // 1 MB/s against 1 GB pending: a tenth takes 100 s, far beyond the 5 s timeout.
        let (_, v) = drive(t0, &p, 60.0, Guest::Stubborn(0), 1_000_000, |t| {
            (1e9 - 1e6 * t) as u64
        });
        assert_eq!(v, []);
    }

    #[test]
    fn without_auto_converge_a_stall_fails_after_the_timeout_with_the_rates() {
        let t0 = Instant::now();
        let p = params(false);
        let (c, v) = drive(
            t0,
            &p,
            20.0,
            Guest::Stubborn(90_000_000),
            100_000_000,
            |_| 64 << 20,
        );
        let (t, Verdict::CannotConverge(why)) = &v[0] else {
            panic!("{v:?}")
        };
        assert_eq!(*t, 5.0);
        assert!(
            why.contains("dirtied 90.0 MB/s while 100.0 MB/s were sent"),
            "{why}"
        );
        assert!(why.contains("67.1 MB stayed pending"), "{why}");
        assert!(why.contains("enable auto-converge"), "{why}");
        assert_eq!(c.throttle(), 0);
    }

    #[test]
    fn with_auto_converge_the_stall_counts_only_once_the_throttle_is_at_its_max() {
        let t0 = Instant::now();
        let p = MigrationParams {
            max_cpu_throttle: 40,
            ..params(true)
        };
        let (_, v) = drive(
            t0,
            &p,
            30.0,
            Guest::Stubborn(90_000_000),
            100_000_000,
            |_| 64 << 20,
        );
        // The rates ask for 45%, the max is 40%: then 5 s without progress.
        assert_eq!(throttles(&v[..1]), [(2.0, 40)]);
        let (t, Verdict::CannotConverge(why)) = &v[1] else {
            panic!("{v:?}")
        };
        assert_eq!(*t, 7.0);
        assert!(
            why.contains("throttled by 40% (max-cpu-throttle 40%)"),
            "{why}"
        );
    }

    #[test]
    fn a_new_chance_restarts_the_stall_clock() {
        let t0 = Instant::now();
        let p = params(false);
        let (mut c, v) = drive(
            t0,
            &p,
            4.0,
            Guest::Stubborn(90_000_000),
            100_000_000,
            |_| 64 << 20,
        );
        assert_eq!(v, []);
        c.new_chance(t0 + Duration::from_secs(4));
        let pending = 64 << 20;
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(c.synced(at(8), 0, 0, pending, 0, &p), Verdict::Continue);
        assert!(matches!(
            c.synced(at(9), 0, 0, pending, 0, &p),
            Verdict::CannotConverge(_)
        ));
    }
}
