//! Live status: [`StatusReport`], what `rnet status` and the control
//! socket's `get_status` report, and its renderings (JSON, a terminal
//! table and the Prometheus text exposition format).
//!
//! The event loop fills a [`StatusReport`] (flows by protocol and TCP
//! state, TAP frames and bytes each way, drops by reason, published ports
//! with their path and open connections, uptime); every rendering here
//! reads that one struct, so the CLI, scripts and monitoring see the same
//! numbers. [`StatusReport::to_json`] is the wire form (the control socket
//! sends it, `rnet status --json` prints it) and
//! [`StatusReport::from_json`] reads it back on the client side.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde_json::{Map, Value, json};

use crate::nat::udpio::Counters as UdpIo;

/// What the batched UDP paths did (the report's `udp_io`).
pub use crate::nat::udpio::Counters as UdpIoCounters;
use crate::ports::Proto;

/// A live status report of one network.
///
/// Its JSON form (see [`StatusReport::to_json`]) is versioned by
/// [`StatusReport::VERSION`]: within a version keys are only added, never
/// renamed, removed or given another meaning.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusReport {
    /// Seconds since the network started (`uptime_secs`).
    pub uptime_secs: f64,
    /// The TAP's traffic and offloads (`tap`).
    pub tap: TapStatus,
    /// What the batched UDP paths did (`udp_io`).
    pub udp_io: UdpIoCounters,
    /// Open flows (`flows`).
    pub flows: FlowCounts,
    /// TCP flows opened since start (`tcp_opened`).
    pub tcp_opened: u64,
    /// The TCP buffer budget (`tcp_memory`).
    pub tcp_memory: TcpMemory,
    /// Bytes moved by spliced (fast-path) connections (`spliced_bytes`).
    pub spliced_bytes: SplicedBytes,
    /// Drops by reason name (`drops`).
    pub drops: BTreeMap<String, u64>,
    /// The published port rules (`ports`).
    pub ports: Vec<PortStatus>,
    /// The fast-path namespace agent (`agent`).
    pub agent: AgentStatus,
    /// Data-plane restarts by the supervisor (`restarts`).
    pub restarts: u64,
}

/// The TAP's side of a [`StatusReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapStatus {
    /// Frames read from the TAP.
    pub frames_in: u64,
    /// Bytes read from the TAP.
    pub bytes_in: u64,
    /// Frames written to the TAP.
    pub frames_out: u64,
    /// Bytes written to the TAP.
    pub bytes_out: u64,
    /// Whether the TAP carries the virtio-net header (TSO, checksum).
    pub offloads: bool,
    /// Whether UDP segmentation offload is on.
    pub uso: bool,
    /// Whether the TAP takes UDP-tunnel GSO (a guest VXLAN device's
    /// encapsulated TCP super-frames).
    pub udp_tunnel_gso: bool,
    /// Tunnel super-frames read from the TAP.
    pub tunnel_frames_in: u64,
}

/// Open flows by protocol (and, for TCP, by state).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// Stack-path TCP flows by smoltcp state name (`ESTABLISHED`, ...).
    pub tcp: BTreeMap<String, u64>,
    /// Spliced (fast-path) TCP connections.
    pub tcp_spliced: u64,
    /// UDP flows.
    pub udp: u64,
    /// ICMP echo flows.
    pub icmp: u64,
    /// DNS queries in flight.
    pub dns: u64,
    /// Remote clients of published UDP ports.
    pub udp_clients: u64,
}

/// The TCP buffer budget and what it did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpMemory {
    /// The budget in bytes.
    pub budget: u64,
    /// Bytes resident now.
    pub resident: u64,
    /// The most ever resident.
    pub peak: u64,
    /// Flows paused for memory now.
    pub paused_flows: u64,
    /// Pauses since start.
    pub pauses: u64,
    /// Resumes since start.
    pub resumes: u64,
    /// Guest segments whose data was deferred.
    pub guest_data_deferred: u64,
}

/// Bytes moved by spliced connections, both ways.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplicedBytes {
    /// From the host side to the guest.
    pub to_guest: u64,
    /// From the guest to the host side.
    pub from_guest: u64,
}

