//! Test certificates in QEMU's layout, for the TLS interop and bench runs: one CA, a
//! destination's directory (`endpoint=server`, valid for 127.0.0.1) and a source's
//! (`endpoint=client`), each with `ca-cert.pem` and its own certificate and key.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// The directories, and the source certificate's name as tls-authz matches it.
pub struct TestPki {
    /// The destination's directory (server-cert.pem, server-key.pem).
    pub server: PathBuf,
    /// The source's directory (client-cert.pem, client-key.pem).
    pub client: PathBuf,
    /// The source certificate's subject as GnuTLS and vmm write it.
    pub client_name: String,
    /// The same subject with its RDNs the other way round (RFC 4514's order, which
    /// GnuTLS does not use): an authorization rule that must not match.
    pub client_name_reversed: String,
}

/// Makes a CA and both directories under `dir`.
///
/// # Errors
/// Key generation or a file write fails.
pub fn make(dir: &Path) -> Result<TestPki> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "vmm test CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_pem = p.self_signed(&ca_key)?.pem();
    let ca = Issuer::new(p, ca_key);

    let leaf = |side: &str, names: Vec<String>| -> Result<(PathBuf, Vec<u8>)> {
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        // A country as a UTF8String (GnuTLS shows it in hex), a comma and spaces to
        // escape: the corners of how GnuTLS writes a name.
        p.distinguished_name.push(DnType::CountryName, "GB");
        p.distinguished_name
            .push(DnType::OrganizationName, "Example, Ltd");
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, " migration ");
        p.distinguished_name
            .push(DnType::CommonName, format!("{side}.example"));
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca)?;
        let d = dir.join(side);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("ca-cert.pem"), &ca_pem)?;
        std::fs::write(d.join(format!("{side}-cert.pem")), cert.pem())?;
        std::fs::write(d.join(format!("{side}-key.pem")), key.serialize_pem())?;
        Ok((d, cert.der().to_vec()))
    };
    let (server, _) = leaf("server", vec!["127.0.0.1".into(), "localhost".into()])?;
    let (client, der) = leaf("client", Vec::new())?;
    let client_name = qemu_file::subject_name(&der).map_err(anyhow::Error::msg)?;
    Ok(TestPki {
        server,
        client,
        client_name_reversed: rdns(&client_name).rev().collect::<Vec<_>>().join(","),
        client_name,
    })
}

/// The RDNs of a name: split at the commas that are not escaped.
fn rdns(name: &str) -> impl DoubleEndedIterator<Item = &str> {
    let mut cuts = vec![0];
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b',' => cuts.push(i + 1),
            _ => {}
        }
        i += 1;
    }
    cuts.push(name.len() + 1);
    cuts.windows(2)
        .map(move |w| &name[w[0]..w[1] - 1])
        .collect::<Vec<_>>()
        .into_iter()
}
