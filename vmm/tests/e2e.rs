//! Two vmm processes, a guest rewriting 64 MiB, migrations over every transport, and the
//! checks a user would make: RAM equal at the switchover, the guest going on at the
//! destination, the source gone after success and running after a failure.

mod common;

use std::os::fd::IntoRawFd;
use std::process::Command;

use common::{Qmp, Vmm, check_migrated, migrate, scratch};
use serde_json::{Value, json};

const GUEST: &[&str] = &["--memory", "128M", "--range-size", "64M"];

#[test]
fn over_a_unix_socket() {
    common::init();
    let dir = scratch("unix");
    let sock = format!("unix:{}", dir.join("m.sock").display());
    let (src, dst) = migrate(&dir, &sock, Some(&sock), GUEST);
    check_migrated(&src, &dst);
    let sw = src.event("switchover").unwrap();
    assert!(sw["downtime_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn over_tcp_on_loopback() {
    common::init();
    let dir = scratch("tcp");
    let (src, dst) = migrate(&dir, "tcp:127.0.0.1:0", None, GUEST);
    check_migrated(&src, &dst);
}

/// KVM's classic dirty log (each sync re-protects everything), where the default is
/// manual protect wherever KVM offers it.
#[test]
fn over_tcp_with_the_classic_dirty_log() {
    common::init();
    let dir = scratch("classic");
    let guest = [GUEST, &["--dirty-log-protect", "classic"]].concat();
    let (src, dst) = migrate(&dir, "tcp:127.0.0.1:0", None, &guest);
    check_migrated(&src, &dst);
}

/// Multifd: RAM pages over extra connections, loaded in parallel at the destination.
#[test]
fn with_multifd_channels_over_tcp_and_unix_with_zstd() {
    common::init();
    let dir = scratch("multifd");
    let guest = [GUEST, &["--multifd-channels", "2"]].concat();
    let (src, dst) = migrate(&dir, "tcp:127.0.0.1:0", None, &guest);
    check_migrated(&src, &dst);
    assert_eq!(dst.event("incoming-connected").unwrap()["channels"], 2);

    let dir = scratch("multifd-zstd");
    let sock = format!("unix:{}", dir.join("m.sock").display());
    let guest = [
        GUEST,
        &["--multifd-channels", "3", "--multifd-compression", "zstd"],
    ]
    .concat();
    let (src, dst) = migrate(&dir, &sock, Some(&sock), &guest);
    check_migrated(&src, &dst);
    assert_eq!(dst.event("incoming-connected").unwrap()["channels"], 3);
}

/// A source with more channels than its destination expects: the stream is refused
/// (never loaded with pages missing), and the source runs on.
#[test]
fn a_multifd_channel_count_mismatch_is_refused_and_the_source_runs_on() {
    common::init();
    let dir = scratch("multifd-mismatch");
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &["--incoming", "tcp:127.0.0.1:0", "--multifd-channels", "2"][..],
            GUEST,
        ]
        .concat(),
    );
    let uri = dst.listening_uri();
    let mut src = Vmm::start(
        &dir,
        "source",
        &[
            &[
                "--migrate-to",
                uri.as_str(),
                "--multifd-channels",
                "3",
                "--exit-after",
                "3",
            ][..],
            GUEST,
        ]
        .concat(),
    );
    assert!(!dst.wait().success());
    assert!(dst.event("incoming-resumed").is_none());
    // The destination keeps listening while it loads: the connection too many fails it.
    let err = dst.stderr();
    assert!(err.contains("its multifd-channels is higher"), "{err}");
    // The source's migration failed; its guest ran on until --exit-after.
    assert!(src.wait().success(), "{}", src.stderr());
    assert_eq!(src.event("exit").unwrap()["reason"], "quit");
    assert!(
        src.stderr().contains("the guest keeps running here"),
        "{}",
        src.stderr()
    );
}

