//! The agent against real namespaces: transparent connections, its
//! lifetime (dropped, parent gone, a lost descriptor), errors.

use super::*;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use crate::sys::{ForkResult, fork};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::sockopt;

use crate::ns::process::{exit_child, kill_and_reap};
use nix::sys::socket::{SockaddrIn, getpeername, getsockname};
use nix::sys::wait::waitpid;

use crate::ns::{IfaceConfig, OpenedTap, SpawnedCommand, TapSetup, open_tap};

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

use crate::ns::test_env::require;

/// A `sleep` in fresh user + network namespaces with a configured tap0,
/// or None (skip) if user namespaces are unavailable.
struct Guest {
    cmd: SpawnedCommand,
    tap: OpenedTap,
}

fn guest() -> Option<Guest> {
    let argv: Vec<OsString> = ["sleep", "60"].iter().map(OsString::from).collect();
    let cmd = match crate::ns::spawn_in_new_namespaces(&argv) {
        Ok(cmd) => cmd,
        Err(e @ NsError::UsernsCreate { .. }) => {
            require(false, &format!("user namespaces unavailable: {e}"));
            return None;
        }
        Err(e) => panic!("spawn failed: {e}"),
    };
    let setup = TapSetup {
        name: "tap0".into(),
        mtu: 65520,
        vnet_hdr: false,
        configure: Some(IfaceConfig {
            addr: GUEST,
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            mac: None,
            ipv6: None,
        }),
    };
    let tap = open_tap(&Target::Pid(cmd.pid()), &setup).expect("open_tap");
    // Left unreleased: dropping `cmd` kills and reaps the sleep.
    Some(Guest { cmd, tap })
}

/// `nsenter` into the guest's namespaces, running `args`.
fn nsenter(pid: i32, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["--preserve-credentials", "-U", "-n", "-t", &pid.to_string()]);
    c.args(args);
    c
}

fn tools_present() -> bool {
    let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
    require(
        ok(Command::new("nsenter").arg("--version"))
            && ok(Command::new("/usr/bin/python3").arg("--version"))
            && ok(Command::new("ip").arg("-V")),
        "nsenter, ip or /usr/bin/python3 is not installed",
    )
}

/// A TCP echo server on 10.0.2.100:PORT inside the guest (plus a UDP
/// socket on PORT+1) that prints `peer IP:PORT` for each connection.
const SERVER: &str = r#"
import socket, sys
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.2.100", port))
s.listen(16)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", port + 1))
print("ready", flush=True)
while True:
    c, a = s.accept()
    print("peer %s:%d" % a, flush=True)
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
"#;

