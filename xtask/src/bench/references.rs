//! The machine's physical limits, measured in the same run as the scenarios: memcpy of
//! 1 GiB, and loopback TCP copies of 1 GiB over 1, 2 and 4 connections; and, right after
//! each round of a throughput scenario, the two loopback copies it is compared with
//! ([`Beside`]), since they drift during a run by as much as the margins in question.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use anyhow::Result;

/// The references at one moment of the run.
#[derive(Debug, Clone)]
pub(super) struct References {
    /// memcpy, bytes/s.
    pub(super) memcpy: f64,
    /// One loopback TCP connection, bytes/s.
    pub(super) tcp: f64,
    /// Loopback TCP between 1 GiB buffers by number of connections: (connections, bytes/s).
    pub(super) streams: Vec<(usize, f64)>,
}

impl References {
    /// Measures them all.
    pub(super) fn measure() -> Result<Self> {
        let memcpy = memcpy();
        let tcp = loopback_tcp(3)?;
        let streams = [1, 2, 4]
            .into_iter()
            .map(|n| loopback_tcp_streams(n, 3).map(|b| (n, b)))
            .collect::<Result<_>>()?;
        Ok(References {
            memcpy,
            tcp,
            streams,
        })
    }

    /// The connections' figures as text.
    pub(super) fn streams_text(&self) -> String {
        self.streams
            .iter()
            .map(|(n, b)| format!("{n}: {:.2} GB/s", b / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The loopback references of one round, measured right after it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Beside {
    /// One connection between 1 MiB buffers (the data stays in cache), bytes/s.
    pub(super) tcp: f64,
    /// `connections` connections between 1 GiB buffers (read from and written to
    /// memory, as a migration must), bytes/s.
    pub(super) buffers: f64,
    pub(super) connections: usize,
}

impl Beside {
    /// Measures them, best of two each (seconds on a warm host; allocating the 2 GiB
    /// of buffers takes longer where fresh memory is slow to come).
    pub(super) fn measure(connections: usize) -> Result<Self> {
        Ok(Beside {
            tcp: loopback_tcp(2)?,
            buffers: loopback_tcp_streams(connections, 2)?,
            connections,
        })
    }
}

/// memcpy of 1 GiB, best of three, bytes per second.
fn memcpy() -> f64 {
    let src = vec![0x5au8; 1 << 30];
    let mut dst = vec![0u8; 1 << 30];
    dst.copy_from_slice(&src);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            (1u64 << 30) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// A plain copy of 1 GiB over loopback TCP between 1 MiB buffers, best of `tries`,
/// bytes per second.
fn loopback_tcp(tries: usize) -> Result<f64> {
    let mut best: f64 = 0.0;
    for _ in 0..tries {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let reader = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(n),
                    k => n += k as u64,
                }
            }
        });
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0xa5u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..1024 {
            s.write_all(&buf)?;
        }
        drop(s);
        let n = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        anyhow::ensure!(n == 1 << 30, "short copy");
        best = best.max(n as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// 1 GiB copied over `streams` loopback TCP connections at once, from one 1 GiB buffer
/// into another (touched beforehand), 512 KiB at a time: what several connections can
/// carry between buffers the size of a guest on this machine. Best of `tries`, bytes/s.
fn loopback_tcp_streams(streams: usize, tries: usize) -> Result<f64> {
    const TOTAL: usize = 1 << 30;
    const PIECE: usize = 512 << 10;
    let per = TOTAL / streams;
    let mut best: f64 = 0.0;
    let mut src = vec![0xa5u8; TOTAL];
    let mut dst = vec![0x5au8; TOTAL];
    for _ in 0..tries {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let conns: Vec<(TcpStream, TcpStream)> = (0..streams)
            .map(|_| -> Result<_> {
                let c = TcpStream::connect(addr)?;
                Ok((c, l.accept()?.0))
            })
            .collect::<Result<_>>()?;
        let t = Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let mut hs = Vec::new();
            for ((mut w, mut r), (from, to)) in conns
                .into_iter()
                .zip(src.chunks_mut(per).zip(dst.chunks_mut(per)))
            {
                let from: &[u8] = from;
                hs.push(scope.spawn(move || -> std::io::Result<()> {
                    for p in from.chunks(PIECE) {
                        w.write_all(p)?;
                    }
                    Ok(())
                }));
                hs.push(scope.spawn(move || -> std::io::Result<()> {
                    for p in to.chunks_mut(PIECE) {
                        r.read_exact(p)?;
                    }
                    Ok(())
                }));
            }
            for h in hs {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a copy thread panicked"))??;
            }
            Ok(())
        })?;
        best = best.max(TOTAL as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}
