//! The DHCPv4 server of the virtual network (RFC 2131), as a sans-IO state
//! machine: the engine hands it one guest datagram sent to port 67 and gets
//! back the reply to put on the wire, with its destination already chosen.
//!
//! # Theory of operation
//!
//! The server owns a small pool of addresses (by default net + 15 up to
//! net + 99, so the static guest address net + 100, the gateway and the DNS
//! host are never handed out) and one slot per pool address. A slot records
//! who holds the address (the client identifier, option 61, or else the
//! client's hardware address), in what state (offered, bound, declined) and
//! until when. An index from client to slot makes every lookup O(1); only
//! picking a fresh address scans the pool, which is capped at
//! [`MAX_POOL`] addresses. The lease table can therefore never hold more
//! entries than the pool has addresses, whatever the guest sends.
//!
//! A client keeps its address across DISCOVERs, renewals and even after its
//! lease expired or it released it, for as long as nobody else needed the
//! address: fresh addresses are handed out first, and only then the one that
//! has been expired the longest. Because rnet is the only server on the
//! link, a REQUEST for a free pool address is granted even if it was never
//! offered (an INIT-REBOOT after rnet restarted keeps working), and any
//! REQUEST that cannot be granted is answered with a NAK at once instead of
//! the silence RFC 2131 asks of servers sharing a wire.
//!
//! # Wire format
//!
//! Messages are read and written through smoltcp's checked DHCP packet view
//! (`smoltcp::wire::DhcpPacket`, the `proto-dhcpv4` feature): smoltcp is
//! already rnet's stack, the view does bounds-checked field access and option
//! iteration, and the feature adds no crate. Its high-level `DhcpRepr` is
//! not used, because it rejects client identifiers that are not Ethernet
//! addresses (systemd-networkd sends RFC 4361 ones) and cannot emit T1/T2.
//! The `dhcproto` crate was considered and rejected: its latest release
//! (0.15) needs Rust 1.87 while rnet declares 1.85 (so Cargo falls back to
//! 0.14), and it brings about 50 crates with it (the hickory DNS library
//! with the IDNA/ICU tables, url, futures, rand, several proc macros) for a
//! protocol whose server side reads four options and writes nine.
//!
//! Replies are written into a caller's buffer (the only allocation is a
//! copy of the client identifier, when there is one). They take at least
//! [`MIN_REPLY_LEN`] bytes, the minimum BOOTP message size some clients
//! insist on, and at most [`REPLY_LEN`], the 576-byte IP datagram every
//! DHCP client must accept (RFC 2131 section 2) less the IP and UDP
//! headers: the announced DNS servers (option 6) and search domains
//! (option 119, RFC 3397) can make a reply longer than the minimum, and
//! [`crate::Config`] refuses lists that would not fit ([`ANNOUNCE_SPACE`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::wire::{
    ArpHardware, DhcpFlags, DhcpMessageType, DhcpOpCode, DhcpPacket, EthernetAddress,
};

/// The UDP port the server listens on.
pub const SERVER_PORT: u16 = 67;
/// The UDP port clients listen on.
pub const CLIENT_PORT: u16 = 68;
/// The shortest reply: the BOOTP minimum of RFC 1542 (shorter replies are
/// padded to it).
pub const MIN_REPLY_LEN: usize = 300;
/// The longest reply, and the buffer [`DhcpServer::handle`] needs: the
/// 576-byte message every client accepts, less 20 bytes of IPv4 and 8 of
/// UDP header.
pub const REPLY_LEN: usize = 548;
/// Fixed part of a message before the options: the BOOTP header and the
/// magic cookie.
const FIXED_LEN: usize = 240;
/// Option bytes every full reply carries besides the announced DNS servers
/// and search domains: message type (3), server identifier (6), lease, T1
/// and T2 (6 each), subnet mask (6), router (6), MTU (4) and the end (1).
const BASE_OPTIONS_LEN: usize = 44;
/// Option bytes left in a [`REPLY_LEN`] reply for the DNS servers (option
/// 6) and search domains (option 119); see [`announce_len`].
pub const ANNOUNCE_SPACE: usize = REPLY_LEN - FIXED_LEN - BASE_OPTIONS_LEN;
/// Most addresses one server hands out (larger pools are cut to this).
pub const MAX_POOL: u32 = 1024;

/// How long an offered address stays reserved for the client it went to.
const OFFER_HOLD: Duration = Duration::from_secs(60);
/// How long an address a client declined (found in use) stays out of the pool.
const DECLINE_HOLD: Duration = Duration::from_secs(600);
/// The DHCP magic cookie (RFC 2131 section 3).
const MAGIC: u32 = 0x6382_5363;
const BROADCAST_MAC: [u8; 6] = [0xff; 6];

// Option codes (RFC 2132).
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_RENEWAL_TIME: u8 = 58;
const OPT_REBINDING_TIME: u8 = 59;
const OPT_CLIENT_ID: u8 = 61;
const OPT_DOMAIN_SEARCH: u8 = 119;

/// What the server hands out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The network address.
    pub network: Ipv4Addr,
    /// Its prefix length (0..=32).
    pub prefix_len: u8,
    /// The server identifier (option 54): the gateway's address, net + 2.
    pub server: Ipv4Addr,
    /// The default router (option 3).
    pub router: Ipv4Addr,
    /// rnet's DNS forwarder, net + 3 (never handed out).
    pub dns: Ipv4Addr,
    /// The DNS servers announced (option 6, left out when empty); by
    /// default the forwarder.
    pub dns_servers: Vec<Ipv4Addr>,
    /// The search domains announced (option 119, left out when empty),
    /// checked domain names without trailing dots
    /// ([`crate::config::validate_domain`]).
    pub search: Vec<String>,
    /// The interface MTU (option 26).
    pub mtu: u16,
    /// Lease duration (option 51); T1 is half of it and T2 seven eighths.
    pub lease: Duration,
    /// First address of the pool.
    pub first: Ipv4Addr,
    /// Number of addresses in the pool, counted from `first`.
    pub pool_size: u32,
}

