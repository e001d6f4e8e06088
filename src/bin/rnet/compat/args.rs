//! slirp4netns's command line, parsed the way GNU `getopt_long` does it.
//!
//! Options and positionals may be mixed (permutation); `--opt=value` and
//! `--opt value` both work, as do unambiguous prefixes of long options
//! (`--conf`), clustered short options (`-c6`), attached short values
//! (`-r3`) and `--` to end the options. Values are checked as slirp4netns
//! checks them, in the same order and with the same messages, so that tools
//! parsing its stderr keep working.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub use rnet::config::{parse_cidr, parse_mac};

/// `sizeof(struct sockaddr_un.sun_path)`: API socket paths must be shorter.
pub const SUN_PATH_MAX: usize = 108;

/// The first positional's meaning (`--netns-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsType {
    /// A PID whose namespaces are served (the default).
    Pid,
    /// A network namespace file.
    Path,
    /// An already-open TAP descriptor inherited from the caller.
    TapFd,
}

/// Everything the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub configure: bool,
    pub exit_fd: Option<i32>,
    pub ready_fd: Option<i32>,
    pub mtu: u32,
    pub enable_ipv6: bool,
    pub api_socket: Option<PathBuf>,
    pub cidr: Option<String>,
    pub disable_host_loopback: bool,
    pub netns_type: NetnsType,
    pub userns_path: Option<PathBuf>,
    pub enable_sandbox: bool,
    pub enable_seccomp: bool,
    pub outbound_addr: Option<String>,
    pub outbound_addr6: Option<String>,
    pub disable_dns: bool,
    pub macaddress: Option<[u8; 6]>,
    /// The first positional: PID, namespace path or descriptor number.
    pub target: String,
    /// The TAP name (optional only with `--netns-type=tapfd`).
    pub tapname: Option<String>,
    /// Deprecated spellings used, to warn about.
    pub deprecated: Vec<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            configure: false,
            exit_fd: None,
            ready_fd: None,
            mtu: 1500,
            enable_ipv6: false,
            api_socket: None,
            cidr: None,
            disable_host_loopback: false,
            netns_type: NetnsType::Pid,
            userns_path: None,
            enable_sandbox: false,
            enable_seccomp: false,
            outbound_addr: None,
            outbound_addr6: None,
            disable_dns: false,
            macaddress: None,
            target: String::new(),
            tapname: None,
            deprecated: Vec::new(),
        }
    }
}

/// What a compatibility mode's command line asks for (`O`: that mode's
/// options; slirp4netns's by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<O = Options> {
    /// `-h`/`--help`: print the usage, exit 0.
    Help,
    /// `-v`/`--version`: print the version, exit 0.
    Version,
    /// Serve a namespace.
    Run(Box<O>),
}

/// A command-line error: the message for stderr, and whether the usage text
/// follows it (as slirp4netns prints it after most parse errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError {
    pub message: String,
    pub usage: bool,
}

impl ArgError {
    /// An error after which the usage text follows.
    pub fn usage(message: impl Into<String>) -> ArgError {
        ArgError {
            message: message.into(),
            usage: true,
        }
    }

    /// An error printed alone.
    pub fn plain(message: impl Into<String>) -> ArgError {
        ArgError {
            message: message.into(),
            usage: false,
        }
    }
}

/// Option identities; short letters and long names both map to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    Configure,
    ExitFd,
    ReadyFd,
    Mtu,
    Cidr,
    DisableHostLoopback,
    NoHostLoopback,
    NetnsType,
    UsernsPath,
    ApiSocket,
    EnableIpv6,
    EnableSandbox,
    CreateSandbox,
    EnableSeccomp,
    Help,
    Version,
    OutboundAddr,
    OutboundAddr6,
    DisableDns,
    MacAddress,
}

