#!/bin/sh
# The VMM gives each guest a MAC address of the form 06:00:AA:BB:CC:DD; the guest's address is
# AA.BB.CC.DD/30 and the host's tap device is the address before it.
set -eu
dev=eth0
mac=$(cat "/sys/class/net/$dev/address")
set -- $(echo "$mac" | tr ':' ' ')
ip=$(printf '%d.%d.%d.%d' "0x$3" "0x$4" "0x$5" "0x$6")
last=$(printf '%d' "0x$6")
gateway=$(printf '%d.%d.%d.%d' "0x$3" "0x$4" "0x$5" "$((last - 1))")
ip link set "$dev" up
ip addr add "$ip/30" dev "$dev"
ip route add default via "$gateway" dev "$dev"