impl DhcpConfig {
    /// The defaults for `network/prefix_len`: server and router net + 2,
    /// DNS net + 3, a one-day lease, and the pool net + 15 ..= net + 99
    /// (shorter when the network ends earlier; empty for networks too small
    /// to have a net + 15).
    pub fn new(network: Ipv4Addr, prefix_len: u8, mtu: u16) -> Self {
        let prefix_len = prefix_len.min(32);
        let net = u32::from(network) & mask_bits(prefix_len);
        let last_host = (net | !mask_bits(prefix_len)).saturating_sub(1);
        let first = net.saturating_add(15);
        let last = net.saturating_add(99).min(last_host);
        Self {
            network: Ipv4Addr::from(net),
            prefix_len,
            server: Ipv4Addr::from(net.saturating_add(2)),
            router: Ipv4Addr::from(net.saturating_add(2)),
            dns: Ipv4Addr::from(net.saturating_add(3)),
            dns_servers: vec![Ipv4Addr::from(net.saturating_add(3))],
            search: Vec::new(),
            mtu,
            lease: Duration::from_secs(24 * 3600),
            first: Ipv4Addr::from(first),
            pool_size: if last >= first { last - first + 1 } else { 0 },
        }
    }

    fn mask(&self) -> u32 {
        mask_bits(self.prefix_len)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network) & self.mask()
    }
}

/// Option bytes that `dns` IPv4 DNS servers and search domains of
/// `search_wire` bytes (in DNS wire format) take in a reply: option 6, and
/// option 119 split into pieces of at most 255 bytes (RFC 3396), each with
/// its two-byte header.
pub fn announce_len(dns: usize, search_wire: usize) -> usize {
    let dns = if dns == 0 { 0 } else { 2 + 4 * dns };
    dns + search_wire + 2 * search_wire.div_ceil(255)
}

/// Appends one option (kind, length, data) at `*at`; false (nothing
/// written) when the data is longer than 255 bytes or does not fit.
fn put_option(buf: &mut [u8], at: &mut usize, kind: u8, data: &[u8]) -> bool {
    let end = *at + 2 + data.len();
    if data.len() > 255 || end > buf.len() {
        return false;
    }
    buf[*at] = kind;
    buf[*at + 1] = data.len() as u8;
    buf[*at + 2..end].copy_from_slice(data);
    *at = end;
    true
}

/// The netmask of a prefix length (lengths above 32 count as 32).
fn mask_bits(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

/// Why a datagram got no reply; each is worth counting, none is fatal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DhcpError {
    /// Shorter than a BOOTP header, or without the DHCP magic cookie.
    #[error("malformed DHCP message")]
    Malformed,
    /// A BOOTREPLY (another server on the guest side?).
    #[error("not a BOOTREQUEST")]
    NotBootRequest,
    /// Hardware type other than Ethernet, or an address length other than 6.
    #[error("DHCP from non-Ethernet hardware")]
    UnsupportedHardware,
    /// No valid message type option: plain BOOTP, which is not served.
    #[error("no DHCP message type (plain BOOTP)")]
    NotDhcp,
    /// A message type only servers send, or an unknown one.
    #[error("unexpected DHCP message type")]
    UnexpectedMessage,
    /// Came through a relay agent (giaddr set), which a virtual link never has.
    #[error("relayed DHCP message")]
    Relayed,
    /// A REQUEST or DECLINE that names no address.
    #[error("DHCP message names no address")]
    MissingAddress,
    /// A DISCOVER while every pool address is taken.
    #[error("DHCP pool exhausted")]
    PoolExhausted,
    /// The caller's buffer is shorter than [`REPLY_LEN`].
    #[error("DHCP reply buffer too small")]
    BufferTooSmall,
}

/// Which reply was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// DHCPOFFER.
    Offer,
    /// DHCPACK (to a REQUEST or an INFORM).
    Ack,
    /// DHCPNAK.
    Nak,
}

/// A reply written into the caller's buffer, and where to send it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Bytes written at the start of the buffer (the UDP payload).
    pub len: usize,
    /// The UDP source: the server identifier, port 67.
    pub src: SocketAddrV4,
    /// The UDP destination, per RFC 2131 section 4.1: broadcast for a NAK
    /// or when the client set the broadcast flag, else the client's
    /// `ciaddr`, else the address being offered (`yiaddr`); port 68.
    pub dst: SocketAddrV4,
    /// The Ethernet destination: the client's `chaddr`, or broadcast
    /// whenever `dst` is the broadcast address.
    pub dst_mac: [u8; 6],
    /// What was built.
    pub kind: ReplyKind,
    /// The address offered or acknowledged (unspecified for NAK and INFORM).
    pub yiaddr: Ipv4Addr,
}

/// Who a lease belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    /// The client identifier option, when the client sends one.
    Id(Box<[u8]>),
    /// Otherwise the hardware address.
    Mac([u8; 6]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Offered,
    Bound,
    Declined,
}

/// One pool address that is, or was, in use.
#[derive(Debug)]
struct Slot {
    /// The client it belongs to (kept after expiry, to give it back);
    /// `None` for a declined address.
    owner: Option<ClientKey>,
    state: State,
    /// When the offer, lease or decline hold ends.
    until: Instant,
}

/// The fields of one client message the server looks at.
struct Msg {
    kind: DhcpMessageType,
    xid: u32,
    broadcast: bool,
    ciaddr: Ipv4Addr,
    chaddr: [u8; 6],
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    key: ClientKey,
}

impl Msg {
    fn parse(payload: &[u8]) -> Result<Self, DhcpError> {
        let p = DhcpPacket::new_checked(payload).map_err(|_| DhcpError::Malformed)?;
        if p.magic_number() != MAGIC {
            return Err(DhcpError::Malformed);
        }
        if p.opcode() != DhcpOpCode::Request {
            return Err(DhcpError::NotBootRequest);
        }
        if p.hardware_type() != ArpHardware::Ethernet || p.hardware_len() != 6 {
            return Err(DhcpError::UnsupportedHardware);
        }
        if !p.relay_agent_ip().is_unspecified() {
            return Err(DhcpError::Relayed);
        }
        let mut kind = None;
        let mut requested = None;
        let mut server_id = None;
        let mut client_id = None;
        // The first occurrence of an option wins; malformed lengths are
        // ignored, and the iterator stops at a truncated option.
        for opt in p.options() {
            match (opt.kind, opt.data) {
                (OPT_MESSAGE_TYPE, &[t]) => {
                    kind.get_or_insert(DhcpMessageType::from(t));
                }
                (OPT_REQUESTED_IP, &[a, b, c, d]) => {
                    requested.get_or_insert(Ipv4Addr::new(a, b, c, d));
                }
                (OPT_SERVER_ID, &[a, b, c, d]) => {
                    server_id.get_or_insert(Ipv4Addr::new(a, b, c, d));
                }
                (OPT_CLIENT_ID, data) if !data.is_empty() && client_id.is_none() => {
                    client_id = Some(ClientKey::Id(data.into()));
                }
                _ => {}
            }
        }
        let chaddr = p.client_hardware_address().0;
        Ok(Self {
            kind: kind.ok_or(DhcpError::NotDhcp)?,
            xid: p.transaction_id(),
            broadcast: p.flags().contains(DhcpFlags::BROADCAST),
            ciaddr: p.client_ip(),
            chaddr,
            requested,
            server_id,
            key: client_id.unwrap_or(ClientKey::Mac(chaddr)),
        })
    }
}

