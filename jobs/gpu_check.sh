#!/usr/bin/env bash
# The GPU measurements for docs/performance.md in one run, on a machine that has torch (>= 2.11),
# torchvision, numpy, Pillow, fsspec and rich; Ray, DeepSpeed and the other missing packages come
# from the bundle that `bash jobs/gpu_bundle.sh` makes (see below). Run from the repository root:
#
#   bash jobs/gpu_check.sh [OUT_DIR]     # default: runs/gpu-check
#
# On the device machine ($OUT set, and no OUT_DIR or OUT_DIR = $OUT) the results are written to
# /tmp/streetmtl-gpu-check/results and, after every phase, packed into $OUT: phases.txt,
# bundle.txt, env.txt, ray.json, deepspeed.json and gpu-check.tar.gz (all results): at most 8
# files, no checkpoints. PACK_TO=DIR does the same packing for any OUT_DIR.
#
# Phases, each under its own time limit so a slow one cannot eat the others' time, each writing
# its results as soon as it has them (a cut-off run still leaves what it measured):
#   env       GPU, driver, torch/CUDA/cuDNN versions, pip list; whether the bundle's Ray and
#             DeepSpeed import, and /proc's children lists (the loader's CPU use) -> env.txt
#   tests     pytest -m gpu (train steps, prefetcher, local fit)    -> pytest-gpu.txt
#   data      the train phases' synthetic set (RAY_FLAGS), made before Ray starts -> data.txt
#   ray       jobs/train.py through Ray Train (run_ray on a Ray instance of this machine, one
#             TorchTrainer worker with the GPU): 2 epochs with checkpoints, then --resume to a
#             third; checks the device and the resume                -> ray.json, ray.txt, ray/
#   deepspeed the same with --strategy deepspeed --zero-stage 2     -> deepspeed.json, deepspeed.txt, deepspeed/
#   eager     benchmark: branched, distillation x BATCHES (16 64), 1-rank DDP; each row measures
#             the eager step and the step captured as a CUDA graph (pure, full, host ms, memory)
#                                                                   -> bench-eager.json/.txt
#   plain     branched x COMPILE_BATCHES without the DDP wrapper (eager and captured)
#                                                                   -> bench-plain.json/.txt
#   loader    loader benchmark (img/s per core; img/s by worker count) -> bench-loader.json/.txt
#   compile   as plain, with --compile (eager and captured)         -> bench-compile.json/.txt
#   threads   as eager for branched x THREADS_BATCHES (64), the training process limited to
#             INTRA_OP_THREADS (1) CPU threads: do its pin-memory copies slow the loader's workers?
#             (not in the default PHASES)                           -> bench-threads.json/.txt
#   background  what other threads' work (a checkpoint's torch.save, PNG encoding, a curves.png
#             drawing) costs the training thread's step queueing on this host's Python
#             (BACKGROUND_FLAGS; not in the default PHASES; the drawing rows need matplotlib)
#                                                                   -> bench-background.json/.txt
# The default limits add up to 570 s and no phase runs past DEADLINE (585 s after the start,
# the bundle's installation included: a phase's limit is cut to end 15 s before it, the grace
# between SIGINT and SIGKILL, and a train phase's 45 s earlier still, for its checks, which run
# after its limit, under 40 s of their own; a phase left with under 10 s is recorded as skipped):
# one call of a 600 s device command. The benchmark phases and the GPU tests need no Ray and no DeepSpeed: with
# a bundle of the seven wheels they need (`bash jobs/gpu_bundle.sh min .gpu-bundle .gpu-min`) they
# run in a call of their own, with longer limits: PHASES="env tests eager plain loader compile"
# BUNDLE=.gpu-min BATCHES="16 32 64" T_TESTS=100 T_EAGER=220 T_PLAIN=60 T_LOADER=100 T_COMPILE=100.
#
# The bundle: folder BUNDLE (default .gpu-bundle, made by jobs/gpu_bundle.sh on a machine with a
# package index, for one Python version) holds Ray slimmed to a tar.xz and wheels of everything
# else the machine lacks. When it is there it is installed into SITE (/tmp/streetmtl-site), first
# on PYTHONPATH; Ray's dashboard packages into SITE-dashboard, used only if all of the dashboard's
# modules import with them (else Ray's minimal dashboard; bundle.txt says which). BUNDLE= (empty),
# or no such folder, uses what the Python has installed (e.g. the project's venv); without a
# bundle, a Python that lacks the project's packages stops the script at once (exit 2).
#
# A train phase (ray, deepspeed) runs `python jobs/train.py $RAY_FLAGS <phase's flags>
# --num-workers $TRAIN_WORKERS --out $RUNS/<phase> --name ray-gpu|ds-gpu --epochs 2` on a Ray
# instance of its own (never one some `ray start` left running), then the same with `--epochs 3
# --resume`. It fails unless both exit 0, both logs have rank 0's start line "<run> on <device>
# x<world>: ..." (mtl/engine.py) with EXPECT_DEVICE, the second says "resumed from ...: epoch 2" and epoch 3's
# metrics come from the resumed run; for deepspeed, the last checkpoint's ZeRO optimizer states
# must say stage 2. <phase>.json: img/s of every epoch (metrics/epoch-NNNN.json's
# train_images_per_s), the checks, seconds per run. The run folder (checkpoints) stays in RUNS;
# its metrics, summary.json, train.log and the two runs' output are copied to OUT_DIR/<phase>/.
#
# Knobs (environment): PHASES (default "env tests data ray deepspeed eager plain loader compile"),
# SIZE (256x512), BATCHES ("16 64"), COMPILE_BATCHES ("16"), ARCHS ("branched distillation"),
# ENCODER (resnet34), STEPS (30), WARMUP (10), SAMPLES (2048 synthetic train samples: few epoch
# restarts), WORKERS (12); for the loader phase LOADER_SAMPLES (1024), SCALING ("1 4 8 12 15":
# the training loader's img/s with each of these numbers of worker processes), SCALING_BATCHES
# ("16 64": each count at each batch size) and PER_WORKER (128 samples per worker process); for
# the threads phase THREADS_BATCHES ("64") and INTRA_OP_THREADS (1);
# for the train phases RAY_FLAGS (default: branched/ResNet34, synthetic
# 256x512 set of 1024/64/16, batch 16, 60 steps per epoch, 12 CPUs for the Ray worker, i.e. 11
# loader workers, no retries), TRAIN_WORKERS (1: the one GPU), STEP_CHECKPOINTS (30: a step
# checkpoint every 30 steps, one per epoch, in the background for ray; 0: none), EXPECT_DEVICE (cuda; cpu for a
# check on the CPU), RUNS (/tmp/streetmtl-gpu-check/runs), RAY_TMPDIR (/tmp/sgc-ray); BUNDLE,
# SITE, PACK_TO, DEADLINE (585), and per-phase limits in seconds: T_TESTS (70), T_DATA (30), T_RAY (85), T_DEEPSPEED (95),
# T_EAGER (130), T_PLAIN (40), T_LOADER (60), T_COMPILE (60), T_THREADS (50), T_BACKGROUND (40).
set -uo pipefail

