//! Dirty-page finding speed for a 4 GiB guest (1 Mi pages of 4 KiB).
//!
//! - sync + walk with 0.1% of pages dirty: a KVM-layout raw bitmap is merged in and every
//!   dirty page is found and claimed with test-and-clear (goal: at most 1 ms);
//! - a full walk of a fully dirty bitmap, page by page and word by word (pages/s);
//! - with `--features kvm` and /dev/kvm: `KvmDirtyLog::sync` of a real, clean 4 GiB slot.
//!
//! `cargo bench -p dirty-bitmap --features kvm`

use std::time::{Duration, Instant};

use dirty_bitmap::DirtyBitmap;

const PAGES: usize = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn sync_and_walk() {
    // 0.1% of the pages, spread pseudo-randomly.
    let mut raw = vec![0u64; PAGES / 64];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut n = 0;
    while n < PAGES / 1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x as usize) % PAGES;
        if raw[p / 64] & (1 << (p % 64)) == 0 {
            raw[p / 64] |= 1 << (p % 64);
            n += 1;
        }
    }
    let b = DirtyBitmap::new(PAGES);
    let mut times = vec![];
    for _ in 0..200 {
        let t = Instant::now();
        b.merge_raw(0, &raw).unwrap();
        let mut found = 0;
        let mut p = 0;
        while let Some(d) = b.find_next_dirty(p) {
            found += b.test_and_clear(d) as usize;
            p = d + 1;
        }
        times.push(t.elapsed());
        assert_eq!(found, n);
    }
    println!(
        "sync + walk, 4 GiB, 0.1% dirty ({n} pages): median {:.1} us (goal <= 1000 us)",
        median(times).as_secs_f64() * 1e6
    );
}

fn full_walk() {
    let b = DirtyBitmap::new(PAGES);
    let mut per_page = vec![];
    let mut per_word = vec![];
    for _ in 0..10 {
        b.set_all();
        let t = Instant::now();
        let mut p = 0;
        let mut found = 0usize;
        while let Some(d) = b.find_next_dirty(p) {
            found += b.test_and_clear(d) as usize;
            p = d + 1;
        }
        per_page.push(t.elapsed());
        assert_eq!(found, PAGES);

        b.set_all();
        let t = Instant::now();
        let mut found = 0usize;
        for w in 0..b.word_count() {
            let mut word = b.take_word(w);
            while word != 0 {
                found += 1;
                word &= word - 1;
            }
        }
        per_word.push(t.elapsed());
        assert_eq!(found, PAGES);
    }
    let rate = |d: Duration| PAGES as f64 / d.as_secs_f64() / 1e6;
    println!(
        "full walk, 4 GiB all dirty: find_next + test_and_clear {:.0} M pages/s, take_word {:.0} M pages/s",
        rate(median(per_page)),
        rate(median(per_word))
    );
}

#[cfg(not(feature = "kvm"))]
fn kvm_slot() {
    println!("KVM dirty log: not measured (run with --features kvm)");
}

#[cfg(feature = "kvm")]
fn kvm_slot() {
    use dirty_bitmap::{DirtyLogSource, KvmDirtyLog};
    use std::sync::Arc;

    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        println!("KVM dirty log: SKIPPED (no /dev/kvm)");
        return;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let size = PAGES * 4096;
    // SAFETY: an anonymous private mapping; no existing memory is touched.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` is a fresh mapping of `size` bytes that outlives the VM in this function.
    unsafe { vm.set_user_memory_region(region).unwrap() };
    let mut log = KvmDirtyLog::new(vm.clone(), region);
    log.start().unwrap();
    let b = DirtyBitmap::new(PAGES);
    let mut times = vec![];
    for _ in 0..200 {
        let t = Instant::now();
        log.sync(&b).unwrap();
        times.push(t.elapsed());
    }
    log.stop().unwrap();
    println!(
        "KVM dirty log sync of a clean 4 GiB slot: median {:.1} us",
        median(times).as_secs_f64() * 1e6
    );
    drop(log);
    drop(vm);
    // SAFETY: the VM that used the mapping is gone.
    unsafe { libc::munmap(host, size) };
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("dirty_bitmap: bench");
        return;
    }
    sync_and_walk();
    full_walk();
    kvm_slot();
}
