//! Services rnet runs on the virtual network itself: the DNS forwarder
//! (DHCP and router advertisements are planned here too).

pub mod dhcp;
pub mod dns;
