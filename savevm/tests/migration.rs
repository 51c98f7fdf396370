//! The migration thread against a fake VM whose guest keeps writing.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::{FakeVm, Uart, UartSection, Words, WordsSection};
use qemu_file::{MemTransport, QemuFile, Transport, mem_channel};
use savevm::{
    Error, MigrationControl, MigrationParams, MigrationStatus, SaveVm, SectionInfo, return_path,
    run_migration,
};

const WORDS: usize = 1 << 14;

struct Source {
    mem: Arc<Words>,
    vm: Arc<FakeVm>,
    savevm: SaveVm,
    cleanups: Arc<std::sync::atomic::AtomicU32>,
}

fn source(writes_per_ms: usize) -> Source {
    let mem = Words::new(WORDS);
    let vm = FakeVm::new(mem.clone(), writes_per_ms);
    let mut savevm = SaveVm::new("pc");
    let section = WordsSection::new(mem.clone());
    let cleanups = section.cleanups.clone();
    savevm
        .register_live(SectionInfo::new("words", 0, 2), Box::new(section))
        .unwrap();
    savevm
        .register_device(
            SectionInfo::new("uart", 0, 1),
            Box::new(UartSection(Default::default())),
        )
        .unwrap();
    Source {
        mem,
        vm,
        savevm,
        cleanups,
    }
}

/// A destination loading from `end`; returns its memory after the load, and the result.
fn destination(
    end: impl Transport + 'static,
    answer: bool,
) -> thread::JoinHandle<(Vec<u64>, Result<(), String>)> {
    thread::spawn(move || {
        let mem = Words::new(WORDS);
        let mut vm = SaveVm::new("pc");
        vm.register_live(
            SectionInfo::new("words", 0, 2),
            Box::new(WordsSection::new(mem.clone())),
        )
        .unwrap();
        vm.register_device(
            SectionInfo::new("uart", 0, 1),
            Box::new(UartSection(Arc::new(
                std::sync::Mutex::new(Uart::default()),
            ))),
        )
        .unwrap();
        let mut f = QemuFile::new(Box::new(end));
        let r = vm.load(&mut f).map(|_| ()).map_err(|e| e.to_string());
        if answer {
            let _ = return_path::send_load_result(&mut f, r.is_ok());
        }
        (mem.snapshot(), r)
    })
}

fn params(return_path: bool) -> MigrationParams {
    let mut p = MigrationParams::default();
    p.downtime_limit = Duration::from_millis(50);
    p.chunk_bytes = 64 << 10;
    p.return_path = return_path;
    p
}

#[test]
fn a_dirtying_guest_migrates_and_the_destination_matches_the_stopped_source() {
    let mut s = source(50);
    let (a, b) = mem_channel(256 << 10);
    let dest = destination(b, true);
    let ctl = MigrationControl::new(params(true));
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ev = events.clone();
    ctl.set_observer(move |i| ev.lock().unwrap().push(i.status));
    let info = run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap();
    let (dest_mem, r) = dest.join().unwrap();
    r.unwrap();
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(
        dest_mem,
        s.mem.snapshot(),
        "destination equals the stopped source"
    );
    assert!(!s.vm.is_running(), "a completed source stays stopped");
    assert_eq!(
        (
            s.vm.stops.load(Ordering::SeqCst),
            s.vm.resumes.load(Ordering::SeqCst)
        ),
        (1, 0)
    );
    assert_eq!(s.cleanups.load(Ordering::SeqCst), 1, "dirty tracking ended");
    let c = info.completion.unwrap();
    assert!(c.total >= c.stop_vcpus + c.send_ram + c.send_devices);
    assert_eq!(info.downtime, Some(c.total));
    assert!(info.stopped_at.is_some());
    assert!(info.transferred >= (WORDS * 16) as u64);
    assert_eq!(
        *events.lock().unwrap(),
        [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Device,
            MigrationStatus::Completed
        ]
    );
    s.vm.shutdown();
}