/// One published port rule as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortStatus {
    /// The rule's id.
    pub id: u64,
    /// TCP or UDP.
    pub proto: Proto,
    /// The host address listened on.
    pub host_addr: IpAddr,
    /// The first host port.
    pub host_port: u16,
    /// The guest address forwarded to.
    pub guest_addr: IpAddr,
    /// The first guest port.
    pub guest_port: u16,
    /// How many consecutive ports the rule covers.
    pub count: u16,
    /// Which forwarding path carries it (`fast`, `stack`, ...).
    pub path: String,
    /// Connections open through it.
    pub connections: u64,
}

/// The fast-path namespace agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// `off`, `starting`, `ready` or `restarting`.
    pub state: String,
    /// Its process id while one runs.
    pub pid: Option<i32>,
    /// How many times it was restarted.
    pub restarts: u64,
    /// Requests waiting for its answer.
    pub outstanding: u64,
}

impl Default for AgentStatus {
    fn default() -> Self {
        AgentStatus {
            state: "off".into(),
            pid: None,
            restarts: 0,
            outstanding: 0,
        }
    }
}

/// Why a JSON value is not a status report.
#[derive(Debug, thiserror::Error)]
#[error("malformed status report: {0}")]
pub struct ReportError(String);

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), n(v))).collect())
        .unwrap_or_default()
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, ReportError> {
    v[key]
        .as_str()
        .ok_or_else(|| ReportError(format!("`{key}` is not a string")))
}

fn parsed<T: std::str::FromStr>(v: &Value, key: &str) -> Result<T, ReportError> {
    text(v, key)?
        .parse()
        .map_err(|_| ReportError(format!("`{key}` is not valid")))
}

fn port_number(v: &Value, key: &str) -> Result<u16, ReportError> {
    u16::try_from(n(&v[key])).map_err(|_| ReportError(format!("`{key}` is not a port")))
}

impl StatusReport {
    /// The version of the JSON form's keys and their meaning.
    pub const VERSION: u32 = 1;

    /// The report as JSON, the form `get_status` and `rnet status --json`
    /// give.
    pub fn to_json(&self) -> Value {
        let ports: Vec<Value> = self.ports.iter().map(PortStatus::to_json).collect();
        let drops: Map<String, Value> = self
            .drops
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let (t, f, m) = (&self.tap, &self.flows, &self.tcp_memory);
        json!({
            "uptime_secs": self.uptime_secs,
            "tap": {
                "frames_in": t.frames_in,
                "bytes_in": t.bytes_in,
                "frames_out": t.frames_out,
                "bytes_out": t.bytes_out,
                "offloads": t.offloads,
                "uso": t.uso,
                "udp_tunnel_gso": t.udp_tunnel_gso,
                "tunnel_frames_in": t.tunnel_frames_in,
            },
            "udp_io": self.udp_io.json(),
            "flows": {
                "tcp": f.tcp,
                "tcp_spliced": f.tcp_spliced,
                "udp": f.udp,
                "icmp": f.icmp,
                "dns": f.dns,
                "udp_clients": f.udp_clients,
            },
            "tcp_opened": self.tcp_opened,
            "tcp_memory": {
                "budget": m.budget,
                "resident": m.resident,
                "peak": m.peak,
                "paused_flows": m.paused_flows,
                "pauses": m.pauses,
                "resumes": m.resumes,
                "guest_data_deferred": m.guest_data_deferred,
            },
            "spliced_bytes": {
                "to_guest": self.spliced_bytes.to_guest,
                "from_guest": self.spliced_bytes.from_guest,
            },
            "drops": drops,
            "ports": ports,
            "agent": {
                "state": self.agent.state,
                "pid": self.agent.pid,
                "restarts": self.agent.restarts,
                "outstanding": self.agent.outstanding,
            },
            "restarts": self.restarts,
        })
    }