/// What a reply carries besides the header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Network configuration and lease times (OFFER, ACK of a REQUEST).
    Lease,
    /// Network configuration only (ACK of an INFORM).
    Config,
    /// Nothing but the server identifier (NAK).
    Nak,
}

/// The DHCPv4 server: configuration plus the lease table.
#[derive(Debug)]
pub struct DhcpServer {
    cfg: DhcpConfig,
    /// First pool address, as a number.
    first: u32,
    /// One entry per pool address; `None` never used (or freed).
    slots: Vec<Option<Slot>>,
    /// Client → its slot; every entry's slot names that client as owner.
    by_client: HashMap<ClientKey, usize>,
    lease_secs: u32,
    /// Option 6's data: the announced servers' addresses back to back.
    dns_data: Vec<u8>,
    /// Option 119's data: the search domains in DNS wire format.
    search_data: Vec<u8>,
}

impl DhcpServer {
    /// A server for `cfg`. The pool is cut to [`MAX_POOL`] addresses and to
    /// the end of the network; pool addresses that are the network or
    /// broadcast address, the server, the router or the DNS host are never
    /// handed out.
    pub fn new(cfg: DhcpConfig) -> Self {
        let first = u32::from(cfg.first);
        let broadcast = u32::from(cfg.network) | !cfg.mask();
        let room = broadcast.saturating_sub(first);
        let size = cfg.pool_size.min(MAX_POOL).min(room);
        // 0xffff_ffff means "infinite" on the wire; stay below it.
        let lease_secs = cfg.lease.as_secs().clamp(1, u64::from(u32::MAX - 1)) as u32;
        let dns_data: Vec<u8> = cfg.dns_servers.iter().flat_map(|a| a.octets()).collect();
        let mut search_data = Vec::new();
        crate::config::encode_domains(&cfg.search, &mut search_data);
        Self {
            first,
            slots: (0..size).map(|_| None).collect(),
            by_client: HashMap::new(),
            lease_secs,
            dns_data,
            search_data,
            cfg,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &DhcpConfig {
        &self.cfg
    }

    /// Number of clients the server remembers (bounded by the pool size).
    pub fn lease_count(&self) -> usize {
        self.by_client.len()
    }

    /// The address currently bound (acknowledged, unexpired) to the client
    /// with hardware address `mac` and no client identifier.
    pub fn bound_addr(&self, mac: [u8; 6], now: Instant) -> Option<Ipv4Addr> {
        let &i = self.by_client.get(&ClientKey::Mac(mac))?;
        let s = self.slots.get(i)?.as_ref()?;
        (s.state == State::Bound && s.until > now).then(|| self.addr(i))
    }

    /// Handles one datagram a guest sent to port 67 and writes the reply, if
    /// any, at the start of `out` (which must hold [`REPLY_LEN`] bytes).
    ///
    /// `Ok(None)` means the message was valid and needs no answer (RELEASE,
    /// DECLINE, a REQUEST for another server, a RELEASE of someone else's
    /// address).
    pub fn handle(
        &mut self,
        payload: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<Reply>, DhcpError> {
        let msg = Msg::parse(payload)?;
        if out.len() < REPLY_LEN {
            return Err(DhcpError::BufferTooSmall);
        }
        match msg.kind {
            DhcpMessageType::Discover => self.discover(&msg, now, out).map(Some),
            DhcpMessageType::Request => self.request(&msg, now, out),
            DhcpMessageType::Decline => self.decline(&msg, now),
            DhcpMessageType::Release => {
                self.release(&msg, now);
                Ok(None)
            }
            DhcpMessageType::Inform => {
                let r = self.reply(
                    &msg,
                    ReplyKind::Ack,
                    Ipv4Addr::UNSPECIFIED,
                    Content::Config,
                    out,
                );
                Ok(Some(r))
            }
            _ => Err(DhcpError::UnexpectedMessage),
        }
    }

    fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::from(self.first.wrapping_add(i as u32))
    }

    /// The slot of `ip`, if it is a pool address the server may hand out.
    fn slot_of(&self, ip: Ipv4Addr) -> Option<usize> {
        let i = u32::from(ip).checked_sub(self.first)? as usize;
        (i < self.slots.len() && !self.reserved(ip)).then_some(i)
    }

    fn reserved(&self, ip: Ipv4Addr) -> bool {
        let c = &self.cfg;
        let host = u32::from(ip) & !c.mask();
        !c.contains(ip)
            || ip == c.server
            || ip == c.router
            || ip == c.dns
            || (c.prefix_len < 31 && (host == 0 || host == !c.mask()))
    }

    /// Whether slot `i` may go to `key` now.
    fn free_for(&self, i: usize, key: &ClientKey, now: Instant) -> bool {
        match self.slots.get(i) {
            Some(None) => true,
            Some(Some(s)) => s.until <= now || s.owner.as_ref() == Some(key),
            None => false,
        }
    }

    /// A slot for a new client: never used first, then the one expired longest.
    fn pick_free(&self, now: Instant) -> Option<usize> {
        let usable = |i: usize| !self.reserved(self.addr(i));
        if let Some(i) = (0..self.slots.len()).find(|&i| self.slots[i].is_none() && usable(i)) {
            return Some(i);
        }
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.as_ref()?.until)))
            .filter(|&(i, until)| until <= now && usable(i))
            .min_by_key(|&(_, until)| until)
            .map(|(i, _)| i)
    }

    /// Gives slot `i` to `key`, taking it from any earlier owner and freeing
    /// the slot `key` held before.
    fn assign(&mut self, i: usize, key: &ClientKey, state: State, until: Instant) {
        if let Some(&old) = self.by_client.get(key)
            && old != i
            && let Some(slot) = self.slots.get_mut(old)
        {
            *slot = None;
        }
        if let Some(Some(Slot { owner: Some(o), .. })) = self.slots.get(i)
            && o != key
        {
            self.by_client.remove(o);
        }
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some(Slot {
                owner: Some(key.clone()),
                state,
                until,
            });
            self.by_client.insert(key.clone(), i);
        }
    }

    fn discover(&mut self, msg: &Msg, now: Instant, out: &mut [u8]) -> Result<Reply, DhcpError> {
        let key = &msg.key;
        // RFC 2131 4.3.1: the client's current or previous address, then
        // the one it asks for if free, then a fresh one.
        let i = self
            .by_client
            .get(key)
            .copied()
            .or_else(|| {
                let i = self.slot_of(msg.requested?)?;
                self.free_for(i, key, now).then_some(i)
            })
            .or_else(|| self.pick_free(now))
            .ok_or(DhcpError::PoolExhausted)?;
        let live_lease = matches!(
            self.slots.get(i),
            Some(Some(s)) if s.state == State::Bound && s.until > now
        );
        if !live_lease {
            self.assign(i, key, State::Offered, later(now, OFFER_HOLD));
        }
        Ok(self.reply(msg, ReplyKind::Offer, self.addr(i), Content::Lease, out))
    }

    fn request(
        &mut self,
        msg: &Msg,
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<Reply>, DhcpError> {
        let key = &msg.key;
        if let Some(id) = msg.server_id
            && id != self.cfg.server
        {
            // The client took another server's offer: withdraw ours.
            if let Some(&i) = self.by_client.get(key)
                && matches!(self.slots.get(i), Some(Some(s)) if s.state == State::Offered)
            {
                self.slots[i] = None;
                self.by_client.remove(key);
            }
            return Ok(None);
        }
        // SELECTING and INIT-REBOOT name the address in option 50,
        // RENEWING and REBINDING in ciaddr.
        let ip = msg
            .requested
            .or((!msg.ciaddr.is_unspecified()).then_some(msg.ciaddr))
            .ok_or(DhcpError::MissingAddress)?;
        let grant = self.slot_of(ip).filter(|&i| self.free_for(i, key, now));
        Ok(Some(match grant {
            Some(i) => {
                let until = later(now, Duration::from_secs(u64::from(self.lease_secs)));
                self.assign(i, key, State::Bound, until);
                self.reply(msg, ReplyKind::Ack, ip, Content::Lease, out)
            }
            None => self.reply(
                msg,
                ReplyKind::Nak,
                Ipv4Addr::UNSPECIFIED,
                Content::Nak,
                out,
            ),
        }))
    }

    fn decline(&mut self, msg: &Msg, now: Instant) -> Result<Option<Reply>, DhcpError> {
        if msg.server_id.is_some_and(|id| id != self.cfg.server) {
            return Ok(None);
        }
        let ip = msg.requested.ok_or(DhcpError::MissingAddress)?;
        let key = &msg.key;
        if let Some(i) = self.slot_of(ip)
            && self.by_client.get(key) == Some(&i)
        {
            self.by_client.remove(key);
            self.slots[i] = Some(Slot {
                owner: None,
                state: State::Declined,
                until: later(now, DECLINE_HOLD),
            });
        }
        Ok(None)
    }

    fn release(&mut self, msg: &Msg, now: Instant) {
        if msg.server_id.is_some_and(|id| id != self.cfg.server) {
            return;
        }
        let key = &msg.key;
        if let Some(i) = self.slot_of(msg.ciaddr)
            && self.by_client.get(key) == Some(&i)
            && let Some(Some(s)) = self.slots.get_mut(i)
        {
            // Expired but remembered: the same client gets it back first.
            s.until = now;
        }
    }

    /// Writes a reply to `msg` into `out` (at least [`REPLY_LEN`] bytes).
    fn reply(
        &self,
        msg: &Msg,
        kind: ReplyKind,
        yiaddr: Ipv4Addr,
        content: Content,
        out: &mut [u8],
    ) -> Reply {
        let c = &self.cfg;
        let buf = &mut out[..REPLY_LEN];
        buf.fill(0);
        let mut p = DhcpPacket::new_unchecked(&mut *buf);
        p.set_opcode(DhcpOpCode::Reply);
        p.set_hardware_type(ArpHardware::Ethernet);
        p.set_hardware_len(6);
        p.set_hops(0);
        p.set_transaction_id(msg.xid);
        p.set_secs(0);
        p.set_flags(if msg.broadcast {
            DhcpFlags::BROADCAST
        } else {
            DhcpFlags::empty()
        });
        let ciaddr = if kind == ReplyKind::Ack {
            msg.ciaddr
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        p.set_client_ip(ciaddr);
        p.set_your_ip(yiaddr);
        p.set_server_ip(Ipv4Addr::UNSPECIFIED);
        p.set_relay_agent_ip(Ipv4Addr::UNSPECIFIED);
        p.set_client_hardware_address(EthernetAddress(msg.chaddr));
        p.set_magic_number(MAGIC);

        let msg_type = match kind {
            ReplyKind::Offer => DhcpMessageType::Offer,
            ReplyKind::Ack => DhcpMessageType::Ack,
            ReplyKind::Nak => DhcpMessageType::Nak,
        };
        let lease = self.lease_secs;
        let t1 = lease / 2;
        let t2 = (u64::from(lease) * 7 / 8) as u32;
        let mask = c.mask().to_be_bytes();
        let router = c.router.octets();
        let mtu = c.mtu.max(68).to_be_bytes();
        let (lease, t1, t2) = (lease.to_be_bytes(), t1.to_be_bytes(), t2.to_be_bytes());
        let server = c.server.octets();
        let mt = [u8::from(msg_type)];
        let lease_opts: [(u8, &[u8]); 3] = [
            (OPT_LEASE_TIME, &lease),
            (OPT_RENEWAL_TIME, &t1),
            (OPT_REBINDING_TIME, &t2),
        ];
        let config_opts: [(u8, &[u8]); 3] = [
            (OPT_SUBNET_MASK, &mask),
            (OPT_ROUTER, &router),
            (OPT_MTU, &mtu),
        ];
        let always: [(u8, &[u8]); 2] = [(OPT_MESSAGE_TYPE, &mt), (OPT_SERVER_ID, &server)];
        let lease_part = if content == Content::Lease {
            &lease_opts[..]
        } else {
            &[]
        };
        let nak = content == Content::Nak;
        let config_part = if nak { &[] } else { &config_opts[..] };
        let (dns, search) = if nak {
            (&[][..], &[][..])
        } else {
            (&self.dns_data[..], &self.search_data[..])
        };
        // Room is left for the end option. The configuration checked that
        // the announced lists fit (`ANNOUNCE_SPACE`); a DhcpConfig built
        // by hand with longer ones loses what does not fit.
        let opts = &mut buf[..REPLY_LEN - 1];
        let mut at = FIXED_LEN;
        for &(kind, data) in always.iter().chain(lease_part).chain(config_part) {
            put_option(opts, &mut at, kind, data);
        }
        if !dns.is_empty() {
            put_option(opts, &mut at, OPT_DNS, dns);
        }
        // Option 119 longer than 255 bytes goes in consecutive pieces,
        // which the client concatenates (RFC 3396, as RFC 3397 allows); it
        // is sent whole or not at all.
        if !search.is_empty() && at + announce_len(0, search.len()) <= opts.len() {
            for piece in search.chunks(255) {
                put_option(opts, &mut at, OPT_DOMAIN_SEARCH, piece);
            }
        }
        buf[at] = 255;
        let len = (at + 1).max(MIN_REPLY_LEN);

        // RFC 2131 4.1, with giaddr always zero.
        let to_broadcast = kind == ReplyKind::Nak
            || (msg.ciaddr.is_unspecified() && (msg.broadcast || yiaddr.is_unspecified()));
        let (dst, dst_mac) = if to_broadcast {
            (Ipv4Addr::BROADCAST, BROADCAST_MAC)
        } else if !msg.ciaddr.is_unspecified() {
            (msg.ciaddr, msg.chaddr)
        } else {
            (yiaddr, msg.chaddr)
        };
        Reply {
            len,
            src: SocketAddrV4::new(c.server, SERVER_PORT),
            dst: SocketAddrV4::new(dst, CLIENT_PORT),
            dst_mac,
            kind,
            yiaddr,
        }
    }
}

/// `now + d`, saturating far in the future instead of panicking.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(u64::from(u32::MAX))))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn server() -> DhcpServer {
        DhcpServer::new(DhcpConfig::new(ip("10.0.2.0"), 24, 65520))
    }

    /// A client message built by hand, independently of the server's code.
    struct Client {
        kind: u8,
        mac: [u8; 6],
        xid: u32,
        ciaddr: Ipv4Addr,
        broadcast: bool,
        opts: Vec<(u8, Vec<u8>)>,
    }

    impl Client {
        fn new(kind: u8, mac: [u8; 6]) -> Self {
            Self {
                kind,
                mac,
                xid: 0x1234_5678,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                broadcast: false,
                opts: Vec::new(),
            }
        }
        fn opt(mut self, kind: u8, data: &[u8]) -> Self {
            self.opts.push((kind, data.to_vec()));
            self
        }
        fn requested(self, a: &str) -> Self {
            self.opt(OPT_REQUESTED_IP, &ip(a).octets())
        }
        fn server_id(self, a: &str) -> Self {
            self.opt(OPT_SERVER_ID, &ip(a).octets())
        }
        fn ciaddr(mut self, a: &str) -> Self {
            self.ciaddr = ip(a);
            self
        }
        fn bytes(&self) -> Vec<u8> {
            let mut b = vec![0u8; 240];
            b[0] = 1; // BOOTREQUEST
            b[1] = 1; // Ethernet
            b[2] = 6;
            b[4..8].copy_from_slice(&self.xid.to_be_bytes());
            if self.broadcast {
                b[10] = 0x80;
            }
            b[12..16].copy_from_slice(&self.ciaddr.octets());
            b[28..34].copy_from_slice(&self.mac);
            b[236..240].copy_from_slice(&[99, 130, 83, 99]);
            b.extend_from_slice(&[53, 1, self.kind]);
            for (k, d) in &self.opts {
                b.push(*k);
                b.push(d.len() as u8);
                b.extend_from_slice(d);
            }
            b.push(255);
            b
        }
    }

    const DISCOVER: u8 = 1;
    const REQUEST: u8 = 3;
    const DECLINE: u8 = 4;
    const RELEASE: u8 = 7;
    const INFORM: u8 = 8;

    /// A decoded reply.
    #[derive(Debug)]
    struct Got {
        reply: Reply,
        op: u8,
        xid: u32,
        ciaddr: Ipv4Addr,
        yiaddr: Ipv4Addr,
        chaddr: [u8; 6],
        opts: HashMap<u8, Vec<u8>>,
    }

    impl Got {
        fn msg_type(&self) -> u8 {
            self.opts[&OPT_MESSAGE_TYPE][0]
        }
        fn addr_opt(&self, k: u8) -> Ipv4Addr {
            let d: [u8; 4] = self.opts[&k][..].try_into().unwrap();
            Ipv4Addr::from(d)
        }
        fn u32_opt(&self, k: u8) -> u32 {
            u32::from_be_bytes(self.opts[&k][..].try_into().unwrap())
        }
    }

    fn send(s: &mut DhcpServer, c: &Client, now: Instant) -> Option<Got> {
        let mut out = [0u8; 1500];
        let reply = s.handle(&c.bytes(), now, &mut out).unwrap()?;
        let b = &out[..reply.len];
        assert!(
            (MIN_REPLY_LEN..=REPLY_LEN).contains(&b.len()),
            "{}",
            b.len()
        );
        assert_eq!(&b[236..240], &[99, 130, 83, 99]);
        let mut opts: HashMap<u8, Vec<u8>> = HashMap::new();
        let mut i = 240;
        while b[i] != 255 {
            let (k, l) = (b[i], b[i + 1] as usize);
            // Repeated options concatenate (RFC 3396).
            opts.entry(k)
                .or_default()
                .extend_from_slice(&b[i + 2..i + 2 + l]);
            i += 2 + l;
        }
        assert!(
            b[i + 1..].iter().all(|&x| x == 0),
            "bytes after the end option"
        );
        if b.len() > MIN_REPLY_LEN {
            assert_eq!(i + 1, b.len(), "a long reply ends at its end option");
        }
        Some(Got {
            reply,
            op: b[0],
            xid: u32::from_be_bytes(b[4..8].try_into().unwrap()),
            ciaddr: Ipv4Addr::from(<[u8; 4]>::try_from(&b[12..16]).unwrap()),
            yiaddr: Ipv4Addr::from(<[u8; 4]>::try_from(&b[16..20]).unwrap()),
            chaddr: b[28..34].try_into().unwrap(),
            opts,
        })
    }

    /// DISCOVER then REQUEST (selecting); returns the acknowledged address.
    fn lease(s: &mut DhcpServer, mac: [u8; 6], now: Instant) -> Ipv4Addr {
        let offer = send(s, &Client::new(DISCOVER, mac), now).unwrap();
        assert_eq!(offer.msg_type(), 2);
        let req = Client::new(REQUEST, mac)
            .server_id("10.0.2.2")
            .requested(&offer.yiaddr.to_string());
        let ack = send(s, &req, now).unwrap();
        assert_eq!(ack.msg_type(), 5, "{ack:?}");
        assert_eq!(ack.yiaddr, offer.yiaddr);
        ack.yiaddr
    }

    fn assert_config(g: &Got) {
        assert_eq!(g.addr_opt(OPT_SUBNET_MASK), ip("255.255.255.0"));
        assert_eq!(g.addr_opt(OPT_ROUTER), ip("10.0.2.2"));
        assert_eq!(g.addr_opt(OPT_DNS), ip("10.0.2.3"));
        assert_eq!(g.addr_opt(OPT_SERVER_ID), ip("10.0.2.2"));
        assert_eq!(g.opts[&OPT_MTU], 65520u16.to_be_bytes());
    }

    fn assert_lease_times(g: &Got) {
        assert_eq!(g.u32_opt(OPT_LEASE_TIME), 86400);
        assert_eq!(g.u32_opt(OPT_RENEWAL_TIME), 43200);
        assert_eq!(g.u32_opt(OPT_REBINDING_TIME), 75600);
    }

    #[test]
    fn default_config() {
        let c = DhcpConfig::new(ip("10.0.2.0"), 24, 1500);
        assert_eq!((c.first, c.pool_size), (ip("10.0.2.15"), 85));
        assert_eq!(
            (c.server, c.router, c.dns),
            (ip("10.0.2.2"), ip("10.0.2.2"), ip("10.0.2.3"))
        );
        // Host bits of the network are dropped; small networks shrink the pool.
        let c = DhcpConfig::new(ip("10.0.135.200"), 26, 1500);
        assert_eq!(
            (c.network, c.first),
            (ip("10.0.135.192"), ip("10.0.135.207"))
        );
        assert_eq!(c.pool_size, 254 - 207 + 1);
        assert_eq!(DhcpConfig::new(ip("10.0.2.0"), 28, 1500).pool_size, 0);
        for p in 0..=40 {
            let _ = DhcpServer::new(DhcpConfig::new(ip("10.0.2.0"), p, 1500));
        }
    }

    #[test]
    fn dns_list_and_domain_search() {
        let mut c = DhcpConfig::new(ip("10.0.2.0"), 24, 1500);
        c.dns_servers = vec![ip("192.0.2.53"), ip("198.51.100.53")];
        c.search = vec!["example.test".into(), "b.c".into()];
        let mut s = DhcpServer::new(c);
        let now = Instant::now();
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_A), now).unwrap();
        assert_eq!(
            offer.opts[&OPT_DNS],
            [192, 0, 2, 53, 198, 51, 100, 53].to_vec()
        );
        // RFC 3397: uncompressed names in DNS wire format, back to back.
        let mut want = vec![7];
        want.extend_from_slice(b"example");
        want.push(4);
        want.extend_from_slice(b"test");
        want.extend_from_slice(&[0, 1, b'b', 1, b'c', 0]);
        assert_eq!(offer.opts[&OPT_DOMAIN_SEARCH], want);
        assert_eq!(offer.reply.len, 240 + 44 + 10 + 21);
        let ack = send(&mut s, &Client::new(INFORM, MAC_A).ciaddr("10.0.2.50"), now).unwrap();
        assert_eq!(ack.opts[&OPT_DOMAIN_SEARCH], want);
        // A NAK carries neither.
        let nak = send(
            &mut s,
            &Client::new(REQUEST, MAC_B).requested("10.0.9.9"),
            now,
        )
        .unwrap();
        assert!(!nak.opts.contains_key(&OPT_DNS) && !nak.opts.contains_key(&OPT_DOMAIN_SEARCH));

        // No servers announced: no option 6.
        let mut c = DhcpConfig::new(ip("10.0.2.0"), 24, 1500);
        c.dns_servers.clear();
        let mut s = DhcpServer::new(c);
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_A), now).unwrap();
        assert!(!offer.opts.contains_key(&OPT_DNS));
    }

    #[test]
    fn long_search_list_is_split_and_bounded() {
        let long = format!("{}.{}.{}", "a".repeat(63), "a".repeat(63), "a".repeat(60));
        let short = format!("{}.c", "b".repeat(63));
        let names = vec![long.clone(), short];
        let mut wire = Vec::new();
        crate::config::encode_domains(&names, &mut wire);
        // 1 + 63 + 1 + 63 + 1 + 60 + 1, then 1 + 63 + 1 + 1 + 1.
        assert_eq!(wire.len(), 190 + 67);
        assert_eq!(announce_len(0, wire.len()), 257 + 4);
        assert!(announce_len(0, wire.len()) <= ANNOUNCE_SPACE);
        assert!(announce_len(1, wire.len()) > ANNOUNCE_SPACE);
        let now = Instant::now();
        // Longer than one option: pieces of 255 and 2, which concatenate.
        let mut c = DhcpConfig::new(ip("10.0.2.0"), 24, 1500);
        c.search = names.clone();
        c.dns_servers.clear();
        let mut s = DhcpServer::new(c);
        let mut out = [0u8; REPLY_LEN];
        let r = s
            .handle(&Client::new(DISCOVER, MAC_A).bytes(), now, &mut out)
            .unwrap()
            .unwrap();
        let b = &out[..r.len];
        let mut i = 240;
        let mut pieces = Vec::new();
        while b[i] != 255 {
            if b[i] == OPT_DOMAIN_SEARCH {
                pieces.push(b[i + 1]);
            }
            i += 2 + b[i + 1] as usize;
        }
        assert_eq!(pieces, [255, 2]);
        assert_eq!(r.len, REPLY_LEN - (ANNOUNCE_SPACE - 261));
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_B), now).unwrap();
        assert_eq!(offer.opts[&OPT_DOMAIN_SEARCH], wire);
        // A hand-built config beyond the room (the configuration refuses
        // one) drops the search list whole, never a cut name, and the reply
        // stays within REPLY_LEN.
        let mut c = DhcpConfig::new(ip("10.0.2.0"), 24, 1500);
        c.search = names;
        c.dns_servers = vec![ip("10.0.2.3"); 16];
        let mut s = DhcpServer::new(c);
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_A), now).unwrap();
        assert!(!offer.opts.contains_key(&OPT_DOMAIN_SEARCH));
        assert_eq!(offer.opts[&OPT_DNS].len(), 64);
        // The longest name with 16 servers fits.
        let mut c = DhcpConfig::new(ip("10.0.2.0"), 24, 1500);
        c.search = vec![long];
        c.dns_servers = vec![ip("10.0.2.3"); 16];
        let mut s = DhcpServer::new(c);
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_A), now).unwrap();
        assert_eq!(offer.opts[&OPT_DOMAIN_SEARCH], wire[..190].to_vec());
        assert!(offer.reply.len > MIN_REPLY_LEN);
    }

    #[test]
    fn discover_offer_request_ack() {
        let mut s = server();
        let now = Instant::now();
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_A), now).unwrap();
        assert_eq!((offer.op, offer.msg_type()), (2, 2));
        assert_eq!(offer.xid, 0x1234_5678);
        assert_eq!(offer.chaddr, MAC_A);
        assert_eq!(offer.yiaddr, ip("10.0.2.15"));
        assert_config(&offer);
        assert_lease_times(&offer);
        // No broadcast flag, no ciaddr: unicast to yiaddr at the client's MAC.
        assert_eq!(offer.reply.dst, "10.0.2.15:68".parse().unwrap());
        assert_eq!(offer.reply.dst_mac, MAC_A);
        assert_eq!(offer.reply.src, "10.0.2.2:67".parse().unwrap());
        assert_eq!(offer.reply.kind, ReplyKind::Offer);

        let req = Client::new(REQUEST, MAC_A)
            .server_id("10.0.2.2")
            .requested("10.0.2.15");
        let ack = send(&mut s, &req, now).unwrap();
        assert_eq!(ack.msg_type(), 5);
        assert_eq!(ack.yiaddr, ip("10.0.2.15"));
        assert_config(&ack);
        assert_lease_times(&ack);
        assert_eq!(ack.reply.kind, ReplyKind::Ack);
        assert_eq!(s.bound_addr(MAC_A, now), Some(ip("10.0.2.15")));
    }

    #[test]
    fn broadcast_flag_is_honoured() {
        let mut s = server();
        let mut c = Client::new(DISCOVER, MAC_A);
        c.broadcast = true;
        let offer = send(&mut s, &c, Instant::now()).unwrap();
        assert_eq!(offer.reply.dst, "255.255.255.255:68".parse().unwrap());
        assert_eq!(offer.reply.dst_mac, [0xff; 6]);
    }

    #[test]
    fn renewal_keeps_the_address() {
        let mut s = server();
        let now = Instant::now();
        let a = lease(&mut s, MAC_A, now);
        let later = now + Duration::from_secs(50_000);
        // RENEWING: ciaddr set, no server id, no requested address.
        let ack = send(
            &mut s,
            &Client::new(REQUEST, MAC_A).ciaddr("10.0.2.15"),
            later,
        )
        .unwrap();
        assert_eq!((ack.msg_type(), ack.yiaddr, ack.ciaddr), (5, a, a));
        assert_eq!(ack.reply.dst, "10.0.2.15:68".parse().unwrap());
        assert_eq!(ack.reply.dst_mac, MAC_A);
        // The lease now runs from the renewal.
        let end = later + Duration::from_secs(86_000);
        assert_eq!(s.bound_addr(MAC_A, end), Some(a));
        // A new DISCOVER (reboot) is offered the same address.
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_A), end).unwrap();
        assert_eq!(offer.yiaddr, a);
        // INIT-REBOOT asking for it is acknowledged too.
        let ack = send(
            &mut s,
            &Client::new(REQUEST, MAC_A).requested("10.0.2.15"),
            end,
        )
        .unwrap();
        assert_eq!((ack.msg_type(), ack.yiaddr), (5, a));
    }

    #[test]
    fn second_client_gets_another_address() {
        let mut s = server();
        let now = Instant::now();
        assert_eq!(lease(&mut s, MAC_A, now), ip("10.0.2.15"));
        assert_eq!(lease(&mut s, MAC_B, now), ip("10.0.2.16"));
        // A client identifier (option 61) names the client, whatever chaddr says.
        let id = [1, 2, 0, 0, 0, 0, 0xc];
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_A).opt(61, &id), now).unwrap();
        assert_eq!(offer.yiaddr, ip("10.0.2.17"));
        let offer = send(&mut s, &Client::new(DISCOVER, MAC_B).opt(61, &id), now).unwrap();
        assert_eq!(offer.yiaddr, ip("10.0.2.17"));
    }

    #[test]
    fn nak_for_addresses_not_ours() {
        let mut s = server();
        let now = Instant::now();
        lease(&mut s, MAC_A, now);
        for wrong in [
            "192.168.1.20",
            "10.0.2.100",
            "10.0.2.2",
            "10.0.2.3",
            "10.0.2.255",
            "10.0.2.15",
        ] {
            // 10.0.2.15 is MAC_A's, so MAC_B may not have it either.
            let nak = send(&mut s, &Client::new(REQUEST, MAC_B).requested(wrong), now).unwrap();
            assert_eq!(nak.msg_type(), 6, "{wrong}");
            assert_eq!(nak.yiaddr, Ipv4Addr::UNSPECIFIED);
            assert_eq!(nak.reply.dst, "255.255.255.255:68".parse().unwrap());
            assert_eq!(nak.reply.dst_mac, [0xff; 6]);
            assert_eq!(nak.addr_opt(OPT_SERVER_ID), ip("10.0.2.2"));
            assert!(!nak.opts.contains_key(&OPT_LEASE_TIME));
            assert!(!nak.opts.contains_key(&OPT_ROUTER));
        }
        // Renewing an address that is not the client's is refused as well.
        let nak = send(
            &mut s,
            &Client::new(REQUEST, MAC_B).ciaddr("10.0.2.15"),
            now,
        )
        .unwrap();
        assert_eq!(nak.msg_type(), 6);
        assert_eq!(s.bound_addr(MAC_A, now), Some(ip("10.0.2.15")));
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let mut s = server();
        let now = Instant::now();
        send(&mut s, &Client::new(DISCOVER, MAC_A), now).unwrap();
        let req = Client::new(REQUEST, MAC_A)
            .server_id("10.0.2.9")
            .requested("10.0.2.15");
        assert!(send(&mut s, &req, now).is_none());
        // The offer was withdrawn: the next client may have .15.
        assert_eq!(lease(&mut s, MAC_B, now), ip("10.0.2.15"));
        assert_eq!(s.lease_count(), 1);
    }

    #[test]
    fn release_then_rediscover() {
        let mut s = server();
        let now = Instant::now();
        let a = lease(&mut s, MAC_A, now);
        let rel = Client::new(RELEASE, MAC_A)
            .ciaddr("10.0.2.15")
            .server_id("10.0.2.2");
        assert!(send(&mut s, &rel, now).is_none());
        assert_eq!(s.bound_addr(MAC_A, now), None);
        // A release of someone else's address changes nothing.
        lease(&mut s, MAC_B, now);
        let rel = Client::new(RELEASE, MAC_A).ciaddr("10.0.2.16");
        assert!(send(&mut s, &rel, now).is_none());
        assert_eq!(s.bound_addr(MAC_B, now), Some(ip("10.0.2.16")));
        // The same client gets its old address back.
        assert_eq!(lease(&mut s, MAC_A, now), a);
    }

    #[test]
    fn decline_takes_the_address_out_for_a_while() {
        let mut s = server();
        let now = Instant::now();
        let a = lease(&mut s, MAC_A, now);
        let dec = Client::new(DECLINE, MAC_A)
            .requested("10.0.2.15")
            .server_id("10.0.2.2");
        assert!(send(&mut s, &dec, now).is_none());
        assert_eq!(s.lease_count(), 0);
        // The client starts over and gets another address; so does anyone.
        assert_eq!(lease(&mut s, MAC_A, now), ip("10.0.2.16"));
        let nak = send(
            &mut s,
            &Client::new(REQUEST, MAC_B).requested("10.0.2.15"),
            now,
        )
        .unwrap();
        assert_eq!(nak.msg_type(), 6);
        // After the hold it may be used again.
        let after = now + DECLINE_HOLD + Duration::from_secs(1);
        let ack = send(
            &mut s,
            &Client::new(REQUEST, MAC_B).requested("10.0.2.15"),
            after,
        )
        .unwrap();
        assert_eq!((ack.msg_type(), ack.yiaddr), (5, a));
    }

    #[test]
    fn inform_gets_config_without_lease() {
        let mut s = server();
        let ack = send(
            &mut s,
            &Client::new(INFORM, MAC_A).ciaddr("10.0.2.100"),
            Instant::now(),
        )
        .unwrap();
        assert_eq!((ack.msg_type(), ack.yiaddr), (5, Ipv4Addr::UNSPECIFIED));
        assert_config(&ack);
        for k in [OPT_LEASE_TIME, OPT_RENEWAL_TIME, OPT_REBINDING_TIME] {
            assert!(!ack.opts.contains_key(&k));
        }
        assert_eq!(ack.reply.dst, "10.0.2.100:68".parse().unwrap());
        assert_eq!(ack.reply.dst_mac, MAC_A);
        assert_eq!(s.lease_count(), 0);
    }

    #[test]
    fn expired_leases_are_reused() {
        let mut cfg = DhcpConfig::new(ip("10.0.2.0"), 24, 1500);
        cfg.pool_size = 1;
        cfg.lease = Duration::from_secs(100);
        let mut s = DhcpServer::new(cfg);
        let now = Instant::now();
        assert_eq!(lease(&mut s, MAC_A, now), ip("10.0.2.15"));
        let mut out = [0u8; REPLY_LEN];
        let d = Client::new(DISCOVER, MAC_B).bytes();
        assert_eq!(s.handle(&d, now, &mut out), Err(DhcpError::PoolExhausted));
        let later = now + Duration::from_secs(101);
        assert_eq!(lease(&mut s, MAC_B, later), ip("10.0.2.15"));
        assert_eq!(s.bound_addr(MAC_A, later), None);
        assert_eq!(s.lease_count(), 1);
        // A pending offer expires as well.
        let d = Client::new(DISCOVER, MAC_A).bytes();
        let much_later = later + Duration::from_secs(101);
        assert!(s.handle(&d, much_later, &mut out).unwrap().is_some());
        assert_eq!(
            s.handle(&Client::new(DISCOVER, MAC_B).bytes(), much_later, &mut out),
            Err(DhcpError::PoolExhausted)
        );
        assert!(
            s.handle(&d, much_later + OFFER_HOLD, &mut out)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn lease_table_stays_bounded() {
        let mut s = server();
        let now = Instant::now();
        let mut out = [0u8; REPLY_LEN];
        let mut granted = 0;
        for n in 0u32..10_000 {
            let b = n.to_be_bytes();
            let mac = [0x02, 0x42, b[0], b[1], b[2], b[3]];
            let t = now + Duration::from_millis(u64::from(n));
            match s.handle(&Client::new(DISCOVER, mac).bytes(), t, &mut out) {
                Ok(Some(r)) => {
                    let req = Client::new(REQUEST, mac).requested(&r.yiaddr.to_string());
                    let ack = s.handle(&req.bytes(), t, &mut out).unwrap().unwrap();
                    assert_eq!(ack.kind, ReplyKind::Ack);
                    granted += 1;
                }
                Err(DhcpError::PoolExhausted) => {}
                other => panic!("{other:?}"),
            }
            assert!(s.lease_count() <= 85);
        }
        assert_eq!(granted, 85);
        assert_eq!(s.lease_count(), 85);
        assert!(s.by_client.len() <= s.slots.len());
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let mut s = server();
        let now = Instant::now();
        let mut out = [0u8; REPLY_LEN];
        for len in 0..600usize {
            for seed in [0u8, 1, 0x35, 0xff] {
                let junk: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                    .collect();
                assert!(
                    s.handle(&junk, now, &mut out).is_err(),
                    "len {len} seed {seed}"
                );
            }
        }
        let valid = Client::new(REQUEST, MAC_A)
            .requested("10.0.2.15")
            .opt(61, &[1, 2, 3])
            .bytes();
        for len in 0..valid.len() {
            // Truncated: an error, or (once the message type option is in)
            // an answer built from what is there; never a panic.
            let r = s.handle(&valid[..len], now, &mut out);
            if len < 243 {
                assert!(r.is_err(), "len {len}");
            }
        }
        // Every byte set to a few values in turn.
        let msgs = [
            Client::new(DISCOVER, MAC_A).bytes(),
            valid.clone(),
            Client::new(RELEASE, MAC_A).ciaddr("10.0.2.15").bytes(),
            Client::new(DECLINE, MAC_A).requested("10.0.2.15").bytes(),
            Client::new(INFORM, MAC_A).bytes(),
        ];
        for m in &msgs {
            for i in 0..m.len() {
                for v in [0u8, 1, 2, 6, 0x80, 0xfe, 0xff] {
                    let mut b = m.clone();
                    b[i] = v;
                    let _ = s.handle(&b, now, &mut out);
                    let _ = s.handle(&b[..i], now, &mut out);
                }
            }
        }
        // Server-side messages and a short output buffer are refused.
        for kind in [2u8, 5, 6, 9, 0, 200] {
            let b = Client::new(kind, MAC_A).bytes();
            assert_eq!(
                s.handle(&b, now, &mut out),
                Err(DhcpError::UnexpectedMessage)
            );
        }
        let mut small = [0u8; REPLY_LEN - 1];
        let d = Client::new(DISCOVER, MAC_A).bytes();
        assert_eq!(
            s.handle(&d, now, &mut small),
            Err(DhcpError::BufferTooSmall)
        );
        let mut b = d.clone();
        b[0] = 2;
        assert_eq!(s.handle(&b, now, &mut out), Err(DhcpError::NotBootRequest));
        let mut b = d.clone();
        b[24] = 10;
        assert_eq!(s.handle(&b, now, &mut out), Err(DhcpError::Relayed));
        assert!(s.lease_count() <= 85);
    }
}
