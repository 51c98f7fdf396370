//! Target `tls`: a stream carried by a TLS session, as an authorized source's decrypted
//! bytes reach a destination, into the same destination as `stream`. The bytes are as
//! hostile behind TLS as before it, and the transport must not change what the loader
//! makes of them: it comes to the same verdict as from memory.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use qemu_file::{Listener, MigrationUri, QemuFile, TlsCreds, TlsEndpoint, connect_tls};
use savevm::error_chain;
use vmm_harness::test_ca::TestCa;

use crate::bounded::check_error;
use crate::streams::{load_all, load_all_from};

/// A destination's and a source's credentials from one CA, made once per process.
fn creds() -> &'static (TlsCreds, TlsCreds) {
    static CREDS: OnceLock<(TlsCreds, TlsCreds)> = OnceLock::new();
    CREDS.get_or_init(|| {
        // The source's write to a loader that stopped early must fail, not kill the
        // process: Rust programs ignore SIGPIPE from their own main, libFuzzer's main
        // does not.
        // SAFETY: setting SIGPIPE's disposition to ignore touches no memory of ours.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = scratch().join("pki");
        let (server, client) = TestCa::new("fuzz CA")
            .write_pair(&dir)
            .expect("credentials");
        (
            TlsCreds::load(&server, TlsEndpoint::Server, true).expect("server credentials"),
            TlsCreds::load(&client, TlsEndpoint::Client, true).expect("client credentials"),
        )
    })
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("fuzz-tls-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// Target `tls`.
pub fn tls(data: &[u8]) {
    static N: AtomicU64 = AtomicU64::new(0);
    let (server, client) = creds();
    let path = scratch().join(format!("{}.sock", N.fetch_add(1, Ordering::Relaxed)));
    let uri = MigrationUri::Unix(path);
    let listener = Listener::bind(&uri).expect("listen");
    let (bytes, client) = (data.to_vec(), client.clone());
    let source = thread::spawn(move || -> qemu_file::Result<()> {
        let mut f = QemuFile::new(connect_tls(&uri, &client, Some("localhost"))?);
        f.put_buffer(&bytes);
        f.finish()
    });
    let mut f = QemuFile::new(listener.accept_tls(server).expect("the handshake"));
    let over_tls = load_all_from(&mut f);
    // A loader that stopped early closes its end: the source's write fails, not hangs.
    drop(f);
    let _ = source.join();
    if let Err(e) = &over_tls {
        check_error(e);
    }
    let from_memory = load_all(data);
    assert_eq!(
        over_tls.is_ok(),
        from_memory.is_ok(),
        "over TLS: {:?}; from memory: {:?}",
        over_tls.as_ref().err().map(|e| error_chain(e)),
        from_memory.as_ref().err().map(|e| error_chain(e)),
    );
}
