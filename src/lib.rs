//! rnet gives an unprivileged network namespace a real network interface.
//!
//! It creates a TAP device inside the target's namespaces, configures it
//! (address, MTU, default route, `lo` up) and runs, outside the namespace, a
//! userspace TCP/IP stack ([smoltcp]) that terminates the guest's TCP, UDP
//! and ICMP and carries them over ordinary host sockets (NAT). The virtual
//! network has a gateway (which may stand for the host's loopback), a DNS
//! forwarder, a DHCPv4 server and, over IPv6, router advertisements.
//!
//! # Layers
//!
//! - [`ns`]: entering the target's namespaces, creating and configuring
//!   the TAP, passing its descriptor back (SCM_RIGHTS), `rnet run`'s
//!   fresh namespaces.
//! - [`tap`]: reading and writing frames on the TAP descriptor.
//! - [`stack`]: the smoltcp interface, frame classification, frames rnet
//!   builds itself.
//! - [`nat`]: the address policy and the TCP, UDP and ICMP flows.
//! - [`services`]: the DNS forwarder and the DHCPv4 server.
//! - [`ports`]: port publishing: the rules, the spliced fast path, the
//!   control socket (slirp4netns's JSON protocol), `--publish-auto`.
//! - [`status`], [`metrics`], [`pcap`], [`stats`]: what an operator sees
//!   (the status report, the Prometheus endpoint, captures, counters).
//! - [`sandbox`]: self-isolation once set up.
//! - [`supervise`]: the supervisor that restarts a data plane that died.
//! - the event loop (private) ties them together on one thread.
//!
//! # Example
//!
//! Attach to a process's namespaces and run until it exits:
//!
//! ```no_run
//! use rnet::{Config, Network, OutboundPolicy, Target};
//!
//! let config = Config::builder()
//!     .allow_host_loopback(true)
//!     .outbound(OutboundPolicy::Only(vec!["198.18.0.0/15".parse()?]))
//!     .dns_upstreams(vec!["127.0.0.1:5353".parse()?])
//!     .build()?;
//! let net = Network::attach(Target::Pid(4242), config)?;
//! println!("{:?}", net.handle().stats());
//! let why = net.wait()?;
//! println!("network ended: {why:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [smoltcp]: https://docs.rs/smoltcp

#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
mod engine;
pub mod metrics;
pub mod nat;
pub mod ns;
pub mod pcap;
pub mod ports;
pub mod sandbox;
pub mod services;
pub mod stack;
pub mod stats;
pub mod status;
pub mod supervise;
pub mod tap;

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use config::{
    Config, ConfigBuilder, ConfigError, IpCidr, Ipv4Cidr, Ipv6Cidr, Limits, OutboundPolicy,
    Services, UdpFilter,
};
pub use engine::ExitReason;
pub use ns::{NsError, Target};
pub use ports::{PortError, PortInfo, PortSpec, Proto};
pub use stats::{DropReason, StatsSnapshot};

