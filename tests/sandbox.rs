//! rnet's self-isolation, seen from outside while traffic flows: reduced
//! capabilities, `NoNewPrivs: 1`, `Seccomp: 2`, an empty root, for PID and
//! namespace-path targets, as root and as uid 65534, and `--no-sandbox`.

mod common;

use std::time::Duration;

use common::*;

fn status_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or("")
}

/// Starts rnet on a fresh target, then checks its status while a curl
/// through it is served.
fn check(rnet: Rnet, by_path: bool, expect_sandbox: bool) {
    let target = Target::userns();
    let srv = HttpServer::start();
    let pid = target.pid();
    let rnet = rnet.allow_host_loopback();
    let mut proc = if by_path {
        rnet.arg("--netns")
            .arg(format!("/proc/{pid}/ns/net"))
            .arg("--userns")
            .arg(format!("/proc/{pid}/ns/user"))
            .start_attach(&[])
    } else {
        rnet.attach(pid)
    };
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let out = run(
        &mut target.exec(&strs(&curl(&url))),
        Duration::from_secs(30),
    );
    out.assert_success("curl through a sandboxed rnet");
    assert_eq!(out.stdout, HTTP_BODY, "{out}");
    let st = status_of(data_plane(proc.pid()));
    proc.signal(libc::SIGTERM);
    let (clean, end) = proc.stop(Duration::from_secs(5));
    assert!(clean && end.code() == Some(0), "rnet did not exit 0: {end}");
    if expect_sandbox {
        assert_eq!(field(&st, "Seccomp"), "2", "{st}");
        assert_eq!(field(&st, "NoNewPrivs"), "1", "{st}");
        // Nothing, or only CAP_NET_BIND_SERVICE (bit 10) when it had it.
        let eff = u64::from_str_radix(field(&st, "CapEff"), 16).unwrap_or(u64::MAX);
        assert_eq!(eff & !(1 << 10), 0, "{st}");
        assert!(
            field(&st, "CapBnd").trim_start_matches('0').len() <= 3,
            "{st}"
        );
    } else {
        assert_eq!(field(&st, "Seccomp"), "0", "{st}");
    }
}

#[test]
fn sandboxed_while_serving_a_pid_target() {
    if !require_userns("sandboxed_while_serving_a_pid_target") {
        return;
    }
    check(Rnet::new(), false, true);
}

#[test]
fn sandboxed_while_serving_a_netns_path_target() {
    if !require_userns("sandboxed_while_serving_a_netns_path_target") {
        return;
    }
    check(Rnet::new(), true, true);
}

#[test]
fn sandboxed_as_nobody() {
    if !require_root("sandboxed_as_nobody") {
        return;
    }
    // `rnet run` as uid 65534: the command's parent is rnet itself, whose
    // status it reads right after a curl through it.
    let srv = HttpServer::start();
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let script = format!("{} && cat /proc/$PPID/status", curl(&url).join(" "));
    let out = Rnet::new()
        .nobody()
        .allow_host_loopback()
        .run(&["sh", "-c", &script], Duration::from_secs(30));
    out.assert_success("curl and status as uid 65534");
    assert!(out.stdout.starts_with(HTTP_BODY), "{out}");
    assert_eq!(field(&out.stdout, "Seccomp"), "2", "{out}");
    assert_eq!(field(&out.stdout, "NoNewPrivs"), "1", "{out}");
    assert_eq!(field(&out.stdout, "CapEff"), "0000000000000000", "{out}");
}

#[test]
fn no_sandbox_opts_out() {
    if !require_userns("no_sandbox_opts_out") {
        return;
    }
    check(Rnet::new().arg("--no-sandbox"), false, false);
}

#[test]
fn sandboxed_root_holds_nothing_of_the_host() {
    if !require_userns("sandboxed_root_holds_nothing_of_the_host") {
        return;
    }
    let target = Target::userns();
    let mut proc = Rnet::new().attach(target.pid());
    let root = format!("/proc/{}/root", data_plane(proc.pid()));
    let entries: Vec<String> = std::fs::read_dir(&root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    proc.signal(libc::SIGTERM);
    let _ = proc.stop(Duration::from_secs(5));
    assert!(
        !entries
            .iter()
            .any(|e| e == "home" || e == "usr" || e == "root" || e == "bin"),
        "{entries:?}"
    );
}

/// The sandbox's empty root still has `/etc` and `/run`, read-only, as
/// slirp4netns's does, with the host's resolv.conf readable at its usual
/// name (through a link into /run if the host has one).
#[test]
fn sandboxed_root_shows_etc_and_run_read_only() {
    if !require_userns("sandboxed_root_shows_etc_and_run_read_only") {
        return;
    }
    let target = Target::userns();
    let mut proc = Rnet::new().attach(target.pid());
    let root = std::path::PathBuf::from(format!("/proc/{}/root", data_plane(proc.pid())));
    // Reading /proc/PID/root of a process of the same user works; rnet
    // enters its sandbox once set up, so wait for the empty root.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while root.join("usr").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let etc = std::fs::metadata(root.join("etc"));
    let run = std::fs::metadata(root.join("run"));
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").ok();
    let resolv = std::fs::read_to_string(root.join("etc/resolv.conf"));
    let write = std::fs::write(root.join("etc/rnet-test"), b"x");
    let usr = root.join("usr").exists();
    proc.signal(libc::SIGTERM);
    let _ = proc.stop(Duration::from_secs(5));
    assert!(!usr, "the sandbox root still shows /usr");
    assert!(etc.as_ref().is_ok_and(|m| m.is_dir()), "/etc: {etc:?}");
    assert!(run.as_ref().is_ok_and(|m| m.is_dir()), "/run: {run:?}");
    if let Some(host) = host_resolv {
        assert_eq!(
            resolv.ok().as_deref(),
            Some(host.as_str()),
            "/etc/resolv.conf"
        );
    }
    let e = write.expect_err("/etc in the sandbox is writable");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
}