/// A destination's end that stops reading for `pause` once it has read `after` bytes
/// (a loader fallen behind the stream), and says when it went on.
#[derive(Debug)]
struct LateReader {
    inner: MemTransport,
    after: usize,
    read: usize,
    pause: Duration,
    went_on: Arc<std::sync::Mutex<Option<std::time::SystemTime>>>,
}

impl Transport for LateReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut went_on = self.went_on.lock().unwrap();
        if self.read >= self.after && went_on.is_none() {
            thread::sleep(self.pause);
            *went_on = Some(std::time::SystemTime::now());
        }
        drop(went_on);
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.inner.write_vectored(bufs)
    }

    fn describe(&self) -> String {
        "a late reader".into()
    }
}

/// With a return path, the guest stops only once the destination has loaded what was
/// sent before: a stream waiting in the sockets would otherwise be loaded in the pause.
#[test]
fn the_guest_stops_only_once_the_destination_caught_up() {
    let mut s = source(1);
    // Room for the whole stream: the source never waits for the destination to read.
    let (a, b) = mem_channel(64 << 20);
    let went_on = Arc::new(std::sync::Mutex::new(None));
    let late = LateReader {
        inner: b,
        // Past the setup's PING (answered at once), then 300 ms without reading.
        after: 4096,
        read: 0,
        pause: Duration::from_millis(300),
        went_on: went_on.clone(),
    };
    let dest = destination(late, true);
    let ctl = MigrationControl::new(params(true));
    let info = run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap();
    let (dest_mem, r) = dest.join().unwrap();
    r.unwrap();
    assert_eq!(dest_mem, s.mem.snapshot());
    let went_on = went_on.lock().unwrap().expect("the destination paused");
    assert!(
        info.stopped_at.unwrap() >= went_on,
        "the guest stopped {:?} before the destination read on",
        went_on
            .duration_since(info.stopped_at.unwrap())
            .unwrap_or_default()
    );
    s.vm.shutdown();
}

#[test]
fn cancel_during_iteration_leaves_the_source_running_and_a_retry_succeeds() {
    let mut s = source(20);
    let (a, b) = mem_channel(64 << 10);
    let dest = destination(b, false);
    // A guest that dirties faster than 200 KB/s lets the migration never converge.
    let mut p = params(false);
    (p.max_bandwidth, p.downtime_limit) = (200_000, Duration::from_millis(1));
    let ctl = Arc::new(MigrationControl::new(p));
    let c2 = ctl.clone();
    let canceller = thread::spawn(move || {
        let t = Instant::now();
        while c2.info().status != MigrationStatus::Active && t.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(150));
        c2.cancel();
    });
    let e =
        run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(e, Error::Cancelled), "{e}");
    let info = ctl.info();
    assert_eq!(info.status, MigrationStatus::Cancelled);
    assert!(s.vm.is_running());
    assert_eq!(s.vm.stops.load(Ordering::SeqCst), 0);
    assert_eq!(s.cleanups.load(Ordering::SeqCst), 1);
    let (_, r) = dest.join().unwrap();
    assert!(r.is_err(), "the destination saw a broken stream");

    // The guest kept running and writing; a second migration of the same source works.
    let (a, b) = mem_channel(256 << 10);
    let dest = destination(b, true);
    let ctl = MigrationControl::new(params(true));
    run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap();
    let (dest_mem, r) = dest.join().unwrap();
    r.unwrap();
    assert_eq!(dest_mem, s.mem.snapshot());
    s.vm.shutdown();
}

