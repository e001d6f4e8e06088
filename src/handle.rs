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
