//! The `smoltcp::phy::Device` rnet hands to the interface.
//!
//! rnet does its own frame dispatch (see [`crate::wire::classify`]), so the device
//! smoltcp sees holds at most one received frame, the one already matched to
//! a flow, and transmits straight into the TAP's scratch buffer. There is no
//! queue and no allocation per frame.
//!
//! With TAP offloads on (see [`crate::phy::tap`]), the device tells smoltcp to
//! neither verify nor compute TCP checksums (the classifier checks those the
//! kernel does not vouch for; the guest kernel completes ours) and that
//! TCP segments of up to 64 KiB may be handed over whole, to be cut into
//! the guest's MSS by the guest kernel: smoltcp marks IPv4 ones itself;
//! IPv6 ones (smoltcp 0.14 cannot mark them) are cut to the MSS rnet kept
//! when it enlarged the guest's (see [`crate::stack::rewrite_syn_mss`]).

use std::num::NonZeroUsize;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;

use crate::phy::tap::TapTx;
use crate::phy::vnet::{Gso, MAX_GSO_FRAME};

/// A one-frame device over the TAP.
pub struct FrameDevice<'a> {
    rx: Option<&'a [u8]>,
    tx: TapTx<'a>,
    mtu: usize,
    guest_mss: Option<u16>,
}

impl<'a> FrameDevice<'a> {
    /// A device that yields `rx` once (if any) and writes to `tx`.
    /// `mtu` is the IP MTU. (The TAP writer counts what it sends.)
    pub fn new(rx: Option<&'a [u8]>, tx: TapTx<'a>, mtu: usize) -> Self {
        Self {
            rx,
            tx,
            mtu,
            guest_mss: None,
        }
    }

    /// A token that writes one frame into the TAP (cut to the guest's MSS
    /// unless smoltcp asks for another size).
    fn tx_token(&mut self) -> Tx<'_> {
        Tx {
            tx: self.tx.reborrow(),
            gso: self.guest_mss.map(Gso::Mss),
        }
    }

    /// The guest's real MSS for a flow whose SYN rnet rewrote (IPv6 with
    /// offloads): segments larger than it leave as GSO frames cut to it.
    pub fn with_guest_mss(mut self, mss: Option<u16>) -> Self {
        self.guest_mss = mss;
        self
    }

    /// Checksum work: the classifier has already checked the guest's TCP
    /// checksums, so smoltcp only computes ours; with `offloads`, the guest
    /// kernel completes them instead.
    pub fn checksums(offloads: bool) -> ChecksumCapabilities {
        let mut c = ChecksumCapabilities::default();
        c.ipv4 = Checksum::Both;
        c.tcp = if offloads {
            Checksum::None
        } else {
            Checksum::Tx
        };
        c
    }
}

impl phy::Device for FrameDevice<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _ts: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.take()?;
        Some((Rx(frame), self.tx_token()))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<Self::TxToken<'_>> {
        Some(self.tx_token())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        let offloads = self.tx.offloads();
        // With offloads smoltcp may build segments up to 64 KiB: IPv4 ones
        // it marks for segmentation itself; IPv6 ones (which smoltcp 0.14
        // cannot mark) only for flows whose SYN advertised a large MSS, with
        // the guest's real MSS kept by rnet. smoltcp sends nothing else
        // larger than the link MTU (UDP and ICMP never go through it).
        caps.max_transmission_unit = if offloads {
            MAX_GSO_FRAME
        } else {
            self.mtu + 14
        };
        caps.checksum = Self::checksums(offloads);
        if offloads {
            caps.segmentation.tcpv4 = NonZeroUsize::new(MAX_GSO_FRAME);
        }
        caps
    }
}

/// Receive token: the frame already read from the TAP.
pub struct Rx<'b>(&'b [u8]);

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

/// Transmit token: builds the frame in the TAP scratch buffer and writes it.
pub struct Tx<'b> {
    tx: TapTx<'b>,
    gso: Option<Gso>,
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        self.tx.send_with(len, self.gso, f).0
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        if let Some(size) = meta.segmentation_offload_size {
            self.gso = Some(Gso::Payload(size.get()));
        }
    }
}
