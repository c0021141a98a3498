#!/usr/bin/env bash
# setup.sh: installs detour on a real gateway.
#
#   setup.sh [--dry-run] [--root DIR] [--binary PATH] [--sysctl] [--no-start] [-- RUN-FLAGS...]
#
#   1. checks the machine: Linux, root, iproute2 and iptables, the binary,
#      and `detour rules check` with the rule flags among RUN-FLAGS;
#   2. with --sysctl only: sets what the rules need (IPv4 and IPv6 forwarding;
#      for TPROXY, loose rp_filter where it is strict) now and persistently
#      in /etc/sysctl.d/90-detour.conf, keeping the old values for teardown;
#   3. installs the binary as /usr/local/bin/detour;
#   4. installs /etc/systemd/system/detour.service (scripts/detour.service)
#      running `detour run --install-rules RUN-FLAGS`, and enables and starts
#      it (--no-start: enables only) where systemd runs.
#
# --dry-run prints the plan and changes nothing. --root DIR writes the files
# under DIR instead of / (an image, or a test), and then never calls
# systemctl; sysctls are still set in the current network namespace's
# kernel (net.* sysctls are per network namespace). scripts/teardown.sh
# undoes all of it.
set -euo pipefail

here=$(dirname "$(realpath "$0")")
dry=0 root=/ binary=$(realpath -m "$here/../bin/detour") sysctl=0 start=1
flags=()
die() { echo "setup.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
	case "$1" in
	--dry-run) dry=1 ;;
	--root) root=${2:?--root needs a directory}; shift ;;
	--root=*) root=${1#*=} ;;
	--binary) binary=${2:?--binary needs a path}; shift ;;
	--binary=*) binary=${1#*=} ;;
	--sysctl) sysctl=1 ;;
	--no-start) start=0 ;;
	--) shift; flags=("$@"); break ;;
	-h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown option '$1' (see --help)" ;;
	esac
	shift
done
plain='^[][A-Za-z0-9_.:/,=+@-]+$'
for f in "${flags[@]}"; do
	# Written into ExecStart as they are: keep to what needs no quoting.
	[[ "$f" =~ $plain ]] || die "run flag '$f' holds a character the unit file cannot carry unquoted"
done
root=$(realpath -m "$root")
at() { echo "${root%/}$1"; }

step() { printf '\n== %s\n' "$*"; }
# act CMD...: prints a command, and runs it unless this is a dry run.
act() {
	echo "+ $*"
	[ $dry = 1 ] || "$@"
}
# write PATH MODE: writes stdin to PATH (printing it on a dry run).
write() {
	local path=$1 mode=$2 body
	body=$(cat)
	echo "+ write $path (mode $mode):"
	printf '%s\n' "$body" | sed 's/^/    /'
	[ $dry = 1 ] && return
	mkdir -p "$(dirname "$path")"
	printf '%s\n' "$body" >"$path.tmp"
	chmod "$mode" "$path.tmp"
	mv "$path.tmp" "$path"
}

# The rule flags among the run flags: `detour rules check` takes only those.
rule_flags=()
mode=redirect ipv6=1
i=0
while [ $i -lt ${#flags[@]} ]; do
	f=${flags[$i]} v=${flags[$((i + 1))]:-}
	case "$f" in
	--mode=*) mode=${f#*=} ;;
	--mode) mode=$v ;;
	--ipv6=false|--ipv6=0) ipv6=0 ;;
	esac
	case "$f" in
	--mode|--listen|--mark|--interface|--source|--bypass|--ports|--table|--tproxy-mark)
		rule_flags+=("$f" "$v"); i=$((i + 1)) ;;
	--mode=*|--listen=*|--mark=*|--interface=*|--source=*|--bypass=*|--ports=*|--table=*|--tproxy-mark=*|--ipv6=*|--output|--output=*)
		rule_flags+=("$f") ;;
	esac
	i=$((i + 1))
