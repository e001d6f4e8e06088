//! The flow table: every flow's slot, the indices that find a flow from a
//! guest frame, the timers and the dirty list, the state bounds new flows
//! are admitted against, and the TCP ring-memory budget.
//!
//! # Invariants
//!
//! [`FlowTable`] is the only place these are changed, so they hold
//! together:
//!
//! - a flow is in its index (TCP key, UDP guest endpoint, ICMP identifier)
//!   exactly while its slot exists; inserting a typed flow indexes it and
//!   [`FlowTable::remove`] un-indexes it;
//! - the half-open count is the number of TCP flows whose
//!   [`TcpFlow::is_half_open`] holds, and the per-guest counts are those of
//!   the outbound TCP and UDP flows of each guest address (no zero entry);
//! - the budget's `used` is the sum of [`TcpFlow::accounted`] over live
//!   flows;
//! - the UDP recency sets hold one entry per UDP flow, at the flow's
//!   `indexed_at`;
//! - the gauges of [`Stats`] (TCP, UDP, ICMP flows and DNS queries) follow
//!   inserts and removals (spliced connections are counted by their owner
//!   when opened and here when removed).
//!
//! A slot's index is its epoll token (offset by the engine's first flow
//! token); its id is unique over the table's lifetime, so stale timer and
//! dirty entries of a reused index are recognised and skipped.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Index, IndexMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mio::{Interest, Registry, Token};
use slab::Slab;
use smoltcp::time::{Duration, Instant};

use crate::config::Limits;
use crate::nat::icmp::IcmpFlow;
use crate::nat::tcp::{Step, TcpFlow, TcpKey};
use crate::nat::udp::UdpFlow;
use crate::services::dns::DnsQuery;
use crate::stats::Stats;

/// The epoll token of slot 0.
pub(super) const FIRST_FLOW: usize = 16;

/// What a slot holds.
pub(super) enum Flow {
    Tcp(Box<TcpFlow>),
    Udp(UdpFlow),
    Icmp(IcmpFlow),
    Dns(DnsQuery),
    TcpListen(crate::ports::listeners::TcpListen),
    UdpListen(crate::ports::listeners::UdpListen),
    Splice(Box<crate::ports::splice::SpliceFlow>),
    /// A second epoll source of the flow at this slab index (the guest
    /// side of a spliced connection).
    Alias(usize, u64),
}

/// One entry of the table.
pub(super) struct Slot {
    pub(super) flow: Flow,
    /// Unique over the table's lifetime: slab indices are reused, ids not.
    pub(super) id: u64,
    /// The deadline of this flow's live timer entry.
    sched: Option<Instant>,
    dirty: bool,
    /// The published-port rule a connection came in on (0: none).
    pub(super) rule: u64,
}

/// The global budget of TCP ring memory (see [`crate::nat::tcp`]'s
/// "Ring memory").
pub(super) struct RingBudget {
    pub(super) budget: usize,
    /// Resident ring memory of all flows, as last accounted.
    pub(super) used: usize,
    /// Highest `used` seen.
    pub(super) peak: usize,
    /// Flows (slab index, id) that left host data unread for want of memory.
    pub(super) paused: Vec<(usize, u64)>,
    pub(super) pauses: u64,
    pub(super) resumes: u64,
    /// Guest segments whose payload was cut off at the budget.
    pub(super) stripped: u64,
}

impl RingBudget {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            peak: 0,
            paused: Vec::new(),
            pauses: 0,
            resumes: 0,
            stripped: 0,
        }
    }

    /// Memory a flow may still make resident.
    fn room(&mut self) -> usize {
        self.peak = self.peak.max(self.used);
        self.budget.saturating_sub(self.used)
    }

    /// Memory guest data may still make resident: up to a hard ceiling a
    /// quarter above the budget. Past the budget host reads pause, which
    /// frees memory as the guest reads; cutting guest data off costs the
    /// guest a retransmission timeout, so it is the last resort.
    fn guest_room(&self) -> usize {
        (self.budget + self.budget / 4).saturating_sub(self.used)
    }

    /// Below this, paused flows are resumed; at or above it, drained ring
    /// chunks are given back at once instead of after the idle delay.
    fn low_water(&self) -> usize {
        self.budget - self.budget / 8
    }

    fn pressure(&self) -> bool {
        self.used >= self.low_water()
    }

    fn may_resume(&self) -> bool {
        !self.paused.is_empty() && self.used < self.low_water()
    }
}

