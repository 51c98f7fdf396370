//! Descriptors carried with the stream over a unix socket, and refused elsewhere.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use qemu_file::{MAX_RECEIVED_FDS, QemuFile, TcpTransport, UnixTransport};

fn pair() -> (QemuFile, QemuFile) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        QemuFile::new(Box::new(UnixTransport::new(a, "unix:a".into()))),
        QemuFile::new(Box::new(UnixTransport::new(b, "unix:b".into()))),
    )
}

fn file_with(text: &[u8]) -> File {
    let mut f = tempfile();
    f.write_all(text).unwrap();
    f
}

fn tempfile() -> File {
    let path = std::env::temp_dir().join(format!(
        "fd-passing-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

#[test]
fn descriptors_arrive_with_their_bytes_and_the_stream_is_unchanged() {
    let (mut tx, mut rx) = pair();
    let (one, two) = (file_with(b"first"), file_with(b"second"));
    let writer = std::thread::spawn(move || {
        tx.put_be64(0x1122_3344_5566_7788);
        tx.put_buffer(&[7; 100_000]);
        tx.put_buffer_with_fds(b"HDR", &[one.as_fd(), two.as_fd()])
            .unwrap();
        tx.put_be32(42);
        tx.flush().unwrap();
        tx.bytes_written()
    });
    assert_eq!(rx.get_be64().unwrap(), 0x1122_3344_5566_7788);
    let mut big = vec![0; 100_000];
    rx.get_buffer(&mut big).unwrap();
    assert!(big.iter().all(|&b| b == 7));
    let mut hdr = [0; 3];
    rx.get_buffer(&mut hdr).unwrap();
    assert_eq!(&hdr, b"HDR");
    let fds = rx.take_received_fds();
    assert_eq!(fds.len(), 2, "both descriptors came with the bytes");
    assert_eq!(rx.get_be32().unwrap(), 42);
    assert_eq!(writer.join().unwrap(), 8 + 100_000 + 3 + 4);
    assert!(rx.take_received_fds().is_empty(), "taken once");
    for (fd, text) in fds.into_iter().zip([&b"first"[..], b"second"]) {
        let mut f = File::from(fd);
        f.rewind().unwrap();
        let mut s = Vec::new();
        f.read_to_end(&mut s).unwrap();
        assert_eq!(s, text, "the same open file");
    }
    // Both ends of a socketpair are this process.
    assert_eq!(rx.peer_uid(), Some(own_uid()));
}

/// An error with its causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

fn own_uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
}

#[test]
fn tcp_says_it_cannot_pass_descriptors() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let _peer = l.accept().unwrap();
    let mut f = QemuFile::new(Box::new(TcpTransport::new(s, "tcp:127.0.0.1:1".into())));
    let one = file_with(b"x");
    let e = f.put_buffer_with_fds(b"HDR", &[one.as_fd()]).unwrap_err();
    let msg = chain(&e);
    assert!(
        msg.contains("tcp:127.0.0.1:1 cannot pass file descriptors") && msg.contains("unix:"),
        "{msg}"
    );
    assert!(f.peer_uid().is_none());
}

#[test]
fn a_peer_cannot_fill_the_descriptor_table() {
    let (mut tx, mut rx) = pair();
    let f = file_with(b"x");
    let many: Vec<OwnedFd> = (0..MAX_RECEIVED_FDS + 1)
        .map(|_| f.as_fd().try_clone_to_owned().unwrap())
        .collect();
    let borrowed: Vec<BorrowedFd<'_>> = many.iter().map(|f| f.as_fd()).collect();
    tx.put_buffer_with_fds(b"HDR", &borrowed).unwrap();
    let e = chain(&rx.get_u8().unwrap_err());
    assert!(e.contains("more than 16 file descriptors"), "{e}");
}
