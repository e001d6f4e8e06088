//! Services rnet runs on the virtual network itself: the DNS forwarder and
//! the DHCPv4 server (router advertisements are built in
//! [`crate::wire::emit`] and sent by the event loop).

pub mod dhcp;
pub mod dns;
