//! Migrations over TLS between vmm processes, with credentials in QEMU's layout made by
//! rcgen: with 0 and 2 multifd channels, and each refusal (a source certificate from
//! another CA, an expired one, a name tls-authz does not allow, a destination's
//! certificate for another host name, a plaintext source, a TLS source to a plaintext
//! destination), each named on both sides, after which the source runs on and migrates.

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
    creds_with(dir, name, side, signer, trust, |_| {})
}

/// As [`creds`], the certificate's parameters changed by `edit` first.
fn creds_with(
    dir: &Path,
    name: &str,
    side: &str,
    signer: &Ca,
    trust: &Ca,
    edit: impl FnOnce(&mut CertificateParams),
) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "Example");
    p.distinguished_name.push(DnType::CommonName, side);
    edit(&mut p);
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

/// A TLS destination on 127.0.0.1 that lets in the names `authz` allows (an
/// authz-list's options, or None for any certificate its CA signed), with `channels`
/// multifd channels; returns it and its URI.
fn destination(
    dir: &Path,
    name: &str,
    server: &Path,
    authz: Option<&str>,
    channels: Option<&str>,
) -> (Vmm, String) {
    let obj = object(server, "server");
    let mut extra = vec!["--object", &obj, "--tls-creds", "tls0"];
    let list = authz.map(|rules| format!("authz-list,id=auth0,{rules}"));
    if let Some(l) = &list {
        extra.extend(["--object", l, "--tls-authz", "auth0"]);
    }
    if let Some(n) = channels {
        extra.extend(["--multifd-channels", n]);
    }
    common::verified_destination(dir, name, &extra, GUEST)
}

/// A source with a QMP socket, running its guest; `name` is also its QMP socket's.
fn source(dir: &Path, name: &str) -> (Vmm, Qmp) {
    let qmp = dir.join(format!("{name}.qmp"));
    let qarg = format!("unix:{}", qmp.display());
    let src = Vmm::start(
        dir,
        name,
        &[&["--qmp", &qarg, "--verify"][..], GUEST].concat(),
    );
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    (src, q)
}

/// Starts the migration to `uri`, waits for it to fail, and checks what each side says:
/// the source's error names `source_says`, the destination (which exits without loading
/// anything) `dest_says`; the source runs on.
fn refused(q: &mut Qmp, mut dest: Vmm, uri: &str, source_says: &str, dest_says: &str) {
    q.cmd("migrate", json!({"uri": uri}));
    let m = q.wait_status("failed");
    let desc = m["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains(source_says), "source: {desc}");
    assert!(!dest.wait().success());
    let last = dest.stderr().lines().last().unwrap_or_default().to_string();
    eprintln!("refused; the source says: {desc}\n  the destination: {last}");
    assert!(dest.stderr().contains(dest_says), "{}", dest.stderr());
    assert!(dest.event("loaded").is_none());
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
}

/// Adds a client credentials object from `dir` as `id` and makes it `tls-creds`.
fn use_creds(q: &mut Qmp, id: &str, dir: &Path) {
    q.cmd(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir, "endpoint": "client"}),
    );
    q.cmd("migrate-set-parameters", json!({"tls-creds": id}));
}

/// Waits for a migration to complete and checks the memory both sides hashed.
fn completes(q: &mut Qmp, mut src: Vmm, mut dest: Vmm) {
    q.wait_status("completed");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
    assert!(dest.wait().success(), "{}", dest.stderr());
    let hash = |v: &Vmm| v.event("ram-hash").map(|e| e["hash"].clone());
    assert!(hash(&src).is_some());
    assert_eq!(hash(&src), hash(&dest));
    assert_eq!(dest.event("exit").unwrap()["mismatches"], 0);
}

#[test]
fn each_refusal_is_named_on_both_sides_and_the_source_runs_on() {
    common::init();
    let dir = scratch("tls-refusals");
    let (good, other) = (ca("migration CA"), ca("another CA"));
    let server = creds(&dir, "dest", "server", &good, &good);
    let client = creds(&dir, "src", "client", &good, &good);
    let (src, mut q) = source(&dir, "source");

    // A plaintext source: the destination refuses it before parsing a byte of stream.
    let (d, uri) = destination(&dir, "plain", &server, None, None);
    refused(&mut q, d, &uri, "it takes only TLS", "does not speak TLS");

    // A source certificate from another CA.
    let stranger = creds(&dir, "src-stranger", "client", &other, &good);
    use_creds(&mut q, "stranger", &stranger);
    let (d, uri) = destination(&dir, "stranger", &server, None, None);
    refused(
        &mut q,
        d,
        &uri,
        "not signed by its CA",
        "not signed by our CA",
    );

    // An expired source certificate.
    let old = creds_with(&dir, "src-old", "client", &good, &good, |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    use_creds(&mut q, "old", &old);
    let (d, uri) = destination(&dir, "expired", &server, None, None);
    refused(&mut q, d, &uri, "has expired", "has expired");

    // A certificate the CA signed, for a name tls-authz does not allow.
    use_creds(&mut q, "tls0", &client);
    let only_mallory = "rules.0.match=*CN=mallory*,rules.0.policy=allow,rules.0.format=glob";
    let (d, uri) = destination(&dir, "authz", &server, Some(only_mallory), None);
    refused(
        &mut q,
        d,
        &uri,
        "not authorized by its tls-authz",
        "(O=Example,CN=client) is not authorized by tls-authz 'auth0'",
    );

    // The destination's certificate is not valid for the host name asked for.
    q.cmd(
        "migrate-set-parameters",
        json!({"tls-hostname": "dest.example"}),
    );
    let (d, uri) = destination(&dir, "hostname", &server, None, None);
    refused(
        &mut q,
        d,
        &uri,
        "not valid for the host name",
        "not for the host name it asked for",
    );
    q.cmd("migrate-set-parameters", json!({"tls-hostname": ""}));

    // A TLS source to a plaintext destination.
    let (d, uri) = common::verified_destination(&dir, "plain-dest", &[], GUEST);
    refused(
        &mut q,
        d,
        &uri,
        "TLS",
        "the source uses TLS (tls-creds) and this side does not",
    );

    // After all that, the source migrates: to a destination whose tls-authz lets it in,
    // with a glob over the organization.
    let ours = "rules.0.match=O=Example,,CN=*,rules.0.policy=allow,rules.0.format=glob";
    let (d, uri) = destination(&dir, "good", &server, Some(ours), None);
    q.cmd("migrate", json!({"uri": uri}));
    completes(&mut q, src, d);
}

#[test]
fn multifd_channels_migrate_over_tls() {
    common::init();
    let dir = scratch("tls-multifd");
    let good = ca("migration CA");
    let server = creds(&dir, "dest", "server", &good, &good);
    let client = creds(&dir, "src", "client", &good, &good);
    let (src, mut q) = source(&dir, "source");
    use_creds(&mut q, "tls0", &client);
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    );
    q.cmd("migrate-set-parameters", json!({"multifd-channels": 2}));
    let (mut d, uri) = destination(&dir, "good", &server, None, Some("2"));
    q.cmd("migrate", json!({"uri": uri}));
    assert_eq!(d.wait_event("incoming-connected")["channels"], 2);
    completes(&mut q, src, d);
}
