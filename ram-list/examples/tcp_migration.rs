//! A live migration between two processes over TCP on 127.0.0.1: this program runs
//! itself as the destination, which listens, loads the stream, answers on the same
//! connection and prints a hash of what it loaded; the source migrates its running guest
//! there and compares.
//!
//! ```text
//! cargo run -p ram-list --example tcp_migration
//! ```

mod common;

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{LAYOUT, Memory, hash, sections, start_guest};
use qemu_file::{QemuFile, TcpTransport};
use savevm::{MigrationControl, MigrationParams, return_path, run_migration};

fn destination() -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    let (stream, peer) = listener.accept()?;
    let mem = Memory::from_ranges(&LAYOUT)?;
    let mut f = QemuFile::new(Box::new(TcpTransport::new(stream, format!("tcp:{peer}"))));
    let loaded = sections(&mem).load(&mut f);
    return_path::send_load_result(&mut f, loaded.is_ok())?;
    loaded?;
    println!("{:016x}", hash(&mem));
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("destination") {
        return destination();
    }
    let mut child = Command::new(std::env::current_exe()?)
        .arg("destination")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let port: u16 = lines
        .next()
        .ok_or("the destination said nothing")??
        .parse()?;

    let mem = Memory::from_ranges(&LAYOUT)?;
    let guest = start_guest(&mem);
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    let mut f = QemuFile::new(Box::new(TcpTransport::new(
        stream,
        format!("tcp:127.0.0.1:{port}"),
    )));
    let mut params = MigrationParams::default();
    params.downtime_limit = Duration::from_millis(30);
    params.return_path = true;
    let ctl = MigrationControl::new(params);
    let info = run_migration(&mut sections(&mem), &mut f, &*guest.vm, &ctl)?;
    guest.end();
    let theirs = lines.next().ok_or("the destination printed no hash")??;
    assert!(child.wait()?.success(), "the destination failed");
    let ours = format!("{:016x}", hash(&mem));
    assert_eq!(ours, theirs, "the destination's memory differs");
    println!(
        "{:?} over TCP in {:?}, {} bytes; both processes' memory hashes {ours}",
        info.status, info.total_time, info.transferred
    );
    Ok(())
}
