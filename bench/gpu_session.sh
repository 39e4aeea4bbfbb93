#!/usr/bin/env bash
# The GPU checks that the TensorRT backend and the bench still need, in as few device calls as
# the 64 MiB-per-call transfer limit allows (the GPU machine has no network).
#
#   here, with PyPI:            bench/gpu_session.sh prepare
#       .whl/   small cp312 wheels: diffusers (+ importlib_metadata), tensorrt_rtx and its bindings
#       .xfer/  the big wheels (tensorrt_rtx libs, onnxruntime-gpu) cut in parts of <= 60 MB
#   on the GPU, one call per part, carrying that part (e.g. .xfer/NAME.part-00 and NAME.sha256):
#                               bench/gpu_session.sh stash
#   on the GPU, carrying .whl:  bench/gpu_session.sh check   tiny model: plans, one image, pytest -m gpu
#                               bench/gpu_session.sh sd15    sd15 fp16 plans, TensorRT vs ORT PSNR test
#                               bench/gpu_session.sh bench [KIND [SCHEDULER]]   the issue's workload, batch
#                                   1,2,4, every backend: sd15 512², 50 steps (default); sdxl 1024², 30
#                                   steps; sd35m 1024², 28 steps (no T5); SCHEDULER: the family's default;
#                                   BACKENDS=torch,ort,... to leave some out (torch.compile compiles per batch);
#                                   SKIP_LAYERS=7,8,9: sd35m with skip-layer guidance (Medium's recommended)
#   on the GPU, carrying .whl:  bench/gpu_session.sh proof   sd15 fp16 export, `sdrt optimize --provider cuda`,
#                                   then torch / torch-compile / ort-cuda plain / ort-cuda optimized side by side
#                                   at 512², 50 steps, batch 1 and 4 (BACKENDS, BATCHES, RUNS trim it)
#   here, before any device call: bench/gpu_session.sh dry-run   the proof's stages on this CPU with the tiny
#                                   model, the CPU providers and torch on the CPU (tests/test_bench.py runs it)
# A session: `prepare` here; on the GPU one `stash` call per part of onnxruntime-gpu (5 of <= 60 MB), then
# `proof`, then `check` (pytest -m gpu): 7 calls.
# Each stage writes its logs and JSON to $OUT (the device tool brings them back); keep them under
# bench/results/<gpu>/ with the command. A stage reuses what an earlier one left in /tmp while the
# machine stays warm, and rebuilds it otherwise.
set -euo pipefail
shopt -s nullglob

stage=${1:?usage: bench/gpu_session.sh prepare|stash|check|sd15|bench|proof|dry-run}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
PYTHON=${PYTHON:-python3}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
parts=${SDRT_PARTS:-/root/parts}  # where `stash` keeps the parts between calls
site=/tmp/sdrt-site
work=${SDRT_WORK:-/tmp/sdrt-gpu}
out=${OUT:-$work/out}