/// (long name, takes a value, identity), in slirp4netns's order.
const LONG: &[LongOpt<Opt>] = &[
    ("configure", false, Opt::Configure),
    ("exit-fd", true, Opt::ExitFd),
    ("ready-fd", true, Opt::ReadyFd),
    ("mtu", true, Opt::Mtu),
    ("cidr", true, Opt::Cidr),
    ("disable-host-loopback", false, Opt::DisableHostLoopback),
    ("no-host-loopback", false, Opt::NoHostLoopback),
    ("netns-type", true, Opt::NetnsType),
    ("userns-path", true, Opt::UsernsPath),
    ("api-socket", true, Opt::ApiSocket),
    ("enable-ipv6", false, Opt::EnableIpv6),
    ("enable-sandbox", false, Opt::EnableSandbox),
    ("create-sandbox", false, Opt::CreateSandbox),
    ("enable-seccomp", false, Opt::EnableSeccomp),
    ("help", false, Opt::Help),
    ("version", false, Opt::Version),
    ("outbound-addr", true, Opt::OutboundAddr),
    ("outbound-addr6", true, Opt::OutboundAddr6),
    ("disable-dns", false, Opt::DisableDns),
    ("macaddress", true, Opt::MacAddress),
];

/// The short options (`getopt` string `ce:r:m:a:6hv`).
fn short(c: char) -> Option<(bool, Opt)> {
    Some(match c {
        'c' => (false, Opt::Configure),
        'e' => (true, Opt::ExitFd),
        'r' => (true, Opt::ReadyFd),
        'm' => (true, Opt::Mtu),
        'a' => (true, Opt::ApiSocket),
        '6' => (false, Opt::EnableIpv6),
        'h' => (false, Opt::Help),
        'v' => (false, Opt::Version),
        _ => return None,
    })
}

/// One long option: its name, whether it takes a value, its identity.
pub type LongOpt<O> = (&'static str, bool, O);

/// A GNU `getopt_long` work-alike over one program's option tables; shared
/// by the slirp4netns and pasta command lines.
pub struct Getopt<'a, O> {
    /// The program's name in getopt's messages.
    pub prog: &'a str,
    /// The long options.
    pub long: &'a [LongOpt<O>],
    /// The short options: letter to (takes a value, identity).
    pub short: fn(char) -> Option<(bool, O)>,
    /// Stop at the first positional argument, as an option string that
    /// starts with `+` does: it and everything after are positionals.
    /// Otherwise options and positionals may be mixed (permutation).
    pub stop_at_positional: bool,
}

/// How a [`Getopt::run`] ended.
pub enum GetoptEnd<R> {
    /// Every argument was read; these are the positionals, in order.
    Done(Vec<String>),
    /// An option's handler ended parsing early (`--help`, `--version`).
    Early(R),
}

impl<O: Copy> Getopt<'_, O> {
    /// Finds a long option by exact name or unambiguous prefix, as glibc does.
    fn lookup_long(&self, name: &str) -> Result<LongOpt<O>, ArgError> {
        let prog = self.prog;
        if let Some(&e) = self.long.iter().find(|(n, _, _)| *n == name) {
            return Ok(e);
        }
        let matches: Vec<_> = self
            .long
            .iter()
            .filter(|(n, _, _)| n.starts_with(name))
            .collect();
        match matches.as_slice() {
            [] => Err(ArgError::usage(format!(
                "{prog}: unrecognized option '--{name}'"
            ))),
            [one] => Ok(**one),
            many => {
                let all: Vec<String> = many.iter().map(|(n, _, _)| format!("'--{n}'")).collect();
                Err(ArgError::usage(format!(
                    "{prog}: option '--{name}' is ambiguous; possibilities: {}",
                    all.join(" ")
                )))
            }
        }
    }

    /// Reads `args` (after the program name), calling `apply` for each
    /// option with its value; `apply` returning `Some` ends parsing.
    pub fn run<R>(
        &self,
        args: &[OsString],
        mut apply: impl FnMut(O, Option<String>) -> Result<Option<R>, ArgError>,
    ) -> Result<GetoptEnd<R>, ArgError> {
        let prog = self.prog;
        let mut positionals: Vec<String> = Vec::new();
        let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
        while let Some(arg) = args.next() {
            if arg == "--" {
                positionals.extend(args.by_ref());
                break;
            }
            if let Some(body) = arg.strip_prefix("--") {
                let (name, inline) = match body.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (body, None),
                };
                let (full, takes, opt) = self.lookup_long(name)?;
                let value = match (takes, inline) {
                    (false, Some(_)) => {
                        return Err(ArgError::usage(format!(
                            "{prog}: option '--{full}' doesn't allow an argument"
                        )));
                    }
                    (false, None) => None,
                    (true, Some(v)) => Some(v),
                    (true, None) => Some(args.next().ok_or_else(|| {
                        ArgError::usage(format!("{prog}: option '--{full}' requires an argument"))
                    })?),
                };
                if let Some(p) = apply(opt, value)? {
                    return Ok(GetoptEnd::Early(p));
                }
            } else if arg.len() > 1 && arg.starts_with('-') {
                let cluster: Vec<char> = arg[1..].chars().collect();
                let mut i = 0;
                while i < cluster.len() {
                    let c = cluster[i];
                    let (takes, opt) = (self.short)(c).ok_or_else(|| {
                        ArgError::usage(format!("{prog}: invalid option -- '{c}'"))
                    })?;
                    i += 1;
                    let value = if takes {
                        let rest: String = cluster[i..].iter().collect();
                        i = cluster.len();
                        if rest.is_empty() {
                            Some(args.next().ok_or_else(|| {
                                ArgError::usage(format!(
                                    "{prog}: option requires an argument -- '{c}'"
                                ))
                            })?)
                        } else {
                            Some(rest)
                        }
                    } else {
                        None
                    };
                    if let Some(p) = apply(opt, value)? {
                        return Ok(GetoptEnd::Early(p));
                    }
                }
            } else {
                positionals.push(arg);
                if self.stop_at_positional {
                    positionals.extend(args.by_ref());
                    break;
                }
            }
        }
        Ok(GetoptEnd::Done(positionals))
    }
}

