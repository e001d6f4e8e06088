//! The tiny wire format helper processes use to report back to their parent:
//! either "ok" with a small payload, or an error made of the step that failed,
//! the errno and a short context string. The parent turns an error into an
//! [`NsError`](super::NsError) with the details only it knows (target, names).
//!
//! Layout: an ok report is `b'K'` followed by its payload; an error report is
//! `b'E'`, the step (u8), the errno (i32 LE), the context length (u16 LE) and
//! the context bytes (UTF-8, at most [`MAX_CONTEXT`] bytes).

use std::io::{self, Read};

use nix::errno::Errno;

/// Tag of a success report.
const TAG_OK: u8 = b'K';
/// Tag of an error report.
const TAG_ERR: u8 = b'E';
/// Size of an error report without its context.
const ERR_HEADER: usize = 1 + 1 + 4 + 2;
/// Longest context string carried (longer ones are cut at a char boundary).
pub(crate) const MAX_CONTEXT: usize = 200;
/// Largest encoded report, for receive buffers.
pub(crate) const MAX_REPORT: usize = ERR_HEADER + MAX_CONTEXT;

/// The step of a helper process that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Step {
    /// setns(CLONE_NEWUSER).
    JoinUserns = 1,
    /// setns(CLONE_NEWNET).
    JoinNetns = 2,
    /// open("/dev/net/tun").
    OpenTun = 3,
    /// ioctl(TUNSETIFF).
    SetIff = 4,
    /// ioctl(TUNSETVNETHDRSZ).
    VnetHdrSize = 5,
    /// ioctl(SIOCGIFHWADDR) on the TAP.
    ReadMac = 6,
    /// A netlink configuration step; the context names it.
    Netlink = 7,
    /// The parent died before the helper was set up.
    ParentGone = 8,
    /// unshare(CLONE_NEWUSER | CLONE_NEWNET).
    Unshare = 9,
    /// Writing /proc/self/setgroups.
    Setgroups = 10,
    /// Writing /proc/self/uid_map.
    UidMap = 11,
    /// Writing /proc/self/gid_map.
    GidMap = 12,
    /// execvp() of the command.
    Exec = 13,
    /// Anything else; the context says what.
    Internal = 14,
    /// ioctl(TUNSETOFFLOAD).
    Offload = 15,
}

impl Step {
    /// All steps, to decode the tag byte.
    const ALL: [Step; 15] = [
        Step::JoinUserns,
        Step::JoinNetns,
        Step::OpenTun,
        Step::SetIff,
        Step::VnetHdrSize,
        Step::ReadMac,
        Step::Netlink,
        Step::ParentGone,
        Step::Unshare,
        Step::Setgroups,
        Step::UidMap,
        Step::GidMap,
        Step::Exec,
        Step::Internal,
        Step::Offload,
    ];

    /// The step with tag byte `b`, if any.
    fn from_u8(b: u8) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| *s as u8 == b)
    }
}

/// An error a helper process reports to its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChildError {
    /// What the helper was doing.
    pub step: Step,
    /// The system error.
    pub errno: Errno,
    /// Short detail, e.g. the netlink step.
    pub context: String,
}

impl ChildError {
    /// An error at `step` with `errno` and a short context.
    pub fn new(step: Step, errno: Errno, context: &str) -> Self {
        let mut end = context.len().min(MAX_CONTEXT);
        while !context.is_char_boundary(end) {
            end -= 1;
        }
        ChildError {
            step,
            errno,
            context: context[..end].to_owned(),
        }
    }

    /// The encoded report.
    pub fn encode(&self) -> Vec<u8> {
        let ctx = self.context.as_bytes();
        let mut out = Vec::with_capacity(ERR_HEADER + ctx.len());
        out.push(TAG_ERR);
        out.push(self.step as u8);
        out.extend_from_slice(&(self.errno as i32).to_le_bytes());
        // `new` caps the context at MAX_CONTEXT, which fits a u16.
        out.extend_from_slice(&(ctx.len() as u16).to_le_bytes());
        out.extend_from_slice(ctx);
        out
    }
}

/// Encodes a success report carrying `payload`.
pub(crate) fn encode_ok(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + payload.len());
    out.push(TAG_OK);
    out.extend_from_slice(payload);
    out
}

