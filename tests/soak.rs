//! Soak: mixed TCP (short connections and a long stream), UDP and DNS load
//! with connection churn through one rnet, on loopback only (host echo
//! servers behind 10.0.2.2 with --allow-host-loopback, the harness's DNS
//! responder as --dns-upstream; outbound allow-list `none`).
//!
//! rnet's open descriptors (/proc/PID/fd) and resident memory (VmRSS) are
//! sampled every 2 s. After the load stops its descriptors return to the
//! baseline: TCP and DNS ones within a few seconds, the UDP flows' host
//! sockets once their idle timeout (60 s) has passed. Resident memory after
//! warm-up (15 s) stays within 10%.
//!
//! CI runs 60 s (the default). The longer version:
//!
//! ```sh
//! RNET_SOAK_SECS=3600 cargo test --test soak -- --nocapture
//! ```

mod common;

use std::time::{Duration, Instant};

use common::*;

/// rnet's UDP idle timeout (not settable from the command line).
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Slack on the descriptor baseline.
const FD_SLACK: usize = 4;
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

fn soak_secs() -> u64 {
    std::env::var("RNET_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

struct Sample {
    at: Duration,
    fds: usize,
    rss_kib: u64,
}

fn open_flows(api: &std::path::Path) -> (u64, u64, u64) {
    let s = status_json(api);
    let f = &s["flows"];
    let tcp: u64 = f["tcp"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    (
        tcp,
        f["udp"].as_u64().unwrap_or(0),
        f["dns"].as_u64().unwrap_or(0),
    )
}

#[test]
fn soak_mixed_load() {
    require!(require_userns);
    let secs_total = soak_secs();
    let warmup = Duration::from_secs(15.min(secs_total / 4));
    let echo = TcpEcho::start();
    let uecho = UdpEcho::start();
    let builder = Rnet::new();
    let target = Target::userns();
    let api = TempPath::new("api");
    let mut rnet = builder
        .clone()
        .allow_host_loopback()
        .arg("--api-socket")
        .arg(&api.0)
        .attach(target.pid());
    let pid = rnet.pid();
    let base_fds = open_fds(pid).unwrap();
    let base_rss = proc_kib(pid, "VmRSS").unwrap();

    let script = guest_script("soak.py");
    let (ep, up, st) = (
        echo.addr.port().to_string(),
        uecho.addr.port().to_string(),
        secs_total.to_string(),
    );
    let t0 = Instant::now();
    let mut load = Proc::spawn(&mut target.exec(&[PYTHON, &script, &ep, &up, &st]));
    let mut samples = Vec::new();
    let limit = Duration::from_secs(secs_total + 120);
    // Waiting for the load to exit doubles as the sampling clock.
    while load.wait_timeout(SAMPLE_EVERY).is_none() {
        samples.push(Sample {
            at: t0.elapsed(),
            fds: open_fds(pid).expect("rnet is gone"),
            rss_kib: proc_kib(pid, "VmRSS").expect("rnet is gone"),
        });
        assert!(t0.elapsed() < limit, "soak load did not stop by itself");
    }
    let out = load.finish(secs(10));
    let load_end = Instant::now();
    out.assert_success("guest soak.py");
    let summary = out.stdout.trim().to_string();

    // TCP and DNS flows close and their descriptors go within seconds;
    // UDP flows keep their host socket until idle.
    let (settled, settle_t) = poll_until(secs(10), || {
        let (tcp, udp, dns_q) = open_flows(&api.0);
        let fds = open_fds(pid)?;
        (tcp == 0 && dns_q == 0 && fds <= base_fds + udp as usize + FD_SLACK).then_some((fds, udp))
    })
    .map_or_else(
        || {
            let (tcp, udp, dns_q) = open_flows(&api.0);
            panic!(
                "10 s after the load: {} fds (baseline {base_fds}), flows tcp {tcp} udp {udp} \
                 dns {dns_q}; status {}",
                open_fds(pid).unwrap_or(0),
                status_json(&api.0)
            )
        },
        |(v, t)| (v, t),
    );
    let (back, _) = poll_until(UDP_IDLE + secs(15), || {
        let fds = open_fds(pid)?;
        let (tcp, udp, dns_q) = open_flows(&api.0);
        (tcp + udp + dns_q == 0 && fds <= base_fds + FD_SLACK).then_some(fds)
    })
    .unwrap_or_else(|| {
        panic!(
            "{:?} after the load rnet still has {} fds (baseline {base_fds}); status {}",
            load_end.elapsed(),
            open_fds(pid).unwrap_or(0),
            status_json(&api.0)
        )
    });
    let back_after = load_end.elapsed();
    let rss_after = proc_kib(pid, "VmRSS").expect("rnet is gone");
    let status = status_json(&api.0);

    let peak_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let warm = samples
        .iter()
        .find(|s| s.at >= warmup)
        .expect("no sample after warm-up");
    let after_warm: Vec<&Sample> = samples.iter().filter(|s| s.at >= warm.at).collect();
    let rss_max = after_warm.iter().map(|s| s.rss_kib).max().unwrap();
    let rss_min = after_warm.iter().map(|s| s.rss_kib).min().unwrap();
    let rss_end = samples.last().unwrap().rss_kib;
    let (uq, tq) = builder.dns().queries();
    eprintln!(
        "soak {secs_total} s: guest {summary}\n  DNS responder answered {uq} UDP / {tq} TCP queries\n  \
         fds: baseline {base_fds}, peak {peak_fds}, {} ({} UDP flows open) {:.1} s after the load, \
         final {back} {:.1} s after the load\n  RSS: idle {:.1} MiB, at warm-up ({:.0} s) {:.1} MiB, \
         max {:.1} MiB, min {:.1} MiB, end {:.1} MiB ({} samples every {:?}), {:.1} MiB once every flow \
         had expired\n  status at the end: {}",
        settled.0,
        settled.1,
        settle_t.as_secs_f64(),
        back_after.as_secs_f64(),
        mib(base_rss),
        warm.at.as_secs_f64(),
        mib(warm.rss_kib),
        mib(rss_max),
        mib(rss_min),
        mib(rss_end),
        samples.len(),
        SAMPLE_EVERY,
        mib(rss_after),
        status
    );
    assert!(
        summary.contains("\"errors\": 0"),
        "the guest load saw errors: {out}"
    );
    // Under load, UDP flows pile up until their idle timeout (thousands of
    // them, each with its socket and state), so RSS may climb by a little
    // more than 10% of a few MiB: allow 10% or 2 MiB. Once every flow has
    // expired, what is left must be within 10% of the warm-up figure: that
    // is the check for leaks.
    let limit_kib = warm.rss_kib + (warm.rss_kib / 10).max(2048);
    assert!(
        rss_max <= limit_kib,
        "RSS grew more than 10% (or 2 MiB) after warm-up under load: {:.1} -> {:.1} MiB",
        mib(warm.rss_kib),
        mib(rss_max)
    );
    assert!(
        rss_after <= warm.rss_kib + warm.rss_kib / 10,
        "RSS once every flow expired is more than 10% above warm-up: {:.1} -> {:.1} MiB",
        mib(warm.rss_kib),
        mib(rss_after)
    );
    assert!(rnet.wait_timeout(Duration::ZERO).is_none(), "rnet exited");
}