    /// Reads a report back from [`StatusReport::to_json`]'s form. Missing
    /// counters read as 0; a port rule with a missing or invalid address,
    /// protocol or port is an error.
    pub fn from_json(v: &Value) -> Result<StatusReport, ReportError> {
        if !v.is_object() {
            return Err(ReportError("not a JSON object".into()));
        }
        let (t, f, m, u, a) = (
            &v["tap"],
            &v["flows"],
            &v["tcp_memory"],
            &v["udp_io"],
            &v["agent"],
        );
        let ports = match &v["ports"] {
            Value::Null => Vec::new(),
            Value::Array(list) => list
                .iter()
                .map(PortStatus::from_json)
                .collect::<Result<_, _>>()?,
            _ => return Err(ReportError("`ports` is not a list".into())),
        };
        Ok(StatusReport {
            uptime_secs: v["uptime_secs"].as_f64().unwrap_or(0.0),
            tap: TapStatus {
                frames_in: n(&t["frames_in"]),
                bytes_in: n(&t["bytes_in"]),
                frames_out: n(&t["frames_out"]),
                bytes_out: n(&t["bytes_out"]),
                offloads: t["offloads"].as_bool().unwrap_or(false),
                uso: t["uso"].as_bool().unwrap_or(false),
                udp_tunnel_gso: t["udp_tunnel_gso"].as_bool().unwrap_or(false),
                tunnel_frames_in: n(&t["tunnel_frames_in"]),
            },
            udp_io: UdpIo {
                sends: n(&u["sends"]),
                gso_sends: n(&u["gso_sends"]),
                datagrams_out: n(&u["datagrams_out"]),
                uso_in: n(&u["uso_in"]),
                uso_in_bad: n(&u["uso_in_bad"]),
                recv_calls: n(&u["recv_calls"]),
                datagrams_in: n(&u["datagrams_in"]),
                uso_out: n(&u["uso_out"]),
                uso_out_datagrams: n(&u["uso_out_datagrams"]),
            },
            flows: FlowCounts {
                tcp: counts(&f["tcp"]),
                tcp_spliced: n(&f["tcp_spliced"]),
                udp: n(&f["udp"]),
                icmp: n(&f["icmp"]),
                dns: n(&f["dns"]),
                udp_clients: n(&f["udp_clients"]),
            },
            tcp_opened: n(&v["tcp_opened"]),
            tcp_memory: TcpMemory {
                budget: n(&m["budget"]),
                resident: n(&m["resident"]),
                peak: n(&m["peak"]),
                paused_flows: n(&m["paused_flows"]),
                pauses: n(&m["pauses"]),
                resumes: n(&m["resumes"]),
                guest_data_deferred: n(&m["guest_data_deferred"]),
            },
            spliced_bytes: SplicedBytes {
                to_guest: n(&v["spliced_bytes"]["to_guest"]),
                from_guest: n(&v["spliced_bytes"]["from_guest"]),
            },
            drops: counts(&v["drops"]),
            ports,
            agent: AgentStatus {
                state: a["state"].as_str().unwrap_or("off").to_string(),
                pid: a["pid"].as_i64().and_then(|p| i32::try_from(p).ok()),
                restarts: n(&a["restarts"]),
                outstanding: n(&a["outstanding"]),
            },
            restarts: n(&v["restarts"]),
        })
    }
}

impl PortStatus {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "proto": self.proto.as_str(),
            "host_addr": self.host_addr.to_string(),
            "host_port": self.host_port,
            "guest_addr": self.guest_addr.to_string(),
            "guest_port": self.guest_port,
            "count": self.count,
            "path": self.path,
            "connections": self.connections,
        })
    }

    fn from_json(p: &Value) -> Result<PortStatus, ReportError> {
        Ok(PortStatus {
            id: n(&p["id"]),
            proto: parsed(p, "proto")?,
            host_addr: parsed(p, "host_addr")?,
            host_port: port_number(p, "host_port")?,
            guest_addr: parsed(p, "guest_addr")?,
            guest_port: port_number(p, "guest_port")?,
            count: port_number(p, "count")?,
            path: text(p, "path")?.to_string(),
            connections: n(&p["connections"]),
        })
    }

    /// `first` or `first-last` over the rule's port count.
    fn range(&self, first: u16) -> String {
        let c = u32::from(self.count.max(1));
        if c > 1 {
            format!("{first}-{}", u32::from(first) + c - 1)
        } else {
            first.to_string()
        }
    }
}

/// One Prometheus metric family: its samples as (labels, value).
type Samples = Vec<(String, f64)>;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

fn family(o: &mut String, name: &str, kind: &str, help: &str, samples: Samples) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(o, "{name} {v}");
        } else {
            let _ = writeln!(o, "{name}{{{labels}}} {v}");
        }
    }
}

fn directions(pairs: [(&str, u64); 2]) -> Samples {
    pairs
        .iter()
        .map(|(d, v)| (format!("direction=\"{d}\""), *v as f64))
        .collect()
}

