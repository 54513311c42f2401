#!/usr/bin/env bash
# S3 benchmark: fieldsync (release build) next to `rclone copy`, same files, same local
# s3s-fs server, same run. Prints wall time, MB/s and peak RSS for 200 x 2 MB photos and
# 4 x 100 MB videos. Needs s3s-fs and rclone (tests/run.sh installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin fieldsync
FIELDSYNC_BENCH_BIN="$PWD/target/release/fieldsync" \
  cargo test --locked --test bench_s3 -- --ignored --nocapture --test-threads 1
