#!/usr/bin/env bash
# capture-proxy-flights.sh records what real proxy clients send to an
# explicit proxy port — HTTP forward-proxy request heads (absolute-form and
# CONNECT), SOCKS5 and SOCKS4a handshakes — into
# tunnel/proxyport/testdata/flights/, the seed corpus of the proxyport fuzz
# targets (files http-* seed FuzzRequest, socks* seed FuzzSOCKS).
#
# Loopback only: each client is pointed at a listener of
# tunnel/proxyport/internal/capture on 127.0.0.1, which answers a SOCKS
# handshake up to the request, records the bytes and refuses the request.
# The names asked for (site.test) are never resolved: the proxy is asked for
# them. As root where unshare(1) works, the whole run happens in a fresh
# network namespace whose only interface is lo.
#
# Every client is bounded by timeout(1). A client that is missing or fails
# is reported and its previous capture, if any, is kept. Exits 1 if any
# failed.
#
# Usage: scripts/capture-proxy-flights.sh   (from anywhere in the repo)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
flights=$repo/tunnel/proxyport/testdata/flights

if [[ -z ${CAPTURE_BIN:-} ]]; then
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	(cd "$repo" && go build -o "$work/capture" ./tunnel/proxyport/internal/capture)
	export CAPTURE_BIN=$work/capture CAPTURE_WORK=$work
	if [[ $(id -u) == 0 ]] && unshare --net true 2>/dev/null; then
		echo "capturing inside a new network namespace (loopback only)"
		unshare --net "$0" "$@" && exit 0 || exit $?
	fi
fi
if [[ $(id -u) == 0 ]] && command -v ip >/dev/null; then
	ip link set lo up 2>/dev/null || true
fi
mkdir -p "$flights"
failed=()
count=0

# capture NAME [capture flags] -- CLIENT...
capture() {
	local name=$1
	shift
	if timeout 90 "$CAPTURE_BIN" -out "$CAPTURE_WORK/$name" "$@"; then
		mv "$CAPTURE_WORK/$name" "$flights/$name"
		count=$((count + 1))
	else
		echo "FAILED: $name" >&2
		failed+=("$name")
	fi
}

have() { command -v "$1" >/dev/null || { echo "missing: $1" >&2; return 1; }; }

if have curl; then
	c=(timeout 20 curl -sS -o /dev/null --max-time 10)
	capture http-curl-get -- "${c[@]}" -x "http://{addr}" "http://site.test/path?q=1"
	capture http-curl-auth -- "${c[@]}" -x "http://alice:secret@{addr}" "http://site.test/"
	capture http-curl-post -- "${c[@]}" -x "http://{addr}" -d "a=1&b=2" "http://site.test/form"
	capture http-curl-chunked -- "${c[@]}" -x "http://{addr}" -H "Transfer-Encoding: chunked" -d "hello" "http://site.test/upload"
	capture http-curl-connect -- "${c[@]}" -x "http://{addr}" "https://site.test/"
	capture http-curl-connect-auth -- "${c[@]}" -x "http://alice:secret@{addr}" "https://site.test/"
	capture http-curl-http10 -- "${c[@]}" --proxy1.0 "{addr}" "http://site.test/"
	capture socks5-curl-hostname -- "${c[@]}" --socks5-hostname "{addr}" "http://site.test/"
	capture socks5-curl-ip -- "${c[@]}" --socks5 "{addr}" "http://198.18.0.1/"
	capture socks5-curl-auth -users alice:secret -- "${c[@]}" -x "socks5h://alice:secret@{addr}" "http://site.test/"
	capture socks4a-curl -- "${c[@]}" --socks4a "{addr}" "http://site.test/"
else
	failed+=(curl)
fi

if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import requests' 2>/dev/null; then
	capture http-python-requests -- timeout 20 env HTTP_PROXY="http://{addr}" /usr/bin/python3 -c '
import requests
try:
    requests.get("http://site.test/py", timeout=10)
except requests.RequestException:
    pass
'
else
	echo "missing: python3-requests" >&2
	failed+=(python3-requests)
fi

chromium=$(command -v chromium || command -v chromium-browser || true)
if [[ -n $chromium ]]; then
	chrome() {
		local profile
		profile=$(mktemp -d)
		timeout 60 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic \
			--no-first-run --disable-background-networking --disable-component-update \
			--disable-sync --disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable,NetworkTimeServiceQuerying \
			--user-data-dir="$profile" --proxy-server="$1" \
			--dump-dom "$2" >/dev/null 2>&1 || true
		rm -rf "$profile"
	}
	export -f chrome
	export chromium
	capture http-chromium-get -host site.test -- bash -c 'chrome "$0" "$1"' "http://{addr}" "http://site.test/"
	capture http-chromium-connect -host site.test -- bash -c 'chrome "$0" "$1"' "http://{addr}" "https://site.test/"
	capture socks5-chromium -host site.test -- bash -c 'chrome "$0" "$1"' "socks5://{addr}" "http://site.test/"
else
	echo "missing: chromium" >&2
	failed+=(chromium)
fi

echo "captured $count flights into $flights"
if ((${#failed[@]})); then
	echo "failed: ${failed[*]}" >&2
	exit 1
fi