#[test]
fn through_exec_commands() {
    common::init();
    let dir = scratch("exec");
    let file = dir.join("stream");
    let out = format!("exec:cat > '{}'", file.display());
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--migrate-to", out.as_str(), "--verify"], GUEST].concat(),
    );
    assert!(src.wait().success(), "{}", src.stderr());
    let inp = format!("exec:cat '{}'", file.display());
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &["--incoming", inp.as_str(), "--verify", "--exit-after", "1"],
            GUEST,
        ]
        .concat(),
    );
    assert!(dst.wait().success(), "{}", dst.stderr());
    check_migrated(&src, &dst);
}

#[test]
fn to_a_file_and_back_and_analyzed() {
    common::init();
    let dir = scratch("file");
    let file = dir.join("snapshot");
    let uri = format!("file:{}", file.display());
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--migrate-to", uri.as_str(), "--verify"], GUEST].concat(),
    );
    assert!(src.wait().success(), "{}", src.stderr());
    let out = Command::new(common::VMM)
        .arg("analyze")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "HEADER",
        "\"ram\"",
        "block \"pc.ram\": 134217728 bytes",
        "\"serial\"",
        "EOF",
        "VM DESCRIPTION",
    ] {
        assert!(
            text.contains(needle),
            "analyze output lacks {needle}:\n{text}"
        );
    }
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &["--incoming", uri.as_str(), "--verify", "--exit-after", "1"],
            GUEST,
        ]
        .concat(),
    );
    assert!(dst.wait().success(), "{}", dst.stderr());
    check_migrated(&src, &dst);
}

#[test]
fn over_inherited_descriptors() {
    common::init();
    let dir = scratch("fd");
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (fa, fb) = (a.into_raw_fd(), b.into_raw_fd());
    // Each child keeps only its own end, without close-on-exec.
    let pass = |keep: i32, close: i32| {
        move |c: &mut Command| {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only async-signal-safe calls are made (fcntl, close).
            unsafe {
                c.pre_exec(move || {
                    libc::fcntl(keep, libc::F_SETFD, 0);
                    libc::close(close);
                    Ok(())
                });
            }
        }
    };
    let fb_uri = format!("fd:{fb}");
    let fa_uri = format!("fd:{fa}");
    let mut dst = Vmm::start_with(
        &dir,
        "destination",
        &[
            &[
                "--incoming",
                fb_uri.as_str(),
                "--verify",
                "--exit-after",
                "1",
            ],
            GUEST,
        ]
        .concat(),
        pass(fb, fa),
    );
    let mut src = Vmm::start_with(
        &dir,
        "source",
        &[&["--migrate-to", fa_uri.as_str(), "--verify"], GUEST].concat(),
        pass(fa, fb),
    );
    // SAFETY: the parent's copies are no longer needed once both children have theirs.
    unsafe {
        libc::close(fa);
        libc::close(fb);
    }
    assert!(src.wait().success(), "{}", src.stderr());
    assert!(dst.wait().success(), "{}", dst.stderr());
    check_migrated(&src, &dst);
}

#[test]
fn cancel_during_iteration_keeps_the_source_running_and_a_retry_succeeds() {
    cancel_and_retry("cancel", &[]);
}

/// The same with multifd: the cancel must also interrupt the channels' writes.
#[test]
fn with_multifd_a_cancel_keeps_the_source_running_and_a_retry_succeeds() {
    cancel_and_retry("cancel-multifd", &["--multifd-channels", "2"]);
}

