//! Passing a file descriptor plus a small message over an AF_UNIX socket
//! (SCM_RIGHTS). All SCM_RIGHTS code of rnet lives here.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

/// What [`recv_with_fd`] got.
#[derive(Debug)]
pub struct Received {
    /// Bytes of message data written to the buffer (0 means the peer closed).
    pub len: usize,
    /// The descriptor that came with the message, if any (close-on-exec).
    pub fd: Option<OwnedFd>,
    /// The message or its control data did not fit and was cut.
    pub truncated: bool,
    /// The data was cut (`MSG_TRUNC`).
    pub data_truncated: bool,
    /// Descriptors were discarded (`MSG_CTRUNC`: no room, or no free
    /// descriptor number in the receiver).
    pub fd_truncated: bool,
}

/// Sends `data` and, if given, a copy of `fd` in one message on the
/// connected socket `sock`. Never raises SIGPIPE; retries on EINTR.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> nix::Result<()> {
    let iov = [IoSlice::new(data)];
    let fds: [RawFd; 1];
    let mut cmsgs = Vec::with_capacity(1);
    if let Some(fd) = fd {
        fds = [fd.as_raw_fd()];
        cmsgs.push(ControlMessage::ScmRights(&fds));
    }
    loop {
        match socket::sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(Errno::EMSGSIZE),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives one message into `buf` and the descriptor sent with it, if any.
/// Received descriptors are close-on-exec; extra ones are closed. Retries on
/// EINTR; a receive timeout set on `sock` shows as `EAGAIN`.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<Received> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; 4]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match socket::recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        let len = msg.bytes;
        let mut first = None;
        let fd_truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        // Descriptors were discarded (no free descriptor number, or more
        // than the buffer holds): the message itself still counts, without
        // them. (nix refuses to walk a truncated control buffer; with one
        // descriptor per message, as here, none was installed.)
        let cmsgs = if fd_truncated {
            None
        } else {
            Some(msg.cmsgs()?)
        };
        // Take ownership of every descriptor that arrived so none leaks.
        for cmsg in cmsgs.into_iter().flatten() {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for r in raw {
                    // SAFETY: the kernel just installed `r` in our descriptor
                    // table for this message; nothing else refers to it, so
                    // taking sole ownership of it is sound.
                    let owned = unsafe { OwnedFd::from_raw_fd(r) };
                    if first.is_none() {
                        first = Some(owned);
                    }
                }
            }
        }
        return Ok(Received {
            len,
            fd: first,
            truncated,
            data_truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
            fd_truncated,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn passes_a_descriptor_and_data() {
        let (a, b) = pair();
        let (pr, pw) = nix::unistd::pipe().expect("pipe");
        send_with_fd(a.as_fd(), b"hello", Some(pw.as_fd())).expect("send");
        drop(pw);
        let mut buf = [0u8; 16];
        let got = recv_with_fd(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..got.len], b"hello");
        assert!(!got.truncated);
        let fd = got.fd.expect("an fd");
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).expect("getfd");
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fd must be close-on-exec"
        );
        let mut w = std::fs::File::from(fd);
        w.write_all(b"x").expect("write through passed fd");
        drop(w);
        let mut r = std::fs::File::from(pr);
        let mut s = String::new();
        r.read_to_string(&mut s).expect("read");
        assert_eq!(s, "x");
    }

    #[test]
    fn data_without_descriptor_and_eof() {
        let (a, b) = pair();
        send_with_fd(a.as_fd(), b"E", None).expect("send");
        drop(a);
        let mut buf = [0u8; 4];
        let got = recv_with_fd(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(got.len, 1);
        assert!(got.fd.is_none());
        let got = recv_with_fd(b.as_fd(), &mut buf).expect("recv eof");
        assert_eq!(got.len, 0);
    }

    #[test]
    fn oversized_message_is_flagged() {
        let (a, b) = pair();
        send_with_fd(a.as_fd(), &[7u8; 32], None).expect("send");
        let mut buf = [0u8; 8];
        let got = recv_with_fd(b.as_fd(), &mut buf).expect("recv");
        assert!(got.truncated);
    }
}
