//! The settings' parsers and the builder's checks.

use super::*;

#[test]
fn outbound_allow_lists() {
    let c = |s: &str| s.parse::<IpCidr>().unwrap();
    assert_eq!(OutboundPolicy::parse([]), Ok(OutboundPolicy::Any));
    assert_eq!(
        OutboundPolicy::parse(["none"]),
        Ok(OutboundPolicy::Only(vec![]))
    );
    assert_eq!(
        OutboundPolicy::parse([""]),
        Ok(OutboundPolicy::Only(vec![]))
    );
    // Both families, comma lists with spaces, repeated values, bare
    // addresses.
    let p = OutboundPolicy::parse(["198.18.0.0/15, fd42::/64", "none,192.0.2.1", "::1"]).unwrap();
    assert_eq!(
        p,
        OutboundPolicy::Only(vec![
            c("198.18.0.0/15"),
            c("fd42::/64"),
            c("192.0.2.1/32"),
            c("::1/128")
        ])
    );
    assert!(p.allows("fd42::7".parse::<IpAddr>().unwrap()));
    assert!(p.allows(Ipv4Addr::new(198, 19, 1, 1)));
    assert!(!p.allows("fd43::7".parse::<IpAddr>().unwrap()));
    for bad in [
        "x",
        "10.0.0.0/33",
        "fd00::/129",
        "fd00::/x",
        "10.0.0.0/8,nope",
    ] {
        let e = OutboundPolicy::parse([bad]).unwrap_err().to_string();
        assert!(e.contains("invalid CIDR"), "{bad}: {e}");
    }
}

#[test]
fn ipv6_prefixes() {
    let p = parse_ipv6_prefix("fd00::/64").unwrap();
    let cfg = Config::builder().ipv6(Some(p)).build().unwrap();
    assert_eq!(cfg.ipv6_gateway(), Some("fd00::2".parse().unwrap()));
    assert_eq!(cfg.ipv6_dns(), Some("fd00::3".parse().unwrap()));
    assert_eq!(cfg.ipv6_guest(), Some("fd00::100".parse().unwrap()));
    for bad in [
        "fd00::1/64",
        "fd00::/48",
        "fe80::/64",
        "ff02::/64",
        "::/64",
        "x/64",
    ] {
        assert!(parse_ipv6_prefix(bad).is_err(), "{bad}");
    }
    assert!(Config::builder().ipv6(Some(p)).mtu(1000).build().is_err());
    let c: IpCidr = "2001:db8::/32".parse().unwrap();
    assert!(c.contains("2001:db8::1".parse().unwrap()));
    assert!(!c.contains("2001:db9::1".parse().unwrap()));
    assert!(!c.contains("10.0.0.1".parse().unwrap()));
}

#[test]
fn explicit_ipv6_addresses() {
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    let guest = v6("fd12:3456::10");
    let prefix = ipv6_prefix_of(guest);
    assert_eq!(prefix, v6("fd12:3456::"));
    let c = Config::builder()
        .ipv6(Some(prefix))
        .ipv6_guest_addr(Some(guest))
        .ipv6_gateway_addr(Some(v6("fd12:3456::1")))
        .build()
        .unwrap();
    assert_eq!(c.ipv6_guest(), Some(guest));
    assert_eq!(c.ipv6_gateway(), Some(v6("fd12:3456::1")));
    assert_eq!(c.ipv6_dns(), Some(v6("fd12:3456::3")));
    // Only one given: the other keeps its default in the prefix.
    let c = Config::builder()
        .ipv6(Some(prefix))
        .ipv6_gateway_addr(Some(v6("fd12:3456::1")))
        .build()
        .unwrap();
    assert_eq!(c.ipv6_guest(), Some(v6("fd12:3456::100")));
    let b = || Config::builder().ipv6(Some(prefix));
    for (bad, text) in [
        (
            b().ipv6_guest_addr(Some(v6("fd12:3457::10"))),
            "not a host address",
        ),
        (
            b().ipv6_gateway_addr(Some(v6("fd12:3456::"))),
            "not a host address",
        ),
        (
            b().ipv6_gateway_addr(Some(v6("fd12:3456::3"))),
            "DNS forwarder",
        ),
        (b().ipv6_gateway_addr(Some(v6("fd12:3456::100"))), "differ"),
        (
            Config::builder().ipv6_guest_addr(Some(guest)),
            "IPv6 is off",
        ),
    ] {
        let e = bad.build().unwrap_err().to_string();
        assert!(e.contains(text), "{e}");
    }
}

