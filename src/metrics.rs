//! The Prometheus endpoint (`--metrics-addr`): `GET /metrics` over plain
//! HTTP/1.1, answered from a thread of its own.
//!
//! # Theory of operation
//!
//! The listener is bound before the sandbox closes the door on new
//! addresses ([`MetricsListener::bind`]); [`MetricsListener::serve`] then
//! starts one thread that waits in `poll(2)` on the listener and on a wake
//! pipe that [`MetricsServer::shutdown`] writes to. Connections are served
//! one at a time: each request head must arrive whole within
//! [`REQUEST_DEADLINE`] (a slow client is cut off, not waited for), and the
//! report is asked of the event loop through the same bounded command
//! channel as the control socket, with [`STATUS_DEADLINE`] to answer. So a
//! scraper can at worst delay other scrapers; the data plane only ever
//! spends the time to build one status report per scrape.
//!
//! The body is the exposition of [`StatusReport::render_prometheus`](crate::status::StatusReport::render_prometheus) (the
//! same families as `rnet status --prometheus`) plus `rnet_build_info` and
//! `rnet_restarts_total`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::Handle;

/// How long a client may take to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// How long the event loop may take to produce a report for one scrape.
pub const STATUS_DEADLINE: Duration = Duration::from_secs(2);
/// The longest request head read; scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// A bound metrics listener, not yet served.
pub struct MetricsListener {
    listener: TcpListener,
}

/// The running metrics thread.
pub struct MetricsServer {
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free port).
    pub fn bind(addr: SocketAddr) -> io::Result<MetricsListener> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(MetricsListener { listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts answering scrapes with reports from `handle`.
    pub fn serve(self, handle: Handle) -> io::Result<MetricsServer> {
        let addr = self.listener.local_addr()?;
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let thread = std::thread::Builder::new()
            .name("rnet-metrics".into())
            .spawn(move || serve(self.listener, rd, handle))?;
        tracing::info!("metrics at http://{addr}/metrics");
        Ok(MetricsServer {
            wake: wr,
            thread: Some(thread),
            addr,
        })
    }
}

impl MetricsServer {
    /// The address scrapers connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the thread and closes the listener.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let _ = nix::unistd::write(&self.wake, b"x");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn serve(listener: TcpListener, wake: OwnedFd, handle: Handle) {
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!("metrics endpoint stops: poll: {e}");
                return;
            }
        }
        if fds[1].any().unwrap_or(true) || !handle.is_running() {
            return;
        }
        match listener.accept() {
            Ok((conn, _)) => {
                if let Err(e) = answer(conn, &handle) {
                    tracing::debug!("metrics request: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: the pending connection stays queued,
                // so wait a little instead of spinning on it.
                tracing::debug!("metrics accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request head and writes one response, then closes.
fn answer(mut conn: TcpStream, handle: &Handle) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    let head = read_head(&mut conn, REQUEST_DEADLINE)?;
    let (status, ctype, body) = match parse_request_line(&head) {
        Some(("GET" | "HEAD", "/metrics")) => match handle.status_within(STATUS_DEADLINE) {
            Ok(report) => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                exposition(&report, handle),
            ),
            Err(_) => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                "the network is not running\n".to_string(),
            ),
        },
        Some(("GET" | "HEAD", "/")) => (
            "200 OK",
            "text/plain; charset=utf-8",
            "rnet metrics: GET /metrics\n".to_string(),
        ),
        Some((_, "/metrics" | "/")) => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served\n".to_string(),
        ),
        Some(_) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_string(),
        ),
        None => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "malformed request\n".to_string(),
        ),
    };
    let is_head = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !is_head {
        out.extend_from_slice(body.as_bytes());
    }
    conn.set_write_timeout(Some(REQUEST_DEADLINE))?;
    conn.write_all(&out)
}

/// Reads until the blank line that ends an HTTP request head, within one
/// deadline for the whole head (not per read).
fn read_head(conn: &mut TcpStream, deadline: Duration) -> io::Result<Vec<u8>> {
    let end = Instant::now() + deadline;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not complete in time",
            ));
        }
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed before the request ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
    }
}

/// The method and path of an HTTP/1.x request line (query string dropped).
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

/// The whole exposition: the status families plus build information.
pub fn exposition(report: &crate::status::StatusReport, handle: &Handle) -> String {
    let mut o = report.render_prometheus();
    o.push_str("# HELP rnet_build_info The running rnet's version and commit.\n");
    o.push_str("# TYPE rnet_build_info gauge\n");
    o.push_str(&format!(
        "rnet_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        crate::BUILD_COMMIT
    ));
    o.push_str("# HELP rnet_restarts_total Data-plane restarts since start.\n");
    o.push_str("# TYPE rnet_restarts_total counter\n");
    o.push_str(&format!("rnet_restarts_total {}\n", handle.restarts()));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case = (&'static [u8], Option<(&'static str, &'static str)>);

    #[test]
    fn request_lines() {
        let cases: &[Case] = &[
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                Some(("GET", "/metrics")),
            ),
            (
                b"GET /metrics?x=1 HTTP/1.0\r\n\r\n",
                Some(("GET", "/metrics")),
            ),
            (b"HEAD / HTTP/1.1\r\n\r\n", Some(("HEAD", "/"))),
            (
                b"POST /metrics HTTP/1.1\r\n\r\n",
                Some(("POST", "/metrics")),
            ),
            (b"GET /metrics\r\n\r\n", None),
            (b"GET /metrics SPDY/3\r\n\r\n", None),
            (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", None),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                parse_request_line(head),
                *want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
