#!/usr/bin/env bash
# demo.sh BINARY: a throwaway gateway in network namespaces. A client
# namespace talks to a server namespace through a gateway namespace whose
# kernel redirects every TCP connection to detour; the client uses plain curl
# and knows nothing of the proxy. Everything is removed at the end, also on
# Ctrl-C or failure.
set -euo pipefail
bin=$(realpath "${1:?usage: demo.sh path/to/detour}")
here=$(dirname "$(realpath "$0")")
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }

id=dm$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')
log=$(mktemp /tmp/detour-demo-XXXXXX.log)
cleanup() {
	# detour stops on SIGTERM (draining connections); then the namespaces go.
	kill -TERM $(jobs -p) 2>/dev/null || true
	wait 2>/dev/null || true
	"$here/netns.sh" down "$id"
	rm -rf "${www:-}" "$log"
	echo "== cleaned up: namespaces $id-* removed"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n== %s\n' "$*"; }
client() { ip netns exec "$id-c" "$@"; }

say "topology: client $id-c ── gateway $id-g (detour) ── server $id-s"
"$here/netns.sh" up "$id"

say "server: python3 http.server on port 80 (IPv4 and IPv6)"
www=$(mktemp -d)
echo "hello from the server namespace" >"$www/index.html"
head -c 50000000 /dev/urandom >"$www/big.bin"
(cd "$www" && exec ip netns exec "$id-s" python3 -m http.server 80 --bind :: >/dev/null 2>&1) &

# The demo's addresses (198.18.0.0/15, fd00::/8) are in detour's default
# bypass list of private and reserved ranges: --bypass none captures them.
say "gateway: detour run --listen :7777 --mode redirect --install-rules --bypass none"
ip netns exec "$id-g" "$bin" run --listen :7777 --mode redirect --install-rules --bypass none >"$log" 2>&1 &
detour_pid=$!
for _ in $(seq 50); do
	# detour logs "listening" once its rules are in.
	grep -q 'msg=listening' "$log" &&
		ip netns exec "$id-s" ss -Hltn 'sport = :80' | grep -q . && break
	sleep 0.1
done
say "the kernel rules detour installed (detour rules show)"
ip netns exec "$id-g" "$bin" rules show | sed 's/^/   /'

say "client: curl http://198.18.2.2/   (by IP, IPv4)"
client curl -sS -m 10 http://198.18.2.2/
say "client: curl http://[fd00:2::2]/   (by IP, IPv6)"
client curl -sS -m 10 'http://[fd00:2::2]/'
say "client: curl http://www.demo.test/   (by name: detour sniffs the Host header, see host= below)"
client curl -sS -m 10 --resolve www.demo.test:80:198.18.2.2 http://www.demo.test/
say "client: 50 MB download, checksum compared with the server's file"
want=$(sha256sum <"$www/big.bin" | cut -c1-64)
got=$(client curl -sS -m 60 http://198.18.2.2/big.bin | sha256sum | cut -c1-64)
[ "$want" = "$got" ] && echo "   sha256 match: $got" || { echo "   MISMATCH: $got != $want"; exit 1; }
say "client: a connection straight to detour's own port is refused"
client curl -sS -m 5 http://198.18.1.1:7777/ || true

sleep 0.2
say "detour's log (one access line per connection)"
sed 's/^/   /' "$log"

say "SIGTERM: detour drains, removes its rules and exits"
kill -TERM "$detour_pid" 2>/dev/null || true
wait "$detour_pid" 2>/dev/null || true
tail -n 3 "$log" | sed 's/^/   /'
ip netns exec "$id-g" "$bin" rules show | sed 's/^/   /'
