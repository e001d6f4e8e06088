//! Stage 2 of the sandbox: capabilities. Only the ones asked to be kept
//! stay effective and permitted; none stay inheritable, ambient or in the
//! bounding set.

use std::io;

use super::{SandboxError, Stage, at_io};

const CAP_VERSION_3: u32 = 0x2008_0522;
/// Capability numbers (linux/capability.h).
const CAP_SETPCAP: u32 = 8;
pub(super) const CAP_NET_BIND_SERVICE: u32 = 10;
pub(super) const CAP_SYS_ADMIN: u32 = 21;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets, 64 bits each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Caps {
    effective: u64,
    permitted: u64,
    inheritable: u64,
}

impl Caps {
    pub(super) fn has(&self, cap: u32) -> bool {
        self.effective & (1u64 << cap) != 0
    }
}

pub(super) fn capget() -> io::Result<Caps> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads the header and writes two CapData structs (the
    // version 3 layout), both valid and live for the call.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(Caps {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

fn capset(caps: Caps) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let split = |v: u64| [v as u32, (v >> 32) as u32];
    let (e, p, i) = (
        split(caps.effective),
        split(caps.permitted),
        split(caps.inheritable),
    );
    let data = [
        CapData {
            effective: e[0],
            permitted: p[0],
            inheritable: i[0],
        },
        CapData {
            effective: e[1],
            permitted: p[1],
            inheritable: i[1],
        },
    ];
    // SAFETY: capset reads the header and two CapData structs (the version
    // 3 layout), both valid and live for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Stage 2: only the capabilities in `keep` remain, in the effective and
/// permitted sets; none are inheritable, ambient or in the bounding set.
pub(crate) fn drop_capabilities(keep: u64) -> Result<(), SandboxError> {
    let s = Stage::Capabilities;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
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
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r != 0 {
                let e = io::Error::last_os_error();
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