/// `strtol(s, &end, 10)` with `*end == '\0'` and no overflow: leading
/// whitespace and a sign are allowed, nothing after the digits.
pub fn c_long(s: &str) -> Option<i64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    if t.is_empty() {
        return None;
    }
    t.parse::<i64>().ok()
}

fn non_negative_fd(v: &str, what: &str) -> Result<i32, ArgError> {
    c_long(v)
        .filter(|n| (0..=i64::from(i32::MAX)).contains(n))
        .map(|n| n as i32)
        .ok_or_else(|| ArgError::usage(format!("{what} must be a non-negative integer")))
}

/// Parses the arguments after the program name. `prog` names the program in
/// getopt's messages.
pub fn parse(prog: &str, args: &[OsString]) -> Result<Parsed, ArgError> {
    let mut o = Options::default();
    let mut netns_type: Option<String> = None;

    // Applies one option; returns Some for -h/-v, which end parsing at once.
    let apply = |opt: Opt, value: Option<String>| -> Result<Option<Parsed>, ArgError> {
        let v = value.unwrap_or_default();
        match opt {
            Opt::Configure => o.configure = true,
            Opt::ExitFd => o.exit_fd = Some(non_negative_fd(&v, "exit-fd")?),
            Opt::ReadyFd => o.ready_fd = Some(non_negative_fd(&v, "ready-fd")?),
            Opt::Mtu => {
                o.mtu = c_long(&v)
                    .filter(|m| (1..=65521).contains(m))
                    .ok_or_else(|| ArgError::usage("MTU must be a positive integer (< 65522)"))?
                    as u32;
            }
            Opt::Cidr => o.cidr = Some(v),
            Opt::NoHostLoopback => {
                o.deprecated
                    .push("--no-host-loopback is deprecated, use --disable-host-loopback");
                o.disable_host_loopback = true;
            }
            Opt::DisableHostLoopback => o.disable_host_loopback = true,
            Opt::NetnsType => netns_type = Some(v),
            Opt::UsernsPath => {
                if !Path::new(&v).exists() {
                    return Err(ArgError::usage(format!("userns path doesn't exist: {v}")));
                }
                o.userns_path = Some(v.into());
            }
            Opt::ApiSocket => o.api_socket = Some(v.into()),
            Opt::EnableIpv6 => o.enable_ipv6 = true,
            Opt::CreateSandbox => {
                o.deprecated
                    .push("--create-sandbox is deprecated, use --enable-sandbox");
                o.enable_sandbox = true;
            }
            Opt::EnableSandbox => o.enable_sandbox = true,
            Opt::EnableSeccomp => o.enable_seccomp = true,
            Opt::Help => return Ok(Some(Parsed::Help)),
            Opt::Version => return Ok(Some(Parsed::Version)),
            Opt::OutboundAddr => o.outbound_addr = Some(v),
            Opt::OutboundAddr6 => o.outbound_addr6 = Some(v),
            Opt::DisableDns => o.disable_dns = true,
            Opt::MacAddress => {
                o.macaddress = Some(parse_mac(&v).ok_or_else(|| {
                    ArgError::plain(format!(
                        "\"{v}\" is an invalid MAC address.\nmacaddress has to be a valid MAC address (hex string, 6 bytes, each byte separated by a ':')."
                    ))
                })?);
            }
        }
        Ok(None)
    };

    let getopt = Getopt {
        prog,
        long: LONG,
        short,
        stop_at_positional: false,
    };
    let positionals = match getopt.run(args, apply)? {
        GetoptEnd::Done(p) => p,
        GetoptEnd::Early(p) => return Ok(p),
    };
    if o.macaddress.is_some() && !o.configure {
        return Err(ArgError::usage(
            "--macaddr cannot be specified when --configure or -c is not specified",
        ));
    }
    o.netns_type = netns_type_of(netns_type.as_deref())?;
    take_positionals(&mut o, positionals)?;
    if let Some(p) = &o.api_socket
        && p.as_os_str().len() >= SUN_PATH_MAX
    {
        return Err(ArgError::plain(format!(
            "the specified API socket path is too long (>= {SUN_PATH_MAX})"
        )));
    }
    Ok(Parsed::Run(Box::new(o)))
}

