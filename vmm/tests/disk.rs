//! Disks migrated live by two vmm processes: the guest writes its disk throughout; the
//! images must be identical at the switchover and the guest must go on writing at the
//! destination.

mod common;

use std::path::Path;

use common::{Qmp, Vmm, scratch};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn image(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn drive(path: &Path, extra: &str) -> String {
    format!("file={},id=disk0{extra}", path.display())
}

fn hash_of(v: &Vmm, side: &str) -> String {
    v.events()
        .into_iter()
        .find(|e| e["event"] == "disk-hash" && e["side"] == side)
        .unwrap_or_else(|| panic!("no {side} disk hash in {}", v.name))["hash"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Checks the guest went on writing its disk at the destination without a failed write.
fn carried_on(src: &Vmm, dst: &Vmm) {
    let sw = src
        .events()
        .into_iter()
        .find(|e| e["event"] == "ram-hash")
        .unwrap();
    let exit = dst.event("exit").unwrap();
    assert!(
        exit["pass"].as_u64().unwrap() > sw["pass"].as_u64().unwrap(),
        "{exit} / {sw}"
    );
    assert_eq!(exit["mismatches"], 0, "a disk write failed: {exit}");
}

#[test]
fn a_disk_written_throughout_arrives_identical() {
    common::init();
    let dir = scratch("disk");
    let (s, d) = (dir.join("src.img"), dir.join("dst.img"));
    image(&s, 256 * MIB);
    let guest = ["--memory", "128M", "--workload", "disk"];
    let src_drive = drive(&s, "");
    let dst_drive = drive(&d, ",create=on");
    let sock = format!("unix:{}", dir.join("m.sock").display());
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &guest[..],
            &[
                "--drive",
                &dst_drive,
                "--incoming",
                &sock,
                "--verify",
                "--exit-after",
                "2",
            ],
        ]
        .concat(),
    );
    dst.wait_event("listening");
    let mut src = Vmm::start(
        &dir,
        "source",
        &[
            &guest[..],
            &["--drive", &src_drive, "--migrate-to", &sock, "--verify"],
        ]
        .concat(),
    );
    assert!(src.wait().success(), "{}", src.stderr());
    assert!(dst.wait().success(), "{}", dst.stderr());
    assert_eq!(
        hash_of(&src, "source"),
        hash_of(&dst, "destination"),
        "the images differ at the switchover"
    );
    // The source's image is as it was at the switchover (its guest stopped there); the
    // destination's has the guest's writes since. Both hold the guest's pattern.
    let pass = src.event("ram-hash").unwrap()["pass"].as_u64().unwrap();
    let at_switchover = pattern(&std::fs::read(&s).unwrap(), pass);
    let at_exit = pattern(&std::fs::read(&d).unwrap(), pass);
    assert!(
        at_exit > at_switchover,
        "the guest did not write at the destination ({at_switchover} -> {at_exit})"
    );
    assert_eq!(dst.event("exit").unwrap()["mismatches"], 0);
}

/// Checks every 4 KiB block holds the guest's pattern (block << 32 | pass in each qword,
/// a pass from `done` on, never increasing along the disk by more than one) and returns
/// the sum of the blocks' passes beyond `done`: it grows with every write.
fn pattern(img: &[u8], done: u64) -> u64 {
    let mut sum = 0;
    let mut first = None;
    for (b, block) in img.chunks(4096).enumerate() {
        let w = u64::from_le_bytes(block[..8].try_into().unwrap());
        assert_eq!(w >> 32, b as u64, "block {b} belongs elsewhere");
        assert!(
            block.chunks(8).all(|q| q == &block[..8]),
            "block {b} is torn"
        );
        let p = w & 0xffff_ffff;
        assert!(
            p >= done,
            "block {b} is from pass {p}, older than pass {done}"
        );
        // Passes go over the disk in order: later blocks are at most one pass behind.
        let f = *first.get_or_insert(p);
        assert!(
            p == f || p + 1 == f,
            "block {b} is from pass {p} after pass {f} at block 0"
        );
        sum += p - done;
    }
    sum
}

#[test]
fn a_shared_disk_is_handed_over_not_copied() {
    common::init();
    let dir = scratch("shared");
    let img = dir.join("shared.img");
    image(&img, 32 * MIB);
    let guest = ["--memory", "128M", "--workload", "disk"];
    let spec = drive(&img, ",migrate=off");
    // 32 MiB: a pass takes about a second here, so the destination finishes a few.
    let sock = format!("unix:{}", dir.join("m.sock").display());
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &guest[..],
            &[
                "--drive",
                &spec,
                "--incoming",
                &sock,
                "--verify",
                "--exit-after",
                "3",
            ],
        ]
        .concat(),
    );
    dst.wait_event("listening");
    let mut src = Vmm::start(
        &dir,
        "source",
        &[
            &guest[..],
            &["--drive", &spec, "--migrate-to", &sock, "--verify"],
        ]
        .concat(),
    );
    assert!(src.wait().success(), "{}", src.stderr());
    assert!(dst.wait().success(), "{}", dst.stderr());
    // The same file: both hashes are of it at the switchover, flushed by the source.
    assert_eq!(hash_of(&src, "source"), hash_of(&dst, "destination"));
    carried_on(&src, &dst);
    // Nothing of the disk was in the stream: RAM and devices only.
    let moved = src.event("switchover").unwrap()["transferred"]
        .as_u64()
        .unwrap();
    assert!(
        moved < 32 * MIB,
        "{moved} bytes: the shared disk was copied"
    );
}