/// The server process (killed and reaped on drop) and its output lines.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Server {
    fn start(pid: i32, port: u16) -> Server {
        let mut child = nsenter(pid, &["/usr/bin/python3", "-c", SERVER, &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python server");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let server = Server { child, lines };
        assert_eq!(server.line(), "ready");
        server
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a line from the server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(fd: BorrowedFd<'_>, flags: PollFlags) {
    let mut fds = [PollFd::new(fd, flags)];
    let n = poll(&mut fds, PollTimeout::from(5000u16)).expect("poll");
    assert_eq!(n, 1, "timed out waiting for {flags:?}");
}

/// Waits for the connect to finish and checks it succeeded.
fn connected(fd: &OwnedFd) {
    wait_for(fd.as_fd(), PollFlags::POLLOUT);
    let err = nix::sys::socket::getsockopt(fd, sockopt::SocketError).expect("SO_ERROR");
    assert_eq!(err, 0, "connect failed: {}", Errno::from_raw(err));
}

/// Sends `msg` and reads the echo back through the non-blocking `fd`.
fn echo(fd: &OwnedFd, msg: &[u8]) {
    assert_eq!(nix::unistd::write(fd, msg).expect("write"), msg.len());
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < msg.len() {
        wait_for(fd.as_fd(), PollFlags::POLLIN);
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => panic!("EOF after {got:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(Errno::EAGAIN) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    assert_eq!(got, msg);
}

fn local_and_peer(fd: &OwnedFd) -> (SocketAddrV4, SocketAddrV4) {
    let conv = |a: SockaddrIn| SocketAddrV4::new(a.ip(), a.port());
    (
        conv(getsockname::<SockaddrIn>(fd.as_raw_fd()).expect("getsockname")),
        conv(getpeername::<SockaddrIn>(fd.as_raw_fd()).expect("getpeername")),
    )
}

/// IPv4 frames (ethertype 0x0800) or ARP (0x0806) written to the TAP so
/// far; IPv6 housekeeping (router solicitations, MLD) is ignored.
fn ipv4_frames_on(tap: &OpenedTap) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let mut fds = [PollFd::new(tap.fd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::ZERO).expect("poll TAP") == 0 {
            return frames;
        }
        let n = nix::unistd::read(&tap.fd, &mut buf).expect("read TAP");
        if n >= 14 && matches!(buf[12..14], [0x08, 0x00] | [0x08, 0x06]) {
            frames.push(buf[..n].to_vec());
        }
    }
}

fn rules(pid: i32) -> String {
    let out = nsenter(pid, &["ip", "rule"]).output().expect("ip rule");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn transparent_connections_keep_the_client_address() {
    if !tools_present() {
        return;
    }
    let Some(g) = guest() else {
        return;
    };
    let pid = g.cmd.pid();
    let mut agent = Agent::spawn(&Target::Pid(pid)).expect("spawn agent");
    assert!(agent.is_alive());
    let port = 8080;
    let server = Server::start(pid, port);
    let guest_ep = SocketAddrV4::new(GUEST, port);

    agent.route_replies(guest_ep).expect("route_replies");
    agent.route_replies(guest_ep).expect("route_replies nests");
    let listed = rules(pid);
    let rule = format!("from 10.0.2.100 ipproto tcp sport {port} lookup 21070");
    assert_eq!(listed.matches(&rule).count(), 1, "{listed}");
    assert!(listed.contains("100:"), "{listed}");
    let table = nsenter(pid, &["ip", "route", "show", "table", "21070"])
        .output()
        .expect("ip route");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("local default dev lo"), "{table}");

    // A client from elsewhere, and a host-loopback client shown as the
    // on-link gateway.
    for client in [
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 40000),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 40001),
    ] {
        let fd = agent
            .connect_transparent(client, guest_ep)
            .expect("connect_transparent");
        let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).expect("F_GETFL");
        assert_ne!(fl & libc::O_NONBLOCK, 0, "must be non-blocking");
        let fdfl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0, "must be close-on-exec");
        connected(&fd);
        assert_eq!(local_and_peer(&fd), (client, guest_ep));
        assert_eq!(server.line(), format!("peer {client}"));
        echo(&fd, b"hello through the namespace");
        echo(&fd, &vec![0x5a; 200_000]);
        // The same client address again while it is connected.
        let err = agent
            .connect_transparent(client, guest_ep)
            .expect_err("four-tuple in use");
        let errno = AgentError::of(&err).and_then(AgentError::errno);
        assert!(
            matches!(errno, Some(Errno::EADDRINUSE | Errno::EADDRNOTAVAIL)),
            "{err}"
        );
        assert!(agent.is_alive());
    }

    // Without transparency the server sees the guest's own address.
    let fd = agent.connect_plain(guest_ep).expect("connect_plain");
    connected(&fd);
    let (local, _) = local_and_peer(&fd);
    assert_eq!(*local.ip(), GUEST);
    assert_eq!(server.line(), format!("peer {local}"));
    echo(&fd, b"plain");
    drop(fd);

    // No server: the socket comes back and the connect is refused (the
    // guest's RST is a reply too, so it needs the rule as well).
    let closed = SocketAddrV4::new(GUEST, 9);
    agent.route_replies(closed).expect("route_replies");
    let fd = agent
        .connect_transparent(
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 40002),
            closed,
        )
        .expect("socket for a closed port");
    wait_for(fd.as_fd(), PollFlags::POLLOUT);
    let err = nix::sys::socket::getsockopt(&fd, sockopt::SocketError).expect("SO_ERROR");
    assert_eq!(Errno::from_raw(err), Errno::ECONNREFUSED);
    agent.unroute_replies(closed).expect("unroute_replies");

    // Nothing of this left the namespace through the TAP.
    let leaked = ipv4_frames_on(&g.tap);
    assert!(leaked.is_empty(), "IPv4/ARP frames on the TAP: {leaked:?}");

    // listening() sees the python server's sockets.
    let list = agent.listening().expect("listening");
    assert!(
        list.contains(&(Proto::Tcp, SocketAddr::V4(guest_ep))),
        "{list:?}"
    );
    assert!(
        list.contains(&(
            Proto::Udp,
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port + 1)
        )),
        "{list:?}"
    );
    assert!(
        !list
            .iter()
            .any(|(p, a)| *p == Proto::Tcp && a.port() == 40000),
        "connections are not listeners: {list:?}"
    );

    // Unrouting nests too; the last one removes the rule.
    agent.unroute_replies(guest_ep).expect("unroute 1");
    assert!(rules(pid).contains(&rule));
    agent.unroute_replies(guest_ep).expect("unroute 2");
    assert!(!rules(pid).contains(&rule), "{}", rules(pid));
    agent
        .unroute_replies(guest_ep)
        .expect("unroute when absent");
    drop(server);
}

#[test]
fn agent_exits_when_dropped() {
    if !tools_present() {
        return;
    }
    let Some(g) = guest() else {
        return;
    };
    let mut agent = Agent::spawn(&Target::Pid(g.cmd.pid())).expect("spawn agent");
    let pid = Pid::from_raw(agent.pid());
    agent
        .route_replies(SocketAddrV4::new(GUEST, 443))
        .expect("route_replies");
    assert!(rules(g.cmd.pid()).contains("sport 443 lookup 21070"));
    drop(agent);
    // Its rules went with it.
    let left = rules(g.cmd.pid());
    assert!(!left.contains("lookup 21070"), "{left}");
    // Already reaped by the drop.
    assert_eq!(waitpid(pid, None), Err(Errno::ECHILD));
}

