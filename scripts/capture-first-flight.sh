#!/usr/bin/env bash
# capture-first-flight.sh records the first bytes ("first flight") that real
# clients send on a new connection — TLS ClientHellos, HTTP/1.x request heads,
# h2c prefaces — into sniff/testdata/flights/, and lists each file with the
# host, protocol, ALPN and ECH flag it must sniff to in sniff/testdata/corpus.txt.
# For UDP it records the first datagrams of a flow — QUIC Initial packets of
# Chromium, ngtcp2 and quic-go, DNS queries of dig — into
# sniff/testdata/datagrams/ (each datagram prefixed with its two-byte length),
# listed in sniff/testdata/udp-corpus.txt, and derives from them the QUIC
# variants of sniff/testdata/quic-variants.txt.
#
# Loopback only. Each client is pointed at a listener of
# sniff/internal/capture on 127.0.0.1 or ::1 that records the first
# connection and closes without answering; host names reach the listener by
# client flags (curl --resolve, chromium --host-resolver-rules), never by DNS.
# Run as root where unshare(1) works, the whole run happens in a fresh network
# namespace whose only interface is lo, so nothing can leave the machine.
#
# Every client is bounded by timeout(1). A client that is missing or fails is
# reported and its previous capture, if any, is kept. Exits 1 if any failed.
#
# Usage: scripts/capture-first-flight.sh [tcp|udp]   (from anywhere in the repo;
#        both by default)
# Clients: curl, openssl, gnutls-cli, python3, chromium, and Go's own clients;
# for UDP: chromium (QUIC), ngtcp2's gtlsclient (Debian's ngtcp2-client),
# quic-go (test/h3server's client mode) and dig.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
testdata=$repo/sniff/testdata
groups=${1:-tcp udp}
case $groups in
"tcp udp" | tcp | udp) ;;
*) echo "usage: $0 [tcp|udp]" >&2; exit 2 ;;
esac

if [[ -z ${CAPTURE_BIN:-} ]]; then
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	(cd "$repo" && go build -o "$work/capture" ./sniff/internal/capture)
	if [[ $groups == *udp* ]]; then
		(cd "$repo" && go build -o "$work/h3server" ./test/h3server)
	fi
	export CAPTURE_BIN=$work/capture CAPTURE_WORK=$work
	if [[ $(id -u) == 0 ]] && unshare --net true 2>/dev/null; then
		echo "capturing inside a new network namespace (loopback only)"
		unshare --net "$0" "$@" && exit 0 || exit $?
	fi
fi
if [[ -n ${CAPTURE_WORK:-} && $(id -u) == 0 ]] && command -v ip >/dev/null; then
	ip link set lo up 2>/dev/null || true
fi

stage=$CAPTURE_WORK/flights
rm -rf "$stage" && mkdir -p "$stage"
manifest=$CAPTURE_WORK/corpus.new
: >"$manifest"
ustage=$CAPTURE_WORK/datagrams
rm -rf "$ustage" && mkdir -p "$ustage"
umanifest=$CAPTURE_WORK/udp-corpus.new
: >"$umanifest"
failed=()

# capture NAME PROTO HOST ALPN ECH [capture flags] -- CLIENT...
# HOST, ALPN and ECH ("ech" or "-") are what sniff must report for it.
capture() {
	local name=$1 proto=$2 host=$3 alpn=$4 ech=$5
	shift 5
	local flags=(-out "$stage/$name" -manifest "$manifest" -proto "$proto" -timeout 60s)
	[[ $host != - ]] && flags+=(-host "$host")
	[[ $alpn != - ]] && flags+=(-alpn "$alpn")
	[[ $ech == ech ]] && flags+=(-ech)
	if ! timeout 90 "$CAPTURE_BIN" "${flags[@]}" "$@"; then
		echo "FAILED: $name" >&2
		failed+=("$name")
	fi
}

