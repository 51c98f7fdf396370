//! SIGTERM, SIGINT, SIGHUP and QMP `quit` end vmm promptly in every state: a destination
//! waiting for its stream or loading it, a running VM, a migrating source. Each case
//! checks the exit status, that the socket files are gone, and where the guest lives
//! afterwards: a destination stopped mid-load never tells its source it loaded, so the
//! source runs on and migrates again.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Qmp, Vmm, scratch};
use serde_json::json;

const GUEST: &[&str] = &["--memory", "128M", "--range-size", "32M"];

/// Sends `sig` to `vm` and waits for it to exit; returns the status and how long it took.
fn signal(vm: &mut Vmm, sig: libc::c_int) -> (std::process::ExitStatus, Duration) {
    let t = Instant::now();
    // SAFETY: kill with the pid of a child we own has no memory-safety preconditions.
    let r = unsafe { libc::kill(vm.child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill");
    let s = vm.wait();
    (s, t.elapsed())
}

fn arg(flag: &str, p: &Path) -> [String; 2] {
    [flag.to_string(), format!("unix:{}", p.display())]
}

/// A destination in `dir` waiting on a unix socket, with a QMP client connected; returns
/// it, the client, and the paths of its QMP and migration sockets.
fn waiting_destination(dir: &Path) -> (Vmm, Qmp, PathBuf, PathBuf) {
    let (qmp, sock) = (dir.join("d.qmp"), dir.join("in.sock"));
    let mut extra = arg("--qmp", &qmp).to_vec();
    extra.extend(arg("--incoming", &sock));
    let mut d = start(dir, "destination", &extra);
    d.wait_event("listening");
    let q = Qmp::connect(&qmp);
    (d, q, qmp, sock)
}

/// Starts migrating at 5 MB/s to the unix socket `sock`, so that it lasts.
fn migrate_slowly(q: &mut Qmp, sock: &Path) {
    q.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 5_000_000}),
    );
    q.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
}

fn start(dir: &Path, name: &str, extra: &[String]) -> Vmm {
    let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
    args.extend_from_slice(GUEST);
    Vmm::start(dir, name, &args)
}

#[test]
fn each_signal_ends_a_waiting_destination_and_removes_its_sockets() {
    common::init();
    for (i, sig) in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP]
        .into_iter()
        .enumerate()
    {
        let dir = scratch(&format!("sig-wait-{i}"));
        let (mut d, mut q, qmp, sock) = waiting_destination(&dir);
        let (status, took) = signal(&mut d, sig);
        assert!(status.success(), "signal {sig}: {status} {}", d.stderr());
        assert!(took < Duration::from_secs(3), "signal {sig}: {took:?}");
        assert!(
            !qmp.exists() && !sock.exists(),
            "signal {sig}: sockets left"
        );
        // The client heard why.
        q.read_to_end();
        assert!(
            q.events
                .iter()
                .any(|e| e["event"] == "SHUTDOWN" && e["data"]["reason"] == "host-signal"),
            "{:?}",
            q.events
        );
    }
}

#[test]
fn quit_ends_a_waiting_destination() {
    common::init();
    let dir = scratch("quit-wait");
    let (mut d, mut q, qmp, sock) = waiting_destination(&dir);
    let t = Instant::now();
    assert_eq!(q.cmd("quit", json!({})), json!({}));
    assert!(d.wait().success(), "{}", d.stderr());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!qmp.exists() && !sock.exists());
    assert_eq!(q.events[0]["event"], "SHUTDOWN");
}

#[test]
fn a_signal_ends_a_running_vm_and_a_migrating_source() {
    common::init();
    let dir = scratch("sig-run");
    let qmp = dir.join("s.qmp");
    let mut s = start(&dir, "source", &arg("--qmp", &qmp));
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    let (status, took) = signal(&mut s, libc::SIGTERM);
    assert!(
        status.success() && took < Duration::from_secs(3),
        "{status} {took:?}"
    );
    assert!(!qmp.exists());

    // Mid-migration, throttled so that it lasts: the migration is cancelled, the process
    // ends, and the destination, which never got the whole stream, does not run it.
    let dir = scratch("sig-migrating");
    let (qmp, sock) = (dir.join("s.qmp"), dir.join("in.sock"));
    let mut d = start(&dir, "destination", &arg("--incoming", &sock));
    d.wait_event("listening");
    let mut s = start(&dir, "source", &arg("--qmp", &qmp));
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    migrate_slowly(&mut q, &sock);
    q.wait_status("active");
    std::thread::sleep(Duration::from_millis(300));
    let (status, took) = signal(&mut s, libc::SIGINT);
    assert!(
        status.success() && took < Duration::from_secs(3),
        "{status} {took:?}"
    );
    assert!(!qmp.exists());
    assert!(
        !d.wait().success(),
        "the destination loaded a cancelled stream"
    );
    assert!(d.event("incoming-resumed").is_none());
}

#[test]
fn a_destination_stopped_while_loading_leaves_the_guest_to_its_source() {
    common::init();
    let dir = scratch("sig-loading");
    let (qmp, sock) = (dir.join("s.qmp"), dir.join("in.sock"));
    let mut s = start(&dir, "source", &arg("--qmp", &qmp));
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    for (round, stop) in [("sigterm", true), ("quit", false)] {
        let dqmp = dir.join(format!("{round}.qmp"));
        let mut extra = arg("--incoming", &sock).to_vec();
        extra.extend(arg("--qmp", &dqmp));
        let mut d = start(&dir, round, &extra);
        d.wait_event("listening");
        migrate_slowly(&mut q, &sock);
        d.wait_event("incoming-connected");
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        if stop {
            let (status, _) = signal(&mut d, libc::SIGTERM);
            assert!(status.success(), "{status}: {}", d.stderr());
        } else {
            let mut dq = Qmp::connect(&dqmp);
            dq.cmd("quit", json!({}));
            assert!(d.wait().success(), "{}", d.stderr());
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{round}: {:?}",
            t.elapsed()
        );
        assert!(!sock.exists() && !dqmp.exists(), "{round}: sockets left");
        assert!(
            d.event("loaded").is_none() && d.event("incoming-resumed").is_none(),
            "{round}: the destination loaded or ran the guest"
        );
        let m = q.wait_status("failed");
        assert!(m["error-desc"].is_string(), "{m}");
        assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    }
    // The source migrates again, whole.
    let mut d = start(&dir, "destination", &arg("--incoming", &sock));
    d.wait_event("listening");
    q.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    q.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    q.wait_status("completed");
    d.wait_event("incoming-resumed");
    let (status, _) = signal(&mut d, libc::SIGTERM);
    assert!(status.success());
    let _ = q.try_cmd("quit", json!({}));
    assert!(s.wait().success());
}