WORK=/tmp/streetmtl-gpu-check
if [ -n "${OUT:-}" ] && { [ $# -eq 0 ] || [ "$(realpath -m "$1")" = "$(realpath -m "$OUT")" ]; }; then
    OUT_DIR=$WORK/results  # the device machine: full results here, packed into $OUT
    PACK_TO=${PACK_TO:-$OUT}
    rm -rf "$OUT_DIR"
else
    OUT_DIR=${1:-runs/gpu-check}
    PACK_TO=${PACK_TO:-}
fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(realpath "$OUT_DIR")
: >"$OUT_DIR/phases.txt"
PHASES=${PHASES:-env tests data ray deepspeed eager plain loader compile}
SIZE=${SIZE:-256x512}
BATCHES=${BATCHES:-16 64}
COMPILE_BATCHES=${COMPILE_BATCHES:-16}
ARCHS=${ARCHS:-branched distillation}
ENCODER=${ENCODER:-resnet34}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-10}
SAMPLES=${SAMPLES:-2048}
WORKERS=${WORKERS:-12}
LOADER_SAMPLES=${LOADER_SAMPLES:-1024}
SCALING=${SCALING:-1 4 8 12 15}
SCALING_BATCHES=${SCALING_BATCHES:-16 64}
PER_WORKER=${PER_WORKER:-128}
# (--max-failures 0: a failure is reported at once, not retried 3 times within the phase's time;
# --start-timeout-s 60: a worker group that cannot be placed fails instead of waiting 900 s)
RAY_FLAGS=${RAY_FLAGS:---arch branched --encoder resnet34 --synthetic-size 256x512 --synthetic-counts 1024 64 16 --batch-size 16 --max-steps-per-epoch 60 --cpus-per-worker 12 --max-failures 0 --start-timeout-s 60}
EXPECT_DEVICE=${EXPECT_DEVICE:-cuda}
BENCH_DEVICE=${BENCH_DEVICE:-$([ "$EXPECT_DEVICE" = cuda ] && echo cuda || echo auto)}  # (cuda: no CPU rows by mistake)
TRAIN_WORKERS=${TRAIN_WORKERS:-1}
RUNS=${RUNS:-$WORK/runs}
BUNDLE=${BUNDLE-.gpu-bundle}
SITE=${SITE:-/tmp/streetmtl-site}
DEADLINE=${DEADLINE:-585}
PY=${PYTHON:-python3}
export STREETMTL_CACHE=${STREETMTL_CACHE:-/tmp/streetmtl-cache}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/streetmtl-torch-extensions}  # DeepSpeed's JIT-built ops
export RAY_USAGE_STATS_ENABLED=0  # no usage report (and no attempt to reach the internet)
export RAY_AUTH_MODE=disabled     # a private cluster of this machine: no token (else the first ray.init turns token auth on)
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/sgc-ray}  # Ray's sessions (short: socket paths), no other cluster's address file

