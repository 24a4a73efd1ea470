#!/usr/bin/env bash
# One command that checks numpy-gpt on a machine with an NVIDIA GPU and CuPy, in under 8 minutes.
#
#   bash scripts/gpu_check.sh                        # results in $OUT (default /tmp/gpu_check_out)
#   ONLY="parity bench" bash scripts/gpu_check.sh    # some of the steps only
#   GPU_CHECK_STAND_IN=1 bash scripts/gpu_check.sh   # a rehearsal on a CPU: tests/fake_cupy.py is CuPy,
#                                                    # with fewer steps and tokens (catches a broken step
#                                                    # before it costs GPU time; its figures mean nothing)
# Steps, most important first; each is bounded by its own limit and by what is left of BUDGET
# (seconds, default 450), and one that fails or runs out of time does not stop the next:
#   env       Python, NumPy, CuPy, the GPU and its driver
#   pytest    tests/test_device.py and tests/test_fake_cupy.py: with CuPy and a GPU the GPU tests run
#   parity    the first step's loss and gradient norm against NumPy's, Small and Medium, 1e-5 relative
#             (scripts/gpu_parity.py)
#   bench     benchmark.py --device cuda for Small and Medium (ms per step, tokens/s, CuPy's pool)
#   generate  generate.py --device cuda --benchmark: tokens/s with and without the key/value cache
#   train     the bundled sample tokenized; 40 steps of Small on the GPU, then the same run resumed
#             from its step-20 checkpoint, and the two final weights compared
#   mpi       2 MPI ranks sharing the GPU (with several GPUs: one each) resume that run from its
#             step-20 checkpoint; their final weights compared with the one process's (needs mpi4py)
#   memory    peak GPU memory: nvidia-smi, sampled twice a second through the whole run
# $OUT/summary.txt has one line per check: ok/FAIL/TIME/SKIP, the check, its seconds, its figure.
# Every command's whole output is in $OUT/log.txt; nvidia-smi's samples in $OUT/nvsmi.csv.
set -u
T0=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu_check_out}
W=${WORK:-/tmp/gpu_check_work}
if [ -z "${PY:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
STAND_IN=${GPU_CHECK_STAND_IN:-}
mkdir -p "$OUT" "$W"
cd "$REPO" || exit 2
S=$OUT/summary.txt
LOG=$OUT/log.txt
: > "$S"
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export CUPY_CACHE_DIR=$W/cupy_kernel_cache  # CuPy's compiled kernels, shared by the steps (compiled once)

if [ -n "$STAND_IN" ]; then
  BUDGET=${BUDGET:-1200}
  # `import cupy` and `import cupyx` find these first (in every process, mpiexec's ranks too): they
  # put the stand-in in their place
  export PYTHONPATH=$REPO/tests/stand_in${PYTHONPATH:+:$PYTHONPATH}
  BENCH=(--steps 1 --min_seconds 0 --batch_size 4)
  GEN_TOKENS=8
  TRAIN_STEPS=6
else
  BUDGET=${BUDGET:-450}
  BENCH=(--min_seconds 2)
  GEN_TOKENS=256
  TRAIN_STEPS=40
fi
HALF=$((TRAIN_STEPS / 2))

left() { echo $((BUDGET - ($(date +%s) - T0))); }
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
line() { printf '%-4s  %-15s %4ss  %s\n' "$1" "$2" "$3" "$4" >> "$S"; }

# step NAME LIMIT PATTERN CMD...: runs CMD (its output to the log); the summary line's figure is the
# lines of that output matching the extended regex PATTERN, or on failure its last line
step() {
  local name=$1 lim=$2 pat=$3 l rc t st detail
  shift 3
  l=$(left)
  if [ "$l" -lt 15 ]; then line SKIP "$name" 0 "the budget of ${BUDGET}s is spent"; return 99; fi
  [ "$lim" -gt "$l" ] && lim=$l
  printf '\n===== %s  %s  limit %ss\n$ %s\n' "$name" "$(date +%T)" "$lim" "$*" >> "$LOG"
  t=$(date +%s)
  timeout -k 5 "$lim" "$@" > "$W/step.out" 2>&1
  rc=$?
  cat "$W/step.out" >> "$LOG"
  detail=$(grep -E -- "$pat" "$W/step.out" | sed 's/^ *//; s/  */ /g' | paste -sd '|' - | cut -c1-240)
  case $rc in 0) st=ok ;; 124 | 137) st=TIME ;; *) st=FAIL ;; esac
  if [ "$rc" != 0 ] && [ -z "$detail" ]; then detail=$(grep -v '^[[:space:]]*$' "$W/step.out" | tail -1 | cut -c1-240); fi
  line "$st" "$name" $(($(date +%s) - t)) "$detail"
  return $rc
}

