//! The control socket: slirp4netns's JSON protocol over a Unix stream
//! socket, served and spoken.
//!
//! One request per connection: the client writes a JSON object (it may or
//! may not half-close), the server answers with one JSON object and closes.
//! Requests and error texts are exactly slirp4netns's (`add_hostfwd`,
//! `list_hostfwd`, `remove_hostfwd`), so RootlessKit and Podman drive rnet
//! unchanged; rnet adds `host_port: 0` (any free port, returned in the
//! reply as `host_port`), a `detail` field next to `desc` in errors, and
//! `get_status` (see [`crate::status`]).
//!
//! # Theory of operation
//!
//! The server runs on its own thread and gives each connection a thread of
//! its own (at most [`MAX_CLIENTS`] at once), with one deadline for the
//! whole exchange ([`REQUEST_DEADLINE`], however the bytes trickle in), so a
//! slow or silent client delays nobody and holds a slot for a bounded time.
//! Requests reach the event loop through a [`PortControl`] (the library's
//! handle, which queues them and wakes the loop); the data plane never
//! waits for a client.
//!
//! # Who may connect
//!
//! The socket is created `0600` from the start (the descriptor's mode is set
//! before `bind`, so the file never exists with looser permissions, and no
//! `chmod` by path is made that could follow a link). Each connection's
//! `SO_PEERCRED` is checked as well: only rnet's own uid and root are
//! served; anyone else gets an error reply and the connection is closed,
//! counted ([`ApiServer::refused`]) and logged at most every 10 s. (In
//! the user namespace an unprivileged rnet's sandbox makes, a client whose
//! uid is not mapped there, root included, shows as the overflow uid 65534
//! and is served only if that is rnet's own uid.) When
//! `accept` fails for lack of descriptors (`EMFILE`, `ENFILE`), the server
//! waits [`ACCEPT_BACKOFF`] before trying again instead of spinning, and
//! says so at most every 10 s.
//!
//! The socket file is removed at exit only while its path still names the
//! socket this process bound (device and inode, see `SocketFile`): a
//! restarted instance may already have replaced it.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::AtFlags;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use super::{PortControl, PortError, PortInfo, PortSpec, Proto};
use crate::sandbox::KeptDir;

/// Largest request accepted; slirp4netns's limit.
pub const MAX_REQUEST: usize = 4096;
/// Connections served at once; more get an error reply straight away.
pub const MAX_CLIENTS: usize = 32;
/// How long a client may take over its whole exchange: sending the
/// request, however it trickles in, and reading the reply.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client waits for a reply ([`call`]).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after `accept` fails for lack of descriptors.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The shortest interval between two log lines about refused clients or
/// accept failures.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Longest path a Unix socket address takes (sun_path, NUL included).
pub const MAX_PATH: usize = 108;

/// A running control socket; [`ApiServer::shutdown`] removes the file
/// (if it is still this process's socket: see `SocketFile`).
pub struct ApiServer {
    file: SocketFile,
    /// The listening socket, shut down to wake the server's `accept`.
    wake: UnixListener,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// A bound control socket not served yet ([`ApiServer::bind`]).
pub struct ApiListener {
    listener: UnixListener,
    file: SocketFile,
}

/// The socket file this process bound, named so that only it is removed.
///
/// Podman starts a restarted instance on the same path while the old one
/// is still exiting: the new one replaces the file, and an old instance
/// that removed the path by name would delete the new one's socket. So
/// the file's device and inode are taken right after `bind`, and at exit
/// the name is unlinked only while it still has them.
struct SocketFile {
    path: PathBuf,
    /// The socket's directory, held open so the file can be checked and
    /// removed from inside the sandbox, where the path no longer resolves
    /// (a [`KeptDir`], so Landlock grants the removal there); `None` if it
    /// could not be opened (the path is then used).
    dir: Option<KeptDir>,
    /// `st_dev` and `st_ino` of the file as bound.
    id: (u64, u64),
}

impl SocketFile {
    fn new(path: &Path) -> io::Result<SocketFile> {
        let dir = KeptDir::of_parent(path).ok();
        let mut file = SocketFile {
            path: path.to_path_buf(),
            dir,
            id: (0, 0),
        };
        file.id = file.current().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot stat the API socket {} just created: {e}",
                    path.display()
                ),
            )
        })?;
        Ok(file)
    }

    /// Device and inode of what the path names now (not following a
    /// symbolic link).
    fn current(&self) -> io::Result<(u64, u64)> {
        let st = match (&self.dir, self.path.file_name()) {
            (Some(dir), Some(name)) => {
                nix::sys::stat::fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)?
            }
            _ => nix::sys::stat::lstat(&self.path)?,
        };
        Ok((st.st_dev as u64, st.st_ino as u64))
    }

    /// Removes the file if the path still names the socket this process
    /// bound; `Ok(false)` if it names another file (or none).
    ///
    /// The check and the unlink are two adjacent system calls: a socket
    /// that replaces ours between them is the only case not covered
    /// (there is no "unlink if the inode is" call).
    fn remove(&self) -> io::Result<bool> {
        match self.current() {
            Ok(id) if id == self.id => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        match (&self.dir, self.path.file_name()) {
            (Some(dir), Some(name)) => dir.unlink(name)?,
            _ => std::fs::remove_file(&self.path)?,
        }
        Ok(true)
    }
}