/// Every flow of the engine and the bookkeeping that must agree with it
/// (see the module's invariants).
pub(super) struct FlowTable {
    slots: Slab<Slot>,
    next_id: u64,
    tcp: HashMap<TcpKey, usize>,
    udp: HashMap<SocketAddr, usize>,
    icmp: HashMap<(IpAddr, u16), usize>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    dirty: Vec<(usize, u64)>,
    limits: Limits,
    /// TCP flows whose host connect is in progress.
    half_open: usize,
    /// Outbound TCP and UDP flows per guest address.
    per_guest: HashMap<IpAddr, (usize, usize)>,
    /// TCP ring memory and the flows its budget paused.
    mem: RingBudget,
    /// UDP flows by recency (re-indexed at most once a second each), so
    /// that eviction at a bound takes the oldest without a scan.
    udp_lru: BTreeSet<(Instant, usize)>,
    /// The same per guest address.
    udp_lru_guest: BTreeSet<(IpAddr, Instant, usize)>,
    stats: Arc<Stats>,
}

impl Index<usize> for FlowTable {
    type Output = Slot;
    fn index(&self, idx: usize) -> &Slot {
        &self.slots[idx]
    }
}

impl IndexMut<usize> for FlowTable {
    fn index_mut(&mut self, idx: usize) -> &mut Slot {
        &mut self.slots[idx]
    }
}

/// The epoll token of slot `idx`.
pub(super) fn token(idx: usize) -> Token {
    Token(idx + FIRST_FLOW)
}

impl FlowTable {
    pub(super) fn new(limits: Limits, stats: Arc<Stats>) -> Self {
        Self {
            slots: Slab::new(),
            next_id: 1,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            icmp: HashMap::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            limits,
            half_open: 0,
            per_guest: HashMap::new(),
            mem: RingBudget::new(limits.memory_budget),
            udp_lru: BTreeSet::new(),
            udp_lru_guest: BTreeSet::new(),
            stats,
        }
    }

    pub(super) fn get(&self, idx: usize) -> Option<&Slot> {
        self.slots.get(idx)
    }

    pub(super) fn get_mut(&mut self, idx: usize) -> Option<&mut Slot> {
        self.slots.get_mut(idx)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, &Slot)> {
        self.slots.iter()
    }

    pub(super) fn mem(&self) -> &RingBudget {
        &self.mem
    }

    /// The TCP flow at `idx`.
    pub(super) fn tcp_mut(&mut self, idx: usize) -> Option<&mut TcpFlow> {
        match self.slots.get_mut(idx) {
            Some(Slot {
                flow: Flow::Tcp(f), ..
            }) => Some(f),
            _ => None,
        }
    }

    /// The slot of the TCP flow `key`.
    pub(super) fn tcp_slot(&self, key: &TcpKey) -> Option<usize> {
        self.tcp.get(key).copied()
    }

    pub(super) fn tcp_count(&self) -> usize {
        self.tcp.len()
    }

    pub(super) fn udp_slot(&self, guest: &SocketAddr) -> Option<usize> {
        self.udp.get(guest).copied()
    }

    pub(super) fn icmp_slot(&self, key: &(IpAddr, u16)) -> Option<usize> {
        self.icmp.get(key).copied()
    }

    /// Puts `flow` in a new slot and registers its host socket under the
    /// slot's token; on a refusal nothing is kept.
    pub(super) fn insert(
        &mut self,
        mut flow: Flow,
        rule: u64,
        reg: &Registry,
    ) -> io::Result<(usize, u64)> {
        let entry = self.slots.vacant_entry();
        let idx = entry.key();
        let token = token(idx);
        let both = Interest::READABLE | Interest::WRITABLE;
        match &mut flow {
            Flow::Tcp(f) => reg.register(&mut f.host, token, both),
            Flow::Splice(f) => reg.register(&mut f.host, token, both),
            Flow::Udp(f) => reg.register(&mut f.socket, token, Interest::READABLE),
            Flow::Icmp(f) => reg.register(&mut f.socket, token, Interest::READABLE),
            Flow::Dns(q) => reg.register(&mut q.socket, token, Interest::READABLE),
            Flow::TcpListen(l) => reg.register(&mut l.listener, token, Interest::READABLE),
            Flow::UdpListen(l) => reg.register(&mut l.socket, token, Interest::READABLE),
            Flow::Alias(..) => Ok(()),
        }?;
        let id = self.next_id;
        self.next_id += 1;
        entry.insert(Slot {
            flow,
            id,
            sched: None,
            dirty: false,
            rule,
        });
        Ok((idx, id))
    }

