//! Our post-copy source against QEMU 7.2's post-copy destination (`cargo xtask interop`).
//!
//! QEMU waits with `-incoming defer` and `-S` (the guest never runs there: our devices
//! are not QEMU's). Ours sends only RAM, in blocks named and sized as QEMU's: pc.ram
//! with a pattern that a writer thread keeps changing during pre-copy (logged as a
//! guest's writes are), the others zero, under QEMU's machine type. At 50 MB/s the
//! switch comes a second in, most of pc.ram unsent: the discards, an empty package
//! (LISTEN, PING 3, RUN), then the pages. Meanwhile QEMU's monitor reads pc.ram
//! (`xp`) near its end, pages not there yet, each read a fault that QEMU's fault thread
//! turns into a request that ours must serve, and each value read must be ours. At the
//! end QEMU answers SHUT; its memory (`pmemsave`) must equal ours. This checks QEMU's
//! reading of our post-copy stream and our serving of its requests, byte for byte. With
//! `postcopy-preempt` ours opens a second connection after the main one, which QEMU
//! takes for its preempt channel, and the pages QEMU asks for go on it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use dirty_bitmap::VmmWriteLog;
use qemu_file::{MigrationUri, QemuFile, TlsCreds, TlsEndpoint, connect, connect_tls};
use ram_list::{PostcopyIncoming, RamBlock, RamList, RamSection, RamStats, RegionBacking};
use savevm::{
    MigrationControl, MigrationParams, MigrationStatus, SaveVm, SectionError, VmControl,
    run_migration,
};
use serde_json::json;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, MmapRegion};

use crate::bench::{guest_image, qemu_start};
use crate::certs::TestPki;
use crate::interop::{PAGE, QEMU_MIB, differing_pages, qemu_blocks};

type Memory = GuestMemoryMmap<AtomicBitmap>;

/// The source "VM": a writer thread in place of vCPUs.
struct Writer {
    /// Held by the writer while it writes; taken to know it stopped.
    busy: Mutex<()>,
    stopped: AtomicBool,
}