/// Migrates a source at 20 MB/s, cancels during the iteration, checks that the source
/// runs on and the destination refused, then migrates again unthrottled. `extra` goes to
/// both sides.
fn cancel_and_retry(name: &str, extra: &[&str]) {
    common::init();
    let dir = scratch(name);
    let guest = [GUEST, extra].concat();
    let guest = &guest[..];
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    // 20 MB/s makes the first pass over 64 MiB of written memory last seconds.
    let src_args = [
        &[
            "--qmp",
            qmp_arg.as_str(),
            "--max-bandwidth",
            "20M",
            "--verify",
        ][..],
        guest,
    ]
    .concat();
    let mut src = Vmm::start(&dir, "source", &src_args);
    let mut q = Qmp::connect(&qmp);
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    // Migrate once the guest has written its whole range (its first pass).
    q.wait_guest_pass(1);
    let mut dst1 = Vmm::start(
        &dir,
        "dest1",
        &[&["--incoming", "tcp:127.0.0.1:0"][..], guest].concat(),
    );
    let uri = dst1.listening_uri();
    let started = std::time::Instant::now();
    q.cmd("migrate", json!({"uri": uri}));
    q.wait_status("active");
    std::thread::sleep(std::time::Duration::from_millis(300));
    q.cmd("migrate_cancel", json!({}));
    let m = q.wait_status("cancelled");
    let sent = m["ram"]["transferred"].as_u64().unwrap();
    assert!(sent > 0);
    // The cap holds (with channels too): at most its rate over the time that passed,
    // with room for one 100 ms window's burst and the setup.
    let allowed = started.elapsed().as_secs_f64() * 20e6 * 1.5 + 4e6;
    assert!(
        (sent as f64) < allowed,
        "{sent} bytes sent in {:?} at 20 MB/s",
        started.elapsed()
    );
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    let before = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
    q.wait_guest_pass(before + 2);
    // The destination saw a broken stream: it exits non-zero and never ran the guest.
    assert!(!dst1.wait().success());
    assert!(dst1.event("incoming-resumed").is_none());
    assert!(
        dst1.stderr().contains("was not started"),
        "{}",
        dst1.stderr()
    );

    // A second migration of the same source, unthrottled, succeeds.
    let mut dst2 = Vmm::start(
        &dir,
        "destination",
        &[
            &[
                "--incoming",
                "tcp:127.0.0.1:0",
                "--verify",
                "--exit-after",
                "1",
            ][..],
            guest,
        ]
        .concat(),
    );
    let uri = dst2.listening_uri();
    q.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    q.cmd("migrate", json!({"uri": uri}));
    let m = q.wait_status("completed");
    assert!(
        m["x-completion-breakdown"]["total-ms"].as_f64().unwrap() > 0.0,
        "{m}"
    );
    assert_eq!(q.cmd("query-status", json!({}))["status"], "postmigrate");
    let statuses: Vec<_> = q
        .events
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].as_str().unwrap().to_string())
        .collect();
    assert!(statuses.contains(&"cancelled".to_string()), "{statuses:?}");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
    assert!(dst2.wait().success(), "{}", dst2.stderr());
    let sh = src
        .events()
        .into_iter()
        .find(|e| e["event"] == "ram-hash")
        .unwrap();
    let dh = dst2.event("ram-hash").unwrap();
    assert_eq!(sh["hash"], dh["hash"]);
}

#[test]
fn a_destination_with_less_memory_refuses_and_the_source_runs_on() {
    common::init();
    let dir = scratch("refuse");
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--qmp", qmp_arg.as_str()][..], GUEST].concat(),
    );
    let mut q = Qmp::connect(&qmp);
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            "--incoming",
            "tcp:127.0.0.1:0",
            "--memory",
            "64M",
            "--range-size",
            "32M",
        ],
    );
    let uri = dst.listening_uri();
    q.cmd("migrate", json!({"uri": uri}));
    let m = q.wait_status("failed");
    // The destination's refusal reaches the source (over the return path), not a broken
    // pipe.
    let why = m["error-desc"].as_str().unwrap();
    assert!(why.contains("destination refused the stream"), "{m}");
    assert!(
        why.contains("destination RAM block \"pc.ram\" is 67108864 bytes"),
        "{m}"
    );
    assert!(!dst.wait().success());
    let err = dst.stderr();
    assert!(
        err.contains("destination RAM block \"pc.ram\" is 67108864 bytes (64 MiB)")
            && err.contains("134217728 bytes (128 MiB)")
            && err.contains("start the destination with the same memory size"),
        "{err}"
    );
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
}

