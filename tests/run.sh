#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or a developer's: installs the real peers
# the integration tests start (mosquitto, the s3s-fs S3 server, rclone for the benchmark
# comparison, tinyproxy for the proxy tests, libfaketime for the clock-skew test, chromium for
# the fleet dashboard test) when they are missing, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto mosquitto-clients)
command -v rclone >/dev/null 2>&1 || need_apt+=(rclone)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/sbin/tinyproxy ] || need_apt+=(tinyproxy)
ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || need_apt+=(faketime)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
  [ -x /usr/bin/rustc ] && /usr/bin/rustc --version | grep -q 'rustc 1\.9[6-9]\|rustc 1\.[1-9][0-9][0-9]' || need_apt+=(rustc-web cargo-web)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
  # s3s-fs 0.17 needs rustc >= 1.96, which Debian's rustc-web provides.
  RUSTC=/usr/bin/rustc cargo install s3s-fs --version 0.17.0 --features binary --locked
fi
export PATH="$HOME/.cargo/bin:$PATH"

# `bench` builds the benchmarks into the test binary and runs every suite (tests/bench.rs).
cargo test --locked --all-targets --features bench "$@"
