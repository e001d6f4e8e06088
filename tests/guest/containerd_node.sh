#!/bin/sh
# A rootless containerd node for tests/runtimes.rs, run by RootlessKit (with
# rnet as its slirp4netns) as root of the node's user namespace:
#
#     containerd_node.sh STATE_DIR ROOTFS NODE_PORT HOST_PORT
#
# In the node's own mount namespace (RootlessKit's --copy-up of /etc, /run
# and /var/lib) it mounts fresh tmpfs on /run/netns, /run/containerd and
# /var/lib/cni, so nothing is written to the host's directories; then:
#
#   1. a pod network namespace wired by Debian's CNI plugins, chained as a
#      conflist would be: bridge (cni0 as gateway, host-local 10.88.0.0/16,
#      ipMasq) and portmap (NODE_PORT -> pod:80, iptables DNAT);
#   2. containerd with its state under STATE_DIR, no CRI plugin;
#   3. `ctr run` of the pod's web server (busybox httpd) in that netns, from
#      ROOTFS (no image store: --rootfs), without cgroups (a rootless
#      user cannot create them on this host);
#   4. a second container in the same netns fetching
#      http://10.0.2.2:HOST_PORT/ from the host, through the bridge's
#      masquerade and rnet.
#
# Prints "probe-ok" or "probe-failed", then "node-ready", then waits until
# SIGTERM. RootlessKit runs it with --pidns, so everything it started ends
# with it.
set -eu
state=$1 rootfs=$2 node_port=$3 host_port=$4
cni=/usr/lib/cni
sock=/run/containerd/containerd.sock

for d in /run/netns /run/containerd /var/lib/cni; do
    mkdir -p "$d"
    mount -t tmpfs -o mode=0755 tmpfs "$d"
done
ip link set lo up
ip netns add pod1

plugin() {
    printf '%s' "$2" | CNI_COMMAND=ADD CNI_CONTAINERID=pod1 CNI_NETNS=/run/netns/pod1 \
        CNI_IFNAME=eth0 CNI_PATH=$cni "$cni/$1"
}
result=$(plugin bridge '{"cniVersion": "1.0.0", "name": "rnet-pods", "type": "bridge",
  "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
           "routes": [{"dst": "0.0.0.0/0"}]}}')
plugin portmap "$(printf '{"cniVersion": "1.0.0", "name": "rnet-pods", "type": "portmap",
  "capabilities": {"portMappings": true},
  "runtimeConfig": {"portMappings": [{"hostPort": %s, "containerPort": 80, "protocol": "tcp"}]},
  "prevResult": %s}' "$node_port" "$result")" >/dev/null

cat >"$state/containerd.toml" <<EOT
version = 2
root = "$state/containerd-root"
state = "/run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
EOT
containerd --config "$state/containerd.toml" >"$state/containerd.log" 2>&1 &
i=0
while ! ctr -a "$sock" version >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then
        cat "$state/containerd.log" >&2
        exit 1
    fi
    sleep 0.1
done

pod="--cgroup= --cpu-shares 0 --env PATH=/bin --rootfs --with-ns network:/run/netns/pod1"
# shellcheck disable=SC2086 # $pod is a list of options
ctr -a "$sock" run -d $pod "$rootfs" web1 /bin/httpd -f -p 80 -h /www
# shellcheck disable=SC2086
if ctr -a "$sock" run --rm $pod "$rootfs" probe1 /bin/wget -qO- "http://10.0.2.2:$host_port/"; then
    echo probe-ok
else
    echo probe-failed
fi
echo node-ready
trap 'exit 0' TERM INT
sleep 2147483647 &
wait $!
