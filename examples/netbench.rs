//! Small TCP load programs for `benches/compare.sh`: the same compiled client
//! and server for every forwarder, so the figures show the forwarder and not
//! an interpreter. Standard library only.
//!
//! ```text
//! netbench rr-server  [--listen ADDR:PORT]   echo server, a thread per connection
//! netbench rr-client  --connect ADDR:PORT [--count N]
//!                     1-byte ping-pong over one connection; JSON with the
//!                     median, p99, min, max and mean round trip in µs
//! netbench cps-server [--listen ADDR:PORT]   per connection, one at a time:
//!                                            read 1 byte, answer it, close
//! netbench cps-client --connect ADDR:PORT [--seconds S]
//!                     connect, send 1 byte, read 1 byte, wait for the
//!                     server's close, close; JSON with connections per second
//! netbench rr-load    --connect ADDR:PORT [--connections N] [--seconds S]
//!                     N connections at once (a thread each), 1-byte
//!                     ping-pong on each for S seconds against rr-server;
//!                     JSON with the aggregate round trips per second
//! netbench udp-sink   [--listen ADDR:PORT] [--seconds S]
//!                     counts datagrams until the sender's end marker (or
//!                     S + 10 s, or 2 s of silence after data); JSON with
//!                     the delivered rate, datagrams and loss
//! netbench udp-send   --connect ADDR:PORT [--size B] [--seconds S]
//!                     datagrams of B bytes as fast as the socket takes
//!                     them for S seconds, then end markers; JSON with the
//!                     sent rate
//! ```
//!
//! UDP datagrams carry a 16-byte header: a magic word, then a sequence
//! number (data) or the number of datagrams sent (end marker). The sink's
//! rate is payload bytes delivered over the time from the first to the last
//! data datagram, so it is the delivered rate, not the offered one; its loss
//! is 1 - delivered / sent, with the sent count from the end marker.
//!
//! Servers listen on 127.0.0.1 with a free port unless `--listen` says
//! otherwise, and print `{"listening": "ADDR:PORT"}` once they accept.
//! The short-connection client lets the server close first, so the
//! TIME_WAIT state stays with the server and a long run does not run out of
//! the client's ephemeral ports.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: netbench rr-server [--listen ADDR:PORT]
       netbench rr-client --connect ADDR:PORT [--count N]
       netbench cps-server [--listen ADDR:PORT]
       netbench cps-client --connect ADDR:PORT [--seconds S]
       netbench rr-load --connect ADDR:PORT [--connections N] [--seconds S]
       netbench udp-sink [--listen ADDR:PORT] [--seconds S]
       netbench udp-send --connect ADDR:PORT [--size B] [--seconds S]";

