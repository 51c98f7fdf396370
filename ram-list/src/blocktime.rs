//! How long a post-copy destination's vCPUs waited for pages, as QEMU counts it
//! (`PostcopyBlocktimeContext` in its postcopy-ram.c): each vCPU's time blocked on a
//! missing page (`postcopy-vcpu-blocktime`), and the time all of them were blocked at
//! once (`postcopy-blocktime`), when the guest made no progress at all. Faults of other
//! threads (the VMM's own reads of guest memory) count for neither.

use std::time::{Duration, Instant};

/// A page: (block index, page index).
pub(crate) type PageKey = (usize, usize);

/// The vCPUs' waits so far.
#[derive(Debug, Default)]
pub(crate) struct Blocktime {
    /// The vCPU threads' ids, in vCPU order.
    vcpus: Vec<u32>,
    /// The page each vCPU waits for, since when.
    waiting: Vec<Option<(PageKey, Instant)>>,
    /// Each vCPU's waits, summed.
    per_vcpu: Vec<Duration>,
    /// Since when every vCPU waits (None: some vCPU runs).
    all_since: Option<Instant>,
    /// The time every vCPU waited at once, summed.
    all: Duration,
}

/// The figures, milliseconds as QEMU reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuBlocktime {
    /// The time every vCPU waited at once (`postcopy-blocktime`).
    pub total_ms: u32,
    /// Each vCPU's time waiting, in vCPU order (`postcopy-vcpu-blocktime`).
    pub per_vcpu_ms: Vec<u32>,
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Blocktime {
    /// Counts the waits of the threads `vcpus` (their ids, in vCPU order).
    pub(crate) fn new(vcpus: Vec<u32>) -> Self {
        let n = vcpus.len();
        Blocktime {
            vcpus,
            waiting: vec![None; n],
            per_vcpu: vec![Duration::ZERO; n],
            all_since: None,
            all: Duration::ZERO,
        }
    }

    /// Thread `thread` faulted on `page` at `now`: if it is a vCPU, it waits from then.
    pub(crate) fn begin(&mut self, thread: u32, page: PageKey, now: Instant) {
        let Some(i) = self.vcpus.iter().position(|&t| t == thread) else {
            return;
        };
        self.waiting[i] = Some((page, now));
        if self.waiting.iter().all(Option::is_some) {
            self.all_since.get_or_insert(now);
        }
    }

    /// `page` arrived at `now`: the vCPUs waiting for it run again.
    pub(crate) fn end(&mut self, page: PageKey, now: Instant) {
        let mut woken = false;
        for (w, total) in self.waiting.iter_mut().zip(&mut self.per_vcpu) {
            if let Some((p, since)) = *w {
                if p == page {
                    *total += now.saturating_duration_since(since);
                    *w = None;
                    woken = true;
                }
            }
        }
        if woken {
            if let Some(since) = self.all_since.take() {
                self.all += now.saturating_duration_since(since);
            }
        }
    }

    /// The figures so far.
    pub(crate) fn figures(&self) -> VcpuBlocktime {
        VcpuBlocktime {
            total_ms: ms(self.all),
            per_vcpu_ms: self.per_vcpu.iter().map(|&d| ms(d)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vcpu_counts_its_waits_and_the_total_only_when_all_wait() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = Blocktime::new(vec![100, 101]);
        // vCPU 0 waits 0..10 alone; a VMM thread's fault counts for nothing.
        b.begin(100, (0, 1), at(0));
        b.begin(7, (0, 2), at(1));
        b.end((0, 2), at(2));
        b.end((0, 1), at(10));
        assert_eq!(
            b.figures(),
            VcpuBlocktime {
                total_ms: 0,
                per_vcpu_ms: vec![10, 0]
            }
        );
        // Both wait from 25 (vCPU 1 since 20) to 30, when vCPU 0's page comes.
        b.begin(101, (0, 5), at(20));
        b.begin(100, (0, 6), at(25));
        b.end((0, 6), at(30));
        b.end((0, 5), at(40));
        assert_eq!(
            b.figures(),
            VcpuBlocktime {
                total_ms: 5,
                per_vcpu_ms: vec![15, 20]
            }
        );
        // Both on one page: one arrival ends both waits.
        b.begin(100, (1, 0), at(50));
        b.begin(101, (1, 0), at(52));
        b.end((1, 0), at(60));
        assert_eq!(
            b.figures(),
            VcpuBlocktime {
                total_ms: 13,
                per_vcpu_ms: vec![25, 28]
            }
        );
        // A page nobody waits for changes nothing.
        b.end((3, 3), at(70));
        assert_eq!(b.figures().total_ms, 13);
    }

    #[test]
    fn without_vcpus_nothing_is_counted() {
        let mut b = Blocktime::new(Vec::new());
        let now = Instant::now();
        b.begin(5, (0, 0), now);
        b.end((0, 0), now + Duration::from_millis(3));
        assert_eq!(b.figures(), VcpuBlocktime::default());
    }
}
