#!/usr/bin/env bash
# S3 benchmark: fieldsync (release build) next to `rclone copy`, same files, same local
# s3s-fs server, same run: 200 x 2 MiB photos, 4 x 100 MiB videos, and 50 x 2 MB photos
# through a shaped link (2 MB/s, 100 ms each way). Prints per tool and workload the wall
# time, client CPU seconds, peak RSS and MB/s (median and range of 3 rounds), with the
# server and the clients on different cores. Needs s3s-fs and rclone (tests/run.sh
# installs both).
#   FIELDSYNC_BENCH_ROUNDS=5            rounds per tool (default 3)
#   FIELDSYNC_BENCH_WORKLOADS=videos    a comma-separated subset of photos,videos,shaped
#   FIELDSYNC_BENCH_BIN=PATH            measure that binary instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ -z "${FIELDSYNC_BENCH_BIN:-}" ]; then
  cargo build --release --locked --bin fieldsync
  export FIELDSYNC_BENCH_BIN="$PWD/target/release/fieldsync"
fi
cargo test --locked --test bench_s3 -- --ignored --nocapture --test-threads 1
