#!/bin/sh
# Installs fieldsync as a systemd service on a device without the Debian package
# (Buildroot, Yocto, Alpine-with-systemd, a hand-made image). Does what the package does.
#
#   sudo deploy/install.sh BINARY            install or upgrade, enable and (re)start
#   sudo deploy/install.sh --no-start BINARY install and enable, do not start
#   sudo deploy/install.sh --uninstall       stop, disable, remove binary and unit
#                                            (keeps config, queue, photos and the user)
#
# Run from a checkout or an unpacked release (it reads deploy/ and config/ beside it).
# DESTDIR=/path installs into an image root instead of the running system: systemctl is
# not called, and the user and the folders' owners come at first boot from the
# sysusers.d and tmpfiles.d files it installs (systemd-sysusers, systemd-tmpfiles).
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
dest=${DESTDIR:-}
start=yes
case "${1:-}" in
--uninstall)
    if [ -z "$dest" ] && [ -d /run/systemd/system ]; then
        systemctl disable --now fieldsync.service 2>/dev/null || true
    fi
    rm -f "$dest/usr/bin/fieldsync" "$dest/etc/systemd/system/fieldsync.service"
    [ -z "$dest" ] && [ -d /run/systemd/system ] && systemctl daemon-reload
    echo "fieldsync removed; kept /etc/fieldsync, /var/lib/fieldsync, /var/spool/fieldsync and user fieldsync"
    exit 0
    ;;
--no-start)
    start=no
    shift
    ;;
esac
[ $# -eq 1 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
bin=$1
[ -x "$bin" ] || { echo "install: $bin is not an executable" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || [ -n "$dest" ] || { echo "install: run as root" >&2; exit 1; }

# The system user: no login shell, home is the state directory.
if [ -z "$dest" ] && ! getent passwd fieldsync >/dev/null; then
    if command -v adduser >/dev/null 2>&1 && adduser --help 2>&1 | grep -q -- --system; then
        adduser --system --group --quiet --home /var/lib/fieldsync --no-create-home \
            --shell /usr/sbin/nologin fieldsync
    else
        groupadd --system fieldsync 2>/dev/null || true
        useradd --system --gid fieldsync --home-dir /var/lib/fieldsync --no-create-home \
            --shell /usr/sbin/nologin fieldsync
    fi
fi
owner() { [ -z "$dest" ] && chown "$@"; return 0; }

install -d -m 0755 "$dest/usr/bin" "$dest/etc/systemd/system"
# Atomic replace: a running daemon keeps its old inode until the restart below.
install -m 0755 "$bin" "$dest/usr/bin/.fieldsync.new"
mv -f "$dest/usr/bin/.fieldsync.new" "$dest/usr/bin/fieldsync"
# Local units live in /etc/systemd/system (the package's in /lib/systemd/system).
install -m 0644 "$here/deploy/fieldsync.service" "$dest/etc/systemd/system/fieldsync.service"

if [ -n "$dest" ]; then
    install -d -m 0755 "$dest/usr/lib/sysusers.d" "$dest/usr/lib/tmpfiles.d"
    install -m 0644 "$here/deploy/image/fieldsync.sysusers" "$dest/usr/lib/sysusers.d/fieldsync.conf"
    install -m 0644 "$here/deploy/image/fieldsync.tmpfiles" "$dest/usr/lib/tmpfiles.d/fieldsync.conf"
fi

install -d -m 0750 "$dest/etc/fieldsync"
if [ ! -e "$dest/etc/fieldsync/fieldsync.toml" ]; then
    install -m 0640 "$here/config/fieldsync.toml" "$dest/etc/fieldsync/fieldsync.toml"
else
    echo "install: keeping existing /etc/fieldsync/fieldsync.toml"
fi
owner root:fieldsync "$dest/etc/fieldsync" "$dest/etc/fieldsync/fieldsync.toml"

install -d -m 0750 "$dest/var/lib/fieldsync" "$dest/var/lib/fieldsync/outbox"
owner fieldsync:fieldsync "$dest/var/lib/fieldsync" "$dest/var/lib/fieldsync/outbox"
install -d -m 0755 "$dest/var/spool/fieldsync"
if [ ! -d "$dest/var/spool/fieldsync/capture" ]; then
    install -d -m 2770 "$dest/var/spool/fieldsync/capture"
    owner root:fieldsync "$dest/var/spool/fieldsync/capture"
fi

if [ -z "$dest" ]; then
    "$dest/usr/bin/fieldsync" --config /etc/fieldsync/fieldsync.toml config check
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable fieldsync.service
        [ "$start" = yes ] && systemctl restart fieldsync.service
        systemctl --no-pager --lines=0 status fieldsync.service || true
    else
        echo "install: systemd is not running; start fieldsync with your init system"
    fi
fi
echo "installed: $("$bin" --version 2>/dev/null || echo "fieldsync (cross-built)")"