/// Starts a source with a throttled migration towards a fresh destination.
fn throttled(dir: &Path, q: &mut Qmp, name: &str) -> Vmm {
    let d = dir.join(format!("{name}.img"));
    let spec = drive(&d, ",create=on");
    let mut dst = Vmm::start(
        dir,
        name,
        &[
            "--memory",
            "128M",
            "--workload",
            "disk",
            "--drive",
            &spec,
            "--incoming",
            "tcp:127.0.0.1:0",
        ],
    );
    let uri = dst.listening_uri();
    q.cmd("migrate", json!({"uri": uri}));
    dst
}

#[test]
fn cancel_in_the_bulk_and_in_the_dirty_phase_then_a_migration_that_succeeds() {
    common::init();
    let dir = scratch("diskcancel");
    let img = dir.join("src.img");
    image(&img, 32 * MIB);
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let spec = drive(&img, "");
    let mut src = Vmm::start(
        &dir,
        "source",
        &[
            "--memory",
            "128M",
            "--workload",
            "disk",
            "--drive",
            &spec,
            "--qmp",
            &qmp_arg,
            "--max-bandwidth",
            "8M",
            "--verify",
        ],
    );
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);

    // 1. In the bulk copy.
    let mut d1 = throttled(&dir, &mut q, "dest1");
    let t = std::time::Instant::now();
    loop {
        let m = q.cmd("query-migrate", json!({}));
        let p = m["disk"]["x-bulk-percent"].as_u64().unwrap_or(0);
        if m["status"] == "active" && p > 0 {
            assert!(
                p < 100,
                "the bulk copy ended too soon to cancel inside it: {m}"
            );
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "{m}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    q.cmd("migrate_cancel", json!({}));
    q.wait_status("cancelled");
    assert!(
        !d1.wait().success(),
        "the destination ran a half-copied disk"
    );
    let pass = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
    q.wait_guest_pass(pass + 1);

    // 2. In the dirty phase. With a 1 ms downtime limit at 8 MB/s, one dirty disk chunk
    //    or a handful of dirty pages is already too much to stop for, and the guest never
    //    stops writing, so after the bulk copy the migration keeps iterating however fast
    //    or slow this machine runs the guest.
    q.cmd("migrate-set-parameters", json!({"downtime-limit": 1}));
    let mut d2 = throttled(&dir, &mut q, "dest2");
    let t = std::time::Instant::now();
    loop {
        let m = q.cmd("query-migrate", json!({}));
        if m["disk"]["x-bulk-percent"] == 100 && m["status"] == "active" {
            break;
        }
        assert!(
            m["status"] == "setup" || m["status"] == "active",
            "left the dirty phase before the cancel: {m}"
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(60), "{m}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    q.cmd("migrate_cancel", json!({}));
    q.wait_status("cancelled");
    assert!(!d2.wait().success());
    let pass = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
    q.wait_guest_pass(pass + 1);
    assert_eq!(q.cmd("x-query-guest", json!({}))["mismatches"], 0);

    // 3. Unthrottled, the same source now migrates.
    let d = dir.join("dest3.img");
    let spec = drive(&d, ",create=on");
    let mut d3 = Vmm::start(
        &dir,
        "dest3",
        &[
            "--memory",
            "128M",
            "--workload",
            "disk",
            "--drive",
            &spec,
            "--incoming",
            "tcp:127.0.0.1:0",
            "--verify",
            // Long enough for a whole pass (each block is read back, then written) on a
            // busy machine.
            "--exit-after",
            "3",
        ],
    );
    let uri = d3.listening_uri();
    q.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 0, "downtime-limit": 300}),
    );
    q.cmd("migrate", json!({"uri": uri}));
    q.wait_status("completed");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
    assert!(d3.wait().success(), "{}", d3.stderr());
    assert_eq!(hash_of(&src, "source"), hash_of(&d3, "destination"));
    carried_on(&src, &d3);
}

