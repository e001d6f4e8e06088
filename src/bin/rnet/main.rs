//! The `rnet` command: parses the command line, calls the library, maps
//! errors to exit codes (1 for any failure, the command's own status for
//! `rnet run`). Invoked as `slirp4netns` (or `rnet slirp4netns ...`) it is
//! a drop-in slirp4netns instead, and as `pasta` (or `rnet pasta ...`) a
//! drop-in pasta (`compat`). Binary-only code lives beside this file:
//! `compat/` (the two drop-in command lines), `port.rs` and `status.rs`
//! (clients of a running rnet's control socket); the library under `src/`
//! holds everything a bootstrapper embeds.

mod cli;
mod compat;
mod port;
mod status;

use std::ffi::OsString;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use rnet::{Config, Network, PortSpec, Target, config};
use tracing::{error, info};

/// User-mode networking for unprivileged network namespaces.
///
/// rnet creates a TAP device inside a network namespace and serves it from
/// outside with a userspace TCP/IP stack that carries the namespace's TCP,
/// UDP and ICMP over ordinary host sockets. The namespace sees the network
/// 10.0.2.0/24: its own address 10.0.2.100, a gateway at 10.0.2.2 and a DNS
/// forwarder at 10.0.2.3.
#[derive(Parser, Debug)]
#[command(name = "rnet", version = env!("RNET_VERSION"), propagate_version = true, max_term_width = 100)]
#[command(after_long_help = "\
EXAMPLES:
    Give a fresh namespace a network and run a shell in it:
        rnet run -- sh

    Serve the namespaces of an existing process (for example one started
    with `unshare --user --map-root-user --net sleep infinity`):
        rnet attach 12345

    Let the namespace reach a server on the host's 127.0.0.1:8080 as
    10.0.2.2:8080, and nothing else:
        rnet run --allow-host-loopback --outbound-allow none -- curl http://10.0.2.2:8080/

LOGGING:
    -v shows debug messages, -vv everything; RUST_LOG (for example
    RUST_LOG=rnet=debug) overrides both.

EXIT STATUS:
    attach: 0 when the target exits, the --exit-fd hangs up, or on SIGINT/SIGTERM;
    1 on any error. run: the command's exit status (128+N if killed by signal N);
    1 if rnet itself fails.")]
struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log line format: `text` for people, `json` (one object per line:
    /// timestamp, level, fields, message) for log collectors.
    #[arg(long, value_name = "FORMAT", global = true, default_value = "text",
          value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the network namespace of a running process (or a namespace path).
    ///
    /// rnet joins the target's user namespace (when it differs from its own)
    /// and network namespace in a short-lived child, creates the TAP there
    /// (or attaches to an existing TAP of that name), configures it, and
    /// serves it until the target exits.
    Attach(AttachArgs),
    /// Create a user and network namespace, give it a network, and run a command in it.
    ///
    /// The current user and group are mapped to root inside. The command
    /// starts only once the network is up; SIGINT and SIGTERM are passed on
    /// to it, and rnet exits with its status.
    Run(RunArgs),
    /// Publish, list and withdraw ports of a running rnet through its --api-socket.
    ///
    /// Uses the same spec syntax as -p. Examples:
    ///   rnet port add --api-socket /run/user/1000/rnet.sock 8080:80
    ///   rnet port ls --api-socket /run/user/1000/rnet.sock
    ///   rnet port rm --api-socket /run/user/1000/rnet.sock 1
    #[command(verbatim_doc_comment)]
    Port(port::PortArgs),
    /// Show the live status of a running rnet through its --api-socket: flows
    /// by protocol and state, bytes and frames each way, drops by reason,
    /// published ports with their path and open connections, uptime.
    Status(status::StatusArgs),
    /// Print a shell completion script for bash, zsh or fish.
    ///
    /// For example, for bash:
    ///   rnet completions bash > ~/.local/share/bash-completion/completions/rnet
    #[command(verbatim_doc_comment)]
    Completions {
        /// The shell to complete for.
        #[arg(value_name = "SHELL", value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
    /// Print rnet's manual page (roff) on standard output, or write a page
    /// per subcommand into a directory.
    ///
    /// For example:
    ///   rnet man | man -l -
    ///   rnet man --dir ~/.local/share/man/man1
    #[command(verbatim_doc_comment)]
    Man {
        /// Write rnet.1 and rnet-SUBCOMMAND.1 into DIR instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Behave as slirp4netns (same command line, defaults and exit codes).
    ///
    /// `rnet slirp4netns --help` shows its options. Invoking rnet through a
    /// symlink named `slirp4netns` does the same, which is how RootlessKit
    /// (`--slirp4netns-binary`), Podman (`network_cmd_path`) and rootless
    /// Docker (PATH) use it.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Slirp4netns {
        /// slirp4netns's options and arguments.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Behave as pasta (same command line; forks into the background once ready).
    ///
    /// `rnet pasta --help` shows its options. Invoking rnet through a
    /// symlink named `pasta` does the same, which is how Podman 5/6
    /// (`helper_binaries_dir` or PATH) and RootlessKit (`--net=pasta`) use it.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Pasta {
        /// pasta's options and arguments.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
}

#[derive(Args, Debug)]
struct AttachArgs {
    /// PID of a process inside the target namespaces.
    #[arg(required_unless_present = "netns", conflicts_with = "netns")]
    pid: Option<i32>,
    /// Path of the network namespace to serve (e.g. /run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// User namespace to join first, when the netns belongs to one (with --netns).
    #[arg(long, value_name = "PATH", requires = "netns")]
    userns: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Map only your own uid and gid (to root), even when /etc/subuid and
    /// /etc/subgid list ranges for you and newuidmap/newgidmap exist. By
    /// default those ranges are mapped as well (ids 1.. inside), as
    /// RootlessKit does, so package managers and container runtimes work.
    #[arg(long, help_heading = "Namespaces")]
    no_subids: bool,
    /// Keep the host's /etc/resolv.conf. By default the command gets a
    /// private mount namespace in which /etc/resolv.conf names the DNS
    /// forwarder (10.0.2.3); nothing else changes.
    #[arg(long, help_heading = "Namespaces")]
    host_resolv_conf: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Args, Debug)]
struct NetArgs {
    /// Name of the TAP device inside the namespace; an existing TAP of that name is reused.
    #[arg(long, value_name = "NAME", default_value = config::DEFAULT_TAP, help_heading = "Interface")]
    tap: String,
    /// MTU of the TAP device (68-65521).
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MTU, help_heading = "Interface")]
    mtu: u32,
    /// The virtual IPv4 network (prefix length 1-25). The gateway is its .2,
    /// the DNS forwarder .3, the guest .100, DHCP offers from .15.
    #[arg(
        long,
        value_name = "CIDR",
        default_value = "10.0.2.0/24",
        help_heading = "Interface",
        value_parser = cli::cidr
    )]
    cidr: rnet::Ipv4Cidr,
    /// MAC address for the TAP (e.g. 02:00:00:00:00:01; needs configuration).
    #[arg(long, value_name = "MAC", help_heading = "Interface", value_parser = cli::mac)]
    mac_address: Option<[u8; 6]>,
    /// The IPv6 /64 prefix of the virtual link: the gateway is its ::2, the
    /// DNS forwarder ::3, the guest ::100; router advertisements let an
    /// unconfigured guest take an address by SLAAC.
    #[arg(
        long,
        value_name = "PREFIX/64",
        default_value = "fd00::/64",
        help_heading = "Interface",
        value_parser = cli::ipv6_prefix
    )]
    ipv6_prefix: Ipv6Addr,
    /// No IPv6 on the virtual link (IPv4 only). IPv6 is also left off when
    /// --mtu is below 1280, the IPv6 minimum.
    #[arg(long, help_heading = "Interface")]
    no_ipv6: bool,
    /// Do not configure the TAP: no address, route, MTU or link state is set.
    #[arg(long, help_heading = "Interface")]
    no_configure: bool,
    /// Let the gateway 10.0.2.2 reach the host's 127.0.0.1. Off by default:
    /// connections to the gateway then fail with "Network is unreachable".
    #[arg(long, help_heading = "Policy")]
    allow_host_loopback: bool,
    /// Only NAT to destinations in CIDR (repeatable). `none` allows nothing
    /// beyond the gateway and DNS. Without it any destination is allowed
    /// except loopback and special addresses.
    #[arg(long, value_name = "CIDR|none", help_heading = "Policy", value_parser = cli::allow_list)]
    outbound_allow: Vec<cli::AllowList>,
    /// Source address for outgoing IPv4 host sockets (every destination,
    /// the host's loopback through 10.0.2.2 included).
    #[arg(long, value_name = "IPv4", help_heading = "Policy")]
    outbound_addr: Option<Ipv4Addr>,
    /// Which datagrams from the host side may enter a guest's UDP flow:
    /// `address-dependent` only from addresses the flow has sent to (as
    /// Linux conntrack does); `endpoint-independent` from any source the
    /// outbound policy admits (full cone). Refused datagrams are counted
    /// as `filtered`.
    #[arg(long, value_name = "MODE", default_value = "address-dependent", help_heading = "Policy",
          value_parser = cli::udp_filter())]
    udp_filter: config::UdpFilter,
    /// Source address for outgoing IPv6 host sockets (every destination,
    /// the host's loopback through the IPv6 gateway included).
    #[arg(long, value_name = "IPv6", help_heading = "Policy")]
    outbound_addr6: Option<Ipv6Addr>,
    /// DNS server to forward 10.0.2.3 to, tried in order (repeatable).
    /// Default: the nameservers in /etc/resolv.conf.
    #[arg(long, value_name = "ADDR[:PORT]", help_heading = "DNS", value_parser = cli::dns_upstream)]
    dns_upstream: Vec<std::net::SocketAddr>,
    /// Drop all traffic to the DNS forwarder.
    #[arg(long, help_heading = "DNS")]
    disable_dns: bool,
    /// Publish a host port into the namespace (repeatable):
    /// [HOST_IP:]HOST_PORT[-END]:[GUEST_IP:]GUEST_PORT[-END][/tcp|/udp].
    /// HOST_IP defaults to 0.0.0.0, GUEST_IP to the guest in the client's
    /// family (10.0.2.100, fd00::100), the protocol to tcp; IPv6 addresses
    /// go in brackets ([::1]:8080:[fd00::100]:80). The guest sees the
    /// client's real address (a client on the host's loopback appears as
    /// 10.0.2.2, or fd00::2 over IPv6).
    #[arg(short = 'p', long, value_name = "SPEC", help_heading = "Ports")]
    publish: Vec<PortSpec>,
    /// Publish the namespace's listening sockets automatically on the same
    /// host port as they appear (and withdraw them when they close), for
    /// ports in RANGE (default all) and PROTO (default tcp); repeatable.
    /// Host ports already in use are logged and retried, never fatal.
    #[arg(long, value_name = "RANGE[/PROTO]", num_args = 0..=1, require_equals = true,
          default_missing_value = "", help_heading = "Ports")]
    publish_auto: Vec<String>,
    /// How published TCP ports are carried: `auto` uses the fast path (a
    /// helper inside the namespace opens the guest side from the client's
    /// address; bytes move with splice(2)) when it can be set up, else the
    /// userspace stack; `stack` always uses the userspace stack. Both keep
    /// the client's address.
    #[arg(
        long,
        value_name = "auto|stack",
        default_value = "auto",
        help_heading = "Ports",
        value_enum
    )]
    port_path: cli::PortPath,
    /// Open the TAP without the virtio-net header and its offloads. By
    /// default the guest kernel may hand rnet TCP segments of up to 64 KiB
    /// with partial checksums (TSO), and rnet sends large segments back for
    /// the guest to cut into MSS-sized pieces; this flag restores one
    /// MTU-sized frame per read and write (for comparisons, or a kernel
    /// that refuses TUNSETOFFLOAD).
    #[arg(long, help_heading = "Interface")]
    no_offload: bool,
    /// After traffic, keep polling for US microseconds before sleeping
    /// (0: sleep at once). A reply arriving within that time is handled
    /// without a wake-up, which roughly halves the round-trip time rnet adds,
    /// for up to that much CPU time per burst. Ignored with a single CPU.
    #[arg(long, value_name = "US", default_value_t = 50, help_heading = "Interface",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    busy_poll_us: u32,
    /// Resident memory all TCP flows' buffers may use together, in MiB. At
    /// the budget rnet stops taking more data into them (senders wait on
    /// their TCP windows) until memory frees; the default keeps rnet under
    /// 512 MiB at the TCP flow cap.
    #[arg(long, value_name = "MIB", default_value_t = 320, help_heading = "Interface",
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    memory_budget: u32,
    /// Serve the control socket at PATH (slirp4netns's JSON protocol; used
    /// by `rnet port`). Created mode 0600, removed on exit.
    #[arg(long, value_name = "PATH", help_heading = "Ports")]
    api_socket: Option<PathBuf>,
    /// Write every frame crossing the TAP to FILE in pcap format (tcpdump -r,
    /// Wireshark). Past --pcap-max-mib the file is renamed FILE.1 and a new
    /// one starts, so at most twice that is kept.
    #[arg(long, value_name = "FILE", help_heading = "Diagnostics")]
    pcap: Option<PathBuf>,
    /// Size cap of each capture file, in MiB.
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 100,
        help_heading = "Diagnostics"
    )]
    pcap_max_mib: u64,
    /// Write "1" to file descriptor N once the network is usable, then close it.
    #[arg(long, value_name = "N", help_heading = "Lifecycle")]
    ready_fd: Option<i32>,
    /// Exit when file descriptor N hangs up (its other end is closed).
    #[arg(long, value_name = "N", help_heading = "Lifecycle")]
    exit_fd: Option<i32>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (the families
    /// of `rnet status --prometheus`, plus rnet_build_info). Only loopback
    /// addresses unless --metrics-addr-public.
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Diagnostics")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Allow --metrics-addr on an address other hosts can reach.
    #[arg(long, requires = "metrics_addr", help_heading = "Diagnostics")]
    metrics_addr_public: bool,
    /// Do not isolate rnet once set up. By default it moves to an empty
    /// read-only root in a mount namespace of its own, drops capabilities,
    /// sets no_new_privs and installs a seccomp allow-list.
    #[arg(long, help_heading = "Lifecycle")]
    no_sandbox: bool,
    /// Run the data plane in the rnet process itself, not in a worker that
    /// a supervisor restarts when it dies: for callers that restart rnet
    /// themselves. (`rnet run` never supervises.)
    #[arg(long, help_heading = "Lifecycle")]
    no_supervise: bool,
}