pack() {  # with PACK_TO: the small files, and all of OUT_DIR as one tar.gz (replaced atomically)
    [ -n "$PACK_TO" ] || return 0
    mkdir -p "$PACK_TO"
    tar -C "$(dirname "$OUT_DIR")" -czf "$PACK_TO/gpu-check.tar.gz.part" "$(basename "$OUT_DIR")" &&
        mv -f "$PACK_TO/gpu-check.tar.gz.part" "$PACK_TO/gpu-check.tar.gz"
    local f
    for f in phases.txt bundle.txt env.txt ray.json deepspeed.json; do
        [ -f "$OUT_DIR/$f" ] && cp -f "$OUT_DIR/$f" "$PACK_TO/"
    done
    return 0
}
trap pack EXIT  # also when the bundle's installation fails: bundle.txt comes back

# The bundle, if any: Ray untarred and the wheels installed into SITE, first on PYTHONPATH (Ray's
# worker processes inherit it); the dashboard's wheels into SITE-dashboard, put on PYTHONPATH only
# if every module of Ray's dashboard imports with them (as the full dashboard does at its start:
# one that fails there takes ray.init down), else Ray runs its minimal dashboard.
DASHBOARD_CHECK='
import importlib, pkgutil
import ray.dashboard.optional_deps  # what Ray checks to choose the full dashboard
import ray.dashboard.modules
for _, name, _ in pkgutil.walk_packages(ray.dashboard.modules.__path__, "ray.dashboard.modules."):
    importlib.import_module(name)  # what the full dashboard imports at its start
