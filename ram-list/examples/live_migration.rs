//! A live migration between two threads, as another VMM would wire it: guest memory of
//! two regions written by a "vCPU" thread while it migrates, the VMM's own `VmControl`
//! (examples/common), and the destination side, which loads the stream and answers on the
//! same connection.
//!
//! ```text
//! cargo run -p ram-list --example live_migration
//! ```

mod common;

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{LAYOUT, Memory, hash, sections, start_guest};
use qemu_file::{QemuFile, UnixTransport};
use savevm::{MigrationControl, MigrationParams, return_path, run_migration};
use vm_memory::Bytes;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (a, b) = UnixStream::pair()?;

    // The destination: a VM of the same layout, never run, loading what arrives and
    // saying so on the same connection (the source waits for that answer).
    let destination = std::thread::spawn(move || -> Result<Memory, String> {
        let mem = Memory::from_ranges(&LAYOUT).map_err(|e| e.to_string())?;
        let mut f = QemuFile::new(Box::new(UnixTransport::new(b, "unix:source".into())));
        let loaded = sections(&mem).load(&mut f);
        return_path::send_load_result(&mut f, loaded.is_ok()).map_err(|e| e.to_string())?;
        loaded.map_err(|e| e.to_string())?;
        Ok(mem)
    });

    // The source, its guest running.
    let mem = Memory::from_ranges(&LAYOUT)?;
    let guest = start_guest(&mem);

    let mut params = MigrationParams::default();
    params.downtime_limit = Duration::from_millis(30);
    params.return_path = true;
    let ctl = MigrationControl::new(params);
    let mut f = QemuFile::new(Box::new(UnixTransport::new(a, "unix:destination".into())));
    let info = run_migration(&mut sections(&mem), &mut f, &*guest.vm, &ctl)?;
    let at_switchover = guest.writes.load(Ordering::SeqCst);
    guest.end();
    let arrived = destination.join().unwrap()?;

    // The guest was stopped at the switchover (and stays so: it runs at the destination
    // now), so both memories must be equal.
    for (at, len) in LAYOUT {
        let (mut here, mut there) = (vec![0u8; len], vec![0u8; len]);
        mem.read_slice(&mut here, at)?;
        arrived.read_slice(&mut there, at)?;
        assert!(here == there, "region at {:#x} differs", at.0);
    }
    assert_eq!(hash(&mem), hash(&arrived));
    println!(
        "{:?} in {:?} with {} bytes while the guest made {} writes; downtime {:?}; memory equal",
        info.status,
        info.total_time,
        info.transferred,
        at_switchover,
        info.completion.map(|c| c.total).unwrap_or_default()
    );
    Ok(())
}
