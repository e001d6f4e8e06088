//! `rnet run` and network options: `--cidr`, `--mac-address`, the private
//! /etc/resolv.conf, and the subordinate-id decision.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn cidr_moves_the_whole_network() {
    if !require_userns("cidr_moves_the_whole_network") {
        return;
    }
    let out = Rnet::new().arg("--cidr").arg("10.0.135.128/25").run(
        &["sh", "-c", "ip -4 -o addr show tap0; ip route show default"],
        T,
    );
    out.assert_success("rnet run --cidr");
    assert!(out.stdout.contains("10.0.135.228/25"), "{out}");
    assert!(out.stdout.contains("default via 10.0.135.130"), "{out}");
}

#[test]
fn invalid_cidrs_name_the_problem() {
    for (cidr, msg) in [
        ("10.0.2.0", "invalid CIDR"),
        ("10.0.2.0/26", "prefix length needs to be 1-25"),
        (
            "10.0.2.100/24",
            "CIDR needs to be a network address like 10.0.2.0/24",
        ),
        ("10.0.2.300/24", "invalid network address"),
    ] {
        let out = Rnet::new().arg("--cidr").arg(cidr).run(&["true"], T);
        out.assert_failure(cidr);
        assert!(out.stderr.contains(msg), "{cidr}: {out}");
    }
}

#[test]
fn mac_address_shows_on_the_tap() {
    if !require_userns("mac_address_shows_on_the_tap") {
        return;
    }
    let out = Rnet::new()
        .arg("--mac-address")
        .arg("02:00:00:aa:bb:cc")
        .run(&["ip", "-o", "link", "show", "tap0"], T);
    out.assert_success("rnet run --mac-address");
    assert!(out.stdout.contains("02:00:00:aa:bb:cc"), "{out}");
    let bad = Rnet::new()
        .arg("--mac-address")
        .arg("02:00")
        .run(&["true"], T);
    bad.assert_failure("bad MAC");
    assert!(bad.stderr.contains("six hex bytes"), "{bad}");
    let unconfigured = Rnet::new()
        .arg("--mac-address")
        .arg("02:00:00:aa:bb:cc")
        .arg("--no-configure")
        .run(&["true"], T);
    unconfigured.assert_failure("--mac-address with --no-configure");
    assert!(
        unconfigured.stderr.contains("--no-configure"),
        "{unconfigured}"
    );
}

#[test]
fn command_sees_the_dns_forwarder_in_a_private_resolv_conf() {
    if !require_userns("command_sees_the_dns_forwarder_in_a_private_resolv_conf") {
        return;
    }
    let before = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let out = Rnet::new().run(&["cat", "/etc/resolv.conf"], T);
    out.assert_success("rnet run cat /etc/resolv.conf");
    // Both forwarders: IPv6 is on by default.
    assert_eq!(
        out.stdout.trim(),
        "nameserver 10.0.2.3\nnameserver fd00::3",
        "{out}"
    );
    // The host's file is untouched, and --host-resolv-conf shows it as is.
    assert_eq!(
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        before
    );
    let host = Rnet::new()
        .arg("--host-resolv-conf")
        .run(&["cat", "/etc/resolv.conf"], T);
    host.assert_success("rnet run --host-resolv-conf");
    assert_eq!(host.stdout, before, "{host}");
}

#[test]
fn without_subordinate_ids_only_the_own_ids_are_mapped_and_said() {
    if !require_userns("without_subordinate_ids_only_the_own_ids_are_mapped_and_said") {
        return;
    }
    // uid 65534 has no /etc/subuid range on test machines; as root the same
    // holds unless the machine lists one for root.
    let rnet = if is_root() {
        Rnet::new().nobody()
    } else {
        Rnet::new()
    };
    let out = rnet.run(&["cat", "/proc/self/uid_map"], T);
    out.assert_success("rnet run cat uid_map");
    let lines: Vec<&str> = out.stdout.lines().collect();
    if lines.len() == 1 {
        assert!(out.stderr.contains("mapping only uid"), "{out}");
        assert!(lines[0].split_whitespace().nth(2) == Some("1"), "{out}");
    } else {
        assert!(out.stderr.contains("mapping subordinate ids"), "{out}");
    }
    let own = Rnet::new()
        .arg("--no-subids")
        .run(&["cat", "/proc/self/uid_map"], T);
    own.assert_success("rnet run --no-subids");
    assert_eq!(own.stdout.lines().count(), 1, "{own}");
}

#[test]
fn subordinate_ids_are_mapped_with_newuidmap() {
    if !require_root("subordinate_ids_are_mapped_with_newuidmap") {
        return;
    }
    if !std::path::Path::new("/usr/bin/newuidmap").exists() {
        assert!(!in_ci(), "newuidmap missing (package uidmap)");
        println!("skipped: newuidmap is not installed (package uidmap)");
        return;
    }
    // A private mount namespace shows uid 65534 a subordinate range without
    // touching the host's /etc/subuid and /etc/subgid.
    let dir = std::env::temp_dir().join(format!("rnet-subid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sub = dir.join("subid");
    std::fs::write(&sub, "nobody:100000:65536\n").unwrap();
    let rnet = rnet_for_nobody();
    let script = format!(
        "mount --bind {s} /etc/subuid && mount --bind {s} /etc/subgid && exec setpriv --reuid 65534 --regid 65534 --clear-groups {rnet} run --outbound-allow none --dns-upstream 127.0.0.1:9 -- cat /proc/self/uid_map /proc/self/setgroups",
        s = sub.display()
    );
    let out = run(
        std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .current_dir(&dir),
        T,
    );
    let _ = std::fs::remove_dir_all(&dir);
    out.assert_success("rnet run with a subordinate range");
    assert!(out.stderr.contains("mapping subordinate ids"), "{out}");
    assert!(out.stdout.contains("100000"), "{out}");
    assert!(
        out.stdout.contains("allow"),
        "setgroups stays allowed: {out}"
    );
}

/// `--busy-poll-us`: 0 (sleep at once) still carries traffic; an out-of-range
/// value is refused with the allowed range.
#[test]
fn busy_poll_option() {
    if !require_userns("busy_poll_option") {
        return;
    }
    let out = Rnet::new()
        .arg("--busy-poll-us")
        .arg("0")
        .run(&["ping", "-c", "1", "-W", "5", "10.0.2.2"], T);
    out.assert_success("ping the gateway with --busy-poll-us 0");
    let bad = Rnet::new()
        .arg("--busy-poll-us")
        .arg("20000")
        .run(&["true"], T);
    bad.assert_failure("--busy-poll-us 20000");
    assert!(bad.stderr.contains("0..=10000"), "{bad}");
}
