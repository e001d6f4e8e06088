//! What runs in the target's namespaces: the agent process after its
//! launcher forks it ([`agent_main`]): it confines itself, joins the
//! namespaces, then serves [`Request`]s one at a time (transparent and
//! plain connections, the reply rules, the listing of listening sockets).

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sched::setns;
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};
use socket2::{Domain, Protocol, Socket, Type};

use super::super::NsKind;
use super::super::fdpass::{recv_with_fd, send_with_fd};
use super::super::netlink::RtNetlink;
use super::super::nsfile::{JoinPlan, clone_flag};
use super::super::report::{self, ChildError, Step};
use super::proto::{LIST_CHUNK, MAX_REQUEST, Request, encode_listing};
use super::{AgentOptions, CONN_RULE_PRIORITY, REPLY_RULE_PRIORITY, REPLY_TABLE, confine};
use crate::ports::Proto;

/// Restores an empty signal mask and default dispositions (the handlers
/// inherited from the parent would run its code on descriptors that are
/// closed or reused here), then ignores SIGINT, SIGHUP and SIGTERM.
pub(super) fn reset_signals() {
    // SIGTERM too: a service manager's or timeout(1)'s SIGTERM to rnet's
    // process group must not end the launcher before rnet (which then
    // logs a lost launcher at a clean stop); it ends with rnet anyway
    // (its socket closes; PR_SET_PDEATHSIG), and is stopped by SIGKILL.
    crate::sys::reset_signals(&[libc::SIGINT, libc::SIGHUP, libc::SIGTERM]);
}

/// The agent after fork from its launcher: confines itself, joins the
/// namespaces, reports, serves requests. Returns its exit code.
///
/// Order matters: undumpable first (before anything of the guest's is
/// joined); descriptors closed; the user namespace joined (capabilities
/// there), then the network namespace; what the requests need later is
/// opened while the host's files are still visible (the socket tables, the
/// kernel release, `lo`'s index); then the empty root, the capability
/// drop, no_new_privs and the seccomp filter.
pub(super) fn agent_main(
    parent: Pid,
    plan: &JoinPlan,
    sock: OwnedFd,
    null: RawFd,
    opts: AgentOptions,
) -> i32 {
    let undumpable = confine::undumpable();
    crate::sys::stdio_to_null(null);
    let mut keep = vec![sock.as_raw_fd()];
    keep.extend(plan.user.iter().chain(&plan.net).map(|f| f.as_raw_fd()));
    confine::close_all_but(&keep);
    reset_signals();
    let report = |r: &[u8]| i32::from(send_with_fd(sock.as_fd(), r, None).is_err());
    let internal =
        |e: Errno, what: &str| report(&ChildError::new(Step::Internal, e, what).encode());
    if let Err(e) = undumpable {
        return internal(e, "make the agent undumpable (PR_SET_DUMPABLE)");
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return internal(e, "set the parent-death signal");
    }
    if getppid() != parent {
        return report(&ChildError::new(Step::ParentGone, Errno::ESRCH, "rnet exited").encode());
    }
    if let Some(user) = &plan.user
        && let Err(e) = setns(user, clone_flag(NsKind::User))
    {
        return report(&ChildError::new(Step::JoinUserns, e, "setns user").encode());
    }
    if let Some(net) = &plan.net
        && let Err(e) = setns(net, clone_flag(NsKind::Net))
    {
        return report(&ChildError::new(Step::JoinNetns, e, "setns net").encode());
    }
    // Joining a user namespace is a credential change: make sure.
    if let Err(e) = confine::undumpable() {
        return internal(e, "make the agent undumpable (PR_SET_DUMPABLE)");
    }
    let mut state = AgentState {
        bad_fd: opts.bad_fd,
        ..AgentState::default()
    };
    for (name, proto) in [
        ("tcp", Proto::Tcp),
        ("tcp6", Proto::Tcp),
        ("udp", Proto::Udp),
        ("udp6", Proto::Udp),
    ] {
        // No IPv6 in this kernel or namespace: nothing listens there.
        if let Ok(f) = std::fs::File::open(format!("/proc/self/net/{name}")) {
            state.tables.push((proto, f));
        }
    }
    state.rules_ok = rules_supported().is_ok();
    state.lo = nix::net::if_::if_nametoindex("lo").unwrap_or(1);
    // The strings are zeroed first; a kernel without PR_SET_MM_MAP
    // (CONFIG_CHECKPOINT_RESTORE) still shows their (zeroed) bytes to
    // those who may read the file, which the guest may not.
    let _ = confine::clear_environment();
    let mut keep = vec![sock.as_raw_fd()];
    keep.extend(state.tables.iter().map(|(_, f)| f.as_raw_fd()));
    confine::close_all_but(&keep);
    if let Err(e) = crate::sandbox::empty_root() {
        let errno = Errno::from_raw(e.source.raw_os_error().unwrap_or(libc::EIO));
        return internal(errno, &format!("give the agent an empty root: {e}"));
    }
    let caps = (1u64 << confine::CAP_NET_ADMIN) | (1u64 << confine::CAP_NET_BIND_SERVICE);
    if let Err(e) = crate::sandbox::drop_capabilities(caps) {
        let errno = Errno::from_raw(e.source.raw_os_error().unwrap_or(libc::EPERM));
        return internal(errno, &format!("drop the agent's capabilities: {e}"));
    }
    if let Err(e) = confine::undumpable() {
        return internal(e, "make the agent undumpable (PR_SET_DUMPABLE)");
    }
    let filter = match confine::build_seccomp(&agent_calls()) {
        Ok(f) => f,
        Err(what) => return internal(Errno::EINVAL, what),
    };
    if let Err(e) = confine::install_seccomp(&filter) {
        return internal(e, "install the agent's seccomp filter");
    }
    drop(filter);
    if send_with_fd(sock.as_fd(), &report::encode_ok(&[]), None).is_err() {
        return 1;
    }
    serve(sock.as_fd(), state)
}