/// The commit rnet was built from (`unknown` when built outside a git
/// checkout, for example from a release tarball).
pub const BUILD_COMMIT: &str = match option_env!("RNET_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

use engine::{Control, Engine};
use stats::Stats;

/// Everything that can stop a network from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Entering the namespaces or setting up the TAP failed.
    #[error(transparent)]
    Namespace(#[from] NsError),
    /// A port could not be published at start.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The sandbox could not be entered.
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    /// An I/O error outside the namespaces, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What rnet was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// A cheap, cloneable handle to a running network.
#[derive(Clone)]
pub struct Handle {
    control: Arc<Control>,
    stats: Arc<Stats>,
}

impl Handle {
    /// Asks the network to stop; [`Network::wait`] then returns
    /// [`ExitReason::Stopped`]. Safe to call from any thread, repeatedly.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// Whether the event loop is still running.
    pub fn is_running(&self) -> bool {
        !self.control.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Publishes a port while running. With host port 0 the kernel picks a
    /// free port, which the returned [`PortInfo`] shows.
    pub fn add_port(&self, spec: PortSpec) -> Result<PortInfo, PortError> {
        self.ask(|tx| engine::Command::AddPort(spec, tx))?
    }

    /// Withdraws a published port by id. Its listeners close; connections
    /// already established continue until they end.
    pub fn remove_port(&self, id: u64) -> Result<(), PortError> {
        self.ask(|tx| engine::Command::RemovePort(id, tx))?
    }

    /// The published ports.
    pub fn ports(&self) -> Result<Vec<PortInfo>, PortError> {
        self.ask(engine::Command::ListPorts)
    }

    /// A live status report (flows, counters, drops, ports) as JSON; see
    /// [`status`] for its renderings.
    pub fn status(&self) -> Result<serde_json::Value, PortError> {
        self.ask(engine::Command::Status)
    }

    /// Like [`Handle::status`], giving the event loop at most `limit` to
    /// answer (the metrics endpoint's scrape deadline).
    pub fn status_within(
        &self,
        limit: std::time::Duration,
    ) -> Result<serde_json::Value, PortError> {
        self.ask_within(engine::Command::Status, limit)
    }

    /// How many times the supervisor restarted the data plane (see
    /// [`supervise`]); 0 without supervision.
    pub fn restarts(&self) -> u64 {
        supervise::restarts()
    }

    fn ask<T>(
        &self,
        cmd: impl FnOnce(std::sync::mpsc::SyncSender<T>) -> engine::Command,
    ) -> Result<T, PortError> {
        self.ask_within(cmd, std::time::Duration::from_secs(10))
    }

    fn ask_within<T>(
        &self,
        cmd: impl FnOnce(std::sync::mpsc::SyncSender<T>) -> engine::Command,
        limit: std::time::Duration,
    ) -> Result<T, PortError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if !self.control.send(cmd(tx)) {
            return Err(PortError::Stopped);
        }
        rx.recv_timeout(limit).map_err(|_| PortError::Stopped)
    }
}

/// The control socket and `--publish-auto` drive a network through this
/// narrow interface, not through the handle itself.
impl ports::PortControl for Handle {
    fn add_port(&self, spec: PortSpec) -> Result<PortInfo, PortError> {
        Handle::add_port(self, spec)
    }
    fn remove_port(&self, id: u64) -> Result<(), PortError> {
        Handle::remove_port(self, id)
    }
    fn ports(&self) -> Result<Vec<PortInfo>, PortError> {
        Handle::ports(self)
    }
    fn status(&self) -> Result<serde_json::Value, PortError> {
        Handle::status(self)
    }
    fn is_running(&self) -> bool {
        Handle::is_running(self)
    }
}

/// A running virtual network: a TAP in the target namespace and the event
/// loop serving it on its own thread.
pub struct Network {
    handle: Handle,
    thread: JoinHandle<io::Result<ExitReason>>,
    tap_name: String,
    api: Option<ports::api::ApiServer>,
    metrics: Option<metrics::MetricsServer>,
    watcher: Option<JoinHandle<()>>,
}

impl Network {
    /// Attaches to `target`'s namespaces: creates (or reuses) the TAP there,
    /// configures it unless [`ConfigBuilder::configure`] said not to, and
    /// starts serving it. When the target is a PID, the network ends when
    /// that process exits.
    ///
    /// The namespace work happens in a short-lived forked child, so this may
    /// be called from a multi-threaded program.
    pub fn attach(target: Target, config: Config) -> Result<Network, Error> {
        let setup = ns::TapSetup {
            name: config.tap_name().to_string(),
            mtu: config.mtu(),
            vnet_hdr: config.offloads,
            configure: config.configure().then(|| ns::IfaceConfig {
                addr: config.guest(),
                prefix_len: config.cidr().prefix(),
                gateway: config.gateway(),
                mac: config.mac(),
                ipv6: config.ipv6_guest().zip(config.ipv6_gateway()),
            }),
        };
        let opened = ns::open_tap(&target, &setup)?;
        let vnet = setup.vnet_hdr;
        Network::serve(
            opened.fd,
            vnet,
            opened.name,
            Some(opened.mac),
            Some(target),
            config,
        )
    }

    /// Serves an already-open TAP descriptor (for example one passed by a
    /// parent, as slirp4netns's `--netns-type=tapfd` does), ending when
    /// `watch_pid` exits if given. Nothing is configured inside the
    /// namespace. Any descriptor that reads and writes whole Ethernet frames
    /// works, such as one end of a `SOCK_SEQPACKET` socket pair, which is
    /// how the benchmarks and fuzzers drive the data plane.
    pub fn attach_tap(
        tap: OwnedFd,
        watch_pid: Option<i32>,
        config: Config,
    ) -> Result<Network, Error> {
        let name = config.tap_name().to_string();
        Network::serve(tap, false, name, None, watch_pid.map(Target::Pid), config)
    }

    /// As [`Network::attach_tap`], for a descriptor whose frames each carry
    /// the 12-byte virtio-net header both ways: a TAP the caller opened with
    /// IFF_VNET_HDR, TUNSETVNETHDRSZ 12 and its offloads set, or a socket
    /// pair standing in for one (as the fuzzers drive the offload path).
    pub fn attach_tap_offload(
        tap: OwnedFd,
        watch_pid: Option<i32>,
        config: Config,
    ) -> Result<Network, Error> {
        let name = config.tap_name().to_string();
        Network::serve(tap, true, name, None, watch_pid.map(Target::Pid), config)
    }

    fn serve(
        fd: OwnedFd,
        vnet: bool,
        tap_name: String,
        guest_mac: Option<[u8; 6]>,
        target: Option<Target>,
        config: Config,
    ) -> Result<Network, Error> {
        let pid = match &target {
            Some(Target::Pid(p)) => Some(*p),
            _ => None,
        };
        let fast = config.fast_ports;
        let mut tap =
            tap::Tap::with_vnet_hdr(fd, vnet).map_err(Error::io("preparing the TAP descriptor"))?;
        // Absolute, so rotation still finds it after the sandbox's chdir.
        let pcap_path = config
            .pcap
            .as_deref()
            .map(std::path::absolute)
            .transpose()
            .map_err(Error::io("resolving the capture file's path"))?;
        if let Some(path) = &pcap_path {
            let w = pcap::PcapWriter::create(path, config.pcap_cap).map_err(Error::io(format!(
                "creating the capture file {}",
                path.display()
            )))?;
            tap.set_pcap(w);
        }
        // Upstreams from resolv.conf are followed for changes (the watch
        // holds what it needs to look at the file inside the sandbox).
        let (upstreams, resolv) = if config.dns_upstreams().is_empty() {
            let path = services::dns::resolv_conf_path();
            let watch = match services::dns::ResolvWatch::open(&path) {
                Ok(w) => Some(w),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot follow resolv.conf for changes; its DNS upstreams are read once");
                    None
                }
            };
            (services::dns::system_upstreams(), watch)
        } else {
            (config.dns_upstreams().to_vec(), None)
        };
        if upstreams.is_empty() && !config.disable_dns() {
            tracing::warn!(
                "no DNS upstream: /etc/resolv.conf lists no nameserver and no --dns-upstream was given; DNS queries to the forwarder will go unanswered"
            );
        }
        let ready_fd = config.ready_fd;
        let api_socket = config.api_socket().map(|p| p.to_path_buf());
        let auto = config.publish_auto.clone();
        let guest = config.guest();
        let sandbox = (config.sandbox || config.seccomp).then(|| sandbox::SandboxOptions {
            mount: config.sandbox,
            seccomp: config.seccomp,
            // Read at start already; kept for parity with slirp4netns.
            keep: vec!["/etc/resolv.conf".into()],
            // pcap rotation renames within the capture's directory.
            keep_writable: pcap_path
                .as_deref()
                .and_then(std::path::Path::parent)
                .map(std::path::Path::to_path_buf)
                .into_iter()
                .collect(),
        });
        let config_metrics = config.metrics_addr;
        let supervise = config.supervise;
        // Everything that needs the filesystem, fork or namespaces happens
        // here, before the sandbox; threads start after it.
        let api_listener = match &api_socket {
            Some(path) => Some(ports::api::ApiServer::bind(path).map_err(Error::io(format!(
                "creating the API socket {}",
                path.display()
            )))?),
            None => None,
        };
        let metrics_listener = match config_metrics {
            Some(addr) => Some(
                metrics::MetricsListener::bind(addr)
                    .map_err(Error::io(format!("binding the metrics endpoint {addr}")))?,
            ),
            None => None,
        };
        let tables = match (auto.is_empty(), pid) {
            (true, _) => None,
            (false, Some(pid)) => Some(ports::auto::Tables::open(pid).map_err(Error::io(
                format!("opening /proc/{pid}/net for --publish-auto"),
            ))?),
            (false, None) => {
                tracing::warn!(
                    "--publish-auto needs a PID target to read the namespace's sockets; ignored"
                );
                None
            }
        };
        let mut ready_fd = ready_fd;
        let worker = match supervise {
            // Returns only in the worker; everything above is the
            // supervisor's and survives the worker.
            true => Some(supervise::start(
                &mut ready_fd,
                pid,
                config.seccomp,
                api_listener.as_ref().map(ports::api::ApiListener::name),
            )?),
            false => None,
        };
        let config = Arc::new(config);
        let (mut engine, control, stats) = Engine::new(config, tap, pid, upstreams)
            .map_err(Error::io("starting the event loop"))?;
        if let Some(w) = resolv {
            engine.set_resolv_watch(w);
        }
        if let Some(mac) = guest_mac {
            // Known from the TAP itself, so published UDP can reach a
            // guest that has not sent anything yet.
            engine.set_guest_mac(mac);
        }
        raise_fd_limit();
        lazy_large_allocations();
        if let Some(w) = worker {
            engine.set_worker(w);
        }
        if let (true, Some(t)) = (fast, target) {
            engine.enable_fast_ports(t);
        }
        engine.publish_initial()?;
        engine.log_summary(&tap_name);
        if let Some(opts) = &sandbox {
            if fast {
                engine.start_agent_now();
            }
            sandbox::enter(opts)?;
        }
        let thread = std::thread::Builder::new()
            .name("rnet-dataplane".into())
            .spawn({
                let control = control.clone();
                move || {
                    let r = engine.run();
                    // Everything that watches the loop (API, auto-publish)
                    // sees it as stopped from here on.
                    control
                        .stop
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    r
                }
            })
            .map_err(Error::io("starting the data-plane thread"))?;
        let handle = Handle { control, stats };
        let api = match api_listener {
            Some(l) => match l.serve(Arc::new(handle.clone()), guest) {
                Ok(a) => Some(a),
                Err(e) => {
                    handle.stop();
                    let _ = thread.join();
                    return Err(Error::io("starting the API thread")(e));
                }
            },
            None => None,
        };
        let metrics = match metrics_listener {
            Some(l) => match l.serve(handle.clone()) {
                Ok(m) => Some(m),
                Err(e) => {
                    handle.stop();
                    let _ = thread.join();
                    return Err(Error::io("starting the metrics thread")(e));
                }
            },
            None => None,
        };
        let watcher = tables.and_then(|t| {
            let h = handle.clone();
            std::thread::Builder::new()
                .name("rnet-autopublish".into())
                .spawn(move || ports::auto::watch(t, auto, &h))
                .ok()
        });
        // Ready means usable: the loop runs and the API socket listens.
        // The supervisor hears it first: from then on a death is a crash.
        supervise::worker_ready();
        if let Some(fd) = ready_fd {
            signal_ready(fd).map_err(Error::io(format!("writing to --ready-fd {fd}")))?;
        }
        Ok(Network {
            handle,
            thread,
            tap_name,
            api,
            metrics,
            watcher,
        })
    }

    /// Creates a new user namespace (the current uid and gid mapped to 0)
    /// and network namespace, attaches a network to them, and then starts
    /// `argv` inside. Returns the network and the command's PID; reap it
    /// with [`wait_for_exit`].
    pub fn spawn(argv: &[OsString], config: Config) -> Result<(Network, i32), Error> {
        Network::spawn_with(argv, config, &ns::SpawnOptions::default())
    }

    /// Like [`Network::spawn`], with the namespace choices of `opts`
    /// (subordinate id ranges, a private /etc/resolv.conf).
    pub fn spawn_with(
        argv: &[OsString],
        config: Config,
        opts: &ns::SpawnOptions,
    ) -> Result<(Network, i32), Error> {
        // The command is this process's child: a supervisor's worker
        // could not wait for it.
        let mut config = config;
        config.supervise = false;
        let mut cmd = ns::spawn_with(argv, opts)?;
        let pid = cmd.pid();
        let net = match Network::attach(Target::Pid(pid), config) {
            Ok(n) => n,
            Err(e) => {
                // Dropping the command closes its go pipe: it exits 127.
                drop(cmd);
                let _ = wait_for_exit(pid);
                return Err(e);
            }
        };
        if let Err(e) = cmd.release() {
            net.handle().stop();
            let _ = net.wait();
            let _ = wait_for_exit(pid);
            return Err(e.into());
        }
        Ok((net, pid))
    }

    /// A handle for stopping the network or reading its counters.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Where the metrics endpoint listens, when one was asked for.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(metrics::MetricsServer::addr)
    }

    /// The TAP device's name inside the namespace.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    /// Waits for the network to end and says why. All host sockets are
    /// closed when this returns.
    pub fn wait(self) -> Result<ExitReason, Error> {
        let result = self.thread.join();
        if let Some(api) = self.api {
            api.shutdown();
        }
        if let Some(m) = self.metrics {
            m.shutdown();
        }
        if let Some(w) = self.watcher {
            let _ = w.join();
        }
        match result {
            Ok(r) => r.map_err(Error::io("event loop")),
            Err(_) => Err(Error::Io {
                context: "event loop".into(),
                source: io::Error::other("the data-plane thread panicked"),
            }),
        }
    }
}

