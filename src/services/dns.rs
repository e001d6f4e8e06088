//! The DNS forwarder at net + 3.
//!
//! UDP queries are relayed one host socket per query, to the first upstream,
//! then to the next one each time an upstream stays silent for the timeout
//! (slirp4netns only ever asks the first). TCP queries are ordinary TCP
//! flows whose host side connects to an upstream (see the engine), moving
//! on to the next upstream when a connect fails.
//!
//! Upstreams come from `--dns-upstream` or from the `nameserver` lines of
//! /etc/resolv.conf; loopback resolvers (such as systemd-resolved's
//! 127.0.0.53) are reached even when the gateway may not reach host loopback,
//! since the guest never picks the address. Queries are relayed byte for
//! byte, so no DNS parsing happens here.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::net::UdpSocket;

use crate::stack::Stack;
use crate::stack::emit::{self, Header, UDP_PAYLOAD_OFFSET, UDP6_PAYLOAD_OFFSET};
use crate::tap::TapTx;

/// Reads the nameservers of a resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            // Zone suffixes (fe80::1%eth0) are not usable from here.
            let ip: IpAddr = w.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The system's upstreams, from /etc/resolv.conf.
pub fn system_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| parse_resolv_conf(&t))
        .unwrap_or_default()
}

/// One guest query in flight.
pub struct DnsQuery {
    /// Guest endpoint that asked.
    pub guest: SocketAddr,
    /// The host socket the query went out on.
    pub socket: UdpSocket,
    query: Box<[u8]>,
    /// Index of the upstream asked last.
    pub upstream: usize,
}

impl DnsQuery {
    /// Sends `query` to `upstreams[0]`.
    pub fn start(guest: SocketAddr, query: &[u8], upstreams: &[SocketAddr]) -> io::Result<Self> {
        let first = *upstreams
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no DNS upstream"))?;
        let any: SocketAddr = match first {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
            SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
        };
        let socket = UdpSocket::bind(any)?;
        let q = Self {
            guest,
            socket,
            query: query.into(),
            upstream: 0,
        };
        q.socket.send_to(&q.query, first)?;
        Ok(q)
    }

    /// Asks the next upstream after a timeout; false when none is left.
    pub fn retry(&mut self, upstreams: &[SocketAddr]) -> bool {
        loop {
            self.upstream += 1;
            let Some(next) = upstreams.get(self.upstream) else {
                return false;
            };
            // A family mismatch with this socket skips that upstream.
            if self.socket.send_to(&self.query, *next).is_ok() {
                return true;
            }
        }
    }

    /// Relays the answer to the guest from `dns:53` (of the guest's family).
    /// Returns true once an answer went out (the query is then done).
    pub fn to_guest(&mut self, dns: SocketAddr, stack: &mut Stack, mut tx: TapTx<'_>) -> bool {
        let Some(guest_mac) = stack.guest_mac() else {
            return false;
        };
        let h = Header {
            eth_src: stack.mac,
            eth_dst: guest_mac,
            ident: stack.next_ident(),
        };
        let (max, off) = if self.guest.is_ipv6() {
            (stack.mtu.saturating_sub(48), UDP6_PAYLOAD_OFFSET)
        } else {
            (stack.mtu.saturating_sub(28), UDP_PAYLOAD_OFFSET)
        };
        let (socket, guest) = (&self.socket, self.guest);
        let mut answered = false;
        let sent = tx.build(|buf| {
            let end = (off + max).min(buf.len());
            let Some(room) = buf.get_mut(off..end) else {
                return 0;
            };
            match socket.recv_from(room) {
                Ok((n, _)) => {
                    answered = true;
                    match (dns, guest) {
                        (SocketAddr::V4(d), SocketAddr::V4(g)) => emit::udp_frame(buf, &h, d, g, n),
                        (SocketAddr::V6(d), SocketAddr::V6(g)) => {
                            emit::udp6_frame(buf, &h, d, g, n)
                        }
                        _ => 0,
                    }
                }
                Err(_) => 0,
            }
        });
        if sent {
            stack.frames_out += 1;
        }
        answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let t = "# c\nnameserver 127.0.0.53\nsearch x\nnameserver ::1\nnameserver fe80::1%eth0\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(t),
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
