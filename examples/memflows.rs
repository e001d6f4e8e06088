//! Many concurrent TCP flows with checked data, for rnet's memory tests
//! (tests/memory.rs): one thread and one epoll set drive every connection,
//! so a thousand flows cost a thousand sockets and nothing more.
//!
//! ```text
//! memflows serve  [--listen ADDR:PORT]
//!                 echo server; prints {"listening": "ADDR:PORT"}
//! memflows client --connect ADDR:PORT [--flows N] [--bytes B] [--timeout S] [--hold]
//!                 N connections at once, each sending B bytes of a pattern
//!                 particular to the connection and checking that the same B
//!                 bytes come back; prints one JSON line with how many
//!                 completed, failed (wrong data, reset) or stalled (not done
//!                 when the timeout struck). With --hold the connections stay
//!                 open after the line until stdin reaches EOF.
//! ```

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const USAGE: &str = "usage: memflows serve [--listen ADDR:PORT]
       memflows client --connect ADDR:PORT [--flows N] [--bytes B] [--timeout S] [--hold]";

/// Period of the data pattern (a prime, so that no power-of-two shift of
/// the stream matches itself).
const PERIOD: usize = 65_521;
/// Largest read or write.
const IO: usize = 64 << 10;

/// `PERIOD + IO` bytes of a fixed pseudo-random sequence: the bytes at
/// stream offsets `o..o + n` (n ≤ IO) of connection `id` are
/// `table[k..k + n]` with `k = (o + id * 997) % PERIOD`.
fn table() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut t: Vec<u8> = (0..PERIOD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    for i in 0..IO {
        t.push(t[i % PERIOD]);
    }
    t
}

fn start(id: usize, offset: u64) -> usize {
    ((offset % PERIOD as u64) as usize + id * 997) % PERIOD
}

struct Opts {
    listen: SocketAddr,
    connect: Option<SocketAddr>,
    flows: usize,
    bytes: u64,
    timeout: f64,
    hold: bool,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        connect: None,
        flows: 1000,
        bytes: 1 << 20,
        timeout: 120.0,
        hold: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--hold" {
            o.hold = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => o.listen = value.parse().map_err(|e| bad(&e))?,
            "--connect" => o.connect = Some(value.parse().map_err(|e| bad(&e))?),
            "--flows" => o.flows = value.parse().map_err(|e| bad(&e))?,
            "--bytes" => o.bytes = value.parse().map_err(|e| bad(&e))?,
            "--timeout" => o.timeout = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(o)
}

