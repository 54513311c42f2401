#!/usr/bin/env bash
# ARM builds and the Debian package, proven on this machine without Docker.
#
# Called by .ci/run after tests/run.sh (a fresh Debian 12 machine, as root). Steps:
#   1. Debian multiarch cross toolchain: rustc-web (rustc 1.96) + its arm64 std, the
#      aarch64 gcc, qemu-user-static. armhf too when the archive serves its std.
#   2. Release build per target with RUSTC=/usr/bin/rustc in target/cross (the host test
#      build in target/ is left alone); stripped size reported, aarch64 and armv7 must stay < 5 MiB.
#      These are device builds (--no-default-features: no fleet view, no benchmarks).
#   3. Smoke test of each ARM binary under qemu-user: --version names the target, a
#      photo dropped into capture lands byte-identical in the file remote, `status --json`
#      counts it synced, SIGTERM exits 0.
#   4. .deb for amd64 and arm64 (deploy/build-deb.sh), contents checked with dpkg-deb;
#      the amd64 one installed: user, modes, conffile, `systemd-analyze verify`/`security`,
#      the installed daemon run as user fieldsync on the packaged config, then purged.
#
# Local use: `.ci/arm.sh` (needs root for apt and dpkg -i). Numbers go to stdout and to
# target/ci-arm/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never DEBIAN_FRONTEND=noninteractive
t0=$SECONDS
out=target/ci-arm
rm -rf "$out"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
say() { echo "arm: $*"; }
note() { echo "$*" | tee -a "$summary"; }
die() { echo "arm: FAILED: $*" >&2; exit 1; }
# Daemons started here are stopped on any exit, so a failure leaves nothing running.
bg_pids=()
cleanup() { for p in "${bg_pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
phase() { say "[$((SECONDS - t0))s] $*"; }
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() { $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }

# ---------------------------------------------------------------- 1. toolchain
phase "toolchain: Debian multiarch"
$SUDO dpkg --add-architecture arm64
$SUDO apt-get update -qq
apt_install rustc-web cargo-web gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
    qemu-user-static binutils dpkg-dev python3 util-linux
rust_version=$(dpkg-query -W -f='${Version}' rustc-web)
# The cross std must be built by exactly this rustc: pin it to the same Debian version.
apt_install "libstd-rust-web-dev:arm64=$rust_version" ||
    die "libstd-rust-web-dev:arm64 $rust_version is not available (apt-cache policy libstd-rust-web-dev:arm64)"
note "rustc for cross builds: $(/usr/bin/rustc --version)"

# armhf: the same, if the archive serves a std for this rustc. An armhf index that fails
# to download also hides bookworm-security's arm64 index, so try it only now and undo it
# when it does not work.
armv7=no
armv7_reason=""
if $SUDO dpkg --add-architecture armhf && $SUDO apt-get update -qq 2>"$out/apt-armhf.err"; then
    cand=$(apt-cache policy libstd-rust-web-dev:armhf | sed -n 's/^  Candidate: //p')
    if [ "$cand" = "$rust_version" ]; then
        if apt_install "libstd-rust-web-dev:armhf=$rust_version" gcc-arm-linux-gnueabihf \
            libc6-dev-armhf-cross; then
            armv7=yes
        else
            armv7_reason="apt could not install libstd-rust-web-dev:armhf=$rust_version"
        fi
    else
        armv7_reason="the archive offers libstd-rust-web-dev:armhf ${cand:-none}, not $rust_version (the rustc-web in use)"
    fi
else
    armv7_reason="apt-get update with armhf failed: $(grep -m1 '^E:' "$out/apt-armhf.err" || echo unknown error)"
fi
if [ "$armv7" = no ]; then
    $SUDO dpkg --remove-architecture armhf 2>/dev/null || true
    $SUDO apt-get update -qq || true
    note "armv7-unknown-linux-gnueabihf: skipped: $armv7_reason"
fi

# ---------------------------------------------------------------- 2. builds
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# cross_build TRIPLE GCC_PREFIX: RUSTC only for this cargo, never exported (the host
# `cargo test` keeps rustup's toolchain and its own target dir).
cross_build() {
    local triple=$1 prefix=$2
    local upper lower
    upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    lower=$(echo "$triple" | tr '-' '_')
    env RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=target/cross FIELDSYNC_GIT_COMMIT="$commit" \
        "CARGO_TARGET_${upper}_LINKER=${prefix}-gcc" "CC_${lower}=${prefix}-gcc" \
        "AR_${lower}=${prefix}-ar" \
        cargo build --locked --release --no-default-features --target "$triple"
}
size_of() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

phase "build aarch64-unknown-linux-gnu (release)"
b0=$SECONDS
cross_build aarch64-unknown-linux-gnu aarch64-linux-gnu
bin_a64=target/cross/aarch64-unknown-linux-gnu/release/fieldsync
s=$(size_of "$bin_a64")
note "aarch64-unknown-linux-gnu: stripped binary $s bytes ($(mib "$s")), built in $((SECONDS - b0))s"
[ "$s" -lt $((5 * 1024 * 1024)) ] || die "aarch64 binary is $(mib "$s"), the budget is 5 MiB"
readelf -S "$bin_a64" | grep -q '\.symtab' && die "aarch64 binary is not stripped"

if [ "$armv7" = yes ]; then
    phase "build armv7-unknown-linux-gnueabihf (release)"
    b0=$SECONDS
    cross_build armv7-unknown-linux-gnueabihf arm-linux-gnueabihf
    bin_v7=target/cross/armv7-unknown-linux-gnueabihf/release/fieldsync
    s=$(size_of "$bin_v7")
    note "armv7-unknown-linux-gnueabihf: stripped binary $s bytes ($(mib "$s")), built in $((SECONDS - b0))s"
    [ "$s" -lt $((5 * 1024 * 1024)) ] || die "armv7 binary is $(mib "$s"), the budget is 5 MiB"
fi

phase "build x86_64 release (for the amd64 package)"
b0=$SECONDS
FIELDSYNC_GIT_COMMIT="$commit" cargo build --locked --release --no-default-features
bin_host=target/release/fieldsync
s=$(size_of "$bin_host")
note "x86_64-unknown-linux-gnu: stripped binary $s bytes ($(mib "$s")), built in $((SECONDS - b0))s"
# The device build carries neither the fleet dashboard's page nor its server.
if strings "$bin_host" | grep -q -e 'EventSource' -e 'fleet --serve'; then
    die "the device build contains the fleet dashboard (feature dashboard)"
fi

# ---------------------------------------------------------------- 3. qemu smoke tests
# smoke NAME TRIPLE RUNNER...: the binary runs under RUNNER (qemu-user with a sysroot).
smoke() {
    local name=$1 triple=$2 bin=$3
    shift 3
    local runner=("$@")
    local dir
    dir=$(mktemp -d /tmp/fieldsync-smoke-XXXXXX)
    mkdir -p "$dir/capture" "$dir/state" "$dir/remote"
    cat >"$dir/fieldsync.toml" <<EOF
device_id = "ci-$name"
[paths]
capture = "$dir/capture"
state_dir = "$dir/state"
[ingest]
settle = "500ms"
close_settle = "200ms"
rescan_interval = "2s"
[upload]
sync_interval = "1s"
initial_backoff = "500ms"
max_backoff = "2s"
[remote]
kind = "file"
prefix = "smoke"
[remote.file]
path = "$dir/remote"
EOF
    fs() { "${runner[@]}" "$bin" --config "$dir/fieldsync.toml" "$@"; }
    local v
    v=$("${runner[@]}" "$bin" --version)
    echo "$v" | grep -q "($triple)\|, $triple)" || die "$name: --version does not name $triple: $v"
    echo "$v" | grep -q "commit $commit" || die "$name: --version does not name commit $commit: $v"
    note "$name: $v"
    fs config check >/dev/null || die "$name: config check failed"

    # Not through `fs`: `$!` must be the daemon itself for the SIGTERM below.
    "${runner[@]}" "$bin" --config "$dir/fieldsync.toml" run >"$dir/daemon.log" 2>&1 &
    local pid=$!
    bg_pids+=("$pid")
    local i
    for i in $(seq 1 300); do
        grep -q "fieldsync started" "$dir/daemon.log" && break
        kill -0 "$pid" 2>/dev/null || { cat "$dir/daemon.log"; die "$name: daemon exited at start"; }
        sleep 0.2
    done
    grep -q "fieldsync started" "$dir/daemon.log" || { cat "$dir/daemon.log"; die "$name: daemon did not start"; }

    mkdir -p "$dir/capture/pump-7/row-3"
    head -c 2500000 /dev/urandom >"$dir/photo.jpg"
    cp "$dir/photo.jpg" "$dir/capture/pump-7/row-3/.IMG_0001.jpg.tmp"
    mv "$dir/capture/pump-7/row-3/.IMG_0001.jpg.tmp" "$dir/capture/pump-7/row-3/IMG_0001.jpg"

    local synced=0 json=""
    for i in $(seq 1 120); do
        json=$(fs status --json 2>/dev/null || true)
        synced=$(printf '%s' "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["counts"]["synced"]["count"])' 2>/dev/null || echo 0)
        [ "$synced" = 1 ] && break
        sleep 0.5
    done
    [ "$synced" = 1 ] || { echo "$json"; cat "$dir/daemon.log"; die "$name: photo not synced within 60s"; }
    printf '%s' "$json" | python3 -c '
import json, sys
s = json.load(sys.stdin)
assert s["daemon_running"] is True, s
assert s["pending"]["count"] == 0, s
' || die "$name: status --json is not as expected: $json"
    local obj
    obj=$(find "$dir/remote/smoke/ci-$name/pump-7/row-3" -type f -name '*.jpg')
    [ "$(echo "$obj" | wc -l)" = 1 ] && [ -n "$obj" ] || die "$name: expected one object, found: $obj"
    cmp "$dir/photo.jpg" "$obj" || die "$name: remote bytes differ from the photo"

    local t=$SECONDS rc=0
    kill -TERM "$pid"
    wait "$pid" || rc=$?
    [ "$rc" = 0 ] || { cat "$dir/daemon.log"; die "$name: SIGTERM exit code $rc"; }
    [ $((SECONDS - t)) -le 10 ] || die "$name: SIGTERM took $((SECONDS - t))s"
    note "$name: qemu smoke ok (photo synced byte-identical, status --json synced=1, SIGTERM exit 0 in $((SECONDS - t))s)"
    rm -rf "$dir"
}

# The ARM binaries run on Debian's multiarch runtime (libc6:arm64, pulled in by
# libstd-rust-web-dev:arm64): the same ld.so and libc a Debian arm64 device has.
# Not `qemu-aarch64-static -L /usr/aarch64-linux-gnu`: that takes ld.so from
# libc6-arm64-cross (2.36-8cross1), while the host's /etc/ld.so.cache, which lists the
# multiarch libc6:arm64 (2.36-9+deb12u*), hands it that package's libc.so.6; the
# mismatched pair spins forever in the first pthread_create (seen with qemu 7.2 and 10.0).
qemu_a64=(qemu-aarch64-static)
qemu_v7=(qemu-arm-static)
[ -e /lib/ld-linux-aarch64.so.1 ] || die "libc6:arm64 (the arm64 runtime) is not installed"

phase "smoke test aarch64 under qemu"
smoke aarch64 aarch64-unknown-linux-gnu "$bin_a64" "${qemu_a64[@]}"
if [ "$armv7" = yes ]; then
    phase "smoke test armv7 under qemu"
    smoke armv7 armv7-unknown-linux-gnueabihf "$bin_v7" "${qemu_v7[@]}"
fi

# ---------------------------------------------------------------- 4. packages
phase "Debian packages"
deb_amd64=$(deploy/build-deb.sh "$bin_host" amd64 "$out")
deb_arm64=$(deploy/build-deb.sh "$bin_a64" arm64 "$out")
debs=("$deb_amd64" "$deb_arm64")
if [ "$armv7" = yes ]; then
    debs+=("$(deploy/build-deb.sh "$bin_v7" armhf "$out")")
fi

# check_deb DEB ARCH: paths, owners, modes, conffiles, control fields.
check_deb() {
    local deb=$1 arch=$2
    local listing
    listing=$(dpkg-deb -c "$deb")
    expect() {
        echo "$listing" | awk -v m="$1" -v p="$2" '$1 == m && $2 == "root/root" && $6 == p { f = 1 } END { exit !f }' ||
            { echo "$listing"; die "$deb: expected $2 with mode $1 root/root"; }
    }
    expect -rwxr-xr-x ./usr/bin/fieldsync
    expect -rw-r--r-- ./etc/fieldsync/fieldsync.toml
    expect -rw-r--r-- ./lib/systemd/system/fieldsync.service
    expect -rw-r--r-- ./usr/share/doc/fieldsync/copyright
    # Nothing outside the expected trees, nothing setuid.
    echo "$listing" | awk '{ print $6 }' | grep -v -E '^\./($|usr/|usr/bin/|usr/bin/fieldsync$|usr/share/|usr/share/doc/|usr/share/doc/fieldsync/|usr/share/doc/fieldsync/.*|etc/|etc/fieldsync/|etc/fieldsync/fieldsync\.toml$|lib/|lib/systemd/|lib/systemd/system/|lib/systemd/system/fieldsync\.service$)' &&
        die "$deb: unexpected paths"
    echo "$listing" | awk '{ print $1 }' | grep -q '[sS]' && die "$deb: setuid/setgid file"
    [ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || die "$deb: Architecture is not $arch"
    [ "$(dpkg-deb -f "$deb" Package)" = fieldsync ] || die "$deb: Package"
    dpkg-deb -f "$deb" Depends | grep -q adduser || die "$deb: must depend on adduser"
    [ "$(dpkg-deb -I "$deb" conffiles)" = /etc/fieldsync/fieldsync.toml ] || die "$deb: conffiles"
    local x
    x=$(mktemp -d)
    dpkg-deb -x "$deb" "$x"
    cmp "$x/lib/systemd/system/fieldsync.service" deploy/fieldsync.service || die "$deb: unit differs"
    cmp "$x/etc/fieldsync/fieldsync.toml" config/fieldsync.toml || die "$deb: config differs"
    case $arch in
    arm64) "${qemu_a64[@]}" "$x/usr/bin/fieldsync" --version | grep -q aarch64-unknown-linux-gnu ;;
    armhf) "${qemu_v7[@]}" "$x/usr/bin/fieldsync" --version | grep -q armv7-unknown-linux-gnueabihf ;;
    amd64) "$x/usr/bin/fieldsync" --version | grep -q x86_64-unknown-linux-gnu ;;
    esac || die "$deb: packaged binary is not for $arch"
    rm -rf "$x"
    note "$(basename "$deb"): $(stat -c %s "$deb") bytes, contents ok"
}
check_deb "$deb_amd64" amd64
check_deb "$deb_arm64" arm64
[ "$armv7" = yes ] && check_deb "${debs[2]}" armhf

