#!/usr/bin/env bash
# capture-upstream-replies.sh records what real upstream proxies answer to
# detour's client handshake — dante and microsocks (SOCKS5, with and without
# RFC 1929 authentication), squid (HTTP CONNECT, with and without Basic
# auth) — into tunnel/upstream/testdata/replies/, the seed corpus of the
# reply fuzz targets (files socks5-* seed FuzzSOCKS5Reply, http-* seed
# FuzzHTTPConnectReply; "-auth" in a name means the client offered
# credentials).
#
# Loopback only, as root, inside a fresh network namespace (unshare --net)
# whose only interface is lo: the proxies listen on 127.0.0.1 and ::1, and
# the targets are tunnel/upstream/internal/capture's own loopback server
# (it speaks first, so a reply is captured with the server's first bytes
# behind it), a loopback port nobody listens on, a port the proxies' rules
# deny, and (SOCKS5 only: squid would wait for its DNS timeout) a name no
# resolver knows.
#
# Every proxy and client is bounded by timeout(1) and stopped at the end.
# A capture that fails is reported and its previous file, if any, is kept.
# Exits 1 if any failed.
#
# Usage: scripts/capture-upstream-replies.sh   (root; from anywhere in the repo)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
replies=$repo/tunnel/upstream/testdata/replies

if [[ -z ${CAPTURE_BIN:-} ]]; then
	if [[ $(id -u) != 0 ]] || ! unshare --net true 2>/dev/null; then
		echo "run as root where unshare --net works: the proxies run in a namespace of their own" >&2
		exit 1
	fi
	for tool in danted microsocks squid; do
		command -v "$tool" >/dev/null || { echo "missing: $tool (scripts/install-deps.sh installs it)" >&2; exit 1; }
	done
	work=$(mktemp -d)
	chmod 755 "$work"
	trap 'rm -rf "$work"' EXIT
	(cd "$repo" && go build -o "$work/capture" ./tunnel/upstream/internal/capture)
	export CAPTURE_BIN=$work/capture CAPTURE_WORK=$work
	echo "capturing inside a new network namespace (loopback only)"
	unshare --net "$0" "$@" && exit 0 || exit $?
fi

ip link set lo up
work=$CAPTURE_WORK
mkdir -p "$replies"
pids=()
stop() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop EXIT

# dante: no authentication on 1080; port 9 is denied by its rules.
cat >"$work/danted.conf" <<CONF
logoutput: $work/danted.log
internal: 127.0.0.1 port = 1080
internal: ::1 port = 1080
external: lo
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {
	from: 0/0 to: 0/0
}
socks block {
	from: 0/0 to: 0/0 port = 9
}
socks pass {
	from: 0/0 to: 0/0
	command: connect
}
CONF
timeout 120 danted -f "$work/danted.conf" -p "$work/danted.pid" &
pids+=($!)

# microsocks: user alice, password s3cret, on 1081.
timeout 120 microsocks -i 127.0.0.1 -p 1081 -u alice -P s3cret >"$work/microsocks.log" 2>&1 &
pids+=($!)

# squid: CONNECT on 3128 for anyone but to port 9, on 3129 with Basic auth.
mkdir -p "$work/squid"
printf 'alice:%s\n' "$(openssl passwd -apr1 s3cret)" >"$work/squid/passwd"
cat >"$work/squid/squid.conf" <<CONF
http_port 127.0.0.1:3128
http_port 127.0.0.1:3129 name=auth
visible_hostname detour-capture
cache_effective_user proxy
pid_filename $work/squid/squid.pid
access_log none
cache_log $work/squid/cache.log
cache_store_log none
netdb_filename none
coredump_dir $work/squid
cache deny all
pinger_enable off
shutdown_lifetime 0 seconds
hosts_file /etc/hosts
dns_nameservers 127.0.0.1
auth_param basic program /usr/lib/squid/basic_ncsa_auth $work/squid/passwd
auth_param basic realm detour-capture
acl authport myportname auth
acl authed proxy_auth REQUIRED
acl nine port 9
http_access deny nine
http_access allow authport authed
http_access deny authport
http_access allow all
CONF
chown -R proxy: "$work/squid"
timeout 120 squid -N -n "detourcap$$" -f "$work/squid/squid.conf" &
pids+=($!)

# Wait for the listeners (ss), at most 15 s.
for _ in $(seq 150); do
	up=$(ss -Hltn | awk '{print $4}')
	if grep -qx '127.0.0.1:1080' <<<"$up" && grep -qx '127.0.0.1:1081' <<<"$up" &&
		grep -qx '127.0.0.1:3128' <<<"$up" && grep -qx '127.0.0.1:3129' <<<"$up"; then
		break
	fi
	sleep 0.1
done

failed=()
count=0
# capture NAME PROXY TARGET
capture() {
	if timeout 30 "$CAPTURE_BIN" -out "$work/$1" -proxy "$2" -target "$3"; then
		mv "$work/$1" "$replies/$1"
		count=$((count + 1))
	else
		echo "FAILED: $1" >&2
		failed+=("$1")
	fi
}

dante=socks5://127.0.0.1:1080
capture socks5-dante-ipv4 "$dante" '127.0.0.1:{banner}'
capture socks5-dante-ipv6 "$dante" '[::1]:{banner6}'
capture socks5-dante-name "$dante" 'localhost:{banner}'
capture socks5-dante-refused "$dante" '127.0.0.1:{dead}'
capture socks5-dante-denied "$dante" '127.0.0.1:9'
capture socks5-dante-unresolvable "$dante" 'nonexistent.invalid:443'
capture socks5-dante-ipv6-proxy "socks5://[::1]:1080" '127.0.0.1:{banner}'
capture socks5-dante-auth-offered "socks5://alice:s3cret@127.0.0.1:1080" '127.0.0.1:{banner}'

micro=socks5://alice:s3cret@127.0.0.1:1081
capture socks5-microsocks-auth-ipv4 "$micro" '127.0.0.1:{banner}'
capture socks5-microsocks-auth-ipv6 "$micro" '[::1]:{banner6}'
capture socks5-microsocks-auth-name "$micro" 'localhost:{banner}'
capture socks5-microsocks-auth-refused "$micro" '127.0.0.1:{dead}'
capture socks5-microsocks-auth-unresolvable "$micro" 'nonexistent.invalid:443'
capture socks5-microsocks-auth-wrong "socks5://alice:wrong@127.0.0.1:1081" '127.0.0.1:{banner}'
capture socks5-microsocks-noauth "socks5://127.0.0.1:1081" '127.0.0.1:{banner}'

capture http-squid-200 http://127.0.0.1:3128 '127.0.0.1:{banner}'
capture http-squid-200-ipv6 http://127.0.0.1:3128 '[::1]:{banner6}'
capture http-squid-403 http://127.0.0.1:3128 '127.0.0.1:9'
capture http-squid-503 http://127.0.0.1:3128 '127.0.0.1:{dead}'
capture http-squid-auth-200 http://alice:s3cret@127.0.0.1:3129 '127.0.0.1:{banner}'
capture http-squid-407 http://127.0.0.1:3129 '127.0.0.1:{banner}'
capture http-squid-auth-407 http://alice:wrong@127.0.0.1:3129 '127.0.0.1:{banner}'

echo "captured $count replies into $replies"
if ((${#failed[@]})); then
	echo "failed: ${failed[*]}" >&2
	exit 1
fi
