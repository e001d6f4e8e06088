//! A UDP echo server for the container images of tests/runtimes.rs, built
//! there with `rustc -C target-feature=+crt-static` so it runs in a rootfs
//! that holds nothing but busybox. Usage: udp_echo PORT
use std::net::UdpSocket;

fn main() {
    let port = std::env::args().nth(1).unwrap_or_else(|| "9000".into());
    let sock = UdpSocket::bind(format!("0.0.0.0:{port}")).expect("bind the UDP echo port");
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], peer);
        }
    }
}