#[test]
fn search_domains_and_announced_dns() {
    assert_eq!(validate_domain("example.test.").unwrap(), "example.test");
    assert_eq!(validate_domain("a-b_c.x").unwrap(), "a-b_c.x");
    let label = "a".repeat(63);
    assert!(validate_domain(&label).is_ok());
    let e = validate_domain(&"a".repeat(64)).unwrap_err().to_string();
    assert!(e.contains("at most 63"), "{e}");
    let long = [label.as_str(); 4].join(".");
    assert_eq!(long.len(), 255);
    let e = validate_domain(&long).unwrap_err().to_string();
    assert!(e.contains("at most 253"), "{e}");
    assert!(validate_domain(&long[..253]).is_ok());
    for bad in ["", ".", "a..b", ".a", "a b", "ä.test"] {
        let e = validate_domain(bad).unwrap_err().to_string();
        assert!(e.starts_with("invalid search domain"), "{bad}: {e}");
    }
    let mut w = Vec::new();
    encode_domains(&["a.bc".into(), "d".into()], &mut w);
    assert_eq!(w, [1, b'a', 2, b'b', b'c', 0, 1, b'd', 0]);

    // Defaults: the forwarders of both families.
    let c = Config::builder()
        .ipv6(Some(DEFAULT_IPV6_PREFIX))
        .build()
        .unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(c.dns_announced(), &[ip("10.0.2.3"), ip("fd00::3")]);
    assert_eq!(c.resolv_conf(), "nameserver 10.0.2.3\nnameserver fd00::3\n");
    let c = Config::builder().build().unwrap();
    assert_eq!(c.resolv_conf(), "nameserver 10.0.2.3\n");
    let c = Config::builder()
        .dns_announced(vec![ip("192.0.2.53"), ip("2001:db8::53"), ip("192.0.2.54")])
        .search_domains(vec!["corp.test.".into(), "test".into()])
        .build()
        .unwrap();
    assert_eq!(
        c.dns_announced_v4().collect::<Vec<_>>(),
        [
            "192.0.2.53".parse::<Ipv4Addr>().unwrap(),
            "192.0.2.54".parse().unwrap()
        ]
    );
    assert_eq!(c.dns_announced_v6().count(), 1);
    assert_eq!(c.search_domains(), &["corp.test", "test"]);
    assert_eq!(
        c.resolv_conf(),
        "nameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver 192.0.2.54\nsearch corp.test test\n"
    );
    let none = Config::builder().dns_announced(vec![]).build().unwrap();
    assert_eq!(none.resolv_conf(), "");
    // Bad entries and lists too long for a DHCP reply are refused.
    let e = Config::builder()
        .search_domains(vec!["a..b".into()])
        .build()
        .unwrap_err();
    assert!(matches!(e, ConfigError::Domain(_)), "{e}");
    let e = Config::builder()
        .dns_announced(vec![ip("0.0.0.0")])
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("unicast"), "{e}");
    let e = Config::builder()
        .dns_announced(vec![ip("192.0.2.1"); 70])
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("DHCP"), "{e}");
    let many: Vec<String> = (0..20).map(|i| format!("domain{i}.example.test")).collect();
    let e = Config::builder()
        .search_domains(many)
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("announce fewer"), "{e}");
    let e = Config::builder()
        .ipv6(Some(DEFAULT_IPV6_PREFIX))
        .dns_announced(vec![ip("fd00::53"); 80])
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("router advertisement"), "{e}");
}

#[test]
fn cidr_parse_and_derive() {
    let c: Ipv4Cidr = "10.0.135.128/25".parse().unwrap();
    assert_eq!(c.nth(100), Ipv4Addr::new(10, 0, 135, 228));
    assert!(c.contains(Ipv4Addr::new(10, 0, 135, 255)));
    assert!(!c.contains(Ipv4Addr::new(10, 0, 135, 127)));
    assert_eq!(
        "1.2.3.4".parse::<Ipv4Cidr>().unwrap(),
        Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 32).unwrap()
    );
    assert!("1.2.3/8".parse::<Ipv4Cidr>().is_err());
    assert!("1.2.3.4/33".parse::<Ipv4Cidr>().is_err());
}

#[test]
fn builder_validates() {
    assert!(Config::builder().build().is_ok());
    assert_eq!(
        Config::builder().mtu(10).build().unwrap_err(),
        ConfigError::Mtu(10)
    );
    assert!(Config::builder().tap_name("a/b").build().is_err());
    let host: Ipv4Cidr = "10.0.2.100/24".parse().unwrap();
    assert!(Config::builder().cidr(host).build().is_err());
    let wide: Ipv4Cidr = "10.0.0.0/26".parse().unwrap();
    assert!(Config::builder().cidr(wide).build().is_err());
}