struct Opts {
    listen: SocketAddr,
    connect: Option<SocketAddr>,
    count: u64,
    seconds: f64,
    connections: usize,
    size: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        connect: None,
        count: 10_000,
        seconds: 5.0,
        connections: 64,
        size: 1400,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => o.listen = addr(value)?,
            "--connect" => o.connect = Some(addr(value)?),
            "--count" => o.count = value.parse().map_err(|e| format!("--count {value}: {e}"))?,
            "--connections" => {
                o.connections = value
                    .parse()
                    .map_err(|e| format!("--connections {value}: {e}"))?
            }
            "--size" => o.size = value.parse().map_err(|e| format!("--size {value}: {e}"))?,
            "--seconds" => {
                o.seconds = value
                    .parse()
                    .map_err(|e| format!("--seconds {value}: {e}"))?
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(o)
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s}: no address"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opts = match parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("netbench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let need_connect = || {
        opts.connect
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "--connect is required"))
    };
    let result = match mode.as_str() {
        "rr-server" => serve(opts.listen, echo, true),
        "cps-server" => serve(opts.listen, answer_once, false),
        "rr-client" => need_connect().and_then(|a| rr_client(a, opts.count)),
        "cps-client" => need_connect().and_then(|a| cps_client(a, opts.seconds)),
        "rr-load" => need_connect().and_then(|a| rr_load(a, opts.connections, opts.seconds)),
        "udp-sink" => udp_sink(opts.listen, opts.seconds),
        "udp-send" => need_connect().and_then(|a| udp_send(a, opts.size, opts.seconds)),
        _ => {
            eprintln!("netbench: unknown mode {mode}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbench {mode}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Accepts forever. With `threaded`, each connection is handled on a thread
/// of its own; otherwise inline, one at a time (short connections: no thread
/// start-up per connection, and the clients are sequential anyway).
fn serve(listen: SocketAddr, handler: fn(TcpStream), threaded: bool) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("{{\"listening\": \"{}\"}}", listener.local_addr()?);
    io::stdout().flush()?;
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                if threaded {
                    thread::spawn(move || handler(s));
                } else {
                    // A silent client must not stall the server for long.
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    handler(s);
                }
            }
            // A client that gave up before accept, or a transient limit:
            // keep serving.
            Err(e) => {
                eprintln!("netbench: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(())
}

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn answer_once(mut s: TcpStream) {
    let mut b = [0u8; 1];
    if let Ok(1) = s.read(&mut b) {
        let _ = s.write_all(&b);
    }
    // Dropping the stream closes it: the server closes first.
}

fn rr_client(to: SocketAddr, count: u64) -> io::Result<()> {
    if count == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--count must be at least 1",
        ));
    }
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut b = [b'x'];
    let mut round_trip = |s: &mut TcpStream| -> io::Result<()> {
        s.write_all(&b)?;
        s.read_exact(&mut b)
    };
    for _ in 0..(count / 10).min(1000) {
        round_trip(&mut s)?;
    }
    let mut samples = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t0 = Instant::now();
        round_trip(&mut s)?;
        samples.push(t0.elapsed().as_nanos() as f64 / 1000.0);
    }
    drop(s);
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    let p99 = samples[((n as f64 * 0.99) as usize).min(n - 1)];
    let mean = samples.iter().sum::<f64>() / n as f64;
    println!(
        "{{\"count\": {n}, \"median_us\": {median:.3}, \"p99_us\": {p99:.3}, \"min_us\": {:.3}, \"max_us\": {:.3}, \"mean_us\": {mean:.3}}}",
        samples[0],
        samples[n - 1]
    );
    Ok(())
}

/// One short connection; Ok(false) when the server did not answer the byte.
fn one_connection(to: SocketAddr) -> io::Result<bool> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"c")?;
    let mut b = [0u8; 1];
    if s.read(&mut b)? != 1 || b[0] != b'c' {
        return Ok(false);
    }
    // Wait for the server's close (end of stream) before closing.
    Ok(s.read(&mut b)? == 0)
}

fn cps_client(to: SocketAddr, seconds: f64) -> io::Result<()> {
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--seconds must be positive",
        ));
    }
    let run = Duration::from_secs_f64(seconds);
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut first_error = None;
    let t0 = Instant::now();
    while t0.elapsed() < run {
        match one_connection(to) {
            Ok(true) => ok += 1,
            Ok(false) => errors += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let first_error = first_error
        .map(|e| format!(", \"first_error\": \"{}\"", e.replace(['"', '\\'], "'")))
        .unwrap_or_default();
    println!(
        "{{\"connections\": {ok}, \"errors\": {errors}, \"seconds\": {elapsed:.3}, \"per_sec\": {:.1}{first_error}}}",
        ok as f64 / elapsed
    );
    Ok(())
}

fn positive_seconds(seconds: f64) -> io::Result<Duration> {
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--seconds must be positive",
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `connections` clients at once, each a 1-byte ping-pong loop on its own
/// connection until the time is up; the aggregate round trips per second.
fn rr_load(to: SocketAddr, connections: usize, seconds: f64) -> io::Result<()> {
    let run = positive_seconds(seconds)?;
    if connections == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--connections must be at least 1",
        ));
    }
    // Every connection first, so the timed part has them all open.
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        streams.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Arc::new(std::sync::Barrier::new(connections + 1));
    let threads: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let (stop, total, errors, start) =
                (stop.clone(), total.clone(), errors.clone(), start.clone());
            thread::spawn(move || {
                let mut b = [b'r'];
                let mut n = 0u64;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&b).and_then(|_| s.read_exact(&mut b)).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let n = total.load(Ordering::Relaxed);
    println!(
        "{{\"connections\": {connections}, \"round_trips\": {n}, \"errors\": {}, \"seconds\": {elapsed:.3}, \"per_sec\": {:.1}}}",
        errors.load(Ordering::Relaxed),
        n as f64 / elapsed
    );
    Ok(())
}

