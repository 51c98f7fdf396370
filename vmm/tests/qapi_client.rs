//! A whole migration driven by a QMP client nobody here wrote: the `qapi` crate, whose
//! commands, replies and events are generated from QEMU's own schema (8.0's, the closest
//! to 7.2 published). If the monitor
//! said anything the schema does not allow (a missing member, a wrong type, a status QEMU
//! does not have), its deserialisation would fail here.

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Vmm, scratch};
use qapi::qmp;

type Client = qapi::Qmp<qapi::Stream<std::io::BufReader<UnixStream>, UnixStream>>;

fn connect(path: &Path) -> Client {
    let t = Instant::now();
    let s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(30) => panic!("{}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let r = s.try_clone().unwrap();
    let mut q = qapi::Qmp::new(qapi::Stream::new(std::io::BufReader::new(r), s));
    let greeting = q.handshake().expect("the QMP handshake");
    assert_eq!(greeting.version.qemu.major, 7);
    q
}

fn events_on(q: &mut Client) {
    q.execute(&qmp::migrate_set_capabilities {
        capabilities: vec![qmp::MigrationCapabilityStatus {
            capability: qmp::MigrationCapability::events,
            state: true,
        }],
    })
    .unwrap();
}

/// Polls until `f` holds, reading events meanwhile (`nop`), for at most 60 s.
fn until(q: &mut Client, mut f: impl FnMut(&mut Client) -> bool) {
    let t = Instant::now();
    while !f(q) {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_qapi_crate_drives_a_whole_migration() {
    common::init();
    let dir = scratch("qapi");
    let (sq, dq) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let guest = ["--memory", "128M", "--range-size", "32M"];
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--qmp", &format!("unix:{}", sq.display())][..], &guest].concat(),
    );
    let mut dst = Vmm::start(
        &dir,
        "destination",
        &[
            &[
                "--qmp",
                &format!("unix:{}", dq.display()),
                "--incoming",
                "defer",
            ][..],
            &guest,
        ]
        .concat(),
    );
    let mut s = connect(&sq);
    let mut d = connect(&dq);

    let v = s.execute(&qmp::query_version {}).unwrap();
    assert_eq!((v.qemu.major, v.qemu.minor), (7, 2));
    assert!(v.package.starts_with("vmm-"));
    let cmds = s.execute(&qmp::query_commands {}).unwrap();
    assert!(cmds.iter().any(|c| c.name == "migrate-incoming"));
    let st = s.execute(&qmp::query_status {}).unwrap();
    assert_eq!(st.status, qmp::RunState::running);
    assert!(st.running);
    let st = d.execute(&qmp::query_status {}).unwrap();
    assert_eq!(st.status, qmp::RunState::inmigrate);

    events_on(&mut s);
    events_on(&mut d);
    let caps = s.execute(&qmp::query_migrate_capabilities {}).unwrap();
    assert!(
        caps.iter()
            .any(|c| c.capability == qmp::MigrationCapability::events && c.state)
    );
    s.execute(&qmp::migrate_set_parameters(qmp::MigrateSetParameters {
        downtime_limit: Some(100),
        ..Default::default()
    }))
    .unwrap();
    let p = s.execute(&qmp::query_migrate_parameters {}).unwrap();
    assert_eq!(p.downtime_limit, Some(100));

    // Refusals come back as QMP errors the client understands.
    let e = s
        .execute(&qmp::migrate {
            uri: "unix:/nonexistent/x".into(),
            blk: None,
            inc: None,
            detach: None,
            resume: Some(true),
        })
        .unwrap_err();
    assert!(e.to_string().contains("resume"), "{e}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    d.execute(&qmp::migrate_incoming { uri: uri.clone() })
        .unwrap();
    s.execute(&qmp::migrate {
        uri,
        blk: Some(false),
        inc: None,
        detach: Some(true),
        resume: None,
    })
    .unwrap();
    until(&mut s, |s| {
        let m = s.execute(&qmp::query_migrate {}).unwrap();
        match m.status {
            Some(qmp::MigrationStatus::completed) => {
                let ram = m.ram.expect("RAM counters");
                assert_eq!(ram.total, 128 << 20);
                assert_eq!(ram.page_size, 4096);
                assert!(ram.transferred as u64 >= ram.precopy_bytes + ram.downtime_bytes);
                true
            }
            Some(qmp::MigrationStatus::failed) => panic!("failed: {:?}", m.error_desc),
            _ => false,
        }
    });
    until(&mut d, |d| {
        d.execute(&qmp::query_status {}).unwrap().status == qmp::RunState::running
    });
    let st = s.execute(&qmp::query_status {}).unwrap();
    assert_eq!(st.status, qmp::RunState::postmigrate);
    let dm = d.execute(&qmp::query_migrate {}).unwrap();
    assert_eq!(dm.status, Some(qmp::MigrationStatus::completed));

    let names = |q: &mut Client| -> Vec<String> {
        q.events()
            .map(|e| match e {
                qmp::Event::MIGRATION { data, .. } => format!("MIGRATION({:?})", data.status),
                other => format!("{other:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect()
    };
    let se = names(&mut s);
    for want in [
        "MIGRATION(setup)",
        "MIGRATION(active)",
        "STOP",
        "MIGRATION(completed)",
    ] {
        assert!(se.iter().any(|e| e == want), "source events {se:?}");
    }
    let de = names(&mut d);
    for want in ["MIGRATION(active)", "RESUME", "MIGRATION(completed)"] {
        assert!(de.iter().any(|e| e == want), "destination events {de:?}");
    }

    // HMP through the same client.
    let out = d
        .execute(&qmp::human_monitor_command {
            command_line: "info status".into(),
            cpu_index: None,
        })
        .unwrap();
    assert_eq!(out, "VM status: running\r\n");

    s.execute(&qmp::quit {}).unwrap();
    d.execute(&qmp::quit {}).unwrap();
    assert!(src.wait().success());
    assert!(dst.wait().success(), "{}", dst.stderr());
    assert!(
        !sq.exists() && !dq.exists(),
        "the QMP sockets are removed at exit"
    );
}