# capture_udp NAME PROTO HOST ALPN-OR-QTYPE ECH [capture flags] -- CLIENT...
# Records the first client's datagrams; for quic, ALPN is what the ClientHello
# offers, for dns the QTYPE the query asks for.
capture_udp() {
	local name=$1 proto=$2 host=$3 third=$4 ech=$5
	shift 5
	local flags=(-udp -out "$ustage/$name" -manifest "$umanifest" -proto "$proto" -timeout 60s)
	[[ $host != - ]] && flags+=(-host "$host")
	if [[ $proto == dns ]]; then
		flags+=(-qtype "$third" -max-datagrams 1)
	else
		[[ $third != - ]] && flags+=(-alpn "$third")
		# A client's first flight leaves within milliseconds; its first
		# retransmission comes after a probe timeout, 300 ms or more.
		flags+=(-idle 150ms)
	fi
	[[ $ech == ech ]] && flags+=(-ech)
	if ! timeout 90 "$CAPTURE_BIN" "${flags[@]}" "$@"; then
		echo "FAILED: $name" >&2
		failed+=("$name")
	fi
}

have() { command -v "$1" >/dev/null || { echo "missing: $1" >&2; return 1; }; }

if [[ $groups == *tcp* ]]; then
if have curl; then
	res=(--resolve "curl.example.test:{port}:127.0.0.1")
	capture curl-https.bin tls curl.example.test h2,http/1.1 - \
		-- timeout 20 curl -sk --max-time 15 "${res[@]}" "https://curl.example.test:{port}/"
	capture curl-http.bin http curl.example.test - - \
		-- timeout 20 curl -s --max-time 15 "${res[@]}" "http://curl.example.test:{port}/index.html?q=1"
	capture curl-http10.bin http curl.example.test - - \
		-- timeout 20 curl -s --http1.0 --max-time 15 "${res[@]}" "http://curl.example.test:{port}/"
	capture curl-h2c.bin h2c h2c.example.test - - \
		-- timeout 20 curl -s --http2-prior-knowledge --max-time 15 \
		--resolve "h2c.example.test:{port}:127.0.0.1" "http://h2c.example.test:{port}/"
	capture curl-proxy-absolute.bin http proxied.example.test - - \
		-- timeout 20 curl -s --max-time 15 -x "http://{addr}" "http://proxied.example.test/path"
	capture curl-proxy-connect.bin http connect.example.test - - \
		-- timeout 20 curl -s --max-time 15 -x "http://{addr}" "https://connect.example.test/"
	capture curl-https-ipv6.bin tls - h2,http/1.1 - -listen "[::1]:0" \
		-- timeout 20 curl -sk --max-time 15 "https://[::1]:{port}/"
	capture curl-http-ipv6.bin http - - - -listen "[::1]:0" \
		-- timeout 20 curl -s -g --max-time 15 "http://[::1]:{port}/"
else
	failed+=(curl)
fi

if have openssl; then
	capture openssl-tls12.bin tls openssl12.example.test - - \
		-- timeout 20 openssl s_client -connect "127.0.0.1:{port}" -tls1_2 \
		-servername openssl12.example.test -ign_eof </dev/null
	capture openssl-tls13.bin tls openssl13.example.test h2,http/1.1 - \
		-- timeout 20 openssl s_client -connect "127.0.0.1:{port}" -tls1_3 \
		-servername OpenSSL13.Example.Test -alpn h2,http/1.1 -ign_eof </dev/null
	capture openssl-nosni.bin tls - - - \
		-- timeout 20 openssl s_client -connect "127.0.0.1:{port}" -noservername -ign_eof </dev/null
else
	failed+=(openssl)
fi

if have gnutls-cli; then
	capture gnutls.bin tls gnutls.example.test http/1.1 - \
		-- timeout 20 gnutls-cli --insecure --sni-hostname=gnutls.example.test \
		--alpn=http/1.1 -p "{port}" 127.0.0.1 </dev/null
else
	failed+=(gnutls-cli)
fi

capture go-tls.bin tls go.example.test h2,http/1.1 - -client go-tls -name go.example.test
capture go-http.bin http go.example.test - - -client go-http -name go.example.test
capture go-h2c.bin h2c go-h2c.example.test - - -client go-h2c -name go-h2c.example.test

if have python3; then
	capture python-ssl.bin tls python.example.test h2,http/1.1 - \
		-- timeout 20 python3 -c '
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2", "http/1.1"])
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
try:
    ctx.wrap_socket(s, server_hostname="python.example.test")
