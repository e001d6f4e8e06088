//! `--pcap FILE`: every frame crossing the TAP, in the classic pcap format
//! (readable by tcpdump, tshark and Wireshark), with a size cap.
//!
//! The format is written by hand (a 24-byte file header, then a 16-byte
//! record header per frame, link type Ethernet): it is a few lines, and a
//! crate would add an allocation or a trait object per frame on the hot path.
//! When the file would grow past the cap it is renamed to `FILE.1`
//! (replacing an older one) and a new `FILE` starts, so at most twice the
//! cap is ever on disk.
//!
//! Capture files hold every byte the guest sends, so they are created
//! `0600` and never through a symbolic link (`O_NOFOLLOW`), nor into a FIFO
//! or device: [`open_capture`] refuses anything but a regular file, at start
//! and at each rotation.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Default size cap per file.
pub const DEFAULT_CAP: u64 = 100 << 20;
/// Bytes of a frame kept (a full TAP frame fits).
const SNAPLEN: u32 = 65_600;
const LINKTYPE_ETHERNET: u32 = 1;

/// A pcap file being written.
pub struct PcapWriter {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    cap: u64,
    /// Frames not written because of an I/O error (disk full, ...).
    pub lost: u64,
}

impl PcapWriter {
    /// Creates (truncates) `path` and writes the file header.
    pub fn create(path: &Path, cap: u64) -> io::Result<Self> {
        let mut w = Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(256 << 10, open_capture(path, false)?),
            written: 0,
            cap: cap.max(1 << 16),
            lost: 0,
        };
        w.header()?;
        Ok(w)
    }

    fn header(&mut self) -> io::Result<()> {
        let mut h = [0u8; 24];
        h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h[4..6].copy_from_slice(&2u16.to_le_bytes());
        h[6..8].copy_from_slice(&4u16.to_le_bytes());
        // thiszone and sigfigs stay 0.
        h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
        h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        self.out.write_all(&h)?;
        self.written = h.len() as u64;
        Ok(())
    }

    /// Records one frame; errors are counted, never returned, so capture
    /// problems cannot disturb the data plane.
    pub fn record(&mut self, frame: &[u8]) {
        if let Err(_e) = self.try_record(frame) {
            self.lost += 1;
        }
    }

    fn try_record(&mut self, frame: &[u8]) -> io::Result<()> {
        let incl = frame.len().min(SNAPLEN as usize);
        if self.written + 16 + incl as u64 > self.cap {
            self.rotate()?;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(ts.as_secs() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&ts.subsec_micros().to_le_bytes());
        h[8..12].copy_from_slice(&(incl as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(&frame[..incl])?;
        self.written += 16 + incl as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        // The name was just renamed away: whatever is there now was put
        // there by someone else, so only a new file is accepted.
        self.out = BufWriter::with_capacity(256 << 10, open_capture(&self.path, true)?);
        self.header()
    }

    /// Pushes buffered records to the file.
    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

/// Opens `path` for a capture: created `0600` (an existing file is
/// truncated and set to `0600`), never through a symbolic link, and only if
/// it is a regular file; with `fresh`, only a file this call creates.
pub fn open_capture(path: &Path, fresh: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).mode(0o600);
    if fresh {
        o.create_new(true);
    } else {
        o.create(true).truncate(true);
    }
    // O_NONBLOCK: a FIFO at the path must not block the open; it is refused
    // below. (std adds O_CLOEXEC.)
    o.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    let f = o.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            io::Error::new(
                e.kind(),
                format!(
                    "{} is a symbolic link; rnet does not follow links for capture files (name the file itself)",
                    path.display()
                ),
            )
        } else if e.raw_os_error() == Some(libc::ENXIO) {
            // A FIFO nobody reads (or a device without its driver).
            io::Error::new(
                e.kind(),
                format!(
                    "{} is a FIFO or a device; a capture file must be a regular file",
                    path.display()
                ),
            )
        } else {
            e
        }
    })?;
    let meta = f.metadata()?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is {what}; a capture file must be a regular file",
                path.display()
            ),
        ));
    }
    if meta.permissions().mode() & 0o7777 != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    // Writes stay blocking (as for any regular file).
    nix::fcntl::fcntl(
        &f,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(io::Error::from)?;
    Ok(f)
}

impl Drop for PcapWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_headers_and_rotates() {
        let dir = std::env::temp_dir().join(format!("rnet-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcap");
        let mut w = PcapWriter::create(&path, 1 << 16).unwrap();
        let frame = [0xabu8; 1000];
        for _ in 0..100 {
            w.record(&frame);
        }
        w.flush();
        let cur = std::fs::read(&path).unwrap();
        let old = std::fs::read(dir.join("cap.pcap.1")).unwrap();
        assert_eq!(&cur[0..4], &0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(&old[20..24], &1u32.to_le_bytes());
        assert!(old.len() as u64 <= 1 << 16 && cur.len() as u64 <= 1 << 16);
        assert_eq!(w.lost, 0);
        // Each record is 16 + 1000 bytes after the 24-byte header.
        assert_eq!((cur.len() - 24) % 1016, 0);
        for f in [&path, &dir.join("cap.pcap.1")] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_links_fifos_and_loosens_nothing() {
        let dir = std::env::temp_dir().join(format!("rnet-pcap-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        let link = dir.join("link.pcap");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = PcapWriter::create(&link, 1 << 20)
            .err()
            .expect("a symlink is refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!target.exists(), "nothing created through the link");

        let fifo = dir.join("fifo.pcap");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = PcapWriter::create(&fifo, 1 << 20)
            .err()
            .expect("a FIFO is refused");
        assert!(e.to_string().contains("FIFO"), "{e}");

        // An existing world-readable file is truncated and tightened.
        let old = dir.join("old.pcap");
        std::fs::write(&old, b"secret").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(PcapWriter::create(&old, 1 << 20).unwrap());
        let meta = std::fs::metadata(&old).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.len(), 24, "truncated, then the file header");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
