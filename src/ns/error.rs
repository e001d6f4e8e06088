//! The error type of the namespace module, [`NsError`], and the wording of
//! every message it shows: each one says what went wrong and what the user
//! can do about it.

use std::path::PathBuf;

use nix::errno::Errno;

/// Which kind of namespace a namespace file is expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsKind {
    /// A user namespace (`/proc/PID/ns/user`).
    User,
    /// A network namespace (`/proc/PID/ns/net`).
    Net,
}

impl NsKind {
    /// The name used in `/proc/PID/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            NsKind::User => "user",
            NsKind::Net => "net",
        }
    }

    /// A human name for messages.
    fn human(self) -> &'static str {
        match self {
            NsKind::User => "user",
            NsKind::Net => "network",
        }
    }
}

impl std::fmt::Display for NsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.human())
    }
}

/// Why attaching to (or creating) namespaces, or the TAP device in them,
/// failed. Every message names the cause and the likely fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NsError {
    /// The target process does not exist.
    #[error("no such process: PID {0} (is the target still running?)")]
    NoSuchProcess(i32),

    /// A namespace file given by path does not exist.
    #[error(
        "namespace file {} does not exist: check the path (a network namespace \
         is usually /run/netns/NAME or /proc/PID/ns/net, a user namespace /proc/PID/ns/user)",
        path.display()
    )]
    NamespaceFileMissing {
        /// The path that was given.
        path: PathBuf,
    },

    /// A namespace file refers to a namespace of another kind.
    #[error(
        "{} is not a {expected} namespace file: pass /proc/PID/ns/{} (or a bind mount of it)",
        path.display(),
        expected.proc_name()
    )]
    WrongNamespaceType {
        /// The path that was given.
        path: PathBuf,
        /// The kind of namespace that was expected there.
        expected: NsKind,
    },

    /// A namespace file could not be opened for another reason.
    #[error("cannot open namespace file {}: {}", path.display(), errno.desc())]
    NamespaceOpen {
        /// The path that could not be opened.
        path: PathBuf,
        /// The system error.
        errno: Errno,
    },

    /// Joining (or opening) the target's user namespace was refused.
    #[error("cannot join the user namespace of {target}: {}", userns_reason(*errno))]
    JoinUserns {
        /// The target, as shown to the user ("PID 123" or a path).
        target: String,
        /// The system error.
        errno: Errno,
    },

    /// Joining (or opening) the target's network namespace was refused.
    #[error("cannot join the network namespace of {target}: {}", netns_reason(*errno))]
    JoinNetns {
        /// The target, as shown to the user ("PID 123" or a path).
        target: String,
        /// The system error.
        errno: Errno,
    },

    /// `/dev/net/tun` exists but may not be opened read-write.
    #[error(
        "cannot open /dev/net/tun: permission denied; rnet needs read-write access to \
         /dev/net/tun (most distributions ship it mode 0666): run `sudo chmod 0666 /dev/net/tun` \
         or ask your administrator"
    )]
    TunAccess,

    /// `/dev/net/tun` does not exist or has no driver behind it.
    #[error("/dev/net/tun is missing: load the tun module (`sudo modprobe tun`)")]
    TunMissing,

    /// `/dev/net/tun` could not be opened for another reason.
    #[error("cannot open /dev/net/tun: {}", errno.desc())]
    TunOpen {
        /// The system error.
        errno: Errno,
    },

    /// The requested TAP name cannot be an interface name.
    #[error(
        "invalid TAP device name {name:?}: use 1 to 15 characters without '/', ':' or \
         whitespace (choose another name with --tap)"
    )]
    InvalidTapName {
        /// The name that was asked for.
        name: String,
    },

    /// The requested interface configuration is inconsistent.
    #[error("invalid interface configuration: {detail}")]
    InvalidConfig {
        /// What is wrong with it.
        detail: String,
    },

    /// A network device of that name exists but is not a TAP device.
    #[error(
        "network device {name} already exists and is not a TAP device: choose another name \
         with --tap"
    )]
    NotATap {
        /// The device name.
        name: String,
    },

    /// The TAP device exists and another process has it open.
    #[error(
        "TAP device {name} is already in use by another process: stop that process or choose \
         another name with --tap"
    )]
    TapBusy {
        /// The device name.
        name: String,
    },

    /// The kernel refused to create (or attach to) the TAP device.
    #[error(
        "not allowed to create TAP device {name} in the namespace (need CAP_NET_ADMIN in the \
         namespace's owning user namespace): pass that user namespace with --userns, or run as \
         its owner"
    )]
    TapPermission {
        /// The device name.
        name: String,
    },

    /// Another TAP set-up step failed.
    #[error("cannot set up TAP device {name}: {step}: {}", errno.desc())]
    TapSetup {
        /// The device name.
        name: String,
        /// What was being done.
        step: String,
        /// The system error.
        errno: Errno,
    },

    /// A netlink configuration step in the namespace failed.
    #[error("configuring {name}: {step}: {}", errno.desc())]
    Netlink {
        /// The TAP device being configured.
        name: String,
        /// The step that failed, e.g. "add address 10.0.2.100/24".
        step: String,
        /// The error the kernel answered with.
        errno: Errno,
    },

    /// `unshare(CLONE_NEWUSER | CLONE_NEWNET)` failed.
    #[error(
        "cannot create a user namespace: {}; unprivileged user namespaces are disabled or \
         restricted here. Likely causes: kernel.unprivileged_userns_clone=0, \
         user.max_user_namespaces=0 (or its limit reached), or an AppArmor/SELinux policy such \
         as kernel.apparmor_restrict_unprivileged_userns=1; ask your administrator to allow \
         unprivileged user namespaces",
        errno.desc()
    )]
    UsernsCreate {
        /// The system error.
        errno: Errno,
    },

    /// Writing the uid/gid map of the new user namespace failed.
    #[error(
        "cannot write {file} for the new user namespace: {} (rnet maps only your own uid and gid; \
         check that /proc is mounted and not read-only)",
        errno.desc()
    )]
    IdMap {
        /// The `/proc/self/...` file that could not be written.
        file: String,
        /// The system error.
        errno: Errno,
    },

    /// The command could not be executed in the new namespaces.
    #[error("cannot run `{program}`: {}", errno.desc())]
    Exec {
        /// The program, as given.
        program: String,
        /// The error `execvp` returned.
        errno: Errno,
    },

    /// `rnet run` was given no command.
    #[error("no command given: pass the program to run and its arguments")]
    EmptyCommand,

    /// A command argument cannot be passed to `execvp`.
    #[error("command argument {arg:?} contains a NUL byte, which cannot be passed to a program")]
    NulInArgument {
        /// The argument, lossily converted to text.
        arg: String,
    },

    /// A basic system call (fork, pipe, socketpair, wait...) failed.
    #[error("{what}: {}", errno.desc())]
    Os {
        /// What was being done, e.g. "cannot fork the namespace helper".
        what: &'static str,
        /// The system error.
        errno: Errno,
    },

    /// The helper process died or answered something unexpected.
    #[error("the namespace helper process failed: {detail}")]
    Helper {
        /// What happened to it.
        detail: String,
    },
}

