//! Live status: what `rnet status` and the control socket's `get_status`
//! report, and its renderings (a terminal table and the Prometheus text
//! exposition format).
//!
//! The event loop builds the report as JSON (flows by protocol and TCP
//! state, TAP frames and bytes each way, drops by reason, published ports
//! with their path and open connections, uptime); everything here only
//! formats that value, so the CLI, scripts and monitoring read the same
//! numbers.

use std::fmt::Write as _;

use serde_json::Value;

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// A human-readable view of a status report.
pub fn render_text(s: &Value) -> String {
    let mut o = String::new();
    let tap = &s["tap"];
    let _ = writeln!(
        o,
        "uptime        {:.0} s",
        s["uptime_secs"].as_f64().unwrap_or(0.0)
    );
    if let Some(r) = s["restarts"].as_u64().filter(|r| *r > 0) {
        let _ = writeln!(o, "restarts      {r} (data plane)");
    }
    let _ = writeln!(
        o,
        "tap           in {} frames / {} bytes, out {} frames / {} bytes{}",
        n(&tap["frames_in"]),
        n(&tap["bytes_in"]),
        n(&tap["frames_out"]),
        n(&tap["bytes_out"]),
        match tap["offloads"].as_bool() {
            Some(true) => " (offloads: TSO, checksum)",
            Some(false) => " (no offloads)",
            None => "",
        }
    );
    let f = &s["flows"];
    let tcp: Vec<String> = f["tcp"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {}", n(v))).collect())
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "flows         tcp [{}], spliced {}, udp {}, icmp {}, dns {}",
        tcp.join(", "),
        n(&f["tcp_spliced"]),
        n(&f["udp"]),
        n(&f["icmp"]),
        n(&f["dns"])
    );
    let sb = &s["spliced_bytes"];
    let _ = writeln!(
        o,
        "spliced       to guest {} bytes, from guest {} bytes",
        n(&sb["to_guest"]),
        n(&sb["from_guest"])
    );
    let drops: Vec<String> = s["drops"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| n(v) > 0)
                .map(|(k, v)| format!("{k} {}", n(v)))
                .collect()
        })
        .unwrap_or_default();
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
    for p in s["ports"].as_array().into_iter().flatten() {
        let range = |first: u64| {
            let c = n(&p["count"]).max(1);
            if c > 1 {
                format!("{first}-{}", first + c - 1)
            } else {
                first.to_string()
            }
        };
        let host = format!(
            "{}:{}",
            p["host_addr"].as_str().unwrap_or("?"),
            range(n(&p["host_port"]))
        );
        let guest = format!(
            "{}:{}",
            p["guest_addr"].as_str().unwrap_or("?"),
            range(n(&p["guest_port"]))
        );
        let _ = writeln!(
            o,
            "{:<5} {:<5} {:<24} {:<24} {:<6} {}",
            n(&p["id"]),
            p["proto"].as_str().unwrap_or("?"),
            host,
            guest,
            p["path"].as_str().unwrap_or("?"),
            n(&p["connections"])
        );
    }
    o
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The report in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus(s: &Value) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(o, "{name} {v}");
            } else {
                let _ = writeln!(o, "{name}{{{labels}}} {v}");
            }
        }
    };
    metric(
        "rnet_uptime_seconds",
        "gauge",
        "Seconds since the network started.",
        vec![(String::new(), s["uptime_secs"].as_f64().unwrap_or(0.0))],
    );
    let tap = &s["tap"];
    metric(
        "rnet_tap_frames_total",
        "counter",
        "Frames read from (in) and written to (out) the TAP.",
        vec![
            ("direction=\"in\"".into(), n(&tap["frames_in"]) as f64),
            ("direction=\"out\"".into(), n(&tap["frames_out"]) as f64),
        ],
    );
    metric(
        "rnet_tap_bytes_total",
        "counter",
        "Bytes read from (in) and written to (out) the TAP.",
        vec![
            ("direction=\"in\"".into(), n(&tap["bytes_in"]) as f64),
            ("direction=\"out\"".into(), n(&tap["bytes_out"]) as f64),
        ],
    );
    let sb = &s["spliced_bytes"];
    metric(
        "rnet_spliced_bytes_total",
        "counter",
        "Bytes moved by fast-path published connections.",
        vec![
            ("direction=\"to_guest\"".into(), n(&sb["to_guest"]) as f64),
            (
                "direction=\"from_guest\"".into(),
                n(&sb["from_guest"]) as f64,
            ),
        ],
    );
    let f = &s["flows"];
    let mut flows: Vec<(String, f64)> = f["tcp"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (format!("proto=\"tcp\",state=\"{}\"", label(k)), n(v) as f64))
                .collect()
        })
        .unwrap_or_default();
    flows.push((
        "proto=\"tcp\",state=\"spliced\"".into(),
        n(&f["tcp_spliced"]) as f64,
    ));
    for p in ["udp", "icmp", "dns"] {
        flows.push((format!("proto=\"{p}\",state=\"open\""), n(&f[p]) as f64));
    }
    metric(
        "rnet_flows",
        "gauge",
        "Open flows by protocol and state.",
        flows,
    );
    metric(
        "rnet_tcp_opened_total",
        "counter",
        "TCP flows opened since start.",
        vec![(String::new(), n(&s["tcp_opened"]) as f64)],
    );
    let drops: Vec<(String, f64)> = s["drops"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (format!("reason=\"{}\"", label(k)), n(v) as f64))
                .collect()
        })
        .unwrap_or_default();
    metric(
        "rnet_drops_total",
        "counter",
        "Frames or flows dropped, by reason.",
        drops,
    );
    let ports: Vec<(String, f64)> = s["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                format!(
                    "id=\"{}\",proto=\"{}\",host_port=\"{}\",guest_port=\"{}\",path=\"{}\"",
                    n(&p["id"]),
                    label(p["proto"].as_str().unwrap_or("")),
                    n(&p["host_port"]),
                    n(&p["guest_port"]),
                    label(p["path"].as_str().unwrap_or(""))
                ),
                n(&p["connections"]) as f64,
            )
        })
        .collect();
    metric(
        "rnet_port_connections",
        "gauge",
        "Open connections per published port rule.",
        ports,
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "uptime_secs": 12.5,
            "tap": {"frames_in": 10, "bytes_in": 1000, "frames_out": 9, "bytes_out": 900,
                    "offloads": true},
            "flows": {"tcp": {"ESTABLISHED": 2}, "tcp_spliced": 1, "udp": 3, "icmp": 0, "dns": 0},
            "tcp_opened": 7,
            "spliced_bytes": {"to_guest": 5, "from_guest": 6},
            "drops": {"malformed": 1, "policy": 0},
            "ports": [{"id": 1, "proto": "tcp", "host_addr": "0.0.0.0", "host_port": 8080,
                       "guest_addr": "10.0.2.100", "guest_port": 80, "count": 1, "path": "fast", "connections": 1}]
        })
    }

    #[test]
    fn prometheus_lines_are_well_formed() {
        let text = render_prometheus(&sample());
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
        let t = render_text(&sample());
        assert!(t.contains("0.0.0.0:8080") && t.contains("fast"));
        assert!(t.contains("(offloads: TSO, checksum)"), "{t}");
    }
}