/// A decoded report.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Report<'a> {
    /// Success, with its payload.
    Ok(&'a [u8]),
    /// Failure.
    Err(ChildError),
}

/// Decodes a report, or says what is wrong with it.
pub(crate) fn decode(buf: &[u8]) -> Result<Report<'_>, String> {
    match buf.first() {
        None => Err("empty report".to_owned()),
        Some(&TAG_OK) => Ok(Report::Ok(&buf[1..])),
        Some(&TAG_ERR) => {
            if buf.len() < ERR_HEADER {
                return Err(format!("short error report ({} bytes)", buf.len()));
            }
            let step = Step::from_u8(buf[1]).ok_or_else(|| format!("unknown step {}", buf[1]))?;
            let errno = i32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]);
            let len = usize::from(u16::from_le_bytes([buf[6], buf[7]]));
            let ctx = buf
                .get(ERR_HEADER..ERR_HEADER + len)
                .ok_or_else(|| "truncated error context".to_owned())?;
            Ok(Report::Err(ChildError {
                step,
                errno: Errno::from_raw(errno),
                context: String::from_utf8_lossy(ctx).into_owned(),
            }))
        }
        Some(&other) => Err(format!("unknown report tag {other:#04x}")),
    }
}

/// Reads one report from a byte stream (a pipe) where success reports carry
/// no payload. Returns the raw report for [`decode`], or `None` on EOF
/// before any byte. Errors on EOF in the middle of a report.
pub(crate) fn read_stream_report(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut tag = [0u8; 1];
    loop {
        match r.read(&mut tag) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if tag[0] != TAG_ERR {
        return Ok(Some(tag.to_vec()));
    }
    let mut out = vec![0u8; ERR_HEADER];
    out[0] = TAG_ERR;
    r.read_exact(&mut out[1..])?;
    let len = usize::from(u16::from_le_bytes([out[6], out[7]]));
    out.resize(ERR_HEADER + len, 0);
    r.read_exact(&mut out[ERR_HEADER..])?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trip() {
        for step in Step::ALL {
            let e = ChildError::new(step, Errno::EBUSY, "set MTU 65520");
            let bytes = e.encode();
            assert!(bytes.len() <= MAX_REPORT);
            assert_eq!(decode(&bytes), Ok(Report::Err(e)));
        }
    }

    #[test]
    fn ok_round_trip() {
        let bytes = encode_ok(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(decode(&bytes), Ok(Report::Ok(&[1, 2, 3, 4, 5, 6][..])));
        assert_eq!(decode(&encode_ok(&[])), Ok(Report::Ok(&[][..])));
    }

    #[test]
    fn long_context_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_CONTEXT);
        let e = ChildError::new(Step::Internal, Errno::EIO, &long);
        assert!(e.context.len() <= MAX_CONTEXT);
        assert!(e.context.chars().all(|c| c == 'é'));
        match decode(&e.encode()) {
            Ok(Report::Err(d)) => assert_eq!(d, e),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn stream_reports() {
        let e = ChildError::new(Step::Exec, Errno::ENOENT, "execvp");
        let mut stream = encode_ok(&[]);
        stream.extend(e.encode());
        let mut r = io::Cursor::new(stream);
        let first = read_stream_report(&mut r).expect("read").expect("a report");
        assert_eq!(decode(&first), Ok(Report::Ok(&[][..])));
        let second = read_stream_report(&mut r).expect("read").expect("a report");
        assert_eq!(decode(&second), Ok(Report::Err(e.clone())));
        assert!(read_stream_report(&mut r).expect("eof").is_none());
        // EOF inside a report is an error.
        let bytes = e.encode();
        let mut cut = io::Cursor::new(bytes[..bytes.len() - 1].to_vec());
        assert!(read_stream_report(&mut cut).is_err());
    }

    #[test]
    fn malformed_reports_are_rejected() {
        assert!(decode(&[]).is_err());
        assert!(decode(b"X").is_err());
        assert!(decode(&[TAG_ERR, 1, 0]).is_err());
        assert!(decode(&[TAG_ERR, 99, 1, 0, 0, 0, 0, 0]).is_err());
        // Claims 5 context bytes, carries 1.
        assert!(decode(&[TAG_ERR, 1, 1, 0, 0, 0, 5, 0, b'x']).is_err());
    }
}