except (OSError, ssl.SSLError):
    pass
' "{port}"
else
	failed+=(python3)
fi

chromium=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -n $chromium ]]; then
	chrome() {
		local profile
		profile=$(mktemp -d)
		timeout 60 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic \
			--no-first-run --disable-background-networking --disable-component-update \
			--disable-sync --disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable \
			--user-data-dir="$profile" --host-resolver-rules="MAP * 127.0.0.1" \
			--dump-dom "$1" >/dev/null 2>&1 || true
		rm -rf "$profile"
	}
	export -f chrome
	export chromium
	capture chromium-https.bin tls www.example.test h2,http/1.1 ech \
		-- bash -c 'chrome "$0"' "https://www.example.test:{port}/"
	capture chromium-http.bin http www.example.test - - \
		-- bash -c 'chrome "$0"' "http://www.example.test:{port}/"
else
	echo "missing: chromium" >&2
	failed+=(chromium)
fi
fi # tcp

if [[ $groups == *udp* ]]; then
chromium=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -n $chromium ]]; then
	# Chromium over QUIC: forced for site.test on the capture port, every
	# other name unresolvable. Its post-quantum (X25519MLKEM768) ClientHello
	# takes two or more Initial packets.
	chrome_quic() {
		local profile
		profile=$(mktemp -d)
		timeout 40 "$chromium" --headless --no-sandbox --disable-gpu \
			--no-first-run --disable-background-networking --disable-component-update \
			--disable-sync --user-data-dir="$profile" \
			--enable-quic --origin-to-force-quic-on="site.test:$1" \
			--host-resolver-rules="MAP site.test 127.0.0.1, MAP * ~NOTFOUND" \
			--dump-dom "https://site.test:$1/" >/dev/null 2>&1 || true
		rm -rf "$profile"
	}
	export -f chrome_quic
	export chromium
	capture_udp chromium-quic.bin quic site.test h3 ech \
		-- bash -c 'chrome_quic "$0"' "{port}"
else
	echo "missing: chromium" >&2
	failed+=(chromium-quic)
fi

if have gtlsclient; then
	# ngtcp2's example client (GnuTLS). Debian 12's (ngtcp2 0.12) speaks v1
	# only, and names "localhost" in SNI for a numeric host whatever --sni
	# says.
	ngtcp2() {
		timeout 20 gtlsclient -q --timeout=3s --handshake-timeout=3s --exit-on-first-stream-close \
			"$@" >/dev/null 2>&1 </dev/null || true
	}
	export -f ngtcp2
	capture_udp ngtcp2-quic.bin quic localhost h3 - \
		-- bash -c 'ngtcp2 127.0.0.1 "$0" https://ngtcp2.example.test/' "{port}"
else
	failed+=(gtlsclient)
fi

# quic-go's HTTP/3 client, v1 and v2.
capture_udp quic-go.bin quic quic-go.example.test h3 - \
	-- timeout 20 "$CAPTURE_WORK/h3server" -client "https://quic-go.example.test:{port}/" -connect "{addr}"
capture_udp quic-go-v2.bin quic quic-go-v2.example.test h3 - \
	-- timeout 20 "$CAPTURE_WORK/h3server" -client "https://quic-go-v2.example.test:{port}/" -connect "{addr}" -quic-version 2
capture_udp quic-go-ipv6.bin quic quic-go6.example.test h3 - -listen "[::1]:0" \
	-- timeout 20 "$CAPTURE_WORK/h3server" -client "https://quic-go6.example.test:{port}/" -connect "{addr}"