/// Makes glibc give every large allocation (smoltcp's socket storage, the
/// flow tables' arrays) its own fresh mapping instead of recycled heap
/// memory, so such memory is returned when freed and untouched pages stay
/// unresident. (The TCP rings are mappings of their own, see
/// `nat::tcp`.) glibc otherwise raises this threshold after the first large
/// free, and from then on large blocks come zeroed, hence resident, from
/// the heap.
fn lazy_large_allocations() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; any value is accepted
    // or refused with a return code, and no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Raises the soft limit on open files to the hard limit: every flow and
/// every published port holds a descriptor, and the common soft default of
/// 1024 is below a NodePort range.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::debug!("cannot raise the open-file limit from {soft} to {hard}: {e}");
        }
    }
}

/// Writes `1` to `fd` and closes it (the `--ready-fd` protocol).
fn signal_ready(fd: i32) -> io::Result<()> {
    use std::io::Write;
    // SAFETY: the caller handed this fd over to rnet for exactly this use;
    // taking ownership closes it after the write, as the protocol expects.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(owned);
    f.write_all(b"1")
}

/// Waits for process `pid` (a child of this process) to exit and returns
/// its exit code, or 128 + the signal number if a signal ended it.
pub fn wait_for_exit(pid: i32) -> io::Result<i32> {
    use nix::sys::wait::{WaitStatus, waitpid};
    let pid = nix::unistd::Pid::from_raw(pid);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