/// The system calls the agent makes once confined (see [`confine`]).
fn agent_calls() -> Vec<(libc::c_long, confine::Arg)> {
    use confine::Arg::{Any, OneOf};
    const FAMILIES: &[u64] = &[libc::AF_INET as u64, libc::AF_NETLINK as u64];
    let mut v = confine::base_calls();
    v.extend([
        (libc::SYS_socket, OneOf(0, FAMILIES)),
        (libc::SYS_setsockopt, Any),
        (libc::SYS_getsockopt, Any),
        (libc::SYS_getsockname, Any),
        (libc::SYS_bind, Any),
        (libc::SYS_connect, Any),
        (libc::SYS_sendto, Any),
        (libc::SYS_recvfrom, Any),
        (libc::SYS_fcntl, Any),
        (libc::SYS_lseek, Any),
        (libc::SYS_pread64, Any),
        // std's read_to_string asks for the file's size.
        (libc::SYS_statx, Any),
        (libc::SYS_fstat, Any),
        (libc::SYS_newfstatat, Any),
        (libc::SYS_pipe2, Any),
    ]);
    v
}

/// What the agent keeps between requests.
#[derive(Default)]
struct AgentState {
    /// Open netlink socket, reopened after an error.
    nl: Option<RtNetlink>,
    /// Whether the local route of [`REPLY_TABLE`] has been added.
    table_ready: bool,
    /// Clients with a per-connection reply rule installed.
    conn_rules: std::collections::HashSet<SocketAddrV4>,
    /// The namespace's socket tables, opened before the root was emptied.
    tables: Vec<(Proto, std::fs::File)>,
    /// Whether the kernel matches rules on protocol and port (4.17).
    rules_ok: bool,
    /// `lo`'s interface index.
    lo: u32,
    /// The test hook of [`AgentOptions::bad_fd`].
    bad_fd: bool,
}

