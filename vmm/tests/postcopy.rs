//! Post-copy between two vmm processes (the cases live in vmm-harness, shared with
//! `cargo xtask migrate-test`): a guest that never converges in pre-copy completes once
//! switched (multifd off and on), and each failure after the switch ends as designed: a
//! cut connection or a killed source leaves the destination's guest waiting for its
//! pages (never reading them as zeros) in `postcopy-paused`, and a cut recovers over a
//! new connection (`migrate-recover`, `migrate` with `resume`); a killed destination
//! leaves the source its whole copy, which `cont` runs once the post-copy is given up.
//! Over TLS too, the recovery's new connection included.

mod common;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::postcopy::{
    Failure, GUEST, SMALL, fail_after_switch, migrate_in_postcopy, migrate_in_postcopy_over_tls,
    migrate_in_postcopy_preempt, recover_after_cut,
};

/// One case at a time: each needs its guest to dirty faster than the 50 MB/s cap (so
/// pre-copy does not converge), and eight pairs of VMs at once on two cores starved
/// them (a CI run saw a guest at 2260 pages/s, with less than half its range dirty
/// after a pass).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn a_guest_that_never_converges_completes_in_post_copy() {
    common::init();
    let _one = one_at_a_time();
    let s = migrate_in_postcopy("postcopy", GUEST, 512 << 20, &[]);
    assert!(s.bytes > 512 << 20, "{s:?}");
}

#[test]
fn post_copy_with_multifd_completes_too() {
    common::init();
    let _one = one_at_a_time();
    // Pre-copy's pages go over the channels, post-copy's on the main stream (as QEMU
    // 7.2 does).
    migrate_in_postcopy(
        "postcopy-multifd",
        SMALL,
        128 << 20,
        &["--multifd-channels", "2"],
    );
}

/// At the switch, and half a second into post-copy.
const WHEN: [Duration; 2] = [Duration::ZERO, Duration::from_millis(500)];

#[test]
fn a_cut_connection_after_the_switch_pauses_both_sides() {
    common::init();
    let _one = one_at_a_time();
    for after in WHEN {
        fail_after_switch(Failure::Cut, after);
    }
}

#[test]
fn a_killed_source_after_the_switch_leaves_the_destination_waiting() {
    common::init();
    let _one = one_at_a_time();
    for after in WHEN {
        fail_after_switch(Failure::KillSource, after);
    }
}

#[test]
fn a_killed_destination_after_the_switch_leaves_the_source_whole() {
    common::init();
    let _one = one_at_a_time();
    for after in WHEN {
        fail_after_switch(Failure::KillDestination, after);
    }
}

#[test]
fn a_cut_connection_is_recovered_over_a_new_one_and_the_guest_arrives_whole() {
    common::init();
    let _one = one_at_a_time();
    for after in WHEN {
        let s = recover_after_cut(after, false, false);
        assert!(s.bytes > 0, "{s:?}");
    }
}

#[test]
fn post_copy_over_tls_completes_and_recovers_over_tls() {
    common::init();
    let _one = one_at_a_time();
    // The return path is read (source) and written (destination) by a thread of its
    // own on the one TLS session.
    migrate_in_postcopy_over_tls("postcopy-tls", SMALL, 128 << 20);
    let s = recover_after_cut(Duration::from_millis(500), true, false);
    assert!(s.bytes > 0, "{s:?}");
}

#[test]
fn post_copy_preempt_completes_and_recovers_in_the_clear_and_over_tls() {
    common::init();
    let _one = one_at_a_time();
    // The pages asked for come on a second connection, never behind the background.
    let s = migrate_in_postcopy_preempt("postcopy-preempt", SMALL, 128 << 20, false);
    assert!(s.requests > 0, "{s:?}");
    migrate_in_postcopy_preempt("postcopy-preempt-tls", SMALL, 128 << 20, true);
    // A cut ends both connections; the resume opens both again.
    for tls in [false, true] {
        let s = recover_after_cut(Duration::from_millis(500), tls, true);
        assert!(s.bytes > 0, "{s:?}");
    }
}
