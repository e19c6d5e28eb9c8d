#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (Debian packages, a
# Python venv), then runs the Rust tests, the Python interoperability and observability tests
# against the release binary (with Go peers on Cobo's Go SDK and a private PostgreSQL), and the
# deployment checks.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# --- Debian packages: openssl (test keys in every PEM form), prometheus + promtool (observability),
# logrotate (tests/audit.rs rotates the audit log with the shipped deploy/logrotate config),
# postgresql (tests/events: two gateways on one real PostgreSQL; the tests start a private cluster),
# chromium (tests/status: the status page in a real headless browser, driven by playwright-core)
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v logrotate >/dev/null || [[ -x /usr/sbin/logrotate ]] || need+=(logrotate)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
[[ -x /usr/bin/chromium ]] || need+=(chromium)
command -v npm >/dev/null || need+=(npm)
if ((${#need[@]})); then
  log "installing Debian packages: ${need[*]}"
  sudo=""
  if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null || { echo "need root or sudo to install: ${need[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  # Do not start packaged services (prometheus, postgresql) on install; the tests run their own.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

# --- Python venv for the interoperability and observability tests
export VENV=${VENV:-$PWD/.venv}
if [[ ! -x $VENV/bin/python ]]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
reqs=()
for r in tests/*/requirements.txt; do [[ -f $r ]] && reqs+=(-r "$r"); done
if ((${#reqs[@]})); then
  log "pip install ${reqs[*]}"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${reqs[@]}"
fi

# --- Node: playwright-core for tests/status, pinned by its lock file; it drives Debian's chromium,
# so no browser is downloaded
log "npm ci --prefix tests/status"
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/status --no-audit --no-fund --loglevel=error

# --- Rust: unit and integration tests (real HTTP on loopback, real signed tokens)
log "cargo test --release"
cargo build --release --locked
cargo test --release --locked

# --- The README's first command, exactly as a new user types it
log "cargo run --release -- demo"
demo=$(cargo run --release --locked -- demo 2>&1) || { printf '%s\n' "$demo"; exit 1; }
for expect in APPROVE REJECT; do
  grep -q "$expect" <<<"$demo" || { printf '%s\n' "$demo"; echo "demo output lacks $expect" >&2; exit 1; }
done

# Where cargo put the binary: CARGO_TARGET_DIR or a config may move the target folder.
target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# --- Go peers on Cobo's Go SDK (event server, callback server), built once for the Python suites
command -v go >/dev/null || { echo "need the Go toolchain to build tests/gopeers" >&2; exit 1; }
export GOPEERS_BIN=$target_dir/gopeers
log "go build tests/gopeers -> $GOPEERS_BIN"
started=$SECONDS
(cd tests/gopeers && go build -buildvcs=false -o "$GOPEERS_BIN/" ./...)
echo "Go peers built in $((SECONDS - started)) s"

# --- Jaeger (v2 all-in-one, pinned in tests/jaeger/go.mod) for tests/tracing, built once and reused
export JAEGER_BIN=$target_dir/jaeger/jaeger
if [[ ! -x $JAEGER_BIN ]]; then
  log "go build github.com/jaegertracing/jaeger/cmd/jaeger -> $JAEGER_BIN"
  started=$SECONDS
  (cd tests/jaeger && go build -buildvcs=false -o "$JAEGER_BIN" github.com/jaegertracing/jaeger/cmd/jaeger)
  echo "Jaeger built in $((SECONDS - started)) s"
else
  echo "Jaeger: reusing $JAEGER_BIN"
fi

# --- Python: Cobo SDK callback and event servers, TSS Node client, PostgreSQL; real Prometheus, real Jaeger
export GATEWAY_BIN=$target_dir/release/tss-callback-gateway
# Screenshots of the status page (tests/status) stay here after the run.
export ARTIFACTS_DIR=$target_dir/test-artifacts
suites=()
for d in tests/interop tests/events tests/observability tests/tracing tests/status; do
  compgen -G "$d/test_*.py" >/dev/null && suites+=("$d")
done
if ((${#suites[@]})); then
  log "pytest ${suites[*]}"
  "$VENV/bin/python" -m pytest -q "${suites[@]}"
fi

# --- Deployment files: Kubernetes schemas, compose, systemd
if [[ -f scripts/check-deploy.sh ]]; then
  log "deployment checks"
  bash scripts/check-deploy.sh
fi
log "all tests passed"