/// The agent's request loop; returns the exit code (0 on EOF).
fn serve(sock: BorrowedFd<'_>, mut state: AgentState) -> i32 {
    let mut buf = [0u8; MAX_REQUEST];
    loop {
        let got = match recv_with_fd(sock, &mut buf) {
            Ok(r) => r,
            Err(_) => return 1,
        };
        if got.len == 0 {
            return 0;
        }
        drop(got.fd);
        let sent = match Request::decode(&buf[..got.len]).filter(|_| !got.truncated) {
            None => send_err(
                sock,
                ChildError::new(Step::Internal, Errno::EINVAL, "malformed request"),
            ),
            Some(req) => state.handle(sock, req),
        };
        if sent.is_err() {
            return 1;
        }
    }
}

fn send_err(sock: BorrowedFd<'_>, e: ChildError) -> nix::Result<()> {
    send_with_fd(sock, &e.encode(), None)
}

fn send_ok(sock: BorrowedFd<'_>, payload: &[u8], fd: Option<BorrowedFd<'_>>) -> nix::Result<()> {
    send_with_fd(sock, &report::encode_ok(payload), fd)
}

impl AgentState {
    /// Serves one request, sending its reply (or replies).
    fn handle(&mut self, sock: BorrowedFd<'_>, req: Request) -> nix::Result<()> {
        match req {
            Request::Route(guest) => match self.route(guest, true) {
                Ok(()) => send_ok(sock, &[], None),
                Err(e) => send_err(sock, e),
            },
            Request::Unroute(guest) => match self.route(guest, false) {
                Ok(()) => send_ok(sock, &[], None),
                Err(e) => send_err(sock, e),
            },
            Request::Transparent { client, guest } => {
                // Replies to this client come back to us whatever answers
                // them: the guest server itself, or (after a DNAT inside
                // the namespace, e.g. a CNI portmap rule) a pod, whose
                // replies the per-port rule cannot recognise.
                if self.bad_fd {
                    return self.send_pipe(sock);
                }
                if let Err(e) = self.conn_rule(client, true) {
                    return send_err(sock, e);
                }
                match open_guest_socket(Some(client), guest) {
                    Ok(fd) => send_ok(sock, &[], Some(fd.as_fd())),
                    Err(e) => {
                        let _ = self.conn_rule(client, false);
                        send_err(sock, e)
                    }
                }
            }
            Request::Release(client) => match self.conn_rule(client, false) {
                Ok(()) => send_ok(sock, &[], None),
                Err(e) => send_err(sock, e),
            },
            Request::Plain(_) if self.bad_fd => self.send_pipe(sock),
            Request::Plain(guest) => match open_guest_socket(None, guest) {
                Ok(fd) => send_ok(sock, &[], Some(fd.as_fd())),
                Err(e) => send_err(sock, e),
            },
            Request::Listening => match self.listening_sockets() {
                Ok(list) => {
                    let chunks: Vec<_> = list.chunks(LIST_CHUNK).collect();
                    if chunks.is_empty() {
                        return send_ok(sock, &[0], None);
                    }
                    for (i, chunk) in chunks.iter().enumerate() {
                        let more = u8::from(i + 1 < chunks.len());
                        let mut payload = vec![more];
                        encode_listing(chunk, &mut payload);
                        send_ok(sock, &payload, None)?;
                    }
                    Ok(())
                }
                Err(e) => send_err(sock, e),
            },
        }
    }

