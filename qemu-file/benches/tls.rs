//! 1 GiB of 4 KiB pages through `QemuFile` over TCP on 127.0.0.1, in the clear and over
//! TLS 1.3 (rustls, AES-GCM as QEMU's GnuTLS negotiates it), read on the other side by a
//! `QemuFile` the way a destination reads pages. Rounds are interleaved so machine noise
//! hits both alike.
//!
//! `cargo bench -p qemu-file --bench tls` prints both throughputs, their ratio per round
//! and the median, minimum and maximum of the ratio (goal: TLS at least 70% of clear).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use qemu_file::{Listener, MigrationUri, QemuFile, TlsCreds, TlsEndpoint, connect, connect_tls};

#[path = "common/pages.rs"]
mod pages;
use pages::{PAGE, TOTAL, send_pages};

const SOURCE: usize = 256 << 20;
const ROUNDS: usize = 7;

/// A server and a client directory in QEMU's layout, from one CA.
fn pki(dir: &Path) -> (PathBuf, PathBuf) {
    vmm_harness::test_ca::TestCa::new("bench CA")
        .write_pair(dir)
        .unwrap()
}

/// Sends the pages (each behind an 8-byte header, as RAM records are) and returns how
/// long until the reader had them all.
fn run(mem: &Arc<Vec<u8>>, tls: Option<(&TlsCreds, &TlsCreds)>) -> Duration {
    let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let server = tls.map(|(s, _)| s.clone());
    let reader = thread::spawn(move || {
        let t = match &server {
            Some(s) => l.accept_tls(s).unwrap(),
            None => l.accept().unwrap(),
        };
        let mut f = QemuFile::new(t);
        let mut page = vec![0u8; PAGE];
        let mut n = 0u64;
        for _ in 0..TOTAL / PAGE {
            let _ = f.get_be64().unwrap();
            f.get_buffer(&mut page).unwrap();
            n += PAGE as u64;
        }
        n
    });
    let t = match tls {
        Some((_, c)) => connect_tls(&uri, c, None).unwrap(),
        None => connect(&uri).unwrap(),
    };
    let mut f = QemuFile::new(t);
    let start = Instant::now();
    send_pages(&mut f, mem);
    assert_eq!(reader.join().unwrap(), TOTAL as u64);
    start.elapsed()
}

/// What sealing and opening records cost on one core, with no socket: 1 GiB through a
/// rustls client into a server over memory (the same suites and record sizes as the
/// stream), timed on each side. Returns seconds per GiB (seal, open).
fn seal_and_open(server: &Path, client: &Path) -> (f64, f64) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::{Read, Write};
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = |d: &Path, f: &str| {
        CertificateDer::pem_file_iter(d.join(f))
            .unwrap()
            .map(|c| c.unwrap())
            .collect::<Vec<_>>()
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert(client, "ca-cert.pem").remove(0)).unwrap();
    let cc = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            cert(server, "server-cert.pem"),
            PrivateKeyDer::from_pem_file(server.join("server-key.pem")).unwrap(),
        )
        .unwrap();
    let mut c =
        rustls::ClientConnection::new(Arc::new(cc), ServerName::try_from("127.0.0.1").unwrap())
            .unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(sc)).unwrap();
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets().unwrap();
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        c.read_tls(&mut &wire[..]).unwrap();
        c.process_new_packets().unwrap();
    }
    c.set_buffer_limit(None);
    s.set_buffer_limit(None);
    let chunk = vec![0x5au8; 1 << 20];
    let mut out = vec![0u8; 1 << 20];
    let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..TOTAL / chunk.len() {
        wire.clear();
        let t = Instant::now();
        c.writer().write_all(&chunk).unwrap();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        seal += t.elapsed();
        let t = Instant::now();
        let mut rd = &wire[..];
        let mut got = 0;
        while got < chunk.len() {
            if !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
            match s.reader().read(&mut out[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        open += t.elapsed();
    }
    let gib = TOTAL as f64 / (1u64 << 30) as f64;
    (seal.as_secs_f64() / gib, open.as_secs_f64() / gib)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("tls_vs_clear: bench");
        return;
    }
    // As vmm does (see its main): keep the heap top, which rustls's per-record buffers
    // would otherwise fault in again and again.
    // SAFETY: mallopt only changes allocator parameters; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
    let dir = std::env::temp_dir().join(format!("qemu-file-bench-tls-{}", std::process::id()));
    let (s, c) = pki(&dir);
    let server = TlsCreds::load(&s, TlsEndpoint::Server, true).unwrap();
    let client = TlsCreds::load(&c, TlsEndpoint::Client, true).unwrap();
    let mem: Arc<Vec<u8>> = Arc::new((0..SOURCE).map(|i| (i * 31 % 255) as u8 + 1).collect());
    let gib = TOTAL as f64 / (1u64 << 30) as f64;
    let (mut clear, mut tls, mut ratios) = (vec![], vec![], vec![]);
    for r in 0..ROUNDS {
        let tc = gib / run(&mem, None).as_secs_f64();
        let tt = gib / run(&mem, Some((&server, &client))).as_secs_f64();
        println!(
            "round {r}: clear {tc:.2} GiB/s, TLS {tt:.2} GiB/s, TLS/clear {:.2}",
            tt / tc
        );
        clear.push(tc);
        tls.push(tt);
        ratios.push(tt / tc);
    }
    let (clear, tls, ratios) = (sorted(clear), sorted(tls), sorted(ratios));
    let m = ROUNDS / 2;
    println!(
        "median of {ROUNDS}: clear {:.2} GiB/s, TLS {:.2} GiB/s; TLS/clear median {:.2}, min {:.2}, max {:.2} (goal >= 0.70)",
        clear[m],
        tls[m],
        ratios[m],
        ratios[0],
        ratios[ROUNDS - 1]
    );
    let (seal, open) = seal_and_open(&s, &c);
    println!(
        "one core, no socket: sealing costs {seal:.3} s per GiB, opening {open:.3} s per GiB; \
         a clear stream at the median above spends {:.3} s per GiB end to end",
        1.0 / clear[m]
    );
    let _ = std::fs::remove_dir_all(dir);
}