#[test]
fn qmp_speaks_the_protocol() {
    common::init();
    let dir = scratch("qmp");
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let mut vm = Vmm::start(
        &dir,
        "vm",
        &[&["--qmp", qmp_arg.as_str()][..], GUEST].concat(),
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&qmp)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o600),
        0o600
    );
    let mut q = Qmp::connect(&qmp);
    assert_eq!(q.cmd("query-status", json!({}))["running"], true);
    q.cmd("stop", json!({}));
    assert_eq!(q.cmd("query-status", json!({}))["status"], "paused");
    q.cmd("cont", json!({}));
    assert_eq!(q.cmd("query-migrate", json!({})), json!({}));
    q.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": 30, "max-bandwidth": 1000000000}),
    );
    let p = q.cmd("query-migrate-parameters", json!({}));
    for (k, v) in [
        ("downtime-limit", json!(30)),
        ("max-bandwidth", json!(1000000000)),
        ("cpu-throttle-initial", json!(20)),
        ("cpu-throttle-increment", json!(10)),
        ("max-cpu-throttle", json!(99)),
        ("throttle-trigger-threshold", json!(50)),
        ("x-stall-timeout", json!(30000)),
        ("multifd-channels", json!(2)),
        ("multifd-compression", json!("none")),
        ("multifd-zstd-level", json!(1)),
        // QEMU's, which vmm lacks, at their defaults.
        ("announce-rounds", json!(5)),
        ("tls-creds", json!("")),
    ] {
        assert_eq!(p[k], v, "{k}: {p}");
    }
    let caps = q.cmd("query-migrate-capabilities", json!({}));
    let state = |c: &Value, name: &str| {
        c.as_array()
            .unwrap()
            .iter()
            .find(|x| x["capability"] == name)
            .map(|x| x["state"].clone())
    };
    assert_eq!(
        caps.as_array().unwrap().len(),
        21,
        "QEMU 7.2's list: {caps}"
    );
    assert_eq!(state(&caps, "events"), Some(json!(false)));
    assert_eq!(state(&caps, "return-path"), Some(json!(true)));
    assert_eq!(state(&caps, "postcopy-ram"), Some(json!(false)));
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    );
    q.cmd(
        "migrate-set-parameters",
        json!({"multifd-channels": 4, "multifd-compression": "zstd"}),
    );
    let p = q.cmd("query-migrate-parameters", json!({}));
    assert_eq!(
        (&p["multifd-channels"], &p["multifd-compression"]),
        (&json!(4), &json!("zstd"))
    );
    assert_eq!(
        state(&q.cmd("query-migrate-capabilities", json!({})), "multifd"),
        Some(json!(true))
    );
    // multifd needs several connections: a file cannot carry them.
    let e = q
        .try_cmd(
            "migrate",
            json!({"uri": format!("file:{}", dir.join("snap").display())}),
        )
        .map(|_| q.wait_status("failed"))
        .unwrap();
    assert!(
        e["error-desc"]
            .as_str()
            .unwrap()
            .contains("multifd needs a tcp: or unix: URI"),
        "{e}"
    );
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": false}]}),
    );
    let e = q.try_cmd("no-such-command", json!({})).unwrap_err();
    assert_eq!(e["class"], "CommandNotFound");
    let e = q.try_cmd("migrate", json!({"uri": "bogus"})).unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("bogus"), "{e}");
    let e = q
        .try_cmd("migrate-set-parameters", json!({"downtime-limit": -1}))
        .unwrap_err();
    assert_eq!(e["class"], "GenericError");
    // A running guest cannot be overwritten by an incoming one.
    let e = q
        .try_cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))
        .unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("running"), "{e}");
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    // A malformed line gets an error reply, and the connection goes on.
    let e = q.try_cmd("stop", json!([1])).unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("object"), "{e}");
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    let _ = q.try_cmd("quit", json!({}));
    assert!(vm.wait().success());
}