    /// The test hook: a pipe where a socket belongs.
    fn send_pipe(&mut self, sock: BorrowedFd<'_>) -> nix::Result<()> {
        match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok((r, _w)) => send_ok(sock, &[], Some(r.as_fd())),
            Err(e) => send_err(sock, ChildError::new(Step::Internal, e, "pipe")),
        }
    }

    /// Adds or removes the per-connection rule `to CLIENT ipproto tcp
    /// dport PORT lookup REPLY_TABLE`.
    fn conn_rule(&mut self, client: SocketAddrV4, add: bool) -> Result<(), ChildError> {
        if !add && !self.conn_rules.contains(&client) {
            // Perhaps added by an agent before this one: remove it if it is
            // there (a rule that is not is fine).
            if self.rules_ok {
                let nl = match &mut self.nl {
                    Some(nl) => nl,
                    None => match RtNetlink::open() {
                        Ok(nl) => self.nl.insert(nl),
                        Err(_) => return Ok(()),
                    },
                };
                let _ = nl.del_tcp_dest_rule(client, REPLY_TABLE, CONN_RULE_PRIORITY);
            }
            return Ok(());
        }
        if add && !self.rules_ok {
            return Err(ChildError::new(
                Step::Netlink,
                Errno::ENOTSUP,
                "rules matching on protocol and port need Linux 4.17",
            ));
        }
        let step = format!(
            "{} rule to {} ipproto tcp dport {} lookup {REPLY_TABLE:#x}",
            if add { "add" } else { "delete" },
            client.ip(),
            client.port()
        );
        let nl = match &mut self.nl {
            Some(nl) => nl,
            None => self.nl.insert(
                RtNetlink::open()
                    .map_err(|e| ChildError::new(Step::Netlink, e, "open a netlink socket"))?,
            ),
        };
        if add && !self.table_ready {
            nl.add_local_default_route_v4(REPLY_TABLE, self.lo)
                .map_err(|e| {
                    ChildError::new(
                        Step::Netlink,
                        e,
                        &format!("add local 0.0.0.0/0 dev lo table {REPLY_TABLE:#x}"),
                    )
                })?;
            self.table_ready = true;
        }
        let r = if add {
            nl.add_tcp_dest_rule(client, REPLY_TABLE, CONN_RULE_PRIORITY)
        } else {
            nl.del_tcp_dest_rule(client, REPLY_TABLE, CONN_RULE_PRIORITY)
        };
        r.map_err(|e| {
            self.nl = None;
            ChildError::new(Step::Netlink, e, &step)
        })?;
        if add {
            self.conn_rules.insert(client);
        } else {
            self.conn_rules.remove(&client);
        }
        Ok(())
    }

    /// Adds (`add`) or removes the reply rule for `guest`.
    fn route(&mut self, guest: SocketAddrV4, add: bool) -> Result<(), ChildError> {
        let what = if add { "add" } else { "delete" };
        let step = format!(
            "{what} rule from {} ipproto tcp sport {} lookup {REPLY_TABLE:#x}",
            guest.ip(),
            guest.port()
        );
        if add && !self.rules_ok {
            return Err(ChildError::new(Step::Netlink, Errno::ENOTSUP, &step));
        }
        let nl = match &mut self.nl {
            Some(nl) => nl,
            None => self.nl.insert(
                RtNetlink::open()
                    .map_err(|e| ChildError::new(Step::Netlink, e, "open a netlink socket"))?,
            ),
        };
        let result = if add {
            let table = if self.table_ready {
                Ok(())
            } else {
                nl.add_local_default_route_v4(REPLY_TABLE, self.lo)
                    .map_err(|e| {
                        ChildError::new(
                            Step::Netlink,
                            e,
                            &format!("add local 0.0.0.0/0 dev lo table {REPLY_TABLE:#x}"),
                        )
                    })
            };
            table.and_then(|()| {
                self.table_ready = true;
                nl.add_tcp_source_rule(guest, REPLY_TABLE, REPLY_RULE_PRIORITY)
                    .map_err(|e| ChildError::new(Step::Netlink, e, &step))
            })
        } else {
            nl.del_tcp_source_rule(guest, REPLY_TABLE, REPLY_RULE_PRIORITY)
                .map_err(|e| ChildError::new(Step::Netlink, e, &step))
        };
        if result.is_err() {
            // Start from a fresh socket next time (no stale replies).
            self.nl = None;
        }
        result
    }
}

