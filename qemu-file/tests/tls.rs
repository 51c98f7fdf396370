//! TLS between a source and a destination with credentials laid out as QEMU's
//! `tls-creds-x509` reads them, made here by rcgen: a stream goes through whole, and each
//! failed check is refused with its reason before a byte of stream is read.

use std::path::{Path, PathBuf};
use std::thread;

use qemu_file::{
    Authz, AuthzFormat, AuthzPolicy, AuthzRule, Error, Listener, MigrationUri, QemuFile, TlsCreds,
    TlsEndpoint, connect, connect_tls, subject_name,
};
use vmm_harness::test_ca::rcgen::{self, CertificateParams, DnType};
use vmm_harness::test_ca::{Leaf, Side, TestCa, params, write_creds};

/// A certificate for `names` signed by `ca`, valid now unless `expired`.
fn leaf(ca: &TestCa, cn: &str, names: &[&str], expired: bool) -> Leaf {
    let mut p = params(cn, names);
    if expired {
        vmm_harness::test_ca::expired(&mut p);
    }
    ca.sign(p)
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qemu-file-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A QEMU-style credentials directory `name` for `side`: `cert`, trusting `ca_pem`.
fn creds_dir(name: &str, ca_pem: &str, side: Side, cert: &Leaf) -> PathBuf {
    write_creds(&dir(name), side, cert, ca_pem).unwrap()
}

struct Setup {
    server: PathBuf,
    client: PathBuf,
}

/// A server certificate for 127.0.0.1 and a client certificate, both from one CA.
fn good(name: &str) -> Setup {
    let ca = TestCa::new("test CA");
    let server = leaf(&ca, "destination", &["127.0.0.1", "localhost"], false);
    let client = leaf(&ca, "source", &[], false);
    Setup {
        server: creds_dir(&format!("{name}-server"), ca.pem(), Side::Server, &server),
        client: creds_dir(&format!("{name}-client"), ca.pem(), Side::Client, &client),
    }
}

/// Runs a handshake (and a small stream) between `server` and `client` creds over TCP on
/// 127.0.0.1; returns both sides' results.
fn exchange(
    server: &Path,
    client: &Path,
    hostname: Option<&str>,
) -> (Result<Vec<u8>, Error>, Result<(), Error>) {
    exchange_authz(server, client, hostname, None)
}

/// As [`exchange`], the destination letting in only the names `authz` allows.
fn exchange_authz(
    server: &Path,
    client: &Path,
    hostname: Option<&str>,
    authz: Option<Authz>,
) -> (Result<Vec<u8>, Error>, Result<(), Error>) {
    let mut s = TlsCreds::load(server, TlsEndpoint::Server, true).unwrap();
    if let Some(a) = authz {
        s = s.with_authz(a).unwrap();
    }
    let c = TlsCreds::load(client, TlsEndpoint::Client, true).unwrap();
    let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let rx = thread::spawn(move || {
        let mut f = QemuFile::new(l.accept_tls(&s)?);
        let mut got = vec![0u8; 5 << 20];
        f.get_buffer(&mut got)?;
        Ok(got)
    });
    let tx = (|| {
        let mut f = QemuFile::new(connect_tls(&uri, &c, hostname)?);
        let data: Vec<u8> = (0..5u32 << 20).map(|i| (i % 253) as u8).collect();
        f.put_buffer(&data);
        f.finish()
    })();
    (rx.join().unwrap(), tx)
}

fn reason(e: &Error) -> String {
    e.to_string()
}

/// The error and its causes, as one line.
fn chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

#[test]
fn tls_authz_lets_in_only_the_names_it_lists() {
    let ca = TestCa::new("authz CA");
    let server = leaf(&ca, "destination", &["127.0.0.1"], false);
    let server = creds_dir("authz-server", ca.pem(), Side::Server, &server);
    // A subject of several RDNs (C, O, OU, CN in that order), with a comma to escape
    // and a country as a PrintableString (as openssl writes it).
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(
        DnType::CountryName,
        rcgen::DnValue::PrintableString("GB".try_into().unwrap()),
    );
    p.distinguished_name
        .push(DnType::OrganizationName, "Example, Ltd");
    p.distinguished_name
        .push(DnType::OrganizationalUnitName, " migration ");
    p.distinguished_name.push(DnType::CommonName, "src.example");
    let cert = ca.sign(p);
    // GnuTLS's order (the certificate's) and escapes, which QEMU's rules are written
    // against (`cargo xtask interop` checks it with QEMU).
    let name = "C=GB,O=Example\\, Ltd,OU=\\ migration\\ ,CN=src.example";
    assert_eq!(subject_name(&cert.der).unwrap(), name);
    // A country as a UTF8String is not what GnuTLS expects there: it shows the DER.
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CountryName, "GB");
    let utf8 = ca.sign(p);
    assert_eq!(subject_name(&utf8.der).unwrap(), "C=#0c024742");
    let client = creds_dir("authz-client", ca.pem(), Side::Client, &cert);
    let list = |pattern: &str, format| Authz {
        id: "auth0".into(),
        rules: vec![AuthzRule {
            pattern: pattern.into(),
            policy: AuthzPolicy::Allow,
            format,
        }],
        policy: AuthzPolicy::Deny,
    };

    for allowed in [
        Authz::simple("auth0", name),
        list("C=GB,O=Example\\, Ltd,*", AuthzFormat::Glob),
        list("*,CN=src.example", AuthzFormat::Glob),
    ] {
        let (rx, tx) = exchange_authz(&server, &client, None, Some(allowed.clone()));
        tx.unwrap_or_else(|e| panic!("{allowed:?}: {}", chain(&e)));
        assert_eq!(rx.unwrap().len(), 5 << 20);
    }
    for denied in [
        Authz::simple("auth0", "CN=src.example"),
        list("*,CN=src.example", AuthzFormat::Exact),
        list("*,CN=other", AuthzFormat::Glob),
    ] {
        let (rx, tx) = exchange_authz(&server, &client, None, Some(denied));
        let e = reason(&rx.unwrap_err());
        assert!(
            e.contains(&format!("({name}) is not authorized by tls-authz 'auth0'")),
            "{e}"
        );
        let e = chain(&tx.unwrap_err());
        assert!(e.contains("not authorized by its tls-authz"), "{e}");
    }

    // Without verify-peer there is no certificate to authorize: refused when set up.
    let open = TlsCreds::load(&server, TlsEndpoint::Server, false).unwrap();
    let e = reason(&open.with_authz(Authz::simple("a", name)).unwrap_err());
    assert!(e.contains("needs verify-peer=on"), "{e}");
    let c = TlsCreds::load(&client, TlsEndpoint::Client, true).unwrap();
    let e = reason(&c.with_authz(Authz::simple("a", name)).unwrap_err());
    assert!(e.contains("endpoint=server"), "{e}");
}

