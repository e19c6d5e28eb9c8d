#!/usr/bin/env bash
# Mutation testing of the decision path: src/verdict.rs, src/rules.rs, src/protocol/.
# Every mutant is a rebuild and a test run, so this takes long and is not part of CI.
#
#   bash scripts/mutants.sh                 # all mutants of these files
#   bash scripts/mutants.sh --list          # only list them
#   bash scripts/mutants.sh -- --lib        # extra args after `--` go to `cargo test`
#
# Results land in mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt). A "missed"
# mutant that changes a decision is a test gap: add a test that fails with it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-mutants >/dev/null && ! cargo mutants --version >/dev/null 2>&1; then
  cargo install --locked cargo-mutants
fi
exec cargo mutants \
  --file src/verdict.rs --file src/rules.rs --file src/protocol/envelope.rs --file src/protocol/token.rs \
  --profile release \
  "$@"
