//! pasta mode's IPv6 addresses (`-a`/`-g` given an IPv6 address) and the
//! DNS servers and search domains it announces (`-D`, `-S`), end to end:
//! rnet runs under the name `pasta` in the command shape (`pasta [OPTIONS]
//! -- COMMAND`), and the command looks at what it got: the addresses and
//! routes `--config-net` set, a host server on [::1] reached through the
//! IPv6 gateway, the resolv.conf rnet wrote, a router advertisement
//! (captured with a raw ICMPv6 socket: RDNSS and DNSSL), and a DHCP lease
//! taken by busybox's `udhcpc` (options 6 and 119).
//!
//! Every rnet started here gets `RNET_OUTBOUND_ALLOW=none`, a loopback
//! `RNET_DNS_UPSTREAM` and explicit private addresses for both families, so
//! nothing leaves the machine. The announced 192.0.2.53 (TEST-NET-1) is
//! only announced, never asked. The main case runs as root (inside the user
//! namespace pasta makes) and as uid 65534.

mod common;
#[path = "common/compat.rs"]
mod s4;

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;
use s4::*;

/// The guest's and the gateway's IPv6 addresses the tests give (a ULA /64).
const GUEST6: &str = "fd12:3456::10";
const GW6: &str = "fd12:3456::1";
/// rnet's IPv6 DNS forwarder in that prefix (prefix::3).
const DNS6: &str = "fd12:3456::3";

/// Skips (never in CI) when the case cannot run here.
fn runnable(test: &str, nobody: bool) -> bool {
    if !require_userns(test) || !require_program(test, "udhcpc") {
        return false;
    }
    if nobody && !is_root() {
        eprintln!("SKIP {test}: needs root to become uid 65534");
        assert!(!in_ci(), "{test}: CI runs the tests as root");
        return false;
    }
    true
}

/// Sends router solicitations on tap0 (once a second, up to 10 s) until a
/// router advertisement arrives, and prints what it announces: `prefix
/// P/L`, `rdnss ADDR` per server, `dnssl NAME` per search domain.
const RA_DUMP: &str = r#"
import select, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
idx = socket.if_nametoindex('tap0')
ra = None
end = time.monotonic() + 10
while ra is None and time.monotonic() < end:
    try:
        s.sendto(bytes([133, 0, 0, 0, 0, 0, 0, 0]), ('ff02::2', 0, 0, idx))
    except OSError as e:
        print('solicit:', e, file=sys.stderr)
    wait = 1.0
    while ra is None and select.select([s], [], [], wait)[0]:
        data, _ = s.recvfrom(4096)
        if data[0] == 134:
            ra = data
        wait = 0
if ra is None:
    sys.exit('no router advertisement within 10 s')
o = ra[16:]
while len(o) >= 8:
    t, n = o[0], o[1] * 8
    if n == 0 or n > len(o):
        sys.exit('bad option length')
    body = o[:n]
    if t == 3:
        print('prefix %s/%d' % (socket.inet_ntop(socket.AF_INET6, body[16:32]), body[2]))
    elif t == 25:
        for i in range(8, n, 16):
            print('rdnss', socket.inet_ntop(socket.AF_INET6, body[i:i + 16]))
    elif t == 31:
        names, labels, i = [], [], 8
        while i < n:
            ln = body[i]
            i += 1
            if ln == 0:
                if labels:
                    names.append('.'.join(labels))
                labels = []
                continue
            labels.append(body[i:i + ln].decode())
            i += ln
        for name in names:
            print('dnssl', name)
    o = o[n:]
"#;

/// udhcpc's event script: records what udhcpc hands over (the DNS list
/// and option 119's search list among it) next to itself. It configures
/// nothing and never writes /etc.
const EVENT_SCRIPT: &str = r#"#!/bin/sh
echo "event=$1;ip=$ip;router=$router;dns=$dns;search=$search" >> "$(dirname "$0")/events"
exit 0
"#;

/// A scratch directory anyone may write (the guest may be uid 65534) with
/// the RA dumper and udhcpc's event script.
struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = TempDir::new("pasta-v6");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(dir.join("ra_dump.py"), RA_DUMP).unwrap();
        let script = dir.join("event.sh");
        std::fs::write(&script, EVENT_SCRIPT).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// The `bound` events udhcpc recorded, as variable -> value.
    fn bound(&self) -> Vec<HashMap<String, String>> {
        std::fs::read_to_string(self.dir.join("events"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                l.split(';')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>()
            })
            .filter(|e| e.get("event").map(String::as_str) == Some("bound"))
            .collect()
    }
}