    /// A slot standing for the guest side of the spliced flow at
    /// (`parent`, `id`); its socket is registered by the caller.
    pub(super) fn insert_alias(&mut self, parent: usize, id: u64) -> usize {
        let alias = self.slots.insert(Slot {
            flow: Flow::Alias(parent, id),
            id: self.next_id,
            sched: None,
            dirty: false,
            rule: 0,
        });
        self.next_id += 1;
        alias
    }

    /// Inserts and indexes a TCP flow. An outbound flow (`rule` 0) opened
    /// for a guest SYN counts as half-open and towards its guest's bound.
    pub(super) fn insert_tcp(
        &mut self,
        mut f: Box<TcpFlow>,
        rule: u64,
        reg: &Registry,
    ) -> io::Result<(usize, u64)> {
        let (key, outbound) = (f.key, rule == 0);
        if outbound {
            f.count_half_open();
        }
        let (idx, id) = self.insert(Flow::Tcp(f), rule, reg)?;
        if outbound {
            self.half_open += 1;
            self.per_guest.entry(key.0.ip()).or_default().0 += 1;
        }
        self.tcp.insert(key, idx);
        self.stats.tcp_opened.fetch_add(1, Ordering::Relaxed);
        self.stats.tcp_flows.fetch_add(1, Ordering::Relaxed);
        Ok((idx, id))
    }

    /// Inserts and indexes the UDP flow of a guest endpoint.
    pub(super) fn insert_udp(&mut self, f: UdpFlow, reg: &Registry) -> io::Result<usize> {
        let (guest, at) = (f.guest, f.indexed_at);
        let (idx, _) = self.insert(Flow::Udp(f), 0, reg)?;
        self.udp.insert(guest, idx);
        self.udp_lru.insert((at, idx));
        self.udp_lru_guest.insert((guest.ip(), at, idx));
        self.per_guest.entry(guest.ip()).or_default().1 += 1;
        self.stats.udp_flows.fetch_add(1, Ordering::Relaxed);
        Ok(idx)
    }

    /// Inserts and indexes the ping socket of a guest echo identifier.
    pub(super) fn insert_icmp(&mut self, f: IcmpFlow, reg: &Registry) -> io::Result<usize> {
        let key = (f.guest, f.ident);
        let (idx, _) = self.insert(Flow::Icmp(f), 0, reg)?;
        self.icmp.insert(key, idx);
        self.stats.icmp_flows.fetch_add(1, Ordering::Relaxed);
        Ok(idx)
    }

    /// Inserts a DNS query in flight.
    pub(super) fn insert_dns(&mut self, q: DnsQuery, reg: &Registry) -> io::Result<usize> {
        let (idx, _) = self.insert(Flow::Dns(q), 0, reg)?;
        self.stats.dns_queries.fetch_add(1, Ordering::Relaxed);
        Ok(idx)
    }