/// The socket file's name and identity, for a process that outlives the
/// one serving it (the supervisor) to remove it at exit, under the same
/// device-and-inode rule as [`ApiServer`]'s own clean-up.
#[derive(Clone, Debug)]
pub(crate) struct SocketName {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketName {
    /// Removes the file if the path still names the socket bound; says so
    /// in the log when it names another (a newer instance's).
    pub(crate) fn remove(&self) {
        let path = self.path.display();
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    debug!(%path, error = %e, "cannot remove the API socket");
                }
            }
            Ok(_) => {
                info!(%path, "the API socket path now names another socket (a newer instance's); left in place")
            }
            Err(_) => {}
        }
    }
}

impl ApiListener {
    /// The bound file's name and identity (see [`SocketName`]).
    pub(crate) fn name(&self) -> SocketName {
        SocketName {
            path: self.file.path.clone(),
            id: self.file.id,
        }
    }

    /// Serves the socket on a new thread.
    pub fn serve(
        self,
        handle: Arc<dyn PortControl>,
        default_guest: Ipv4Addr,
    ) -> io::Result<ApiServer> {
        let wake = self.listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let server = Server {
            handle,
            guest: default_guest,
            stop: stop.clone(),
            refused: refused.clone(),
            uids: allowed_uids(),
        };
        let listener = self.listener;
        let thread = std::thread::Builder::new()
            .name("rnet-api".into())
            .spawn(move || server.run(listener))?;
        Ok(ApiServer {
            file: self.file,
            wake,
            stop,
            refused,
            thread: Some(thread),
        })
    }
}

impl ApiServer {
    /// Creates the socket at `path` (mode 0600; an existing socket file is
    /// replaced) and serves it on a new thread.
    pub fn start(
        path: &Path,
        handle: Arc<dyn PortControl>,
        default_guest: Ipv4Addr,
    ) -> io::Result<ApiServer> {
        ApiServer::bind(path)?.serve(handle, default_guest)
    }

    /// Creates the socket at `path` (mode 0600; an existing socket file,
    /// stale or a previous instance's, is replaced) without serving it yet: the sandbox is entered between
    /// the two, while the process has one thread.
    pub fn bind(path: &Path) -> io::Result<ApiListener> {
        if path.as_os_str().len() >= MAX_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "API socket path {} is too long ({} bytes; the limit is {})",
                    path.display(),
                    path.as_os_str().len(),
                    MAX_PATH - 1
                ),
            ));
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                info!(
                    path = %path.display(),
                    "replacing the socket file already at the API socket path (a stale one, or a previous instance's that is still exiting)"
                );
                std::fs::remove_file(path)?;
            }
        }
        let listener = bind_private(path)?;
        let file = SocketFile::new(path)?;
        Ok(ApiListener { listener, file })
    }

    /// Connections refused so far because their peer's uid is neither
    /// rnet's nor root's.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Stops accepting and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept(): on a shut-down listening socket it fails at
        // once (no path needed, which the sandbox may have hidden).
        let _ = socket2::SockRef::from(&self.wake).shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let path = self.file.path.display();
        match self.file.remove() {
            Ok(true) => {}
            Ok(false) => {
                info!(%path, "the API socket path now names another socket (a newer instance's); left in place")
            }
            Err(e) => debug!(%path, error = %e, "cannot remove the API socket"),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_now();
        }
    }
}

/// Binds a Unix stream socket at `path` whose file is `0600` from the
/// moment it exists: the socket's own inode gets the mode before `bind`
/// (Linux creates the file with it, less the umask), so there is neither a
/// window with the umask's mode nor a `chmod` by path that could follow a
/// link planted meanwhile.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    nix::sys::stat::fchmod(&sock, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    sock.bind(&socket2::SockAddr::unix(path)?)?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "the API socket {} was created with mode {:o}, not 0600",
            path.display(),
            meta.permissions().mode() & 0o7777
        )));
    }
    sock.listen(128)?;
    Ok(sock.into())
}

