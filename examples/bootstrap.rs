//! A minimal bootstrapper embedding rnet, the way a rootless node launcher
//! would: it creates a user + network namespace, attaches rnet to it as a
//! library, starts a command inside once the network is up, and tears the
//! network down when the command exits.
//!
//! ```sh
//! cargo run --example bootstrap -- sh -c 'ip addr; ip route'
//! ```

use std::ffi::OsString;
use std::process::ExitCode;

use rnet::{Config, Network, Target};

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    if argv.is_empty() {
        eprintln!("usage: bootstrap CMD [ARGS...]");
        return Ok(ExitCode::from(2));
    }

    // 1. The namespaces. The command waits inside until released.
    let mut cmd = rnet::ns::spawn_in_new_namespaces(&argv)?;

    // 2. The network: a TAP in the new namespace, served from here.
    let config = Config::builder().build()?;
    let net = Network::attach(Target::Pid(cmd.pid()), config)?;
    eprintln!("bootstrap: {} is up in pid {}", net.tap_name(), cmd.pid());

    // 3. Start the command and wait for it.
    cmd.release()?;
    let code = rnet::wait_for_exit(cmd.pid())?;

    // 4. Tear down: closes every host socket rnet held.
    net.handle().stop();
    let why = net.wait()?;
    eprintln!("bootstrap: command exited with {code}; network ended ({why:?})");
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
