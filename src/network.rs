//! The running network: [`Network`] attaches to a namespace (or serves a
//! descriptor it is given), starts the event loop on its own thread and the
//! threads around it (control socket, metrics endpoint, auto-publishing),
//! and waits for it to end; [`Error`] is everything that can stop it.
//!
//! Start-up runs in named stages, because the order is what makes the
//! sandbox possible: *prepare* opens everything that needs the filesystem,
//! fork or namespaces (the TAP and its capture, resolv.conf, the listeners);
//! *isolate* builds the loop, publishes the initial ports and enters the
//! sandbox while the process still has one thread; *run* starts the threads
//! and reports ready.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::engine::{Control, Engine, ExitReason};
use crate::handle::Handle;
use crate::ns::{self, NsError, Target};
use crate::phy::{pcap, tap};
use crate::ports::PortError;
use crate::ports::{api, auto as autopub};
use crate::stats::Stats;
use crate::{metrics, sandbox, services, supervise};

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

/// A running virtual network: a TAP in the target namespace and the event
/// loop serving it on its own thread.
pub struct Network {
    handle: Handle,
    thread: JoinHandle<io::Result<ExitReason>>,
    tap_name: String,
    api: Option<api::ApiServer>,
    metrics: Option<metrics::MetricsServer>,
    watcher: Option<JoinHandle<()>>,
}

impl Network {
    /// Attaches to `target`'s namespaces: creates (or reuses) the TAP there,
    /// configures it unless [`ConfigBuilder::configure`](crate::ConfigBuilder::configure) said not to, and
    /// starts serving it. When the target is a PID, the network ends when
    /// that process exits.
    ///
    /// The namespace work happens in a short-lived forked child, so this may
    /// be called from a multi-threaded program.
    pub fn attach(target: Target, config: Config) -> Result<Network, Error> {
        Network::attach_inner(target, None, config)
    }

    /// As [`Network::attach`], ending when `watch_pid` exits instead, for a
    /// target named by path: `watch_pid` is a process inside the target's
    /// network namespace whose `/proc/PID/net` `--publish-auto` reads (pasta
    /// mode's `--netns` anchor, [`ns::anchor`]). The namespaces themselves
    /// are opened through `target`, never through `watch_pid`.
    pub fn attach_watching(
        target: Target,
        watch_pid: i32,
        config: Config,
    ) -> Result<Network, Error> {
        Network::attach_inner(target, Some(watch_pid), config)
    }

    fn attach_inner(
        target: Target,
        watch_pid: Option<i32>,
        config: Config,
    ) -> Result<Network, Error> {
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
            watch_pid,
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
        Network::serve(
            tap,
            false,
            name,
            None,
            watch_pid.map(Target::Pid),
            None,
            config,
        )
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
        Network::serve(
            tap,
            true,
            name,
            None,
            watch_pid.map(Target::Pid),
            None,
            config,
        )
    }

    /// Serves `fd` in three stages: [`Prepared::open`] opens everything
    /// that needs the filesystem, fork or namespaces; [`isolate`] builds
    /// the event loop and enters the sandbox while the process still has
    /// one thread; [`Network::run`] starts the threads and reports ready.
    fn serve(
        fd: OwnedFd,
        vnet: bool,
        tap_name: String,
        guest_mac: Option<[u8; 6]>,
        target: Option<Target>,
        watch_pid: Option<i32>,
        config: Config,
    ) -> Result<Network, Error> {
        // The process whose exit ends the network and whose socket tables
        // `--publish-auto` reads.
        let pid = match (&target, watch_pid) {
            (_, Some(p)) => Some(p),
            (Some(Target::Pid(p)), None) => Some(*p),
            _ => None,
        };
        let prepared = Prepared::open(fd, vnet, &config, pid)?;
        let mut ready_fd = config.ready_fd;
        let worker = match config.supervise {
            // Returns only in the worker; everything above is the
            // supervisor's and survives the worker.
            true => Some(supervise::start(
                &mut ready_fd,
                pid,
                config.seccomp,
                prepared.services.api.as_ref().map(api::ApiListener::name),
            )?),
            false => None,
        };
        let fast = config.fast_ports.then_some(target).flatten();
        let (engine, control, stats, services) =
            isolate(prepared, config, pid, guest_mac, worker, fast, &tap_name)?;
        Network::run(engine, control, stats, services, tap_name, ready_fd)
    }