#[test]
fn incoming_defer_waits_for_migrate_incoming() {
    common::init();
    let dir = scratch("defer");
    // Without a monitor nothing could say where: refused at once.
    let mut lone = Vmm::start(
        &dir,
        "lone",
        &[&["--incoming", "defer"][..], GUEST].concat(),
    );
    assert!(!lone.wait().success());
    assert!(lone.stderr().contains("--qmp"), "{}", lone.stderr());

    let qmp = dir.join("dst.qmp");
    let qmp_arg = format!("unix:{}", qmp.display());
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &["--incoming", "defer", "--qmp", qmp_arg.as_str(), "--verify"][..],
            GUEST,
        ]
        .concat(),
    );
    let mut q = Qmp::connect(&qmp);
    assert_eq!(q.cmd("query-status", json!({}))["status"], "inmigrate");
    let e = q.try_cmd("cont", json!({})).unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("loaded"), "{e}");
    let uri = q.cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))["uri"]
        .as_str()
        .unwrap()
        .to_string();
    let e = q
        .try_cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))
        .unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("already"), "{e}");
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--migrate-to", uri.as_str(), "--verify"][..], GUEST].concat(),
    );
    assert!(src.wait().success(), "{}", src.stderr());
    let t = std::time::Instant::now();
    while q.cmd("query-status", json!({}))["status"] != "running" {
        assert!(t.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pass = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
    q.wait_guest_pass(pass + 1);
    let _ = q.try_cmd("quit", json!({}));
    assert!(dst.wait().success());
    common::check_migrated(&src, &dst);
}

#[test]
fn a_stalled_destination_blocks_neither_the_guest_nor_the_monitor() {
    common::init();
    let dir = scratch("stall");
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--qmp", qmp_arg.as_str()][..], GUEST].concat(),
    );
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    // A "destination" that accepts and never reads: the source's writes block once the
    // socket buffers are full.
    let path = dir.join("stall.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    q.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", path.display())}),
    );
    let (_conn, _) = listener.accept().unwrap();
    q.wait_status("active");
    // Wait until the stream stops moving: the migration thread is blocked in a write.
    let mut last = 0;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let t = q.cmd("query-migrate", json!({}))["ram"]["transferred"]
            .as_u64()
            .unwrap();
        if t == last {
            break;
        }
        last = t;
    }
    // Every pass the guest prints a letter, which needs the VM lock: passes going on
    // means the lock is free; the monitor answering means the same for QMP.
    let before = q.cmd("x-query-guest", json!({}))["serial-bytes"]
        .as_u64()
        .unwrap();
    let t = std::time::Instant::now();
    loop {
        let g = q.cmd("x-query-guest", json!({}));
        if g["serial-bytes"].as_u64().unwrap() >= before + 20 {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "the guest stalled with the migration: {g}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let m = q.cmd("query-migrate", json!({}));
    assert_eq!(m["status"], "active");
    assert_eq!(
        m["ram"]["transferred"].as_u64().unwrap(),
        last,
        "the stream moved: the write was not blocked"
    );
    q.cmd("migrate_cancel", json!({}));
    q.wait_status("cancelled");
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
}

/// QMP sessions are freed when their client goes: 200 clients that negotiate and leave,
/// under a limit of 64 open files, and the next one still gets its greeting.
#[test]
fn qmp_sessions_are_freed_when_their_clients_go() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    common::init();
    let dir = scratch("qmp-soak");
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let vm = Vmm::start_with(
        &dir,
        "vm",
        &[&["--qmp", qmp_arg.as_str()][..], GUEST].concat(),
        |c| {
            // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
            unsafe {
                c.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: 64,
                        rlim_max: 64,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let mut q = Qmp::connect(&qmp);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", vm.child.id()))
            .unwrap()
            .count()
    };
    let before = fds();
    for i in 0..200 {
        let s = UnixStream::connect(&qmp).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(
            line.contains("\"QMP\""),
            "session {i}: no greeting: {line:?}"
        );
        (&s).write_all(br#"{"execute":"qmp_capabilities"}"#)
            .unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"return\":{}}\r\n", "session {i}");
    }
    // Each client's threads end as it goes: give the last ones a moment.
    let t = std::time::Instant::now();
    while fds() > before && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        fds() <= before,
        "{} descriptors open, {before} before",
        fds()
    );
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    let _ = q.try_cmd("quit", json!({}));
}

/// A guest its source had paused arrives paused (QEMU's globalstate section): the
/// destination loads it and waits for `cont`, which resumes it where it stopped.
#[test]
fn a_paused_guest_arrives_paused() {
    common::init();
    let dir = scratch("paused-arrives");
    let (sq, dq) = (dir.join("s.qmp"), dir.join("d.qmp"));
    let (sarg, darg) = (
        format!("unix:{}", sq.display()),
        format!("unix:{}", dq.display()),
    );
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--qmp", sarg.as_str()][..], GUEST].concat(),
    );
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &["--qmp", darg.as_str(), "--incoming", "tcp:127.0.0.1:0"][..],
            GUEST,
        ]
        .concat(),
    );
    let uri = dst.listening_uri();
    let mut q = Qmp::connect(&sq);
    let mut d = Qmp::connect(&dq);
    q.wait_guest_pass(1);
    q.cmd("stop", json!({}));
    let pass = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
    q.cmd("migrate", json!({"uri": uri}));
    q.wait_status("completed");
    dst.wait_event("incoming-held");
    assert_eq!(d.cmd("query-status", json!({}))["status"], "paused");
    assert_eq!(d.cmd("x-query-guest", json!({}))["pass"], pass);
    d.cmd("cont", json!({}));
    d.wait_guest_pass(pass + 1);
    assert_eq!(d.cmd("x-query-guest", json!({}))["mismatches"], 0);
    let _ = q.try_cmd("quit", json!({}));
    let _ = d.try_cmd("quit", json!({}));
    assert!(src.wait().success());
    assert!(dst.wait().success(), "{}", dst.stderr());
}

