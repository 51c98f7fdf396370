//! Every transport scheme carries a stream both ways, through real sockets, pipes and files.

use std::os::fd::IntoRawFd;
use std::os::unix::fs::PermissionsExt;
use std::thread;

use qemu_file::{Error, Listener, MigrationUri, QemuFile, connect};

/// 4 MiB in records of a header and a page, so partial writes and refills are exercised.
fn send(f: &mut QemuFile) {
    let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    for i in 0..1024u64 {
        f.put_be64(i << 12 | 0x08);
        f.put_buffer(&page);
    }
    f.put_counted_string("end");
    f.finish().unwrap();
}

fn receive(f: &mut QemuFile) {
    let mut page = vec![0u8; 4096];
    for i in 0..1024u64 {
        assert_eq!(f.get_be64().unwrap(), i << 12 | 0x08);
        f.get_buffer(&mut page).unwrap();
        assert!(page.iter().enumerate().all(|(j, b)| *b == (j % 251) as u8));
    }
    assert_eq!(f.get_counted_string("trailer").unwrap(), "end");
    assert_eq!(f.try_get_u8().unwrap(), None);
}

fn round_trip(listen_uri: &str) {
    let listener = Listener::bind(&MigrationUri::parse(listen_uri).unwrap()).unwrap();
    let uri = listener.local_uri();
    let rx = thread::spawn(move || {
        let mut f = QemuFile::new(listener.accept().unwrap());
        receive(&mut f);
    });
    let mut out = QemuFile::new(connect(&uri).unwrap());
    send(&mut out);
    rx.join().unwrap();
}

#[test]
fn tcp_ipv4() {
    round_trip("tcp:127.0.0.1:0");
}

#[test]
fn a_destination_accepts_one_connection_then_stops_listening() {
    let listener = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = listener.local_uri();
    let rx = thread::spawn(move || {
        let mut f = QemuFile::new(listener.accept().unwrap());
        receive(&mut f);
    });
    let mut out = QemuFile::new(connect(&uri).unwrap());
    send(&mut out);
    rx.join().unwrap();
    // The listening socket is gone with the accept: a second source is refused.
    assert!(matches!(connect(&uri), Err(Error::Open { .. })));
}

#[test]
fn tcp_ipv6_when_the_loopback_has_it() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback on this machine");
        return;
    }
    round_trip("tcp:[::1]:0");
}

#[test]
fn unix_socket_is_private_and_removed_after_use() {
    let dir = tempdir();
    let path = dir.join("mig.sock");
    let listener = Listener::bind(&MigrationUri::Unix(path.clone())).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let rx = thread::spawn(move || {
        let mut f = QemuFile::new(listener.accept().unwrap());
        receive(&mut f);
    });
    let mut out = QemuFile::new(connect(&MigrationUri::Unix(path.clone())).unwrap());
    send(&mut out);
    rx.join().unwrap();
    assert!(
        !path.exists(),
        "the socket path is removed once the stream is accepted"
    );
}

