#!/usr/bin/env bash
# Sets everything up, then serves the gateway or runs the tests.
#
#   ./setup.sh serve [llm-gateway serve options]   venv + deps + llama-server build, then serve on :4000
#   ./setup.sh test  [pytest options]              the same setup, then the whole test suite
#   ./setup.sh setup                               only the setup
#
# Idempotent and cached: the venv is reused while pyproject.toml is unchanged, pip downloads and
# the llama-server build live under ${LLM_GATEWAY_CACHE:-~/.cache/llm-gateway}, keyed by version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
ACTION="${1:-setup}"
[ $# -gt 0 ] && shift
CACHE="${LLM_GATEWAY_CACHE:-$HOME/.cache/llm-gateway}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$CACHE/pip}"
VENV="$ROOT/.venv"

log() { printf '[setup] %s\n' "$*" >&2; }

find_python() {
  for py in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v "$py"; return; }
  done
  log "Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)"; exit 1
}

case "$ACTION" in
  serve) EXTRAS="" ;;
  test|setup) EXTRAS="[test]" ;;
  *) log "unknown action '$ACTION': use serve, test or setup"; exit 2 ;;
esac

# 1. virtual environment and Python dependencies (skipped while pyproject.toml is unchanged)
if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV" || { log "venv creation failed: on Debian/Ubuntu run 'apt-get install python3-venv'"; exit 1; }
fi
STAMP="$VENV/.llm-gateway-deps"
WANT="$(sha256sum < pyproject.toml | cut -c1-16)$EXTRAS"
if ! grep -qxF "$WANT" "$STAMP" 2>/dev/null; then
  log "installing Python dependencies (.$EXTRAS)"
  "$VENV/bin/python" -m pip install --upgrade --quiet pip
  "$VENV/bin/python" -m pip install --progress-bar on -e ".$EXTRAS"
  echo "$WANT" >> "$STAMP"
fi
export PATH="$VENV/bin:$PATH"

# 2. build tools: CMake and Ninja come from PyPI when the machine lacks them
if ! command -v cmake >/dev/null 2>&1; then
  log "cmake not found: installing it from PyPI into the venv"
  "$VENV/bin/python" -m pip install --quiet cmake ninja
fi

# 3. llama-server (a cached build is reused; a cold build takes ~10 minutes on 2 cores)
"$ROOT/build_llamacpp.sh"

# 4. the action
case "$ACTION" in
  serve) exec "$VENV/bin/llm-gateway" serve "$@" ;;
  setup) log "ready: ./setup.sh serve starts the gateway on http://127.0.0.1:4000" ;;
  test)
    set +e
    "$VENV/bin/python" -m pytest -v "$@"
    rc=$?
    set -e
    if [ $rc -eq 5 ]; then log "pytest collected no tests: that is a failure"; exit 1; fi
    exit $rc ;;
esac
