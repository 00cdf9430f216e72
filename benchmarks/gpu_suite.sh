#!/usr/bin/env bash
# The GPU figures in one run: every GPU benchmark the README names, in order, each under its own time cap, all of
# their figures merged into OUTDIR/gpu_suite.json (plus the whole output in OUTDIR/gpu_suite.log).
#
#   bash benchmarks/gpu_suite.sh OUTDIR            # on a CUDA machine: true shapes (SD 1.5-shaped random weights)
#   bash benchmarks/gpu_suite.sh OUTDIR --smoke    # anywhere, on CPU: toy sizes, checks that every step runs
#
# It runs from the working tree (PYTHONPATH), never pip-installs the project: the GPU machine's torch (2.11) is not
# the project's pin. PYTHON picks the interpreter (default python3). Steps, in order (GPU mode):
#
#  1. styleid (cap 200 s)  bench_styleid.py --sd-shaped --size 512 --steps 50 --batch 8 --n-content 8 --strides 1,2,3
#     ours at inversion stride 1/2/3 (float16), img2img strict and with diffusers' defaults, the official flow as
#     published (batch 1, q/k/v pickled to disk, float32 with float16-autocast sampling). 50 steps is StyleID's
#     setting; 8 contents in batches of 8 is one full UNet batch. Estimate on an H100/H200, from ~25 ms per batch-8
#     UNet call in fp16, ~30 ms per batch-1 call in fp32, ~3.5 GB of fp32 features per official image: ours 3-4 s
#     per run, img2img ~3 s, the official flow ~50 s, warm-up ~25 s, two model builds ~30 s: about 2 min.
#  2. customize (cap 120 s)  bench_customize.py --sd15-shapes --size 512 --steps 30 --batch 4 --repeats 3 fp16
#     plain SD vs FaceSnap, same steps and batch (30 steps: FaceSnap's sampling setting); each engine in its own
#     process building SD 1.5 + ViT-H (~20 s), 4 calls of ~1 s: about 1 min.
#  3. train_customizer (cap 90 s)  bench_train_customizer.py --size 512 --batch 8 --steps 5 bf16 autocast
#     one warm-up and 5 timed FaceSnap training steps (~0.5 s each) after a ~25 s build: under 1 min.
#  4. stylize_stage_tiny (cap 90 s)  bench_stylize_stage.py on configs/stylize_tiny.yaml with num_gpus 1, 512 rows
#     of 64 px through Ray Data (one GPU actor), the GPU's busy share sampled with NVML every 50 ms: ~40 s with
#     Ray's start.
#  5. stylize_stage_sd15 (cap 90 s)  the same stage with the SD 1.5-shaped model at 512 px, 20 steps, batch 8,
#     48 rows: the busy share at true cost per call (~45 s).
#  6. gpu_tests (cap 150 s)  pytest -m gpu on the files holding GPU-marked tests (the torch.compile test compiles
#     the tiny UNet with inductor: the least predictable step, so it runs last).
#
# GPU_SUITE_ONLY="styleid customize" runs only the named steps (a rerun of what failed; the others are recorded as
# skipped). Expected total about 6 min; the caps are also clipped to a suite budget (GPU_SUITE_BUDGET_S, default 460 s), so
# the suite ends within 8 min whatever happens; a step stopped by its cap is recorded as "timeout". --smoke runs the
# same steps at toy sizes on CPU (tiny models, 32 px, 1-3 steps; stylize_stage_sd15 is skipped) in 2-3 min on 2
# quiet cores (1 min 4 s of CPU time), with caps and a budget (1500 s) wide enough for a machine shared with others.
set -u -o pipefail

OUTDIR=${1:?usage: gpu_suite.sh OUTDIR [--smoke]}
MODE=gpu
[[ ${2:-} == --smoke ]] && MODE=smoke
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_suite.log
PARTS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
PY=${PYTHON:-python3}
: >"$LOG"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# a local Ray on loopback only, no token, no usage reports
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

if [[ $MODE == smoke ]]; then
    BUDGET=${GPU_SUITE_BUDGET_S:-1500}  # CPU timings are not the point: room for a busy machine
else
    BUDGET=${GPU_SUITE_BUDGET_S:-460}
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))

say() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

status_json() {  # status_json NAME CAP RC SECONDS STATUS REASON CMD...
    "$PY" - "$@" >"$PARTS/$1.status.json" <<'EOF'
import json, sys
name, cap, rc, seconds, status, reason, *cmd = sys.argv[1:]
out = {"name": name, "cap_s": int(cap), "rc": None if rc == "" else int(rc), "seconds": float(seconds),
       "command": " ".join(cmd)}
if status:
    out["status"], out["reason"] = status, reason
print(json.dumps(out))
EOF
}