/// The explanation after "cannot join the user namespace of X:".
fn userns_reason(errno: Errno) -> String {
    if errno == Errno::EACCES {
        "permission denied; the target belongs to another user (run rnet as that user)".to_owned()
    } else {
        format!(
            "{}; you are not its owner, or unprivileged user namespaces are disabled \
             (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0)",
            errno.desc()
        )
    }
}

/// The explanation after "cannot join the network namespace of X:".
fn netns_reason(errno: Errno) -> String {
    match errno {
        Errno::EACCES => {
            "permission denied; the target belongs to another user (run rnet as that user)"
                .to_owned()
        }
        Errno::EINVAL => format!(
            "{} (is it really a network namespace file? pass /proc/PID/ns/net or /run/netns/NAME)",
            errno.desc()
        ),
        _ => format!(
            "{} (you need CAP_SYS_ADMIN over it: pass its user namespace with --userns, or run \
             as its owner)",
            errno.desc()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_such_process_text() {
        let msg = NsError::NoSuchProcess(42).to_string();
        assert_eq!(
            msg,
            "no such process: PID 42 (is the target still running?)"
        );
    }

    #[test]
    fn tun_texts_say_what_to_do() {
        let msg = NsError::TunAccess.to_string();
        assert!(msg.contains("cannot open /dev/net/tun: permission denied"));
        assert!(msg.contains("sudo chmod 0666 /dev/net/tun"));
        let msg = NsError::TunMissing.to_string();
        assert!(msg.contains("/dev/net/tun is missing"));
        assert!(msg.contains("sudo modprobe tun"));
    }

    #[test]
    fn userns_join_texts() {
        let e = NsError::JoinUserns {
            target: "PID 7".into(),
            errno: Errno::EPERM,
        };
        let msg = e.to_string();
        assert!(msg.contains("cannot join the user namespace of PID 7"));
        assert!(msg.contains("you are not its owner"));
        assert!(msg.contains("kernel.unprivileged_userns_clone=1"));
        assert!(msg.contains("user.max_user_namespaces>0"));

        let e = NsError::JoinUserns {
            target: "PID 7".into(),
            errno: Errno::EACCES,
        };
        let msg = e.to_string();
        assert!(msg.contains("cannot join the user namespace of PID 7: permission denied"));
        assert!(msg.contains("the target belongs to another user"));
    }

    #[test]
    fn netns_join_texts() {
        let e = NsError::JoinNetns {
            target: "/run/netns/x".into(),
            errno: Errno::EPERM,
        };
        let msg = e.to_string();
        assert!(msg.contains("cannot join the network namespace of /run/netns/x"));
        assert!(msg.contains("you need CAP_SYS_ADMIN over it"));
        assert!(msg.contains("--userns"));
    }

    #[test]
    fn tap_texts() {
        let n = || "tap0".to_owned();
        assert!(
            NsError::NotATap { name: n() }
                .to_string()
                .contains("already exists and is not a TAP device")
        );
        assert!(
            NsError::TapBusy { name: n() }
                .to_string()
                .contains("TAP device tap0 is already in use by another process")
        );
        assert!(
            NsError::TapPermission { name: n() }
                .to_string()
                .contains("not allowed to create TAP device tap0 in the namespace (need CAP_NET_ADMIN in the namespace's owning user namespace)")
        );
        let e = NsError::Netlink {
            name: n(),
            step: "add default route via 10.0.2.2".into(),
            errno: Errno::ENETUNREACH,
        };
        assert_eq!(
            e.to_string(),
            "configuring tap0: add default route via 10.0.2.2: Network is unreachable"
        );
    }

    #[test]
    fn userns_create_text_names_causes() {
        let msg = NsError::UsernsCreate {
            errno: Errno::EPERM,
        }
        .to_string();
        assert!(msg.contains("cannot create a user namespace"));
        assert!(msg.contains("kernel.unprivileged_userns_clone=0"));
        assert!(msg.contains("user.max_user_namespaces=0"));
        assert!(msg.contains("kernel.apparmor_restrict_unprivileged_userns=1"));
        assert!(msg.contains("AppArmor/SELinux"));
    }

    #[test]
    fn exec_text() {
        let e = NsError::Exec {
            program: "foo".into(),
            errno: Errno::ENOENT,
        };
        assert_eq!(e.to_string(), "cannot run `foo`: No such file or directory");
    }
}