SMI=
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu --format=csv,nounits \
    -lms 500 > "$OUT/nvsmi.csv" 2>&1 &
  SMI=$!
  trap 'kill $SMI 2> /dev/null' EXIT
fi

# ------------------------------------------------------------------ env
if want env; then
  { date -u; command -v nvidia-smi > /dev/null && nvidia-smi; echo "cores: $(nproc)"; } >> "$LOG" 2>&1
  step env 60 '^(versions|gpu|NOTE)' "$PY" -c '
import sys, numpy
import cupy
print("versions: python", sys.version.split()[0], "| numpy", numpy.__version__, "| cupy", cupy.__version__)
rt = cupy.cuda.runtime
if hasattr(rt, "getDeviceProperties"):
    p = rt.getDeviceProperties(0)
    print("gpu:", p["name"].decode(), "| CUDA runtime", rt.runtimeGetVersion(), "| driver", rt.driverGetVersion(),
          "| GPUs", rt.getDeviceCount())
else:
    print("NOTE: stand-in (tests/fake_cupy.py), no GPU: these figures mean nothing")
'
fi

# ------------------------------------------------------------------ the device tests
# (the first CuPy use of a fresh machine: this step also pays for compiling the kernels)
if want pytest; then
  step pytest 200 '(passed|failed|error)' "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_device.py tests/test_fake_cupy.py
fi

# ------------------------------------------------------------------ first-step parity with NumPy
if want parity; then
  step parity_small 120 '^small:' "$PY" scripts/gpu_parity.py small --tol 1e-5
  step parity_medium 150 '^medium:' "$PY" scripts/gpu_parity.py medium --tol 1e-5
fi

# ------------------------------------------------------------------ benchmark.py on the GPU
if want bench; then
  step bench_small 75 'ms +matmuls' "$PY" benchmark.py --device cuda "${BENCH[@]}"
  step bench_medium 90 'ms +matmuls' "$PY" benchmark.py --device cuda \
    --d_model 256 --n_heads 8 --d_ff 1024 --n_layers 4 --batch_size 16 --seq_len 256 "${BENCH[@]}"
fi

# ------------------------------------------------------------------ generation speed
if want generate; then
  step generate 120 '^(small|medium):|tokens/s' "$PY" generate.py --device cuda --benchmark \
    --benchmark_tokens "$GEN_TOKENS"
fi

# ------------------------------------------------------------------ train and resume on the GPU
TR=(--train_data "$W/train.jsonl" --val_data "$W/valid.jsonl" --vocab_size 50257 --d_model 128 --n_heads 4
  --d_ff 512 --n_layers 2 --batch_size 32 --seq_len 128 --learning_rate 1e-3 --warmup_steps 5
  --log_interval "$HALF" --eval_interval "$HALF" --eval_batches 4 --save_interval "$HALF" --no_progress
  --device cuda --max_steps "$TRAIN_STEPS")
# compare_moves.py WHOLE OTHER HALF WHAT: the run OTHER, resumed at step HALF from WHOLE's checkpoint,
# against WHOLE: on a GPU close, not bit for bit (its scatter-add has no fixed order, and 2 ranks add up
# a batch's halves otherwise than one pass over it); a state lost on resume would move them by far more
cat > "$W/compare_moves.py" << 'EOF'
import json
import sys
import numpy as np
sys.path.insert(0, ".")
from checkpoint import load_checkpoint
whole, other, half, what = sys.argv[1:5]
a, b = (load_checkpoint(f"{d}/checkpoint_final.npz").params for d in (whole, other))
h = load_checkpoint(f"{whole}/checkpoint_step_{half}.npz").params
worst = max(float(np.abs(b[k] - a[k]).max() / max(np.abs(a[k] - h[k]).max(), 1e-30)) for k in a)
with open(f"{other}/metrics.jsonl") as f:  # the GPU of each rank, as the run recorded it
    gpus = [r["gpus"] for r in map(json.loads, f) if r.get("type") == "ranks"][-1]