phase "install the amd64 package"
if dpkg-query -W -f='${Status}' fieldsync 2>/dev/null | grep -q installed; then
    $SUDO apt-get purge -y -qq fieldsync >/dev/null
fi
$SUDO apt-get install -y -qq "./$deb_amd64" >/dev/null || die "apt-get install ./$deb_amd64 failed"
getent passwd fieldsync >/dev/null || die "user fieldsync was not created"
uid=$(id -u fieldsync)
[ "$uid" -lt 1000 ] || die "fieldsync is not a system user (uid $uid)"
getent passwd fieldsync | cut -d: -f7 | grep -q nologin || die "fieldsync has a login shell"
modes() { stat -c '%a %U:%G' "$1"; }
[ "$(modes /usr/bin/fieldsync)" = "755 root:root" ] || die "/usr/bin/fieldsync: $(modes /usr/bin/fieldsync)"
[ "$(modes /etc/fieldsync)" = "750 root:fieldsync" ] || die "/etc/fieldsync: $(modes /etc/fieldsync)"
[ "$(modes /etc/fieldsync/fieldsync.toml)" = "640 root:fieldsync" ] || die "config: $(modes /etc/fieldsync/fieldsync.toml)"
[ "$(modes /var/lib/fieldsync)" = "750 fieldsync:fieldsync" ] || die "/var/lib/fieldsync: $(modes /var/lib/fieldsync)"
[ "$(modes /var/spool/fieldsync/capture)" = "2770 root:fieldsync" ] || die "capture: $(modes /var/spool/fieldsync/capture)"
dpkg-query -W -f='${Conffiles}\n' fieldsync | grep -q '/etc/fieldsync/fieldsync.toml' || die "conffile not registered"
/usr/bin/fieldsync --config /etc/fieldsync/fieldsync.toml config check >/dev/null || die "packaged config does not check"
note "amd64 package installed: user fieldsync (uid $uid, nologin), modes and conffile ok"

