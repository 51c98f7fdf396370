//! Our destination against QEMU's source (`cargo xtask interop`), with multifd and over
//! TLS.
//!
//! QEMU runs the built-in guest (fill) and migrates it (multifd, or TLS with QEMU's own
//! `tls-creds-x509`, or both) to a listener of ours,
//! which loads only the RAM section, with our `MultifdReceiver`, into RAM blocks shaped
//! as QEMU's (names and sizes from `info ramblock`); when the RAM section has ended the
//! rest of the stream (device state ours cannot load) is read and dropped. Then pc.ram
//! is compared page by page with the source's memory (`pmemsave`, the guest stopped).
//! This checks our reading of QEMU 7.2's channels byte for byte: opening messages,
//! packet headers, page data (plain or zstd), rounds and their SYNC packets.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qemu_file::{Authz, Listener, MigrationUri, QemuFile, TlsCreds, TlsEndpoint};
use ram_list::{MultifdReceiver, RamBlock, RamList, RamSection, RamStats, RecvTarget};
use savevm::SectionHandler;
use savevm::format::{
    Configuration, FileHeader, Footer, FullHeader, QEMU_VM_CONFIGURATION, QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START,
};
use serde_json::json;
use vm_memory::MmapRegion;
use vmm_harness::Qmp;

use crate::bench::{Qemu, guest_image, qemu_start};
use crate::certs::TestPki;

/// QEMU's guest RAM here, MiB (the bench's 1 GiB guest).
pub(crate) const QEMU_MIB: u64 = 1024;

pub(crate) const PAGE: usize = 4096;
/// The legacy VGA and BIOS area, which `pmemsave` reads as ROM and MMIO, not pc.ram.
const LEGACY_HOLE: std::ops::Range<usize> = 0xa0000..0x100000;

/// Migrates QEMU's guest into our receiver with `channels` multifd channels (0: none),
/// plain or zstd, over TLS when `tls` (QEMU presents the client certificate, which our
/// side checks against its CA and, by name, against tls-authz).
///
/// # Errors
/// QEMU fails, the load fails, or memory differs.
pub fn run(
    qemu: &Path,
    work: &Path,
    channels: u8,
    zstd: bool,
    tls: Option<&TestPki>,
) -> Result<()> {
    let (_src, mut sq, list) = qemu_fill_source(qemu, work, "interop-src", "256M")?;
    let listener = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0")?)?;
    let uri = listener.local_uri().to_string();
    let stats = Arc::new(RamStats::default());
    let creds = match tls {
        Some(pki) => {
            let creds = qemu_source_tls(&mut sq, pki)?;
            Some(creds.with_authz(Authz::simple("auth0", &pki.client_name))?)
        }
        None => None,
    };
    let loader = {
        let (list, stats) = (list.clone(), stats.clone());
        std::thread::spawn(move || load_ram(listener, channels, zstd, creds, list, stats))
    };
    if channels > 0 {
        sq.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        );
        sq.cmd(
            "migrate-set-parameters",
            json!({"multifd-channels": channels,
                   "multifd-compression": if zstd { "zstd" } else { "none" }}),
        );
    }
    sq.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 10_000_000_000u64}),
    );
    sq.cmd("migrate", json!({"uri": uri}));
    let t = Instant::now();
    loop {
        let m = sq.cmd("query-migrate", json!({}));
        match m["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => {
                let ours = loader
                    .join()
                    .map_err(|_| anyhow::anyhow!("the loader panicked"))?;
                bail!("QEMU's migration ended: {m}; our side: {ours:?}");
            }
            _ if t.elapsed() > Duration::from_secs(60) => bail!("QEMU's migration hangs: {m}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let channel_bytes = loader
        .join()
        .map_err(|_| anyhow::anyhow!("the loader panicked"))??;
    let (differ, _) = differing_pages(&mut sq, &list, &work.join("interop-src-ram.fifo"))?;
    let s = stats.snapshot();
    println!(
        "interop: QEMU -> ours{}, multifd {channels} channels{}: {} normal pages ({:.1} MiB on the channels), {} zero pages; pc.ram pages differing from QEMU's memory: {differ}",
        if tls.is_some() {
            " over TLS (QEMU's tls-creds-x509, our tls-authz)"
        } else {
            ""
        },
        if zstd { " + zstd" } else { "" },
        s.normal,
        channel_bytes as f64 / (1u64 << 20) as f64,
        s.duplicate
    );
    let _ = sq.try_cmd("quit", json!({}));
    if differ > 0 || s.normal == 0 {
        bail!("our load of QEMU's migration differs from QEMU's memory");
    }
    Ok(())
}

/// Makes QEMU's source (`sq`) migrate over TLS with its own tls-creds-x509 from `pki`'s
/// client directory; returns the server credentials our side checks it with.
pub(crate) fn qemu_source_tls(sq: &mut Qmp, pki: &TestPki) -> Result<TlsCreds> {
    sq.cmd(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0",
               "dir": pki.client.display().to_string(), "endpoint": "client"}),
    );
    sq.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    Ok(TlsCreds::load(&pki.server, TlsEndpoint::Server, true)?)
}