#[test]
fn unix_listen_refuses_to_remove_a_regular_file() {
    let dir = tempdir();
    let path = dir.join("not-a-socket");
    std::fs::write(&path, b"keep me").unwrap();
    let e = Listener::bind(&MigrationUri::Unix(path.clone())).unwrap_err();
    assert!(matches!(e, Error::Open { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn file_save_then_restore() {
    let dir = tempdir();
    let uri = MigrationUri::File(dir.join("snapshot"));
    let mut out = QemuFile::new(connect(&uri).unwrap());
    send(&mut out);
    let mut inp = QemuFile::new(Listener::bind(&uri).unwrap().accept().unwrap());
    receive(&mut inp);
}

#[test]
fn exec_outgoing_then_exec_incoming() {
    let dir = tempdir();
    let file = dir.join("via-exec");
    let out_uri = MigrationUri::Exec(format!("cat > '{}'", file.display()));
    let mut out = QemuFile::new(connect(&out_uri).unwrap());
    send(&mut out);
    let in_uri = MigrationUri::Exec(format!("cat '{}'", file.display()));
    let mut inp = QemuFile::new(Listener::bind(&in_uri).unwrap().accept().unwrap());
    receive(&mut inp);
}

#[test]
fn exec_reports_a_failing_command() {
    let mut out = QemuFile::new(connect(&MigrationUri::Exec("exit 3".into())).unwrap());
    out.put_be32(1);
    let e = out.finish().unwrap_err();
    assert!(e.to_string().contains("exit"), "{e}");
}

/// A cancel stops a command that never reads, and whatever it started: the pipe is held
/// by `sleep`, a child of `sh`, which killing `sh` alone would leave running (and the
/// write blocked on the pipe for 30 s).
#[test]
fn a_shutdown_kills_the_whole_exec_command() {
    let mut out = QemuFile::new(connect(&MigrationUri::Exec("sleep 30; true".into())).unwrap());
    let h = out.shutdown_handle().unwrap();
    let t = std::time::Instant::now();
    let killer = thread::spawn(move || {
        thread::sleep(std::time::Duration::from_millis(200));
        h.shutdown();
    });
    let page = vec![7u8; 4096];
    for _ in 0..1024 {
        out.put_buffer(&page);
    }
    assert!(out.flush().is_err());
    killer.join().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn fd_over_an_inherited_socketpair() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (fa, fb) = (a.into_raw_fd(), b.into_raw_fd());
    let rx = thread::spawn(move || {
        let mut f = QemuFile::new(
            Listener::bind(&MigrationUri::Fd(fb))
                .unwrap()
                .accept()
                .unwrap(),
        );
        receive(&mut f);
    });
    let mut out = QemuFile::new(connect(&MigrationUri::Fd(fa)).unwrap());
    send(&mut out);
    drop(out);
    rx.join().unwrap();
}

#[test]
fn fd_that_is_not_open_is_refused() {
    let e = connect(&MigrationUri::Fd(987_654)).unwrap_err();
    assert!(matches!(e, Error::Open { .. }), "{e}");
}

#[test]
fn connecting_to_nobody_says_where() {
    let dir = tempdir();
    let uri = MigrationUri::Unix(dir.join("nobody.sock"));
    let e = connect(&uri).unwrap_err().to_string();
    assert!(e.contains("nobody.sock"), "{e}");
}

#[test]
fn a_listener_can_be_shut_down_while_waiting() {
    let listener = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let h = listener.shutdown_handle().unwrap();
    let t = thread::spawn(move || listener.accept().map(|_| ()));
    thread::sleep(std::time::Duration::from_millis(50));
    h.shutdown();
    assert!(t.join().unwrap().is_err());
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "qemu-file-test-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A destination with multifd takes the main stream and its channels in any order, told
/// apart by their first bytes.
#[test]
fn main_stream_and_channels_are_told_apart_in_any_order() {
    for listen in ["tcp:127.0.0.1:0", "unix:/tmp/qemu-file-channels-test.sock"] {
        let listener = Listener::bind(&MigrationUri::parse(listen).unwrap()).unwrap();
        let uri = listener.local_uri();
        let rx = thread::spawn(move || listener.accept_with_channels(2));
        let mut conns = Vec::new();
        for first in [0x1122_3344u32, 0x5145_564d, 0x1122_3344] {
            let mut f = QemuFile::new(connect(&uri).unwrap());
            f.put_be32(first);
            f.put_be32(conns.len() as u32);
            f.flush().unwrap();
            conns.push(f);
        }
        let accepted = rx.join().unwrap().unwrap();
        assert!(accepted.listener.is_some(), "given back to watch for more");
        let (main, channels) = (accepted.main, accepted.channels);
        let mut main = QemuFile::new(main);
        assert_eq!(main.get_be32().unwrap(), 0x5145_564d, "{listen}");
        assert_eq!(main.get_be32().unwrap(), 1, "the second connection");
        let mut ids: Vec<u32> = channels
            .into_iter()
            .map(|c| {
                let mut c = QemuFile::new(c);
                assert_eq!(c.get_be32().unwrap(), 0x1122_3344);
                c.get_be32().unwrap()
            })
            .collect();
        // In the order they were told apart, which is any.
        ids.sort();
        assert_eq!(ids, [0, 2], "{listen}");
    }
}

#[test]
fn two_main_streams_or_none_are_refused() {
    for (magics, needle) in [
        ([0x5145_564du32, 0x5145_564d], "two connections"),
        ([0x1122_3344, 0x1122_3344], "none opened the main stream"),
        ([0x4745_5420, 0x5145_564d], "neither a migration stream"),
    ] {
        let listener = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
        let uri = listener.local_uri();
        let rx = thread::spawn(move || listener.accept_with_channels(1).map(|_| ()));
        let _conns: Vec<QemuFile> = magics
            .iter()
            .filter_map(|m| {
                // A refusal may come before the second connection is made or written.
                let mut f = QemuFile::new(connect(&uri).ok()?);
                f.put_be32(*m);
                let _ = f.flush();
                Some(f)
            })
            .collect();
        let e = chain(&rx.join().unwrap().unwrap_err());
        assert!(e.contains(needle), "{e}");
    }
    let file = std::env::temp_dir().join("qemu-file-multifd-refused");
    std::fs::write(&file, b"QEVM").unwrap();
    let l = Listener::bind(&MigrationUri::File(file.clone())).unwrap();
    let e = chain(&l.accept_with_channels(2).map(|_| ()).unwrap_err());
    assert!(e.contains("needs a tcp: or unix: URI"), "{e}");
    std::fs::remove_file(file).unwrap();
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

#[test]
fn connections_told_apart_by_order_come_back_in_that_order() {
    // QEMU 7.2's post-copy preempt: the main stream, then a connection that opens with
    // nothing of its own.
    for uri in [
        "tcp:127.0.0.1:0".to_string(),
        format!("unix:{}/o.sock", tempdir().display()),
    ] {
        let listener = Listener::bind(&MigrationUri::parse(&uri).unwrap()).unwrap();
        let target = listener.local_uri();
        let rx = thread::spawn(move || {
            listener.accept_in_order(2, None, std::time::Duration::from_secs(10))
        });
        let mut first = QemuFile::new(connect(&target).unwrap());
        let mut second = QemuFile::new(connect(&target).unwrap());
        second.put_be32(2);
        second.flush().unwrap();
        first.put_be32(1);
        first.flush().unwrap();
        let got = rx.join().unwrap().unwrap();
        let values: Vec<u32> = got
            .into_iter()
            .map(|t| QemuFile::new(t).get_be32().unwrap())
            .collect();
        assert_eq!(values, [1, 2], "{uri}");
    }
}

#[test]
fn a_second_connection_that_never_comes_is_an_error_in_time() {
    let listener = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let target = listener.local_uri();
    let _only = connect(&target).unwrap();
    let t = std::time::Instant::now();
    let e = listener
        .accept_in_order(2, None, std::time::Duration::from_millis(200))
        .map(|_| ())
        .unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    assert!(chain(&e).contains("did not within 200 ms"), "{}", chain(&e));
}