step() {  # step NAME CAP_S CMD... (the command writes $PARTS/NAME.json or .xml)
    local name=$1 cap=$2
    shift 2
    if [[ -n ${GPU_SUITE_ONLY:-} && " $GPU_SUITE_ONLY " != *" $name "* ]]; then
        status_json "$name" 0 "" 0 skipped "not in GPU_SUITE_ONLY ($GPU_SUITE_ONLY)" "$@"
        return
    fi
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 15)); then
        say "$name: skipped, the suite's ${BUDGET} s budget is spent"
        status_json "$name" 0 "" 0 skipped "suite budget (${BUDGET} s) spent" "$@"
        return
    fi
    ((cap > left)) && cap=$left
    say "=== $name (cap ${cap} s): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 15 "$cap" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    say "=== $name: exit $rc after $secs s"
    status_json "$name" "$cap" "$rc" "$secs" "" "" "$@"
    LAST_RC=$rc
}
LAST_RC=0

skip() {  # skip NAME REASON
    say "$1: skipped ($2)"
    status_json "$1" 0 "" 0 skipped "$2"
}

stop_ray() {  # a Ray step that failed or was stopped by its cap can leave Ray's daemons behind
    if ((LAST_RC != 0)); then
        "$PY" -m ray.scripts.scripts stop --force >>"$LOG" 2>&1 || true
    fi
}

say "mode $MODE, budget ${BUDGET} s, parts in $PARTS, python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF
CUDA_OK=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ $MODE == gpu && $CUDA_OK != 1 ]]; then
    say "GPU mode but torch sees no CUDA device: nothing measured (use --smoke on a CPU machine)"
    "$PY" benchmarks/gpu_suite_merge.py --parts "$PARTS" --out "$OUTDIR/gpu_suite.json" --mode gpu \
        --budget-s "$BUDGET" 2>&1 | tee -a "$LOG"
    exit 2
fi

GPU_TEST_FILES=$(grep -l "pytest.mark.gpu" -r tests --include='test_*.py' | sort | tr '\n' ' ')
STAGE_CFG=configs/stylize_tiny.yaml

if [[ $MODE == gpu ]]; then
    step styleid 200 "$PY" benchmarks/bench_styleid.py --sd-shaped --device cuda --size 512 --steps 50 \
        --batch 8 --n-content 8 --strides 1,2,3 --json "$PARTS/styleid.json"
    step customize 120 "$PY" benchmarks/bench_customize.py --device cuda --sd15-shapes --size 512 --steps 30 \
        --batch 4 --repeats 3 --dtype float16 --threads 8 --synthetic-face --json "$PARTS/customize.json"
    step train_customizer 90 "$PY" benchmarks/bench_train_customizer.py --device cuda --size 512 --batch 8 \
        --steps 5 --mixed-precision bf16 --synthetic-face --json "$PARTS/train_customizer.json"
    step stylize_stage_tiny 90 "$PY" benchmarks/bench_stylize_stage.py --config "$STAGE_CFG" --rows 512 \
        --size 64 --set resources.stylize.num_gpus=1 --set stylize.options.device=cuda \
        --json "$PARTS/stylize_stage_tiny.json"
    stop_ray
    step stylize_stage_sd15 90 "$PY" benchmarks/bench_stylize_stage.py --config "$STAGE_CFG" --rows 48 \
        --size 512 --set stylize.options.tiny=false --set stylize.options.model=sd15-shaped \
        --set stylize.options.resolution=512 --set stylize.options.steps=20 --set stylize.options.batch_size=8 \
        --set resources.stylize.batch_size=8 --set resources.stylize.num_gpus=1 --set stylize.options.device=cuda \
        --json "$PARTS/stylize_stage_sd15.json"
    stop_ray
    # shellcheck disable=SC2086
    step gpu_tests 150 "$PY" -m pytest -m gpu $GPU_TEST_FILES -q -p no:cacheprovider -rA \
        --junitxml="$PARTS/gpu_tests.xml"
else
    step styleid 400 "$PY" benchmarks/bench_styleid.py --device cpu --size 32 --steps 3 --batch 2 --n-content 2 \
        --strides 1,2,3 --json "$PARTS/styleid.json"
    step customize 300 "$PY" benchmarks/bench_customize.py --device cpu --size 32 --steps 1 --batch 1 \
        --repeats 1 --synthetic-face --json "$PARTS/customize.json"
    step train_customizer 200 "$PY" benchmarks/bench_train_customizer.py --device cpu --tiny --size 32 --steps 1 \
        --threads 1 --synthetic-face --json "$PARTS/train_customizer.json"
    step stylize_stage_tiny 400 "$PY" benchmarks/bench_stylize_stage.py --config "$STAGE_CFG" --rows 8 --size 32 \
        --num-cpus 2 --set stylize.options.device=cpu --json "$PARTS/stylize_stage_tiny.json"
    stop_ray
    skip stylize_stage_sd15 "smoke mode: the SD 1.5-shaped stage runs on a GPU only"
    # shellcheck disable=SC2086
    step gpu_tests 200 "$PY" -m pytest -m gpu $GPU_TEST_FILES -q -p no:cacheprovider -rA \
        --junitxml="$PARTS/gpu_tests.xml"
fi

"$PY" benchmarks/gpu_suite_merge.py --parts "$PARTS" --out "$OUTDIR/gpu_suite.json" --mode "$MODE" \
    --budget-s "$BUDGET" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "done in $(($(date +%s) - START)) s: $OUTDIR/gpu_suite.json"
rm -rf "$PARTS"
exit "$rc"