#[test]
fn a_stream_goes_through_with_mutual_authentication() {
    let s = good("ok");
    let (rx, tx) = exchange(&s.server, &s.client, None);
    tx.unwrap();
    let got = rx.unwrap();
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 253) as u8));
}

#[test]
fn each_failed_check_is_refused_with_its_reason() {
    let s = good("refusals");
    let other = TestCa::new("another CA");
    // The source's certificate comes from another CA: the destination refuses it.
    let stranger = creds_dir(
        "stranger-client",
        &std::fs::read_to_string(s.client.join("ca-cert.pem")).unwrap(),
        Side::Client,
        &leaf(&other, "source", &[], false),
    );
    let (rx, tx) = exchange(&s.server, &stranger, None);
    let e = reason(&rx.unwrap_err());
    assert!(e.contains("not signed by our CA"), "{e}");
    // In TLS 1.3 the source hears of it after its handshake, from the alert.
    let e = chain(&tx.unwrap_err());
    assert!(e.contains("not signed by its CA"), "{e}");

    // The destination's certificate comes from another CA: the source refuses it.
    let rogue = creds_dir(
        "rogue-server",
        &std::fs::read_to_string(s.server.join("ca-cert.pem")).unwrap(),
        Side::Server,
        &leaf(&other, "destination", &["127.0.0.1"], false),
    );
    let (_, tx) = exchange(&rogue, &s.client, None);
    let e = reason(&tx.unwrap_err());
    assert!(
        e.contains("destination's certificate is not signed by our CA"),
        "{e}"
    );

    // Expired.
    let ca2 = TestCa::new("CA 2");
    let old = creds_dir(
        "expired-server",
        ca2.pem(),
        Side::Server,
        &leaf(&ca2, "destination", &["127.0.0.1"], true),
    );
    let client2 = creds_dir(
        "expired-client",
        ca2.pem(),
        Side::Client,
        &leaf(&ca2, "source", &[], false),
    );
    let (_, tx) = exchange(&old, &client2, None);
    let e = reason(&tx.unwrap_err());
    assert!(e.contains("has expired"), "{e}");

    // The host name asked for is not the certificate's.
    let (_, tx) = exchange(&s.server, &s.client, Some("dest.example"));
    let e = reason(&tx.unwrap_err());
    assert!(e.contains("not valid for the host name"), "{e}");

    // A source with no certificate, to a destination that verifies its peer.
    let anonymous = dir("anonymous-client");
    std::fs::copy(s.client.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let (rx, _) = exchange(&s.server, &anonymous, None);
    let e = reason(&rx.unwrap_err());
    assert!(e.contains("presented no certificate"), "{e}");
}

#[test]
fn plaintext_and_tls_peers_refuse_each_other() {
    let s = good("plain");
    // A plaintext source to a TLS destination: refused before any stream is parsed.
    let creds = TlsCreds::load(&s.server, TlsEndpoint::Server, true).unwrap();
    let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let rx = thread::spawn(move || l.accept_tls(&creds).map(|_| ()));
    let mut f = QemuFile::new(connect(&uri).unwrap());
    f.put_buffer(b"QEVM\0\0\0\x03 and a plaintext stream follows");
    let _ = f.flush();
    let e = reason(&rx.join().unwrap().unwrap_err());
    assert!(e.contains("does not speak TLS"), "{e}");
    drop(f);

    // A TLS source to a plaintext destination, which takes the hello for a stream and
    // closes: the source says so.
    let creds = TlsCreds::load(&s.client, TlsEndpoint::Client, true).unwrap();
    let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let rx = thread::spawn(move || {
        let mut f = QemuFile::new(l.accept().unwrap());
        f.get_be32().map(|magic| magic == 0x5145_564d)
    });
    let e = reason(&connect_tls(&uri, &creds, None).unwrap_err());
    assert!(
        e.contains("does not speak TLS")
            || e.contains("closed the connection during the handshake"),
        "{e}"
    );
    assert_eq!(
        rx.join().unwrap().ok(),
        Some(false),
        "no QEVM magic came in clear"
    );
}

#[test]
fn credentials_are_checked_when_loaded() {
    let s = good("load");
    let e = TlsCreds::load(&s.client, TlsEndpoint::Client, false).unwrap_err();
    assert!(reason(&e).contains("verify-peer=off"), "{e}");
    let e = TlsCreds::load(&s.client, TlsEndpoint::Server, true).unwrap_err();
    assert!(reason(&e).contains("server-cert.pem"), "{e}");
    let empty = dir("empty");
    let e = TlsCreds::load(&empty, TlsEndpoint::Client, true).unwrap_err();
    assert!(reason(&e).contains("ca-cert.pem"), "{e}");
}

#[test]
fn multifd_channels_complete_tls_side_by_side_before_they_are_told_apart() {
    let s = good("channels");
    let server = TlsCreds::load(&s.server, TlsEndpoint::Server, true).unwrap();
    let client = TlsCreds::load(&s.client, TlsEndpoint::Client, true).unwrap();
    let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let rx = thread::spawn(move || l.accept_tls_with_channels(2, &server));
    // As QEMU does: the main stream connects first and says nothing until its channels
    // have connected and spoken.
    let mut main = QemuFile::new(connect_tls(&uri, &client, None).unwrap());
    let mut chans: Vec<_> = (0..2)
        .map(|i| {
            let mut c = QemuFile::new(connect_tls(&uri, &client, None).unwrap());
            c.put_be32(0x1122_3344);
            c.put_be32(i);
            c.flush().unwrap();
            c
        })
        .collect();
    main.put_be32(0x5145_564d);
    main.put_be32(3);
    main.flush().unwrap();
    let accepted = rx.join().unwrap().unwrap();
    let mut m = QemuFile::new(accepted.main);
    assert_eq!(
        (m.get_be32().unwrap(), m.get_be32().unwrap()),
        (0x5145_564d, 3)
    );
    let mut ids: Vec<u32> = accepted
        .channels
        .into_iter()
        .map(|c| {
            let mut c = QemuFile::new(c);
            assert_eq!(c.get_be32().unwrap(), 0x1122_3344);
            c.get_be32().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, [0, 1]);
    for c in &mut chans {
        c.finish().unwrap();
    }

    // A channel whose certificate another CA signed fails the whole accept, at once,
    // though the other channel never connects.
    let other = TestCa::new("another CA");
    let stranger = creds_dir(
        "channels-stranger",
        &std::fs::read_to_string(s.client.join("ca-cert.pem")).unwrap(),
        Side::Client,
        &leaf(&other, "source", &[], false),
    );
    let stranger = TlsCreds::load(&stranger, TlsEndpoint::Client, true).unwrap();
    let server = TlsCreds::load(&s.server, TlsEndpoint::Server, true).unwrap();
    let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let rx = thread::spawn(move || l.accept_tls_with_channels(2, &server).map(|_| ()));
    let _main = connect_tls(&uri, &client, None).unwrap();
    let _bad = connect_tls(&uri, &stranger, None).unwrap();
    let e = reason(&rx.join().unwrap().unwrap_err());
    assert!(e.contains("not signed by our CA"), "{e}");
}

#[test]
fn a_peer_that_says_nothing_is_refused_after_the_handshake_timeout() {
    let s = good("silent");
    let mut creds = TlsCreds::load(&s.server, TlsEndpoint::Server, true).unwrap();
    creds.set_handshake_timeout(std::time::Duration::from_millis(300));
    let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let rx = thread::spawn(move || l.accept_tls(&creds).map(|_| ()));
    // Connected, and silent.
    let _silent = connect(&uri).unwrap();
    let e = reason(&rx.join().unwrap().unwrap_err());
    assert!(
        e.contains("said nothing for 300ms during the handshake"),
        "{e}"
    );
}

/// Post-copy's return path over TLS: each side takes a second handle on its session
/// (the source's to read, the destination's to write) while the first goes on the other
/// way; megabytes cross both ways at once, whole and in order, with neither direction
/// waiting for the other.
#[test]
fn a_shared_session_carries_both_directions_at_once() {
    let s = good("shared");
    let sc = TlsCreds::load(&s.server, TlsEndpoint::Server, true).unwrap();
    let cc = TlsCreds::load(&s.client, TlsEndpoint::Client, true).unwrap();
    let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let pattern = |seed: u32, n: usize| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(seed) >> 3) as u8)
            .collect()
    };
    const FORWARD: usize = 24 << 20;
    const BACK: usize = 3 << 20;
    let destination = thread::spawn(move || {
        let mut f = QemuFile::new(l.accept_tls(&sc).unwrap());
        // The return path's writer, on a thread of its own, while the loader reads.
        let mut rp = f.return_path().unwrap();
        let writer = thread::spawn(move || {
            let back = pattern(7, BACK);
            for chunk in back.chunks(4096 + 17) {
                rp.put_buffer(chunk);
                rp.flush().unwrap();
            }
            rp.finish().unwrap();
        });
        let mut got = vec![0u8; FORWARD];
        f.get_buffer(&mut got).unwrap();
        writer.join().unwrap();
        got
    });
    let mut f = QemuFile::new(connect_tls(&uri, &cc, None).unwrap());
    // The source's reader of the return path, on a thread of its own, while it writes.
    let mut rp = f.split_reader().unwrap();
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; BACK];
        rp.get_buffer(&mut got).unwrap();
        got
    });
    let forward = pattern(3, FORWARD);
    for chunk in forward.chunks(256 << 10) {
        f.put_buffer(chunk);
        f.flush().unwrap();
    }
    assert!(
        reader.join().unwrap() == pattern(7, BACK),
        "the return path differs"
    );
    assert!(destination.join().unwrap() == forward, "the stream differs");
}