/// Whether the running kernel understands the protocol and port match of
/// rules (Linux 4.17). Older ones drop them silently, which would send all
/// of the guest's traffic to `lo`; refuse there (ENOTSUP).
fn rules_supported() -> Result<(), Errno> {
    let release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|_| Errno::ENOTSUP)?;
    match kernel_version(&release) {
        Some(v) if v >= (4, 17) => Ok(()),
        _ => Err(Errno::ENOTSUP),
    }
}

/// (major, minor) of a kernel release string such as "6.8.0-45-generic".
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Opens the guest-side socket: non-blocking, close-on-exec, connect to
/// `guest` started; with `client`, IP_TRANSPARENT and bound to it first.
fn open_guest_socket(
    client: Option<SocketAddrV4>,
    guest: SocketAddrV4,
) -> Result<OwnedFd, ChildError> {
    let err = |e: io::Error, ctx: &str| {
        let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        ChildError::new(Step::Internal, errno, ctx)
    };
    let sock = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(|e| err(e, "create a TCP socket"))?;
    if let Some(client) = client {
        sock.set_ip_transparent_v4(true).map_err(|e| {
            err(
                e,
                "set IP_TRANSPARENT (needs CAP_NET_ADMIN in the namespace)",
            )
        })?;
        sock.set_reuse_address(true)
            .map_err(|e| err(e, "set SO_REUSEADDR"))?;
        sock.bind(&SocketAddr::V4(client).into())
            .map_err(|e| err(e, &format!("bind {client}")))?;
    }
    match sock.connect(&SocketAddr::V4(guest).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(err(e, &format!("connect to {guest}"))),
    }
    Ok(sock.into())
}

impl AgentState {
    /// The listening sockets of the namespace, from the tables opened at
    /// start (each read again from its beginning).
    fn listening_sockets(&mut self) -> Result<Vec<(Proto, SocketAddr)>, ChildError> {
        use std::io::{Read, Seek};
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (proto, file) in &mut self.tables {
            let mut text = String::new();
            if let Err(e) = file.rewind().and_then(|()| file.read_to_string(&mut text)) {
                let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
                return Err(ChildError::new(
                    Step::Internal,
                    errno,
                    "read the namespace's socket tables",
                ));
            }
            for addr in parse_proc_net(&text, *proto) {
                if seen.insert((*proto, addr)) {
                    out.push((*proto, addr));
                }
            }
        }
        Ok(out)
    }
}

/// The local addresses of the sockets in a `/proc/net/{tcp,udp}[6]` table
/// that listen: state 0A (LISTEN) for TCP, 07 (CLOSE, i.e. bound and not
/// connected) for UDP. Malformed lines are skipped.
fn parse_proc_net(text: &str, proto: Proto) -> Vec<SocketAddr> {
    let want = crate::ports::auto::listen_state(proto);
    crate::ports::auto::parse_table(text)
        .into_iter()
        .filter(|(_, st)| *st == want)
        .map(|(a, _)| a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_parsing() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 6402000A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 6402000A:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: garbage
";
        let got = parse_proc_net(tcp, Proto::Tcp);
        let want: SocketAddr = "10.0.2.100:8080".parse().expect("addr");
        if cfg!(target_endian = "little") {
            assert_eq!(got, vec![want]);
        }
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 07
";
        assert_eq!(
            parse_proc_net(tcp6, Proto::Tcp),
            vec!["[::]:80".parse::<SocketAddr>().expect("addr")]
        );
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_net(tcp6, Proto::Udp),
                vec!["[::1]:53".parse::<SocketAddr>().expect("addr")]
            );
        }
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.8.0-45-generic\n"), Some((6, 8)));
        assert_eq!(kernel_version("4.17"), Some((4, 17)));
        assert_eq!(kernel_version("weird"), None);
        assert!(Some((4, 9)) < Some((4, 17)));
    }
}
