#!/usr/bin/env bash
# build-deb.sh [OUTDIR]: builds OUTDIR/detour_VERSION_ARCH.deb (default
# OUTDIR bin) with dpkg-deb, reproducibly: the same commit gives the same
# bytes (SOURCE_DATE_EPOCH, default the commit's time, for every mtime and
# the changelog date; root owner and group; a build without build IDs or
# paths). `make deb` runs it.
#
#   /usr/bin/detour                        static-pie (CGO_ENABLED=0 -buildmode=pie)
#   /usr/lib/systemd/system/detour.service scripts/detour.service for /usr/bin,
#                                          with --config /etc/detour/config.yaml
#   /etc/detour/config.yaml                scripts/deb/config.yaml, every field
#                                          commented; a conffile
#   /usr/share/doc/detour                  copyright, changelog.gz
#
# Installing starts nothing; removing stops the service and removes detour's
# rules; purging removes the configuration (scripts/deb/postinst, prerm,
# postrm).
#
# Environment: DEB_VERSION (default from git describe: a tag vX.Y.Z gives
# X.Y.Z, no tag 0.0~gitYYYYMMDD.HASH), DEB_ARCH (amd64 or arm64; default
# amd64), DEB_MAINTAINER, SOURCE_DATE_EPOCH, GO (default go).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${1:-$root/bin}
GO=${GO:-go}
arch=${DEB_ARCH:-amd64}
case $arch in amd64|arm64) ;; *) echo "build-deb.sh: DEB_ARCH $arch: want amd64 or arm64" >&2; exit 2 ;; esac
maintainer=${DEB_MAINTAINER:-detour maintainers <detour-proxy@users.noreply.github.com>}
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
: "${SOURCE_DATE_EPOCH:=$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH

version=${DEB_VERSION:-}
if [ -z "$version" ]; then
	desc=$(git -C "$root" describe --tags --always --dirty 2>/dev/null || echo unknown)
	case $desc in
	v[0-9]*) version=${desc#v} ;;
	*) version="0.0~git$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d).$desc" ;;
	esac
	version=${version//-/+} # no Debian revision: a native package
fi
case $version in
[0-9]*) ;;
*) echo "build-deb.sh: version '$version' must start with a digit" >&2; exit 2 ;;
esac
if [[ $version =~ [^A-Za-z0-9.+~] ]]; then
	echo "build-deb.sh: version '$version' may hold only letters, digits and . + ~" >&2
	exit 2
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=$stage/pkg
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/lib/systemd/system" "$pkg/etc/detour" "$pkg/usr/share/doc/detour"

# A static PIE (lintian: a static binary that is not PIE is an error).
(cd "$root" && CGO_ENABLED=0 GOOS=linux GOARCH=$arch "$GO" build -trimpath -buildvcs=false -buildmode=pie \
	-ldflags "-s -w -buildid= -X main.version=$version" -o "$pkg/usr/bin/detour" ./cmd/detour)
chmod 0755 "$pkg/usr/bin/detour"

sed -e '1,3c\
# detour.service (Debian package): detour on a gateway, with the kernel rules\
# it installs itself. Not enabled on install: edit /etc/detour/config.yaml,\
# then `systemctl enable --now detour`; rule flags go into ExecStart\
# (`systemctl edit detour`).' \
	-e 's|/usr/local/bin/detour|/usr/bin/detour|g' \
	-e 's|^ExecStart=.*|ExecStart=/usr/bin/detour run --config /etc/detour/config.yaml --install-rules|' \
	"$here/detour.service" >"$pkg/usr/lib/systemd/system/detour.service"
install -m 0644 "$here/deb/config.yaml" "$pkg/etc/detour/config.yaml"
install -m 0644 "$here/deb/copyright" "$pkg/usr/share/doc/detour/copyright"
date=$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")
printf 'detour (%s) unstable; urgency=medium\n\n  * detour %s, built from commit %s.\n\n -- %s  %s\n' \
	"$version" "$version" "$commit" "$maintainer" "$date" | gzip -9n >"$pkg/usr/share/doc/detour/changelog.gz"
chmod 0644 "$pkg/usr/share/doc/detour/changelog.gz"

for s in postinst prerm postrm; do
	install -m 0755 "$here/deb/$s" "$pkg/DEBIAN/$s"
done
echo /etc/detour/config.yaml >"$pkg/DEBIAN/conffiles"
(cd "$pkg" && find usr -type f | LC_ALL=C sort | xargs md5sum) >"$pkg/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<CONTROL
Package: detour
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Suggests: iptables | nftables
Section: net
Priority: optional
Homepage: https://github.com/detour-proxy/detour
Description: transparent TCP and UDP proxy for Linux gateways
 detour takes the TCP connections (and, with TPROXY, the UDP flows: QUIC,
 DNS) of a LAN's clients at the gateway
 (iptables or nftables REDIRECT, or TPROXY with policy routing), finds
 where each was going (and, from the first bytes, which host name) and
 carries it there directly or through HTTP CONNECT and SOCKS5 upstream
 proxies, chosen by rules on names, addresses, ports and protocols.
 .
 It installs and removes its own kernel rules: iptables through the
 iptables commands, or one nftables table over netlink, which needs no
 nft or iptables command.
CONTROL
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"
find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$out"
deb=$out/detour_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
