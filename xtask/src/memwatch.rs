//! How much memory a VMM process uses beyond its guest's RAM: sampled from
//! `/proc/PID/smaps` while a migration runs, keeping the peak. A mapping at least as large
//! as the guest's RAM is the guest's RAM (ours maps it as one region, QEMU as one
//! `pc.ram` block); everything else resident counts: heap, buffers, stacks, the binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Resident bytes of `pid` outside mappings of at least `guest_bytes`, or None if the
/// process is gone.
pub fn overhead(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(overhead_of(&smaps, guest_bytes))
}

fn overhead_of(smaps: &str, guest_bytes: u64) -> u64 {
    let kb = |line: &str| -> u64 {
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let mut total = 0;
    let mut guest = false;
    for line in smaps.lines() {
        if line.starts_with("Size:") {
            guest = kb(line) >= guest_bytes;
        } else if line.starts_with("Rss:") && !guest {
            total += kb(line);
        }
    }
    total
}

/// A sampling thread over some processes.
pub struct MemWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u64>>,
}

impl MemWatch {
    /// Samples `pids` every `every` until [`MemWatch::stop`].
    pub fn start(pids: Vec<u32>, guest_bytes: u64, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = vec![0u64; pids.len()];
            loop {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    if let Some(o) = overhead(*pid, guest_bytes) {
                        *p = (*p).max(o);
                    }
                }
                if s.load(Ordering::SeqCst) {
                    return peak;
                }
                std::thread::sleep(every);
            }
        });
        MemWatch { stop, thread }
    }

    /// Takes a last sample and returns each process's peak, bytes.
    pub fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_mapping_is_left_out() {
        let smaps = "\
55d0-55e0 r-xp 00000000 08:01 123 /usr/bin/vmm
Size:                 64 kB
Rss:                  60 kB
7f00-7f40 rw-p 00000000 00:00 0
Size:            1048576 kB
Rss:             1048576 kB
7f40-7f50 rw-p 00000000 00:00 0 [heap]
Size:               2048 kB
Rss:                1000 kB
";
        assert_eq!(overhead_of(smaps, 1 << 30), (60 + 1000) * 1024);
        assert_eq!(overhead_of(smaps, 2 << 30), (60 + 1048576 + 1000) * 1024);
    }

    #[test]
    fn this_process_has_some() {
        assert!(overhead(std::process::id(), 1 << 40).unwrap() > 0);
    }
}
