//! The wire protocol between rnet ([`super::Agent`]) and the agent
//! ([`super::child`]): one SEQPACKET datagram per request and per reply.
//! A request is a tag byte and big-endian IPv4 endpoints; a reply uses the
//! helper report format of `report.rs` (ok + payload, or errno + context),
//! the payload of a listing being [`encode_listing`]'s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use super::super::report::MAX_REPORT;
use crate::ports::Proto;

/// Largest request datagram.
pub(super) const MAX_REQUEST: usize = 32;
/// Listing entries per reply datagram (each at most 20 bytes).
pub(super) const LIST_CHUNK: usize = 1024;
/// Receive buffer for replies: a full listing chunk or an error report.
pub(super) const MAX_REPLY: usize = 2 + LIST_CHUNK * 20 + MAX_REPORT;

pub(super) const REQ_ROUTE: u8 = b'R';
pub(super) const REQ_UNROUTE: u8 = b'U';
pub(super) const REQ_TRANSPARENT: u8 = b'T';
pub(super) const REQ_PLAIN: u8 = b'P';
pub(super) const REQ_LISTENING: u8 = b'L';
pub(super) const REQ_RELEASE: u8 = b'X';

/// A request to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Request {
    Route(SocketAddrV4),
    Unroute(SocketAddrV4),
    Transparent {
        client: SocketAddrV4,
        guest: SocketAddrV4,
    },
    Plain(SocketAddrV4),
    Listening,
    /// The transparent connection from this client ended: drop its rule.
    Release(SocketAddrV4),
}

fn put_v4(out: &mut Vec<u8>, a: SocketAddrV4) {
    out.extend_from_slice(&a.ip().octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_v4(b: &[u8]) -> Option<SocketAddrV4> {
    let b: &[u8; 6] = b.try_into().ok()?;
    Some(SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    ))
}

impl Request {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13);
        match *self {
            Request::Route(g) => {
                out.push(REQ_ROUTE);
                put_v4(&mut out, g);
            }
            Request::Unroute(g) => {
                out.push(REQ_UNROUTE);
                put_v4(&mut out, g);
            }
            Request::Transparent { client, guest } => {
                out.push(REQ_TRANSPARENT);
                put_v4(&mut out, client);
                put_v4(&mut out, guest);
            }
            Request::Plain(g) => {
                out.push(REQ_PLAIN);
                put_v4(&mut out, g);
            }
            Request::Listening => out.push(REQ_LISTENING),
            Request::Release(c) => {
                out.push(REQ_RELEASE);
                put_v4(&mut out, c);
            }
        }
        out
    }

    pub(super) fn decode(b: &[u8]) -> Option<Request> {
        let (&tag, rest) = b.split_first()?;
        Some(match (tag, rest.len()) {
            (REQ_ROUTE, 6) => Request::Route(get_v4(rest)?),
            (REQ_UNROUTE, 6) => Request::Unroute(get_v4(rest)?),
            (REQ_TRANSPARENT, 12) => Request::Transparent {
                client: get_v4(&rest[..6])?,
                guest: get_v4(&rest[6..])?,
            },
            (REQ_PLAIN, 6) => Request::Plain(get_v4(rest)?),
            (REQ_LISTENING, 0) => Request::Listening,
            (REQ_RELEASE, 6) => Request::Release(get_v4(rest)?),
            _ => return None,
        })
    }
}

/// Appends the listing entries: protocol (`t`/`u`), family (4/6), address,
/// port (big-endian).
pub(super) fn encode_listing(list: &[(Proto, SocketAddr)], out: &mut Vec<u8>) {
    for (proto, addr) in list {
        out.push(match proto {
            Proto::Tcp => b't',
            Proto::Udp => b'u',
        });
        match addr.ip() {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.extend_from_slice(&addr.port().to_be_bytes());
    }
}

/// Decodes what [`encode_listing`] wrote; `None` if malformed.
pub(super) fn decode_listing(mut b: &[u8]) -> Option<Vec<(Proto, SocketAddr)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let proto = match b[0] {
            b't' => Proto::Tcp,
            b'u' => Proto::Udp,
            _ => return None,
        };
        let (ip, rest) = match *b.get(1)? {
            4 => {
                let a: [u8; 4] = b.get(2..6)?.try_into().ok()?;
                (IpAddr::V4(a.into()), &b[6..])
            }
            6 => {
                let a: [u8; 16] = b.get(2..18)?.try_into().ok()?;
                (IpAddr::V6(a.into()), &b[18..])
            }
            _ => return None,
        };
        let port = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
        out.push((proto, SocketAddr::new(ip, port)));
        b = &rest[2..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 100), 80);
        let b = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 40000);
        for req in [
            Request::Route(a),
            Request::Unroute(a),
            Request::Transparent {
                client: b,
                guest: a,
            },
            Request::Plain(a),
            Request::Listening,
        ] {
            let bytes = req.encode();
            assert!(bytes.len() <= MAX_REQUEST);
            assert_eq!(Request::decode(&bytes), Some(req));
        }
        assert_eq!(Request::decode(&[]), None);
        assert_eq!(Request::decode(b"R12"), None);
        assert_eq!(Request::decode(b"L1"), None);
        assert_eq!(Request::decode(b"X"), None);
    }

    #[test]
    fn listing_round_trip() {
        let list = vec![
            (Proto::Tcp, "10.0.2.100:80".parse().expect("addr")),
            (Proto::Udp, "[::1]:53".parse().expect("addr")),
        ];
        let mut bytes = Vec::new();
        encode_listing(&list, &mut bytes);
        assert_eq!(decode_listing(&bytes), Some(list));
        assert_eq!(decode_listing(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_listing(b"x4"), None);
    }
}
