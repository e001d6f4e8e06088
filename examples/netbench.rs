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
//! ```
//!
//! Servers listen on 127.0.0.1 with a free port unless `--listen` says
//! otherwise, and print `{"listening": "ADDR:PORT"}` once they accept.
//! The short-connection client lets the server close first, so the
//! TIME_WAIT state stays with the server and a long run does not run out of
//! the client's ephemeral ports.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: netbench rr-server [--listen ADDR:PORT]
       netbench rr-client --connect ADDR:PORT [--count N]
       netbench cps-server [--listen ADDR:PORT]
       netbench cps-client --connect ADDR:PORT [--seconds S]";

struct Opts {
    listen: SocketAddr,
    connect: Option<SocketAddr>,
    count: u64,
    seconds: f64,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        connect: None,
        count: 10_000,
        seconds: 5.0,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => o.listen = addr(value)?,
            "--connect" => o.connect = Some(addr(value)?),
            "--count" => o.count = value.parse().map_err(|e| format!("--count {value}: {e}"))?,
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