if have dig; then
	digq() { timeout 10 dig +tries=1 +time=2 "$@" >/dev/null 2>&1 || true; }
	export -f digq
	capture_udp dig-a.bin dns dig.example.test A - \
		-- bash -c 'digq -p "$0" @127.0.0.1 dig.example.test A' "{port}"
	capture_udp dig-aaaa-noedns.bin dns dig6.example.test AAAA - \
		-- bash -c 'digq -p "$0" @127.0.0.1 +noedns dig6.example.test AAAA' "{port}"
	capture_udp dig-https-dnssec.bin dns svc.example.test HTTPS - \
		-- bash -c 'digq -p "$0" @127.0.0.1 +dnssec svc.example.test HTTPS' "{port}"
	capture_udp dig-mx-ipv6.bin dns mixed.example.test MX - -listen "[::1]:0" \
		-- bash -c 'digq -p "$0" @::1 Mixed.Example.TEST. MX' "{port}"
	capture_udp dig-ptr.bin dns 1.2.0.192.in-addr.arpa PTR - \
		-- bash -c 'digq -p "$0" @127.0.0.1 -x 192.0.2.1' "{port}"
	capture_udp dig-txt-underscore.bin dns _dmarc.example.test TXT - \
		-- bash -c 'digq -p "$0" @127.0.0.1 +nocookie _dmarc.example.test TXT' "{port}"
	capture_udp dig-root-ns.bin dns - NS - \
		-- bash -c 'digq -p "$0" @127.0.0.1 . NS' "{port}"
else
	failed+=(dig)
fi
fi # udp

# install MANIFEST STAGE DIR LIST HEADER...: move the fresh captures into
# DIR and rewrite LIST, keeping earlier lines whose capture was not redone.
install_captures() {
	local manifest=$1 stage=$2 dir=$3 list=$4
	shift 4
	mkdir -p "$dir"
	declare -A fresh=()
	while read -r file _; do fresh[$file]=1; done <"$manifest"
	{
		printf '%s\n' "$@"
		cat "$manifest"
		if [[ -f $list ]]; then
			while read -r file rest; do
				if [[ -n $file && $file != \#* && -z ${fresh[$file]:-} && -f $dir/$file ]]; then
					echo "$file $rest"
				fi
			done <"$list"
		fi
	} >"$list.new"
	for file in "${!fresh[@]}"; do
		mv "$stage/$file" "$dir/$file"
	done
	mv "$list.new" "$list"
	echo "captured ${#fresh[@]} into $dir"
}

if [[ $groups == *udp* ]]; then
	install_captures "$umanifest" "$ustage" "$testdata/datagrams" "$testdata/udp-corpus.txt" \
		"# Written by scripts/capture-first-flight.sh: the first datagrams of real" \
		"# UDP clients, in datagrams/ (each datagram prefixed with its two-byte" \
		"# big-endian length), and what sniff must report for each." \
		"# file proto host alpn-or-qtype ech   (- for none; alpn comma-separated; for dns the QTYPE)" \
		"# The two rfc* files are the sample client Initial packets of RFC 9001 A.2" \
		"# and RFC 9369 A.2, not captures."
	# The derived variants (reordered, coalesced, re-framed, v2, cut, noise)
	# follow the new captures.
	(cd "$repo" && go test -count=1 ./sniff -run '^TestQUICVariants$' -update-variants) ||
		failed+=(quic-variants)
fi
if [[ $groups != *tcp* ]]; then
	if ((${#failed[@]})); then
		echo "failed: ${failed[*]}" >&2
		exit 1
	fi
	exit 0
fi

# Install what was captured; keep earlier captures of clients that failed.
mkdir -p "$testdata/flights"
declare -A fresh=()
while read -r file _; do fresh[$file]=1; done <"$manifest"
{
	echo "# Written by scripts/capture-first-flight.sh: first flights of real clients,"
	echo "# in flights/, and what sniff must report for each."
	echo "# file proto host alpn ech   (- for none; alpn comma-separated)"
	cat "$manifest"
	if [[ -f $testdata/corpus.txt ]]; then
		while read -r file rest; do
			if [[ -n $file && $file != \#* && -z ${fresh[$file]:-} && -f $testdata/flights/$file ]]; then
				echo "$file $rest"
			fi
		done <"$testdata/corpus.txt"
	fi
} >"$CAPTURE_WORK/corpus.txt"
for file in "${!fresh[@]}"; do
	mv "$stage/$file" "$testdata/flights/$file"
done
mv "$CAPTURE_WORK/corpus.txt" "$testdata/corpus.txt"

echo "captured ${#fresh[@]} flights into $testdata/flights"
if ((${#failed[@]})); then
	echo "failed: ${failed[*]}" >&2
	exit 1
fi