/// The uids served: rnet's own (real and effective) and root.
fn allowed_uids() -> [u32; 3] {
    [
        nix::unistd::getuid().as_raw(),
        nix::unistd::geteuid().as_raw(),
        0,
    ]
}

/// A log line at most every [`LOG_EVERY`]; the number of events since the
/// last one is returned when one is due.
#[derive(Default)]
struct Every {
    last: Option<Instant>,
    since: u64,
}

impl Every {
    fn due(&mut self) -> Option<u64> {
        self.since += 1;
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

struct Server {
    handle: Arc<dyn PortControl>,
    guest: Ipv4Addr,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    uids: [u32; 3],
}

impl Server {
    fn run(self, listener: UnixListener) {
        let active = Arc::new(AtomicUsize::new(0));
        let mut refused_log = Every::default();
        let mut accept_log = Every::default();
        loop {
            let conn = listener.accept();
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let mut conn = match conn {
                Ok((c, _)) => c,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors: the connection stays queued until
                    // one is free; retrying at once would only spin.
                    if let Some(n) = accept_log.due() {
                        warn!(error = %e, failures = n, "API socket: cannot accept a client (out of descriptors); retrying every {} ms (logged at most every 10 s)", ACCEPT_BACKOFF.as_millis());
                    }
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
                Err(_) => continue,
            };
            let peer =
                nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials);
            let uid = match &peer {
                Ok(c) => Some(c.uid()),
                Err(_) => None,
            };
            if !uid.is_some_and(|u| self.uids.contains(&u)) {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = refused_log.due() {
                    warn!(
                        peer_uid = ?uid,
                        peer_pid = peer.as_ref().ok().map(|c| c.pid()),
                        refused = n,
                        "API socket: refused a client whose uid is neither rnet's nor root's (logged at most every 10 s)"
                    );
                }
                let reply = error_reply(
                    "bad request: permission denied",
                    Some(format!(
                        "uid {} may not use this socket; only uid {} and root may",
                        uid.map_or_else(|| "unknown".to_string(), |u| u.to_string()),
                        self.uids[1]
                    )),
                );
                // One short datagram-sized reply; never wait for this client.
                let _ = socket2::SockRef::from(&conn)
                    .send_with_flags(reply.as_bytes(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
                continue;
            }
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                active.fetch_sub(1, Ordering::SeqCst);
                let _ = socket2::SockRef::from(&conn).send_with_flags(
                    error_reply("bad request: too many clients", None).as_bytes(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
                continue;
            }
            let (handle, slots, guest) = (self.handle.clone(), active.clone(), self.guest);
            let spawned = std::thread::Builder::new()
                .name("rnet-api-client".into())
                .spawn(move || {
                    let deadline = Instant::now() + REQUEST_DEADLINE;
                    let reply = match read_request(&mut conn, deadline) {
                        Ok(req) => respond(&req, &*handle, guest),
                        Err(e) => e,
                    };
                    // The reply may take the rest of the deadline, and at
                    // least a second after a slow request was refused.
                    let _ = write_by(
                        &mut conn,
                        reply.as_bytes(),
                        deadline.max(Instant::now() + Duration::from_secs(1)),
                    );
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    slots.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                active.fetch_sub(1, Ordering::SeqCst);
                warn!(error = %e, "cannot start an API client thread");
            }
        }
    }
}

/// Time left until `deadline`, or `None` once it has passed.
fn left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Writes all of `bytes` unless `deadline` passes first.
fn write_by(conn: &mut UnixStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let t = left(deadline).ok_or(io::ErrorKind::TimedOut)?;
        conn.set_write_timeout(Some(t))?;
        match conn.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one request: until EOF, or until the bytes so far form a complete
/// JSON value (for clients that do not half-close). Errors are replies.
/// The whole request must have arrived by `deadline`.
fn read_request(conn: &mut UnixStream, deadline: Instant) -> Result<Value, String> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let Some(t) = left(deadline) else {
            return Err(error_reply(
                "bad request: timed out",
                Some(format!(
                    "the request did not arrive within {} s",
                    REQUEST_DEADLINE.as_secs()
                )),
            ));
        };
        if conn.set_read_timeout(Some(t)).is_err() {
            break;
        }
        match conn.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                // slirp4netns reads into a buffer of this size and refuses a
                // request that fills it; so do we, whatever its content.
                if len >= MAX_REQUEST {
                    return Err(error_reply("bad request: too large message", None));
                }
                // A client that does not half-close is answered once its
                // bytes form a value and nothing more is queued.
                if serde_json::from_slice::<Value>(&buf[..len]).is_ok() && !more_queued(conn) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The timeout is the deadline: the next turn says so.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        }
    }
    serde_json::from_slice(&buf[..len])
        .map_err(|_| error_reply("bad request: cannot parse JSON", None))
}

/// Whether more request bytes are already waiting on the connection.
fn more_queued(conn: &UnixStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    let sock = socket2::SockRef::from(conn);
    matches!(
        sock.recv_with_flags(&mut probe, libc::MSG_PEEK | libc::MSG_DONTWAIT),
        Ok(n) if n > 0
    )
}

fn error_reply(desc: &str, detail: Option<String>) -> String {
    let mut e = json!({ "desc": desc });
    if let Some(d) = detail {
        e["detail"] = Value::String(d);
    }
    json!({ "error": e }).to_string()
}

/// Answers one parsed request. Public so the fuzzer can drive it.
pub fn respond(req: &Value, handle: &dyn PortControl, guest: Ipv4Addr) -> String {
    match parse_request(req, guest) {
        Err(desc) => error_reply(desc, None),
        Ok(Request::Add(spec)) => match handle.add_port(spec) {
            Ok(info) => {
                json!({ "return": { "id": info.id, "host_port": info.spec.host_port } }).to_string()
            }
            Err(e) => {
                debug!(error = %e, "add_hostfwd failed");
                error_reply(
                    "bad request: add_hostfwd: slirp_add_hostfwd failed",
                    Some(e.to_string()),
                )
            }
        },
        Ok(Request::Remove(id)) => match handle.remove_port(id) {
            Ok(()) => json!({ "return": {} }).to_string(),
            Err(PortError::NoSuchId(_)) => {
                error_reply("bad request: remove_hostfwd: bad arguments.id", None)
            }
            Err(e) => error_reply(
                "bad request: remove_hostfwd: slirp_remove_hostfwd failed",
                Some(e.to_string()),
            ),
        },
        Ok(Request::Status) => match handle.status() {
            Ok(v) => json!({ "return": v }).to_string(),
            Err(e) => error_reply("bad request: get_status failed", Some(e.to_string())),
        },
        Ok(Request::List) => match handle.ports() {
            Ok(list) => {
                // At the top level, not under "return": slirp4netns's
                // api.c answers list_hostfwd this way, and clients read it.
                let entries: Vec<Value> = list.iter().flat_map(entries_of).collect();
                json!({ "entries": entries }).to_string()
            }
            Err(e) => error_reply("bad request: list_hostfwd failed", Some(e.to_string())),
        },
    }
}

/// A validated request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// `add_hostfwd`.
    Add(PortSpec),
    /// `remove_hostfwd`.
    Remove(u64),
    /// `list_hostfwd`.
    List,
    /// `get_status` (rnet's own): flows, counters, drops, ports.
    Status,
}

/// Validates a request; the error is the slirp4netns error text.
pub fn parse_request(req: &Value, guest: Ipv4Addr) -> Result<Request, &'static str> {
    let obj = req.as_object().ok_or("bad request: json_object() failed")?;
    let exec = obj
        .get("execute")
        .and_then(Value::as_str)
        .ok_or("bad request: no execute found")?;
    let args = obj.get("arguments");
    let arg = |k: &str| args.and_then(|a| a.get(k));
    match exec {
        "list_hostfwd" => Ok(Request::List),
        "get_status" => Ok(Request::Status),
        "remove_hostfwd" => {
            let id = arg("id")
                .and_then(Value::as_u64)
                .ok_or("bad request: remove_hostfwd: bad arguments.id")?;
            Ok(Request::Remove(id))
        }
        "add_hostfwd" => {
            let proto = match arg("proto").and_then(Value::as_str) {
                Some("tcp") => Proto::Tcp,
                Some("udp") => Proto::Udp,
                _ => return Err("bad request: add_hostfwd: bad arguments.proto"),
            };
            let host_ip: IpAddr = match arg("host_addr") {
                None | Some(Value::Null) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                Some(Value::String(s)) if s.is_empty() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                Some(Value::String(s)) => s
                    .parse()
                    .map_err(|_| "bad request: add_hostfwd: bad arguments.host_addr")?,
                _ => return Err("bad request: add_hostfwd: bad arguments.host_addr"),
            };
            let host_port = arg("host_port")
                .and_then(Value::as_u64)
                .filter(|p| *p <= 65535)
                .ok_or("bad request: add_hostfwd: bad arguments.host_port")?;
            // Absent, slirp4netns's default: the guest's IPv4 address for
            // an IPv4 host address; for an IPv6 one, the guest itself in
            // each client's family (see `PortSpec::guest_ip`).
            let default_guest = match host_ip {
                IpAddr::V4(_) => Some(IpAddr::V4(guest)),
                IpAddr::V6(_) => None,
            };
            let guest_ip: Option<IpAddr> = match arg("guest_addr") {
                None | Some(Value::Null) => default_guest,
                Some(Value::String(s)) if s.is_empty() => default_guest,
                // A v4-mapped address means the IPv4 one.
                Some(Value::String(s)) => Some(
                    s.parse::<IpAddr>()
                        .map_err(|_| "bad request: add_hostfwd: bad arguments.guest_addr")?
                        .to_canonical(),
                ),
                _ => return Err("bad request: add_hostfwd: bad arguments.guest_addr"),
            };
            let guest_port = arg("guest_port")
                .and_then(Value::as_u64)
                .filter(|p| (1..=65535).contains(p))
                .ok_or("bad request: add_hostfwd: bad arguments.guest_port")?;
            Ok(Request::Add(PortSpec::single(
                proto,
                SocketAddr::new(host_ip, host_port as u16),
                guest_ip,
                guest_port as u16,
            )))
        }
        _ => Err("bad request: unknown execute"),
    }
}

/// The list entries of one rule (one per port of a range).
fn entries_of(info: &PortInfo) -> Vec<Value> {
    let s = &info.spec;
    (0..s.count)
        .map(|i| {
            json!({
                "id": info.id,
                "proto": s.proto.as_str(),
                "host_addr": s.host_ip.to_string(),
                "host_port": s.host_port.wrapping_add(i),
                "guest_addr": info.guest_ip.to_string(),
                "guest_port": s.guest_port.wrapping_add(i),
                "path": info.path,
            })
        })
        .collect()
}

/// Sends one request to the control socket at `path` and returns the reply.
pub fn call(path: &Path, request: &Value) -> io::Result<Value> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to the API socket {}: {e}", path.display()),
        )
    })?;
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.write_all(request.to_string().as_bytes())?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)?;
    serde_json::from_slice(&reply).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unreadable reply from {}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

    fn parse(s: &str) -> Result<Request, &'static str> {
        parse_request(&serde_json::from_str(s).unwrap(), G)
    }

    #[test]
    fn requests() {
        assert_eq!(parse(r#"{"execute":"list_hostfwd"}"#), Ok(Request::List));
        assert_eq!(
            parse(r#"{"execute":"remove_hostfwd","arguments":{"id":3}}"#),
            Ok(Request::Remove(3))
        );
        let add = parse(r#"{"execute":"add_hostfwd","arguments":{"proto":"udp","host_addr":"","host_port":8472,"guest_addr":"","guest_port":8472}}"#).unwrap();
        assert_eq!(
            add,
            Request::Add(PortSpec::single(
                Proto::Udp,
                "0.0.0.0:8472".parse().unwrap(),
                Some(G.into()),
                8472
            ))
        );
        // IPv6 host and guest addresses; with an IPv6 host address and no
        // guest address the rule follows each client's family.
        let add = parse(r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"::1","host_port":8080,"guest_addr":"fd00::100","guest_port":80}}"#).unwrap();
        assert_eq!(
            add,
            Request::Add(PortSpec::single(
                Proto::Tcp,
                "[::1]:8080".parse().unwrap(),
                Some("fd00::100".parse().unwrap()),
                80
            ))
        );
        let add = parse(r#"{"execute":"add_hostfwd","arguments":{"proto":"udp","host_addr":"::","host_port":8080,"guest_port":80}}"#).unwrap();
        assert_eq!(
            add,
            Request::Add(PortSpec::single(
                Proto::Udp,
                "[::]:8080".parse().unwrap(),
                None,
                80
            ))
        );
    }

    #[test]
    fn slirp4netns_error_texts() {
        for (req, want) in [
            (r#"[1]"#, "bad request: json_object() failed"),
            (r#"{"x":1}"#, "bad request: no execute found"),
            (r#"{"execute":"reboot"}"#, "bad request: unknown execute"),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"sctp","host_port":1,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.proto",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"x","host_port":1,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.host_addr",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.host_port",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1,"guest_addr":"fd00::x","guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.guest_addr",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1,"guest_addr":"[::1]","guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.guest_addr",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1,"guest_port":0}}"#,
                "bad request: add_hostfwd: bad arguments.guest_port",
            ),
            (
                r#"{"execute":"remove_hostfwd","arguments":{"id":"x"}}"#,
                "bad request: remove_hostfwd: bad arguments.id",
            ),
        ] {
            assert_eq!(parse(req), Err(want), "{req}");
        }
    }
}
