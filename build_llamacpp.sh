#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from source into build/bin/llama-server.
#
# Source, first that works:
#   1. $LLAMA_CPP_SRC            a llama.cpp checkout you already have
#   2. git clone of the pinned llama.cpp commit (needs GitHub)
#   3. vendor/llama.cpp of the pinned llama-cpp-python sdist from PyPI (works without GitHub)
#
# Builds are cached outside the repository, keyed by source version and backend, so a
# second run with the same source only copies the cached binary:
#   ${LLM_GATEWAY_CACHE:-~/.cache/llm-gateway}/llama-server/<version>-<backend>/llama-server
#
# Usage: ./build_llamacpp.sh [--cpu|--cuda|--vulkan|--metal] [--jobs N] [--force] [--out PATH]
set -euo pipefail

LLAMA_CPP_PY_VERSION="${LLAMA_CPP_PY_VERSION:-0.3.36}"
# The llama.cpp commit that llama-cpp-python 0.3.36 vendors (its CHANGELOG).
LLAMA_CPP_COMMIT="${LLAMA_CPP_COMMIT:-0c1e57098}"
LLAMA_CPP_GIT_URL="${LLAMA_CPP_GIT_URL:-https://github.com/ggml-org/llama.cpp}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${LLM_GATEWAY_CACHE:-$HOME/.cache/llm-gateway}"
OUT="$ROOT/build/bin/llama-server"
BACKEND=cpu
FORCE=0
JOBS="$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)"

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu|--cuda|--vulkan|--metal) BACKEND="${1#--}" ;;
    --jobs|-j) JOBS="$2"; shift ;;
    --force) FORCE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_llamacpp.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[build_llamacpp] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { log "missing '$1': $2"; exit 1; }; }
need cmake "install CMake (apt-get install cmake)"
need c++ "install a C++ compiler (apt-get install build-essential)"

mkdir -p "$CACHE/src"

# --- 1. find the source and a version key for it ---------------------------------------
SRC="" VERSION=""
if [ -n "${LLAMA_CPP_SRC:-}" ]; then
  [ -f "$LLAMA_CPP_SRC/tools/server/CMakeLists.txt" ] || { log "LLAMA_CPP_SRC=$LLAMA_CPP_SRC is not a llama.cpp tree (no tools/server)"; exit 1; }
  SRC="$(cd "$LLAMA_CPP_SRC" && pwd)"
  if git -C "$SRC" rev-parse HEAD >/dev/null 2>&1; then
    VERSION="git-$(git -C "$SRC" rev-parse --short=12 HEAD)"
    git -C "$SRC" diff --quiet HEAD 2>/dev/null || VERSION="$VERSION-dirty-$(git -C "$SRC" diff HEAD | sha256sum | cut -c1-8)"
  else
    # No git: key by the sources' names, sizes and times (cheap and changes on any edit).
    VERSION="dir-$(cd "$SRC" && find . -path ./build -prune -o -type f \( -name '*.c*' -o -name '*.h*' -o -name 'CMakeLists.txt' \) -printf '%P %s %T@\n' | sort | sha256sum | cut -c1-12)"
  fi
  log "source: LLAMA_CPP_SRC=$SRC ($VERSION)"
else
  VERSION="llama.cpp-$LLAMA_CPP_COMMIT"
fi

BUILD_KEY="$VERSION-$BACKEND"
CACHED="$CACHE/llama-server/$BUILD_KEY/llama-server"

install_binary() {
  mkdir -p "$(dirname "$OUT")"
  cp -f "$CACHED" "$OUT.tmp" && mv -f "$OUT.tmp" "$OUT"
  echo "$BUILD_KEY" > "$(dirname "$OUT")/llama-server.version"
  log "llama-server ready: $OUT ($BUILD_KEY)"
}

if [ "$FORCE" = 0 ] && [ -x "$CACHED" ]; then
  log "cached build found for $BUILD_KEY, skipping compilation"
  install_binary
  exit 0
fi

if [ -z "$SRC" ]; then
  GIT_SRC="$CACHE/src/llama.cpp-$LLAMA_CPP_COMMIT"
  SDIST_DIR="$CACHE/src/llama_cpp_python-$LLAMA_CPP_PY_VERSION"
  if [ -f "$GIT_SRC/tools/server/CMakeLists.txt" ]; then
    SRC="$GIT_SRC"
  elif [ -f "$SDIST_DIR/vendor/llama.cpp/tools/server/CMakeLists.txt" ]; then
    SRC="$SDIST_DIR/vendor/llama.cpp"
  elif command -v git >/dev/null 2>&1 && [ "${LLAMA_CPP_NO_GIT:-0}" != 1 ] && \
       log "cloning $LLAMA_CPP_GIT_URL at $LLAMA_CPP_COMMIT" && \
       rm -rf "$GIT_SRC.tmp" && \
       timeout 300 git clone --progress --filter=blob:none --no-checkout "$LLAMA_CPP_GIT_URL" "$GIT_SRC.tmp" && \
       git -C "$GIT_SRC.tmp" checkout -q "$LLAMA_CPP_COMMIT"; then
    mv "$GIT_SRC.tmp" "$GIT_SRC"
    SRC="$GIT_SRC"
  else
    rm -rf "$GIT_SRC.tmp"
    log "git clone unavailable; fetching llama-cpp-python==$LLAMA_CPP_PY_VERSION sdist from PyPI"
    PY="${PYTHON:-$(command -v python3 || command -v python)}"
    "$PY" -m pip download --no-deps --no-binary llama-cpp-python --progress-bar on \
      "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -d "$CACHE/src" >&2
    rm -rf "$SDIST_DIR.tmp" && mkdir -p "$SDIST_DIR.tmp"
    tar xzf "$CACHE/src/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz" -C "$SDIST_DIR.tmp" --strip-components=1
    mv "$SDIST_DIR.tmp" "$SDIST_DIR"
    SRC="$SDIST_DIR/vendor/llama.cpp"
  fi
  log "source: $SRC"
fi

# --- 2. configure and compile -----------------------------------------------------------
BUILD_DIR="$CACHE/llama-server/$BUILD_KEY/cmake-build"
CMAKE_ARGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
)
case "$BACKEND" in
  cuda) CMAKE_ARGS+=(-DGGML_CUDA=ON) ;;
  vulkan) CMAKE_ARGS+=(-DGGML_VULKAN=ON) ;;
  metal) CMAKE_ARGS+=(-DGGML_METAL=ON) ;;
  cpu) [ "$(uname -s)" = Darwin ] && CMAKE_ARGS+=(-DGGML_METAL=OFF) ;;
esac
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)

log "configuring ($BACKEND backend) in $BUILD_DIR"
cmake -S "$SRC" -B "$BUILD_DIR" "${GENERATOR[@]}" "${CMAKE_ARGS[@]}" >&2
log "compiling llama-server with $JOBS jobs (about 7 minutes on 2 cores for a CPU build)"
cmake --build "$BUILD_DIR" --config Release --target llama-server -j "$JOBS" >&2

BUILT="$(find "$BUILD_DIR/bin" -maxdepth 2 -name 'llama-server' -type f | head -n1)"
[ -x "$BUILT" ] || { log "build finished but no llama-server binary was found"; exit 1; }
cp -f "$BUILT" "$CACHED"
"$CACHED" --version >&2 2>&1 || true
install_binary