impl VmControl for Writer {
    fn stop_vcpus(&self) -> Result<(), SectionError> {
        self.stopped.store(true, Ordering::SeqCst);
        drop(self.busy.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(())
    }

    fn resume_vcpus(&self) -> Result<(), SectionError> {
        self.stopped.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Pages the writer rewrites, every 61st page of the first half of pc.ram.
const WRITTEN_EVERY: u64 = 61;

/// The starting pattern: most pages carry their own address, one in eight is zero.
fn fill(mem: &Memory, len: u64) -> Result<()> {
    for page in (0..len / PAGE as u64).filter(|p| p % 8 != 3) {
        let a = page * PAGE as u64;
        mem.write_obj(a ^ 0x5a5a_0000_0000, GuestAddress(a))?;
        mem.write_obj(!a, GuestAddress(a + PAGE as u64 - 8))?;
    }
    Ok(())
}

/// Rewrites pages of the first half of pc.ram until the VM stops.
fn write_until_stopped(mem: Memory, vm: Arc<Writer>, len: u64, quit: Arc<AtomicBool>) -> u64 {
    let pages = len / PAGE as u64 / 2;
    let mut n = 0u64;
    while !quit.load(Ordering::SeqCst) {
        {
            let _busy = vm.busy.lock().unwrap_or_else(|p| p.into_inner());
            if !vm.stopped.load(Ordering::SeqCst) {
                let page = (n * WRITTEN_EVERY) % pages;
                let _ = mem.write_obj(n, GuestAddress(page * PAGE as u64 + 64));
                n += 1;
            }
        }
        if n % 64 == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    n
}

/// Our RAM shaped as QEMU's blocks, pc.ram logged as a guest's writes are.
fn ram_like(blocks: &[(String, u64)]) -> Result<(Memory, Arc<RamList>, u64)> {
    let len = blocks
        .iter()
        .find(|(n, _)| n == "pc.ram")
        .map(|(_, l)| *l)
        .context("QEMU has no pc.ram")?;
    let mem = Memory::from_ranges(&[(GuestAddress(0), len as usize)])?;
    let list = Arc::new(RamList::new());
    for (name, used) in blocks {
        let block = if name == "pc.ram" {
            let backing = RegionBacking::new(&mem, 0).context("one region")?;
            let log = VmmWriteLog::for_region(&mem, 0).context("one region")?;
            RamBlock::new(name.as_str(), Arc::new(backing), Box::new(log))?
        } else {
            let host = Arc::new(MmapRegion::<()>::new(*used as usize)?);
            RamBlock::new(name.as_str(), host, Box::new(()))?
        };
        list.add(block)?;
    }
    Ok((mem, list, len))
}

/// QEMU's name for `-machine pc` (the stream's configuration section must carry it).
fn machine_type(q: &mut vmm_harness::Qmp) -> Result<String> {
    let machines = q.cmd("query-machines", json!({}));
    machines
        .as_array()
        .and_then(|l| l.iter().find(|m| m["alias"] == "pc"))
        .and_then(|m| m["name"].as_str())
        .map(str::to_string)
        .context("QEMU names no machine type `pc`")
}

/// What QEMU's monitor reads at guest address `a` (`xp /1xg`).
fn qemu_reads(q: &mut vmm_harness::Qmp, a: u64) -> Result<u64> {
    let out = q.cmd(
        "human-monitor-command",
        json!({"command-line": format!("xp /1xg {a:#x}")}),
    );
    let text = out.as_str().unwrap_or_default();
    text.rsplit_once(':')
        .and_then(|(_, v)| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok())
        .with_context(|| format!("xp printed {text:?}"))
}

/// Migrates our RAM into QEMU's post-copy destination and compares pc.ram; with
/// `preempt`, `postcopy-preempt` on both sides.
///
/// # Errors
/// QEMU or ours fails, a value QEMU read is not ours, the memories differ, or
/// (`preempt`) nothing went on the preempt connection.
pub fn run(qemu: &Path, work: &Path, tls: Option<&TestPki>, preempt: bool) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let image = guest_image(work, "fill", "64M", 0, None)?;
    let args: Vec<String> = ["-incoming", "defer", "-S", "-msg", "timestamp=on"]
        .map(String::from)
        .to_vec();
    let (_dst, mut dq) = qemu_start(qemu, work, "postcopy-dst", &image, QEMU_MIB, &args)?;
    dq.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true},
                                {"capability": "postcopy-preempt", "state": preempt}]}),
    );
    if let Some(pki) = tls {
        // QEMU's destination with its own tls-creds-x509, checking ours.
        dq.cmd(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
                   "dir": pki.server.display().to_string(), "verify-peer": true}),
        );
        dq.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    dq.cmd("migrate-incoming", json!({"uri": uri}));

    let (mem, list, len) = ram_like(&qemu_blocks(&mut dq)?)?;
    fill(&mem, len)?;
    let mut savevm = SaveVm::new(machine_type(&mut dq)?);
    let ram = RamSection::new(list.clone(), Arc::new(RamStats::default()))
        .with_postcopy(Arc::new(PostcopyIncoming::new()));
    savevm.register_live(RamSection::info(), Box::new(ram))?;
    let mut params = MigrationParams::default();
    params.max_bandwidth = 50_000_000;
    params.return_path = true;
    params.postcopy = true;
    params.postcopy_preempt = preempt;
    let ctl = Arc::new(MigrationControl::new(params));

    let vm = Arc::new(Writer {
        busy: Mutex::new(()),
        stopped: AtomicBool::new(false),
    });
    let quit = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mem, vm, quit) = (mem.clone(), vm.clone(), quit.clone());
        std::thread::spawn(move || write_until_stopped(mem, vm, len, quit))
    };
    let target = MigrationUri::parse(&uri)?;
    let creds = tls
        .map(|pki| TlsCreds::load(&pki.client, TlsEndpoint::Client, true))
        .transpose()?;
    let open = || match &creds {
        Some(c) => connect_tls(&target, c, None),
        None => connect(&target),
    };
    let mut f = QemuFile::new(open()?);
    if preempt {
        // After the main stream: QEMU goes by the order.
        ctl.set_preempt_channel(QemuFile::new(open()?));
    }
    let migration = {
        let (ctl, vm) = (ctl.clone(), vm.clone());
        std::thread::spawn(move || run_migration(&mut savevm, &mut f, &*vm, &ctl))
    };
    std::thread::sleep(Duration::from_secs(1));
    let switched = ctl
        .start_postcopy()
        .map_err(|e| anyhow!("migrate-start-postcopy: {e}"));
    let t = Instant::now();
    while switched.is_ok() && ctl.info().status != MigrationStatus::PostcopyActive {
        if ctl.info().status.is_terminal() || t.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if switched.is_err() || ctl.info().status != MigrationStatus::PostcopyActive {
        let ended = migration
            .join()
            .map_err(|_| anyhow!("our migration thread panicked"))?;
        bail!("no post-copy into QEMU: {switched:?}; ours ended {ended:?}");
    }
    // QEMU's guest would run from RUN on; its monitor reads only once QEMU listens (its
    // status turns postcopy-active once its RAM is registered with userfaultfd): a read
    // before that maps the zero page, which the page's arrival then finds in its way.
    let t = Instant::now();
    loop {
        let status = dq.cmd("query-migrate", json!({}))["status"].clone();
        if status == "postcopy-active" {
            break;
        }
        if status != "active" || t.elapsed() > Duration::from_secs(30) {
            bail!("QEMU's destination is {status} after our switch, not postcopy-active");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Pages near the end of pc.ram, the last the background pass reaches, at the words
    // `fill` wrote (a page read as zeros shows).
    let read = AtomicU64::new(0);
    for i in 1..=16u64 {
        let a = len - i * 977 * PAGE as u64 + (i % 2) * (PAGE as u64 - 8);
        let theirs = qemu_reads(&mut dq, a)?;
        let mut ours = [0u8; 8];
        mem.read_slice(&mut ours, GuestAddress(a))?;
        if theirs != u64::from_le_bytes(ours) {
            bail!(
                "QEMU read {theirs:#x} at {a:#x} during post-copy; ours is {:#x}",
                u64::from_le_bytes(ours)
            );
        }
        read.fetch_add(1, Ordering::Relaxed);
    }
    // A post-copy that breaks pauses, waiting for a resume: none comes here.
    while !migration.is_finished() {
        let i = ctl.info();
        if i.status == MigrationStatus::PostcopyPaused {
            ctl.cancel();
            // What QEMU's side says, to tell its stall from ours.
            let theirs = dq.try_cmd("query-migrate", json!({}));
            let stderr = std::fs::read_to_string(work.join("postcopy-dst-stderr.txt"));
            bail!(
                "our post-copy into QEMU paused: {:?}; QEMU's query-migrate: {theirs:?}; \
                 QEMU's stderr: {:?}",
                i.error,
                stderr.unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = migration
        .join()
        .map_err(|_| anyhow!("our migration thread panicked"))?
        .context("our post-copy migration into QEMU")?;
    quit.store(true, Ordering::SeqCst);
    let writes = writer.join().map_err(|_| anyhow!("the writer panicked"))?;
    let t = Instant::now();
    let status = loop {
        let m = dq.cmd("query-migrate", json!({}));
        if m["status"] != "postcopy-active" || t.elapsed() > Duration::from_secs(30) {
            break m["status"].clone();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (differ, _) = differing_pages(&mut dq, &list, &work.join("postcopy-dst-ram.fifo"))?;
    println!(
        "interop: ours post-copy{} -> QEMU{}: {} requests from QEMU served, {} bytes after \
         the switch ({} on the preempt connection), {writes} writes during pre-copy, QEMU's \
         monitor read {} values during post-copy, all ours; QEMU's status {status}; pc.ram \
         pages differing from ours: {differ}",
        if preempt { " preempt" } else { "" },
        if tls.is_some() { " over TLS" } else { "" },
        info.postcopy_requests,
        info.postcopy_bytes,
        info.postcopy_preempt_bytes,
        read.load(Ordering::Relaxed),
    );
    let _ = dq.try_cmd("quit", json!({}));
    if status != "completed" {
        bail!("QEMU's destination ended {status}");
    }
    if differ > 0 {
        bail!("QEMU's memory after our post-copy differs from ours");
    }
    if info.postcopy_requests == 0 {
        bail!("QEMU asked for no page after the switch: the request path went untested");
    }
    if preempt != (info.postcopy_preempt_bytes > 0) {
        bail!(
            "{} bytes went on the preempt connection, with postcopy-preempt {}",
            info.postcopy_preempt_bytes,
            if preempt { "on" } else { "off" }
        );
    }
    Ok(())
}