/// `vmm analyze` reads stream files only: a device that never ends is refused at once,
/// with the reason, instead of being read forever.
#[test]
fn analyze_refuses_what_is_not_a_stream_file() {
    for dev in ["/dev/zero", "/dev/urandom"] {
        let t = std::time::Instant::now();
        let out = Command::new(common::VMM)
            .args(["analyze", dev])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{dev}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a regular file"), "{dev}: {err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{dev}");
    }
}

/// A source that stalls without closing (its host hung, a link black-holed) does not hold
/// a destination for ever: with no byte for `--incoming-timeout`, the load fails.
#[test]
fn a_stalled_stream_times_out_at_the_destination() {
    use std::io::Write;
    common::init();
    let dir = scratch("stalled-incoming");
    let mut d = Vmm::start(
        &dir,
        "destination",
        &[
            &[
                "--incoming",
                "tcp:127.0.0.1:0",
                "--incoming-timeout",
                "1000",
            ][..],
            GUEST,
        ]
        .concat(),
    );
    let uri = d.listening_uri();
    let mut s = std::net::TcpStream::connect(uri.trim_start_matches("tcp:")).unwrap();
    // The header, then nothing: the connection stays open.
    s.write_all(b"QEVM\0\0\0\x03").unwrap();
    let t = std::time::Instant::now();
    assert!(!d.wait().success());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    assert!(d.stderr().contains("no data for 1.0 s"), "{}", d.stderr());
    assert!(d.event("incoming-resumed").is_none());
    drop(s);
}

/// A QMP client that sends commands but never reads its replies is disconnected (after
/// a few seconds of a full socket), and the monitor serves the next client meanwhile.
#[test]
fn a_qmp_client_that_never_reads_is_disconnected() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    common::init();
    let dir = scratch("qmp-never-reads");
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let _vm = Vmm::start(
        &dir,
        "vm",
        &[&["--qmp", qmp_arg.as_str()][..], GUEST].concat(),
    );
    let mut q = Qmp::connect(&qmp);
    let mut lazy = UnixStream::connect(&qmp).unwrap();
    lazy.write_all(br#"{"execute":"qmp_capabilities"}"#)
        .unwrap();
    // Each schema reply is tens of KiB: the socket fills long before 400 of them.
    lazy.set_write_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    for _ in 0..400 {
        if lazy
            .write_all(br#"{"execute":"query-qmp-schema"}"#)
            .is_err()
        {
            break;
        }
    }
    // Meanwhile another client is served.
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    // It has been cut (its queue overflowed, or a write to it waited 5 s): draining what
    // it was sent reaches the end of the stream at once.
    std::thread::sleep(std::time::Duration::from_secs(6));
    lazy.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let t = std::time::Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match lazy.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still connected after {:?}: {e}", t.elapsed()),
        }
    }
    let _ = q.try_cmd("quit", json!({}));
}

