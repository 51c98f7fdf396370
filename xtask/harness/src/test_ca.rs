//! Test certificates in the layout QEMU's `tls-creds-x509` reads (a directory with
//! `ca-cert.pem` and `{server,client}-cert.pem` / `-key.pem`), made with rcgen: the one
//! helper every TLS test, bench and fuzz target here uses.

use std::io;
use std::path::{Path, PathBuf};

pub use rcgen;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A certificate authority that signs test certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A signed certificate and its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The certificate, DER (to compute the subject name as a peer sees it).
    pub der: Vec<u8>,
}

/// Which end of a connection a credentials directory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A destination (`endpoint=server`): `server-cert.pem`.
    Server,
    /// A source (`endpoint=client`): `client-cert.pem`.
    Client,
}

impl Side {
    /// The file name prefix QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// A leaf certificate's parameters: common name `cn`, valid for `names` (host names or
/// IP addresses; none for a client), valid now.
///
/// # Panics
/// If a name is not one rcgen takes.
pub fn params(cn: &str, names: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("certificate names");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p
}

/// Makes `p` a certificate that expired long ago (2000–2001).
pub fn expired(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2001, 1, 1);
}

impl TestCa {
    /// A self-signed CA named `common_name`.
    ///
    /// # Panics
    /// If key generation fails.
    pub fn new(common_name: &str) -> TestCa {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let pem = p.self_signed(&key).expect("CA certificate").pem();
        TestCa {
            issuer: Issuer::new(p, key),
            pem,
        }
    }

    /// The CA's certificate, PEM (`ca-cert.pem`).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate with `params`, signed by this CA.
    ///
    /// # Panics
    /// If key generation or signing fails.
    pub fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A credentials directory `dir` for `side`: `leaf` and its key, with this CA as
    /// the one the side trusts. Returns `dir`.
    ///
    /// # Errors
    /// A file cannot be written.
    pub fn write_creds(&self, dir: &Path, side: Side, leaf: &Leaf) -> io::Result<PathBuf> {
        write_creds(dir, side, leaf, &self.pem)
    }

    /// A server directory (valid for 127.0.0.1 and localhost) and a client directory,
    /// both signed by and trusting this CA, under `dir`: `(server, client)`.
    ///
    /// # Errors
    /// A file cannot be written.
    pub fn write_pair(&self, dir: &Path) -> io::Result<(PathBuf, PathBuf)> {
        let server = self.sign(params("destination", &["127.0.0.1", "localhost"]));
        let client = self.sign(params("source", &[]));
        Ok((
            self.write_creds(&dir.join("server"), Side::Server, &server)?,
            self.write_creds(&dir.join("client"), Side::Client, &client)?,
        ))
    }
}

/// A credentials directory `dir` for `side`: `leaf` and its key, trusting the CA
/// certificate `ca_pem` (which need not be the one that signed `leaf`). Returns `dir`.
///
/// # Errors
/// A file cannot be written.
pub fn write_creds(dir: &Path, side: Side, leaf: &Leaf, ca_pem: &str) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca-cert.pem"), ca_pem)?;
    std::fs::write(
        dir.join(format!("{}-cert.pem", side.name())),
        &leaf.cert_pem,
    )?;
    std::fs::write(dir.join(format!("{}-key.pem", side.name())), &leaf.key_pem)?;
    Ok(dir.to_path_buf())
}
