//! Servicing: what the loop does after reading the TAP. Host-socket
//! events and due timers mark flows dirty (or end them: idle UDP and ICMP
//! flows, DNS queries out of upstreams); each dirty flow is then serviced
//! once: bytes move between its smoltcp socket or guest frames and its host
//! socket, it transmits, and its timer is re-armed. A TCP flow whose host
//! connect failed is answered with the matching ICMP error, or moved to the
//! next DNS upstream when it is DNS over TCP.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use mio::Interest;
use smoltcp::time::{Duration, Instant};
use tracing::{debug, warn};

use super::flows::{self, Flow};
use super::{Engine, Slot, header};
use crate::nat::tcp::{self, Step};
use crate::services::dns::{self, Reply};
use crate::stats::DropReason;
use crate::wire::emit;

impl Engine {
    pub(super) fn flow_event(&mut self, idx: usize, readable: bool, writable: bool) {
        let Some(slot) = self.flows.get_mut(idx) else {
            return;
        };
        let id = slot.id;
        match &mut slot.flow {
            Flow::Tcp(f) => f.host_ready(readable, writable),
            Flow::Splice(f) => f.host_event(readable, writable),
            Flow::Alias(parent, pid) => {
                let (parent, pid) = (*parent, *pid);
                if let Some(Slot {
                    flow: Flow::Splice(f),
                    id,
                    ..
                }) = self.flows.get_mut(parent)
                    && *id == pid
                {
                    f.guest_event(readable, writable);
                    self.mark_dirty(parent, pid);
                }
                return;
            }
            Flow::Udp(_)
            | Flow::Icmp(_)
            | Flow::Dns(_)
            | Flow::TcpListen(_)
            | Flow::UdpListen(_)
                if !readable =>
            {
                return;
            }
            _ => {}
        }
        self.mark_dirty(idx, id);
    }

    pub(super) fn fire_timers(&mut self, now: Instant) {
        let idle = Duration::from_micros(self.cfg.udp_idle_timeout.as_micros() as u64);
        while let Some((idx, id)) = self.flows.pop_due(now) {
            let last_active = match &self.flows[idx].flow {
                Flow::Tcp(_) => {
                    self.flows.mark_dirty(idx, id);
                    continue;
                }
                Flow::Udp(f) => f.last_active,
                Flow::Icmp(f) => f.last_active,
                Flow::Dns(_) => {
                    self.dns_timeout(idx, now);
                    continue;
                }
                Flow::TcpListen(_) | Flow::UdpListen(_) | Flow::Splice(_) | Flow::Alias(..) => {
                    continue;
                }
            };
            let due = last_active + idle;
            if due <= now {
                self.remove(idx);
            } else {
                self.flows.schedule(idx, due);
            }
        }
    }