/// QEMU running the built-in guest's fill of `range`, once it finished, and RAM blocks
/// shaped as QEMU's to load its migration into.
pub(crate) fn qemu_fill_source(
    qemu: &Path,
    work: &Path,
    name: &str,
    range: &str,
) -> Result<(Qemu, Qmp, Arc<RamList>)> {
    std::fs::create_dir_all(work)?;
    let image = guest_image(work, "fill", range, 0, None)?;
    let (src, mut sq) = qemu_start(qemu, work, name, &image, QEMU_MIB, &[])?;
    let serial = work.join(format!("{name}-serial.txt"));
    let t = Instant::now();
    while std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) < 2 {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the guest did not finish its fill under QEMU");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let list = ram_like(&mut sq)?;
    Ok((src, sq, list))
}

/// The pages of our pc.ram that differ from QEMU's memory, and pc.ram's size.
///
/// QEMU's `pmemsave` writes into a FIFO at `fifo` that a thread of ours reads, so a
/// guest's worth of memory (1 GiB here) never lands on disk: CI machines may have
/// little room left once everything is built, and a full disk made `pmemsave` fail
/// with QEMU's bare "An IO error has occurred". The legacy hole is left out.
pub(crate) fn differing_pages(sq: &mut Qmp, list: &RamList, fifo: &Path) -> Result<(usize, u64)> {
    let ram = list.find("pc.ram").context("QEMU has no pc.ram")?;
    let len = ram.used_length();
    let _ = std::fs::remove_file(fifo);
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("making the FIFO {} for pmemsave: {e}", fifo.display());
    }
    let reader = {
        let fifo = fifo.to_path_buf();
        std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
            let mut theirs = Vec::with_capacity(len as usize);
            std::io::Read::read_to_end(&mut std::fs::File::open(fifo)?, &mut theirs)?;
            Ok(theirs)
        })
    };
    let saved = sq.try_cmd(
        "pmemsave",
        json!({"val": 0, "size": len, "filename": fifo.display().to_string()}),
    );
    if saved.is_err() {
        // QEMU may never have opened the FIFO: open and close its writing end ourselves
        // (without blocking; until the reader is in its open) so the reader sees the end.
        use std::os::unix::fs::OpenOptionsExt;
        let t = Instant::now();
        while !reader.is_finished() && t.elapsed() < Duration::from_secs(10) {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fifo);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Err(e) = saved {
        if reader.is_finished() {
            let _ = reader.join();
        }
        let _ = std::fs::remove_file(fifo);
        bail!("QEMU's pmemsave of pc.ram ({len} bytes) failed: {e}");
    }
    let theirs = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the pmemsave reader panicked"));
    let _ = std::fs::remove_file(fifo);
    let theirs = theirs?.context("reading QEMU's pmemsave")?;
    if theirs.len() as u64 != len {
        bail!(
            "QEMU's pmemsave wrote {} bytes of pc.ram's {len}",
            theirs.len()
        );
    }
    let mut ours = vec![0u8; len as usize];
    ram.read_bytes(0, &mut ours);
    let differ = theirs
        .chunks(PAGE)
        .zip(ours.chunks(PAGE))
        .enumerate()
        .filter(|(i, (a, b))| !LEGACY_HOLE.contains(&(i * PAGE)) && a != b)
        .count();
    Ok((differ, len))
}

