#!/usr/bin/env bash
# The full soak: 20,000 requests (or $1) at concurrency 64 across 5 randomly misbehaving
# downstreams; zero false approvals, every answer as the behaviours imply, audit lines = answers,
# memory flat after warm-up. CI runs the same test with SOAK_REQUESTS unset (2,000).
# SOAK_SEED=<n> draws another mix. About 30 s on two cores, half of it signing the requests'
# tokens before the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_REQUESTS=${1:-20000} cargo test --release --locked --test soak -- --nocapture