print("every dashboard module imports")'
if [ -z "$BUNDLE" ] || [ ! -d "$BUNDLE" ]; then
    # No bundle: fine on a box with this project installed; on the device machine (no tyro, Ray,
    # DeepSpeed) every phase would fail after its start, so stop here instead
    if ! "$PY" -c "import tyro, webdataset" 2>/dev/null; then
        echo "no bundle${BUNDLE:+ at $BUNDLE} and $PY lacks this project's packages (tyro, webdataset): make the bundle with" \
            "bash jobs/gpu_bundle.sh and carry it, or pip install -e '.[cluster]'" | tee "$OUT_DIR/bundle.txt" >&2
        exit 2
    fi
    echo "no bundle${BUNDLE:+ at $BUNDLE}: the installed packages" | tee "$OUT_DIR/bundle.txt"
    BUNDLE=
fi
if [ -n "$BUNDLE" ]; then
    want=$(cat "$BUNDLE/PYTHON" 2>/dev/null)
    have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$want" != "$have" ]; then
        echo "$BUNDLE was made for Python ${want:-?}, $PY is $have: PYVER=$have bash jobs/gpu_bundle.sh, or BUNDLE= to use the installed packages" >&2
        exit 2
    fi
    {
        echo "== bundle: $BUNDLE -> $SITE"
        rm -rf "$SITE" "$SITE-dashboard" && mkdir -p "$SITE" || exit 2
        for t in "$BUNDLE"/ray-*-slim.tar.xz; do
            [ -e "$t" ] || continue
            if command -v xz >/dev/null; then  # (tar -J runs xz, which slim images may lack: Python's tarfile then)
                tar -C "$SITE" -xJf "$t" || exit 2
            else
                "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="fully_trusted")' \
                    "$t" "$SITE" || exit 2
            fi
        done
        pip_target() {  # pip_target DIR WHEEL...: offline, no dependency resolution, no bytecode
            local dir=$1
            shift
            "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --no-compile --target "$dir" "$@"
        }
        if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
            pip_target "$SITE" "$BUNDLE"/wheels/*.whl || exit 2
        fi
        if compgen -G "$BUNDLE/wheels/dashboard/*.whl" >/dev/null; then
            pip_target "$SITE-dashboard" "$BUNDLE"/wheels/dashboard/*.whl || exit 2
            if PYTHONPATH="$SITE-dashboard:$SITE" "$PY" -c "$DASHBOARD_CHECK" 2>&1 | tail -3; then
                echo "Ray dashboard: full"
            else
                echo "Ray dashboard: minimal (the error above: its packages do not fit this machine)"
            fi
        fi
        echo "== bundle installed after ${SECONDS}s"
    } 2>&1 | tee "$OUT_DIR/bundle.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
    DASH=  # (the block above ran in a subshell: its verdict is read back from bundle.txt)
    grep -q "^Ray dashboard: full" "$OUT_DIR/bundle.txt" && DASH="$SITE-dashboard:"
    export PYTHONPATH="$DASH$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"  # the wheels' commands: ninja, which DeepSpeed's JIT builds run
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
phase() {  # phase NAME LIMIT_S LOG CMD...: run, keep the output, never stop the script
    local name=$1 limit=$2 log=$3
    shift 3
    # 15 s: the grace between SIGINT and SIGKILL below; RESERVE: what runs after the phase (a train phase's checks)
    local left=$((DEADLINE - SECONDS - 15 - ${RESERVE:-0}))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped, ${left}s left before the deadline (${DEADLINE}s) ==" | tee -a "$OUT_DIR/phases.txt"
        status=1
        return 1
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit}s) =="
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s ==" | tee -a "$OUT_DIR/phases.txt"
    [ "$rc" -eq 0 ] || status=1
    pack
    return 0  # (it ran: what comes after it, e.g. a train phase's checks, may read its results)
}

train_bench() {  # train_bench NAME LIMIT_S ARGS...: jobs/benchmark.py train with the shared knobs
    local name=$1 limit=$2
    shift 2
    phase "$name" "$limit" "bench-$name.txt" "$PY" jobs/benchmark.py train --device "$BENCH_DEVICE" --encoder "$ENCODER" --size "$SIZE" \
        --steps "$STEPS" --warmup "$WARMUP" --samples "$SAMPLES" --workers "$WORKERS" --json "$OUT_DIR/bench-$name.json" "$@"
}

train_phase() {  # train_phase PHASE RUN_NAME ZERO_STAGE|- FLAG...: 2 epochs through Ray Train, then --resume to 3; exit codes
    # (runs in a child bash under the phase's time limit: uses only exported variables)
    local phase=$1 name=$2 zero=$3 rc1 rc2 t cut=0
    shift 3
    # The phase's limit interrupts the whole process group: the run stops, this shell goes on
    # (else bash dies of the SIGINT with it), the logs' tee -i keep the run's last words, and it
    # records the exit codes for train_report, which runs after the phase, outside its limit. Ray
    # Train's driver may exit 0 on the SIGINT (its own handler): ``cut`` keeps the resume from starting
    trap 'cut=1; echo "-- $phase: interrupted by the phase limit"' INT
    local runs=$RUNS/$phase dest=$OUT_DIR/$phase
    rm -rf "${RUNS:?}/$phase" "${OUT_DIR:?}/$phase" "$OUT_DIR/$phase.json" && mkdir -p "$runs" "$dest" ||
        { mkdir -p "$dest" && echo setup-failed >"$dest/rc1"; return 2; }
    # RAY_FLAGS first: the fixed flags after them win. No RAY_ADDRESS and a Ray temp folder of
    # its own: the run starts a Ray instance of this machine (GPUs auto-detected), never joins
    # one that some `ray start` left running.
    # shellcheck disable=SC2086
    # step checkpoints (every STEP_CHECKPOINTS steps; 0: none): what one stalls training, in the
    # background (ray) and in the foreground (deepspeed's shards), read from train.log
    local cmd=("$PY" jobs/train.py $RAY_FLAGS "$@" --num-workers "$TRAIN_WORKERS" --out "$runs" --name "$name"
               --checkpoint-every "${STEP_CHECKPOINTS:-30}")
    echo "-- $phase: ${cmd[*]} --epochs 2"
    t=$SECONDS
    env -u RAY_ADDRESS "${cmd[@]}" --epochs 2 2>&1 | tee -i "$dest/run1.log"
    rc1=${PIPESTATUS[0]}
    echo "-- $phase: exit $rc1 after $((SECONDS - t))s"
    echo "$((SECONDS - t))" >"$dest/run1.seconds"
    if [ "$rc1" -eq 0 ] && [ "$cut" -eq 0 ]; then
        echo "-- $phase: resume: --epochs 3 --resume"
        t=$SECONDS
        env -u RAY_ADDRESS "${cmd[@]}" --epochs 3 --resume 2>&1 | tee -i "$dest/run2.log"
        rc2=${PIPESTATUS[0]}
        echo "-- $phase: exit $rc2 after $((SECONDS - t))s"
        echo "$((SECONDS - t))" >"$dest/run2.seconds"
    else
        rc2=-  # nothing to resume: the phase fails on run 1's exit code (or its cut)
        echo "(run 1 failed or was cut by the phase limit: no resume)" >"$dest/run2.log"
        echo 0 >"$dest/run2.seconds"
    fi
    [ "$cut" -eq 0 ] || rc2=cut
    echo "$rc1" >"$dest/rc1"
    echo "$rc2" >"$dest/rc2"
}
train_report() {  # train_report PHASE RUN_NAME ZERO_STAGE|-: after train_phase, outside its time limit (a SIGINT
    # or SIGKILL there cannot cut the copies and the checks short): the run's small files, the checks, $phase.json
    local phase=$1 name=$2 zero=$3 rc1 rc2 rc i
    local runs=$RUNS/$phase dest=$OUT_DIR/$phase
    rc1=$(cat "$dest/rc1" 2>/dev/null) || rc1=killed  # (killed after the grace: the phase's shell wrote nothing)
    rc2=$(cat "$dest/rc2" 2>/dev/null) || rc2=cut
    for i in 1 2; do
        [ -f "$dest/run$i.seconds" ] || echo 0 >"$dest/run$i.seconds"
        [ -f "$dest/run$i.log" ] || echo "(not run)" >"$dest/run$i.log"
    done
    # the run's small files (no checkpoints): metrics per epoch, summary.json
    cp -r "$runs/$name/metrics" "$dest/" 2>/dev/null
    cp "$runs/$name/summary.json" "$runs/$name/train.log" "$dest/" 2>/dev/null
    ray_logs "$dest" "$rc1" "$rc2"
    timeout 40 "$PY" - "$phase" "$dest" "$EXPECT_DEVICE" "$rc1" "$rc2" "$OUT_DIR/$phase.json" "$runs/$name" "$zero" <<'EOF' 2>&1 | tee "$dest/checks.txt"
"""Checks of one train phase, and its result file (img/s per epoch)."""
import glob
import json
import os
import re
import sys

phase, dest, device, rc1, rc2, out, run_dir, want_zero = sys.argv[1:]
logs = [open(os.path.join(dest, f"run{i}.log"), errors="replace").read() for i in (1, 2)]
seconds = [int(open(os.path.join(dest, f"run{i}.seconds")).read()) for i in (1, 2)]
# rank 0's start line in mtl/engine.py: fit, "<run name> on <device> x<world>: ..."
start = re.compile(r"\S+ on (\S+) x(\d+): [\d,]+ params")
problems = []
if rc2 == "cut":
    problems.append(f"cut by the phase limit (run 1 exited {rc1}): raise T_{phase.upper()}")
elif rc1 != "0" or rc2 != "0":
    problems.append(f"exit codes {rc1}, {rc2} (want 0, 0)")
devices = []
for i, log in enumerate(logs, 1):
    m = start.search(log)
    devices.append(m.group(0) if m else None)
    if not m:
        problems.append(f"run {i}: no start line '<run> on <device> x<world>: ...' in its log")
    elif m.group(1).split(":")[0] != device:
        problems.append(f"run {i} ran on {m.group(1)}, expected {device}")
resumed = re.search(r"resumed from .*?: epoch (\d+), step \d+/\d+.*", logs[1])
if not resumed:
    problems.append("run 2 (--resume): no 'resumed from ...' in its log")
elif resumed.group(1) != "2":
    problems.append(f"run 2 resumed from epoch {resumed.group(1)}, expected 2")
epochs = []
for f in sorted(glob.glob(os.path.join(dest, "metrics", "epoch-*.json"))):
    m = json.load(open(f))
    epochs.append({k: m.get(k) for k in ("epoch", "step", "train_images_per_s", "val_s", "restarts", "train_loss", "miou", "si_log_rmse", "grader")})
if [e["epoch"] for e in epochs] != [1, 2, 3]:
    problems.append(f"metrics for epochs {[e['epoch'] for e in epochs]}, expected [1, 2, 3]")
elif not epochs[2]["restarts"]:
    problems.append("epoch 3's metrics say restarts=0: it was not trained by the resumed run")
zero = ds_version = None
# DeepSpeed's own record in the last checkpoint: its ZeRO optimizer's stage (not after a failed or
# cut-off first run: importing torch to read it takes seconds of the grace before the SIGKILL)
if want_zero != "-" and rc1 == "0" and rc2 != "cut":
    states = sorted(glob.glob(os.path.join(run_dir, "**", "*optim_states.pt"), recursive=True))
    if not states:
        problems.append(f"no DeepSpeed optimizer states (*optim_states.pt) in {run_dir}")
    else:
        from mtl.distributed.deepspeed_strategy import safe_deepspeed_load

        try:  # the trainer's own safe reader: tensors, plain data and the classes ZeRO 1/2 state holds
            sd = safe_deepspeed_load(states[-1], map_location="cpu")
            zero, ds_version = int(sd["optimizer_state_dict"]["zero_stage"]), sd.get("ds_version")
        except Exception as e:  # noqa: BLE001 - reported as the phase's problem
            problems.append(f"{states[-1]}: cannot read its ZeRO stage: {type(e).__name__}: {e}")
        else:
            if zero != int(want_zero):
                problems.append(f"{states[-1]}: ZeRO stage {zero}, expected {want_zero}")
# the engine's lines (mtl/engine.py): "<step|epoch> checkpoint <tag> (0.05 s of training stalled[;
# written in the background][; the run's last][; 1.10 s of it waiting for the previous one's write...])"
# and "checkpoint <tag> written in the background (1.20 s after it was taken)"
text = open(os.path.join(dest, "train.log"), errors="replace").read() if os.path.exists(os.path.join(dest, "train.log")) else ""
written = dict(re.findall(r"checkpoint (\S+) written in the background \(([\d.]+) s after it was taken\)", text))


def checkpoints(kind):
    lines = re.findall(rf"{kind} checkpoint (\S+) \(([\d.]+) s of training stalled([^\n]*)", text)
    return {"tags": [tag for tag, _, _ in lines], "stalled_s": [float(v) for _, v, _ in lines],
            "background": [("; written in the background" in rest) for _, _, rest in lines],
            "waited_s": [float(m.group(1)) if m else 0.0 for m in (re.search(r"; ([\d.]+) s of it waiting", r) for _, _, r in lines)],
            "written_s": [float(written[tag]) if tag in written else None for tag, _, _ in lines]}


steps, epoch_ends = checkpoints("step"), checkpoints("epoch")
result = {"phase": phase, "ok": not problems, "problems": problems, "start_lines": devices,
          "resumed": resumed.group(0) if resumed else None, "zero_stage": zero, "deepspeed_version": ds_version,
          "seconds": {"run1": seconds[0], "run2_resume": seconds[1]}, "epochs": epochs, "step_checkpoints": steps,
          "epoch_checkpoints": epoch_ends}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps({k: result[k] for k in ("phase", "ok", "problems")}))
for e in epochs:
    print(f"   epoch {e['epoch']}: {e['train_images_per_s'] or float('nan'):.1f} img/s, validation {e['val_s'] or float('nan'):.2f} s "
          f"(restarts {e['restarts']})")
for kind, c in (("step", steps), ("epoch", epoch_ends)):
    print(f"   {kind} checkpoints {c['tags']}: stalled {c['stalled_s']} s (of it waiting for the previous write {c['waited_s']} s), "
          f"in the background {c['background']}, written {c['written_s']} s after they were taken")
sys.exit(0 if not problems else 1)
EOF
    rc=${PIPESTATUS[0]}
    echo "== $phase checks: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc; $phase.json)") ==" | tee -a "$OUT_DIR/phases.txt"
    [ "$rc" -eq 0 ] || status=1
    pack
}
ray_logs() {  # ray_logs DEST RC1 RC2: after a failed or cut run, the ends of Ray's own logs (controller, raylet...)
    [ "$2" = 0 ] && [ "$3" = 0 ] && return 0
    local logs=$RAY_TMPDIR/ray/session_latest/logs f  # (Ray's temp dir is $RAY_TMPDIR/ray)
    [ -d "$logs" ] || logs=$RAY_TMPDIR/session_latest/logs
    [ -d "$logs" ] || return 0
    mkdir -p "$1/ray-logs"
    for f in "$logs"/*.err "$logs"/*.out; do
        [ -s "$f" ] && tail -c 20000 "$f" >"$1/ray-logs/$(basename "$f")"
    done
    return 0
}
export -f train_phase ray_logs
export OUT_DIR RUNS RAY_FLAGS EXPECT_DEVICE TRAIN_WORKERS PY

for p in $PHASES; do
    case $p in
    env)
        { timeout 30 nvidia-smi || true; timeout 60 "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
"cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
          nproc; free -g; timeout 30 "$PY" -m pip list --disable-pip-version-check 2>/dev/null
          # what the later phases rely on, found out here: the loader's per-worker CPU (jobs/benchmark.py
          # reads the loader's processes there), DeepSpeed's distutils, the bundle's Ray and DeepSpeed
          ls /proc/self/task/*/children >/dev/null 2>&1 && echo "proc children: yes" || echo "proc children: NO (loader workers' CPU unmeasured)"
          timeout 60 "$PY" -c 'import distutils.ccompiler, ray, ray.train.torch, deepspeed, webdataset, tyro
print("imports: ray", ray.__version__, "deepspeed", deepspeed.__version__)' || echo "imports: FAILED (above)"; } >"$OUT_DIR/env.txt" 2>&1
        cat "$OUT_DIR/env.txt"
        pack ;;
    tests)
        # (-rA: a passing test's printed lines too, e.g. which way the failed-capture test went;
        # -o addopts=: this process alone, as one GPU wants, and without pytest-xdist, which a GPU machine may lack)
        phase tests "${T_TESTS:-70}" pytest-gpu.txt "$PY" -m pytest -m gpu -p no:cacheprovider -o addopts= -q -rA tests/test_gpu.py &&
            if [ "$EXPECT_DEVICE" = cuda ] && grep -q "SKIPPED" "$OUT_DIR/pytest-gpu.txt"; then
                echo "== tests: GPU tests were SKIPPED (no CUDA device visible to torch?) ==" | tee -a "$OUT_DIR/phases.txt"
                status=1
            fi ;;
    data)
        # the train phases' synthetic set, made here: inside the Ray worker it would fork a process
        # that holds Ray's threads (and take the phase's time)
        # shellcheck disable=SC2086
        phase data "${T_DATA:-30}" data.txt "$PY" -c 'import sys
