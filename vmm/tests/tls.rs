//! Migrations over TLS between vmm processes, with credentials in QEMU's layout made by
//! rcgen: one that completes, and refusals (a source certificate from another CA, a
//! plaintext source) after which the source runs on and migrates again.

mod common;

use std::path::{Path, PathBuf};

use common::{Qmp, Vmm, scratch};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::json;

const GUEST: &[&str] = &["--memory", "128M", "--range-size", "32M"];

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A QEMU-style directory `name` for `side` (server or client) with a certificate
/// `signer` signed, and `trust` as its CA.
fn creds(dir: &Path, name: &str, side: &str, signer: &Ca, trust: &Ca) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, side);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &signer.issuer).unwrap();
    std::fs::write(d.join("ca-cert.pem"), &trust.pem).unwrap();
    std::fs::write(d.join(format!("{side}-cert.pem")), cert.pem()).unwrap();
    std::fs::write(d.join(format!("{side}-key.pem")), key.serialize_pem()).unwrap();
    d
}

fn object(dir: &Path, endpoint: &str) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
        dir.display()
    )
}

/// A TLS destination on 127.0.0.1; returns it and its URI.
fn destination(dir: &Path, name: &str, server: &Path) -> (Vmm, String) {
    let obj = object(server, "server");
    common::verified_destination(dir, name, &["--object", &obj, "--tls-creds", "tls0"], GUEST)
}

#[test]
fn a_migration_over_tls_and_its_refusals() {
    common::init();
    let dir = scratch("tls");
    let (good, other) = (ca("migration CA"), ca("another CA"));
    let server = creds(&dir, "dest", "server", &good, &good);
    let client = creds(&dir, "src", "client", &good, &good);
    let stranger = creds(&dir, "src-stranger", "client", &other, &good);

    let qmp = dir.join("src.qmp");
    let qarg = format!("unix:{}", qmp.display());
    let mut src = Vmm::start(
        &dir,
        "source",
        &[&["--qmp", &qarg, "--verify"][..], GUEST].concat(),
    );
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);

    // A plaintext source: the destination refuses it before parsing a byte of stream.
    let (mut d1, uri) = destination(&dir, "plain", &server);
    q.cmd("migrate", json!({"uri": uri}));
    q.wait_status("failed");
    assert!(!d1.wait().success());
    assert!(
        d1.stderr().contains("does not speak TLS"),
        "{}",
        d1.stderr()
    );
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");

    // A source certificate from another CA.
    q.cmd(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "stranger", "dir": stranger,
               "endpoint": "client", "verify-peer": true}),
    );
    q.cmd("migrate-set-parameters", json!({"tls-creds": "stranger"}));
    let (mut d2, uri) = destination(&dir, "stranger", &server);
    q.cmd("migrate", json!({"uri": uri}));
    q.wait_status("failed");
    assert!(!d2.wait().success());
    assert!(
        d2.stderr().contains("not signed by our CA"),
        "{}",
        d2.stderr()
    );
    assert!(d2.event("loaded").is_none());
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");

    // The right credentials: the migration completes, memory equal at the switchover.
    q.cmd(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": client, "endpoint": "client"}),
    );
    q.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    assert_eq!(
        q.cmd("query-migrate-parameters", json!({}))["tls-creds"],
        "tls0"
    );
    let (mut d3, uri) = destination(&dir, "good", &server);
    q.cmd("migrate", json!({"uri": uri}));
    q.wait_status("completed");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
    assert!(d3.wait().success(), "{}", d3.stderr());
    let hash = |v: &Vmm| v.event("ram-hash").map(|e| e["hash"].clone());
    assert!(hash(&src).is_some());
    assert_eq!(hash(&src), hash(&d3));
    assert_eq!(d3.event("exit").unwrap()["mismatches"], 0);
}