if command -v systemd-analyze >/dev/null 2>&1; then
    systemd-analyze verify /lib/systemd/system/fieldsync.service 2>&1 | tee "$out/verify.txt"
    [ -s "$out/verify.txt" ] && die "systemd-analyze verify reported problems"
    score=$(systemd-analyze security --offline=yes /lib/systemd/system/fieldsync.service 2>/dev/null |
        sed -n 's/.*Overall exposure level for fieldsync.service: \([0-9.]*\) \(.*\)/\1 \2/p')
    note "systemd-analyze verify: clean; security (offline): ${score:-unavailable}"
else
    note "systemd-analyze not installed: unit not verified here"
fi

# The installed daemon, as its user, on the packaged config and folders (no systemd as
# PID 1 here, so not through the unit; the sandbox itself is checked by the tool above).
log="$out/installed-daemon.log"
setpriv --reuid=fieldsync --regid=fieldsync --clear-groups \
    /usr/bin/fieldsync --config /etc/fieldsync/fieldsync.toml run >"$log" 2>&1 &
pid=$!
bg_pids+=("$pid")
for i in $(seq 1 100); do grep -q "fieldsync started" "$log" && break; sleep 0.1; done
grep -q "fieldsync started" "$log" || { cat "$log"; die "installed daemon did not start"; }
mkdir -p /var/spool/fieldsync/capture/ci-check/row-1
head -c 300000 /dev/urandom >"$out/pkg-photo.jpg"
install -m 0644 "$out/pkg-photo.jpg" /var/spool/fieldsync/capture/ci-check/row-1/.p.tmp
mv /var/spool/fieldsync/capture/ci-check/row-1/.p.tmp /var/spool/fieldsync/capture/ci-check/row-1/IMG_1.jpg
for i in $(seq 1 100); do
    obj=$(find /var/lib/fieldsync/outbox -type f -name '*.jpg' 2>/dev/null | head -n1)
    [ -n "$obj" ] && break
    sleep 0.2