    /// A DNS query's upstream did not answer in time: asks the next one,
    /// or gives up.
    fn dns_timeout(&mut self, idx: usize, now: Instant) {
        let Some(Slot {
            flow: Flow::Dns(q), ..
        }) = self.flows.get_mut(idx)
        else {
            return;
        };
        let Some(mut old) = q.retry(&self.upstreams) else {
            self.remove(idx);
            return;
        };
        debug!(upstream = %self.upstreams[q.upstream], "dns upstream timed out; trying the next");
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut old);
        if let Err(e) = reg.register(&mut q.socket, flows::token(idx), Interest::READABLE) {
            warn!(error = %e, "cannot watch a host socket");
            self.stats.count_drop(DropReason::HostSocket);
            self.remove(idx);
            return;
        }
        let at = now + Duration::from_micros(self.cfg.dns_timeout.as_micros() as u64);
        self.flows.schedule(idx, at);
    }

    pub(super) fn service_dirty(&mut self, now: Instant) {
        for (idx, id) in self.flows.take_dirty() {
            if !self.flows.begin_service(idx, id) {
                continue;
            }
            match &mut self.flows[idx].flow {
                Flow::Tcp(_) => self.service_tcp(idx, now),
                Flow::Udp(f) => {
                    let r = f.to_guest(
                        &self.cfg,
                        &self.local,
                        &mut self.stack,
                        &mut self.udp_rx,
                        self.tap.tx(),
                        &mut self.udp_io,
                        now,
                    );
                    for _ in 0..r.filtered {
                        self.stats.count_drop(DropReason::Filtered);
                    }
                    self.flows.udp_touch(idx);
                    if r.more {
                        self.mark_dirty(idx, id);
                    }
                }
                Flow::Icmp(f) => f.to_guest(&self.cfg, &mut self.stack, self.tap.tx(), now),
                Flow::TcpListen(_) => self.accept_tcp(idx, now),
                Flow::Splice(f) => {
                    if f.service() == crate::ports::splice::SpliceStep::Done {
                        self.remove(idx);
                    }
                }
                Flow::Alias(..) => {}
                Flow::UdpListen(_) => self.udp_from_clients(idx, now),
                Flow::Dns(q) => {
                    let dns = match (q.guest, self.stack.addrs.v6) {
                        (SocketAddr::V6(_), Some(v6)) => SocketAddr::from((v6.dns, 53)),
                        _ => SocketAddr::from((self.stack.addrs.dns, 53)),
                    };
                    // Read until the answer or nothing is left (edge-
                    // triggered); other datagrams are counted.
                    loop {
                        match q.to_guest(dns, &mut self.stack, self.tap.tx()) {
                            Reply::Answer => {
                                self.remove(idx);
                                break;
                            }
                            Reply::Mismatch => self.stats.count_drop(DropReason::DnsMismatch),
                            Reply::Empty => break,
                        }
                    }
                }
            }
        }
        self.flows.resume_paused();
        self.stats
            .frames_out
            .store(self.tap.out_counters().frames, Ordering::Relaxed);
    }

    fn service_tcp(&mut self, idx: usize, now: Instant) {
        let Some((step, mut room)) = self.flows.service_tcp_host(idx) else {
            return;
        };
        let remove = match step {
            Step::Keep => false,
            Step::Remove => true,
            Step::ConnectFailed(e) => {
                let Some(f) = self.flows.tcp_mut(idx) else {
                    return;
                };
                match dns::tcp_failover(f.key.1, f.target, &self.stack.addrs, &self.upstreams) {
                    Some(next) => {
                        debug!(failed = %f.target, %next, error = %e, "dns over tcp: trying the next upstream");
                        !self.retarget_tcp(idx, next)
                    }
                    None if self.refuse_tcp(idx, &e) => {
                        // Drop the flow silently: the guest got its answer.
                        self.remove(idx);
                        return;
                    }
                    None => true,
                }
            }
        };
        let Some(f) = self.flows.tcp_mut(idx) else {
            return;
        };
        f.egress(&mut self.stack, now, self.tap.tx());
        if remove {
            self.remove(idx);
            return;
        }
        // Sending may have freed room for more host data, and a close may
        // have completed; one more pass settles both without waiting.
        if matches!(f.service(&mut room), Step::Remove) {
            f.egress(&mut self.stack, now, self.tap.tx());
            self.remove(idx);
            return;
        }
        let release_at = self.flows.settle_tcp_memory(idx, now);
        let Some(f) = self.flows.tcp_mut(idx) else {
            return;
        };
        let at = match (f.poll_at(&mut self.stack, now), release_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = at {
            self.flows.schedule(idx, at.max(now));
        }
    }

    /// Moves the host side of the TCP flow at `idx` to the DNS upstream
    /// `next`; false (the guest side aborted) if that cannot start.
    fn retarget_tcp(&mut self, idx: usize, next: SocketAddr) -> bool {
        let Some(f) = self.flows.tcp_mut(idx) else {
            return false;
        };
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut f.host);
        let ok = f.retarget(next).is_ok()
            && reg
                .register(
                    &mut f.host,
                    flows::token(idx),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_ok();
        if !ok {
            f.abort_guest();
        }
        ok
    }

    /// The host connect of the TCP flow at `idx` failed with `e`: answers
    /// the guest's SYN with the ICMP error that matches, if any (true), or
    /// aborts the guest side (false).
    fn refuse_tcp(&mut self, idx: usize, e: &io::Error) -> bool {
        let Some(f) = self.flows.tcp_mut(idx) else {
            return false;
        };
        debug!(guest = %f.key.0, dst = %f.key.1, target = %f.target, error = %e, "host connect failed");
        let reply = match (f.key.0.ip(), f.key.1.ip()) {
            (IpAddr::V4(guest), IpAddr::V4(dst)) => tcp::connect_error_reply(e).map(|code| {
                let h = header(&mut self.stack);
                let quote = f.syn_quote();
                self.tap
                    .tx()
                    .build(|buf| emit::dst_unreachable(buf, &h, dst, guest, code, quote))
            }),
            (IpAddr::V6(guest), IpAddr::V6(_)) => tcp::connect_error_reply6(e)
                .zip(self.stack.addrs.v6)
                .map(|(code, v6)| {
                    let h = header(&mut self.stack);
                    let quote = f.syn_quote();
                    self.tap.tx().build(|buf| {
                        emit::dst_unreachable6(buf, &h, v6.gateway, guest, code, quote)
                    })
                }),
            _ => None,
        };
        if reply.is_none() {
            f.abort_guest();
        }
        reply.is_some()
    }
}
