//! `rnet port add|ls|rm`: a client of a running rnet's control socket.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use rnet::PortSpec;
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct PortArgs {
    /// The control socket of the running rnet (its --api-socket).
    #[arg(long, value_name = "PATH", global = true)]
    api_socket: Option<PathBuf>,
    /// Print the raw JSON reply instead of a table or message.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Publish a port: [HOST_IP:]HOST_PORT:[GUEST_IP:]GUEST_PORT[/tcp|/udp]
    /// (IPv6 addresses in brackets: [::1]:8080:[fd00::100]:80).
    /// HOST_PORT 0 lets the kernel choose a free port, which is printed.
    Add {
        /// The port spec (as for -p; one port or a range).
        spec: PortSpec,
    },
    /// List published ports.
    #[command(alias = "list")]
    Ls,
    /// Withdraw a published port by id (its listener closes; established
    /// connections continue until they end).
    #[command(alias = "remove")]
    Rm {
        /// The id shown by `rnet port ls` or `add`.
        id: u64,
    },
}

/// Runs the subcommand; the exit code is 0 on success.
pub fn run(args: PortArgs) -> Result<u8, String> {
    let path = args
        .api_socket
        .ok_or("--api-socket PATH is required: the control socket the running rnet serves")?;
    let call = |req: Value| -> Result<Value, String> {
        let reply = rnet::ports::api::call(&path, &req).map_err(|e| e.to_string())?;
        if let Some(err) = reply.get("error") {
            if args.json {
                println!("{reply}");
            }
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or("error");
            return Err(match err.get("detail").and_then(Value::as_str) {
                Some(d) => format!("{desc} ({d})"),
                None => desc.to_string(),
            });
        }
        Ok(reply)
    };
    match args.action {
        Action::Add { spec } => {
            let mut ids = Vec::new();
            for i in 0..spec.count {
                let host_port = if spec.host_port == 0 {
                    0
                } else {
                    spec.host_port + i
                };
                let mut a = json!({
                    "proto": spec.proto.as_str(),
                    "host_addr": spec.host_ip.to_string(),
                    "host_port": host_port,
                    "guest_port": spec.guest_port + i,
                });
                if let Some(g) = spec.guest_ip {
                    a["guest_addr"] = Value::String(g.to_string());
                }
                let reply = call(json!({"execute": "add_hostfwd", "arguments": a}))?;
                if args.json {
                    println!("{reply}");
                }
                let id = reply["return"]["id"].as_u64().unwrap_or(0);
                let hp = reply["return"]["host_port"]
                    .as_u64()
                    .unwrap_or(host_port as u64);
                ids.push((id, hp));
            }
            if !args.json {
                for (id, hp) in ids {
                    println!("id {id}: host port {hp} published");
                }
            }
        }
        Action::Ls => {
            let reply = call(json!({"execute": "list_hostfwd"}))?;
            if args.json {
                println!("{reply}");
                return Ok(0);
            }
            println!(
                "{:<5} {:<5} {:<22} {:<22} PATH",
                "ID", "PROTO", "HOST", "GUEST"
            );
            // slirp4netns's shape, `entries` at the top level; an
            // older rnet put it under `return`.
            let entries = reply
                .get("entries")
                .or_else(|| reply.get("return").and_then(|r| r.get("entries")));
            for e in entries.and_then(Value::as_array).into_iter().flatten() {
                let host = endpoint(&e["host_addr"], &e["host_port"]);
                let guest = endpoint(&e["guest_addr"], &e["guest_port"]);
                println!(
                    "{:<5} {:<5} {:<22} {:<22} {}",
                    e["id"].to_string(),
                    e["proto"].as_str().unwrap_or("?"),
                    host,
                    guest,
                    e["path"].as_str().unwrap_or("-")
                );
            }
        }
        Action::Rm { id } => {
            let reply = call(json!({"execute": "remove_hostfwd", "arguments": {"id": id}}))?;
            if args.json {
                println!("{reply}");
            } else {
                println!("id {id} removed");
            }
        }
    }
    Ok(0)
}

fn endpoint(addr: &Value, port: &Value) -> String {
    let a = addr.as_str().unwrap_or("?");
    if a.contains(':') {
        format!("[{a}]:{port}")
    } else {
        format!("{a}:{port}")
    }
}
