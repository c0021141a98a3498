#!/usr/bin/env bash
# netns.sh: the throwaway namespace topology used by `make demo`, the
# end-to-end tests and the benchmark. Nothing here touches the host's own
# network namespace except creating and deleting the namespaces themselves.
#
#   netns.sh up ID          create ID-c (client), ID-g (gateway), ID-s (server), ID-u (upstream)
#   netns.sh down ID        kill every process in them and delete them
#   netns.sh markcount ID MARK
#                           a rule in the gateway's mangle OUTPUT (IPv4 and
#                           IPv6) that counts packets carrying MARK, so tests
#                           can see detour's socket mark; the capture rules
#                           are detour's own (detour run --install-rules)
#
#   client ID-c  198.18.1.2/24  fd00:1::2/64 ─┐
#                                             ID-g  198.18.1.1 fd00:1::1 | 198.18.2.1 fd00:2::1 | 198.18.3.1 fd00:3::1
#   server ID-s  198.18.2.2/24  fd00:2::2/64 ─┤
#   upstream ID-u 198.18.3.2/24 fd00:3::2/64 ─┘
#
# Addresses come only from 198.18.0.0/15 and fd00::/8, and exist only inside
# these namespaces.
set -euo pipefail

die() { echo "netns.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root (creates network namespaces)"
cmd=${1:-}; id=${2:-}
[ -n "$cmd" ] && [ -n "$id" ] || die "usage: netns.sh up|down|markcount ID ..."
case "$id" in *[!a-z0-9]*) die "ID must be lower-case letters and digits, got '$id'";; esac
[ ${#id} -le 10 ] || die "ID must be at most 10 characters, got '$id'"

C=$id-c G=$id-g S=$id-s U=$id-u
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

up() {
	for ns in $C $G $S $U; do
		ip netns add "$ns"
		inns "$ns" ip link set lo up
		inns "$ns" sysctl -qw net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
	done
	# veth pairs are created with both ends already inside the namespaces.
	link "$C" c0 "$G" gc 1 2 1
	link "$S" s0 "$G" gs 2 2 1
	link "$U" u0 "$G" gu 3 2 1
	inns "$C" ip route replace default via 198.18.1.1
	inns "$C" ip -6 route replace default via fd00:1::1
	inns "$S" ip route replace default via 198.18.2.1
	inns "$S" ip -6 route replace default via fd00:2::1
	inns "$U" ip route replace default via 198.18.3.1
	inns "$U" ip -6 route replace default via fd00:3::1
	inns "$G" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
		net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
}

# link NS_A IF_A NS_B IF_B SUBNET HOST_A HOST_B
link() {
	ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
	inns "$1" ip addr add "198.18.$5.$6/24" dev "$2"
	inns "$3" ip addr add "198.18.$5.$7/24" dev "$4"
	inns "$1" ip addr add "fd00:$5::$6/64" dev "$2" nodad
	inns "$3" ip addr add "fd00:$5::$7/64" dev "$4" nodad
	inns "$1" ip link set "$2" up
	inns "$3" ip link set "$4" up
}

down() {
	for ns in $C $G $S $U; do
		[ -e "/run/netns/$ns" ] || continue
		pids=$(ip netns pids "$ns" 2>/dev/null || true)
		[ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
		ip netns del "$ns" 2>/dev/null || true
	done
}

markcount() {
	local mark=${3:-}
	[ -n "$mark" ] || die "usage: netns.sh markcount ID MARK"
	for ipt in iptables ip6tables; do
		inns "$G" $ipt -w -t mangle -A OUTPUT -m mark --mark "$mark" -m comment --comment detour-marked
	done
}

case "$cmd" in
up) down; up ;;
down) down ;;
markcount) markcount "$@" ;;
*) die "unknown command '$cmd' (want up, down or markcount)" ;;
esac