/// `--netns-type`'s value (default `pid`).
fn netns_type_of(netns_type: Option<&str>) -> Result<NetnsType, ArgError> {
    Ok(match netns_type {
        None | Some("pid") => NetnsType::Pid,
        Some("path") => NetnsType::Path,
        Some("tapfd") => NetnsType::TapFd,
        Some(other) => {
            return Err(ArgError::usage(format!(
                "unknown --netns-type {other:?}: expected pid, path or tapfd"
            )));
        }
    })
}

/// The positional arguments (the target and the TAP name, or a TAP's
/// descriptor alone), checked for the namespace type.
fn take_positionals(o: &mut Options, positionals: Vec<String>) -> Result<(), ArgError> {
    let needed = if o.netns_type == NetnsType::TapFd {
        1
    } else {
        2
    };
    if positionals.len() < needed {
        return Err(ArgError::usage(match o.netns_type {
            NetnsType::Pid => "missing PID and TAPNAME arguments",
            NetnsType::Path => "missing PATH and TAPNAME arguments",
            NetnsType::TapFd => "missing FD argument",
        }));
    }
    if positionals.len() > 2 {
        return Err(ArgError::usage(format!(
            "too many arguments: {:?}",
            &positionals[2..]
        )));
    }
    let mut pos = positionals.into_iter();
    o.target = pos.next().unwrap_or_default();
    o.tapname = pos.next();
    match o.netns_type {
        NetnsType::Pid => {
            if !c_long(&o.target).is_some_and(|p| (1..=i64::from(i32::MAX)).contains(&p)) {
                return Err(ArgError::usage("PID must be a positive integer"));
            }
        }
        NetnsType::Path => {
            if !Path::new(&o.target).exists() {
                return Err(ArgError::usage(format!(
                    "existing path expected when --netns-type=path: {}: No such file or directory",
                    o.target
                )));
            }
        }
        NetnsType::TapFd => {
            non_negative_fd(&o.target, "FD")?;
        }
    }
    Ok(())
}

/// A mode's parser, as the tests of both modes drive it.
#[cfg(test)]
pub type ParseFn<O> = fn(&str, &[OsString]) -> Result<Parsed<O>, ArgError>;

/// Runs `parse` on `args` given as text.
#[cfg(test)]
pub fn parse_strs<O>(parse: ParseFn<O>, prog: &str, args: &[&str]) -> Result<Parsed<O>, ArgError> {
    let v: Vec<OsString> = args.iter().map(OsString::from).collect();
    parse(prog, &v)
}

/// The options `args` parse to; panics (failing the test) otherwise.
#[cfg(test)]
pub fn expect_run<O: std::fmt::Debug>(parse: ParseFn<O>, prog: &str, args: &[&str]) -> O {
    match parse_strs(parse, prog, args) {
        Ok(Parsed::Run(o)) => *o,
        other => panic!("{args:?}: {other:?}"),
    }
}

