#!/usr/bin/env bash
# Side-by-side benchmark: rnet, slirp4netns and pasta (and, for published
# ports, RootlessKit's builtin driver) on the same machine in one run.
# Installs nothing: it says what is missing and leaves those columns out.
# See benches/README.md.
#
#   benches/compare.sh [--out DIR] [--tools rnet,slirp4netns,pasta,rootlesskit]
#                      [--iperf-seconds N] [--rtt-count N] [--cps-seconds N]
#                      [--flows N] [--many-flows N]
#
# Build rnet and the load programs first:
#   cargo build --release && cargo build --release --example netbench
# RNET=/path/to/rnet and NETBENCH=/path/to/netbench override the binaries
# found in ${CARGO_TARGET_DIR:-target}/release (RNET_REV=... names rnet's
# revision in the table). RNET_BENCH_ROWS=udp runs only the UDP rows (and
# their limit columns), RNET_BENCH_ROWS=vxlan only the VXLAN overlay rows
# (bare veth, rnet and slirp4netns nodes; needs root for the test hosts).
# Run as an unprivileged user; when started as root the whole run drops to
# uid/gid 65534 (nobody) with setpriv (RootlessKit then gets a subuid/subgid
# range through files bind-mounted in a private mount namespace).
# As root it first makes the kernel-limit test hosts: two network
# namespaces (each in a user namespace owned by uid 65534, so the dropped
# run can enter them) joined by a veth pair that root creates; they are
# removed on every exit path. Not root: no veth limit column.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=""
tools="rnet,slirp4netns,pasta,rootlesskit"
pass=()
while (($#)); do
    case "$1" in
    --out) out=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    --iperf-seconds | --rtt-count | --cps-seconds | --flows | --many-flows) pass+=("$1" "$2"); shift 2 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
