//! A free list of TCP ring mappings, so that short connections do not map
//! and unmap two rings each.
//!
//! Every TCP flow borrows two [`RING_CAP`] anonymous mappings (see the
//! parent module's "Ring memory"). Making one costs an
//! `mmap` and a new memory area, ending one a `munmap` and a TLB shootdown;
//! at thousands of connections a second that is a good share of a flow's
//! cost. A ring that is given back here has its resident pages released
//! with one `madvise(MADV_DONTNEED)` over the chunks that may hold any (none
//! when it was never written), so a pooled ring holds address space only,
//! no memory: the engine's memory budget, which counts resident chunks of
//! live flows, is unchanged by the pool. The next flow takes it instead of
//! mapping a fresh one; it reads as zero again, like a fresh mapping.
//!
//! The pool holds at most [`POOL_CAP`] rings (address space, never memory);
//! beyond that a ring is unmapped as before. It is shared by the engines of
//! a process (one lock per take and give, never contended on the per-packet
//! path: rings move only when flows open and close).

use std::io;
use std::ptr::NonNull;
use std::sync::Mutex;

use super::{CHUNK, RING_CAP};

/// Rings kept for reuse: a burst of short connections at a time, in
/// address space only.
pub(super) const POOL_CAP: usize = 64;

/// Free rings of one size, with counts of how rings were obtained.
pub(super) struct RingPool {
    /// Bytes per ring (a multiple of the page size).
    size: usize,
    /// Bytes per accounting chunk: bit `i` of a `touched` mask covers
    /// `[i * chunk, (i + 1) * chunk)`.
    chunk: usize,
    cap: usize,
    /// Base addresses of free, page-released rings.
    free: Vec<usize>,
    /// Rings mapped fresh.
    pub(super) mapped: u64,
    /// Rings taken from the free list.
    pub(super) reused: u64,
}

impl RingPool {
    /// An empty pool of rings of `size` bytes, released by `chunk`, keeping
    /// at most `cap` free rings.
    pub(super) const fn new(size: usize, chunk: usize, cap: usize) -> Self {
        Self {
            size,
            chunk,
            cap,
            free: Vec::new(),
            mapped: 0,
            reused: 0,
        }
    }

    /// A ring with no resident page: a pooled one, or a fresh mapping.
    pub(super) fn take(&mut self) -> io::Result<NonNull<u8>> {
        if let Some(p) = self.free.pop().and_then(|a| NonNull::new(a as *mut u8)) {
            self.reused += 1;
            return Ok(p);
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched. NORESERVE: the budget, not overcommit accounting, bounds
        // what becomes resident.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.mapped += 1;
        NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))
    }

    /// Takes back a ring made by [`RingPool::take`] of this pool whose
    /// chunks in `touched` may hold pages; nothing may use it afterwards.
    pub(super) fn give(&mut self, base: NonNull<u8>, touched: u64) {
        if self.free.len() >= self.cap {
            // SAFETY: unmaps exactly one ring this pool mapped; the caller
            // no longer uses it.
            unsafe {
                libc::munmap(base.as_ptr().cast(), self.size);
            }
            return;
        }
        if touched != 0 {
            // One call from the first to the last chunk that may hold pages
            // (the chunks between hold none, or none that matter: the ring
            // is dead).
            let first = touched.trailing_zeros() as usize;
            let end = (64 - touched.leading_zeros() as usize) * self.chunk;
            let end = end.min(self.size);
            // SAFETY: the range lies inside the ring; nothing borrows the
            // ring any more (the caller's contract). DONTNEED on a private
            // anonymous mapping makes the pages read as zero again.
            unsafe {
                libc::madvise(
                    base.as_ptr().add(first * self.chunk).cast(),
                    end - first * self.chunk,
                    libc::MADV_DONTNEED,
                );
            }
        }
        self.free.push(base.as_ptr() as usize);
    }
}

impl Drop for RingPool {
    fn drop(&mut self) {
        for &a in &self.free {
            // SAFETY: each free entry is a ring this pool mapped and no one
            // uses.
            unsafe {
                libc::munmap(a as *mut libc::c_void, self.size);
            }
        }
    }
}

/// The process's pool of TCP rings.
static TCP_RINGS: Mutex<RingPool> = Mutex::new(RingPool::new(RING_CAP, CHUNK, POOL_CAP));

/// A TCP ring from the process's pool (see [`RingPool::take`]).
pub(super) fn take_tcp_ring() -> io::Result<NonNull<u8>> {
    TCP_RINGS.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Gives a TCP ring back to the process's pool (see [`RingPool::give`]).
pub(super) fn give_tcp_ring(base: NonNull<u8>, touched: u64) {
    TCP_RINGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .give(base, touched);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = RING_CAP;

    /// Copies `bytes` into memory at `p` through a pipe (the kernel writes
    /// it, as a socket read would).
    fn poke(p: *mut u8, bytes: &[u8]) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors of `fds`.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: writes from and reads into ranges the caller owns; the
        // descriptors are this function's and closed here.
        unsafe {
            assert_eq!(
                libc::write(fds[1], bytes.as_ptr().cast(), bytes.len()),
                bytes.len() as isize
            );
            assert_eq!(
                libc::read(fds[0], p.cast(), bytes.len()),
                bytes.len() as isize
            );
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    fn resident_pages(p: NonNull<u8>, len: usize) -> usize {
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: mincore only reads the page tables of a range this test
        // mapped; `vec` has one byte per page.
        let r = unsafe { libc::mincore(p.as_ptr().cast(), len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|b| **b & 1 != 0).count()
    }

    #[test]
    fn rings_are_reused_and_given_back_without_pages() {
        let mut pool = RingPool::new(SIZE, CHUNK, 2);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_eq!((pool.mapped, pool.reused), (2, 0));
        poke(a.as_ptr(), &[7]);
        poke(a.as_ptr().wrapping_add(5 * CHUNK + 1), &[9]);
        assert_eq!(resident_pages(a, SIZE), 2);
        pool.give(a, 1 | 1 << 5);
        assert_eq!(resident_pages(a, SIZE), 0, "a pooled ring holds no page");
        pool.give(b, 0);
        assert_eq!(pool.free.len(), 2);
        let c = pool.take().unwrap();
        let d = pool.take().unwrap();
        assert_eq!((pool.mapped, pool.reused), (2, 2), "no new mapping");
        let mut got = [c.as_ptr() as usize, d.as_ptr() as usize];
        let mut had = [a.as_ptr() as usize, b.as_ptr() as usize];
        got.sort_unstable();
        had.sort_unstable();
        assert_eq!(got, had);
        let mut back = [1u8];
        let mut fds = [0; 2];
        // SAFETY: as in `poke`: ring `a` is mapped and readable, `back` ours.
        unsafe {
            assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::write(fds[1], a.as_ptr().cast(), 1), 1);
            assert_eq!(libc::read(fds[0], back.as_mut_ptr().cast(), 1), 1);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(back, [0], "a reused ring reads as zero");
        pool.give(c, 0);
        pool.give(d, 0);
    }

    #[test]
    fn a_full_pool_unmaps() {
        let mut pool = RingPool::new(SIZE, CHUNK, 1);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        pool.give(a, 0);
        pool.give(b, 1);
        assert_eq!(pool.free.len(), 1);
        let c = pool.take().unwrap();
        assert_eq!(c, a);
        let _ = pool.take().unwrap();
        assert_eq!(pool.mapped, 3);
    }
}