done

step "checking the machine"
[ "$(uname -s)" = Linux ] || die "detour needs Linux (netfilter, policy routing)"
if [ "$(id -u)" != 0 ]; then
	[ $dry = 1 ] || die "run as root (or with --dry-run)"
	echo "not root: a dry run only"
fi
for tool in ip iptables ip6tables sysctl; do
	if command -v "$tool" >/dev/null; then
		echo "ok: $tool"
	elif [ "$tool" = ip6tables ] && [ $ipv6 = 0 ]; then
		echo "ok: no ip6tables (--ipv6=false)"
	else
		echo "missing: $tool (Debian: apt-get install iproute2 iptables procps)" >&2
		[ $dry = 1 ] || exit 1
	fi
done
[ -x "$binary" ] || die "no detour binary at $binary (make build, or --binary PATH)"
echo "ok: $("$binary" version)"
if [ $dry = 1 ] || [ "$(id -u)" != 0 ]; then
	echo "+ $binary rules check ${rule_flags[*]}   (skipped on a dry run)"
else
	echo "+ $binary rules check ${rule_flags[*]}"
	# Exit status 1: something stops the rules (printed); warnings are
	# printed and setup goes on (--sysctl fixes the sysctl ones).
	"$binary" rules check "${rule_flags[@]}" || die "the machine is not ready for detour's rules (see above)"
fi

if [ $sysctl = 1 ]; then
	step "sysctls (--sysctl)"
	want=("net.ipv4.ip_forward=1")
	[ $ipv6 = 0 ] || want+=("net.ipv6.conf.all.forwarding=1")
	if [ "$mode" = tproxy ]; then
		# The kernel takes the larger of "all" and an interface's value:
		# all=2 makes every interface loose (strict drops asymmetric TPROXY
		# traffic).
		if grep -qx 1 /proc/sys/net/ipv4/conf/*/rp_filter 2>/dev/null; then
			want+=("net.ipv4.conf.all.rp_filter=2")
		fi
	fi
	saved=$(at /var/lib/detour/sysctl.saved)
	if [ $dry = 0 ] && [ ! -e "$saved" ]; then
		mkdir -p "$(dirname "$saved")"
		for kv in "${want[@]}"; do
			echo "${kv%%=*}=$(sysctl -n "${kv%%=*}")"
		done >"$saved"
	fi
	echo "+ keep the current values in $saved (for teardown.sh)"
	for kv in "${want[@]}"; do
		act sysctl -qw "$kv"
	done
	{
		echo "# detour: written by scripts/setup.sh --sysctl, removed by scripts/teardown.sh."
		printf '%s\n' "${want[@]}"
	} | write "$(at /etc/sysctl.d/90-detour.conf)" 0644
	if [ $ipv6 = 1 ]; then
		echo "note: with IPv6 forwarding on, an interface with accept_ra=1 stops taking router advertisements;"
		echo "      set net.ipv6.conf.WAN.accept_ra=2 where the gateway itself configures IPv6 by SLAAC"
	fi
fi

step "binary"
act install -D -m 0755 "$binary" "$(at /usr/local/bin/detour)"

step "systemd unit"
exec_start="/usr/local/bin/detour run --install-rules${flags[*]:+ ${flags[*]}}"
sed "s|^ExecStart=.*|ExecStart=$exec_start|" "$here/detour.service" | write "$(at /etc/systemd/system/detour.service)" 0644
enable=(systemctl enable --now detour.service)
[ $start = 1 ] || enable=(systemctl enable detour.service)
if [ "$root" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
	act systemctl daemon-reload
	act "${enable[@]}"
else
	why="no systemd running"
	[ "$root" = / ] || why="--root $root"
	echo "skipped ($why): systemctl daemon-reload && ${enable[*]}"
fi

step "done$([ $dry = 1 ] && echo " (dry run: nothing was changed)")"
