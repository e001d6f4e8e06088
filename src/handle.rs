//! [`Handle`]: the cheap, cloneable way to talk to a running network from
//! any thread (stop it, read its counters and status, publish and withdraw
//! ports). Requests travel to the event loop over a bounded channel: when
//! [`COMMAND_QUEUE`] requests are already waiting, a new one fails with
//! [`PortError::Busy`] at once instead of queueing without limit; the loop
//! itself never blocks on it.

use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use crate::engine::{self, Control};
use crate::ports::{PortError, PortInfo, PortSpec};
use crate::stats::{Stats, StatsSnapshot};
use crate::status::StatusReport;
use crate::supervise;

/// How many requests may wait for the event loop at once. The loop drains
/// them all each time it is woken, so only a flood from many threads (or a
/// loop stuck for seconds) reaches it.
pub const COMMAND_QUEUE: usize = 64;

/// A cheap, cloneable handle to a running network.
#[derive(Clone)]
pub struct Handle {
    control: Arc<Control>,
    stats: Arc<Stats>,
}

impl Handle {
    pub(crate) fn new(control: Arc<Control>, stats: Arc<Stats>) -> Handle {
        Handle { control, stats }
    }

    /// Asks the network to stop; [`Network::wait`](crate::Network::wait) then returns
    /// [`ExitReason::Stopped`](crate::ExitReason::Stopped). Safe to call from any thread, repeatedly.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// Whether the event loop is still running.
    pub fn is_running(&self) -> bool {
        !self.control.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Publishes a port while running. With host port 0 the kernel picks a
    /// free port, which the returned [`PortInfo`] shows.
    pub fn add_port(&self, spec: PortSpec) -> Result<PortInfo, PortError> {
        self.ask(|tx| engine::Command::AddPort(spec, tx))?
    }

    /// Withdraws a published port by id. Its listeners close; connections
    /// already established continue until they end.
    pub fn remove_port(&self, id: u64) -> Result<(), PortError> {
        self.ask(|tx| engine::Command::RemovePort(id, tx))?
    }

    /// The published ports.
    pub fn ports(&self) -> Result<Vec<PortInfo>, PortError> {
        self.ask(engine::Command::ListPorts)
    }

    /// A live status report (flows, counters, drops, ports); it renders
    /// itself as JSON, text or Prometheus.
    pub fn status(&self) -> Result<StatusReport, PortError> {
        self.ask(engine::Command::Status)
    }

    /// Like [`Handle::status`], giving the event loop at most `limit` to
    /// answer (the metrics endpoint's scrape deadline).
    pub fn status_within(&self, limit: Duration) -> Result<StatusReport, PortError> {
        self.ask_within(engine::Command::Status, limit)
    }

    /// How many times the supervisor restarted the data plane (see
    /// `rnet::supervise`); 0 without supervision.
    pub fn restarts(&self) -> u64 {
        supervise::restarts()
    }

    fn ask<T>(&self, cmd: impl FnOnce(SyncSender<T>) -> engine::Command) -> Result<T, PortError> {
        self.ask_within(cmd, Duration::from_secs(10))
    }

    fn ask_within<T>(
        &self,
        cmd: impl FnOnce(SyncSender<T>) -> engine::Command,
        limit: Duration,
    ) -> Result<T, PortError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.control.send(cmd(tx))?;
        rx.recv_timeout(limit).map_err(|_| PortError::Stopped)
    }
}

/// The control socket and `--publish-auto` drive a network through this
/// narrow interface, not through the handle itself.
impl crate::ports::PortControl for Handle {
    fn add_port(&self, spec: PortSpec) -> Result<PortInfo, PortError> {
        Handle::add_port(self, spec)
    }
    fn remove_port(&self, id: u64) -> Result<(), PortError> {
        Handle::remove_port(self, id)
    }
    fn ports(&self) -> Result<Vec<PortInfo>, PortError> {
        Handle::ports(self)
    }
    fn status(&self) -> Result<serde_json::Value, PortError> {
        Handle::status(self).map(|r| r.to_json())
    }
    fn is_running(&self) -> bool {
        Handle::is_running(self)
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::unix::net::UnixDatagram;

    use super::*;
    use crate::config::{Config, OutboundPolicy};
    use crate::engine::{Command, Engine};
    use crate::phy::tap::Tap;

    /// A handle whose engine is built but whose loop never runs, so no
    /// request is ever taken off the queue. The engine, the guest's end of
    /// its socket pair and the (silent) DNS upstream are kept alive.
    fn idle_handle() -> (Handle, Engine, UnixDatagram, UdpSocket) {
        let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = dns.local_addr().unwrap();
        let cfg = Config::builder()
            .outbound(OutboundPolicy::Only(vec![]))
            .dns_upstreams(vec![upstream])
            .build()
            .expect("test config");
        let (guest, tap) = UnixDatagram::pair().unwrap();
        let tap = Tap::new(tap.into()).unwrap();
        let (engine, control, stats) =
            Engine::new(Arc::new(cfg), tap, None, vec![upstream]).unwrap();
        (Handle::new(control, stats), engine, guest, dns)
    }

    #[test]
    fn a_full_command_queue_refuses_at_once_with_busy() {
        let (handle, engine, _guest, _dns) = idle_handle();
        // Fill the queue; each request keeps its reply channel open, as a
        // caller waiting for an answer would.
        let mut replies = Vec::new();
        for i in 0..COMMAND_QUEUE {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let queued = handle.control.send(Command::ListPorts(tx));
            assert!(
                queued.is_ok(),
                "request {i} of {COMMAND_QUEUE} refused: {queued:?}"
            );
            replies.push(rx);
        }
        // The next request of any kind is refused without waiting for the
        // loop (which would answer Stopped only after its deadline).
        assert!(matches!(handle.ports(), Err(PortError::Busy)));
        assert!(matches!(
            handle.status_within(Duration::from_secs(3600)),
            Err(PortError::Busy)
        ));
        assert!(matches!(handle.remove_port(1), Err(PortError::Busy)));
        // Nothing was answered: the queued requests are still waiting.
        assert!(replies.iter().all(|rx| rx.try_recv().is_err()));
        assert!(handle.is_running());
        // Once the loop is gone, a request says so instead of Busy.
        drop(engine);
        assert!(matches!(handle.ports(), Err(PortError::Stopped)));
    }
}
