#!/usr/bin/env bash
# install-deps.sh: installs the Debian packages that `make demo`, `make test`
# and `make bench` use, and the Go modules. Does nothing for what is already
# there, so it is cheap to run before every target.
#
#   install-deps.sh           what the demo and the tests need
#   install-deps.sh --bench   also what only `make bench` needs (test/bench)
set -euo pipefail

packages=(
	iproute2    # ip netns, veth, policy routing
	iptables    # iptables/ip6tables (nft backend) for the capture rules
	nftables    # nft, to read and flush the ruleset in the tests (detour itself talks netlink)
	lintian     # checks the .deb of `make deb` in the package test
	curl        # real client in the demo and tests
	openssl     # TLS server and client in the demo and sniff corpus
	gnutls-bin  # gnutls-cli, for the sniff corpus
	python3     # http.server in the demo
	python3-requests # HTTP_PROXY client in the proxy-port tests and corpus
	procps      # ps, pkill
	kmod        # modprobe, for the kernel checks
	chromium    # a real browser client in the sniff tests (and over QUIC)
	firefox-esr # the other real browser, through upstreams in the browser tests
	bind9-dnsutils # dig, a real DNS client (UDP tests, sniff corpus)
	ngtcp2-client  # gtlsclient, a real QUIC client (UDP tests, sniff corpus)
	squid          # HTTP CONNECT upstream (with Basic auth) in the upstream tests
	dante-server   # danted, SOCKS5 upstream in the upstream tests
	dante-client   # socksify: a SOCKS5 UDP ASSOCIATE client in the proxy-port tests
	microsocks     # SOCKS5 upstream with user/password in the upstream tests
	apache2-utils  # htpasswd, squid's password file in the upstream tests
)

# Only `make bench` (test/bench) uses these; `make test` stays lean.
bench_packages=(
	iperf3      # bulk throughput
	nginx-light # the HTTP server for connections per second
	wrk         # the HTTP client, a new connection per request
	redsocks    # the peer detour is compared with through SOCKS5
	haproxy     # the direct-path anchor (server 0.0.0.0:0, splice both ways)
	util-linux  # prlimit, the open-file limit of the proxies under test
)
case "${1:-}" in
--bench) packages+=("${bench_packages[@]}") ;;
"") ;;
*) echo "install-deps.sh: unknown option '$1' (want --bench or nothing)" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || { echo "install-deps.sh: missing ${missing[*]}; run as root to install them" >&2; exit 1; }
	echo "install-deps.sh: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# nginx and redsocks are daemons: installing them must not start them
	# on the host (the bench runs its own, inside namespaces).
	policy=/usr/sbin/policy-rc.d
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 755 "$policy"
		trap 'rm -f "$policy"' EXIT
	fi
	apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v go >/dev/null; then
	echo "install-deps.sh: Go is not on PATH (expected /usr/local/go/bin)" >&2
	exit 1
fi
go mod download
