#!/usr/bin/env bash
# Install llama-cpp-python into the virtualenv WITHOUT compiling llama.cpp a second time.
#
# The bindings are pure Python over ctypes; built with LLAMA_BUILD=OFF and LLAVA_BUILD=OFF the
# wheel holds no libraries at all, and vcache points them at the shared libraries of its own
# llama.cpp build (the patched llama-server's bin/ directory) through LLAMA_CPP_LIB_PATH and
# MTMD_CPP_LIB (vision_cache/llama/libs.py sets both). One compile, one llama.cpp version.
# Details and the measured times: docs/llama-cpp-python.md.
#
# Usage: scripts/install_llama_cpp_python.sh [VENV] [LIB_DIR]
#   VENV     the virtualenv (default .venv)
#   LIB_DIR  the llama.cpp build's library directory (default: the patched CPU build's bin/,
#            from `vcache build-server`, built first if missing)
# Idempotent: does nothing when the pinned version is installed and loads LIB_DIR's libraries.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
export VCACHE_LLAMA_CACHE=${VCACHE_LLAMA_CACHE:-$PWD/.build/llama}
VENV=${1:-.venv}
PY="$VENV/bin/python"
if [[ $# -ge 2 ]]; then
    LIB_DIR=$2
else
    LIB_DIR=$(dirname "$("$VENV/bin/vcache" build-server --cpu)")
fi

if [[ ! -f $LIB_DIR/libllama.so || ! -f $LIB_DIR/libmtmd.so ]]; then
    echo "error: $LIB_DIR has no libllama.so and libmtmd.so (build llama.cpp with" \
         "BUILD_SHARED_LIBS=ON: vcache build-server does)" >&2
    exit 1
fi

# loads the bindings on LIB_DIR and runs one call into each library
loads_our_build() {
    "$PY" - "$LIB_DIR" "$VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
from pathlib import Path

from vision_cache.llama.libs import load_llama_libs

if version("llama_cpp_python") != sys.argv[2]:
    sys.exit(1)
libs = load_llama_libs(Path(sys.argv[1]))
libs.llama.llama_print_system_info()
libs.mtmd.mtmd_default_marker()
EOF
}

if loads_our_build; then
    echo "llama-cpp-python $VERSION: installed, runs on $LIB_DIR"
    exit 0
fi

# the sdist the llama.cpp build already downloaded, else the package index
SDIST=${VCACHE_LLAMA_CACHE:-.build/llama}/downloads/llama_cpp_python-$VERSION.tar.gz
SOURCE=$([[ -f $SDIST ]] && echo "$SDIST" || echo "llama-cpp-python==$VERSION")

echo "installing llama-cpp-python $VERSION without its own llama.cpp (from $SOURCE)"
start=$(date +%s)
# --no-cache-dir: pip caches built wheels by source, not by CMAKE_ARGS; a cached library-less
# wheel would later be reused by a plain `pip install llama-cpp-python` that expects libraries.
# --force-reinstall --no-deps on a version already there (e.g. one built with its own libs).
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet \
    --disable-pip-version-check --no-cache-dir -c constraints.txt "$SOURCE"
if ! loads_our_build; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet \
        --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps "$SOURCE"
fi
echo "installed in $(( $(date +%s) - start )) s"

if ! loads_our_build; then
    echo "error: llama-cpp-python $VERSION is installed but cannot load $LIB_DIR" >&2
    "$PY" -c "from pathlib import Path; from vision_cache.llama.libs import load_llama_libs; \
load_llama_libs(Path('$LIB_DIR'))" >&2 || true
    exit 1
fi
echo "llama-cpp-python $VERSION runs on $LIB_DIR"