impl NetArgs {
    fn to_config(&self) -> Result<Config, String> {
        let mac = match self.mac_address {
            Some(m) if self.no_configure => {
                let m = cli::format_mac(m);
                return Err(format!(
                    "--mac-address {m} needs rnet to configure the TAP; drop --no-configure"
                ));
            }
            m => m,
        };
        let ipv6 = (!self.no_ipv6 && self.mtu >= 1280).then_some(self.ipv6_prefix);
        let mut b = Config::builder().cidr(self.cidr).mac(mac).ipv6(ipv6);
        for p in &self.publish {
            b = b.publish(*p);
        }
        for a in &self.publish_auto {
            b = b.publish_auto(a.parse()?);
        }
        b.tap_name(&self.tap)
            .mtu(self.mtu)
            .configure(!self.no_configure)
            .allow_host_loopback(self.allow_host_loopback)
            .outbound(cli::outbound_policy(&self.outbound_allow))
            .outbound_addr(self.outbound_addr)
            .udp_filter(self.udp_filter)
            .outbound_addr6(self.outbound_addr6)
            .dns_upstreams(self.dns_upstream.clone())
            .disable_dns(self.disable_dns)
            .ready_fd(self.ready_fd)
            .exit_fd(self.exit_fd)
            .api_socket(self.api_socket.clone())
            .fast_ports(self.port_path == cli::PortPath::Auto)
            .offloads(!self.no_offload)
            .busy_poll(std::time::Duration::from_micros(u64::from(
                self.busy_poll_us,
            )))
            .pcap(self.pcap.clone(), self.pcap_max_mib.saturating_mul(1 << 20))
            .metrics_addr(self.metrics_addr, self.metrics_addr_public)
            .sandbox(!self.no_sandbox)
            .seccomp(!self.no_sandbox)
            .supervise(!self.no_supervise)
            .limits(config::Limits {
                memory_budget: (self.memory_budget as usize) << 20,
                ..config::Limits::default()
            })
            .build()
            .map_err(|e| e.to_string())
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    init_logging_as(verbose, quiet, false);
}

fn init_logging_as(verbose: u8, quiet: bool, json: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "rnet=debug,info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        fmt.json().with_current_span(false).init();
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn main() -> ExitCode {
    if let Some(code) = compat::dispatch() {
        return code;
    }
    let cli = Cli::try_parse().unwrap_or_else(|e| cli::exit_on(e));
    if let Command::Pasta { args } = &cli.command {
        // Only reached when rnet's own options came first (`rnet -v pasta`).
        return compat::pasta::main("pasta", args);
    }
    if let Command::Slirp4netns { args } = &cli.command {
        // Only reached when rnet's own options came first (`rnet -v slirp4netns`).
        return compat::main("slirp4netns", args);
    }
    match &cli.command {
        Command::Completions { shell } => return completions(shell),
        Command::Man { dir } => return man_page(dir.as_deref()),
        _ => {}
    }
    init_logging_as(cli.verbose, cli.quiet, cli.log_format == "json");

    // SIGINT and SIGTERM are taken synchronously by a dedicated thread; block
    // them before any thread exists so every thread inherits the mask.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    if let Err(e) = sigs.thread_block() {
        error!("cannot block signals: {e}");
        return ExitCode::from(1);
    }

    let result = match cli.command {
        Command::Pasta { .. } => unreachable!("handled before"),
        Command::Attach(a) => attach(a, sigs),
        Command::Run(r) => run(r, sigs),
        Command::Port(p) => port::run(p),
        Command::Status(a) => status::run(a),
        Command::Slirp4netns { .. } | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled before")
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            error!("{msg}");
            ExitCode::from(1)
        }
    }
}