from jobs.train import parse
from mtl.data.build import resolve_source
print("train data:", resolve_source(parse(sys.argv[1:])[1]).url)' $RAY_FLAGS ;;
    ray)
        RESERVE=45 phase ray "${T_RAY:-85}" ray.txt bash -c 'train_phase "$@"' train_phase ray ray-gpu - &&
            train_report ray ray-gpu - ;;
    deepspeed)
        RESERVE=45 phase deepspeed "${T_DEEPSPEED:-95}" deepspeed.txt bash -c 'train_phase "$@"' train_phase deepspeed ds-gpu 2 \
            --strategy deepspeed --zero-stage 2 && train_report deepspeed ds-gpu 2 ;;
    eager)
        # shellcheck disable=SC2086
        train_bench eager "${T_EAGER:-130}" --archs $ARCHS --batch-sizes $BATCHES ;;
    plain)
        # shellcheck disable=SC2086
        train_bench plain "${T_PLAIN:-40}" --archs branched --batch-sizes $COMPILE_BATCHES --strategy plain ;;
    compile)
        # shellcheck disable=SC2086
        train_bench compile "${T_COMPILE:-60}" --archs branched --batch-sizes $COMPILE_BATCHES --strategy plain --compile ;;
    threads)
        # shellcheck disable=SC2086
        train_bench threads "${T_THREADS:-50}" --archs branched --batch-sizes ${THREADS_BATCHES:-64} \
            --intra-op-threads "${INTRA_OP_THREADS:-1}" ;;
    background)
        # shellcheck disable=SC2086
        phase background "${T_BACKGROUND:-40}" bench-background.txt "$PY" jobs/benchmark.py background ${BACKGROUND_FLAGS:-} \
            --json "$OUT_DIR/bench-background.json" ;;
    loader)
        # shellcheck disable=SC2086
        phase loader "${T_LOADER:-60}" bench-loader.txt "$PY" jobs/benchmark.py loader --size "$SIZE" --samples "$LOADER_SAMPLES" \
            --workers "$WORKERS" --scaling $SCALING --scaling-batches $SCALING_BATCHES --per-worker "$PER_WORKER" \
            --json "$OUT_DIR/bench-loader.json" ;;
    *)
        echo "unknown phase '$p' (known: env tests data ray deepspeed eager plain loader compile threads background)" >&2
        exit 2 ;;
    esac
done
exit $status