/// The lines of `out` between `=== name` and the next marker.
fn section<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    let head = format!("=== {name}");
    out.lines()
        .skip_while(|l| *l != head)
        .skip(1)
        .take_while(|l| !l.starts_with("=== "))
        .collect()
}

/// pasta with explicit addresses for both families (`-a`/`-g` once per
/// family), `--config-net`, and `extra`, running `script` in its new
/// namespaces.
fn pasta_command(dns: &DnsServer, nobody: bool, extra: &[&str], script: &str) -> Command {
    let mut cmd = as_user(pasta_bin().to_str().unwrap(), nobody);
    policy_env(&mut cmd, ALLOW_NONE, dns);
    cmd.args([
        "--config-net",
        "-a",
        "10.0.2.100",
        "-n",
        "24",
        "-g",
        "10.0.2.2",
        "-a",
        GUEST6,
        "-g",
        GW6,
        "-I",
        "tap0",
    ])
    .args(extra)
    .args(["--", "sh", "-c", script]);
    cmd
}

/// The IPv6 addresses of `-a`/`-g` on the interface and its default route;
/// the IPv6 gateway reaching a host server on [::1] (pasta maps the gateway
/// to the host's loopback by default); the IPv6 DNS forwarder in the new
/// prefix; `-D`/`-S` in resolv.conf, the router advertisement (RDNSS,
/// DNSSL) and a DHCP lease (options 6 and 119).
fn addresses_and_announcements(test: &str, nobody: bool) {
    if !runnable(test, nobody) {
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::on(TcpListener::bind("[::1]:0").unwrap());
    let scratch = Scratch::new();
    let url = format!("http://[{GW6}]:{}/", http.port());
    let script = format!(
        "echo '=== addr'; ip -6 -o addr show dev tap0 scope global
        echo '=== route'; ip -6 route show default
        echo '=== http'; curl -sS -g --noproxy '*' --max-time 10 '{url}' || echo 'curl failed'
        echo '=== dns6'; dig +short +time=3 +tries=2 @{DNS6} v6.example.test
        echo '=== resolv'; cat /etc/resolv.conf
        echo '=== ra'; {PYTHON} '{ra}' || echo 'ra failed'
        echo '=== dhcp'; udhcpc -i tap0 -f -q -n -t 3 -T 1 -O search -s '{ev}' >/dev/null 2>&1 || echo 'udhcpc failed'
        echo '=== end'",
        ra = scratch.path("ra_dump.py"),
        ev = scratch.path("event.sh"),
    );
    let mut cmd = pasta_command(
        &dns,
        nobody,
        &[
            "-D",
            "10.0.2.3",
            "-D",
            "192.0.2.53",
            "-D",
            DNS6,
            "-S",
            "corp.example.test",
            "-S",
            "lab.test.",
        ],
        &script,
    );
    let out = run(&mut cmd, secs(60));
    out.assert_success("pasta with IPv6 addresses, -D and -S");
    let o = out.stdout.as_str();

    let addr = section(o, "addr").join("\n");
    assert!(addr.contains(&format!("inet6 {GUEST6}/64")), "{out}");
    let route = section(o, "route").join("\n");
    assert!(
        route.contains(&format!("default via {GW6} dev tap0")),
        "{out}"
    );

    assert_eq!(section(o, "http").join("\n") + "\n", HTTP_BODY, "{out}");
    assert!(http.hits() >= 1);
    assert_eq!(section(o, "dns6"), [DNS_ANSWER.to_string()], "{out}");

    assert_eq!(
        section(o, "resolv"),
        [
            "nameserver 10.0.2.3",
            "nameserver 192.0.2.53",
            &format!("nameserver {DNS6}"),
            "search corp.example.test lab.test",
        ],
        "{out}"
    );

    assert_eq!(
        section(o, "ra"),
        [
            "prefix fd12:3456::/64",
            &format!("rdnss {DNS6}"),
            "dnssl corp.example.test",
            "dnssl lab.test",
        ],
        "{out}"
    );

    assert_eq!(section(o, "dhcp"), Vec::<&str>::new(), "{out}");
    let bound = scratch.bound();
    assert_eq!(bound.len(), 1, "{bound:?}\n{out}");
    let e = &bound[0];
    assert_eq!(e["ip"], "10.0.2.100", "{e:?}");
    assert_eq!(e["router"], GATEWAY, "{e:?}");
    assert_eq!(e["dns"].trim(), "10.0.2.3 192.0.2.53", "{e:?}");
    assert_eq!(e["search"].trim(), "corp.example.test lab.test", "{e:?}");
}

#[test]
fn addresses_and_announcements_root() {
    addresses_and_announcements("addresses_and_announcements_root", false);
}

#[test]
fn addresses_and_announcements_as_nobody() {
    addresses_and_announcements("addresses_and_announcements_as_nobody", true);
}

/// Without `-D`/`-S` the announcements are rnet's own forwarders in the
/// prefix of `-a`/`-g` and no search list; `-D none` announces no server;
/// `--no-map-gw` keeps the IPv6 gateway away from the host's loopback, as
/// it does the IPv4 gateway.
#[test]
fn defaults_none_and_no_map_gw() {
    let test = "defaults_none_and_no_map_gw";
    if !runnable(test, false) {
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::on(TcpListener::bind("[::1]:0").unwrap());
    let scratch = Scratch::new();
    let url = format!("http://[{GW6}]:{}/", http.port());
    let script = format!(
        "echo '=== http'; curl -sS -g --noproxy '*' --max-time 5 '{url}' >/dev/null 2>&1 && echo reached || echo refused
        echo '=== resolv'; cat /etc/resolv.conf
        echo '=== ra'; {PYTHON} '{ra}' || echo 'ra failed'
        echo '=== end'",
        ra = scratch.path("ra_dump.py"),
    );
    let out = run(
        &mut pasta_command(&dns, false, &["--no-map-gw"], &script),
        secs(60),
    );
    out.assert_success("pasta --no-map-gw");
    let o = out.stdout.as_str();
    assert_eq!(section(o, "http"), ["refused"], "{out}");
    assert_eq!(http.hits(), 0, "{out}");
    assert_eq!(
        section(o, "resolv"),
        ["nameserver 10.0.2.3", &format!("nameserver {DNS6}")],
        "{out}"
    );
    assert_eq!(
        section(o, "ra"),
        ["prefix fd12:3456::/64", &format!("rdnss {DNS6}")],
        "{out}"
    );

    // `-D none`: nothing announced, an empty resolv.conf, and no RDNSS.
    let out = run(
        &mut pasta_command(&dns, false, &["-D", "none"], &script),
        secs(60),
    );
    out.assert_success("pasta -D none");
    let o = out.stdout.as_str();
    assert_eq!(section(o, "http"), ["reached"], "{out}");
    assert_eq!(section(o, "resolv"), Vec::<&str>::new(), "{out}");
    assert_eq!(section(o, "ra"), ["prefix fd12:3456::/64"], "{out}");
}

/// Bad IPv6 addresses and search domains are refused with a clear message
/// before anything starts.
#[test]
fn bad_values_are_refused() {
    let dns = DnsServer::start();
    for (extra, text) in [
        (
            &["-a", "fd12:3456::10", "-g", "fd12:9999::1"][..],
            "outside",
        ),
        (&["-a", "fe80::10"][..], "link-local"),
        (&["-a", "fd12:3456::3"][..], "DNS forwarder"),
        (&["-S", "a..b"][..], "Invalid search domain"),
        (&["-S", &"x".repeat(64)][..], "at most 63"),
        (&["-D", "nope"][..], "Invalid DNS address"),
    ] {
        let mut cmd = Command::new(pasta_bin());
        policy_env(&mut cmd, ALLOW_NONE, &dns);
        cmd.args(["-a", "10.0.2.100", "-n", "24", "-g", "10.0.2.2"])
            .args(extra)
            .args(["--", "true"]);
        let out = run(&mut cmd, secs(20));
        assert_eq!(out.code(), Some(1), "{extra:?}: {out}");
        assert!(out.stderr.contains(text), "{extra:?}: {out}");
    }
}