/// `rnet completions SHELL`: the script, from the same clap definitions
/// that parse the command line.
fn completions(shell: &str) -> ExitCode {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let shell = match shell {
        "bash" => Shell::Bash,
        "zsh" => Shell::Zsh,
        _ => Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "rnet", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// `rnet man`: rnet(1) in roff on standard output, or with `--dir` every
/// page (rnet.1 and rnet-SUBCOMMAND.1) written into a directory.
fn man_page(dir: Option<&std::path::Path>) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let result = match dir {
        Some(d) => clap_mangen::generate_to(cmd, d),
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rnet: could not write the manual page: {e}");
            ExitCode::from(1)
        }
    }
}

fn attach(a: AttachArgs, sigs: SigSet) -> Result<u8, String> {
    let config = a.net.to_config()?;
    let target = match (a.pid, a.netns) {
        (Some(pid), _) => Target::Pid(pid),
        (None, Some(netns)) => Target::Path {
            netns,
            userns: a.userns,
        },
        (None, None) => return Err("give a PID or --netns PATH".into()),
    };
    let notify = SystemdNotify::from_env();
    let net = Network::attach(target, config).map_err(|e| e.to_string())?;
    // Under a supervisor, the supervisor (the main PID) tells systemd.
    if !rnet::supervise::in_worker() {
        notify.ready();
    }
    let handle = net.handle();
    std::thread::spawn(move || {
        if let Ok(sig) = sigs.wait() {
            info!("{sig:?} received; stopping");
            handle.stop();
        }
    });
    let totals = net.handle();
    let why = net.wait().map_err(|e| e.to_string())?;
    log_stopped(&format!("{why:?}"), &totals);
    Ok(0)
}

