#!/usr/bin/env bash
# The benchmark: gateway process + in-process downstreams + baselines; prints a Markdown table.
#   bash scripts/bench.sh            # full run (~5 minutes)
#   bash scripts/bench.sh --quick    # a few seconds per scenario
#   bash scripts/bench.sh --only AB  # some scenarios (A, B, C, D, E; T: what traces cost)
# The benchmark is the workspace member bench/ (not installed with the gateway); it runs the
# release gateway binary built beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p tss-callback-gateway -p bench
# Where cargo put the binaries: CARGO_TARGET_DIR or a config may move the target folder.
target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
exec "$target_dir/release/bench" "$@"
