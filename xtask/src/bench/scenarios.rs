//! The bench's scenarios: what guest, what workload, which limits, caps and channels.

use std::time::Duration;

/// A workload to migrate.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name in the report.
    pub name: &'static str,
    /// A short name for files.
    pub slug: &'static str,
    pub(super) workload: &'static str,
    pub(super) range: &'static str,
    pub(super) rate: u32,
    /// max-bandwidth for both sides, bytes/s (0: unlimited).
    pub(super) bandwidth: u64,
    /// The auto-converge capability on both sides.
    pub(super) auto_converge: bool,
    /// The downtime limits it runs at.
    pub(super) limits: &'static [u64],
    /// How long a migration may take before it counts as not converging.
    pub(super) timeout: Duration,
    /// multifd channels on both sides (0: one stream).
    pub(super) multifd: u8,
    /// zstd per multifd packet on both sides.
    pub(super) zstd: bool,
    /// TLS on every connection (x509 both ways, as QEMU's tls-creds-x509 sets it up).
    pub(super) tls: bool,
    /// Guest RAM, MiB.
    pub(super) memory_mib: u64,
    /// postcopy-ram on both sides, `migrate-start-postcopy` once a whole pass over the
    /// range was sent.
    pub(super) postcopy: bool,
    /// postcopy-preempt on both sides too (the pages asked for on a connection of
    /// their own).
    pub(super) preempt: bool,
}

/// What scenarios share unless they say otherwise: the fill of 1 GiB, no cap, one
/// stream, both limits.
pub(super) const BASE: Scenario = Scenario {
    name: "",
    slug: "",
    workload: "fill",
    range: "1020M",
    rate: 0,
    bandwidth: 0,
    auto_converge: false,
    limits: LIMITS,
    timeout: TIMEOUT,
    multifd: 0,
    zstd: false,
    tls: false,
    memory_mib: 1024,
    postcopy: false,
    preempt: false,
};

/// A fill of 1 GiB with multifd, at `bandwidth` (0: unlimited).
pub(super) const fn multifd_fill(
    name: &'static str,
    slug: &'static str,
    bandwidth: u64,
    multifd: u8,
    zstd: bool,
) -> Scenario {
    Scenario {
        name,
        slug,
        bandwidth,
        // Uncapped, both limits, as the one-stream fill (at 30 ms all of it goes live);
        // capped, the limit makes no difference to 8 s of copying.
        limits: if bandwidth == 0 { LIMITS } else { &[300] },
        multifd,
        zstd,
        ..BASE
    }
}

/// A fill of a `gib` GiB guest, all of it but the guest's first 4 MiB, at 300 ms.
pub(super) const fn scaled_fill(name: &'static str, slug: &'static str, gib: u64) -> Scenario {
    Scenario {
        name,
        slug,
        range: match gib {
            2 => "2044M",
            4 => "4092M",
            _ => "8188M",
        },
        memory_mib: gib * 1024,
        limits: &[300],
        timeout: Duration::from_secs(120),
        ..BASE
    }
}

pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "idle 1 GiB",
        slug: "idle",
        workload: "idle",
        range: "64M",
        ..BASE
    },
    Scenario {
        name: "fill 1 GiB",
        slug: "fill",
        ..BASE
    },
    Scenario {
        name: "dirty 128 MiB, full speed",
        slug: "dirty128",
        workload: "dirty",
        range: "128M",
        ..BASE
    },
    Scenario {
        name: "dirty 256 MiB, 50k pages/s",
        slug: "dirty256",
        workload: "dirty",
        range: "256M",
        rate: 50_000,
        ..BASE
    },
    // Dirtying faster than a 50 MB/s link carries: neither side converges without
    // throttling the guest.
    Scenario {
        name: "dirty 128 MiB, 50 MB/s, auto-converge",
        slug: "converge",
        workload: "dirty",
        range: "128M",
        bandwidth: 50_000_000,
        auto_converge: true,
        limits: &[300],
        timeout: Duration::from_secs(240),
        ..BASE
    },
    // A guest that never converges at 50 MB/s: 512 MiB rewritten as fast as it can.
    // Post-copy after the first pass, beside the same guest under auto-converge.
    Scenario {
        name: "dirty 512 MiB, 50 MB/s, post-copy",
        slug: "postcopy",
        workload: "dirty",
        range: "512M",
        bandwidth: 50_000_000,
        postcopy: true,
        limits: &[300],
        timeout: Duration::from_secs(240),
        ..BASE
    },
    Scenario {
        name: "dirty 512 MiB, 50 MB/s, post-copy preempt",
        slug: "postcopy-preempt",
        workload: "dirty",
        range: "512M",
        bandwidth: 50_000_000,
        postcopy: true,
        preempt: true,
        limits: &[300],
        timeout: Duration::from_secs(240),
        ..BASE
    },
    Scenario {
        name: "dirty 512 MiB, 50 MB/s, auto-converge",
        slug: "converge512",
        workload: "dirty",
        range: "512M",
        bandwidth: 50_000_000,
        auto_converge: true,
        limits: &[300],
        // Ten times what post-copy takes on this guest: enough to say "far longer".
        timeout: Duration::from_secs(120),
        ..BASE
    },
    // Scaling: the fill of 1 GiB above, then of 2, 4 and 8 GiB guests (RAM beyond 3 GiB
    // is at 4 GiB and above, on both sides).
    scaled_fill("fill 2 GiB", "fill-2g", 2),
    scaled_fill("fill 4 GiB", "fill-4g", 4),
    scaled_fill("fill 8 GiB", "fill-8g", 8),
    multifd_fill("fill 1 GiB, multifd 2", "fill-mfd2", 0, 2, false),
    // TLS 1.3 with certificates on both sides; ours (rustls) beside QEMU's (GnuTLS).
    Scenario {
        name: "fill 1 GiB, TLS",
        slug: "fill-tls",
        tls: true,
        ..BASE
    },
    Scenario {
        name: "fill 1 GiB, TLS, multifd 2",
        slug: "fill-tls-mfd2",
        tls: true,
        multifd: 2,
        ..BASE
    },
    multifd_fill("fill 1 GiB, multifd 4", "fill-mfd4", 0, 4, false),
    multifd_fill("fill 1 GiB, multifd 2 + zstd", "fill-zstd", 0, 2, true),
    // A 1 Gbit/s link (max-bandwidth 125 MB/s), without and with compression.
    multifd_fill("fill 1 GiB, 1 Gbit/s, multifd 2", "fill-1g", GBIT, 2, false),
    multifd_fill(
        "fill 1 GiB, 1 Gbit/s, multifd 2 + zstd",
        "fill-1g-zstd",
        GBIT,
        2,
        true,
    ),
];

impl Scenario {
    /// Whether its figure of merit is throughput: an uncapped fill, uncompressed and in
    /// the clear, which the bench holds against loopback TCP measured right after it.
    pub(super) fn is_throughput(&self) -> bool {
        self.workload == "fill" && self.bandwidth == 0 && !self.zstd && !self.tls
    }
}

/// 1 Gbit/s in bytes per second.
pub(super) const GBIT: u64 = 125_000_000;

pub(super) const LIMITS: &[u64] = &[300, 30];

pub(super) const TIMEOUT: Duration = Duration::from_secs(60);

/// The workload's range in bytes ("512M").
pub(super) fn range_bytes(s: &Scenario) -> u64 {
    let (n, unit) = s.range.split_at(s.range.len() - 1);
    let n: u64 = n.parse().unwrap_or(0);
    match unit {
        "G" => n << 30,
        "M" => n << 20,
        _ => n,
    }
}

pub(super) fn ready_bytes(s: &Scenario) -> u64 {
    if s.workload == "idle" { 1 } else { 2 }
}
