//! Dirty-page finding speed for a 4 GiB guest (1 Mi pages of 4 KiB).
//!
//! - sync + walk with 0.1% of pages dirty: a KVM-layout raw bitmap is merged in and every
//!   dirty page is found and claimed with test-and-clear (goal: at most 1 ms);
//! - a full walk of a fully dirty bitmap, page by page and word by word (pages/s);
//! - with `--features kvm` and /dev/kvm: `KvmDirtyLog::sync` of a real, clean 4 GiB slot,
//!   and harvesting 128 pages a vCPU dirtied in slots of 1, 4 and 16 GiB through
//!   `KVM_GET_DIRTY_LOG` against the dirty ring (`KVM_CAP_DIRTY_LOG_RING`).
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

/// `size` bytes of fresh, unbacked memory for a KVM slot (unmap with `libc::munmap`).
#[cfg(feature = "kvm")]
fn guest_memory(size: usize) -> *mut libc::c_void {
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
    host
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
    let host = guest_memory(size);
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

/// Real-mode code at 0x1000 that writes one byte into each of 128 pages (0x10000 to
/// 0x8f000), then halts.
#[cfg(feature = "kvm")]
#[rustfmt::skip]
const DIRTY_128_PAGES: &[u8] = &[
    0xb8, 0x00, 0x10,                   // mov ax, 0x1000
    0xb9, 0x80, 0x00,                   // mov cx, 128
    0x8e, 0xc0,                         // L: mov es, ax
    0x26, 0xc6, 0x06, 0x00, 0x00, 0x01, // mov byte [es:0], 1
    0x05, 0x00, 0x01,                   // add ax, 0x100 (the next page)
    0xe2, 0xf3,                         // loop L
    0xf4,                               // hlt
];

/// The dirty ring against the dirty bitmap: a vCPU dirties 128 pages of a slot of
/// 1 to 16 GiB; harvesting them costs the ring the same whatever the slot's size,
/// `KVM_GET_DIRTY_LOG` a bitmap of the whole slot.
#[cfg(feature = "kvm")]
fn kvm_ring_vs_bitmap() {
    use dirty_bitmap::{DirtyLogSource, KvmDirtyLog};
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    const RING_BYTES: usize = 1 << 16; // 4096 entries of 16 bytes
    const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7; // _IO(KVMIO, 0xc7)

    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        println!("dirty ring vs bitmap: SKIPPED (no /dev/kvm)");
        return;
    };
    let max_ring = kvm.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING.into());
    if max_ring < RING_BYTES as i32 {
        println!("dirty ring vs bitmap: SKIPPED (KVM offers no dirty ring of 64 KiB)");
        return;
    }
    println!("dirty ring vs bitmap, 128 dirty pages (median of 50 harvests):");
    for gib in [1usize, 4, 16] {
        let size = gib << 30;
        let mut times = [Duration::ZERO; 2];
        for (mode, time) in times.iter_mut().enumerate() {
            let ring = mode == 1;
            let vm = Arc::new(kvm.create_vm().unwrap());
            if ring {
                let mut cap = kvm_bindings::kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
                    ..Default::default()
                };
                cap.args[0] = RING_BYTES as u64;
                vm.enable_cap(&cap).unwrap();
            }
            let host = guest_memory(size);
            // SAFETY: the code fits the fresh mapping's first pages.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    DIRTY_128_PAGES.as_ptr(),
                    host.cast::<u8>().add(0x1000),
                    DIRTY_128_PAGES.len(),
                )
            };
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: 0,
                flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: 0,
                memory_size: size as u64,
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is a fresh mapping of `size` bytes that outlives the VM.
            unsafe { vm.set_user_memory_region(region).unwrap() };
            let mut vcpu = vm.create_vcpu(0).unwrap();
            let ring_ptr = ring.then(|| {
                // SAFETY: KVM maps the vCPU's dirty ring at this page offset of its fd;
                // the mapping is released below, before the vCPU is.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        RING_BYTES,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        vcpu.as_raw_fd(),
                        (kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as i64) * 4096,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                p.cast::<kvm_bindings::kvm_dirty_gfn>()
            });
            let mut sregs = vcpu.get_sregs().unwrap();
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            vcpu.set_sregs(&sregs).unwrap();
            let mut log = KvmDirtyLog::new(vm.clone(), region);
            let bitmap = DirtyBitmap::new(size / 4096);
            let mut fetch = 0usize;
            let entries = RING_BYTES / 16;
            let mut samples = vec![];
            for round in 0..51 {
                let mut regs = vcpu.get_regs().unwrap();
                regs.rip = 0x1000;
                regs.rflags = 2;
                vcpu.set_regs(&regs).unwrap();
                loop {
                    match vcpu.run() {
                        Ok(kvm_ioctls::VcpuExit::Hlt) => break,
                        Ok(_) => {}
                        Err(e) => panic!("KVM_RUN: {e}"),
                    }
                }
                let t = Instant::now();
                let found = match ring_ptr {
                    None => log.sync(&bitmap).unwrap(),
                    Some(r) => {
                        let mut n = 0;
                        loop {
                            // SAFETY: `fetch % entries` is inside the mapped ring; KVM
                            // publishes an entry by setting its flags last.
                            let e = unsafe { &mut *r.add(fetch % entries) };
                            // SAFETY: a field of the entry above, read as KVM may write it.
                            let flags = unsafe { std::ptr::read_volatile(&e.flags) };
                            if flags & 1 == 0 {
                                break;
                            }
                            if bitmap.set(e.offset as usize) {
                                n += 1;
                            }
                            // SAFETY: as above; RESET hands the entry back to KVM.
                            unsafe { std::ptr::write_volatile(&mut e.flags, 2) };
                            fetch += 1;
                        }
                        // SAFETY: a VM fd and an ioctl without argument.
                        let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS, 0) };
                        assert!(rc >= 0, "KVM_RESET_DIRTY_RINGS");
                        n
                    }
                };
                if round > 0 {
                    samples.push(t.elapsed());
                    assert!(found >= 128, "found {found} of 128 dirty pages");
                }
                let mut p = 0;
                while let Some(d) = bitmap.find_next_dirty(p) {
                    bitmap.test_and_clear(d);
                    p = d + 1;
                }
            }
            *time = median(samples);
            if let Some(r) = ring_ptr {
                // SAFETY: the ring mapped above; nothing uses it any more.
                unsafe { libc::munmap(r.cast(), RING_BYTES) };
            }
            drop(vcpu);
            drop(log);
            drop(vm);
            // SAFETY: the VM that used the mapping is gone.
            unsafe { libc::munmap(host, size) };
        }
        println!(
            "  slot {gib:>2} GiB: KVM_GET_DIRTY_LOG {:>8.1} us, dirty ring {:>6.1} us ({:.1}x)",
            times[0].as_secs_f64() * 1e6,
            times[1].as_secs_f64() * 1e6,
            times[0].as_secs_f64() / times[1].as_secs_f64().max(1e-9)
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("dirty_bitmap: bench");
        return;
    }
    sync_and_walk();
    full_walk();
    kvm_slot();
    #[cfg(feature = "kvm")]
    kvm_ring_vs_bitmap();
}
