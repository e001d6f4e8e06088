//! The TAP file descriptor as the data plane sees it: non-blocking reads of
//! whole Ethernet frames into one preallocated buffer, and writes of frames
//! built in place.
//!
//! The descriptor itself is created inside the target namespace by
//! [`crate::ns`] and handed over with SCM_RIGHTS; this module only moves
//! frames. Nothing here allocates per frame.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::pcap::PcapWriter;

/// Largest frame a TAP hands us: 65535-byte IP packet plus the Ethernet
/// header, rounded up.
pub const MAX_FRAME: usize = 65536 + 64;

/// Result of one read attempt on the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A frame of this many bytes is in the read buffer.
    Frame(usize),
    /// Nothing more to read right now.
    WouldBlock,
    /// The device is gone (namespace destroyed).
    Closed,
}

/// A non-blocking TAP descriptor with its frame buffers.
pub struct Tap {
    fd: OwnedFd,
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    pcap: Option<PcapWriter>,
    out: OutCounters,
}

/// Frames and bytes written to the TAP.
#[derive(Default, Clone, Copy, Debug)]
pub struct OutCounters {
    /// Frames written.
    pub frames: u64,
    /// Bytes written.
    pub bytes: u64,
}

impl Tap {
    /// Wraps a TAP fd, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = fcntl(&fd, FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags))?;
        Ok(Self {
            fd,
            rx: vec![0u8; MAX_FRAME].into_boxed_slice(),
            tx: vec![0u8; MAX_FRAME].into_boxed_slice(),
            pcap: None,
            out: OutCounters::default(),
        })
    }

    /// Frames and bytes written so far.
    pub fn out_counters(&self) -> OutCounters {
        self.out
    }

    /// Records every frame read or written from now on.
    pub fn set_pcap(&mut self, w: PcapWriter) {
        self.pcap = Some(w);
    }

    /// Flushes the capture file, if any (called when the loop goes idle).
    pub fn flush_pcap(&mut self) {
        if let Some(p) = &mut self.pcap {
            p.flush();
        }
    }

    /// Reads one frame into the receive buffer.
    pub fn read_frame(&mut self) -> io::Result<ReadOutcome> {
        loop {
            match nix::unistd::read(&self.fd, &mut self.rx) {
                Ok(0) => return Ok(ReadOutcome::Closed),
                Ok(n) => {
                    if let Some(p) = &mut self.pcap {
                        p.record(&self.rx[..n]);
                    }
                    return Ok(ReadOutcome::Frame(n));
                }
                Err(Errno::EAGAIN) => return Ok(ReadOutcome::WouldBlock),
                Err(Errno::EINTR) => continue,
                Err(Errno::EBADFD) | Err(Errno::EIO) => return Ok(ReadOutcome::Closed),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The receive buffer (valid up to the length [`Tap::read_frame`] returned)
    /// and the transmit side, borrowed apart so a reply can be built while the
    /// received frame is still being looked at.
    pub fn split(&mut self) -> (&[u8], TapTx<'_>) {
        (
            &self.rx,
            TapTx {
                fd: self.fd.as_fd(),
                buf: &mut self.tx,
                pcap: self.pcap.as_mut(),
                out: &mut self.out,
            },
        )
    }

    /// The transmit side alone.
    pub fn tx(&mut self) -> TapTx<'_> {
        TapTx {
            fd: self.fd.as_fd(),
            buf: &mut self.tx,
            pcap: self.pcap.as_mut(),
            out: &mut self.out,
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The transmit half of a [`Tap`]: a scratch buffer to build one frame in
/// and the descriptor to write it to.
pub struct TapTx<'a> {
    fd: BorrowedFd<'a>,
    buf: &'a mut [u8],
    pcap: Option<&'a mut PcapWriter>,
    out: &'a mut OutCounters,
}

impl TapTx<'_> {
    /// Builds a frame of `len` bytes with `f` in the scratch buffer and writes
    /// it. Returns whether the frame was handed to the kernel.
    pub fn send_with<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> (R, bool) {
        let len = len.min(self.buf.len());
        let r = f(&mut self.buf[..len]);
        let sent = self.write(len);
        (r, sent)
    }

    /// Builds a frame with `f`, which fills the scratch buffer and returns the
    /// frame's length (0: nothing to send), then writes it.
    pub fn build(&mut self, f: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let len = f(self.buf).min(self.buf.len());
        len > 0 && self.write(len)
    }

    fn write(&mut self, len: usize) -> bool {
        let frame = &self.buf[..len];
        let sent = write_frame(self.fd, frame);
        if sent {
            self.out.frames += 1;
            self.out.bytes += len as u64;
            if let Some(p) = &mut self.pcap {
                p.record(frame);
            }
        }
        sent
    }

    /// Reborrows this transmit half.
    pub fn reborrow(&mut self) -> TapTx<'_> {
        TapTx {
            fd: self.fd,
            buf: self.buf,
            pcap: self.pcap.as_deref_mut(),
            out: self.out,
        }
    }
}

/// Writes one frame; a full queue or a vanished device drops it (the guest's
/// TCP retransmits) and reports false.
fn write_frame(fd: BorrowedFd<'_>, frame: &[u8]) -> bool {
    loop {
        match nix::unistd::write(fd, frame) {
            Ok(_) => return true,
            Err(Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}