print(f"{what} from step {half} on {', '.join(gpus)}: its moves since then differ from the uninterrupted run's "
      f"by {worst:.1e} of the largest move (at most 5e-2 passes)")
sys.exit(0 if worst <= 5e-2 else 1)
EOF
if want train; then
  rm -rf "$W/ck_gpu" "$W/ck_resumed"
  step tokenize 90 ' tokens \(' bash -c "
    '$PY' tokenizer.py data/sample/TinyStoriesV2-GPT4-train.sample.txt '$W/train.jsonl' --tokenizer tiktoken \
      --encoding gpt2 --max_length 512 --quiet &&
    '$PY' tokenizer.py data/sample/TinyStories-valid.sample.txt '$W/valid.jsonl' --tokenizer tiktoken \
      --encoding gpt2 --max_length 512 --quiet" &&
  step train_gpu 120 "^step +$TRAIN_STEPS/|^eval step $TRAIN_STEPS:" "$PY" train.py "${TR[@]}" --save_dir "$W/ck_gpu" &&
  step train_resume 90 "^step +$TRAIN_STEPS/|^eval step $TRAIN_STEPS:" "$PY" train.py "${TR[@]}" --save_dir "$W/ck_resumed" \
    --resume "$W/ck_gpu/checkpoint_step_$HALF.npz" &&
  step resume_compare 60 'moves since' "$PY" "$W/compare_moves.py" "$W/ck_gpu" "$W/ck_resumed" "$HALF" resumed
fi

# ------------------------------------------------------------------ 2 MPI ranks on the GPU
if want mpi; then
  MPIEXEC=$(dirname "$PY")/mpiexec
  [ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec)
  if [ -z "$MPIEXEC" ] || ! "$PY" -c 'import mpi4py' 2> /dev/null; then
    line SKIP mpi_2ranks 0 "needs mpi4py and mpiexec: $PY -m pip install mpi4py mpich"
  elif [ ! -f "$W/ck_gpu/checkpoint_step_$HALF.npz" ]; then
    line SKIP mpi_2ranks 0 "needs the train step's checkpoints (ONLY=\"train mpi\")"
  else
    rm -rf "$W/ck_mpi"
    # Open MPI refuses root without these; MPICH ignores them
    step mpi_2ranks 120 "^step +$TRAIN_STEPS/" env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
      "$MPIEXEC" -n 2 "$PY" train.py "${TR[@]}" --save_dir "$W/ck_mpi" --resume "$W/ck_gpu/checkpoint_step_$HALF.npz" &&
    step mpi_compare 60 'moves since' "$PY" "$W/compare_moves.py" "$W/ck_gpu" "$W/ck_mpi" "$HALF" "2 MPI ranks"
  fi
fi

# ------------------------------------------------------------------ peak GPU memory
if [ -n "$SMI" ]; then
  kill "$SMI" 2> /dev/null
  peak=$(awk -F', ' 'NR > 1 && $2 + 0 > m { m = $2 + 0; t = $3 } END { if (m) print m " MiB of " t " MiB" }' "$OUT/nvsmi.csv")
  pool=$(grep -oE 'GPU memory [0-9,]+ MB' "$LOG" | tr -d , | sort -k3 -n | tail -1)
  line "$([ -n "$peak" ] && echo ok || echo FAIL)" memory 0 "peak used on the GPU (nvidia-smi, CUDA contexts included): ${peak:-no samples}; largest CuPy pool in benchmark.py: ${pool:-none}"
elif want memory; then
  line SKIP memory 0 "no nvidia-smi here"
fi

echo "== total $(($(date +%s) - T0))s of a ${BUDGET}s budget" >> "$S"
cat "$S"
! grep -qE '^(FAIL|TIME)' "$S"