/// systemd's readiness protocol (`Type=notify`): when `NOTIFY_SOCKET` is
/// set, `READY=1` is sent there once the network is usable. The socket is
/// connected before the network starts, because the sandbox hides the
/// filesystem path afterwards.
struct SystemdNotify(Option<std::os::unix::net::UnixDatagram>);

impl SystemdNotify {
    fn from_env() -> SystemdNotify {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return SystemdNotify(None);
        };
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => SocketAddr::from_pathname(&path),
        };
        let sock =
            UnixDatagram::unbound().and_then(|s| addr.and_then(|a| s.connect_addr(&a)).map(|()| s));
        match sock {
            Ok(s) => SystemdNotify(Some(s)),
            Err(e) => {
                tracing::warn!(
                    "NOTIFY_SOCKET {}: {e}; systemd will not hear that rnet is ready",
                    path.to_string_lossy()
                );
                SystemdNotify(None)
            }
        }
    }

    fn ready(&self) {
        if let Some(s) = &self.0
            && let Err(e) = s.send(b"READY=1\n")
        {
            tracing::warn!("telling systemd rnet is ready: {e}");
        }
    }
}

/// The last log line: why rnet stopped and what crossed the TAP.
fn log_stopped(reason: &str, handle: &rnet::Handle) {
    let s = handle.stats();
    info!(
        reason,
        frames_in = s.frames_in,
        bytes_in = s.bytes_in,
        frames_out = s.frames_out,
        "network stopped"
    );
}

fn run(r: RunArgs, sigs: SigSet) -> Result<u8, String> {
    let config = r.net.to_config()?;
    let opts = rnet::ns::SpawnOptions {
        subids: !r.no_subids,
        resolv_conf: (!r.host_resolv_conf).then(|| config.resolv_conf()),
    };
    let notify = SystemdNotify::from_env();
    let (net, pid) = Network::spawn_with(&r.command, config, &opts).map_err(|e| e.to_string())?;
    notify.ready();
    std::thread::spawn(move || {
        while let Ok(sig) = sigs.wait() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    });
    let code = rnet::wait_for_exit(pid).map_err(|e| format!("waiting for the command: {e}"))?;
    let totals = net.handle();
    totals.stop();
    match net.wait() {
        Ok(why) => log_stopped(&format!("{why:?}"), &totals),
        Err(e) => error!("{e}"),
    }
    Ok(code.clamp(0, 255) as u8)
}
