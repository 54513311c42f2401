#!/usr/bin/env bash
# Builds the fieldsync Debian package from an already built binary, for any architecture:
#
#   deploy/build-deb.sh BINARY DEB_ARCH [OUT_DIR]
#   cargo build --locked --release --no-default-features
#   deploy/build-deb.sh target/release/fieldsync amd64 target/deb
#   deploy/build-deb.sh target/cross/aarch64-unknown-linux-gnu/release/fieldsync arm64 target/deb
#
# The package is for devices: give it the device build (`--no-default-features`: no fleet
# view, no benchmarks; README "Builds"). Any build packages, as the tests do with theirs.
#
# Needs only dpkg-deb and readelf (binutils), so it packages a cross-built binary on the
# build host without cargo-deb or debhelper. Prints the path of the .deb.
# DEB_COMPRESSION=xz|gzip|none (default xz; the tests use none for a debug binary).
#
# Layout (checked by tests/deploy.rs and .ci/arm.sh):
#   /usr/bin/fieldsync                         0755 root:root
#   /etc/fieldsync/fieldsync.toml              conffile (postinst: root:fieldsync 0640)
#   /lib/systemd/system/fieldsync.service      0644
#   /usr/share/doc/fieldsync/{README.md,copyright}
#   postinst: system user `fieldsync`, /var/lib/fieldsync (state), /var/spool/fieldsync/capture
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 BINARY DEB_ARCH [OUT_DIR]" >&2; exit 2; }
bin=$1
arch=$2
out=${3:-target/deb}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$bin" ] || { echo "build-deb: $bin is not an executable" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n1)
deb_version="${version}-1"

# The newest glibc symbol version the binary needs (none for a static musl build).
glibc=$(readelf -V --wide "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -n1 || true)
# https remotes and MQTT over TLS trust the system store (README, "Trusted roots").
depends="adduser, ca-certificates"
[ -n "$glibc" ] && depends="libc6 (>= $glibc), $depends"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/fieldsync"
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/etc/fieldsync" \
    "$pkg/lib/systemd/system" "$pkg/usr/share/doc/fieldsync"
install -m 0755 "$bin" "$pkg/usr/bin/fieldsync"
install -m 0644 "$root/config/fieldsync.toml" "$pkg/etc/fieldsync/fieldsync.toml"
install -m 0644 "$root/deploy/fieldsync.service" "$pkg/lib/systemd/system/fieldsync.service"
install -m 0644 "$root/README.md" "$pkg/usr/share/doc/fieldsync/README.md"
cat >"$pkg/usr/share/doc/fieldsync/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fieldsync
Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
for s in postinst prerm postrm; do
    install -m 0755 "$root/deploy/debian/$s" "$pkg/DEBIAN/$s"
done
echo /etc/fieldsync/fieldsync.toml >"$pkg/DEBIAN/conffiles"

size_kb=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<EOF
Package: fieldsync
Version: $deb_version
Architecture: $arch
Maintainer: fieldsync maintainers <fieldsync@localhost>
Installed-Size: $size_kb
Depends: $depends
Section: net
Priority: optional
Description: durable uploader of inspection photos for field devices
 fieldsync watches the capture folder of an inspection app, records every
 photo against its checklist row in a crash-safe SQLite queue, and uploads it
 to object storage whenever connectivity allows. Runs as a hardened systemd
 service under its own user.
EOF
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums" "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles"

mkdir -p "$out"
deb="$out/fieldsync_${deb_version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$pkg" "$deb" >/dev/null
echo "$deb"