const UDP_MAGIC_DATA: u64 = 0x6e62_7564_7064_6174; // "nbudpdat"
const UDP_MAGIC_END: u64 = 0x6e62_7564_7065_6e64; // "nbudpend"
const UDP_HEADER: usize = 16;

fn header(buf: &[u8]) -> Option<(u64, u64)> {
    let magic = u64::from_be_bytes(buf.get(..8)?.try_into().ok()?);
    let value = u64::from_be_bytes(buf.get(8..16)?.try_into().ok()?);
    Some((magic, value))
}

/// Counts datagrams until the end marker; prints what was delivered.
fn udp_sink(listen: SocketAddr, seconds: f64) -> io::Result<()> {
    let run = positive_seconds(seconds)?;
    let sock = UdpSocket::bind(listen)?;
    println!("{{\"listening\": \"{}\"}}", sock.local_addr()?);
    io::stdout().flush()?;
    let mut buf = vec![0u8; 65536];
    let (mut datagrams, mut bytes, mut out_of_order, mut highest) = (0u64, 0u64, 0u64, None);
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    let mut sent = None;
    // Before the first datagram: the sender's whole run plus start-up.
    let give_up = Instant::now() + run + Duration::from_secs(10);
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => match header(&buf[..n]) {
                Some((UDP_MAGIC_DATA, seq)) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = Some(now);
                    datagrams += 1;
                    bytes += n as u64;
                    if highest.is_some_and(|h| seq <= h) {
                        out_of_order += 1;
                    } else {
                        highest = Some(seq);
                    }
                }
                Some((UDP_MAGIC_END, count)) => {
                    sent = Some(count);
                    break;
                }
                _ => {}
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        let silent = last.is_some_and(|l| now - l > Duration::from_secs(2));
        if silent || now > give_up {
            break;
        }
    }
    let span = match (first, last) {
        (Some(f), Some(l)) if l > f => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    let gbps = if span > 0.0 {
        bytes as f64 * 8.0 / span / 1e9
    } else {
        0.0
    };
    let (sent_s, loss) = match sent {
        Some(s) if s > 0 => (
            s.to_string(),
            format!("{:.6}", 1.0 - datagrams.min(s) as f64 / s as f64),
        ),
        _ => ("null".into(), "null".into()),
    };
    println!(
        "{{\"datagrams\": {datagrams}, \"bytes\": {bytes}, \"seconds\": {span:.3}, \"gbps\": {gbps:.4}, \"pps\": {:.0}, \"sent\": {sent_s}, \"loss\": {loss}, \"out_of_order\": {out_of_order}}}",
        if span > 0.0 {
            datagrams as f64 / span
        } else {
            0.0
        }
    );
    Ok(())
}

/// Sends datagrams of `size` bytes for `seconds`, then end markers.
fn udp_send(to: SocketAddr, size: usize, seconds: f64) -> io::Result<()> {
    let run = positive_seconds(seconds)?;
    if !(UDP_HEADER..=65507).contains(&size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--size must be {UDP_HEADER}..=65507"),
        ));
    }
    let local: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(local)?;
    sock.connect(to)?;
    let mut buf = vec![0x5au8; size];
    buf[..8].copy_from_slice(&UDP_MAGIC_DATA.to_be_bytes());
    let (mut seq, mut errors) = (0u64, 0u64);
    let t0 = Instant::now();
    // The clock is read once per 64 datagrams.
    'run: loop {
        for _ in 0..64 {
            buf[8..16].copy_from_slice(&seq.to_be_bytes());
            match sock.send(&buf) {
                Ok(_) => seq += 1,
                // A full queue (ENOBUFS) or an ICMP error from an earlier
                // datagram: not sent, try the next.
                Err(_) => errors += 1,
            }
        }
        if t0.elapsed() >= run {
            break 'run;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // Let the queues drain, then tell the sink how many were sent.
    thread::sleep(Duration::from_millis(100));
    buf[..8].copy_from_slice(&UDP_MAGIC_END.to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
    for _ in 0..5 {
        let _ = sock.send(&buf[..UDP_HEADER]);
        thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{{\"sent\": {seq}, \"errors\": {errors}, \"size\": {size}, \"seconds\": {elapsed:.3}, \"gbps\": {:.4}, \"pps\": {:.0}}}",
        (seq * size as u64) as f64 * 8.0 / elapsed / 1e9,
        seq as f64 / elapsed
    );
    Ok(())
}