#[test]
fn a_destination_that_goes_away_fails_the_migration_and_the_source_runs_on() {
    let mut s = source(10);
    let (a, mut b) = mem_channel(16 << 10);
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let _ = qemu_file::Transport::read(&mut b, &mut buf);
        drop(b);
    });
    let ctl = MigrationControl::new(params(false));
    let e =
        run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap_err();
    reader.join().unwrap();
    assert!(
        matches!(e, Error::Stream(qemu_file::Error::Write { .. })),
        "{e}"
    );
    let info = ctl.info();
    assert_eq!(info.status, MigrationStatus::Failed);
    assert!(info.error.unwrap().contains("memory pipe"));
    assert!(s.vm.is_running());
    s.vm.shutdown();
}

#[test]
fn a_destination_that_cannot_load_makes_the_stopped_source_resume() {
    let mut s = source(10);
    let (a, b) = mem_channel(256 << 10);
    // This destination has no "uart": it refuses the stream at the FULL section, after the
    // source stopped, and says so on the return path.
    let dest = thread::spawn(move || {
        let mem = Words::new(WORDS);
        let mut vm = SaveVm::new("pc");
        vm.register_live(
            SectionInfo::new("words", 0, 2),
            Box::new(WordsSection::new(mem)),
        )
        .unwrap();
        let mut f = QemuFile::new(Box::new(b));
        let r = vm.load(&mut f);
        return_path::send_load_result(&mut f, r.is_ok()).unwrap();
        r.unwrap_err()
    });
    let ctl = MigrationControl::new(params(true));
    let e =
        run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap_err();
    let de = dest.join().unwrap();
    assert!(matches!(de, Error::UnknownSection { .. }), "{de}");
    assert!(
        matches!(e, Error::DestinationFailed { status: 1, .. }),
        "{e}"
    );
    assert_eq!(ctl.info().status, MigrationStatus::Failed);
    assert_eq!(
        (
            s.vm.stops.load(Ordering::SeqCst),
            s.vm.resumes.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert!(s.vm.is_running());
    s.vm.shutdown();
}

#[test]
fn a_vcpu_that_cannot_stop_fails_the_migration_and_the_vm_is_resumed() {
    let mut s = source(0);
    s.vm.fail_stop.store(true, Ordering::SeqCst);
    let (a, b) = mem_channel(256 << 10);
    let dest = destination(b, false);
    let ctl = MigrationControl::new(params(false));
    let e =
        run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap_err();
    assert!(savevm::error_chain(&e).contains("did not stop"), "{e}");
    assert_eq!(s.vm.resumes.load(Ordering::SeqCst), 1);
    assert!(dest.join().unwrap().1.is_err());
    s.vm.shutdown();
}

#[test]
fn the_vm_lock_is_free_while_a_write_blocks() {
    let mut s = source(5);
    let (a, b) = mem_channel(8 << 10);
    let gate = Arc::new(std::sync::Barrier::new(2));
    let g2 = gate.clone();
    // The destination stalls before reading anything.
    let dest = thread::spawn(move || {
        g2.wait();
        destination(b, false).join().unwrap()
    });
    let ctl = Arc::new(MigrationControl::new(params(false)));
    let vm = s.vm.clone();
    let c2 = ctl.clone();
    let probe = thread::spawn(move || {
        // Wait until the migration is writing, then check the lock and the monitor view
        // stay available while its write is blocked on the full pipe.
        while c2.info().status != MigrationStatus::Active {
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(100));
        let mut free = 0;
        for _ in 0..50 {
            if vm.lock.try_lock().is_ok() {
                free += 1;
            }
            let _ = c2.info();
            thread::sleep(Duration::from_millis(2));
        }
        gate.wait();
        free
    });
    run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap();
    let free = probe.join().unwrap();
    assert_eq!(free, 50, "the VM lock was taken during a blocked write");
    dest.join().unwrap().1.unwrap();
    s.vm.shutdown();
}

#[test]
fn cancel_before_start_touches_nothing() {
    let mut s = source(0);
    let (a, _b) = mem_channel(1024);
    let ctl = MigrationControl::new(params(false));
    ctl.cancel();
    let e =
        run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap_err();
    assert!(matches!(e, Error::Cancelled));
    assert_eq!(ctl.info().status, MigrationStatus::Cancelled);
    assert_eq!(s.vm.stops.load(Ordering::SeqCst), 0);
    s.vm.shutdown();
}

#[test]
fn a_cancel_after_the_whole_stream_was_written_is_refused() {
    let mut s = source(10);
    let (a, b) = mem_channel(256 << 10);
    // A destination that takes its time to answer after loading.
    let dest = thread::spawn(move || {
        let mem = Words::new(WORDS);
        let mut vm = SaveVm::new("pc");
        vm.register_live(
            SectionInfo::new("words", 0, 2),
            Box::new(WordsSection::new(mem)),
        )
        .unwrap();
        vm.register_device(
            SectionInfo::new("uart", 0, 1),
            Box::new(UartSection(Default::default())),
        )
        .unwrap();
        let mut f = QemuFile::new(Box::new(b));
        let r = vm.load(&mut f);
        thread::sleep(Duration::from_millis(300));
        return_path::send_load_result(&mut f, r.is_ok()).unwrap();
    });
    let ctl = Arc::new(MigrationControl::new(params(true)));
    let c2 = ctl.clone();
    let canceller = thread::spawn(move || {
        while c2.info().status != MigrationStatus::Device {
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(150));
        c2.cancel()
    });
    let info = run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl).unwrap();
    assert!(
        !canceller.join().unwrap(),
        "the cancel was accepted after the point of no return"
    );
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(
        s.vm.resumes.load(Ordering::SeqCst),
        0,
        "both sides would run the guest"
    );
    dest.join().unwrap();
    s.vm.shutdown();
}

/// A destination that loads the whole stream and then `then`s instead of answering.
fn silent_destination(
    end: MemTransport,
    then: impl FnOnce(QemuFile) + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut vm = SaveVm::new("pc");
        vm.register_live(
            SectionInfo::new("words", 0, 2),
            Box::new(WordsSection::new(Words::new(WORDS))),
        )
        .unwrap();
        vm.register_device(
            SectionInfo::new("uart", 0, 1),
            Box::new(UartSection(Default::default())),
        )
        .unwrap();
        let mut f = QemuFile::new(Box::new(end));
        let r = vm.load(&mut f).unwrap();
        assert!(
            r.description.is_some(),
            "the stream's last part is its description"
        );
        then(f);
    })
}

