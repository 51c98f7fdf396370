//! Test certificates in QEMU's layout, for the TLS interop and bench runs: one CA, a
//! destination's directory (`endpoint=server`, valid for 127.0.0.1) and a source's
//! (`endpoint=client`), each with `ca-cert.pem` and its own certificate and key.

use std::path::{Path, PathBuf};

use anyhow::Result;
use vmm_harness::test_ca::rcgen::{self, DnType};
use vmm_harness::test_ca::{Side, TestCa, params};

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
    let ca = TestCa::new("vmm test CA");
    let leaf = |side: Side, names: &[&str]| -> Result<(PathBuf, Vec<u8>)> {
        let mut p = params("", names);
        p.distinguished_name = rcgen::DistinguishedName::new();
        // A country as a UTF8String (GnuTLS shows it in hex), a comma and spaces to
        // escape: the corners of how GnuTLS writes a name.
        p.distinguished_name.push(DnType::CountryName, "GB");
        p.distinguished_name
            .push(DnType::OrganizationName, "Example, Ltd");
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, " migration ");
        p.distinguished_name
            .push(DnType::CommonName, format!("{}.example", side.name()));
        let cert = ca.sign(p);
        let d = ca.write_creds(&dir.join(side.name()), side, &cert)?;
        Ok((d, cert.der))
    };
    let (server, _) = leaf(Side::Server, &["127.0.0.1", "localhost"])?;
    let (client, der) = leaf(Side::Client, &[])?;
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
