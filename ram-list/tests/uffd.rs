//! userfaultfd as a post-copy destination uses it: a thread touching a missing page
//! waits, the fault names the page and the thread, and the page placed (data or zeros)
//! is what the thread then reads; a page placed twice is left as it was.
//! Skipped where userfaultfd is not allowed (not root, no /dev/userfaultfd access).

use std::sync::Arc;
use std::time::Duration;

use memmap2::{MmapMut, MmapOptions};
use ram_list::{Placed, Userfault};

const PAGE: usize = 4096;

fn userfault() -> Option<Arc<Userfault>> {
    match Userfault::new() {
        Ok(u) => Some(Arc::new(u)),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

/// Reads the u64 at `page` of `base` on another thread; returns its handle.
fn reader(base: usize, page: usize) -> std::thread::JoinHandle<(u64, u32)> {
    std::thread::spawn(move || {
        let tid = nix::unistd::gettid().as_raw() as u32;
        // SAFETY: the mapping outlives the thread (joined before it is dropped).
        let v = unsafe { std::ptr::read_volatile((base + page * PAGE) as *const u64) };
        (v, tid)
    })
}

fn check_missing_pages_wait_for_their_data(mut map: MmapMut, u: &Userfault) {
    let base = map.as_mut_ptr();
    u.register(base, map.len()).unwrap();
    let t = reader(base as usize, 5);
    let fault = u
        .read_event(Some(Duration::from_secs(10)))
        .unwrap()
        .expect("the reader faults");
    assert_eq!(
        fault.address & !(PAGE as u64 - 1),
        base as u64 + 5 * PAGE as u64
    );
    assert!(!fault.write);
    let page = [0x5au8; PAGE];
    // SAFETY: page 5 of the registered mapping.
    let dst = unsafe { base.add(5 * PAGE) };
    assert_eq!(u.copy(dst, &page).unwrap(), Placed::Now);
    let (v, tid) = t.join().unwrap();
    assert_eq!(v, 0x5a5a_5a5a_5a5a_5a5a);
    if u.reports_threads() {
        assert_eq!(fault.thread, tid, "the fault names the waiting thread");
    }
    // Placed again (a duplicate fault): left as it was.
    assert_eq!(u.copy(dst, &[1u8; PAGE]).unwrap(), Placed::Already);
    assert_eq!(map[5 * PAGE], 0x5a);

    // A zero page the same way.
    let t = reader(base as usize, 9);
    let fault = u
        .read_event(Some(Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    assert_eq!(
        fault.address & !(PAGE as u64 - 1),
        base as u64 + 9 * PAGE as u64
    );
    // SAFETY: page 9 of the registered mapping.
    let dst = unsafe { base.add(9 * PAGE) };
    assert_eq!(u.zero(dst, PAGE).unwrap(), Placed::Now);
    assert_eq!(t.join().unwrap().0, 0);

    // Nothing else faulted; after unregistering, a missing page reads as zero at once.
    assert_eq!(u.read_event(Some(Duration::from_millis(50))).unwrap(), None);
    u.unregister(base, map.len()).unwrap();
    assert_eq!(reader(base as usize, 12).join().unwrap().0, 0);
}

#[test]
fn anonymous_memory_waits_for_its_pages() {
    let Some(u) = userfault() else { return };
    check_missing_pages_wait_for_their_data(MmapMut::map_anon(16 * PAGE).unwrap(), &u);
}

#[test]
fn memfd_memory_waits_for_its_pages() {
    let Some(u) = userfault() else { return };
    let fd = nix::sys::memfd::memfd_create(c"uffd-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap();
    let file = std::fs::File::from(fd);
    file.set_len(16 * PAGE as u64).unwrap();
    // SAFETY: a private memfd of this test, mapped shared.
    let map = unsafe { MmapOptions::new().map_mut(&file) }.unwrap();
    check_missing_pages_wait_for_their_data(map, &u);
}

#[test]
fn an_unregistered_range_is_refused_with_the_reason() {
    let Some(u) = userfault() else { return };
    let mut map = MmapMut::map_anon(4 * PAGE).unwrap();
    let e = u.copy(map.as_mut_ptr(), &[0u8; PAGE]).unwrap_err();
    assert!(e.to_string().contains("UFFDIO_COPY"), "{e}");
}

#[test]
fn consecutive_pages_go_in_one_call_around_those_in_place() {
    let Some(u) = userfault() else { return };
    let mut map = MmapMut::map_anon(16 * PAGE).unwrap();
    let base = map.as_mut_ptr();
    u.register(base, map.len()).unwrap();
    // Pages 2 and 5 are in place already (a requested page, a zero page).
    // SAFETY: page 2 of the registered mapping.
    let page2 = unsafe { base.add(2 * PAGE) };
    // SAFETY: page 5 of the registered mapping.
    let page5 = unsafe { base.add(5 * PAGE) };
    assert_eq!(u.copy(page2, &[0x22u8; PAGE]).unwrap(), Placed::Now);
    assert_eq!(u.zero(page5, PAGE).unwrap(), Placed::Now);
    // A thread waits for page 7, inside the batch.
    let t = reader(base as usize, 7);
    u.read_event(Some(Duration::from_secs(10)))
        .unwrap()
        .expect("the reader faults");
    // Pages 0..8, each filled with its number plus one.
    let src: Vec<u8> = (0..8u8).flat_map(|p| [p + 1; PAGE]).collect();
    assert_eq!(
        u.copy_pages(base, &src, PAGE).unwrap(),
        6,
        "all but 2 and 5"
    );
    assert_eq!(t.join().unwrap().0, u64::from_ne_bytes([8; 8]));
    let firsts: Vec<u8> = (0..8).map(|p| map[p * PAGE]).collect();
    assert_eq!(
        firsts,
        [1, 2, 0x22, 4, 5, 0, 7, 8],
        "pages in place were left as they were"
    );
    // Twice: nothing placed, nothing changed.
    assert_eq!(u.copy_pages(base, &src, PAGE).unwrap(), 0);
    assert_eq!(map[2 * PAGE], 0x22);
    u.unregister(base, map.len()).unwrap();
}
