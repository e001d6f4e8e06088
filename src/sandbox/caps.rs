//! Stage 2 of the sandbox: capabilities. Only the ones asked to be kept
//! stay effective and permitted; none stay inheritable, ambient or in the
//! bounding set.

use std::io;

use super::{SandboxError, Stage, at_io};
use crate::sys;

/// Capability numbers (linux/capability.h).
const CAP_SETPCAP: u32 = 8;
pub(super) const CAP_NET_BIND_SERVICE: u32 = 10;
pub(super) const CAP_SYS_ADMIN: u32 = 21;

pub(super) use crate::sys::capget;
use crate::sys::{CapSets as Caps, capset};

/// Stage 2: only the capabilities in `keep` remain, in the effective and
/// permitted sets; none are inheritable, ambient or in the bounding set.
pub(crate) fn drop_capabilities(keep: u64) -> Result<(), SandboxError> {
    let s = Stage::Capabilities;
    if let Err(e) = sys::clear_ambient_caps() {
        // EINVAL: a kernel older than 4.3, which has no ambient set.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(SandboxError::new(s, "clearing the ambient set", e));
        }
    }
    let have = capget().map_err(at_io(s, "capget"))?;
    if have.has(CAP_SETPCAP) {
        for cap in 0..64u32 {
            if keep & (1u64 << cap) != 0 {
                continue;
            }
            if let Err(e) = sys::drop_bounding_cap(cap) {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    // Past the kernel's last capability.
                    break;
                }
                return Err(SandboxError::new(
                    s,
                    format!("dropping capability {cap} from the bounding set"),
                    e,
                ));
            }
        }
    }
    let want = Caps {
        effective: keep & have.permitted,
        permitted: keep & have.permitted,
        inheritable: 0,
    };
    capset(want).map_err(at_io(s, "capset"))?;
    let now = capget().map_err(at_io(s, "capget"))?;
    if now != want {
        return Err(SandboxError::new(
            s,
            format!("capabilities are {now:x?} after capset"),
            io::Error::other("capabilities not dropped"),
        ));
    }
    Ok(())
}
