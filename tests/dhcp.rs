//! The DHCP server of the virtual network, driven by a real client:
//! busybox's `udhcpc` (Debian package `udhcpc`) in a namespace whose TAP
//! rnet leaves unconfigured (`--no-configure`).
//!
//! udhcpc runs with `-s SCRIPT`, an event script this file writes into a
//! scratch directory: it only appends what udhcpc hands it (event, ip,
//! subnet, router, dns, mtu, lease, server id) to a file next to it and
//! configures the TAP with `ip addr`/`ip route`. It never touches /etc:
//! `rnet run` gives the command no mount namespace of its own, so the
//! client's default script would rewrite the host's resolv.conf.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use rnet::{Config, Network, OutboundPolicy, Target as NetTarget};

/// User namespaces and udhcpc.
fn require_udhcpc(test: &str) -> bool {
    require_userns(test) && require_program(test, "udhcpc")
}

const EVENT_SCRIPT: &str = r#"#!/bin/sh
# udhcpc event script of rnet's DHCP tests: records what udhcpc hands
# over and configures only the interface. Never writes /etc.
dir=__DIR__
echo "event=$1;interface=$interface;ip=$ip;mask=$mask;subnet=$subnet;router=$router;dns=$dns;mtu=$mtu;lease=$lease;serverid=$serverid" >> "$dir/events"
case "$1" in
bound|renew)
    ip addr replace "$ip/$mask" dev "$interface" || exit 1
    ip route replace default via "$router" dev "$interface" || exit 1
    ;;
esac
# The renewal test reads events from this FIFO (held open by its reader).
if [ -p "$dir/events.fifo" ]; then
    echo "$1" > "$dir/events.fifo"
fi
exit 0
"#;

/// A scratch directory with the event script; the events it recorded.
struct Recorder {
    dir: TempDir,
}

impl Recorder {
    fn new() -> Recorder {
        let dir = TempDir::new("dhcp");
        let quoted = format!("'{}'", dir.path().display());
        assert!(!quoted[1..quoted.len() - 1].contains('\''));
        let script = dir.join("event.sh");
        std::fs::write(&script, EVENT_SCRIPT.replace("__DIR__", &quoted)).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Recorder { dir }
    }

    fn script(&self) -> String {
        self.dir.join("event.sh").to_string_lossy().into_owned()
    }

    fn fifo(&self) -> String {
        self.dir.join("events.fifo").to_string_lossy().into_owned()
    }

