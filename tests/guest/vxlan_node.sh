#!/bin/sh
# One node of the two-host VXLAN overlay of tests/multinode.rs.
#
#     rnet run -p 8472:8472/udp [...] -- sh vxlan_node.sh REMOTE OVERLAY_ADDR/LEN
#
# Inside the node's namespace (served by rnet on tap0, 10.0.2.100): a VXLAN
# device as Flannel makes it (VNI 1, UDP port 8472) whose remote is the
# other machine's address. Outgoing VXLAN datagrams leave through rnet's
# NAT (the other machine must be in --outbound-allow); incoming ones arrive
# through rnet's published 8472/udp. VXLAN adds 50 bytes (outer IPv4 20 +
# UDP 8 + VXLAN 8 + inner Ethernet 14), so the device's MTU is tap0's
# MTU - 50. Prints "vxlan-mtu N" and "node-ready PID" (PID: this process,
# for nsenter -t), then waits until killed.
set -eu

remote=$1
addr=$2
tap_mtu=$(ip -o link show tap0 | sed -n 's/.* mtu \([0-9]*\) .*/\1/p')
vxlan_mtu=$((tap_mtu - 50))
ip link add vxlan1 type vxlan id 1 dstport 8472 remote "$remote" dev tap0
ip link set vxlan1 mtu "$vxlan_mtu"
ip addr add "$addr" dev vxlan1
ip link set vxlan1 up
echo "vxlan-mtu $vxlan_mtu"
echo "node-ready $$"
# Bounded: the test stops the node long before.
exec sleep 900
