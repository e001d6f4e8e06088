//! The physical layer: where frames enter and leave rnet.
//!
//! - [`tap`]: the TAP descriptor as the data plane sees it (reading and
//!   writing whole frames, the counters of what left).
//! - [`vnet`]: the virtio-net header in front of each frame with offloads
//!   on: its layout, the offload flags, partial and completed checksums,
//!   GSO towards the guest.
//! - [`tunnel`]: UDP-tunnel GSO super-frames from the guest, cut as a NIC
//!   would.
//! - [`device`]: the one-frame `smoltcp::phy::Device` the interface is
//!   handed, transmitting straight into the TAP's buffer.
//! - [`pcap`]: `--pcap`, a capture of every frame crossing the TAP.
//!
//! Creating the TAP inside the target namespace is [`crate::ns`]'s work;
//! what a frame means is [`crate::wire`]'s.

pub mod device;
pub mod pcap;
pub mod tap;
pub mod tunnel;
pub mod vnet;
