//! The physical layer: where frames enter and leave rnet.
//!
//! - [`tap`]: the TAP descriptor as the data plane sees it (reading and
//!   writing whole frames, the virtio-net offload header, GSO).
//! - [`device`]: the one-frame `smoltcp::phy::Device` the interface is
//!   handed, transmitting straight into the TAP's buffer.
//! - [`pcap`]: `--pcap`, a capture of every frame crossing the TAP.
//!
//! Creating the TAP inside the target namespace is [`crate::ns`]'s work;
//! what a frame means is [`crate::wire`]'s.

pub mod device;
pub mod pcap;
pub mod tap;
