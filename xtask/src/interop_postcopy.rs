//! Our post-copy destination against QEMU 7.2's post-copy source (`cargo xtask interop`).
//!
//! QEMU runs the built-in guest (fill), migrates it with `postcopy-ram` at 50 MB/s and
//! switches with `migrate-start-postcopy` a second in, most of RAM still unsent. Ours
//! loads only RAM, in blocks shaped as QEMU's: ADVISE, the discards, the package (whose
//! LISTEN registers our RAM with userfaultfd; the devices in it are not ours to load),
//! then the pages. A thread of ours reads pc.ram from its end while they arrive, each
//! read of a page not there yet a request on the return path that QEMU must serve; at
//! EOF ours answers SHUT and QEMU completes. pc.ram must then equal QEMU's memory
//! (`pmemsave`). This checks our reading of QEMU's post-copy commands and QEMU's
//! reading of our page requests, byte for byte. With `postcopy-preempt` QEMU opens a
//! second connection after the main one, and the pages we ask for must come on it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use qemu_file::{Listener, MigrationUri, QemuFile, TlsCreds};
use ram_list::{PostcopyIncoming, RamList, RamSection, RamStats};
use savevm::SectionHandler;
use savevm::format::{
    Configuration, FileHeader, Footer, FullHeader, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING,
    QEMU_VM_COMMAND, QEMU_VM_CONFIGURATION, QEMU_VM_EOF, QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
};
use savevm::postcopy::{
    MIG_CMD_PACKAGED, MIG_CMD_POSTCOPY_ADVISE, MIG_CMD_POSTCOPY_LISTEN,
    MIG_CMD_POSTCOPY_RAM_DISCARD, read_advise, read_discard, read_packaged,
};
use savevm::return_path::ReturnPath;
use serde_json::json;

use crate::certs::TestPki;
use crate::interop::{PAGE, differing_pages, qemu_fill_source, qemu_source_tls};