/// Raises the soft limit on open files to the hard limit: a thousand flows
/// need more than the usual 1024.
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a stack struct of the right type.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn main() -> ExitCode {
    raise_nofile();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opts = match parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("memflows: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let r = match mode.as_str() {
        "serve" => serve(&opts),
        "client" => match opts.connect {
            Some(c) => client(c, &opts),
            None => Err(io::Error::other("client needs --connect")),
        },
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memflows: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An echo connection: bytes read wait in `buf[..len]` until written back.
struct Echo {
    s: TcpStream,
    buf: Box<[u8]>,
    len: usize,
    eof: bool,
}

fn serve(o: &Opts) -> io::Result<ExitCode> {
    let mut poll = Poll::new()?;
    let mut l = TcpListener::bind(o.listen)?;
    poll.registry()
        .register(&mut l, Token(0), Interest::READABLE)?;
    println!("{{\"listening\": \"{}\"}}", l.local_addr()?);
    io::stdout().flush()?;
    let mut conns: HashMap<usize, Echo> = HashMap::new();
    let mut next = 1usize;
    let mut events = Events::with_capacity(1024);
    loop {
        poll.poll(&mut events, None)?;
        for ev in events.iter() {
            if ev.token() == Token(0) {
                loop {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let t = Token(next);
                            next += 1;
                            poll.registry().register(
                                &mut s,
                                t,
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            let buf = vec![0u8; IO].into_boxed_slice();
                            conns.insert(
                                t.0,
                                Echo {
                                    s,
                                    buf,
                                    len: 0,
                                    eof: false,
                                },
                            );
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                continue;
            }
            let t = ev.token().0;
            let Some(c) = conns.get_mut(&t) else { continue };
            if echo(c).is_err() || (c.eof && c.len == 0) {
                let mut c = conns.remove(&t).expect("present");
                let _ = poll.registry().deregister(&mut c.s);
            }
        }
    }
}

/// Moves what it can; Err when the connection failed.
fn echo(c: &mut Echo) -> io::Result<()> {
    loop {
        let mut progress = false;
        if c.len > 0 {
            match c.s.write(&c.buf[..c.len]) {
                Ok(n) => {
                    c.buf.copy_within(n..c.len, 0);
                    c.len -= n;
                    progress = n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(e),
            }
        }
        if !c.eof && c.len < c.buf.len() {
            match c.s.read(&mut c.buf[c.len..]) {
                Ok(0) => {
                    c.eof = true;
                    progress = true;
                }
                Ok(n) => {
                    c.len += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(e),
            }
        }
        if !progress {
            return Ok(());
        }
    }
}

#[derive(PartialEq)]
enum State {
    Moving,
    Done,
    Failed,
}

struct Flow {
    s: TcpStream,
    sent: u64,
    got: u64,
    state: State,
}

fn client(to: SocketAddr, o: &Opts) -> io::Result<ExitCode> {
    let t = table();
    let mut poll = Poll::new()?;
    let mut flows = Vec::with_capacity(o.flows);
    for i in 0..o.flows {
        let mut s = TcpStream::connect(to)?;
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        flows.push(Flow {
            s,
            sent: 0,
            got: 0,
            state: State::Moving,
        });
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(o.timeout);
    let mut buf = vec![0u8; IO];
    let mut moving = o.flows;
    let mut first_error: Option<String> = None;
    let mut events = Events::with_capacity(1024);
    while moving > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        poll.poll(&mut events, Some(deadline - now))?;
        for ev in events.iter() {
            let id = ev.token().0;
            let f = &mut flows[id];
            if f.state != State::Moving {
                continue;
            }
            if let Err(e) = step(id, f, o.bytes, &t, &mut buf) {
                f.state = State::Failed;
                first_error.get_or_insert_with(|| format!("flow {id}: {e}"));
            } else if f.sent == o.bytes && f.got == o.bytes {
                f.state = State::Done;
            }
            if f.state != State::Moving {
                moving -= 1;
            }
        }
    }
    let done = flows.iter().filter(|f| f.state == State::Done).count();
    let failed = flows.iter().filter(|f| f.state == State::Failed).count();
    let stalled = flows.iter().filter(|f| f.state == State::Moving).count();
    let moved: u64 = flows.iter().map(|f| f.sent + f.got).sum();
    println!(
        "{{\"done\": {done}, \"failed\": {failed}, \"stalled\": {stalled}, \"bytes\": {moved}, \"secs\": {:.3}, \"first_error\": {:?}}}",
        t0.elapsed().as_secs_f64(),
        first_error.unwrap_or_default()
    );
    io::stdout().flush()?;
    if o.hold {
        let mut sink = Vec::new();
        let _ = io::stdin().read_to_end(&mut sink);
    }
    Ok(if done == o.flows {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends and checks what it can on one flow.
fn step(id: usize, f: &mut Flow, total: u64, t: &[u8], buf: &mut [u8]) -> io::Result<()> {
    loop {
        let mut progress = false;
        if f.sent < total {
            let n = (total - f.sent).min(IO as u64) as usize;
            let k = start(id, f.sent);
            match f.s.write(&t[k..k + n]) {
                Ok(w) => {
                    f.sent += w as u64;
                    progress = w > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(e),
            }
        }
        if f.got < total {
            match f.s.read(buf) {
                Ok(0) => return Err(io::Error::other(format!("EOF after {} bytes", f.got))),
                Ok(n) => {
                    if f.got + n as u64 > total {
                        return Err(io::Error::other("more bytes than were sent"));
                    }
                    let k = start(id, f.got);
                    if buf[..n] != t[k..k + n] {
                        return Err(io::Error::other(format!(
                            "wrong data in bytes {}..{}",
                            f.got,
                            f.got + n as u64
                        )));
                    }
                    f.got += n as u64;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(e),
            }
        }
        if !progress || (f.sent == total && f.got == total) {
            return Ok(());
        }
    }
}
