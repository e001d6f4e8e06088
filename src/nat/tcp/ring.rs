//! Ring memory of a TCP flow: the anonymous mapping each smoltcp socket
//! ring borrows, which of its chunks are resident, and giving pages back
//! (see "Ring memory" in the parent module's docs).

use std::io;
use std::ptr::NonNull;

use super::{CHUNK, CHUNKS, RING_CAP};

/// One ring's storage: a private anonymous mapping of [`RING_CAP`] bytes
/// that smoltcp's `SocketBuffer` borrows, with the chunks that may be
/// resident (written since they were last given back).
pub(super) struct RingMem {
    base: NonNull<u8>,
    /// Bit `i`: chunk `i` may hold resident pages.
    pub(super) touched: u64,
}

const _: () = assert!(CHUNKS <= 64 && RING_CAP % CHUNK == 0);

// SAFETY: a RingMem owns its mapping exclusively (like a Box<[u8]>); the
// flow that holds it moves between threads only as a whole, with the socket
// borrowing the mapping.
unsafe impl Send for RingMem {}

impl RingMem {
    /// A ring with no page resident until written: a pooled one (see
    /// [`super::pool`]) or a fresh mapping.
    pub(super) fn new() -> io::Result<Self> {
        let base = super::pool::take_tcp_ring()?;
        Ok(Self { base, touched: 0 })
    }

    /// The whole ring as the slice smoltcp works on.
    ///
    /// The slice claims `'static`; it lives as long as this mapping, which
    /// [`TcpFlow`] drops only after the socket set holding the slice
    /// (fields drop in declaration order, and the set never leaves the flow).
    pub(super) fn storage(&self) -> &'static mut [u8] {
        // SAFETY: the mapping is RING_CAP bytes, readable and writable, and
        // handed out once (each RingMem backs exactly one SocketBuffer); see
        // above for its lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), RING_CAP) }
    }

    /// Ring offset of a slice smoltcp handed to a `send`/`recv` closure.
    pub(super) fn offset_of(&self, p: *const u8) -> usize {
        (p as usize).wrapping_sub(self.base.as_ptr() as usize) % RING_CAP
    }

    /// Chunks resident (as far as rnet knows).
    pub(super) fn chunks(&self) -> usize {
        self.touched.count_ones() as usize
    }

    /// Gives back the pages of the chunks in `mask` (which must hold no live
    /// bytes); returns how many chunks were released.
    pub(super) fn release(&mut self, mask: u64) -> usize {
        let mut m = mask & self.touched;
        let n = m.count_ones() as usize;
        while m != 0 {
            let first = m.trailing_zeros() as usize;
            let run = (m >> first).trailing_ones() as usize;
            // SAFETY: the range lies inside the mapping; the chunks hold no
            // byte smoltcp will read before writing it again (the caller's
            // live-byte rule), and nothing borrows the ring during the call
            // (one thread; no smoltcp call is in progress). DONTNEED on a
            // private anonymous mapping makes the pages read as zero again.
            unsafe {
                libc::madvise(
                    self.base.as_ptr().add(first * CHUNK).cast(),
                    run * CHUNK,
                    libc::MADV_DONTNEED,
                );
            }
            m &= !(u64::MAX >> (64 - run) << first);
        }
        self.touched &= !mask;
        n
    }
}

impl Drop for RingMem {
    fn drop(&mut self) {
        // The socket that borrowed the ring is gone (see `storage`): its
        // pages go back, its address space to the pool.
        super::pool::give_tcp_ring(self.base, self.touched);
    }
}

/// How many of the `len` bytes from ring offset `off` may be written: all
/// that fall in chunks already resident (`touched`), plus as many new
/// chunks as `room` allows.
pub(super) fn writable(touched: u64, off: usize, len: usize, room: usize) -> usize {
    let mut n = 0;
    let mut left = room;
    let mut pos = off;
    while n < len {
        let c = pos / CHUNK;
        let in_chunk = ((c + 1) * CHUNK - pos).min(len - n);
        if touched & (1 << (c % CHUNKS)) == 0 {
            if left < CHUNK {
                break;
            }
            left -= CHUNK;
        }
        n += in_chunk;
        pos += in_chunk;
    }
    n
}

/// The chunks covering ring offsets `[start, start + len)`, wrapping.
pub(super) fn span(start: usize, len: usize) -> u64 {
    if len == 0 {
        return 0;
    }
    if len >= RING_CAP {
        return u64::MAX >> (64 - CHUNKS);
    }
    let first = start / CHUNK;
    let last = (start + len - 1) / CHUNK;
    let mut m = 0u64;
    for c in first..=last {
        m |= 1 << (c % CHUNKS);
    }
    m
}
