//! Post-copy between two threads over a unix socket: a guest that writes faster than a
//! capped link carries never converges in pre-copy; switched to post-copy, its memory
//! arrives whole. The destination's "VMM" reads every page of the guest from the moment
//! of RUN (each read of a page not there yet waits for it, through the page requests),
//! and what it read must be the source's memory at the switch. Skipped where
//! userfaultfd is not allowed.

#[path = "../examples/common/mod.rs"]
mod common;

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{LAYOUT, Memory, hash, sections_with, start_guest};
use qemu_file::{QemuFile, UnixTransport};
use ram_list::{PostcopyIncoming, PostcopyIncomingInfo, Userfault};
use savevm::{MigrationControl, MigrationInfo, MigrationParams, MigrationStatus, run_migration};

/// When the source asks for post-copy.
#[derive(Clone, Copy)]
enum Switch {
    /// As soon as the migration runs: almost every page goes after the switch.
    AtOnce,
    /// After the first full pass (the usual way).
    AfterFirstPass,
}

struct Outcome {
    info: MigrationInfo,
    source_hash: u64,
    hash_at_run: u64,
    destination_hash: u64,
    incoming: PostcopyIncomingInfo,
}

/// RUN comes on the loading thread, which alone reads the pages: the guest's memory is
/// read from another thread.
struct HashAtRun {
    mem: Memory,
    tx: Mutex<mpsc::Sender<u64>>,
}

impl savevm::PostcopyHooks for HashAtRun {
    fn run(&mut self) -> Result<(), savevm::SectionError> {
        let (m, tx) = (self.mem.clone(), self.tx.lock().unwrap().clone());
        std::thread::spawn(move || tx.send(hash(&m)));
        Ok(())
    }
}

fn migrate(switch: Switch, cap: u64, postcopy_cap: u64) -> Option<Outcome> {
    if Userfault::new().is_err() {
        eprintln!("skipped: userfaultfd is not allowed here");
        return None;
    }
    let (a, b) = UnixStream::pair().unwrap();
    let incoming = Arc::new(PostcopyIncoming::new());
    let inc = incoming.clone();
    let destination = std::thread::spawn(move || {
        let mem = Memory::from_ranges(&LAYOUT).unwrap();
        let mut f = QemuFile::new(Box::new(UnixTransport::new(b, "unix:source".into())));
        let mut vm = sections_with(&mem, Some(inc.clone()));
        let (tx, rx) = mpsc::channel();
        vm.set_postcopy_hooks(Box::new(HashAtRun {
            mem: mem.clone(),
            tx: Mutex::new(tx),
        }));
        let loaded = vm.load(&mut f).expect("the load");
        assert!(loaded.postcopy, "the guest switched during the load");
        assert!(
            loaded.description.is_none(),
            "no description after post-copy"
        );
        loaded.return_path.unwrap().load_result(true).unwrap();
        let hash_at_run = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        (hash_at_run, hash(&mem), inc.info())
    });

    let mem = Memory::from_ranges(&LAYOUT).unwrap();
    let guest = start_guest(&mem);
    let mut params = MigrationParams::default();
    params.downtime_limit = Duration::from_millis(30);
    params.max_bandwidth = cap;
    params.max_postcopy_bandwidth = postcopy_cap;
    params.return_path = true;
    params.postcopy = true;
    let ctl = Arc::new(MigrationControl::new(params));
    let c = ctl.clone();
    let asker = std::thread::spawn(move || {
        let t0 = Instant::now();
        loop {
            let i = c.info();
            let ready = match switch {
                Switch::AtOnce => i.status == MigrationStatus::Active,
                Switch::AfterFirstPass => i.dirty_syncs >= 1,
            };
            if ready || i.status.is_terminal() || t0.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        c.start_postcopy().unwrap();
    });
    let mut f = QemuFile::new(Box::new(UnixTransport::new(a, "unix:destination".into())));
    let source = sections_with(&mem, Some(Arc::default()));
    let info = run_migration(&mut { source }, &mut f, &*guest.vm, &ctl).expect("the migration");
    asker.join().unwrap();
    guest.end();
    let (hash_at_run, destination_hash, incoming) = destination.join().unwrap();
    Some(Outcome {
        info,
        source_hash: hash(&mem),
        hash_at_run,
        destination_hash,
        incoming,
    })
}

fn check(o: &Outcome) {
    eprintln!(
        "{:?} in {:?}: {} requests, {} bytes after the switch; faults {:?}",
        o.info.status,
        o.info.total_time,
        o.info.postcopy_requests,
        o.info.postcopy_bytes,
        o.incoming.waits
    );
    assert_eq!(o.info.status, MigrationStatus::Completed);
    assert!(
        o.info.postcopy_started.is_some(),
        "it switched to post-copy"
    );
    assert_eq!(
        o.hash_at_run, o.source_hash,
        "what the destination read from RUN on is the source's memory at the switch"
    );
    assert_eq!(o.destination_hash, o.source_hash);
    assert!(
        o.incoming.listening && o.incoming.complete,
        "{:?}",
        o.incoming
    );
    assert!(o.info.postcopy_bytes > 0);
}

#[test]
fn a_guest_switched_at_once_arrives_whole_its_reads_waiting_for_their_pages() {
    // The background pass paced at 20 MB/s: the reads outrun it and ask.
    let Some(o) = migrate(Switch::AtOnce, 0, 20_000_000) else {
        return;
    };
    check(&o);
    // Nearly all of RAM came after the switch, much of it asked for.
    assert!(o.info.postcopy_requests > 0, "{:?}", o.info);
    assert!(o.incoming.waits.resolved > 0, "{:?}", o.incoming);
}

#[test]
fn a_guest_that_never_converges_under_a_cap_completes_in_post_copy() {
    // 40 MiB at 20 MB/s is two seconds a pass, while the guest dirties 256 MB/s.
    let Some(o) = migrate(Switch::AfterFirstPass, 20_000_000, 0) else {
        return;
    };
    check(&o);
}
