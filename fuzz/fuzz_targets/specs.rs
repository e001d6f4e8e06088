//! The text parsers: `PortSpec`, `Ipv4Cidr`, `parse_upstream` and
//! `AutoPublish` (`FromStr`), `parse_resolv_conf` and
//! `ports::auto::parse_table`, on arbitrary UTF-8 (the whole input, and each
//! of its lines). No panic; a parsed `PortSpec` or `Ipv4Cidr` prints as
//! text that parses back to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rnet::ports::auto::{AutoPublish, parse_table};
use rnet::config::parse_upstream;
use rnet::services::dns::parse_resolv_conf;
use rnet::{Ipv4Cidr, PortSpec};

fn one(s: &str) {
    if let Ok(p) = s.parse::<PortSpec>() {
        let text = p.to_string();
        assert_eq!(text.parse::<PortSpec>().ok(), Some(p), "{s:?} printed as {text:?}");
    }
    if let Ok(c) = s.parse::<Ipv4Cidr>() {
        let text = c.to_string();
        assert_eq!(text.parse::<Ipv4Cidr>().ok(), Some(c), "{s:?} printed as {text:?}");
    }
    let _ = parse_upstream(s);
    if let Ok(a) = s.parse::<AutoPublish>() {
        assert!(a.first >= 1 && a.first <= a.last);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    one(s);
    for line in s.lines() {
        one(line);
    }
    for ns in parse_resolv_conf(s) {
        assert_eq!(ns.port(), 53);
    }
    let _ = parse_table(s);
});
