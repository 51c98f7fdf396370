//! What a person sees: a live progress line while migrating (on a terminal), and the
//! summary with the completion breakdown.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use block_migration::BlockStatsSnapshot;
use ram_list::RamStatsSnapshot;
use savevm::{MigrationInfo, MigrationParams, MigrationStatus};

use crate::migration::ms;
use crate::session::Session;
use crate::units::bytes;

fn rate(pages: u64) -> String {
    if pages >= 10_000 {
        format!("{}k", pages / 1000)
    } else {
        pages.to_string()
    }
}

/// Draws the progress line on stderr every 200 ms until the migration ends.
pub fn live(session: Arc<Session>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut err = std::io::stderr();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let Some((info, ram, disk)) = session.progress() else {
                continue;
            };
            if info.status.is_terminal() {
                let _ = write!(err, "\r\x1b[K");
                let _ = err.flush();
                return;
            }
            let phase = match info.status {
                MigrationStatus::Device => "switching over",
                MigrationStatus::Setup => "setting up",
                MigrationStatus::Cancelling => "cancelling",
                _ => "migrating",
            };
            let disks = if disk.total > 0 {
                format!(
                    ", disks {} % copied, {} left",
                    disk.bulk_percent,
                    bytes(disk.remaining)
                )
            } else {
                String::new()
            };
            let _ = write!(
                err,
                "\r\x1b[K{phase}: sent {}, RAM left {}{disks}, {:.2} GB/s, guest dirtying {} pages/s, expected downtime {} ms",
                bytes(info.transferred),
                bytes(ram.remaining),
                info.bandwidth / 1e9,
                rate(ram.dirty_pages_rate),
                info.expected_downtime.as_millis()
            );
            let _ = err.flush();
        }
    })
}

/// The summary of a finished migration.
pub fn summary(
    uri: &str,
    info: &MigrationInfo,
    ram: &RamStatsSnapshot,
    disk: &BlockStatsSnapshot,
    params: &MigrationParams,
) -> String {
    let mut s = format!(
        "Migration to {uri}: {} in {:.2} s (setup {:.1} ms)\n",
        info.status,
        info.total_time.as_secs_f64(),
        ms(info.setup_time)
    );
    let gbps = if info.total_time > Duration::ZERO {
        info.transferred as f64 / info.total_time.as_secs_f64() / 1e9
    } else {
        0.0
    };
    s += &format!(
        "  data          {} sent, {gbps:.2} GB/s on average; RAM {}: {} zero pages, {} full pages\n",
        bytes(info.transferred),
        bytes(ram.total),
        ram.duplicate,
        ram.normal
    );
    if disk.total > 0 {
        s += &format!(
            "  disks         {} copied of {}, {} zero chunks\n",
            bytes(disk.transferred),
            bytes(disk.total),
            disk.zero_chunks
        );
    }
    s += &format!(
        "  convergence   {} dirty syncs, {} chunks; the guest dirtied {} pages/s at the last sync\n",
        ram.dirty_sync_count,
        info.iterations,
        rate(ram.dirty_pages_rate)
    );
    if info.cpu_throttle_peak > 0 {
        s += &format!(
            "  auto-converge the vCPUs were throttled up to {}%\n",
            info.cpu_throttle_peak
        );
    }
    if let (Some(at), Some(t0)) = (info.postcopy_started, info.started) {
        s += &format!(
            "  post-copy     switched after {:.2} s; then {} sent, {} pages asked for by the destination\n",
            at.saturating_duration_since(t0).as_secs_f64(),
            bytes(info.postcopy_bytes),
            info.postcopy_requests
        );
    }
    if let Some(c) = info.completion {
        let postcopy = info.postcopy_started.is_some();
        s += &format!(
            "  downtime      {:.2} ms at the source{} (limit {} ms, expected {:.1} ms)\n",
            ms(c.total),
            if postcopy { ", until the switch" } else { "" },
            params.downtime_limit.as_millis(),
            ms(info.expected_downtime)
        );
        s += "  completion    step                    ms\n";
        let (ram_step, devices_step) = match postcopy {
            true => ("discards", "send the package"),
            false => ("send RAM", "send devices"),
        };
        for (name, d) in [
            ("stop vCPUs", c.stop_vcpus),
            ("flush disks", c.flush_disks),
            ("final dirty sync", c.final_sync),
            (ram_step, c.send_ram),
            (devices_step, c.send_devices),
            ("wait for destination", c.wait_destination),
            ("total", c.total),
        ] {
            s += &format!("                {name:<20} {:>7.2}\n", ms(d));
        }
    }
    if let Some(e) = &info.error {
        s += &format!("  error         {e}\n");
    }
    s
}
