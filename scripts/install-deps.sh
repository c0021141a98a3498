#!/usr/bin/env bash
# install-deps.sh: installs the Debian packages that `make demo`, `make test`
# and `make bench` use, and the Go modules. Does nothing for what is already
# there, so it is cheap to run before every target.
set -euo pipefail

packages=(
	iproute2    # ip netns, veth, policy routing
	iptables    # iptables/ip6tables (nft backend) for the capture rules
	curl        # real client in the demo and tests
	openssl     # TLS server and client in the demo and sniff corpus
	gnutls-bin  # gnutls-cli, for the sniff corpus
	python3     # http.server in the demo
	procps      # ps, pkill
	kmod        # modprobe, for the kernel checks
	chromium    # a real browser client in the sniff tests
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || { echo "install-deps.sh: missing ${missing[*]}; run as root to install them" >&2; exit 1; }
	echo "install-deps.sh: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v go >/dev/null; then
	echo "install-deps.sh: Go is not on PATH (expected /usr/local/go/bin)" >&2
	exit 1
fi
go mod download
