#!/usr/bin/env bash
# The GPU measurements for docs/performance.md in one run, on a machine that has torch (>= 2.11),
# torchvision, numpy, Pillow, fsspec and rich but none of the cluster extras (no Ray, DeepSpeed,
# s3fs). Run from the repository root:
#
#   bash jobs/gpu_check.sh [OUT_DIR]          # default: $OUT, else runs/gpu-check
#
# Phases, each under its own time limit so a slow one cannot eat the others' time, each writing
# its results as soon as it has them (a cut-off run still leaves what it measured):
#   env      GPU, driver, torch/CUDA/cuDNN versions            -> env.txt
#   tests    pytest -m gpu (train steps, prefetcher, local fit)  -> pytest-gpu.txt
#   eager    benchmark: branched, distillation x batch 16/32/64 -> bench-eager.json/.txt
#   plain    branched x batch 16 without the DDP wrapper         -> bench-plain.json/.txt
#   loader   loader benchmark (img/s per core)                   -> bench-loader.json/.txt
#   compile  as plain, with --compile (vs plain: the default?)   -> bench-compile.json/.txt
# The default limits add up to 580 s: one call of a 600 s device command.
#
# Small pure-Python packages missing there (webdataset, braceexpand, pytest, ...) come from wheels
# in .whl/, installed into a private folder; fetch them beforehand on a machine with an index:
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl webdataset==1.0.2 braceexpand pyyaml pytest pluggy iniconfig packaging pygments
#
# Knobs (environment): PHASES (default "env tests eager plain loader compile"), SIZE (256x512),
# BATCHES ("16 32 64"), COMPILE_BATCHES ("16"), ARCHS ("branched distillation"), ENCODER
# (resnet34), STEPS (30), WARMUP (10), SAMPLES (2048 synthetic train samples: few epoch
# restarts), WORKERS (12), and per-phase limits in seconds: T_TESTS (120), T_EAGER (200),
# T_PLAIN (40), T_LOADER (50), T_COMPILE (170).
set -uo pipefail

OUT_DIR=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$OUT_DIR"
PHASES=${PHASES:-env tests eager plain loader compile}
SIZE=${SIZE:-256x512}
BATCHES=${BATCHES:-16 32 64}
COMPILE_BATCHES=${COMPILE_BATCHES:-16}
ARCHS=${ARCHS:-branched distillation}
ENCODER=${ENCODER:-resnet34}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-10}
SAMPLES=${SAMPLES:-2048}
WORKERS=${WORKERS:-12}
PY=${PYTHON:-python3}
export STREETMTL_CACHE=${STREETMTL_CACHE:-/tmp/streetmtl-cache}

if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=/tmp/streetmtl-site
    "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
phase() {  # phase NAME LIMIT_S LOG CMD...: run, keep the output, never stop the script
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit}s) =="
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s ==" | tee -a "$OUT_DIR/phases.txt"
    [ "$rc" -eq 0 ] || status=1
}

train_bench() {  # train_bench NAME LIMIT_S ARGS...: jobs/benchmark.py train with the shared knobs
    local name=$1 limit=$2
    shift 2
    phase "$name" "$limit" "bench-$name.txt" "$PY" jobs/benchmark.py train --encoder "$ENCODER" --size "$SIZE" \
        --steps "$STEPS" --warmup "$WARMUP" --samples "$SAMPLES" --workers "$WORKERS" --json "$OUT_DIR/bench-$name.json" "$@"
}

for p in $PHASES; do
    case $p in
    env)
        { nvidia-smi || true; "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
"cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
          nproc; free -g; } >"$OUT_DIR/env.txt" 2>&1
        cat "$OUT_DIR/env.txt" ;;
    tests)
        phase tests "${T_TESTS:-120}" pytest-gpu.txt "$PY" -m pytest -m gpu -p no:cacheprovider -q tests/test_gpu.py ;;
    eager)
        # shellcheck disable=SC2086
        train_bench eager "${T_EAGER:-200}" --archs $ARCHS --batch-sizes $BATCHES ;;
    plain)
        # shellcheck disable=SC2086
        train_bench plain "${T_PLAIN:-40}" --archs branched --batch-sizes $COMPILE_BATCHES --strategy plain ;;
    compile)
        # shellcheck disable=SC2086
        train_bench compile "${T_COMPILE:-170}" --archs branched --batch-sizes $COMPILE_BATCHES --strategy plain --compile ;;
    loader)
        phase loader "${T_LOADER:-50}" bench-loader.txt "$PY" jobs/benchmark.py loader --size "$SIZE" --samples 400 \
            --workers "$WORKERS" --json "$OUT_DIR/bench-loader.json" ;;
    *)
        echo "unknown phase '$p' (known: env tests eager plain loader compile)" >&2
        exit 2 ;;
    esac
done
exit $status