/// The message `args` are refused with; panics (failing the test) otherwise.
#[cfg(test)]
pub fn expect_err<O: std::fmt::Debug>(parse: ParseFn<O>, prog: &str, args: &[&str]) -> String {
    match parse_strs(parse, prog, args) {
        Err(e) => e.message,
        other => panic!("{args:?} should fail: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, ArgError> {
        parse_strs(parse, "slirp4netns", args)
    }

    fn run(args: &[&str]) -> Options {
        expect_run(parse, "slirp4netns", args)
    }

    fn err(args: &[&str]) -> String {
        expect_err(parse, "slirp4netns", args)
    }

    #[test]
    fn defaults() {
        let o = run(&["42", "tap0"]);
        assert_eq!(o.target, "42");
        assert_eq!(o.tapname.as_deref(), Some("tap0"));
        assert_eq!(o.mtu, 1500);
        assert!(!o.configure && !o.disable_host_loopback && !o.enable_ipv6);
        assert_eq!(o.netns_type, NetnsType::Pid);
        assert_eq!((o.ready_fd, o.exit_fd), (None, None));
    }

    #[test]
    fn permutation_and_value_forms() {
        let forms: &[&[&str]] = &[
            &["-c", "-r", "3", "-e", "4", "--mtu=65520", "42", "tap0"],
            &["42", "-c", "tap0", "--mtu", "65520", "-r3", "-e4"],
            &["42", "tap0", "-ce", "4", "--ready-fd=3", "-m65520"],
            &[
                "--conf",
                "--ready=3",
                "42",
                "--exit-fd",
                "4",
                "tap0",
                "-m",
                "65520",
            ],
            &["-cr", "3", "-e", "4", "-m", "65520", "--", "42", "tap0"],
        ];
        for f in forms {
            let o = run(f);
            assert!(o.configure, "{f:?}");
            assert_eq!(o.ready_fd, Some(3), "{f:?}");
            assert_eq!(o.exit_fd, Some(4), "{f:?}");
            assert_eq!(o.mtu, 65520, "{f:?}");
            assert_eq!(o.target, "42", "{f:?}");
            assert_eq!(o.tapname.as_deref(), Some("tap0"), "{f:?}");
        }
    }

    #[test]
    fn double_dash_ends_options() {
        let o = run(&["--", "42", "-c"]);
        assert_eq!(o.tapname.as_deref(), Some("-c"));
        assert!(!o.configure);
        // A value may start with '-' when it follows its option.
        let o = run(&["-a", "-sock", "42", "tap0"]);
        assert_eq!(o.api_socket, Some(PathBuf::from("-sock")));
    }

    #[test]
    fn podman_argv() {
        let o = run(&[
            "--disable-host-loopback",
            "--mtu=65520",
            "--enable-sandbox",
            "--enable-seccomp",
            "-c",
            "-r",
            "3",
            "-e",
            "4",
            "--netns-type=path",
            "/",
            "tap0",
        ]);
        assert!(o.disable_host_loopback && o.enable_sandbox && o.enable_seccomp && o.configure);
        assert_eq!(o.netns_type, NetnsType::Path);
        assert_eq!(o.target, "/");
    }

    #[test]
    fn rootlesskit_argv() {
        let o = run(&[
            "--mtu",
            "65520",
            "-r",
            "3",
            "--disable-host-loopback",
            "--api-socket",
            "/tmp/x/.s4nn.sock",
            "--enable-ipv6",
            "--userns-path=/proc/self/ns/user",
            "--netns-type=path",
            "/proc/self/ns/net",
            "tap0",
        ]);
        assert!(!o.configure && o.enable_ipv6);
        assert_eq!(o.userns_path, Some(PathBuf::from("/proc/self/ns/user")));
        assert_eq!(o.api_socket, Some(PathBuf::from("/tmp/x/.s4nn.sock")));
    }

    #[test]
    fn every_option() {
        let o = run(&[
            "-6",
            "--cidr=10.0.135.128/25",
            "--outbound-addr",
            "lo",
            "--outbound-addr6=::1",
            "--disable-dns",
            "-c",
            "--macaddress",
            "02:00:00:00:00:AB",
            "--netns-type",
            "tapfd",
            "5",
        ]);
        assert_eq!(o.cidr.as_deref(), Some("10.0.135.128/25"));
        assert_eq!(o.outbound_addr.as_deref(), Some("lo"));
        assert_eq!(o.outbound_addr6.as_deref(), Some("::1"));
        assert!(o.disable_dns && o.enable_ipv6);
        assert_eq!(o.macaddress, Some([2, 0, 0, 0, 0, 0xab]));
        assert_eq!(o.netns_type, NetnsType::TapFd);
        assert_eq!(o.tapname, None);
        let o = run(&["--no-host-loopback", "--create-sandbox", "1", "t"]);
        assert!(o.disable_host_loopback && o.enable_sandbox);
        assert_eq!(o.deprecated.len(), 2);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(p(&["-h"]), Ok(Parsed::Help));
        assert_eq!(p(&["--help"]), Ok(Parsed::Help));
        assert_eq!(p(&["42", "--he"]), Ok(Parsed::Help));
        assert_eq!(p(&["-v"]), Ok(Parsed::Version));
        assert_eq!(p(&["--version"]), Ok(Parsed::Version));
        assert_eq!(p(&["-cv"]), Ok(Parsed::Version));
        // Parsing is sequential: an earlier bad value wins.
        assert!(p(&["--mtu=0", "-h"]).is_err());
    }

    #[test]
    fn mtu_texts() {
        for bad in ["0", "-1", "65522", "abc", "15x", ""] {
            assert_eq!(
                err(&["--mtu", bad, "1", "t"]),
                "MTU must be a positive integer (< 65522)",
                "{bad}"
            );
        }
        assert_eq!(run(&["-m", "65521", "1", "t"]).mtu, 65521);
        assert_eq!(run(&["-m", "1", "1", "t"]).mtu, 1);
    }

    #[test]
    fn getopt_errors() {
        assert_eq!(
            err(&["--bogus", "1", "t"]),
            "slirp4netns: unrecognized option '--bogus'"
        );
        assert_eq!(err(&["-x", "1", "t"]), "slirp4netns: invalid option -- 'x'");
        assert_eq!(
            err(&["1", "t", "-r"]),
            "slirp4netns: option requires an argument -- 'r'"
        );
        assert_eq!(
            err(&["1", "t", "--mtu"]),
            "slirp4netns: option '--mtu' requires an argument"
        );
        assert_eq!(
            err(&["--configure=yes", "1", "t"]),
            "slirp4netns: option '--configure' doesn't allow an argument"
        );
        assert!(err(&["--e", "1", "t"]).contains("is ambiguous"));
        assert!(err(&["--outbound", "x", "1", "t"]).contains("is ambiguous"));
        assert_eq!(
            err(&["--exit-fd=x", "1", "t"]),
            "exit-fd must be a non-negative integer"
        );
        assert_eq!(
            err(&["-r", "-1", "1", "t"]),
            "ready-fd must be a non-negative integer"
        );
    }

    #[test]
    fn positional_errors() {
        assert!(err(&["42"]).contains("missing"));
        assert!(err(&["-c"]).contains("missing"));
        assert!(err(&["1", "2", "3"]).contains("too many"));
        assert_eq!(err(&["abc", "tap0"]), "PID must be a positive integer");
        assert_eq!(err(&["0", "tap0"]), "PID must be a positive integer");
        assert!(
            err(&["--netns-type=path", "/nonexistent/rnet", "tap0"])
                .starts_with("existing path expected when --netns-type=path")
        );
        assert!(err(&["--netns-type=bogus", "1", "t"]).contains("bogus"));
        assert!(
            err(&["--userns-path=/nonexistent/rnet", "1", "t"]).starts_with("userns path doesn't")
        );
        assert_eq!(
            err(&["--netns-type=tapfd", "x"]),
            "FD must be a non-negative integer"
        );
    }

    #[test]
    fn macaddress_needs_configure() {
        assert_eq!(
            err(&["--macaddress=02:00:00:00:00:01", "1", "t"]),
            "--macaddr cannot be specified when --configure or -c is not specified"
        );
        assert!(err(&["-c", "--macaddress=02:00:00:00:01", "1", "t"]).contains("invalid MAC"));
        assert_eq!(parse_mac("2:0:0:0:0:1"), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(parse_mac("02:00:00:00:00:001"), None);
        assert_eq!(parse_mac("02:00:00:00:00:zz"), None);
    }

    #[test]
    fn api_socket_length() {
        let ok = format!("/{}", "s".repeat(SUN_PATH_MAX - 2));
        assert!(run(&["-a", &ok, "1", "t"]).api_socket.is_some());
        let long = format!("/{}", "s".repeat(SUN_PATH_MAX - 1));
        assert_eq!(
            err(&["-a", &long, "1", "t"]),
            "the specified API socket path is too long (>= 108)"
        );
    }
}
