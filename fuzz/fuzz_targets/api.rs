//! The control socket's request parser: `serde_json::from_slice`, then
//! `rnet::ports::api::parse_request`. No panic; an accepted `add_hostfwd` yields
//! a single-port rule with a guest port.

#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use rnet::ports::api::{Request, parse_request};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(Request::Add(spec)) = parse_request(&v, Ipv4Addr::new(10, 0, 2, 100)) {
        assert_eq!(spec.count, 1);
        assert_ne!(spec.guest_port, 0);
    }
});