/// QEMU's RAM blocks (`info ramblock`): name and used length.
pub(crate) fn qemu_blocks(q: &mut Qmp) -> Result<Vec<(String, u64)>> {
    let text = q.cmd(
        "human-monitor-command",
        json!({"command-line": "info ramblock"}),
    );
    let text = text.as_str().unwrap_or_default().to_string();
    let mut blocks = Vec::new();
    // Rows: name, page size value and unit, offset, used, total.
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let [name, _, _, _, used, ..] = cols[..] else {
            continue;
        };
        let used = u64::from_str_radix(used.trim_start_matches("0x"), 16)
            .with_context(|| format!("info ramblock: {line:?}"))?;
        blocks.push((name.to_string(), used));
    }
    if !blocks.iter().any(|(n, _)| n == "pc.ram") {
        bail!("info ramblock lists no pc.ram: {text}");
    }
    Ok(blocks)
}

/// RAM blocks named and sized as QEMU's, to load its migration into.
fn ram_like(q: &mut Qmp) -> Result<Arc<RamList>> {
    let list = Arc::new(RamList::new());
    for (name, used) in qemu_blocks(q)? {
        let host = Arc::new(MmapRegion::<()>::new(used as usize)?);
        list.add(RamBlock::new(name, host, Box::new(()))?)?;
    }
    Ok(list)
}

/// Accepts QEMU's main stream and channels, loads the RAM section and drops the rest.
/// Returns the bytes the channels carried.
fn load_ram(
    listener: Listener,
    channels: u8,
    zstd: bool,
    tls: Option<TlsCreds>,
    list: Arc<RamList>,
    stats: Arc<RamStats>,
) -> Result<u64> {
    let accepted = match &tls {
        Some(creds) => listener.accept_tls_with_channels(channels.into(), creds)?,
        None => listener.accept_with_channels(channels.into())?,
    };
    let (main, extra) = (accepted.main, accepted.channels);
    let mut f = QemuFile::new(main);
    if extra.is_empty() {
        let mut ram = RamSection::new(list, stats);
        ram.load_setup().map_err(|e| anyhow::anyhow!("{e}"))?;
        read_ram_sections(&mut f, &mut ram)?;
        return Ok(0);
    }
    let mut target = RecvTarget::new(list.clone(), stats.clone(), [0; 16]);
    target.compressed = zstd;
    let receiver = Arc::new(MultifdReceiver::start(extra, target, f.shutdown_handle())?);
    let mut ram = RamSection::new(list, stats).with_multifd_receiver(receiver.clone());
    ram.load_setup().map_err(|e| anyhow::anyhow!("{e}"))?;
    let r = read_ram_sections(&mut f, &mut ram);
    receiver.finish();
    match (r, receiver.error()) {
        (Err(e), Some(c)) => Err(anyhow::Error::from(c).context(e)),
        (r, _) => r.map(|()| receiver.bytes_read()),
    }
}