    /// Takes the flow at `idx` out: deregisters its sockets (a TCP flow's
    /// leaves the epoll set as it closes) and undoes its
    /// indices, counts and budget share. The caller finishes what the
    /// table does not own (a splice's alias, a listener's clients).
    pub(super) fn remove(&mut self, idx: usize, reg: &Registry) -> Option<Flow> {
        let slot = self.slots.try_remove(idx)?;
        let mut flow = slot.flow;
        match &mut flow {
            Flow::Tcp(f) => {
                // No epoll_ctl(DEL): the host socket is the flow's own
                // descriptor and closes when the caller drops the flow,
                // which takes it out of the epoll set (one syscall less
                // per connection).
                self.tcp.remove(&f.key);
                self.stats.tcp_flows.fetch_sub(1, Ordering::Relaxed);
                if f.is_half_open() {
                    self.half_open -= 1;
                }
                self.mem.used -= f.accounted();
                if slot.rule == 0 {
                    self.guest_count(f.key.0.ip(), |c| c.0 -= 1);
                }
            }
            Flow::Udp(f) => {
                let _ = reg.deregister(&mut f.socket);
                self.udp.remove(&f.guest);
                self.udp_lru.remove(&(f.indexed_at, idx));
                self.udp_lru_guest
                    .remove(&(f.guest.ip(), f.indexed_at, idx));
                self.stats.udp_flows.fetch_sub(1, Ordering::Relaxed);
                self.guest_count(f.guest.ip(), |c| c.1 -= 1);
            }
            Flow::Icmp(f) => {
                let _ = reg.deregister(&mut f.socket);
                self.icmp.remove(&(f.guest, f.ident));
                self.stats.icmp_flows.fetch_sub(1, Ordering::Relaxed);
            }
            Flow::Dns(q) => {
                let _ = reg.deregister(&mut q.socket);
                self.stats.dns_queries.fetch_sub(1, Ordering::Relaxed);
            }
            Flow::TcpListen(l) => {
                let _ = reg.deregister(&mut l.listener);
            }
            Flow::Splice(f) => {
                let _ = reg.deregister(&mut f.host);
                let _ = reg.deregister(&mut f.guest);
                self.stats.tcp_flows.fetch_sub(1, Ordering::Relaxed);
            }
            Flow::Alias(..) => {}
            Flow::UdpListen(l) => {
                let _ = reg.deregister(&mut l.socket);
            }
        }
        Some(flow)
    }

    fn guest_count(&mut self, ip: IpAddr, f: impl FnOnce(&mut (usize, usize))) {
        if let Some(c) = self.per_guest.get_mut(&ip) {
            f(c);
            if *c == (0, 0) {
                self.per_guest.remove(&ip);
            }
        }
    }

