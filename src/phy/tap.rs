//! The TAP file descriptor as the data plane sees it: non-blocking reads of
//! whole Ethernet frames into one preallocated buffer, and writes of frames
//! built in place.
//!
//! The descriptor itself is created inside the target namespace by
//! [`crate::ns`] and handed over with SCM_RIGHTS; this module only moves
//! frames. Nothing here allocates per frame.
//!
//! With offloads on, each frame comes and goes behind a virtio-net header;
//! what it means, the offload flags and the checksums it implies are
//! [`crate::phy::vnet`]'s.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use std::io::{IoSlice, IoSliceMut};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::phy::pcap::PcapWriter;
use crate::phy::tunnel::{TunnelGso, TunnelTrain};
use crate::phy::vnet::{
    Gso, RxMeta, VNET_HDR_LEN, VNET_TNL_HDR_LEN, VnetHdr, complete_inner_checksum, tcp_offload,
    try_tunnel_gso, try_uso, tunnel_gso, udp_offload,
};

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
    vnet: bool,
    uso: bool,
    /// UDP-tunnel GSO on: 24-byte headers.
    tnl: bool,
    rx_meta: RxMeta,
    /// A cut tunnel super-frame whose datagrams are still to be returned.
    tunnel: Option<Box<TunnelTrain>>,
    /// Tunnel super-frames cut so far.
    tunnel_frames: u64,
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
    /// Wraps a TAP fd whose frames are bare Ethernet frames, switching it to
    /// non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Self::with_vnet_hdr(fd, false)
    }

    /// Wraps a TAP fd; `vnet` says each frame is preceded by a 12-byte
    /// virtio-net header (IFF_VNET_HDR with TUNSETVNETHDRSZ 12).
    pub fn with_vnet_hdr(fd: OwnedFd, vnet: bool) -> io::Result<Self> {
        let flags = fcntl(&fd, FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags))?;
        let uso = vnet && try_uso(fd.as_fd());
        let tnl = uso && try_tunnel_gso(fd.as_fd());
        Ok(Self {
            fd,
            rx: vec![0u8; MAX_FRAME].into_boxed_slice(),
            tx: vec![0u8; MAX_FRAME].into_boxed_slice(),
            pcap: None,
            out: OutCounters::default(),
            vnet,
            uso,
            tnl,
            rx_meta: RxMeta::default(),
            tunnel: None,
            tunnel_frames: 0,
        })
    }

    /// Whether the guest may hand over UDP-tunnel super-frames.
    pub fn tunnel_gso(&self) -> bool {
        self.tnl
    }

    /// UDP-tunnel super-frames from the guest cut so far.
    pub fn tunnel_frames(&self) -> u64 {
        self.tunnel_frames
    }

    /// Whether frames carry a virtio-net header (offloads on).
    pub fn offloads(&self) -> bool {
        self.vnet
    }

    /// Whether UDP trains go to the guest as one super-frame (USO on).
    pub fn uso(&self) -> bool {
        self.uso
    }

    /// What the kernel said about the frame last read.
    pub fn rx_meta(&self) -> RxMeta {
        self.rx_meta
    }

    /// The receive buffer, to rewrite a frame in place before it is handled.
    pub fn rx_mut(&mut self) -> &mut [u8] {
        &mut self.rx
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

    /// Reads one frame into the receive buffer (with offloads, its header
    /// comes in the same readv, so the frame still starts at the beginning
    /// of the buffer).
    pub fn read_frame(&mut self) -> io::Result<ReadOutcome> {
        if let Some(n) = self.next_tunnel_frame() {
            return Ok(ReadOutcome::Frame(n));
        }
        let mut hdr = [0u8; VNET_TNL_HDR_LEN];
        let hdr_len = if self.tnl {
            VNET_TNL_HDR_LEN
        } else {
            VNET_HDR_LEN
        };
        let n = loop {
            let r = if self.vnet {
                let mut iov = [
                    IoSliceMut::new(&mut hdr[..hdr_len]),
                    IoSliceMut::new(&mut self.rx),
                ];
                nix::sys::uio::readv(&self.fd, &mut iov)
            } else {
                nix::unistd::read(&self.fd, &mut self.rx)
            };
            match r {
                Ok(0) => return Ok(ReadOutcome::Closed),
                Ok(n) => break n,
                Err(Errno::EAGAIN) => return Ok(ReadOutcome::WouldBlock),
                Err(Errno::EINTR) => continue,
                Err(Errno::EBADFD) | Err(Errno::EIO) => return Ok(ReadOutcome::Closed),
                Err(e) => return Err(e.into()),
            }
        };
        let n = if self.vnet {
            let n = self.take_vnet_hdr(&hdr, hdr_len, n);
            if self.rx_meta.unsupported && self.tnl {
                if let Some(t) = tunnel_gso(&hdr) {
                    return Ok(ReadOutcome::Frame(self.cut_tunnel(t, n)));
                }
            }
            n
        } else {
            n
        };
        if let Some(p) = &mut self.pcap {
            p.record(&self.rx[..n]);
        }
        Ok(ReadOutcome::Frame(n))
    }

    /// Notes what the header of a read of `n` bytes says about the frame
    /// behind it, completes a partial checksum inside its payload, and
    /// returns the frame's length.
    fn take_vnet_hdr(&mut self, hdr: &[u8; VNET_TNL_HDR_LEN], hdr_len: usize, n: usize) -> usize {
        if n < hdr_len {
            // Cannot come from the kernel; an empty frame is dropped (and
            // counted) as malformed by the classifier.
            self.rx_meta = RxMeta::default();
            return 0;
        }
        let h = VnetHdr::parse(hdr[..VNET_HDR_LEN].try_into().unwrap_or(&[0; VNET_HDR_LEN]));
        let gso = h.gso_type & !VnetHdr::GSO_ECN;
        self.rx_meta = RxMeta {
            l4_csum_vouched: h.flags & (VnetHdr::NEEDS_CSUM | VnetHdr::DATA_VALID) != 0,
            gso: matches!(
                gso,
                VnetHdr::GSO_TCPV4 | VnetHdr::GSO_TCPV6 | VnetHdr::GSO_UDP_L4
            ),
            unsupported: !matches!(
                gso,
                VnetHdr::GSO_NONE | VnetHdr::GSO_TCPV4 | VnetHdr::GSO_TCPV6 | VnetHdr::GSO_UDP_L4
            ),
            udp_gso: (gso == VnetHdr::GSO_UDP_L4).then_some(h.gso_size),
        };
        let n = n - hdr_len;
        if h.flags & VnetHdr::NEEDS_CSUM != 0 && !self.rx_meta.unsupported {
            complete_inner_checksum(&mut self.rx[..n], &h);
        }
        n
    }

    /// Cuts the UDP-tunnel super-frame of `n` bytes in the receive buffer
    /// and returns the first frame of its datagrams; a frame that does not
    /// parse stays as it is, unsupported (the classifier drops and counts
    /// it).
    fn cut_tunnel(&mut self, t: TunnelGso, n: usize) -> usize {
        let tr = self.tunnel.get_or_insert_with(Box::default);
        if !tr.cut(&self.rx[..n], t, self.rx.len()) {
            return n;
        }
        self.tunnel_frames += 1;
        self.next_tunnel_frame().unwrap_or(n)
    }

    /// The next frame of a cut tunnel super-frame, if datagrams are left: a
    /// USO super-frame of the outer flow (one datagram: a plain frame).
    fn next_tunnel_frame(&mut self) -> Option<usize> {
        let (n, seg) = self.tunnel.as_deref_mut()?.next(&mut self.rx)?;
        self.rx_meta = RxMeta {
            l4_csum_vouched: true,
            gso: seg.is_some(),
            unsupported: false,
            udp_gso: seg,
        };
        if let Some(p) = &mut self.pcap {
            p.record(&self.rx[..n]);
        }
        Some(n)
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
                vnet: self.vnet,
                uso: self.uso,
                tnl: self.tnl,
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
            vnet: self.vnet,
            uso: self.uso,
            tnl: self.tnl,
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
    vnet: bool,
    uso: bool,
    tnl: bool,
}

impl TapTx<'_> {
    /// Whether frames leave with a virtio-net header (offloads on).
    pub fn offloads(&self) -> bool {
        self.vnet
    }

    /// Builds a frame of `len` bytes with `f` in the scratch buffer and
    /// writes it: the path of frames from smoltcp. With offloads on, a TCP
    /// segment's checksum is left for the guest kernel (smoltcp then leaves
    /// it zero) and a segment whose payload exceeds the piece size `gso`
    /// gives goes out as one GSO frame. Returns whether the frame was handed
    /// to the kernel.
    pub fn send_with<R>(
        &mut self,
        len: usize,
        gso: Option<Gso>,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> (R, bool) {
        let len = len.min(self.buf.len());
        let r = f(&mut self.buf[..len]);
        let hdr = if self.vnet {
            tcp_offload(&mut self.buf[..len], gso)
        } else {
            VnetHdr::default()
        };
        let sent = self.write(len, hdr);
        (r, sent)
    }

    /// Builds a frame with `f`, which fills the scratch buffer (checksums
    /// complete) and returns the frame's length (0: nothing to send), then
    /// writes it.
    pub fn build(&mut self, f: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let len = f(self.buf).min(self.buf.len());
        len > 0 && self.write(len, VnetHdr::default())
    }

    /// Whether a UDP train may go to the guest as one super-frame.
    pub fn uso(&self) -> bool {
        self.uso
    }

    /// Size of the scratch buffer frames are built in.
    pub fn buf_len(&self) -> usize {
        self.buf.len()
    }

    /// The scratch buffer, to place payload before [`TapTx::build`] or
    /// [`TapTx::build_udp_train`] writes the headers around it.
    pub fn buf_mut(&mut self) -> &mut [u8] {
        self.buf
    }

    /// Builds, with `f`, one UDP frame whose payload is a train of datagrams
    /// of `seg` bytes (the last may be shorter) and writes it as one USO
    /// super-frame: the checksum is left partial and the guest kernel cuts
    /// the train apart. Only with [`TapTx::uso`].
    pub fn build_udp_train(&mut self, seg: u16, f: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let len = f(self.buf).min(self.buf.len());
        if len == 0 {
            return false;
        }
        let hdr = udp_offload(&mut self.buf[..len], seg);
        self.write(len, hdr)
    }

    fn write(&mut self, len: usize, hdr: VnetHdr) -> bool {
        let frame = &self.buf[..len];
        let mut bytes = [0u8; VNET_TNL_HDR_LEN];
        bytes[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
        let hdr = &bytes[..if self.tnl {
            VNET_TNL_HDR_LEN
        } else {
            VNET_HDR_LEN
        }];
        let sent = write_frame(self.fd, self.vnet.then_some(hdr), frame);
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
            vnet: self.vnet,
            uso: self.uso,
            tnl: self.tnl,
        }
    }
}

/// Writes one frame, behind its virtio-net header when `hdr` is given; a
/// full queue or a vanished device drops it (the guest's TCP retransmits)
/// and reports false.
fn write_frame(fd: BorrowedFd<'_>, hdr: Option<&[u8]>, frame: &[u8]) -> bool {
    loop {
        let r = match hdr {
            Some(h) => nix::sys::uio::writev(fd, &[IoSlice::new(h), IoSlice::new(frame)]),
            None => nix::unistd::write(fd, frame),
        };
        match r {
            Ok(_) => return true,
            Err(Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}