/// Whether `pid` is gone or a zombie.
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[test]
fn agent_exits_when_its_parent_dies() {
    let Some(g) = guest() else {
        return;
    };
    let target = Target::Pid(g.cmd.pid());
    let (r, w) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child spawns the agent (system calls and small
    // allocations), writes its pid and waits to be killed; it leaves
    // only through `exit_child`.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => exit_child(|| {
            drop(r);
            let Ok(agent) = Agent::spawn(&target) else {
                return 1;
            };
            let _ = nix::unistd::write(&w, &agent.pid().to_ne_bytes());
            loop {
                nix::unistd::pause();
            }
        }),
        ForkResult::Parent { child } => {
            drop(w);
            let mut buf = [0u8; 4];
            let n = nix::unistd::read(&r, &mut buf).expect("read agent pid");
            assert_eq!(n, 4, "the middle process could not spawn the agent");
            let agent_pid = i32::from_ne_bytes(buf);
            assert!(!dead(agent_pid));
            kill_and_reap(child);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !dead(agent_pid) {
                assert!(Instant::now() < deadline, "agent {agent_pid} outlived rnet");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn lost_descriptor_keeps_the_agent() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let Ok(SocketAddr::V4(addr)) = listener.local_addr() else {
        panic!("IPv4 listener expected");
    };
    // SAFETY: the child spawns an agent (system calls and small
    // allocations) and leaves only through `exit_child`.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => exit_child(|| {
            let Ok(mut agent) = Agent::spawn(&Target::Pid(std::process::id() as i32)) else {
                return 2;
            };
            // Leave no free descriptor number: a limit just above the
            // highest one open, and every hole below filled.
            let max = std::fs::read_dir("/proc/self/fd")
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                        .max()
                        .unwrap_or(3)
                })
                .unwrap_or(1024);
            let (_, hard) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .unwrap_or((0, 4096));
            if nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                max + 1,
                hard,
            )
            .is_err()
            {
                return 3;
            }
            let mut fill = Vec::new();
            while let Ok(fd) = nix::fcntl::open(
                "/dev/null",
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ) {
                fill.push(fd);
            }
            if agent.submit(Submit::Plain(addr)).is_err() {
                return 4;
            }
            let end = Instant::now() + Duration::from_secs(5);
            loop {
                match agent.try_reply() {
                    Ok(Some(Reply::Ok {
                        fd: None,
                        fd_lost: true,
                    })) => break,
                    Ok(None) if Instant::now() < end => {
                        let Some(raw) = agent.raw_fd() else { return 5 };
                        // SAFETY: the agent's socket, open while
                        // `agent` lives, borrowed for the poll only.
                        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
                        launcher::wait_readable(fd, Duration::from_millis(100));
                    }
                    other => {
                        let msg = format!("unexpected answer: {other:?}\n");
                        // Not through std's locked handle: this is a forked
                        // child of a threaded process.
                        let _ = nix::unistd::write(std::io::stderr(), msg.as_bytes());
                        return 6;
                    }
                }
            }
            drop(fill);
            // The agent was not blamed and still serves.
            match agent.connect_plain(addr) {
                Ok(_) if agent.is_alive() => 0,
                _ => 7,
            }
        }),
        ForkResult::Parent { child } => {
            assert_eq!(
                super::super::process::reap(child),
                Ok(Some(nix::sys::wait::WaitStatus::Exited(child, 0)))
            );
        }
    }
}

#[test]
fn spawn_errors() {
    assert!(matches!(
        Agent::spawn(&Target::Pid(4_000_000)),
        Err(NsError::NoSuchProcess(4_000_000))
    ));
}

#[test]
fn own_namespace_agent_lists_sockets() {
    // Our own namespaces: nothing to join, the agent only forks.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut agent = Agent::spawn(&Target::Pid(std::process::id() as i32)).expect("spawn agent");
    let list = agent.listening().expect("listening");
    assert!(list.contains(&(Proto::Tcp, addr)), "{addr} not in {list:?}");
}

#[test]
fn errors_carry_the_errno() {
    let e = AgentError::Request {
        errno: Errno::EADDRINUSE,
        context: "bind 10.0.2.2:1".into(),
    }
    .into_io();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    assert_eq!(
        AgentError::of(&e).and_then(AgentError::errno),
        Some(Errno::EADDRINUSE)
    );
    assert_eq!(
        e.to_string(),
        "in the namespace: bind 10.0.2.2:1: Address already in use"
    );
    let gone = AgentError::Gone("was killed by signal SIGKILL".into()).into_io();
    assert_eq!(gone.kind(), io::ErrorKind::BrokenPipe);
    assert!(gone.to_string().contains("spawn a new one"));
}
