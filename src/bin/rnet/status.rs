//! `rnet status`: the live status of a running rnet, read through its
//! control socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use rnet::StatusReport;
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The control socket of the running rnet (its --api-socket).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the report as JSON.
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// Print the report in the Prometheus text format (for node monitoring).
    #[arg(long)]
    prometheus: bool,
    /// Refresh the view every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
}

fn fetch(path: &Path) -> Result<Value, String> {
    let reply = rnet::ports::api::call(path, &json!({"execute": "get_status"}))
        .map_err(|e| e.to_string())?;
    if let Some(err) = reply.get("error") {
        return Err(err["desc"].as_str().unwrap_or("error").to_string());
    }
    Ok(reply["return"].clone())
}

/// Runs the subcommand; the exit code is 0 on success.
pub fn run(args: StatusArgs) -> Result<u8, String> {
    // JSON is printed as the daemon sent it; the other views read it as a
    // typed report first.
    let render = |s: &Value| -> Result<String, String> {
        if args.json {
            return Ok(format!("{s}\n"));
        }
        let report = StatusReport::from_json(s).map_err(|e| e.to_string())?;
        Ok(match args.prometheus {
            true => report.render_prometheus(),
            false => report.render_text(),
        })
    };
    match args.watch {
        None => print!("{}", render(&fetch(&args.api_socket)?)?),
        Some(secs) => {
            let every = Duration::from_secs_f64(secs.max(0.1));
            loop {
                let s = fetch(&args.api_socket)?;
                // Clear the screen and home the cursor, then redraw.
                print!("\x1b[2J\x1b[H{}", render(&s)?);
                std::thread::sleep(every);
            }
        }
    }
    Ok(0)
}