out=${out:-$root/bench-results/$(date -u +%Y-%m-%d)}
target=${CARGO_TARGET_DIR:-$root/target}
rnet=${RNET:-$target/release/rnet}
netbench=${NETBENCH:-$target/release/examples/netbench}
# Absolute: as root the run below starts from /.
[[ $rnet == /* ]] || rnet=$PWD/$rnet
[[ $netbench == /* ]] || netbench=$PWD/$netbench

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1"); }

python=""
for p in /usr/bin/python3 "$(command -v python3 || true)"; do
    [[ -n $p && -x $p ]] && { python=$p; break; }
done
[[ -n $python ]] || { echo "compare.sh: python3 is required (apt-get install python3)" >&2; exit 1; }
for t in iperf3 unshare nsenter; do need "$t"; done
if ((${#missing[@]})); then
    echo "compare.sh: missing ${missing[*]} (Debian: apt-get install iperf3 util-linux); cannot run" >&2
    exit 1
fi
# The latency and short-connection client and server, the same for every tool.
if [[ ! -x $netbench ]]; then
    echo "compare.sh: no netbench at $netbench (cargo build --release --example netbench, or set NETBENCH); cannot run" >&2
    exit 1
fi

keep=()
IFS=, read -r -a wanted <<<"$tools"
for t in "${wanted[@]}"; do
    case "$t" in
    rnet)
        if [[ -x $rnet ]]; then keep+=(rnet); else
            echo "compare.sh: no rnet binary at $rnet (cargo build --release, or set RNET): skipping the rnet column" >&2
        fi ;;
    slirp4netns | pasta)
        if command -v "$t" >/dev/null 2>&1; then keep+=("$t"); else
            pkg=$t; [[ $t == pasta ]] && pkg=passt
            echo "compare.sh: $t not found (Debian: apt-get install $pkg): skipping the $t column" >&2
        fi ;;
    rootlesskit)
        if ! command -v rootlesskit >/dev/null 2>&1; then
            echo "compare.sh: rootlesskit not found (Debian: apt-get install rootlesskit): skipping its published-port row" >&2
        elif ! command -v slirp4netns >/dev/null 2>&1; then
            echo "compare.sh: rootlesskit needs slirp4netns (--net=slirp4netns): skipping its published-port row" >&2
        elif [[ $(id -u) == 0 ]]; then
            if command -v unshare >/dev/null 2>&1 && [[ -e /etc/subuid && -e /etc/subgid ]]; then keep+=(rootlesskit); else
                echo "compare.sh: rootlesskit as uid 65534 needs /etc/subuid and /etc/subgid to exist (even empty) to bind-mount over: skipping its row" >&2
            fi
        else
            me=$(id -un 2>/dev/null || true); uid=$(id -u)
            if grep -qE "^($me|$uid):" /etc/subuid 2>/dev/null && grep -qE "^($me|$uid):" /etc/subgid 2>/dev/null; then
                keep+=(rootlesskit)
            else
                echo "compare.sh: rootlesskit needs /etc/subuid and /etc/subgid ranges for $me: skipping its published-port row" >&2
            fi
        fi ;;
    *) echo "compare.sh: unknown tool $t" >&2; exit 2 ;;
    esac
done
((${#keep[@]})) || { echo "compare.sh: nothing to compare" >&2; exit 1; }
tools=$(IFS=,; echo "${keep[*]}")

rev=${RNET_REV:-}
if [[ -z $rev ]] && command -v git >/dev/null 2>&1; then
    rev=$(git -C "$root" describe --always --dirty 2>/dev/null || true)
fi

mkdir -p "$out/raw"
out=$(cd "$out" && pwd) # absolute: the root path below runs from /
run=("$python" "$here/compare.py" run --out "$out" --rnet "$rnet" --rnet-rev "$rev"
    --netbench "$netbench" --tools "$tools" --python "$python" --rows "${RNET_BENCH_ROWS:-all}" "${pass[@]}")

# Everything this script starts in the background is ended by pid on exit,
# also on failure or interruption.
holders=()
scratch=()
cleanup() {
    local p
    for p in "${holders[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${holders[@]}"; do wait "$p" 2>/dev/null || true; done
    ((${#scratch[@]})) && rm -rf "${scratch[@]}"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# One test host for the kernel-limit column: a network namespace in a user
# namespace owned by uid 65534 (so the dropped run may nsenter it), held by
# a sleep whose pid is printed. Only lo until a veth end is moved in.
limit_host() {
    setpriv --reuid 65534 --regid 65534 --clear-groups --inh-caps=-all \
        unshare --user --map-root-user --net sleep 86400 </dev/null >/dev/null 2>&1 &
    local pid=$! deadline=$((SECONDS + 15))
    holders+=("$pid")
    # Ready once unshare has exec'd the sleep (namespaces made, maps written).
    until [[ $(cat "/proc/$pid/comm" 2>/dev/null) == sleep ]]; do
        ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null || { echo "compare.sh: the limit test host did not start" >&2; return 1; }
        sleep 0.02
    done
    limit_pid=$pid
}

if [[ $(id -u) == 0 ]]; then
    command -v setpriv >/dev/null 2>&1 || { echo "compare.sh: running as root needs setpriv (util-linux) to drop to uid 65534" >&2; exit 1; }
    if command -v ip >/dev/null 2>&1; then
        # The kernel doing the same work: "guest" G and "host" H, a veth
        # pair between them (lim0 in each). compare.py gives them
        # addresses and MTUs from inside (it owns their user namespaces).
        limit_host; g=$limit_pid
        limit_host; h=$limit_pid
        ip link add lim0 netns "$g" type veth peer name lim0 netns "$h"
        run+=(--veth "$g,$h")
        echo "compare.sh: kernel limit: veth pair between test hosts (pids $g, $h), removed on exit" >&2
    else
        echo "compare.sh: no ip (iproute2): no veth test hosts, the kernel-limit column shows host loopback only" >&2
    fi
    if [[ -e /dev/net/tun && ! -w /dev/net/tun ]] || [[ $(stat -c %a /dev/net/tun 2>/dev/null) != 666 ]]; then
        echo "compare.sh: /dev/net/tun should be mode 0666 for unprivileged users (chmod 0666 /dev/net/tun)" >&2
    fi
    chown -R 65534:65534 "$out"
    # 10,000 idle flows take a descriptor each in several processes (and
    # pasta accepts only about half its limit in connections): raise the
    # hard open-file limit where root may; the run inherits it.
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((hard < 65536)); then
        ulimit -Hn 65536 2>/dev/null || echo "compare.sh: cannot raise the hard open-file limit above $hard" >&2
    fi
    echo "compare.sh: running as root; the benchmark runs as uid 65534 (setpriv)" >&2
    cd /
    drop=(setpriv --reuid 65534 --regid 65534 --clear-groups --inh-caps=-all
        env -i PATH="$PATH" HOME=/tmp LANG=C.UTF-8 "${run[@]}")
    if [[ ,$tools, == *,rootlesskit,* ]]; then
        # RootlessKit (newuidmap) wants a subordinate range for uid 65534:
        # give it one in a private mount namespace; the files on disk stay
        # untouched.
        subid=$(mktemp -d)
        scratch+=("$subid")
        echo "$(id -un 65534 2>/dev/null || echo 65534):100000:65536" >"$subid/subid"
        chmod 0755 "$subid"; chmod 0644 "$subid/subid"
        unshare -m --propagation private sh -c \
            'mount --bind "$0" /etc/subuid && mount --bind "$0" /etc/subgid && exec "$@"' \
            "$subid/subid" "${drop[@]}" && rc=0 || rc=$?
        exit "$rc"
    fi
    # Not exec: the EXIT trap must remove the test hosts afterwards.
    "${drop[@]}" && rc=0 || rc=$?
    exit "$rc"
fi
echo "compare.sh: not root: no veth test hosts; the kernel-limit column shows host loopback only (published-port rows)" >&2
exec "${run[@]}"