/// Once the whole stream went out, a lost answer leaves the outcome unknown: the source
/// stays stopped (the destination may be running the guest) and says why.
#[test]
fn a_lost_answer_leaves_the_source_stopped_whether_cut_or_silent() {
    for silent in [false, true] {
        let mut s = source(10);
        let (a, b) = mem_channel(256 << 10);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let dest = silent_destination(b, move |f| {
            if silent {
                // Keeps the connection open and says nothing until the test ends.
                let _ = rx.recv();
            }
            drop(f);
        });
        let mut p = params(true);
        p.stall_timeout = Duration::from_millis(500);
        let ctl = MigrationControl::new(p);
        let t = std::time::Instant::now();
        let e = run_migration(&mut s.savevm, &mut QemuFile::new(Box::new(a)), &*s.vm, &ctl)
            .unwrap_err();
        assert!(matches!(e, Error::OutcomeUnknown { .. }), "{e}");
        if silent {
            assert!(
                t.elapsed() >= Duration::from_millis(500),
                "{:?}",
                t.elapsed()
            );
        }
        let info = ctl.info();
        assert_eq!(info.status, MigrationStatus::Failed);
        assert!(info.outcome_unknown);
        assert!(info.error.unwrap().contains("may be running the guest"));
        assert_eq!(
            (
                s.vm.stops.load(Ordering::SeqCst),
                s.vm.resumes.load(Ordering::SeqCst)
            ),
            (1, 0),
            "silent: {silent}"
        );
        assert!(!s.vm.is_running());
        drop(tx);
        dest.join().unwrap();
        s.vm.shutdown();
    }
}