    /// Starts the data-plane thread and the threads around it (API,
    /// metrics, auto-publishing), then signals readiness.
    fn run(
        engine: Engine,
        control: Arc<Control>,
        stats: Arc<Stats>,
        services: Services,
        tap_name: String,
        ready_fd: Option<i32>,
    ) -> Result<Network, Error> {
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
        let handle = Handle::new(control, stats);
        let api = match services.api {
            Some(l) => match l.serve(Arc::new(handle.clone()), services.guest) {
                Ok(a) => Some(a),
                Err(e) => {
                    handle.stop();
                    let _ = thread.join();
                    return Err(Error::io("starting the API thread")(e));
                }
            },
            None => None,
        };
        let metrics = match services.metrics {
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
        let auto = services.auto;
        let watcher = services.tables.and_then(|t| {
            let h = handle.clone();
            std::thread::Builder::new()
                .name("rnet-autopublish".into())
                .spawn(move || autopub::watch(t, auto, &h))
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

/// What start-up opens before the sandbox: everything that needs the
/// filesystem, fork or namespaces. Threads start only after the sandbox.
struct Prepared {
    tap: tap::Tap,
    /// The DNS upstreams, and the resolv.conf watch when they came from it.
    upstreams: Vec<SocketAddr>,
    resolv: Option<services::dns::ResolvWatch>,
    sandbox: Option<sandbox::SandboxOptions>,
    services: Services,
}

/// The listeners and tables the threads around the loop serve.
struct Services {
    api: Option<api::ApiListener>,
    metrics: Option<metrics::MetricsListener>,
    tables: Option<autopub::Tables>,
    auto: Vec<autopub::AutoPublish>,
    guest: std::net::Ipv4Addr,
}

impl Prepared {
    /// The prepare stage: the TAP (and its capture), the DNS upstreams,
    /// the sandbox's options and the listeners.
    fn open(fd: OwnedFd, vnet: bool, config: &Config, pid: Option<i32>) -> Result<Self, Error> {
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
        let (upstreams, resolv) = dns_upstreams(config);
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
        Ok(Prepared {
            tap,
            upstreams,
            resolv,
            sandbox,
            services: Services::bind(config, pid)?,
        })
    }
}

impl Services {
    /// Binds the API socket and the metrics endpoint and opens the
    /// namespace's socket tables for `--publish-auto`.
    fn bind(config: &Config, pid: Option<i32>) -> Result<Self, Error> {
        let api = match config.api_socket() {
            Some(path) => Some(api::ApiServer::bind(path).map_err(Error::io(format!(
                "creating the API socket {}",
                path.display()
            )))?),
            None => None,
        };
        let metrics = match config.metrics_addr {
            Some(addr) => Some(
                metrics::MetricsListener::bind(addr)
                    .map_err(Error::io(format!("binding the metrics endpoint {addr}")))?,
            ),
            None => None,
        };
        let auto = config.publish_auto.clone();
        let tables = match (auto.is_empty(), pid) {
            (true, _) => None,
            (false, Some(pid)) => Some(autopub::Tables::open(pid).map_err(Error::io(format!(
                "opening /proc/{pid}/net for --publish-auto"
            )))?),
            (false, None) => {
                tracing::warn!(
                    "--publish-auto needs a PID target to read the namespace's sockets; ignored"
                );
                None
            }
        };
        Ok(Services {
            api,
            metrics,
            tables,
            auto,
            guest: config.guest(),
        })
    }
}

/// The DNS upstreams: the configured ones, or resolv.conf's, which are
/// then followed for changes (the watch holds what it needs to look at the
/// file inside the sandbox).
fn dns_upstreams(config: &Config) -> (Vec<SocketAddr>, Option<services::dns::ResolvWatch>) {
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
    (upstreams, resolv)
}

/// The isolate stage: builds the event loop from what was prepared,
/// publishes the initial ports and enters the sandbox (forking the
/// fast-path agent first, since the sandbox forbids fork and setns).
fn isolate(
    prepared: Prepared,
    config: Config,
    pid: Option<i32>,
    guest_mac: Option<[u8; 6]>,
    worker: Option<supervise::Worker>,
    fast: Option<Target>,
    tap_name: &str,
) -> Result<(Engine, Arc<Control>, Arc<Stats>, Services), Error> {
    let Prepared {
        tap,
        upstreams,
        resolv,
        sandbox,
        services,
    } = prepared;
    let fast_ports = config.fast_ports;
    let (mut engine, control, stats) = Engine::new(Arc::new(config), tap, pid, upstreams)
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
    if let Some(t) = fast {
        engine.enable_fast_ports(t);
    }
    engine.publish_initial()?;
    engine.log_summary(tap_name);
    if let Some(opts) = &sandbox {
        if fast_ports {
            engine.start_agent_now();
        }
        sandbox::enter(opts)?;
    }
    Ok((engine, control, stats, services))
}

/// Makes glibc give every large allocation (smoltcp's socket storage, the
/// flow tables' arrays) its own fresh mapping instead of recycled heap
/// memory, so such memory is returned when freed and untouched pages stay
/// unresident. (The TCP rings are mappings of their own, see
/// `nat::tcp`.) glibc otherwise raises this threshold after the first large
/// free, and from then on large blocks come zeroed, hence resident, from
/// the heap.
fn lazy_large_allocations() {
    crate::sys::set_mmap_threshold(128 * 1024);
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
