#!/usr/bin/env bash
# teardown.sh: undoes scripts/setup.sh.
#
#   teardown.sh [--dry-run] [--root DIR]
#
#   1. stops and disables detour.service where systemd runs (detour removes
#      its rules as it exits);
#   2. `detour rules remove`, for the rules of a run that did not exit
#      cleanly;
#   3. removes the unit, the binary and /etc/sysctl.d/90-detour.conf, and
#      sets the sysctls setup.sh --sysctl changed back to their old values.
#
# --dry-run prints the plan and changes nothing; --root DIR is setup.sh's.
set -euo pipefail

dry=0 root=/
die() { echo "teardown.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
	case "$1" in
	--dry-run) dry=1 ;;
	--root) root=${2:?--root needs a directory}; shift ;;
	--root=*) root=${1#*=} ;;
	-h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown option '$1' (see --help)" ;;
	esac
	shift
done
root=$(realpath -m "$root")
at() { echo "${root%/}$1"; }
[ $dry = 1 ] || [ "$(id -u)" = 0 ] || die "run as root (or with --dry-run)"

step() { printf '\n== %s\n' "$*"; }
act() {
	echo "+ $*"
	[ $dry = 1 ] || "$@"
}
remove() {
	if [ -e "$1" ]; then
		act rm -f "$1"
	else
		echo "already gone: $1"
	fi
}

unit=$(at /etc/systemd/system/detour.service)
bin=$(at /usr/local/bin/detour)
systemd=0
[ "$root" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null && systemd=1

step "service"
if [ $systemd = 1 ]; then
	[ -e "$unit" ] && act systemctl disable --now detour.service
else
	why="no systemd running"
	[ "$root" = / ] || why="--root $root"
	echo "skipped ($why): systemctl disable --now detour.service"
fi

step "kernel rules"
if [ -x "$bin" ]; then
	act "$bin" rules remove
else
	echo "no $bin: nothing to run rules remove with"
fi

step "files"
remove "$unit"
if [ $systemd = 1 ]; then
	act systemctl daemon-reload
fi
remove "$bin"
remove "$(at /etc/sysctl.d/90-detour.conf)"

step "sysctls"
saved=$(at /var/lib/detour/sysctl.saved)
if [ -e "$saved" ]; then
	while IFS= read -r kv; do
		[ -n "$kv" ] && act sysctl -qw "$kv"
	done <"$saved"
	remove "$saved"
	[ $dry = 1 ] || rmdir "$(dirname "$saved")" 2>/dev/null || true
else
	echo "none changed by setup.sh --sysctl"
fi

step "done$([ $dry = 1 ] && echo " (dry run: nothing was changed)")"
