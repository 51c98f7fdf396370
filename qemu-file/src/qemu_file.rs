//! `QemuFile`: the buffered big-endian migration stream.

use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::{Error, RateLimiter, Result, ShutdownHandle, Transport};

/// Keeps memory that was queued by reference (a guest page) mapped until it is written.
pub type KeepAlive = Arc<dyn Send + Sync>;

/// Most slices one `writev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// Size of the read buffer.
/// The most [`QemuFile::peek`] looks ahead.
const PEEK_MAX: usize = 4096;
const READ_BUF: usize = 256 * 1024;
/// Queued bytes beyond which a put flushes by itself.
const DEFAULT_AUTO_FLUSH: usize = 8 * 1024 * 1024;

/// A run of queued output: bytes copied into the file's own buffer, or memory queued by
/// reference and kept alive by a [`KeepAlive`] until the next flush.
#[derive(Debug, Clone, Copy)]
enum Segment {
    Local { start: usize, end: usize },
    External { ptr: ExternalPtr, len: usize },
}

/// A pointer into memory owned by a queued [`KeepAlive`].
#[derive(Debug, Clone, Copy)]
struct ExternalPtr(*const u8);

// SAFETY: the pointer is only dereferenced (as a write source) by the thread that owns the
// `QemuFile`, and the memory it points to is kept alive by a `Send + Sync` owner held in the
// same `QemuFile`.
unsafe impl Send for ExternalPtr {}

/// A buffered, big-endian migration stream over a [`Transport`] (QEMU's `QEMUFile`).
///
/// Writing: `put_*` calls queue bytes; small values are copied into an internal buffer,
/// page payloads are queued by reference ([`QemuFile::put_buffer_external`]) and go to the
/// transport by vectored writes without being copied. [`QemuFile::flush`] does the
/// (blocking) write. The first error is sticky: later puts are no-ops and every check
/// returns that error, so a sender can write a whole record and check once.
///
/// Reading: `get_*` calls return typed errors at the end of the stream; lengths taken from
/// the stream are bounded by the caller before anything is allocated.
///
/// One thread owns a `QemuFile`; other threads interrupt it through
/// [`QemuFile::shutdown_handle`].
pub struct QemuFile {
    transport: Box<dyn Transport>,
    name: String,
    // Write side.
    buf: Vec<u8>,
    segments: Vec<Segment>,
    keep_alive: Vec<KeepAlive>,
    queued: usize,
    total_put: u64,
    total_elsewhere: u64,
    flushed: u64,
    auto_flush: usize,
    chunk_budget: usize,
    rate: RateLimiter,
    error: Option<Error>,
    // Read side.
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    consumed: u64,
}

impl fmt::Debug for QemuFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuFile")
            .field("transport", &self.name)
            .field("queued", &self.queued)
            .field("written", &self.total_put)
            .field("read", &self.consumed)
            .field("error", &self.error)
            .finish()
    }
}

impl QemuFile {
    /// A stream over `transport`, unlimited bandwidth.
    pub fn new(transport: Box<dyn Transport>) -> Self {
        let name = transport.describe();
        QemuFile {
            transport,
            name,
            buf: Vec::with_capacity(64 * 1024),
            segments: Vec::new(),
            keep_alive: Vec::new(),
            queued: 0,
            total_put: 0,
            total_elsewhere: 0,
            flushed: 0,
            auto_flush: DEFAULT_AUTO_FLUSH,
            chunk_budget: usize::MAX,
            rate: RateLimiter::new(0),
            error: None,
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            consumed: 0,
        }
    }