fn read_ram_sections(f: &mut QemuFile, ram: &mut RamSection) -> Result<()> {
    FileHeader::read_from(f)?;
    let mut ram_id = None;
    loop {
        let ty = f.get_u8()?;
        match ty {
            QEMU_VM_CONFIGURATION => {
                Configuration::read_from(f)?;
            }
            QEMU_VM_SECTION_START => {
                let h = FullHeader::read_from(f)?;
                if h.idstr != "ram" {
                    bail!("a live section ours does not know: {:?}", h.idstr);
                }
                ram_id = Some(h.section_id);
                ram.load(f, h.version_id)
                    .map_err(|e| anyhow::anyhow!("{}", savevm::error_chain(&*e)))?;
                Footer::read_from(f, h.section_id, "ram")?;
            }
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                let id = f.get_be32()?;
                if Some(id) != ram_id {
                    bail!("a PART or END of section {id}, not RAM's");
                }
                ram.load(f, ram_list::RAM_SECTION_VERSION)
                    .map_err(|e| anyhow::anyhow!("{}", savevm::error_chain(&*e)))?;
                Footer::read_from(f, id, "ram")?;
                if ty == QEMU_VM_SECTION_END {
                    // RAM is whole: the device state that follows is not ours to load.
                    while f.try_get_u8()?.is_some() {}
                    return Ok(());
                }
            }
            other => bail!("record type {other:#04x} before the RAM section ended"),
        }
    }
}

/// QEMU 7.2 as a TLS destination whose `authz-simple` names our source's certificate as
/// vmm writes the name (`qemu_file::subject_name`): QEMU must let it in, and must refuse
/// the same name with its RDNs in the other order. This checks that tls-authz rules
/// written for QEMU mean the same to vmm.
///
/// # Errors
/// QEMU refuses the name vmm writes, or lets in the other one.
pub fn authz_names_match_qemus(qemu: &Path, work: &Path, pki: &TestPki) -> Result<()> {
    let image = guest_image(work, "fill", "64M", 0, None)?;
    for (name, identity, allowed) in [
        ("authz-ours", &pki.client_name, true),
        ("authz-reversed", &pki.client_name_reversed, false),
    ] {
        let (mut dst, mut q) = qemu_start(
            qemu,
            work,
            name,
            &image,
            QEMU_MIB,
            &["-incoming".into(), "defer".into()],
        )?;
        q.cmd(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
                   "dir": pki.server.display().to_string(), "verify-peer": true}),
        );
        q.cmd(
            "object-add",
            json!({"qom-type": "authz-simple", "id": "auth0", "identity": identity}),
        );
        q.cmd(
            "migrate-set-parameters",
            json!({"tls-creds": "tls0", "tls-authz": "auth0"}),
        );
        q.cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
        let m = q.cmd("query-migrate", json!({}));
        let port = m["socket-address"][0]["port"]
            .as_str()
            .and_then(|p| p.parse::<u16>().ok())
            .with_context(|| format!("QEMU's incoming port: {m}"))?;
        let creds = TlsCreds::load(&pki.client, TlsEndpoint::Client, true)?;
        let uri = MigrationUri::parse(&format!("tcp:127.0.0.1:{port}"))?;
        // A header and nothing more: let in, QEMU fails to load it; refused, it says so.
        let mut f = QemuFile::new(qemu_file::connect_tls(&uri, &creds, None)?);
        f.put_be32(0x5145_564d);
        f.put_be32(3);
        let _ = f.finish();
        let stderr = work.join(format!("{name}-stderr.txt"));
        let t = Instant::now();
        let text = loop {
            let text = std::fs::read_to_string(&stderr).unwrap_or_default();
            let exited = dst.0.try_wait()?.is_some();
            if text.contains("is denied") || exited || t.elapsed() > Duration::from_secs(10) {
                break text;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let denied = text.contains("authz check") && text.contains("is denied");
        // Let in, QEMU reads the header and fails on what is missing after it.
        let loaded = text.contains("load") || text.contains("migration");
        println!(
            "interop: ours -> QEMU over TLS, QEMU's authz-simple identity={identity:?}: {} (QEMU: {})",
            if denied { "denied" } else { "let in" },
            text.lines().last().unwrap_or_default()
        );
        if !denied && !loaded {
            bail!("QEMU neither refused nor read our stream: {}", text.trim());
        }
        if denied == allowed {
            bail!(
                "QEMU {} the name {identity:?}, which vmm {}: {}",
                if denied { "refused" } else { "let in" },
                if allowed {
                    "writes for this certificate"
                } else {
                    "does not write"
                },
                text.trim()
            );
        }
        drop(dst);
    }
    Ok(())
}