/// `getfd` keeps a descriptor passed with SCM_RIGHTS under a name, and `migrate fd:NAME`
/// migrates over it (libvirt's way of handing QEMU a connection it opened itself).
#[test]
fn getfd_then_migrate_over_the_named_descriptor() {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    common::init();
    let dir = scratch("getfd");
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--qmp", qmp_arg.as_str(), "--verify"][..], GUEST].concat(),
    );
    let (mut dst, uri) = common::verified_destination(&dir, "destination", &[], GUEST);
    let conn = std::net::TcpStream::connect(uri.trim_start_matches("tcp:")).unwrap();
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    // A raw client: the descriptor rides on the getfd command's own bytes.
    let s = UnixStream::connect(&qmp).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    (&s).write_all(br#"{"execute":"qmp_capabilities"}"#)
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    let cmd = br#"{"execute":"getfd","arguments":{"fdname":"mig"}}"#;
    let fds = [conn.as_raw_fd()];
    sendmsg::<()>(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(cmd)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\":{}}\r\n");
    drop(conn);
    q.cmd("migrate", json!({"uri": "fd:mig"}));
    q.wait_status("completed");
    // The name was used up with the descriptor, as in QEMU.
    let e = q.try_cmd("closefd", json!({"fdname": "mig"})).unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("not found"), "{e}");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
    assert!(dst.wait().success(), "{}", dst.stderr());
    let hash = |v: &Vmm| v.event("ram-hash").map(|e| e["hash"].clone());
    assert!(hash(&src).is_some());
    assert_eq!(hash(&src), hash(&dst));
    assert_eq!(dst.event("exit").unwrap()["mismatches"], 0);
}

/// A destination that loaded the whole stream but could not answer (the source's end of
/// the connection was gone) cannot know who owns the guest: it holds it paused, whole,
/// for the operator, whose `cont` runs it there.
#[test]
fn a_destination_that_cannot_answer_holds_the_guest_for_the_operator() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    common::init();
    let dir = scratch("unconfirmed");
    let snap = dir.join("snap");
    let snap_uri = format!("file:{}", snap.display());
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--migrate-to", snap_uri.as_str()][..], GUEST].concat(),
    );
    assert!(src.wait().success(), "{}", src.stderr());
    let (qmp, sock) = (dir.join("d.qmp"), dir.join("in.sock"));
    let (qarg, sarg) = (
        format!("unix:{}", qmp.display()),
        format!("unix:{}", sock.display()),
    );
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &["--incoming", sarg.as_str(), "--qmp", qarg.as_str()][..],
            GUEST,
        ]
        .concat(),
    );
    dst.wait_event("listening");
    // A "source" that sends the whole stream and is gone before the answer: its socket
    // buffer holds all of it (root may force the size), so it closes while the
    // destination is still reading. And it will never read: its receiving side is shut
    // first, so the answer fails whenever the destination sends it (a source that was
    // slow to close would otherwise take the answer into its buffer, and the guest run).
    let bytes = std::fs::read(&snap).unwrap();
    let mut s = UnixStream::connect(&sock).unwrap();
    s.shutdown(std::net::Shutdown::Read).unwrap();
    let size = libc::c_int::try_from(bytes.len() * 2).unwrap();
    // SAFETY: `size` outlives the call and its size is passed; the descriptor is open.
    let r = unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_SNDBUFFORCE (the tests run as root)");
    s.write_all(&bytes).unwrap();
    drop(s);
    dst.wait_event("incoming-unconfirmed");
    let mut q = Qmp::connect(&qmp);
    let t = std::time::Instant::now();
    while q.cmd("query-status", json!({}))["status"] != "paused" {
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "not held");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(dst.event("incoming-resumed").is_none());
    let pass = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
    q.cmd("cont", json!({}));
    q.wait_guest_pass(pass + 1);
    assert_eq!(q.cmd("x-query-guest", json!({}))["mismatches"], 0);
    let _ = q.try_cmd("quit", json!({}));
    assert!(dst.wait().success(), "{}", dst.stderr());
}
