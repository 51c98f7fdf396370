//! Migrations over TLS between vmm processes, with credentials in QEMU's layout made by
//! rcgen: with 0 and 2 multifd channels, and each refusal (a source certificate from
//! another CA, an expired one, a name tls-authz does not allow, a destination's
//! certificate for another host name, a plaintext source, a TLS source to a plaintext
//! destination), each named on both sides, after which the source runs on and migrates.

mod common;

use std::path::{Path, PathBuf};

use common::{Qmp, Vmm, scratch};
use serde_json::json;
use vmm_harness::test_ca::rcgen::{CertificateParams, DnType};
use vmm_harness::test_ca::{Side, TestCa, params};

const GUEST: &[&str] = &["--memory", "128M", "--range-size", "32M"];

/// A QEMU-style directory `name` for `side` with a certificate `signer` signed, and
/// `trust` as its CA.
fn creds(dir: &Path, name: &str, side: Side, signer: &TestCa, trust: &TestCa) -> PathBuf {
    creds_with(dir, name, side, signer, trust, |_| {})
}

/// As [`creds`], the certificate's parameters changed by `edit` first.
fn creds_with(
    dir: &Path,
    name: &str,
    side: Side,
    signer: &TestCa,
    trust: &TestCa,
    edit: impl FnOnce(&mut CertificateParams),
) -> PathBuf {
    let mut p = params(side.name(), &["127.0.0.1"]);
    p.distinguished_name = vmm_harness::test_ca::rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "Example");
    p.distinguished_name.push(DnType::CommonName, side.name());
    edit(&mut p);
    trust
        .write_creds(&dir.join(name), side, &signer.sign(p))
        .unwrap()
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
    let (good, other) = (TestCa::new("migration CA"), TestCa::new("another CA"));
    let server = creds(&dir, "dest", Side::Server, &good, &good);
    let client = creds(&dir, "src", Side::Client, &good, &good);
    let (src, mut q) = source(&dir, "source");

    // A plaintext source: the destination refuses it before parsing a byte of stream.
    let (d, uri) = destination(&dir, "plain", &server, None, None);
    refused(&mut q, d, &uri, "it takes only TLS", "does not speak TLS");

    // A source certificate from another CA.
    let stranger = creds(&dir, "src-stranger", Side::Client, &other, &good);
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
    let old = creds_with(
        &dir,
        "src-old",
        Side::Client,
        &good,
        &good,
        vmm_harness::test_ca::expired,
    );
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
    let good = TestCa::new("migration CA");
    let server = creds(&dir, "dest", Side::Server, &good, &good);
    let client = creds(&dir, "src", Side::Client, &good, &good);
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