#[test]
fn explicit_addresses() {
    let net: Ipv4Cidr = "192.168.7.0/24".parse().unwrap();
    let a = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
    let c = Config::builder()
        .cidr(net)
        .guest_addr(a("192.168.7.50"))
        .gateway_addr(a("192.168.7.1"))
        .dns_addr(a("169.254.1.1"))
        .host_alias("169.254.1.2".parse().unwrap())
        .build()
        .unwrap();
    assert_eq!(c.guest(), a("192.168.7.50").unwrap());
    assert_eq!(c.gateway(), a("192.168.7.1").unwrap());
    assert_eq!(c.dns(), a("169.254.1.1").unwrap());
    assert_eq!(c.host_aliases(), &[a("169.254.1.2").unwrap()]);
    // A /30 is fine with an explicit guest, not without.
    let small: Ipv4Cidr = "10.9.0.0/30".parse().unwrap();
    let b = Config::builder()
        .cidr(small)
        .gateway_addr(a("10.9.0.1"))
        .dns_addr(a("169.254.1.1"));
    assert!(b.clone().build().is_err());
    assert!(b.guest_addr(a("10.9.0.2")).build().is_ok());
    for bad in [
        Config::builder().guest_addr(a("10.0.3.1")),
        Config::builder().guest_addr(a("10.0.2.2")),
        Config::builder().gateway_addr(a("10.0.2.255")),
        Config::builder().dns_addr(a("10.0.2.2")),
        Config::builder().dns_addr(a("127.0.0.1")),
        Config::builder().host_alias("10.0.2.3".parse().unwrap()),
    ] {
        assert!(bad.build().is_err());
    }
}

#[test]
fn policy() {
    let p = OutboundPolicy::Only(vec!["198.18.0.0/30".parse().unwrap()]);
    assert!(p.allows(Ipv4Addr::new(198, 18, 0, 2)));
    assert!(!p.allows(Ipv4Addr::new(198, 18, 0, 4)));
    assert!(!OutboundPolicy::Only(vec![]).allows(Ipv4Addr::new(1, 1, 1, 1)));
}

#[test]
fn link_local_only_when_named() {
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    let ll6: Ipv6Addr = "fe80::1".parse().unwrap();
    assert!(!OutboundPolicy::Any.allows(metadata));
    assert!(!OutboundPolicy::Any.allows(ll6));
    assert!(OutboundPolicy::Any.allows(Ipv4Addr::new(198, 18, 0, 1)));
    let only = |v: &[&str]| OutboundPolicy::Only(v.iter().map(|c| c.parse().unwrap()).collect());
    let broad = only(&["0.0.0.0/0", "::/0", "169.0.0.0/8", "fe80::/9"]);
    assert!(!broad.allows(metadata));
    assert!(!broad.allows(ll6));
    assert!(broad.allows(Ipv4Addr::new(198, 18, 0, 1)));
    assert!(only(&["169.254.169.254/32"]).allows(metadata));
    assert!(!only(&["169.254.169.254/32"]).allows(Ipv4Addr::new(169, 254, 0, 1)));
    assert!(only(&["169.254.0.0/16"]).allows(metadata));
    assert!(only(&["fe80::/10"]).allows(ll6));
    assert!(only(&["fe80::1/128"]).allows(ll6));
    assert_eq!(
        "endpoint-independent".parse(),
        Ok(UdpFilter::EndpointIndependent)
    );
    assert!("full-cone".parse::<UdpFilter>().is_err());
}

#[test]
fn upstream() {
    assert_eq!(
        parse_upstream("127.0.0.1").unwrap(),
        "127.0.0.1:53".parse().unwrap()
    );
    assert_eq!(
        parse_upstream("127.0.0.1:5353").unwrap(),
        "127.0.0.1:5353".parse().unwrap()
    );
    assert!(parse_upstream("x").is_err());
}

#[test]
fn cidr_texts() {
    assert_eq!(
        parse_cidr("10.0.135.128/25"),
        Ok((Ipv4Addr::new(10, 0, 135, 128), 25))
    );
    for bad in [
        "24",
        "foo",
        "10.0.2.0",
        "10.0.2.0/",
        "10.0.2.0/123",
        "1.2.3/8",
        " 10.0.2.0/24",
    ] {
        assert_eq!(
            parse_cidr(bad),
            Err(format!("invalid CIDR: {bad}")),
            "{bad}"
        );
    }
    assert_eq!(
        parse_cidr("10.0.2.256/24"),
        Err("invalid network address: 10.0.2.256".into())
    );
    for bad in ["10.0.2.100/26", "10.0.0.0/0", "10.0.0.0/32"] {
        assert_eq!(
            parse_cidr(bad),
            Err("prefix length needs to be 1-25".into()),
            "{bad}"
        );
    }
    assert_eq!(
        parse_cidr("10.0.2.100/24"),
        Err("CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24".into())
    );
}
