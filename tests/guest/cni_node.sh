#!/bin/sh
# A rootless Kubernetes-style node with one pod, for tests/cni.rs.
#
#     rnet run [...] -- unshare -m sh cni_node.sh NODE_PORT POD_SPECS...
#
# Runs as root of the node's user namespace (rnet run maps the caller to
# root there), in a mount namespace of its own (unshare -m), so nothing it
# writes reaches the host's files: /run and /var/lib (for /var/lib/cni) are
# fresh tmpfs mounts, private to the node. Then, as a real node's runtime
# would:
#
#   1. creates the pod's network namespace (`ip netns add pod1`);
#   2. calls Debian's CNI plugins by hand, chained as a conflist would:
#      bridge (cni0 as the pods' gateway, host-local IPAM on 10.88.0.0/16,
#      ipMasq) and then portmap with runtimeConfig.portMappings
#      NODE_PORT -> pod:80 (iptables DNAT, nft backend);
#   3. starts `port_server.py POD_SPECS...` inside the pod.
#
# Prints "pod-ip IP", "pod-server PID" and "node-ready PID" (PID: this
# shell, for nsenter -t; the pod server prints its own "listening"), then
# waits for the pod server; SIGTERM ends both. The helpers the pod runs are copied to
# /run/rnet-test (the work tree may sit below /run or /var/lib, which the
# tmpfs mounts hide).
set -eu

node_port=$1
shift
here=$(dirname "$0")
server=$(cat "$here/port_server.py")
stream=$(cat "$here/stream.py")
cni=/usr/lib/cni

mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
if [ -d /var/lib/cni ]; then
    mount -t tmpfs -o mode=0755 tmpfs /var/lib/cni
else
    # Creating /var/lib/cni would write to the host: hide /var/lib instead.
    mount -t tmpfs -o mode=0755 tmpfs /var/lib
    mkdir /var/lib/cni
fi
mkdir -p /run/rnet-test /run/netns
printf '%s\n' "$server" >/run/rnet-test/port_server.py
printf '%s\n' "$stream" >/run/rnet-test/stream.py
ip link set lo up

ip netns add pod1

conf() {
    # $1: the plugin's own settings, $2: the previous result ("" for none)
    python3 - "$1" "$2" <<'EOF'
import json, sys
conf = {"cniVersion": "1.0.0", "name": "rnet-pods"}
conf.update(json.loads(sys.argv[1]))
if sys.argv[2]:
    conf["prevResult"] = json.loads(sys.argv[2])
print(json.dumps(conf))
EOF
}

plugin() {
    # $1: plugin, $2: its config on stdin's behalf
    printf '%s' "$2" | CNI_COMMAND=ADD CNI_CONTAINERID=rnet-test-pod1 \
        CNI_NETNS=/run/netns/pod1 CNI_IFNAME=eth0 CNI_PATH=$cni "$cni/$1"
}

bridge_conf='{"type": "bridge", "bridge": "cni0", "isGateway": true,
  "ipMasq": true, "hairpinMode": true,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
           "routes": [{"dst": "0.0.0.0/0"}]}}'
result=$(plugin bridge "$(conf "$bridge_conf" "")")
portmap_conf='{"type": "portmap", "capabilities": {"portMappings": true},
  "runtimeConfig": {"portMappings":
    [{"hostPort": '"$node_port"', "containerPort": 80, "protocol": "tcp"}]}}'
plugin portmap "$(conf "$portmap_conf" "$result")" >/dev/null

pod_ip=$(printf '%s' "$result" | python3 -c '
import json, sys
print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])')
echo "pod-ip $pod_ip"

ip netns exec pod1 python3 -u /run/rnet-test/port_server.py "$@" &
pod_server=$!
trap 'kill $pod_server 2>/dev/null; exit 0' TERM INT
echo "pod-server $pod_server"
echo "node-ready $$"
wait $pod_server