#[test]
fn a_wrong_size_or_name_is_refused_before_any_write_and_the_source_runs_on() {
    common::init();
    let dir = scratch("diskrefuse");
    let img = dir.join("src.img");
    image(&img, 16 * MIB);
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let spec = drive(&img, "");
    let mut src = Vmm::start(
        &dir,
        "source",
        &[
            "--memory",
            "128M",
            "--workload",
            "disk",
            "--drive",
            &spec,
            "--qmp",
            &qmp_arg,
        ],
    );
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    for (name, size, id, expect) in [
        ("small", 8 * MIB, "disk0", "same size"),
        ("named", 16 * MIB, "data", "does not have"),
    ] {
        let d = dir.join(format!("{name}.img"));
        image(&d, size);
        let spec = format!("file={},id={id}", d.display());
        let mut dst = Vmm::start(
            &dir,
            name,
            &[
                "--memory",
                "128M",
                "--drive",
                &spec,
                "--incoming",
                "tcp:127.0.0.1:0",
            ],
        );
        let uri = dst.listening_uri();
        q.cmd("migrate", json!({"uri": uri}));
        q.wait_status("failed");
        assert!(!dst.wait().success());
        assert!(dst.stderr().contains(expect), "{}", dst.stderr());
        assert!(
            std::fs::read(&d).unwrap().iter().all(|b| *b == 0),
            "{name}: the image was written"
        );
        assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    }
    let pass = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
    q.wait_guest_pass(pass + 1);
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
}

/// `cont` on a source whose guest was migrated away is the operator's rollback (libvirt's,
/// when a destination held paused fails to finish): refused while the destination holds
/// the shared disk, allowed once it let go, and the guest then finds every block as it
/// left it.
#[test]
fn cont_after_a_completed_migration_waits_for_the_shared_disk() {
    common::init();
    let dir = scratch("rollback");
    let img = dir.join("shared.img");
    image(&img, 8 * MIB);
    let guest = ["--memory", "128M", "--workload", "disk"];
    let spec = drive(&img, ",migrate=off");
    let (qmp, sock) = (dir.join("s.qmp"), dir.join("m.sock"));
    let sock_uri = format!("unix:{}", sock.display());
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &guest[..],
            &["--drive", &spec, "--incoming", &sock_uri, "-S"],
        ]
        .concat(),
    );
    dst.wait_event("listening");
    let qmp_arg = format!("unix:{}", qmp.display());
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&guest[..], &["--drive", &spec, "--qmp", &qmp_arg]].concat(),
    );
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    q.cmd("migrate", json!({"uri": sock_uri}));
    q.wait_status("completed");
    dst.wait_event("loaded");
    assert_eq!(q.cmd("query-status", json!({}))["status"], "postmigrate");
    let e = q.try_cmd("cont", json!({})).unwrap_err();
    assert!(
        e["desc"].as_str().unwrap().contains("locked elsewhere"),
        "{e}"
    );
    assert_eq!(q.cmd("query-status", json!({}))["status"], "postmigrate");
    // The destination, held paused, goes: the operator takes the guest back.
    assert!(dst.event("incoming-resumed").is_none());
    let _ = dst.child.kill();
    let _ = dst.wait();
    q.cmd("cont", json!({}));
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    let pass = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
    q.wait_guest_pass(pass + 2);
    assert_eq!(q.cmd("x-query-guest", json!({}))["mismatches"], 0);
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success(), "{}", src.stderr());
}