done
[ -n "$obj" ] && cmp "$out/pkg-photo.jpg" "$obj" || { cat "$log"; die "installed daemon did not upload"; }
rc=0
kill -TERM "$pid"
wait "$pid" || rc=$?
[ "$rc" = 0 ] || die "installed daemon: SIGTERM exit $rc"
[ "$(stat -c %U "$obj")" = fieldsync ] || die "object not owned by fieldsync"
note "installed daemon as user fieldsync: photo uploaded from /var/spool/fieldsync/capture to the outbox"

phase "purge the package"
$SUDO apt-get purge -y -qq fieldsync >/dev/null
getent passwd fieldsync >/dev/null && die "user fieldsync left after purge"
[ -e /usr/bin/fieldsync ] && die "binary left after purge"
[ -e /etc/fieldsync ] && die "/etc/fieldsync left after purge"
[ -e /var/lib/fieldsync/queue.db ] && die "queue left after purge"
[ -e /var/lib/fieldsync/queue.db.reserve ] && die "queue space reserve left after purge"
[ -e /var/lib/fieldsync/inbox ] && die "download inbox left after purge"
[ -e "$obj" ] || die "purge deleted an uploaded photo"
[ -e /var/spool/fieldsync/capture/ci-check/row-1/IMG_1.jpg ] || die "purge deleted a captured photo"
rm -rf /var/lib/fieldsync /var/spool/fieldsync
note "purge: user, binary, config, queue, reserve and inbox removed; photos kept"

