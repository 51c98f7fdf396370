//! A post-copy destination's RAM: pages loaded before the switch stay, discarded ones
//! and ones never sent fault, each fault is a request, the "source" answers by placing
//! the page, and every reader sees the source's data; the thread placing pages runs
//! raised while a fault waits. Private and memfd memory. Skipped where userfaultfd is
//! not allowed.

use std::sync::Arc;
use std::sync::mpsc;

use ram_list::{MemfdMemory, Placed, PostcopyRam, RamBlock, RamList};
use vm_memory::MmapRegion;

const PAGE: usize = 4096;
const PAGES: usize = 64;

/// The source's copy of a block: page i holds i + 1 in every byte, page 7 is zero.
fn source_page(i: usize) -> [u8; PAGE] {
    if i == 7 {
        [0; PAGE]
    } else {
        [(i + 1) as u8; PAGE]
    }
}

/// The calling thread's scheduling policy.
fn policy() -> i32 {
    // SAFETY: 0 is the calling thread; no memory is passed.
    unsafe { libc::sched_getscheduler(0) }
}

fn destination(shared: bool) -> Arc<RamList> {
    let list = Arc::new(RamList::new());
    let block = if shared {
        let m = Arc::new(MemfdMemory::new("ram", PAGES * PAGE).unwrap());
        RamBlock::new("ram", m.clone(), Box::new(()))
            .unwrap()
            .with_shared(m)
    } else {
        let host = Arc::new(MmapRegion::<()>::new(PAGES * PAGE).unwrap());
        RamBlock::new("ram", host, Box::new(())).unwrap()
    };
    let b = list.add(block).unwrap();
    // Pre-copy loaded pages 0..32, the source's data.
    for i in 0..32 {
        b.write_bytes((i * PAGE) as u64, &source_page(i));
    }
    list
}

fn check(shared: bool) {
    let list = destination(shared);
    let ram = match PostcopyRam::register(&list) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    // The source dirtied pages 10..16 after sending them: dropped here.
    ram.discard("ram", (10 * PAGE) as u64, (6 * PAGE) as u64)
        .unwrap();
    // The "source": answers each request by placing the page.
    let (tx, rx) = mpsc::channel::<(String, u64)>();
    let faults = ram
        .start_faults(move |block, offset| {
            let _ = tx.send((block.to_string(), offset));
        })
        .unwrap();
    // Whether this process may raise a thread (root with real-time budget).
    let may_boost = {
        let me = savevm::priority::current_thread();
        let ok = savevm::priority::boost(me);
        savevm::priority::unboost(me);
        ok
    };
    let server = {
        let ram = ram.clone();
        std::thread::spawn(move || {
            let (mut asked, mut not_raised) = (Vec::new(), 0);
            while let Ok((block, offset)) = rx.recv() {
                // Once it placed a page it is the loading thread: raised while this
                // request's fault waits (a page only it places). Counted, not asserted
                // here: the readers wait for this thread.
                if may_boost && !asked.is_empty() && policy() != libc::SCHED_FIFO {
                    not_raised += 1;
                }
                let i = offset as usize / PAGE;
                let page = source_page(i);
                let data = (i != 7).then_some(&page[..]);
                ram.place(&block, offset, data).unwrap();
                asked.push(i);
            }
            // No fault waits: back to normal.
            (asked, not_raised, policy())
        })
    };
    // The guest (two threads) reads every page.
    let base = list.blocks()[0].page_ptr(0) as usize;
    let readers: Vec<_> = (0..2)
        .map(|t| {
            std::thread::spawn(move || {
                for i in (t..PAGES).step_by(2) {
                    // SAFETY: inside the block's mapping, which outlives the threads.
                    let v =
                        unsafe { std::ptr::read_volatile((base + i * PAGE + 100) as *const u8) };
                    assert_eq!(v, source_page(i)[100], "page {i}");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    ram.stop_faults();
    faults.join().unwrap();
    let (mut asked, not_raised, policy_after) = server.join().unwrap();
    assert_eq!(not_raised, 0, "requests served at the normal priority");
    assert_eq!(
        policy_after,
        libc::SCHED_OTHER,
        "still raised with no fault waiting"
    );
    asked.sort_unstable();
    // Exactly the discarded pages and the never-sent ones were asked for.
    let expect: Vec<usize> = (10..16).chain(32..PAGES).collect();
    assert_eq!(asked, expect);
    assert!(ram.is_received("ram", (40 * PAGE) as u64));
    assert!(
        !ram.is_received("ram", (3 * PAGE) as u64),
        "pre-copied, not placed"
    );
    // A page placed twice is left as it was.
    assert_eq!(
        ram.place("ram", (40 * PAGE) as u64, Some(&[9; PAGE]))
            .unwrap(),
        Placed::Already
    );
    let mut one = [0u8; 1];
    list.blocks()[0].read_bytes((40 * PAGE) as u64, &mut one);
    assert_eq!(one[0], 41);
    // Bad requests are refused with the reason.
    assert!(ram.place("ram", 3, None).is_err());
    assert!(ram.place("nope", 0, None).is_err());
    assert!(
        ram.discard("ram", 0, (PAGES as u64 + 1) * PAGE as u64)
            .is_err()
    );
    ram.unregister().unwrap();
}

#[test]
fn private_memory_faults_until_its_pages_arrive() {
    check(false);
}

#[test]
fn memfd_memory_faults_until_its_pages_arrive() {
    check(true);
}