    /// Every recorded event, in order, as variable -> value.
    fn events(&self) -> Vec<HashMap<String, String>> {
        let p: PathBuf = self.dir.join("events");
        std::fs::read_to_string(&p)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                l.split(';')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    /// The events of one kind (bound, renew, ...).
    fn of(&self, kind: &str) -> Vec<HashMap<String, String>> {
        self.events()
            .into_iter()
            .filter(|e| e.get("event").map(String::as_str) == Some(kind))
            .collect()
    }
}

/// udhcpc in the foreground, quitting once it has a lease (or failing
/// after 3 tries 1 s apart), asking for the MTU too.
fn udhcpc(script: &str) -> String {
    format!("udhcpc -i tap0 -f -q -n -t 3 -T 1 -O mtu -s '{script}'")
}

/// The lease values udhcpc passed to the script for a `--mtu 9000` network.
#[track_caller]
fn assert_lease(e: &HashMap<String, String>, ip: &str) {
    let get = |k: &str| e.get(k).map(String::as_str).unwrap_or("<unset>");
    assert_eq!(get("ip"), ip, "{e:?}");
    assert_eq!(get("interface"), "tap0", "{e:?}");
    assert_eq!(get("subnet"), "255.255.255.0", "{e:?}");
    assert_eq!(get("mask"), "24", "{e:?}");
    assert_eq!(get("router"), GATEWAY, "{e:?}");
    assert_eq!(get("dns"), DNS_ADDR, "{e:?}");
    assert_eq!(get("serverid"), GATEWAY, "{e:?}");
    assert_eq!(get("mtu"), "9000", "the MTU is rnet's --mtu: {e:?}");
    let lease: u64 = get("lease").parse().unwrap_or(0);
    assert!(lease >= 60, "lease time {lease}: {e:?}");
}

/// A lease with the network's settings; a second client (another client
/// identifier, option 61) gets the next address; each client gets its own
/// address again when it asks again; malformed requests in between are
/// dropped (and logged) without harm.
#[test]
fn udhcpc_leases_per_client_id() {
    require!(require_udhcpc);
    let rec = Recorder::new();
    let dhcp = udhcpc(&rec.script());
    let id_b = "-x 0x3d:01aabbccddee01";
    let guest = format!(
        "ip link set lo up && ip link set tap0 up || exit 10
        {dhcp} || exit 11
        {PYTHON} {junk} tap0 text short nomagic noopts || exit 12
        {dhcp} {id_b} || exit 13
        {dhcp} {id_b} || exit 14
        {dhcp} || exit 15
        ping -c 1 -W 5 {GATEWAY} >/dev/null || exit 16
        ip -4 -o addr show dev tap0",
        junk = guest_script("dhcp_junk.py"),
    );
    let out = Rnet::new()
        .arg("-v")
        .arg("--no-configure")
        .arg("--mtu")
        .arg("9000")
        .run(&["sh", "-c", &guest], secs(60));
    out.assert_success("the guest's udhcpc runs");

    let bound = rec.of("bound");
    let ips: Vec<&str> = bound.iter().map(|e| e["ip"].as_str()).collect();
    assert_eq!(
        ips,
        ["10.0.2.15", "10.0.2.16", "10.0.2.16", "10.0.2.15"],
        "default client id, id B, id B again, default again: {:?}\n{out}",
        rec.events()
    );
    for (e, ip) in bound.iter().zip(ips) {
        assert_lease(e, ip);
    }
    // The script configured both addresses; the gateway answered a ping.
    for a in ["10.0.2.15/24", "10.0.2.16/24"] {
        assert!(out.stdout.contains(a), "tap0 lacks {a}: {out}");
    }
    // Four malformed requests, four drops; every valid one answered.
    assert_eq!(
        out.stderr.matches("dhcp message dropped").count(),
        4,
        "{out}"
    );
    assert_eq!(out.stderr.matches("kind=Ack").count(), 4, "{out}");
}

/// udhcpc asked to renew (SIGUSR1) sends a REQUEST for its address and
/// keeps it.
#[test]
fn udhcpc_renewal_keeps_the_address() {
    require!(require_udhcpc);
    let rec = Recorder::new();
    let fifo = rec.fifo();
    // Events arrive on the FIFO, so the shell waits for each with a
    // deadline instead of guessing.
    let guest = format!(
        r#"ip link set lo up && ip link set tap0 up || exit 10
        mkfifo '{fifo}' && exec 3<>'{fifo}' || exit 11
        udhcpc -i tap0 -f -n -t 3 -T 1 -O mtu -s '{script}' & u=$!
        next() {{
            while read -t 10 -u 3 ev; do
                [ "$ev" = "$1" ] && return 0
            done
            echo "no $1 event within 10 s"; kill $u; exit 12
        }}
        next bound
        kill -USR1 $u
        next renew
        kill -TERM $u; wait $u
        ip -4 -o addr show dev tap0"#,
        script = rec.script(),
    );
    let out = Rnet::new()
        .arg("-v")
        .arg("--no-configure")
        .arg("--mtu")
        .arg("9000")
        .run(&["bash", "-c", &guest], secs(60));
    out.assert_success("udhcpc bound, then renewed");
    let (bound, renew) = (rec.of("bound"), rec.of("renew"));
    assert_eq!(bound.len(), 1, "{:?}\n{out}", rec.events());
    assert_eq!(renew.len(), 1, "{:?}\n{out}", rec.events());
    assert_lease(&bound[0], "10.0.2.15");
    assert_lease(&renew[0], "10.0.2.15");
    assert!(out.stdout.contains("10.0.2.15/24"), "{out}");
    // DISCOVER/REQUEST, then the renewing REQUEST: two ACKs. busybox
    // sends the unicast renewal from a socket bound to ADDR:68 and
    // connected to the server, and closes it right after the write; an
    // answer as fast as rnet's (well under a millisecond) can land on
    // that socket and be lost with it. udhcpc then broadcasts the renewal
    // a second later, which is answered too: a third ACK.
    let acks = out.stderr.matches("kind=Ack").count();
    match acks {
        2 => {}
        3 => assert!(out.stderr.contains("broadcasting renew"), "{out}"),
        _ => panic!("{acks} ACKs: {out}"),
    }
    assert_eq!(
        out.stderr.matches("dhcp message dropped").count(),
        0,
        "{out}"
    );
}

/// The `dhcp` drop counter of a network served through the library.
fn dhcp_drops(net: &Network) -> u64 {
    net.handle()
        .stats()
        .drops
        .iter()
        .find(|(name, _)| *name == "dhcp")
        .map(|(_, n)| *n)
        .expect("a dhcp drop counter")
}

/// Garbage sent to the DHCP server port is dropped and counted, before and
/// after the guest has an address; the server keeps working.
#[test]
fn malformed_requests_are_dropped_and_counted() {
    require!(require_udhcpc);
    let rec = Recorder::new();
    let dns = Arc::new(DnsServer::start());
    let target = Target::userns();
    let config = Config::builder()
        .configure(false)
        .mtu(9000)
        .outbound(OutboundPolicy::Only(Vec::new()))
        .dns_upstreams(vec![dns.addr])
        .build()
        .unwrap();
    let net = Network::attach(NetTarget::Pid(target.pid() as i32), config).expect("attach");
    let guest = |script: &str| {
        let out = run(&mut target.exec(&["sh", "-c", script]), secs(30));
        out.assert_success(script);
        out
    };
    let junk = |kinds: &str| {
        let out = guest(&format!(
            "{PYTHON} {} tap0 {kinds}",
            guest_script("dhcp_junk.py")
        ));
        assert_eq!(
            out.stdout
                .lines()
                .filter(|l| l.starts_with("sent "))
                .count(),
            kinds.split_whitespace().count(),
            "{out}"
        );
    };
    // Polls the counter (the loop handles frames on its own thread).
    let wait_drops = |want: u64| {
        let mut got = 0;
        let ok = poll_until(secs(5), || {
            got = dhcp_drops(&net);
            (got >= want).then_some(())
        });
        assert!(ok.is_some(), "dhcp drops {got}, want {want}");
        assert_eq!(got, want, "no more drops than malformed messages");
    };

    assert_eq!(dhcp_drops(&net), 0);
    guest("ip link set lo up && ip link set tap0 up");
    junk("text short nomagic noopts");
    wait_drops(4);
    assert!(net.handle().is_running());

    guest(&udhcpc(&rec.script()));
    assert_eq!(rec.of("bound").len(), 1, "{:?}", rec.events());
    assert_lease(&rec.of("bound")[0], "10.0.2.15");
    assert_eq!(dhcp_drops(&net), 4, "valid messages are not drops");

    // Now from the address udhcpc configured.
    junk("text noopts");
    wait_drops(6);
    guest(&udhcpc(&rec.script()));
    let bound = rec.of("bound");
    assert_eq!(bound.len(), 2, "{:?}", rec.events());
    assert_lease(&bound[1], "10.0.2.15");
    assert_eq!(dhcp_drops(&net), 6);

    assert!(net.handle().is_running());
    net.handle().stop();
    let why = net.wait().expect("the network stops cleanly");
    eprintln!("network ended: {why:?}");
}