phase "install into an image root (DESTDIR), user and owners at first boot"
img=$(mktemp -d)
mkdir -p "$img/etc"
DESTDIR="$img" sh deploy/install.sh "$bin_host" >/dev/null || die "DESTDIR install failed"
if command -v systemd-sysusers >/dev/null 2>&1 && command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-sysusers --root="$img" >/dev/null 2>&1 || die "systemd-sysusers --root failed"
    systemd-tmpfiles --create --root="$img" >/dev/null 2>&1 || die "systemd-tmpfiles --root failed"
    u=$(awk -F: '$1 == "fieldsync" { print $3 }' "$img/etc/passwd")
    g=$(awk -F: '$1 == "fieldsync" { print $3 }' "$img/etc/group")
    [ -n "$u" ] && [ -n "$g" ] || die "image: no user fieldsync after systemd-sysusers"
    want() { [ "$(stat -c '%a %u:%g' "$img$1")" = "$2" ] || die "image $1: $(stat -c '%a %u:%g' "$img$1"), want $2"; }
    want /etc/fieldsync "750 0:$g"
    want /etc/fieldsync/fieldsync.toml "640 0:$g"
    want /var/lib/fieldsync "750 $u:$g"
    want /var/spool/fieldsync/capture "2770 0:$g"
    note "image root: user fieldsync ($u) and the package's owners and modes after systemd-sysusers/tmpfiles"
else
    note "systemd-sysusers/tmpfiles not installed: image root owners not checked here"
fi
rm -rf "$img"

note "ci-arm wall time: $((SECONDS - t0))s"
phase "done"
cat "$summary"