/// Migrates QEMU's guest into our post-copy destination and compares pc.ram; with
/// `preempt`, `postcopy-preempt` on both sides.
///
/// # Errors
/// QEMU or ours fails, the memories differ, or (`preempt`) no page came on the preempt
/// connection.
pub fn run(qemu: &Path, work: &Path, tls: Option<&TestPki>, preempt: bool) -> Result<()> {
    let (_src, mut sq, list) = qemu_fill_source(qemu, work, "postcopy-src", "512M")?;
    let creds = tls.map(|pki| qemu_source_tls(&mut sq, pki)).transpose()?;
    let listener = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0")?)?;
    let uri = listener.local_uri().to_string();
    let incoming = Arc::new(PostcopyIncoming::new());
    let loader = {
        let (list, incoming) = (list.clone(), incoming.clone());
        std::thread::spawn(move || load(listener, creds, list, incoming, preempt))
    };
    sq.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true},
                                {"capability": "postcopy-preempt", "state": preempt}]}),
    );
    sq.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 50_000_000}),
    );
    sq.cmd("migrate", json!({"uri": uri}));
    std::thread::sleep(Duration::from_secs(1));
    sq.cmd("migrate-start-postcopy", json!({}));
    let t = Instant::now();
    let end = loop {
        let m = sq.cmd("query-migrate", json!({}));
        match m["status"].as_str() {
            Some("completed") => break m,
            Some("failed" | "cancelled" | "postcopy-paused") => {
                let ours = loader.join().map_err(|_| anyhow!("the loader panicked"))?;
                bail!("QEMU's post-copy ended: {m}; our side: {ours:?}");
            }
            _ if t.elapsed() > Duration::from_secs(120) => bail!("QEMU's post-copy hangs: {m}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let read_back = loader
        .join()
        .map_err(|_| anyhow!("the loader panicked"))??;
    let (differ, len) = differing_pages(&mut sq, &list, &work.join("postcopy-src-ram.fifo"))?;
    let info = incoming.info();
    let w = info.waits;
    println!(
        "interop: QEMU post-copy{} -> ours{}: QEMU counted {} requests and {} bytes after the \
         switch; our reader's faults: {} asked, {} served (p50 {} us, p99 {} us), {} pages on \
         the preempt connection; pc.ram pages differing from QEMU's memory: {differ}",
        if preempt { " preempt" } else { "" },
        if tls.is_some() { " over TLS" } else { "" },
        end["ram"]["postcopy-requests"],
        end["ram"]["postcopy-bytes"],
        w.requests,
        w.resolved,
        w.p50_us,
        w.p99_us,
        info.preempt_pages,
    );
    let _ = sq.try_cmd("quit", json!({}));
    if differ > 0 || read_back as u64 != len {
        bail!("our post-copy load of QEMU's migration differs from QEMU's memory");
    }
    if w.resolved == 0 || end["ram"]["postcopy-requests"].as_u64() == Some(0) {
        bail!("no page was asked for after the switch: the request path went untested");
    }
    if preempt != (info.preempt_pages > 0) {
        bail!(
            "{} pages came on the preempt connection, with postcopy-preempt {}",
            info.preempt_pages,
            if preempt { "on" } else { "off" }
        );
    }
    Ok(())
}

/// Accepts QEMU's stream (and, with `preempt`, its preempt connection, which comes
/// second) and loads its RAM in post-copy; returns how many bytes of pc.ram the reader
/// thread read while pages arrived.
fn load(
    listener: Listener,
    tls: Option<TlsCreds>,
    list: Arc<RamList>,
    incoming: Arc<PostcopyIncoming>,
    preempt: bool,
) -> Result<usize> {
    let mut accepted = listener.accept_in_order(
        1 + usize::from(preempt),
        tls.as_ref(),
        Duration::from_secs(10),
    )?;
    let second = (accepted.len() > 1).then(|| QemuFile::new(accepted.remove(1)));
    let mut f = QemuFile::new(accepted.remove(0));
    if let Some(p) = second {
        incoming.set_preempt_channel(p, f.shutdown_handle())?;
    }
    let mut ram =
        RamSection::new(list.clone(), Arc::new(RamStats::default())).with_postcopy(incoming);
    ram.load_setup().map_err(|e| anyhow!("{e}"))?;
    let section = |e: savevm::SectionError| anyhow!("{}", savevm::error_chain(&*e));
    FileHeader::read_from(&mut f)?;
    let mut ram_id = None;
    let mut rp: Option<Arc<ReturnPath>> = None;
    let mut reader = None;
    loop {
        let ty = f.get_u8()?;
        match ty {
            QEMU_VM_CONFIGURATION => {
                Configuration::read_from(&mut f)?;
            }
            QEMU_VM_COMMAND => {
                let (cmd, len) = (f.get_be16()?, f.get_be16()?);
                match cmd {
                    MIG_CMD_OPEN_RETURN_PATH => {
                        rp = Some(Arc::new(ReturnPath::new(f.return_path()?)));
                    }
                    MIG_CMD_PING => {
                        let v = f.get_be32()?;
                        rp.as_ref()
                            .context("a PING before OPEN_RETURN_PATH")?
                            .pong(v)?;
                    }
                    MIG_CMD_POSTCOPY_ADVISE => {
                        read_advise(&mut f, len)?.context("an advise without RAM")?;
                        ram.load_postcopy_advise().map_err(section)?;
                    }
                    MIG_CMD_POSTCOPY_RAM_DISCARD => {
                        let (block, ranges) = read_discard(&mut f, len)?;
                        if !ram
                            .load_postcopy_discard(&block, &ranges)
                            .map_err(section)?
                        {
                            bail!("a discard for block {block:?}, which QEMU did not list");
                        }
                    }
                    MIG_CMD_PACKAGED => {
                        // LISTEN first; the devices after it are QEMU's, not ours.
                        let mut p = QemuFile::from_bytes(read_packaged(&mut f, len)?);
                        let (t, c, l) = (p.get_u8()?, p.get_be16()?, p.get_be16()?);
                        if (t, c, l) != (QEMU_VM_COMMAND, MIG_CMD_POSTCOPY_LISTEN, 0) {
                            bail!("the package does not open with LISTEN: {t:#x} {c} {l}");
                        }
                        let rp = rp.as_ref().context("LISTEN before OPEN_RETURN_PATH")?;
                        ram.load_postcopy_listen(rp).map_err(section)?;
                        reader = Some(read_from_the_end(&list)?);
                    }
                    other => bail!("a command ours does not take here: {other} ({len} bytes)"),
                }
            }
            QEMU_VM_SECTION_START => {
                let h = FullHeader::read_from(&mut f)?;
                if h.idstr != "ram" {
                    bail!("a live section ours does not know: {:?}", h.idstr);
                }
                ram_id = Some(h.section_id);
                ram.load(&mut f, h.version_id).map_err(section)?;
                Footer::read_from(&mut f, h.section_id, "ram")?;
            }
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                let id = f.get_be32()?;
                if Some(id) != ram_id {
                    bail!("a PART or END of section {id}, not RAM's");
                }
                ram.load(&mut f, ram_list::RAM_SECTION_VERSION)
                    .map_err(section)?;
                Footer::read_from(&mut f, id, "ram")?;
            }
            QEMU_VM_EOF => break,
            other => bail!("record type {other:#04x} in QEMU's post-copy stream"),
        }
    }
    ram.load_cleanup(true).map_err(section)?;
    rp.context("no return path")?.load_result(true)?;
    reader
        .context("the stream had no package")?
        .join()
        .map_err(|_| anyhow!("the reader panicked"))
}

/// A thread reading pc.ram a page at a time from its end (where QEMU's background pass
/// comes last): each page not there yet waits for its request to be served.
fn read_from_the_end(list: &RamList) -> Result<std::thread::JoinHandle<usize>> {
    let ram = list.find("pc.ram").context("no pc.ram")?;
    Ok(std::thread::spawn(move || {
        let mut page = [0u8; PAGE];
        let pages = ram.used_length() as usize / PAGE;
        for p in (0..pages).rev() {
            ram.read_bytes((p * PAGE) as u64, &mut page);
        }
        pages * PAGE
    }))
}