    /// The bound a new outbound TCP flow of `guest` would pass, if any.
    pub(super) fn tcp_refusal(&self, guest: IpAddr) -> Option<&'static str> {
        let own = self.per_guest.get(&guest).map_or(0, |c| c.0);
        if self.tcp.len() >= self.limits.tcp_flows {
            Some("TCP flows")
        } else if self.half_open >= self.limits.tcp_half_open {
            Some("half-open TCP flows")
        } else if own >= self.limits.tcp_flows_per_guest {
            Some("TCP flows of one guest address")
        } else {
            None
        }
    }

    /// Before a new UDP flow for `guest`: if a bound is reached, the least
    /// recently active flow to evict (of that guest when its own bound is
    /// the one reached) and the bound, from the recency index: no scan.
    pub(super) fn udp_victim(&self, guest: IpAddr) -> Option<(usize, &'static str)> {
        let own = self.per_guest.get(&guest).map_or(0, |c| c.1);
        let per_guest = own >= self.limits.udp_flows_per_guest;
        if !per_guest && self.udp.len() < self.limits.udp_flows {
            return None;
        }
        if per_guest {
            self.udp_lru_guest
                .range((guest, Instant::from_micros(i64::MIN), 0)..)
                .next()
                .filter(|(ip, _, _)| *ip == guest)
                .map(|&(_, _, idx)| (idx, "UDP flows of one guest address"))
        } else {
            self.udp_lru.first().map(|&(_, idx)| (idx, "UDP flows"))
        }
    }

    /// Whether a new echo identifier would pass the ICMP bound.
    pub(super) fn icmp_full(&self, key: &(IpAddr, u16)) -> bool {
        !self.icmp.contains_key(key) && self.icmp.len() >= self.limits.icmp_flows
    }

    /// Moves a UDP flow to its place in the recency index after activity,
    /// at most once a second per flow (eviction order is by the second).
    pub(super) fn udp_touch(&mut self, idx: usize) {
        let Some(Slot {
            flow: Flow::Udp(f), ..
        }) = self.slots.get_mut(idx)
        else {
            return;
        };
        if f.last_active < f.indexed_at + Duration::from_secs(1) {
            return;
        }
        let (old, new, ip) = (f.indexed_at, f.last_active, f.guest.ip());
        f.indexed_at = new;
        self.udp_lru.remove(&(old, idx));
        self.udp_lru.insert((new, idx));
        self.udp_lru_guest.remove(&(ip, old, idx));
        self.udp_lru_guest.insert((ip, new, idx));
    }

    /// Takes the budget's share for the guest segment `ip` of the TCP flow
    /// at `idx`; false when the budget has no room (the caller cuts the
    /// payload off and calls [`Self::note_stripped`]).
    pub(super) fn charge_guest_data(&mut self, idx: usize, ip: &[u8]) -> bool {
        let room = self.mem.guest_room();
        let Some(Slot {
            flow: Flow::Tcp(f), ..
        }) = self.slots.get_mut(idx)
        else {
            return true;
        };
        match f.take_rx_memory(ip, room) {
            Some(taken) => {
                self.mem.used += taken;
                true
            }
            None => false,
        }
    }

    /// A guest segment's payload was cut off at the budget.
    pub(super) fn note_stripped(&mut self) {
        self.mem.stripped += 1;
    }

    /// Lets the TCP flow at `idx` move bytes between its host socket and
    /// its smoltcp socket within the budget's room; returns what it asks
    /// for and the room left. A host connect that ended leaves the
    /// half-open count.
    pub(super) fn service_tcp_host(&mut self, idx: usize) -> Option<(Step, usize)> {
        let mut room = self.mem.room();
        let Some(Slot {
            flow: Flow::Tcp(f), ..
        }) = self.slots.get_mut(idx)
        else {
            return None;
        };
        let step = f.service(&mut room);
        if f.settle_half_open() {
            self.half_open -= 1;
        }
        Some((step, room))
    }

    /// After servicing the TCP flow at `idx`: gives back ring memory it no
    /// longer needs, accounts what stays resident, and puts it on the
    /// paused list if it left host data unread. Returns when the flow's
    /// spare memory is to be looked at again.
    pub(super) fn settle_tcp_memory(&mut self, idx: usize, now: Instant) -> Option<Instant> {
        let pressure = self.mem.pressure();
        let Some(Slot {
            flow: Flow::Tcp(f),
            id,
            ..
        }) = self.slots.get_mut(idx)
        else {
            return None;
        };
        let release_at = f.trim(now, pressure);
        let (before, after) = f.reaccount();
        self.mem.used = self.mem.used + after - before;
        if f.pause_for_memory() {
            self.mem.pauses += 1;
            self.mem.paused.push((idx, *id));
        }
        release_at
    }

    /// Marks dirty again every flow the memory budget paused once the ring
    /// memory in use is below the low-water mark. Their host sockets still
    /// hold unread data; with edge-triggered epoll no new event would come.
    pub(super) fn resume_paused(&mut self) {
        if !self.mem.may_resume() {
            return;
        }
        for (idx, id) in std::mem::take(&mut self.mem.paused) {
            if let Some(Slot {
                flow: Flow::Tcp(f),
                id: live,
                ..
            }) = self.slots.get_mut(idx)
                && *live == id
            {
                f.resume();
                self.mem.resumes += 1;
                self.mark_dirty(idx, id);
            }
        }
    }

    /// Queues the flow (`idx`, `id`) for servicing, once.
    pub(super) fn mark_dirty(&mut self, idx: usize, id: u64) {
        if let Some(slot) = self.slots.get_mut(idx)
            && slot.id == id
            && !slot.dirty
        {
            slot.dirty = true;
            self.dirty.push((idx, id));
        }
    }

    pub(super) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The flows queued for servicing so far (new ones queue anew).
    pub(super) fn take_dirty(&mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.dirty)
    }

    /// Takes (`idx`, `id`) off the dirty list for servicing; false if that
    /// flow is gone.
    pub(super) fn begin_service(&mut self, idx: usize, id: u64) -> bool {
        match self.slots.get_mut(idx) {
            Some(slot) if slot.id == id => {
                slot.dirty = false;
                true
            }
            _ => false,
        }
    }

    /// Arms the flow's timer for `at` unless an earlier one is armed.
    pub(super) fn schedule(&mut self, idx: usize, at: Instant) {
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        if slot.sched.is_some_and(|s| s <= at) {
            return;
        }
        slot.sched = Some(at);
        self.timers.push(Reverse((at, idx, slot.id)));
    }

    /// The earliest armed deadline (possibly of a stale entry).
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next flow whose live timer is due at `now` (disarmed); stale
    /// entries are dropped on the way.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(usize, u64)> {
        while let Some(Reverse((at, idx, id))) = self.timers.peek().copied() {
            if at > now {
                return None;
            }
            self.timers.pop();
            if let Some(slot) = self.slots.get_mut(idx)
                && slot.id == id
                && slot.sched == Some(at)
            {
                slot.sched = None;
                return Some((idx, id));
            }
        }
        None
    }
}