    /// The transport's description, e.g. `unix:/tmp/mig.sock`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle that interrupts blocked reads and writes from another thread (cancel).
    pub fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        self.transport.shutdown_handle()
    }

    /// A second stream on the same connection, for another thread (QEMU's
    /// `qemu_file_get_return_path`): a destination's writer of return-path messages
    /// while its loader reads, or a source's reader of them while it writes. Bytes this
    /// file has read ahead stay here; [`QemuFile::split_reader`] moves them.
    ///
    /// # Errors
    /// A transport that cannot be shared (files, pipes, TLS), or the system's.
    pub fn return_path(&self) -> Result<QemuFile> {
        let t = self.transport.try_clone().map_err(|e| Error::Write {
            transport: self.name.clone(),
            source: Arc::new(e),
        })?;
        Ok(QemuFile::new(t))
    }

    /// A reader of the same connection for another thread, holding the bytes this one
    /// read ahead: from now on only the new file reads (this one may go on writing).
    ///
    /// # Errors
    /// As [`QemuFile::return_path`].
    pub fn split_reader(&mut self) -> Result<QemuFile> {
        let mut r = self.return_path()?;
        let ahead = self.rend - self.rpos;
        r.rbuf[..ahead].copy_from_slice(&self.rbuf[self.rpos..self.rend]);
        r.rend = ahead;
        self.rpos = self.rend;
        Ok(r)
    }

    // ---------------------------------------------------------------- errors

    /// The first error this stream met, if any.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// `Err` with the first error this stream met.
    ///
    /// # Errors
    /// The sticky error.
    pub fn check(&self) -> Result<()> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Forgets the sticky error and anything queued, so that a final answer can still be
    /// written on the reverse direction after reading failed (a destination telling the
    /// source it refused the stream). Not for going on with a broken stream.
    pub fn clear_error(&mut self) {
        self.error = None;
        self.buf.clear();
        self.segments.clear();
        self.keep_alive.clear();
        self.queued = 0;
    }

    /// Records `e` unless an earlier error is already recorded; returns the sticky error.
    pub fn set_error(&mut self, e: Error) -> Error {
        self.error.get_or_insert(e).clone()
    }

    // ---------------------------------------------------------------- writing

    /// Queues one byte.
    pub fn put_u8(&mut self, v: u8) {
        self.put_buffer(&[v]);
    }

    /// Queues a big-endian u16.
    pub fn put_be16(&mut self, v: u16) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Queues a big-endian u32.
    pub fn put_be32(&mut self, v: u32) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Queues a big-endian u64.
    pub fn put_be64(&mut self, v: u64) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Queues a string as a one-byte length and its bytes (QEMU's counted string).
    ///
    /// # Panics
    /// If `s` is longer than 255 bytes: names in the stream are chosen by the program, and a
    /// longer one is a bug in the caller.
    pub fn put_counted_string(&mut self, s: &str) {
        let len = u8::try_from(s.len()).expect("counted strings are at most 255 bytes");
        self.put_u8(len);
        self.put_buffer(s.as_bytes());
    }

    /// Queues a copy of `data`.
    pub fn put_buffer(&mut self, data: &[u8]) {
        if self.error.is_some() || data.is_empty() {
            return;
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        let end = self.buf.len();
        match self.segments.last_mut() {
            Some(Segment::Local { end: e, .. }) if *e == start => *e = end,
            _ => self.segments.push(Segment::Local { start, end }),
        }
        self.account(data.len());
    }

    /// Queues `len` bytes at `ptr` by reference; they are read when the queue is flushed.
    ///
    /// `owner` is cloned into the queue (once for consecutive calls with the same owner) and
    /// dropped after the flush. The bytes written are whatever the memory holds at flush
    /// time: for guest RAM that the guest may still be changing, the dirty log catches the
    /// change and the page is sent again.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be readable memory that stays mapped for as long as `owner`
    /// (or any clone of it) is alive.
    pub unsafe fn put_buffer_external(&mut self, ptr: *const u8, len: usize, owner: &KeepAlive) {
        if self.error.is_some() || len == 0 {
            return;
        }
        let known = self
            .keep_alive
            .last()
            .is_some_and(|k| Arc::ptr_eq(k, owner));
        if !known {
            self.keep_alive.push(Arc::clone(owner));
        }
        match self.segments.last_mut() {
            // Memory of the same owner that continues the previous piece (consecutive
            // guest pages) joins it: fewer, longer iovecs for the kernel to walk. (Not
            // across owners: two allocations may happen to be adjacent.)
            Some(Segment::External { ptr: p, len: l }) if known && p.0.wrapping_add(*l) == ptr => {
                *l += len;
            }
            _ => self.segments.push(Segment::External {
                ptr: ExternalPtr(ptr),
                len,
            }),
        }
        self.account(len);
    }

    fn account(&mut self, n: usize) {
        self.queued += n;
        self.total_put += n as u64;
        self.rate.consume(n as u64);
        if self.queued >= self.auto_flush {
            let _ = self.flush();
        }
    }

    /// Writes everything queued to the transport (blocking) and drops the references.
    ///
    /// # Errors
    /// The sticky error, or [`Error::Write`] (which becomes sticky).
    pub fn flush(&mut self) -> Result<()> {
        self.check()?;
        if self.segments.is_empty() {
            return Ok(());
        }
        let result = write_segments(&mut *self.transport, &self.buf, &self.segments);
        self.buf.clear();
        self.segments.clear();
        self.keep_alive.clear();
        let queued = std::mem::take(&mut self.queued);
        match result {
            Ok(()) => {
                self.flushed += queued as u64;
                Ok(())
            }
            Err(e) => Err(self.set_error(Error::Write {
                transport: self.name.clone(),
                source: Arc::new(e),
            })),
        }
    }

    /// Writes `data`, a piece of the stream, after everything queued, with the descriptors
    /// `fds` attached: the peer has them once it has read these bytes
    /// ([`QemuFile::take_received_fds`]). Only a unix socket in the clear carries
    /// descriptors.
    ///
    /// # Errors
    /// The sticky error; [`Error::Write`] (which becomes sticky), `Unsupported` from a
    /// transport that cannot pass descriptors.
    pub fn put_buffer_with_fds(&mut self, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.flush()?;
        if data.is_empty() {
            return Ok(());
        }
        let mut sent = loop {
            match self.transport.write_with_fds(data, fds) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        if let Some(n) = sent.as_ref().ok().copied().filter(|&n| n < data.len()) {
            // The descriptors went with the first bytes; the rest is plain stream.
            let rest = &data[n..];
            sent = write_segments(
                &mut *self.transport,
                rest,
                &[Segment::Local {
                    start: 0,
                    end: rest.len(),
                }],
            )
            .map(|()| data.len());
        }
        match sent {
            Ok(_) => {
                self.total_put += data.len() as u64;
                self.flushed += data.len() as u64;
                self.rate.consume(data.len() as u64);
                Ok(())
            }
            Err(e) => Err(self.set_error(Error::Write {
                transport: self.name.clone(),
                source: Arc::new(e),
            })),
        }
    }

    /// The descriptors the peer passed with the bytes read so far, oldest first
    /// ([`QemuFile::put_buffer_with_fds`]); they are the caller's from now on.
    pub fn take_received_fds(&mut self) -> Vec<OwnedFd> {
        self.transport.take_received_fds()
    }

    /// The user id of the peer process, where the transport can say (a unix socket).
    pub fn peer_uid(&self) -> Option<u32> {
        self.transport.peer_uid()
    }

    /// Flushes and ends the outgoing direction (waits for an exec child, syncs a file,
    /// half-closes a socket).
    ///
    /// # Errors
    /// As [`QemuFile::flush`], or the transport's error on finishing.
    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        self.transport.finish().map_err(|e| {
            let e = Error::Write {
                transport: self.name.clone(),
                source: Arc::new(e),
            };
            self.set_error(e)
        })
    }

    /// Bytes put so far, including those still queued (QEMU's `qemu_file_transferred`).
    pub fn bytes_written(&self) -> u64 {
        self.total_put
    }

    /// Counts `n` bytes that another connection of the same migration carried (a
    /// multifd channel) in [`QemuFile::bytes_written`] and the rate limiter (QEMU's
    /// `qemu_file_acct_rate_limit`). Not in the chunk budget, which bounds what this
    /// stream queues by reference: the other connections have their own bound.
    pub fn account_elsewhere(&mut self, n: u64) {
        self.total_put += n;
        self.total_elsewhere += n;
        self.rate.consume(n);
    }

    /// The part of [`QemuFile::bytes_written`] that other connections carried
    /// ([`QemuFile::account_elsewhere`]: multifd channels).
    pub fn bytes_elsewhere(&self) -> u64 {
        self.total_elsewhere
    }

    /// Bytes handed to the transport so far.
    pub fn bytes_flushed(&self) -> u64 {
        self.flushed
    }

    /// Makes a read that waits `timeout` without a byte fail, where the transport is a
    /// socket (a stalled peer must not hold a reader for ever); `None` waits for ever.
    ///
    /// # Errors
    /// The socket refused the option.
    pub fn set_read_timeout(&mut self, timeout: Option<std::time::Duration>) -> Result<()> {
        self.transport
            .set_read_timeout(timeout)
            .map_err(|e| Error::Read {
                transport: self.name.clone(),
                offset: self.bytes_read(),
                source: Arc::new(e),
            })
    }

    /// Bytes queued and not yet written.
    pub fn bytes_queued(&self) -> usize {
        self.queued
    }

    /// Sets how many queued bytes make a put flush by itself (default 8 MiB).
    pub fn set_auto_flush(&mut self, bytes: usize) {
        self.auto_flush = bytes.max(1);
    }

    /// Sets how many queued bytes make [`QemuFile::budget_exhausted`] true: the size of
    /// one chunk that a section collects before the migration thread writes it out.
    pub fn set_chunk_budget(&mut self, bytes: usize) {
        self.chunk_budget = bytes;
    }

    /// Whether a section producing data should stop now: the chunk budget is used or the
    /// rate limiter's window is exhausted.
    pub fn budget_exhausted(&mut self) -> bool {
        self.error.is_some() || self.queued >= self.chunk_budget || self.rate.exceeded()
    }

    /// The bandwidth limiter.
    pub fn rate_limiter(&mut self) -> &mut RateLimiter {
        &mut self.rate
    }

    // ---------------------------------------------------------------- reading

    /// Bytes consumed from the stream so far: the offset of the next byte.
    pub fn bytes_read(&self) -> u64 {
        self.consumed
    }

    fn read_error(&mut self, e: io::Error) -> Error {
        let e = Error::Read {
            transport: self.name.clone(),
            offset: self.consumed,
            source: Arc::new(e),
        };
        self.set_error(e)
    }

    /// Refills the read buffer; `Ok(0)` at the end of the stream.
    fn fill(&mut self) -> Result<usize> {
        self.check()?;
        loop {
            match self.transport.read(&mut self.rbuf) {
                Ok(n) => {
                    self.rpos = 0;
                    self.rend = n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e)),
            }
        }
    }

    fn eof(&mut self) -> Error {
        let e = Error::UnexpectedEof {
            offset: self.consumed,
        };
        self.set_error(e)
    }

    /// Reads exactly `dst.len()` bytes; large reads go straight into `dst`.
    ///
    /// # Errors
    /// [`Error::UnexpectedEof`] if the stream ends first, [`Error::Read`] on I/O failure.
    pub fn get_buffer(&mut self, dst: &mut [u8]) -> Result<()> {
        self.check()?;
        let mut done = 0;
        while done < dst.len() {
            if self.rpos < self.rend {
                let n = (self.rend - self.rpos).min(dst.len() - done);
                dst[done..done + n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
                self.rpos += n;
                done += n;
                self.consumed += n as u64;
            } else if dst.len() - done >= self.rbuf.len() {
                match self.transport.read(&mut dst[done..]) {
                    Ok(0) => return Err(self.eof()),
                    Ok(n) => {
                        done += n;
                        self.consumed += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.read_error(e)),
                }
            } else if self.fill()? == 0 {
                return Err(self.eof());
            }
        }
        Ok(())
    }

    /// As [`QemuFile::get_buffer`], for memory nobody reads soon (a destination's guest
    /// pages): what is buffered is copied with non-temporal stores
    /// ([`copy_streaming`](crate::copy_streaming)). The caller calls
    /// [`store_fence`](crate::store_fence) before another thread may read `dst`.
    ///
    /// # Errors
    /// As [`QemuFile::get_buffer`].
    pub fn get_buffer_streaming(&mut self, dst: &mut [u8]) -> Result<()> {
        self.check()?;
        let mut done = 0;
        while done < dst.len() {
            if self.rpos < self.rend {
                let n = (self.rend - self.rpos).min(dst.len() - done);
                crate::copy_streaming(
                    &mut dst[done..done + n],
                    &self.rbuf[self.rpos..self.rpos + n],
                );
                self.rpos += n;
                done += n;
                self.consumed += n as u64;
            } else if dst.len() - done >= self.rbuf.len() {
                // Larger than the buffer: the kernel copies it in (as `get_buffer`).
                return self.get_buffer(&mut dst[done..]);
            } else if self.fill()? == 0 {
                return Err(self.eof());
            }
        }
        Ok(())
    }

    /// Reads exactly `bufs`' lengths into them in order: what is buffered is copied, the
    /// rest read straight into them with vectored reads (a multifd packet's pages: no
    /// copy through the read buffer, one `readv` for many pages).
    ///
    /// # Errors
    /// [`Error::UnexpectedEof`] if the stream ends first, [`Error::Read`] on I/O failure.
    pub fn get_buffers(&mut self, bufs: &mut [&mut [u8]]) -> Result<()> {
        self.check()?;
        // (buffer index, offset in it) of the next byte to fill.
        let (mut i, mut off) = (0, 0);
        while i < bufs.len() && self.rpos < self.rend {
            let n = (self.rend - self.rpos).min(bufs[i].len() - off);
            bufs[i][off..off + n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
            self.rpos += n;
            self.consumed += n as u64;
            off += n;
            if off == bufs[i].len() {
                i += 1;
                off = 0;
            }
        }
        while i < bufs.len() {
            const MAX_IOV: usize = 1024;
            if off == bufs[i].len() {
                i += 1;
                off = 0;
                continue;
            }
            let got = {
                let (first, rest) = bufs[i..].split_at_mut(1);
                let mut iov = Vec::with_capacity(rest.len().min(MAX_IOV - 1) + 1);
                iov.push(io::IoSliceMut::new(&mut first[0][off..]));
                iov.extend(
                    rest.iter_mut()
                        .take(MAX_IOV - 1)
                        .map(|b| io::IoSliceMut::new(b)),
                );
                self.transport.read_vectored(&mut iov)
            };
            match got {
                Ok(0) => return Err(self.eof()),
                Ok(mut n) => {
                    self.consumed += n as u64;
                    while n > 0 {
                        let take = n.min(bufs[i].len() - off);
                        n -= take;
                        off += take;
                        if off == bufs[i].len() {
                            i += 1;
                            off = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_error(e)),
            }
        }
        Ok(())
    }

    /// Reads one byte, or `None` at a clean end of the stream.
    ///
    /// # Errors
    /// [`Error::Read`] on I/O failure.
    pub fn try_get_u8(&mut self) -> Result<Option<u8>> {
        self.check()?;
        if self.rpos == self.rend && self.fill()? == 0 {
            return Ok(None);
        }
        let v = self.rbuf[self.rpos];
        self.rpos += 1;
        self.consumed += 1;
        Ok(Some(v))
    }

    /// Reads one byte.
    ///
    /// # Errors
    /// [`Error::UnexpectedEof`] or [`Error::Read`].
    pub fn get_u8(&mut self) -> Result<u8> {
        match self.try_get_u8()? {
            Some(v) => Ok(v),
            None => Err(self.eof()),
        }
    }

    /// Reads a big-endian u16.
    ///
    /// # Errors
    /// [`Error::UnexpectedEof`] or [`Error::Read`].
    pub fn get_be16(&mut self) -> Result<u16> {
        let mut b = [0; 2];
        self.get_buffer(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    /// Reads a big-endian u32.
    ///
    /// # Errors
    /// [`Error::UnexpectedEof`] or [`Error::Read`].
    pub fn get_be32(&mut self) -> Result<u32> {
        let mut b = [0; 4];
        self.get_buffer(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Reads a big-endian u64.
    ///
    /// # Errors
    /// [`Error::UnexpectedEof`] or [`Error::Read`].
    pub fn get_be64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        self.get_buffer(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads a one-byte length and that many bytes of UTF-8 (QEMU's counted string);
    /// `what` names it in errors.
    ///
    /// # Errors
    /// [`Error::UnexpectedEof`], [`Error::Read`] or [`Error::InvalidUtf8`].
    pub fn get_counted_string(&mut self, what: &'static str) -> Result<String> {
        let offset = self.consumed;
        let len = self.get_u8()?;
        let mut b = vec![0; usize::from(len)];
        self.get_buffer(&mut b)?;
        String::from_utf8(b).map_err(|_| self.set_error(Error::InvalidUtf8 { what, offset }))
    }

    /// Reads `len` bytes into a new vector, refusing (before allocating) a `len` above
    /// `limit`; `what` names the data in errors.
    ///
    /// # Errors
    /// [`Error::LengthTooLarge`], [`Error::UnexpectedEof`] or [`Error::Read`].
    pub fn get_bytes(&mut self, len: u64, limit: usize, what: &'static str) -> Result<Vec<u8>> {
        self.check_length(len, limit as u64, what)?;
        let mut v = vec![0; len as usize];
        self.get_buffer(&mut v)?;
        Ok(v)
    }

    /// Fails with [`Error::LengthTooLarge`] when a length from the stream exceeds `limit`.
    ///
    /// # Errors
    /// [`Error::LengthTooLarge`] (which becomes sticky).
    pub fn check_length(&mut self, len: u64, limit: u64, what: &'static str) -> Result<()> {
        if len > limit {
            let offset = self.consumed;
            return Err(self.set_error(Error::LengthTooLarge {
                what,
                len,
                limit,
                offset,
            }));
        }
        Ok(())
    }

    /// Bytes read from the transport and not consumed yet: what the next reads (and a
    /// [`QemuFile::peek`] of at most this many) get without waiting.
    pub fn buffered(&self) -> usize {
        self.rend - self.rpos
    }

    /// Looks at the next bytes without consuming them (QEMU's `qemu_peek_buffer`): up to
    /// `n` of them, fewer only where the stream ends first. `n` is at most 4096.
    ///
    /// # Errors
    /// [`Error::Read`] on I/O failure.
    ///
    /// # Panics
    /// If `n` is more than 4096.
    pub fn peek(&mut self, n: usize) -> Result<&[u8]> {
        assert!(n <= PEEK_MAX, "a peek of {n} bytes, more than {PEEK_MAX}");
        self.check()?;
        if self.rend - self.rpos < n {
            // Keep what is buffered at the front and read behind it.
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
            while self.rend < n {
                match self.transport.read(&mut self.rbuf[self.rend..]) {
                    Ok(0) => break,
                    Ok(k) => self.rend += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.read_error(e)),
                }
            }
        }
        let end = self.rend.min(self.rpos + n);
        Ok(&self.rbuf[self.rpos..end])
    }

    /// Reads and discards `n` bytes.
    ///
    /// # Errors
    /// [`Error::UnexpectedEof`] or [`Error::Read`].
    pub fn skip(&mut self, mut n: u64) -> Result<()> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            self.get_buffer(&mut scratch[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
}

/// Writes the queued segments with as few `writev` calls as the transport allows.
fn write_segments(t: &mut dyn Transport, buf: &[u8], segments: &[Segment]) -> io::Result<()> {
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(segments.len().min(IOV_MAX));
    for batch in segments.chunks(IOV_MAX) {
        iov.clear();
        iov.extend(batch.iter().map(|s| match *s {
            Segment::Local { start, end } => IoSlice::new(&buf[start..end]),
            Segment::External { ptr, len } => {
                // SAFETY: `put_buffer_external`'s contract: the memory stays mapped while its
                // keep-alive owner, held by the `QemuFile` until this write returns, lives.
                let bytes = unsafe { std::slice::from_raw_parts(ptr.0, len) };
                IoSlice::new(bytes)
            }
        }));
        let mut rest = &mut iov[..];
        while !rest.is_empty() {
            match t.write_vectored(rest) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the transport accepted no more bytes",
                    ));
                }
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_split_reader_takes_the_bytes_read_ahead_and_the_writer_stays() {
        use std::io::{Read, Write};
        let (a, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut f = QemuFile::new(Box::new(crate::transport::UnixTransport::new(
            a,
            "unix:pair".into(),
        )));
        peer.write_all(b"abcdef").unwrap();
        assert_eq!(f.get_u8().unwrap(), b'a');
        let mut r = f.split_reader().unwrap();
        peer.write_all(b"gh").unwrap();
        let mut rest = [0u8; 7];
        r.get_buffer(&mut rest).unwrap();
        assert_eq!(&rest, b"bcdefgh");
        // Both handles write to the same peer.
        f.put_buffer(b"12");
        f.flush().unwrap();
        let mut w = f.return_path().unwrap();
        w.put_buffer(b"34");
        w.flush().unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"1234");
        // A file has no second handle.
        assert!(QemuFile::from_bytes(vec![1]).return_path().is_err());
    }

    use super::*;
    use crate::{MemBuffer, mem_channel};

    fn written(f: impl FnOnce(&mut QemuFile)) -> Vec<u8> {
        let buf = MemBuffer::new();
        let mut q = buf.file();
        f(&mut q);
        q.flush().unwrap();
        buf.contents()
    }

    #[test]
    fn integers_are_big_endian() {
        let b = written(|q| {
            q.put_u8(0xab);
            q.put_be16(0x0102);
            q.put_be32(0x0304_0506);
            q.put_be64(0x0708_090a_0b0c_0d0e);
            q.put_counted_string("ram");
        });
        assert_eq!(
            b,
            [
                0xab, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 3, b'r', b'a', b'm'
            ]
        );
        let mut q = QemuFile::from_bytes(b);
        assert_eq!(q.get_u8().unwrap(), 0xab);
        assert_eq!(q.get_be16().unwrap(), 0x0102);
        assert_eq!(q.get_be32().unwrap(), 0x0304_0506);
        assert_eq!(q.get_be64().unwrap(), 0x0708_090a_0b0c_0d0e);
        assert_eq!(q.get_counted_string("name").unwrap(), "ram");
        assert_eq!(q.bytes_read(), 19);
        assert_eq!(q.try_get_u8().unwrap(), None);
    }

    #[test]
    fn external_buffers_keep_their_place_in_the_stream() {
        let page: Arc<Vec<u8>> = Arc::new((0..=255u8).cycle().take(4096).collect());
        let owner: KeepAlive = page.clone();
        let b = written(|q| {
            for i in 0..3u64 {
                q.put_be64(i);
                // SAFETY: `page` is kept alive by `owner`.
                unsafe { q.put_buffer_external(page.as_ptr(), page.len(), &owner) };
            }
            assert_eq!(
                q.keep_alive.len(),
                1,
                "one clone for consecutive pages of one owner"
            );
        });
        assert_eq!(b.len(), 3 * (8 + 4096));
        for i in 0..3 {
            let rec = &b[i * 4104..(i + 1) * 4104];
            assert_eq!(rec[..8], (i as u64).to_be_bytes());
            assert_eq!(&rec[8..], &page[..]);
        }
        assert_eq!(
            Arc::strong_count(&page),
            2,
            "the queue dropped its clone after the flush"
        );
    }

    #[test]
    fn adjacent_external_pieces_become_one_segment() {
        let data: Arc<Vec<u8>> = Arc::new((0..4 * 4096u32).map(|i| (i / 7) as u8).collect());
        let owner: KeepAlive = data.clone();
        let b = written(|q| {
            for page in [0, 1, 3] {
                // SAFETY: inside `data`, kept alive by `owner`.
                unsafe { q.put_buffer_external(data.as_ptr().add(page * 4096), 4096, &owner) };
            }
            assert_eq!(q.segments.len(), 2, "pages 0-1 joined, page 3 apart");
        });
        let mut expect = data[..2 * 4096].to_vec();
        expect.extend_from_slice(&data[3 * 4096..]);
        assert_eq!(b, expect);
    }

    #[test]
    fn more_segments_than_iov_max_are_written_in_order() {
        let data: Arc<Vec<u8>> = Arc::new((0..5000u32).map(|i| i as u8).collect());
        let owner: KeepAlive = data.clone();
        let b = written(|q| {
            for i in 0..5000 {
                q.put_u8(0xee);
                // SAFETY: kept alive by `owner`.
                unsafe { q.put_buffer_external(data.as_ptr().add(i), 1, &owner) };
            }
        });
        let expect: Vec<u8> = (0..5000u32).flat_map(|i| [0xee, i as u8]).collect();
        assert_eq!(b, expect);
    }

    #[test]
    fn every_truncation_is_an_unexpected_eof_at_the_right_offset() {
        let full = written(|q| {
            q.put_be32(7);
            q.put_be64(9);
            q.put_counted_string("block");
        });
        for cut in 0..full.len() {
            let mut q = QemuFile::from_bytes(full[..cut].to_vec());
            let r = (|| -> Result<()> {
                q.get_be32()?;
                q.get_be64()?;
                q.get_counted_string("name")?;
                Ok(())
            })();
            match r {
                Err(Error::UnexpectedEof { offset }) => assert!(offset <= cut as u64),
                other => panic!("cut at {cut}: {other:?}"),
            }
            // The error is sticky.
            assert!(matches!(q.get_u8(), Err(Error::UnexpectedEof { .. })));
        }
    }

    #[test]
    fn lengths_are_checked_before_allocating() {
        let mut q = QemuFile::from_bytes(vec![0; 16]);
        match q.get_bytes(u64::MAX, 1 << 20, "device state") {
            Err(Error::LengthTooLarge {
                what,
                len,
                limit,
                offset,
            }) => {
                assert_eq!(
                    (what, len, limit, offset),
                    ("device state", u64::MAX, 1 << 20, 0)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_peek_reads_ahead_without_consuming_across_short_reads() {
        // A transport that hands out 3 bytes per read.
        #[derive(Debug)]
        struct Trickle(std::collections::VecDeque<u8>);
        impl Transport for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(3).min(self.0.len());
                for b in &mut buf[..n] {
                    *b = self.0.pop_front().expect("counted");
                }
                Ok(n)
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                Ok(bufs.iter().map(|b| b.len()).sum())
            }
            fn describe(&self) -> String {
                "trickle".into()
            }
        }
        let mut q = QemuFile::new(Box::new(Trickle((0..20u8).collect())));
        assert_eq!(q.get_u8().unwrap(), 0);
        assert_eq!(q.peek(10).unwrap(), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(q.get_u8().unwrap(), 1);
        assert_eq!(q.bytes_read(), 2);
        assert_eq!(q.peek(2).unwrap(), &[2, 3]);
        q.skip(15).unwrap();
        assert_eq!(
            q.peek(10).unwrap(),
            &[17, 18, 19],
            "the end cuts a peek short"
        );
        let mut rest = [0; 3];
        q.get_buffer(&mut rest).unwrap();
        assert_eq!(rest, [17, 18, 19]);
        assert_eq!(q.peek(1).unwrap(), &[] as &[u8]);
    }

    #[test]
    fn invalid_utf8_names_are_refused() {
        let mut q = QemuFile::from_bytes(vec![2, 0xff, 0xfe]);
        assert!(matches!(
            q.get_counted_string("RAM block name"),
            Err(Error::InvalidUtf8 {
                what: "RAM block name",
                offset: 0
            })
        ));
    }

    #[test]
    fn large_reads_bypass_the_buffer_and_stay_exact() {
        let data: Vec<u8> = (0..(3 * READ_BUF + 17)).map(|i| (i * 7) as u8).collect();
        let mut q = QemuFile::from_bytes(data.clone());
        let mut a = [0u8; 5];
        q.get_buffer(&mut a).unwrap();
        let mut rest = vec![0u8; data.len() - 5];
        q.get_buffer(&mut rest).unwrap();
        assert_eq!(&a[..], &data[..5]);
        assert_eq!(&rest[..], &data[5..]);
    }

    #[test]
    fn write_errors_are_sticky_and_puts_become_no_ops() {
        let (a, b) = mem_channel(16);
        drop(b);
        let mut q = QemuFile::new(Box::new(a));
        q.put_be64(1);
        let e = q.flush().unwrap_err();
        assert!(matches!(e, Error::Write { .. }), "{e}");
        q.put_be64(2);
        assert_eq!(q.bytes_queued(), 0);
        assert!(matches!(q.check(), Err(Error::Write { .. })));
        assert!(matches!(q.flush(), Err(Error::Write { .. })));
    }

    #[test]
    fn shutdown_unblocks_a_writer_stuck_on_a_full_pipe() {
        let (a, _b) = mem_channel(8);
        let mut q = QemuFile::new(Box::new(a));
        let h = q.shutdown_handle().unwrap();
        let t = std::thread::spawn(move || {
            q.put_buffer(&[0; 1024]);
            q.flush()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        h.shutdown();
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn budget_counts_queued_bytes() {
        let mut q = QemuFile::new(Box::new(MemBuffer::new()));
        q.set_chunk_budget(10);
        q.put_be64(0);
        assert!(!q.budget_exhausted());
        q.put_be16(0);
        assert!(q.budget_exhausted());
        q.flush().unwrap();
        assert!(!q.budget_exhausted());
        assert_eq!(q.bytes_written(), 10);
        assert_eq!(q.bytes_flushed(), 10);
    }

    #[test]
    fn bytes_carried_elsewhere_count_in_the_total_and_the_rate() {
        let mut q = QemuFile::new(Box::new(MemBuffer::new()));
        q.set_chunk_budget(100);
        q.put_be64(0);
        q.account_elsewhere(1000);
        assert!(!q.budget_exhausted(), "the chunk budget is this stream's");
        assert_eq!(q.bytes_written(), 1008);
        q.flush().unwrap();
        assert_eq!(
            q.bytes_flushed(),
            8,
            "only this stream's bytes were written here"
        );
        q.rate_limiter().set_max_bytes_per_sec(1000);
        q.account_elsewhere(100);
        assert!(q.budget_exhausted(), "the rate limiter saw them");
    }

    #[test]
    fn get_buffers_fills_every_buffer_in_order_across_reads() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        let (a, b) = mem_channel(777);
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut q = QemuFile::new(Box::new(a));
                q.put_buffer(&data);
                q.finish().unwrap();
            })
        };
        let mut q = QemuFile::new(Box::new(b));
        assert_eq!(q.get_u8().unwrap(), 0, "some bytes are buffered first");
        let mut bufs = [
            vec![0u8; 4096],
            vec![0u8; 0],
            vec![0u8; 9000],
            vec![0u8; 6903],
            vec![],
        ];
        let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        q.get_buffers(&mut slices).unwrap();
        assert_eq!(bufs.concat(), data[1..]);
        assert_eq!(q.bytes_read(), 20_000);
        let mut more = [0u8; 1];
        assert!(matches!(
            q.get_buffers(&mut [&mut more[..]]),
            Err(Error::UnexpectedEof { .. })
        ));
        writer.join().unwrap();
    }

    #[test]
    fn rate_limit_applies_to_queued_bytes() {
        let mut q = QemuFile::new(Box::new(MemBuffer::new()));
        q.rate_limiter().set_max_bytes_per_sec(1000);
        q.put_buffer(&[0; 99]);
        assert!(!q.budget_exhausted());
        q.put_u8(0);
        assert!(q.budget_exhausted());
    }
}