prepare() {
    local PYTHON=${PYTHON_HERE:-$repo/.venv/bin/python}  # the venv of `make setup`: its versions are sent
    local platforms=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                     --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                     --platform manylinux2014_x86_64)
    local trt diffusers big
    trt=$($PYTHON -c "import importlib.metadata as m; print(m.version('tensorrt_rtx'))")
    diffusers=$($PYTHON -c "import importlib.metadata as m; print(m.version('diffusers'))")
    big=$(mktemp -d)
    rm -rf .whl .xfer
    $PYTHON -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" -d .whl \
        "diffusers==$diffusers" importlib_metadata "tensorrt_rtx_cu13_bindings==$trt"
    $PYTHON -m pip wheel -q --no-deps -w .whl "tensorrt_rtx_cu13==$trt"  # an sdist: the tensorrt_rtx module
    $PYTHON -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" -d "$big" \
        "tensorrt_rtx_cu13_libs==$trt" "$ORT_GPU"
    for wheel in "$big"/*.whl; do
        "$repo/../shared/tools/split-file" "$wheel" .xfer >/dev/null
    done
    rm -rf "$big"
    du -ch .whl/* | tail -1
    echo "parts to send, one device call each (with its .sha256):"
    ls .xfer/*.part-*
}

stash() {  # what this call carried under .xfer goes to $parts, kept while the machine is warm
    mkdir -p "$parts"
    cp -v .xfer/* "$parts"/
}

install() {  # joins the stashed parts, checks them, and installs everything plus this tree in $site
    if [[ -f $site/.installed ]]; then return; fi
    mkdir -p /root/wheels "$site"
    if [[ ! -d .whl ]]; then echo "carry .whl (made by \`bench/gpu_session.sh prepare\`)" >&2; return 1; fi
    for sha in "$parts"/*.sha256; do
        name=$(basename "$sha" .sha256)
        cat "$parts/$name".part-* > /root/wheels/"$name"
        (cd /root/wheels && sha256sum -c "$sha")
    done
    # one pip call: a second one into the same --target would not add its console scripts (sdrt)
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target "$site" \
        .whl/*.whl /root/wheels/*.whl .
    touch "$site/.installed"
}

environment() {
    export PYTHONPATH=$site PATH=$site/bin:$PATH PYTHONUNBUFFERED=1 SDRT_CACHE_DIR=$work/cache
    mkdir -p "$out" "$work"
    {
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
        $PYTHON -c "import sys; from sdrt.versions import package_versions as v; print(sys.version.split()[0], \
v(('torch', 'diffusers', 'onnxruntime', 'onnxruntime-gpu', 'tensorrt_rtx_cu13', 'cuda-bindings', 'sdrt')))"
        $PYTHON -c "import onnxruntime as o; o.preload_dlls(); print(o.get_available_providers())"
        $PYTHON -c "from sdrt.cuda import gpu_arch; print('arch', gpu_arch())"
    } 2>&1 | tee "$out/environment.txt"
}

tiny_engines() {  # fp16 ONNX of the tiny model with TensorRT plans for this GPU
    local arch
    arch=$($PYTHON -c "from sdrt.cuda import gpu_arch; print(gpu_arch())")
    if [[ ! -d $work/tiny ]]; then sdrt testmodel tiny "$work/tiny"; fi
    if [[ ! -d $work/tiny-fp16 ]]; then sdrt export "$work/tiny" -o "$work/tiny-fp16" --precision fp16; fi
    # TensorRT-RTX refuses a target it does not know (Hopper's sm90): then build for every RTX target
    # and let the load-time check say what this GPU lacks.
    sdrt build "$work/tiny-fp16" --arch "$arch" || sdrt build "$work/tiny-fp16"
}

check() {
    set +e  # record every failure, do not stop at the first
    tiny_engines 2>&1 | tee "$out/tiny-build.txt"
    sdrt generate "$work/tiny-fp16" "a cat" --backend trt --steps 8 --seed 1 -o "$out/tiny-trt.png" 2>&1 \
        | tee "$out/tiny-trt.txt"
    sdrt generate "$work/tiny-fp16" "a cat" --backend ort-cuda --steps 8 --seed 1 -o "$out/tiny-ort-cuda.png" 2>&1 \
        | tee "$out/tiny-ort-cuda.txt"
    $PYTHON -m pytest -m "gpu and not slow" -p no:cacheprovider -q tests/test_build.py tests/test_optimize.py 2>&1 \
        | tee "$out/pytest-gpu.txt"
    $PYTHON -m pytest -p no:cacheprovider -q tests/test_runtime.py tests/test_parity.py 2>&1 | tail -5 \
        | tee -a "$out/pytest-gpu.txt"
}

fp16_engines() {  # KIND SIZE: the real-size test model, its fp16 export and plans for SIZE², batch 1-4
    local kind=$1 size=$2
    if [[ ! -d $work/$kind ]]; then sdrt testmodel "$kind" "$work/$kind"; fi
    if [[ ! -d $work/$kind-fp16 ]]; then
        sdrt export "$work/$kind" -o "$work/$kind-fp16" --precision fp16 --max-batch 4 --max-size "$size"
    fi
    if ! ls "$work/$kind-fp16"/*.plan >/dev/null 2>&1; then
        /usr/bin/time -v sdrt build "$work/$kind-fp16" --shapes "dynamic:$size-$size,batch=1-4" 2>&1 | tail -25
    fi
}

sd15() {
    fp16_engines sd15 512 2>&1 | tee "$out/sd15-build.txt"
    $PYTHON -m pytest -m "gpu and slow" -p no:cacheprovider -q -s tests/test_build.py 2>&1 | tee "$out/pytest-sd15.txt"
}

bench() {  # [KIND [SCHEDULER]]: issue 19's workload for the family
    local kind=${1:-sd15} scheduler=${2:-} size steps guidance
    local backends=${BACKENDS:-torch,torch-compile,ort,trt,trt-low-vram}
    case $kind in
        sd15) size=512 steps=50 guidance=7.5 ;;
        sdxl) size=1024 steps=30 guidance=5 ;;
        sd35m) size=1024 steps=28 guidance=7 ;;
        *) echo "bench: unknown model $kind: sd15, sdxl or sd35m" >&2; return 2 ;;
    esac
    # a failed plan build (no TensorRT flavour for this GPU) leaves the other backends to measure
    fp16_engines "$kind" "$size" 2>&1 | tee "$out/$kind-build.txt" || echo "no plans: trt backends are skipped"
    sdrt bench "$work/$kind" --engines "$work/$kind-fp16" --backends "$backends" \
        --height "$size" --width "$size" --steps "$steps" --guidance "$guidance" --batch 1,2,4 --runs 3 --warmup 1 \
        ${scheduler:+--scheduler "$scheduler"} ${SKIP_LAYERS:+--skip-guidance-layers "$SKIP_LAYERS"} \
        -o "$out/$kind${scheduler:+-$scheduler}${SKIP_LAYERS:+-slg}" 2>&1 \
        | tee "$out/bench-$kind${scheduler:+-$scheduler}${SKIP_LAYERS:+-slg}.txt"
}

timed() {  # GNU time's wall and peak RSS where the machine has it
    if [[ -x /usr/bin/time ]]; then /usr/bin/time -v "$@"; else "$@"; fi
}

proof() {  # the ONNX Runtime fast path against torch: KIND (sd15) PRECISION (fp16), optimized for PROVIDER (cuda)
    local kind=${KIND:-sd15} size=${SIZE:-512} steps=${STEPS:-50} provider=${PROVIDER:-cuda}
    local precision=${PRECISION:-fp16} sdrt=${SDRT:-sdrt}
    local engines=$work/$kind-$precision
    if [[ ! -d $work/$kind ]]; then $sdrt testmodel "$kind" "$work/$kind"; fi
    if [[ ! -d $engines ]]; then
        $sdrt export "$work/$kind" -o "$engines" --precision "$precision" --max-batch 4 --max-size "$size"
    fi
    timed $sdrt optimize "$engines" --provider "$provider" 2>&1 | tee "$out/optimize-$kind.txt"
    $sdrt bench "$work/$kind" --engines "$engines" --backends "${BACKENDS:-torch,torch-compile,ort-plain,ort}" \
        --height "$size" --width "$size" --steps "$steps" --guidance 7.5 --scheduler dpmpp_2m_karras \
        --batch "${BATCHES:-1,4}" --runs "${RUNS:-3}" --warmup 1 -o "$out/proof-$kind" 2>&1 | tee "$out/proof-$kind.txt"
}

dry_run() {  # here: the proof on the CPU with the tiny model, in this checkout's venv
    SDRT=${SDRT:-$repo/.venv/bin/sdrt} KIND=tiny SIZE=64 STEPS=3 PROVIDER=cpu PRECISION=fp32 BACKENDS=torch,ort-plain,ort \
        BATCHES=1 RUNS=1 proof
}

case $stage in
    prepare) prepare ;;
    stash) stash ;;
    check | sd15 | bench | proof) install && environment && "$stage" "${@:2}" ;;
    dry-run) mkdir -p "$out" "$work" && dry_run ;;
    *) echo "unknown stage $stage: prepare, stash, check, sd15, bench, proof or dry-run" >&2; exit 2 ;;
esac