impl StatusReport {
    /// A human-readable view of the report.
    pub fn render_text(&self) -> String {
        let mut o = String::new();
        let (tap, f, sb) = (&self.tap, &self.flows, &self.spliced_bytes);
        let _ = writeln!(o, "uptime        {:.0} s", self.uptime_secs);
        if self.restarts > 0 {
            let _ = writeln!(o, "restarts      {} (data plane)", self.restarts);
        }
        let _ = writeln!(
            o,
            "tap           in {} frames / {} bytes, out {} frames / {} bytes{}",
            tap.frames_in,
            tap.bytes_in,
            tap.frames_out,
            tap.bytes_out,
            match tap.offloads {
                true => " (offloads: TSO, checksum)",
                false => " (no offloads)",
            }
        );
        let tcp: Vec<String> = f.tcp.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            o,
            "flows         tcp [{}], spliced {}, udp {}, icmp {}, dns {}",
            tcp.join(", "),
            f.tcp_spliced,
            f.udp,
            f.icmp,
            f.dns
        );
        let _ = writeln!(
            o,
            "spliced       to guest {} bytes, from guest {} bytes",
            sb.to_guest, sb.from_guest
        );
        let drops: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            o,
            "drops         {}",
            if drops.is_empty() {
                "none".into()
            } else {
                drops.join(", ")
            }
        );
        let _ = writeln!(
            o,
            "\n{:<5} {:<5} {:<24} {:<24} {:<6} CONNS",
            "ID", "PROTO", "HOST", "GUEST", "PATH"
        );
        for p in &self.ports {
            let host = format!("{}:{}", p.host_addr, p.range(p.host_port));
            let guest = format!("{}:{}", p.guest_addr, p.range(p.guest_port));
            let _ = writeln!(
                o,
                "{:<5} {:<5} {:<24} {:<24} {:<6} {}",
                p.id,
                p.proto.as_str(),
                host,
                guest,
                p.path,
                p.connections
            );
        }
        o
    }

    /// The report in the Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut o = String::new();
        let (tap, sb) = (&self.tap, &self.spliced_bytes);
        family(
            &mut o,
            "rnet_uptime_seconds",
            "gauge",
            "Seconds since the network started.",
            vec![(String::new(), self.uptime_secs)],
        );
        family(
            &mut o,
            "rnet_tap_frames_total",
            "counter",
            "Frames read from (in) and written to (out) the TAP.",
            directions([("in", tap.frames_in), ("out", tap.frames_out)]),
        );
        family(
            &mut o,
            "rnet_tap_bytes_total",
            "counter",
            "Bytes read from (in) and written to (out) the TAP.",
            directions([("in", tap.bytes_in), ("out", tap.bytes_out)]),
        );
        family(
            &mut o,
            "rnet_spliced_bytes_total",
            "counter",
            "Bytes moved by fast-path published connections.",
            directions([("to_guest", sb.to_guest), ("from_guest", sb.from_guest)]),
        );
        family(
            &mut o,
            "rnet_flows",
            "gauge",
            "Open flows by protocol and state.",
            self.flow_samples(),
        );
        family(
            &mut o,
            "rnet_tcp_opened_total",
            "counter",
            "TCP flows opened since start.",
            vec![(String::new(), self.tcp_opened as f64)],
        );
        let drops = self.drops.iter();
        family(
            &mut o,
            "rnet_drops_total",
            "counter",
            "Frames or flows dropped, by reason.",
            drops
                .map(|(k, v)| (format!("reason=\"{}\"", label(k)), *v as f64))
                .collect(),
        );
        family(
            &mut o,
            "rnet_port_connections",
            "gauge",
            "Open connections per published port rule.",
            self.ports.iter().map(PortStatus::sample).collect(),
        );
        o
    }

    fn flow_samples(&self) -> Samples {
        let f = &self.flows;
        let mut flows: Samples = f
            .tcp
            .iter()
            .map(|(k, v)| (format!("proto=\"tcp\",state=\"{}\"", label(k)), *v as f64))
            .collect();
        flows.push((
            "proto=\"tcp\",state=\"spliced\"".into(),
            f.tcp_spliced as f64,
        ));
        for (p, v) in [("udp", f.udp), ("icmp", f.icmp), ("dns", f.dns)] {
            flows.push((format!("proto=\"{p}\",state=\"open\""), v as f64));
        }
        flows
    }
}

impl PortStatus {
    fn sample(&self) -> (String, f64) {
        (
            format!(
                "id=\"{}\",proto=\"{}\",host_port=\"{}\",guest_port=\"{}\",path=\"{}\"",
                self.id,
                label(self.proto.as_str()),
                self.host_port,
                self.guest_port,
                label(&self.path)
            ),
            self.connections as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StatusReport {
        let v = json!({
            "uptime_secs": 12.5,
            "tap": {"frames_in": 10, "bytes_in": 1000, "frames_out": 9, "bytes_out": 900,
                    "offloads": true},
            "flows": {"tcp": {"ESTABLISHED": 2}, "tcp_spliced": 1, "udp": 3, "icmp": 0, "dns": 0},
            "tcp_opened": 7,
            "spliced_bytes": {"to_guest": 5, "from_guest": 6},
            "drops": {"malformed": 1, "policy": 0},
            "ports": [{"id": 1, "proto": "tcp", "host_addr": "0.0.0.0", "host_port": 8080,
                       "guest_addr": "10.0.2.100", "guest_port": 80, "count": 1, "path": "fast", "connections": 1}]
        });
        StatusReport::from_json(&v).expect("a report")
    }

    #[test]
    fn prometheus_lines_are_well_formed() {
        let text = sample().render_prometheus();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name_labels, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(name_labels.starts_with("rnet_"), "{line}");
        }
        assert!(text.contains("rnet_flows{proto=\"tcp\",state=\"ESTABLISHED\"} 2"));
        assert!(text.contains("rnet_drops_total{reason=\"malformed\"} 1"));
    }

    #[test]
    fn text_has_ports() {
        let t = sample().render_text();
        assert!(t.contains("0.0.0.0:8080") && t.contains("fast"));
        assert!(t.contains("(offloads: TSO, checksum)"), "{t}");
    }

    #[test]
    fn json_round_trips() {
        let mut r = sample();
        r.agent.pid = Some(42);
        r.ports[0].count = 3;
        let back = StatusReport::from_json(&r.to_json()).expect("a report");
        assert_eq!(back, r);
        assert_eq!(r.to_json()["ports"][0]["count"], 3);
        assert!(back.render_text().contains("0.0.0.0:8080-8082"));
    }

    /// Every key the engine writes, each with its own value: reading it
    /// back and writing it again gives the same JSON, so the two key lists
    /// agree.
    #[test]
    fn every_key_round_trips() {
        let v = json!({
            "uptime_secs": 1.5,
            "tap": {"frames_in": 1, "bytes_in": 2, "frames_out": 3, "bytes_out": 4,
                    "offloads": true, "uso": true, "udp_tunnel_gso": true,
                    "tunnel_frames_in": 40},
            "udp_io": {"sends": 5, "gso_sends": 6, "datagrams_out": 7, "uso_in": 8,
                       "uso_in_bad": 9, "recv_calls": 10, "datagrams_in": 11, "uso_out": 12,
                       "uso_out_datagrams": 13},
            "flows": {"tcp": {"ESTABLISHED": 14, "SYN-RECEIVED": 15}, "tcp_spliced": 16,
                      "udp": 17, "icmp": 18, "dns": 19, "udp_clients": 20},
            "tcp_opened": 21,
            "tcp_memory": {"budget": 22, "resident": 23, "peak": 24, "paused_flows": 25,
                           "pauses": 26, "resumes": 27, "guest_data_deferred": 28},
            "spliced_bytes": {"to_guest": 29, "from_guest": 30},
            "drops": {"malformed": 31, "policy": 0},
            "ports": [{"id": 32, "proto": "udp", "host_addr": "::1", "host_port": 33,
                       "guest_addr": "fd00::2", "guest_port": 34, "count": 35, "path": "stack",
                       "connections": 36}],
            "agent": {"state": "ready", "pid": 37, "restarts": 38, "outstanding": 39},
            "restarts": 40,
        });
        let r = StatusReport::from_json(&v).expect("a report");
        assert_eq!(r.to_json(), v);
        let mut off = v.clone();
        off["agent"]["pid"] = Value::Null;
        assert_eq!(
            StatusReport::from_json(&off).expect("a report").to_json(),
            off
        );
    }

    #[test]
    fn bad_ports_are_errors() {
        let mut v = sample().to_json();
        v["ports"][0]["host_addr"] = json!("nowhere");
        assert!(StatusReport::from_json(&v).is_err());
        assert!(StatusReport::from_json(&json!([])).is_err());
    }
}
